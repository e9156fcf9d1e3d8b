//! Configuration plumbing shared by the daemons and plugins: `${VAR}` expansion,
//! TOML parsing into typed structs with one-line errors that name the key and line,
//! and the log settings both daemons accept.

use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A configuration file that could not be read, expanded or parsed. Its `Display` is
/// one line naming the file, the line and the offending key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A `${VAR}` reference names an unset variable or is malformed.
    #[error("config file {path} line {line}: {message}")]
    Expand {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The TOML is malformed or does not match the schema.
    #[error("config file {path} line {line}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// 1-based line (0 when unknown).
        line: usize,
        /// The parser's message, on one line.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("config file {path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// The dotted key, e.g. `server.trust_domain`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// A semantic error about `key` in the file at `path`.
    pub fn invalid(path: &Path, key: &str, message: impl fmt::Display) -> Self {
        Self::Invalid {
            path: path.display().to_string(),
            key: key.to_owned(),
            message: message.to_string(),
        }
    }
}

/// Replaces every `${NAME}` (NAME = `[A-Za-z_][A-Za-z0-9_]*`) with the variable's value,
/// as SPIRE's `-expandEnv` does. An unset variable is an error, not an empty string:
/// a silently empty `trust_domain` or path is worse than refusing to start.
pub fn expand_env(text: &str, path: &Path) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let line = text.len() - rest.len() + start;
        let line = text[..line].matches('\n').count() + 1;
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(ConfigError::Expand {
                path: path.display().to_string(),
                line,
                message: "unterminated `${`".into(),
            });
        };
        let name = &after[..end];
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(ConfigError::Expand {
                path: path.display().to_string(),
                line,
                message: format!("`${{{name}}}` is not a valid variable reference"),
            });
        }
        let value = std::env::var(name).map_err(|_| ConfigError::Expand {
            path: path.display().to_string(),
            line,
            message: format!("environment variable `{name}` is not set"),
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Reads `path`, expands `${VAR}` and parses it into `T` (which should use
/// `#[serde(deny_unknown_fields)]`).
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_toml(&text, path)
}

/// Parses configuration text (see [`load_toml`]); `path` only names the source in errors.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    let expanded = expand_env(text, path)?;
    toml::from_str(&expanded).map_err(|err| {
        let line = err
            .span()
            .map(|span| {
                expanded[..span.start.min(expanded.len())]
                    .matches('\n')
                    .count()
                    + 1
            })
            .unwrap_or(0);
        ConfigError::Parse {
            path: path.display().to_string(),
            line,
            message: err.message().trim().replace('\n', " "),
        }
    })
}

/// Minimum level of the operational log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Everything, including per-request detail.
    Debug,
    /// Normal operation (the default).
    #[default]
    Info,
    /// Problems that do not stop the daemon.
    Warn,
    /// Failures only.
    Error,
}

impl LogLevel {
    /// The `tracing` filter directive for this level.
    pub fn as_filter(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

/// Format of the operational log on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A duration written as in SPIRE's configs (`"1h"`, `"5m"`, `"90s"`, `"8760h"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConfigDuration(pub std::time::Duration);

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses a duration like `"1h"`, `"90s"`, `"1h30m"`; zero is refused.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let value = humantime::parse_duration(text.trim()).map_err(|err| {
        format!("`{text}` is not a duration like \"90s\", \"5m\" or \"1h\": {err}")
    })?;
    if value.is_zero() {
        return Err(format!("`{text}` must be longer than zero"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[expect(dead_code, reason = "only parsed")]
        name: String,
        ttl: Option<ConfigDuration>,
    }

    #[test]
    fn unknown_key_is_one_line_naming_key_and_line() {
        let err = parse_toml::<Sample>("name = \"x\"\nbogus = 1\n", Path::new("f.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("bogus"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn env_is_expanded_and_unset_is_an_error() {
        // SAFETY of the test: PATH is always set in the test environment.
        let s: Sample = parse_toml("name = \"${PATH}\"\n", Path::new("f")).unwrap();
        drop(s);
        let err = parse_toml::<Sample>("name = \"${TESSERA_SURELY_UNSET_VAR}\"", Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("TESSERA_SURELY_UNSET_VAR"), "{err}");
    }

    #[test]
    fn durations() {
        let s: Sample = parse_toml("name = \"x\"\nttl = \"1h30m\"", Path::new("f")).unwrap();
        assert_eq!(s.ttl.unwrap().0.as_secs(), 5400);
        assert!(parse_toml::<Sample>("name = \"x\"\nttl = \"0s\"", Path::new("f")).is_err());
        assert!(parse_toml::<Sample>("name = \"x\"\nttl = \"soon\"", Path::new("f")).is_err());
    }
}
