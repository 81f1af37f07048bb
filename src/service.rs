//! The `run` subcommand: broker sessions (connect, declare, consume) with
//! reconnect, and the one-way flow broker → validate → coalesce → dispatch.
//! Invalid events leave for the dead-letter queue; everything else is settled
//! by the dispatcher. `Service::build` binds the HTTP endpoints (port 0 works),
//! `run_until_stopped` runs until the shutdown signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::broker::{self, ParkHeaders};
use crate::coalescer::{Closed, Coalescer, WindowRules};
use crate::dispatch::{Dispatcher, Pending, Reason, SessionLink};
use crate::event;
use crate::http::{self, Health};
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::shutdown::Shutdown;
use crate::wechat::Outcome;

/// Reconnect backoff bounds (exponential, with jitter).
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(15);

/// How a broker session ended.
enum SessionEnd {
    Shutdown,
    ConfigFault(String),
}

/// A built, not yet running, service.
pub struct Service {
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    dispatcher: Arc<Dispatcher>,
    http_addr: SocketAddr,
    shutdown: Shutdown,
    consumer_tag: String,
}

impl Service {
    /// Binds the HTTP endpoints; nothing touches the broker yet.
    ///
    /// # Errors
    /// The metrics address cannot be bound.
    pub async fn build(settings: Settings, shutdown: Shutdown) -> std::io::Result<Service> {
        let settings = Arc::new(settings);
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        let http_addr = http::serve(
            settings.metrics_addr,
            metrics.clone(),
            health.clone(),
            shutdown.clone(),
        )
        .await?;
        let consumer_tag = format!(
            "wechat-notifier-{}-{}-{:08x}",
            hostname(),
            std::process::id(),
            fastrand::u32(..)
        );
        Ok(Service {
            dispatcher: Arc::new(Dispatcher::new(settings.clone(), metrics.clone())),
            settings,
            metrics,
            health,
            http_addr,
            shutdown,
            consumer_tag,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Runs sessions until shutdown: reconnects after broker loss, waits out
    /// configuration faults on a slow timer.
    ///
    /// # Errors
    /// None today; kept for callers that propagate.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let mut shutdown = self.shutdown.clone();
        let mut backoff = RECONNECT_MIN;
        loop {
            if shutdown.is_triggered() {
                return Ok(());
            }
            let started = Instant::now();
            let end = self.session().await;
            if let Ok(SessionEnd::ConfigFault(reason)) = &end {
                // Reported before the flags drop, so /readyz names the real cause.
                self.health.set_fault(Some(reason.clone()));
            }
            self.health.set_consuming(false);
            self.health.set_broker_up(false);
            self.metrics.consuming.set(0);
            self.metrics.open_windows.set(0);
            let wait = match end {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Ok(SessionEnd::ConfigFault(reason)) => {
                    let retry = self.settings.config_retry;
                    warn!(%reason, retry_in_ms = retry.as_millis() as u64, "not consuming: configuration fault");
                    retry
                }
                Err(e) => {
                    if started.elapsed() > RECONNECT_MAX * 2 {
                        backoff = RECONNECT_MIN;
                    }
                    let wait = backoff.mul_f64(0.5 + fastrand::f64());
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker session ended; reconnecting");
                    wait
                }
            };
            tokio::select! {
                _ = shutdown.wait() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn session(&self) -> anyhow::Result<SessionEnd> {
        let s = &self.settings;
        let conn = broker::connect(&s.amqp_urls, &self.consumer_tag).await?;
        self.health.set_broker_up(true);
        let publish = broker::confirm_channel(&conn).await?;
        broker::declare_topology(&publish, s).await?;

        if let Err(e) = self.dispatcher.probe().await {
            if e.outcome == Outcome::ConfigFault {
                close(&conn).await;
                return Ok(SessionEnd::ConfigFault(e.detail));
            }
            warn!(detail = %e.detail, "WeChat probe failed; consuming anyway (notices will retry)");
        }
        self.health.set_fault(None);

        let consume = conn.create_channel().await?;
        consume
            .basic_qos(s.prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = consume
            .basic_consume(
                s.queue.as_str().into(),
                self.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.health.set_consuming(true);
        self.metrics.consuming.set(1);
        info!(queue = %s.queue, consumer_tag = %self.consumer_tag, "consumer registered (active or standby)");

        let (fault_tx, mut fault_rx) = mpsc::unbounded_channel();
        let link = SessionLink {
            channel: publish,
            faults: fault_tx,
        };
        let mut coalescer: Coalescer<Pending> = Coalescer::new(WindowRules {
            quiet: s.batch_window,
            max_wait: s.batch_max_wait,
            max_events: s.batch_max,
        });
        let mut tasks = JoinSet::new();
        let mut shutdown = self.shutdown.clone();

        let end = loop {
            let deadline = coalescer.next_deadline();
            tokio::select! {
                _ = shutdown.wait() => break Ok(SessionEnd::Shutdown),
                Some(reason) = fault_rx.recv() => break Ok(SessionEnd::ConfigFault(reason)),
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        let closed = self.receive(delivery, &mut coalescer, &mut tasks, &link);
                        self.spawn_all(closed, &mut tasks, &link);
                    }
                    Some(Err(e)) => break Err(anyhow::Error::new(e).context("consumer failed")),
                    None => break Err(anyhow::anyhow!("the broker cancelled the consumer")),
                },
                _ = sleep_until_opt(deadline) => {
                    let closed = coalescer.expire(Instant::now());
                    self.spawn_all(closed, &mut tasks, &link);
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
            self.metrics.open_windows.set(coalescer.len() as i64);
        };

        match end {
            Ok(SessionEnd::Shutdown) => {
                // Cancel first so a standby takes the queue at once, then send what is open.
                let _ = consume
                    .basic_cancel(
                        self.consumer_tag.as_str().into(),
                        BasicCancelOptions::default(),
                    )
                    .await;
                self.health.set_consuming(false);
                self.metrics.consuming.set(0);
                let open = coalescer.drain();
                info!(
                    windows = open.len(),
                    in_flight = tasks.len(),
                    "draining before exit"
                );
                self.spawn_all(open, &mut tasks, &link);
                let drained = tokio::time::timeout(s.shutdown_grace, async {
                    while tasks.join_next().await.is_some() {}
                })
                .await;
                if drained.is_err() {
                    warn!("shutdown grace elapsed; unfinished messages stay unacked for the next replica");
                    tasks.abort_all();
                }
                drop(consumer);
                close(&conn).await;
                Ok(SessionEnd::Shutdown)
            }
            Ok(SessionEnd::ConfigFault(reason)) => {
                // Closing the connection returns every unacked message to the queue.
                tasks.abort_all();
                drop(coalescer);
                close(&conn).await;
                Ok(SessionEnd::ConfigFault(reason))
            }
            Err(e) => {
                // The deliveries of a dead channel cannot be acked: drop, the broker redelivers.
                tasks.abort_all();
                Err(e)
            }
        }
    }

    /// Validates one delivery: invalid ones are dead-lettered (in a task),
    /// valid ones go into the coalescer. Returns the windows that closed.
    fn receive(
        &self,
        delivery: lapin::message::Delivery,
        coalescer: &mut Coalescer<Pending>,
        tasks: &mut JoinSet<()>,
        link: &SessionLink,
    ) -> Vec<Closed<Pending>> {
        self.metrics.events_received.inc();
        let pending = Pending::new(delivery, self.metrics.clone());
        match event::parse(&pending.body) {
            Ok(event) => coalescer.push(event, pending, Instant::now()),
            Err(invalid) => {
                self.metrics.event_invalid(invalid.kind.as_str());
                warn!(detail = %invalid.detail, "invalid event: dead-lettering");
                let dispatcher = self.dispatcher.clone();
                let link = link.clone();
                tasks.spawn(async move {
                    let h = ParkHeaders {
                        reason: Some(Reason::InvalidEvent.as_str().into()),
                        detail: Some(invalid.detail),
                        errcode: None,
                        attempts: pending.attempts,
                        first_failed_at: pending.first_failed_at.clone().unwrap_or_else(|| {
                            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                        }),
                    };
                    dispatcher
                        .dead_letter(&pending, Reason::InvalidEvent, &h, &link)
                        .await;
                });
                Vec::new()
            }
        }
    }

    fn spawn_all(&self, closed: Vec<Closed<Pending>>, tasks: &mut JoinSet<()>, link: &SessionLink) {
        for window in closed {
            let dispatcher = self.dispatcher.clone();
            let link = link.clone();
            let ticket = dispatcher.ticket(&window);
            tasks.spawn(async move { dispatcher.deliver(window, link, ticket).await });
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn close(conn: &Connection) {
    if let Err(e) = conn.close(200, "bye".into()).await {
        error!(error = %e, "closing the broker connection");
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}
