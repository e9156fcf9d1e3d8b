//! The interpreter lint (SECURITY.md §3.3 item 34): an entry whose `unix:sha256:`
//! selector is the hash of an interpreter (`python3`, `bash`, `node`...) matches every
//! script that interpreter runs, not the one script its author had in mind. The agent
//! hashes the interpreters of its host once at start ([`known_interpreter_hashes`], off
//! the runtime) and warns once per entry revision about such entries ([`lint_entries`]
//! is the pure check, [`InterpreterLint`] the logging caller).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tessera_plugin_sdk::RegistrationEntry;
use tokio::task::JoinHandle;

/// Interpreters looked for, each as `/usr/bin/<name>` then `/bin/<name>`.
pub const INTERPRETERS: [&str; 12] = [
    "python3", "python", "perl", "ruby", "node", "bash", "sh", "dash", "zsh", "php", "lua", "java",
];

/// Largest interpreter hashed; a bigger file is skipped.
pub const MAX_INTERPRETER_SIZE: u64 = 256 * 1024 * 1024;

/// An entry that names an interpreter by hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterpreterWarning {
    /// The entry's id.
    pub entry_id: String,
    /// The entry's revision.
    pub revision: u64,
    /// The interpreter whose hash the entry's `unix:sha256:` selector is.
    pub interpreter: PathBuf,
}

/// SHA-256 (lowercase hex) of the interpreters present on this host, mapped to the path
/// they were found at. Blocking: call it from `spawn_blocking`. Files that are missing,
/// unreadable, not regular or over [`MAX_INTERPRETER_SIZE`] are skipped.
pub fn known_interpreter_hashes() -> HashMap<String, PathBuf> {
    let candidates: Vec<Vec<PathBuf>> = INTERPRETERS
        .iter()
        .map(|name| {
            ["/usr/bin", "/bin"]
                .iter()
                .map(|dir| Path::new(dir).join(name))
                .collect()
        })
        .collect();
    hash_interpreters(&candidates)
}

/// For each group of candidate paths, hashes the first that exists (symlinks followed).
/// The first path of a hash wins (`sh` and `dash` are often the same file).
pub fn hash_interpreters(candidates: &[Vec<PathBuf>]) -> HashMap<String, PathBuf> {
    let mut out = HashMap::new();
    for group in candidates {
        let Some(path) = group.iter().find(|p| p.exists()) else {
            continue;
        };
        match hash_file(path) {
            Ok(Some(hash)) => {
                out.entry(hash).or_insert_with(|| path.clone());
            }
            Ok(None) => {}
            Err(err) => {
                tracing::debug!(path = %path.display(), error = %err, "cannot hash interpreter");
            }
        }
    }
    out
}

/// SHA-256 of a regular file of at most [`MAX_INTERPRETER_SIZE`] bytes; `None` for
/// anything else.
fn hash_file(path: &Path) -> std::io::Result<Option<String>> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() > MAX_INTERPRETER_SIZE {
        return Ok(None);
    }
    let mut reader = file.take(MAX_INTERPRETER_SIZE.saturating_add(1));
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        ctx.update(buf.get(..n).unwrap_or_default());
        total = total.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
    }
    if total > MAX_INTERPRETER_SIZE {
        return Ok(None);
    }
    Ok(Some(hex::encode(ctx.finish())))
}

/// The entries (in `entries` order) with a `unix:sha256:` selector equal to a hash in
/// `interpreters`. Pure: the caller logs.
pub fn lint_entries<'a>(
    entries: impl IntoIterator<Item = &'a RegistrationEntry>,
    interpreters: &HashMap<String, PathBuf>,
) -> Vec<InterpreterWarning> {
    if interpreters.is_empty() {
        return Vec::new();
    }
    entries
        .into_iter()
        .filter_map(|entry| {
            entry
                .selectors
                .iter()
                .filter(|s| s.kind() == "unix")
                .filter_map(|s| s.value().strip_prefix("sha256:"))
                .find_map(|hex| interpreters.get(&hex.to_ascii_lowercase()))
                .map(|path| InterpreterWarning {
                    entry_id: entry.id.clone(),
                    revision: entry.revision,
                    interpreter: path.clone(),
                })
        })
        .collect()
}

/// The agent side of the lint: the interpreter hashes (computed in the background from
/// construction on) and the (entry id, revision) pairs already warned about.
#[derive(Debug)]
pub struct InterpreterLint {
    pending: Option<JoinHandle<HashMap<String, PathBuf>>>,
    hashes: HashMap<String, PathBuf>,
    warned: HashSet<(String, u64)>,
}

impl InterpreterLint {
    /// Starts hashing the host's interpreters on the blocking pool. Must be called
    /// within a Tokio runtime.
    pub fn start() -> Self {
        Self {
            pending: Some(tokio::task::spawn_blocking(known_interpreter_hashes)),
            hashes: HashMap::new(),
            warned: HashSet::new(),
        }
    }

