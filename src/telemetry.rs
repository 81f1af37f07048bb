//! The tracing subscriber: text or JSON (`NOTIFIER_LOG_FORMAT`), level from
//! `RUST_LOG`. Logs go to stderr so command output (demo, dlq list) stays clean.
//!
//! Two defaults protect operators: colour codes only when stderr is a terminal
//! (a file or a log collector gets plain text), and lapin's own lines are
//! silenced unless `RUST_LOG` asks for them: its warning about a returned
//! message prints the message body (customer names), and its error lines are
//! multi-field debug dumps of failures this crate reports anyway, in one line
//! (a refused login, a closed channel).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// The filter used when `RUST_LOG` is not set: `level` for us, nothing from lapin
/// (`RUST_LOG=info,lapin=warn` brings it back).
pub fn default_filter(level: &str) -> String {
    format!("{level},lapin=off")
}

/// Installs the global subscriber once; later calls are ignored.
pub fn init(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_filter(default_level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
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
