//! The operator's endpoints (contract section 6): `/metrics`, `/healthz`
//! (the process runs) and `/readyz` (broker up, consumer registered, no
//! configuration fault; otherwise 503 with the reason).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// What `/readyz` reports, written by the service as its state changes.
#[derive(Default)]
pub struct Health {
    broker_up: AtomicBool,
    consuming: AtomicBool,
    shutting_down: AtomicBool,
    fault: Mutex<Option<String>>,
    /// Why the last broker session ended, while the broker is down.
    broker_problem: Mutex<Option<String>>,
    /// A WeChat quota pause (which quota, until when).
    quota_pause: Mutex<Option<(&'static str, i64, std::time::Instant)>>,
    /// The grant ledger cannot be reached (or a statement failed).
    ledger_problem: Mutex<Option<String>>,
}

impl Health {
    pub fn set_broker_up(&self, up: bool) {
        self.broker_up.store(up, Ordering::SeqCst);
        if up {
            self.set_broker_problem(None);
        }
    }
    /// What is wrong with the broker (a refused login, a queue with other
    /// arguments), reported by `/readyz` while the broker is down.
    pub fn set_broker_problem(&self, problem: Option<String>) {
        *self.broker_problem.lock().expect("not poisoned") = problem;
    }
    pub fn set_consuming(&self, on: bool) {
        self.consuming.store(on, Ordering::SeqCst);
    }
    /// From SIGTERM on: not ready, whatever else holds.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }
    pub fn set_fault(&self, fault: Option<String>) {
        *self.fault.lock().expect("not poisoned") = fault;
    }
    /// Every WeChat call is paused until `until` by the `quota` quota
    /// (WeChat's `errcode`); reported while it lasts.
    pub fn set_quota_pause(&self, quota: &'static str, errcode: i64, until: std::time::Instant) {
        *self.quota_pause.lock().expect("not poisoned") = Some((quota, errcode, until));
    }

    /// The grant ledger's trouble (`None` once a statement succeeds again).
    pub fn set_ledger_problem(&self, problem: Option<String>) {
        *self.ledger_problem.lock().expect("not poisoned") = problem;
    }

    /// `Ok` when ready, else the reason.
    pub fn ready(&self) -> Result<(), String> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err("shutting down".into());
        }
        if let Some(f) = self.fault.lock().expect("not poisoned").clone() {
            return Err(format!("configuration fault: {f}"));
        }
        if !self.broker_up.load(Ordering::SeqCst) {
            return Err(
                match self.broker_problem.lock().expect("not poisoned").clone() {
                    Some(problem) => format!("broker: {problem}"),
                    None => "broker connection is down".into(),
                },
            );
        }
        if let Some(p) = self.ledger_problem.lock().expect("not poisoned").clone() {
            return Err(format!("ledger unavailable: {p}"));
        }
        if !self.consuming.load(Ordering::SeqCst) {
            return Err("no consumer registered".into());
        }
        if let Some((quota, errcode, until)) = *self.quota_pause.lock().expect("not poisoned") {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if !left.is_zero() {
                return Err(format!(
                    "WeChat {quota} quota reached (errcode {errcode}): every call paused for another {:.0} s",
                    left.as_secs_f64().ceil()
                ));
            }
        }
        Ok(())
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    match s.health.ready() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// Binds `addr` (port 0 picks one) and serves until `stopped` fires (or its
/// trigger is dropped); returns the bound address. `stopped` is not the
/// shutdown signal: the endpoints keep answering through the drain that
/// follows it (contract section 7), and stop when the service has finished.
///
/// # Errors
/// The bind failure.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut stopped: Shutdown,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stopped.wait().await })
            .await;
    });
    Ok(bound)
}
