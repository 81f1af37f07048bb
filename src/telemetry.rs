//! The tracing subscriber: text or JSON (`NOTIFIER_LOG_FORMAT`), level from
//! `RUST_LOG`. Logs go to stderr so command output (demo, dlq list) stays clean.
//!
//! Lines are handed to a writer thread ([`crate::log_writer`]), never written
//! on the caller's thread. When that thread falls `BUFFERED_BYTES` behind,
//! lines are dropped and counted (`log_lines_dropped`, exported by
//! `/metrics`); `flush` writes the rest at exit. `say` prints a line through
//! the same thread, in order with the logs.
//!
//! Two defaults protect operators: colour codes only when stderr is a terminal
//! (a file or a log collector gets plain text), and lapin's own lines are
//! silenced unless `RUST_LOG` asks for them: its warning about a returned
//! message prints the message body (customer names), and its error lines are
//! multi-field debug dumps of failures this crate reports anyway, in one line
//! (a refused login, a closed channel).

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::log_writer::LineWriter;
use crate::settings::LogFormat;

/// How far (in bytes of lines) the writer thread may be behind before new
/// lines are dropped: some 16,000 lines.
const BUFFERED_BYTES: usize = 4 * 1024 * 1024;

/// The log writer: for `say`, the dropped count, and the flush at exit.
static WRITER: OnceLock<LineWriter> = OnceLock::new();

/// The filter used when `RUST_LOG` is not set: `level` for us, nothing from lapin
/// (`RUST_LOG=info,lapin=warn` brings it back).
pub fn default_filter(level: &str) -> String {
    format!("{level},lapin=off")
}

/// Installs the global subscriber once; later calls are ignored.
pub fn init(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_filter(default_level)));
    let writer = LineWriter::start(std::io::stderr(), BUFFERED_BYTES, "wechat-notifier-log")
        .expect("the log writer's thread starts");
    let said = writer.clone();
    let ansi = std::io::stderr().is_terminal();
    // With span export on (`trace::init` ran first), JSON lines name the
    // trace and span current where they are written (a notice's, a call's),
    // and warnings become events of that span.
    let (json, text) = match format {
        LogFormat::Json => (
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .event_format(WithTraceIds(
                        tracing_subscriber::fmt::format().json().flatten_event(true),
                    ))
                    .with_writer(writer),
            ),
            None,
        ),
        LogFormat::Text => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(writer),
            ),
        ),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(json)
        .with(text)
        .with(crate::trace::enabled().then_some(crate::trace::Warnings))
        .try_init();
    match installed {
        Ok(()) => {
            let _ = WRITER.set(said);
        }
        // Another subscriber was installed first: this writer is not used.
        Err(_) => said.close(Duration::ZERO),
    }
}

/// The JSON event format with `trace_id` and `span_id` first, when the line
/// is written inside an exported span (a notice's, or its call's), so a log
/// line leads to its trace.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let ids = if crate::trace::enabled() {
            crate::trace::ids()
        } else {
            None
        };
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            ),
            None => writer.write_str(&line),
        }
    }
}

/// Prints `line` on stderr whatever the log level, after the log lines
/// before it and without waiting for stderr (plainly, when logging is not
/// started).
pub fn say(line: &str) {
    match WRITER.get() {
        // One write, one message: no log line can land inside it.
        Some(w) => w.append(format!("{line}\n").as_bytes()),
        None => eprintln!("{line}"),
    }
}

/// Log lines dropped so far because stderr did not keep up.
pub fn log_lines_dropped() -> u64 {
    WRITER.get().map_or(0, LineWriter::dropped)
}

/// Writes out the lines still buffered (waiting at most about a second for
/// a stalled stderr); called once, at exit. Later lines are lost.
pub fn flush() {
    // The last spans first: their export may log.
    crate::trace::shutdown();
    if let Some(w) = WRITER.get() {
        w.close(Duration::from_secs(1));
    }
}

/// The log format asked for, before settings are fully read (for early errors).
pub fn format_from_env() -> LogFormat {
    match std::env::var("NOTIFIER_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Text,
    }
}