    /// Warns (once per entry id and revision) about every entry of `entries` that names
    /// an interpreter by hash. Waits for the hashes the first time.
    pub async fn check(&mut self, entries: &BTreeMap<String, Arc<RegistrationEntry>>) {
        if let Some(pending) = self.pending.take() {
            match pending.await {
                Ok(hashes) => self.hashes = hashes,
                Err(err) => {
                    tracing::debug!(error = %err, "cannot hash the host's interpreters");
                }
            }
        }
        self.warned
            .retain(|(id, revision)| entries.get(id).is_some_and(|e| e.revision == *revision));
        for warning in lint_entries(entries.values().map(AsRef::as_ref), &self.hashes) {
            if self
                .warned
                .insert((warning.entry_id.clone(), warning.revision))
            {
                tracing::warn!(
                    entry_id = %warning.entry_id,
                    revision = warning.revision,
                    interpreter = %warning.interpreter.display(),
                    "entry's unix:sha256 selector is the hash of an interpreter: it matches every script that interpreter runs; use unix:path + unix:uid or a dedicated binary"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use tessera_plugin_sdk::{Selector, SpiffeId};

    fn entry(id: &str, revision: u64, selectors: &[(&str, &str)]) -> RegistrationEntry {
        RegistrationEntry {
            id: id.to_owned(),
            spiffe_id: "spiffe://example.org/w".parse::<SpiffeId>().unwrap().into(),
            parent_id: "spiffe://example.org/agent".parse::<SpiffeId>().unwrap(),
            selectors: selectors
                .iter()
                .map(|(k, v)| Selector::new(k, v).unwrap())
                .collect(),
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            jwt_audiences: Vec::new(),
            jwt_multi_audience: false,
            dns_names: Vec::new(),
            hint: String::new(),
            federates_with: Vec::new(),
            created_revision: 1,
            revision,
        }
    }

    #[test]
    fn entry_hashing_an_interpreter_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("python3");
        std::fs::write(&fake, b"#!fake interpreter\n").unwrap();
        let link = dir.path().join("python");
        std::os::unix::fs::symlink(&fake, &link).unwrap();
        let hashes = hash_interpreters(&[
            vec![dir.path().join("missing"), link.clone()],
            vec![dir.path().join("nothing-here")],
        ]);
        let hex = hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            b"#!fake interpreter\n",
        ));
        assert_eq!(hashes.len(), 1);
        assert_eq!(hashes.get(&hex), Some(&link));

        let bad = entry(
            "aa",
            7,
            &[("unix", "uid:1000"), ("unix", &format!("sha256:{hex}"))],
        );
        let other = entry("bb", 3, &[("unix", &format!("sha256:{}", "0".repeat(64)))]);
        let not_unix = entry("cc", 3, &[("docker", &format!("sha256:{hex}"))]);
        let warnings = lint_entries([&bad, &other, &not_unix], &hashes);
        assert_eq!(
            warnings,
            vec![InterpreterWarning {
                entry_id: "aa".to_owned(),
                revision: 7,
                interpreter: link,
            }]
        );
        assert!(lint_entries([&bad], &HashMap::new()).is_empty());
    }

    #[test]
    fn oversized_and_non_regular_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let hashes = hash_interpreters(&[vec![dir.path().to_path_buf()]]);
        assert!(hashes.is_empty());
    }

    #[test]
    fn host_interpreters_are_hashed() {
        let hashes = known_interpreter_hashes();
        if let Ok(sh) = std::fs::read("/bin/sh") {
            let hex = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &sh));
            assert!(hashes.contains_key(&hex), "{hashes:?}");
        }
    }

    #[tokio::test]
    async fn lint_warns_once_per_revision() {
        let mut lint = InterpreterLint {
            pending: None,
            hashes: HashMap::from([("ab".repeat(32), PathBuf::from("/usr/bin/x"))]),
            warned: HashSet::new(),
        };
        let e = entry("aa", 1, &[("unix", &format!("sha256:{}", "ab".repeat(32)))]);
        let mut entries = BTreeMap::from([("aa".to_owned(), Arc::new(e.clone()))]);
        lint.check(&entries).await;
        assert!(lint.warned.contains(&("aa".to_owned(), 1)));
        let mut e2 = e;
        e2.revision = 2;
        entries.insert("aa".to_owned(), Arc::new(e2));
        lint.check(&entries).await;
        assert_eq!(lint.warned.len(), 1);
        assert!(lint.warned.contains(&("aa".to_owned(), 2)));
        entries.clear();
        lint.check(&entries).await;
        assert!(lint.warned.is_empty());
    }
}
