//! The tracing subscriber: text or JSON (`NOTIFIER_LOG_FORMAT`), level from
//! `RUST_LOG`. Logs go to stderr so command output (demo, dlq list) stays clean.

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// Installs the global subscriber once; later calls are ignored.
pub fn init(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The log format asked for, before settings are fully read (for early errors).
pub fn format_from_env() -> LogFormat {
    match std::env::var("NOTIFIER_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Text,
    }
}
