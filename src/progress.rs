//! Progress of long CLI work (`publish`, `demo`) on stderr: a line a second
//! once the work has taken more than a second, redrawn in place on a terminal.
//! Short runs print nothing, and stdout stays clean for what the command prints.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

/// A counter towards a total, reported every second by a background task.
pub struct Progress {
    done: Arc<AtomicUsize>,
    reporter: JoinHandle<()>,
}

impl Progress {
    /// Starts reporting `label: done/total unit` (in the current runtime).
    pub fn start(label: &str, total: usize, unit: &'static str) -> Progress {
        let done = Arc::new(AtomicUsize::new(0));
        let label = label.to_string();
        let counter = done.clone();
        let reporter = tokio::spawn(async move {
            let tty = std::io::stderr().is_terminal();
            let started = tokio::time::Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await; // the first tick is immediate: skip it
            loop {
                tick.tick().await;
                let n = counter.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                let line = format!(
                    "{label}: {n}/{total} {unit} ({:.0}%, {:.0}/s)",
                    100.0 * n as f64 / total.max(1) as f64,
                    n as f64 / secs
                );
                let mut err = std::io::stderr().lock();
                let _ = if tty {
                    write!(err, "\r{line}\x1b[K")
                } else {
                    writeln!(err, "{line}")
                };
                let _ = err.flush();
            }
        });
        Progress { done, reporter }
    }

    pub fn add(&self, n: usize) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(&self, n: usize) {
        self.done.store(n, Ordering::Relaxed);
    }

    /// Stops reporting (ending the terminal's redrawn line).
    pub fn finish(self) {
        self.reporter.abort();
        if std::io::stderr().is_terminal() {
            eprint!("\r\x1b[K");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.reporter.abort();
    }
}
