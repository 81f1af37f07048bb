//! Shutdown as a value: every long-running task holds a `Shutdown` and selects
//! on it where it could block, so SIGTERM, SIGINT or a test can stop the
//! service the same way.

use tokio::sync::watch;

/// The sending side: trigger once, every `Shutdown` sees it.
#[derive(Clone)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// The receiving side, cheap to clone.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A connected pair.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown was triggered (at once if it already was).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }
}

/// Triggers on the first SIGTERM or SIGINT. The handlers are installed
/// before this returns, so a signal that comes while the service is still
/// connecting is not the default (fatal) one.
pub fn on_signals(trigger: ShutdownTrigger) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT received: shutting down"),
            }
            trigger.trigger();
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        trigger.trigger();
    });
}
