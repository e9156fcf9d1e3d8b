//! Operational log setup shared by the daemons' mains: level and text/JSON format from
//! the config file, always on stderr (stdout belongs to command output).

use crate::config::{LogFormat, LogLevel};

/// Installs the global `tracing` subscriber. `RUST_LOG`, when set, overrides `level`.
/// Calling it twice is harmless (the second call changes nothing).
pub fn init(level: LogLevel, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.as_filter()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
