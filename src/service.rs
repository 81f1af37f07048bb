//! The `run` subcommand: broker sessions (connect, declare, consume) with
//! reconnect, and the one-way flow broker → validate → coalesce → dispatch.
//! Invalid events leave for the dead-letter queue; everything else is settled
//! by the dispatcher. `Service::build` binds the HTTP endpoints (port 0 works),
//! `run_until_stopped` runs until the shutdown signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::broker::inspect::Presence;
use crate::broker::{self, Acks, BrokerError, FailureKind, Pending};
use crate::coalescer::{Closed, Coalescer, WindowRules};
use crate::dispatch::{Dispatcher, QueueOwner};
use crate::event;
use crate::http::{self, Health};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::shutdown::{Shutdown, ShutdownTrigger};
use crate::wechat::Outcome;

/// Reconnect backoff bounds (exponential, with jitter).
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(15);

/// Deliveries taken from the consumer in one turn of the session loop when
/// they are already waiting (a backlog), before looking at timers and tasks.
const RECEIVE_BATCH: usize = 256;

/// How long the last acks of a session may take to leave.
const FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// How long cancelling the consumer, and closing the connection, may take at
/// the end (a broker that stopped answering must not hold the exit).
const CLOSE_LIMIT: Duration = Duration::from_secs(2);

/// A built, not yet running, service.
pub struct Service {
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    dispatcher: Arc<Dispatcher>,
    http_addr: SocketAddr,
    shutdown: Shutdown,
    /// Stops the HTTP endpoints when `run_until_stopped` has finished (or
    /// this service is dropped): they answer through the drain.
    http_stop: ShutdownTrigger,
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
        let (http_stop, http_stopped) = crate::shutdown::channel();
        let http_addr = http::serve(
            settings.metrics_addr,
            metrics.clone(),
            health.clone(),
            http_stopped,
        )
        .await?;
        let consumer_tag = format!(
            "wechat-notifier-{}-{}-{:08x}",
            hostname(),
            std::process::id(),
            fastrand::u32(..)
        );
        let ledger = match &settings.ledger {
            Some(l) => Some(Arc::new(
                Ledger::new(l, metrics.clone(), health.clone()).map_err(std::io::Error::other)?,
            )),
            None => None,
        };
        Ok(Service {
            dispatcher: Dispatcher::new(
                settings.clone(),
                metrics.clone(),
                health.clone(),
                ledger,
                &consumer_tag,
            ),
            settings,
            metrics,
            health,
            http_addr,
            shutdown,
            http_stop,
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

    /// Runs sessions until shutdown: reconnects after broker loss. The HTTP
    /// endpoints answer until this returns.
    ///
    /// # Errors
    /// None today; kept for callers that propagate.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let mut shutdown = self.shutdown.clone();
        {
            // Not ready from the signal on, whatever the session is doing.
            let (health, mut signal) = (self.health.clone(), self.shutdown.clone());
            tokio::spawn(async move {
                signal.wait().await;
                health.set_shutting_down();
            });
        }
        let mut backoff = RECONNECT_MIN;
        loop {
            if shutdown.is_triggered() {
                break;
            }
            let started = Instant::now();
            let end = self.session().await;
            self.health.set_consuming(false);
            self.health.set_broker_up(false);
            self.metrics.consuming.set(0);
            self.metrics.open_windows.set(0);
            let wait = match end {
                Ok(()) => break,
                Err(e) => {
                    if started.elapsed() > RECONNECT_MAX * 2 {
                        backoff = RECONNECT_MIN;
                    }
                    let kind = e
                        .chain()
                        .find_map(|c| c.downcast_ref::<BrokerError>())
                        .map(BrokerError::kind)
                        .or_else(|| {
                            e.chain()
                                .find_map(|c| c.downcast_ref::<lapin::Error>())
                                .map(|l| BrokerError::Amqp(l.clone()).kind())
                        });
                    // A refused login or a queue with other arguments needs an
                    // operator, not a fast retry: say so, and retry slowly.
                    let wait = match kind {
                        Some(FailureKind::AccessRefused | FailureKind::Mismatch) => {
                            self.health.set_broker_problem(Some(format!("{e:#}")));
                            operator_retry(&self.settings)
                        }
                        _ => {
                            let wait = backoff.mul_f64(0.5 + fastrand::f64());
                            backoff = (backoff * 2).min(RECONNECT_MAX);
                            wait
                        }
                    };
                    warn!(error = %format!("{e:#}"), retry_in_ms = wait.as_millis() as u64, "broker session ended; reconnecting");
                    wait
                }
            };
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.dispatcher.close().await;
        // Drained, cancelled and closed: only now do the endpoints stop.
        self.http_stop.trigger();
        Ok(())
    }

    /// One broker session: `Ok` when the shutdown ended it, `Err` when the
    /// broker did (the caller reconnects).
    async fn session(&self) -> anyhow::Result<()> {
        let s = &self.settings;
        let mut shutdown = self.shutdown.clone();
        let conn = tokio::select! {
            _ = shutdown.wait() => return Ok(()),
            conn = broker::connect(&s.amqp_urls, &self.consumer_tag) => conn?,
        };
        self.health.set_broker_up(true);
        let setup = conn.create_channel().await?;
        broker::declare_topology(&setup, s).await?;
        let _ = setup.close(200, "declared".into()).await;

        // A ledger that cannot be reached (or migrated) at start keeps this
        // replica from consuming until it can (contract section 8.3).
        if let Some(ledger) = self.dispatcher.ledger() {
            while let Err(e) = ledger.start().await {
                let retry = s.config_retry.min(Duration::from_secs(5));
                warn!(error = %e, retry_in_ms = retry.as_millis() as u64, "not consuming: the ledger is unavailable");
                tokio::select! {
                    _ = shutdown.wait() => {
                        close(&conn).await;
                        return Ok(());
                    }
                    _ = tokio::time::sleep(retry) => {}
                }
                if !conn.status().connected() {
                    anyhow::bail!("the broker connection closed while waiting for the ledger");
                }
            }
        }

        // While this replica re-sends a held notice it marks the queue as
        // taken, so a replica that starts meanwhile does not consume (and
        // send the same events beside the re-send) until it is done.
        let marker = marker_name(&s.queue);
        let owns_marker = self.dispatcher.holds_notice() && take_marker(&conn, &marker).await;
        // Set when the work queue, found gone during the check, cannot be
        // declared again: the session ends with the broker's reason.
        let redeclare_failed: std::sync::Mutex<Option<BrokerError>> = std::sync::Mutex::new(None);

        // A configuration fault found before consuming keeps this replica
        // from consuming: nothing is held, nothing churns.
        loop {
            let checked = tokio::select! {
                _ = shutdown.wait() => {
                    close(&conn).await;
                    return Ok(());
                }
                checked = self.dispatcher.check_before_consuming(|| {
                    queue_owner(&conn, s, &redeclare_failed)
                }) => checked,
            };
            let failed = redeclare_failed.lock().expect("not poisoned").take();
            if let Some(e) = failed {
                close(&conn).await;
                return Err(anyhow::Error::new(e).context("declaring the deleted work queue again"));
            }
            match checked {
                Ok(()) => break,
                // A held fault (found now, or on an earlier send and not
                // proved gone) keeps the replica from consuming.
                Err(e) if e.outcome == Outcome::ConfigFault || self.dispatcher.fault_held() => {
                    let retry = s.config_retry;
                    warn!(detail = %e.detail, retry_in_ms = retry.as_millis() as u64, "not consuming: configuration fault");
                    tokio::select! {
                        _ = shutdown.wait() => {
                            close(&conn).await;
                            return Ok(());
                        }
                        _ = tokio::time::sleep(retry) => {}
                    }
                    if !conn.status().connected() {
                        anyhow::bail!("the broker connection closed during the start-up probe");
                    }
                }
                Err(e) => {
                    warn!(detail = %e.detail, "WeChat probe failed; consuming anyway (notices will retry)");
                    break;
                }
            }
        }
        let consume = conn.create_channel().await?;
        consume
            .basic_qos(s.prefetch, BasicQosOptions::default())
            .await?;
        if !owns_marker {
            tokio::select! {
                _ = shutdown.wait() => {
                    close(&conn).await;
                    return Ok(());
                }
                waited = wait_for_marker(&conn, &marker, s.config_retry) => waited?,
            }
        }
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
        if owns_marker {
            // Registered: a replica that starts from now on is a standby.
            drop_marker(&conn, &marker).await;
        }

        let mut coalescer: Coalescer<Pending> = Coalescer::new(WindowRules {
            quiet: s.batch_window,
            max_wait: s.batch_max_wait,
            max_events: s.batch_max,
        });
        let mut tasks = JoinSet::new();
        // The channel's acks; when this session is given up its unsettled
        // deliveries are left to the channel's close (one return each), not
        // nacked one by one.
        let (acks, _flusher) = Acks::start(consume.clone(), self.metrics.clone());

        // One timer for the earliest window deadline, moved only when that
        // deadline changes (not a new timer per delivery).
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut timer_at = None;
        // Set by this session's first delivery: the replica is the active one.
        let mut active = false;
        // The ledger's sweep, at least once a minute while this session
        // consumes; its task ends with the session.
        let every = sweep_every(s);
        let mut sweep_tick = tokio::time::interval_at(Instant::now() + every, every);
        let mut sweeping: Option<AbortOnDrop> = None;
        let ledger_on = self.dispatcher.ledger().is_some();
        let end = 'session: loop {
            let deadline = coalescer.next_deadline();
            if let Some(d) = deadline.filter(|d| timer_at != Some(*d)) {
                timer.as_mut().reset(d);
                timer_at = Some(d);
            }
            // Biased: a signal wins over a waiting delivery (no window opens
            // after it), and a due window over the backlog.
            tokio::select! {
                biased;
                _ = shutdown.wait() => break 'session Ok(()),
                _ = &mut timer, if deadline.is_some() => {
                    timer_at = None;
                    let closed = coalescer.expire(Instant::now());
                    self.spawn_all(closed, &mut tasks);
                }
                Some(done) = tasks.join_next(), if !tasks.is_empty() => log_panic(done),
                _ = sweep_tick.tick(), if ledger_on => {
                    if sweeping.as_ref().is_none_or(|t| t.0.is_finished()) {
                        // Active: a delivery came this session, or this is the
                        // queue's only consumer (an idle queue sends nothing).
                        let active = active || matches!(
                            tokio::time::timeout(CLOSE_LIMIT, broker::inspect::queue(&conn, &s.queue)).await,
                            Ok(Ok(broker::inspect::Presence::Present { consumers: 1, .. }))
                        );
                        let dispatcher = self.dispatcher.clone();
                        sweeping = Some(AbortOnDrop(tokio::spawn(dispatcher.sweep(active))));
                    }
                }
                delivery = consumer.next() => {
                    // Deliveries already here are taken in the same turn.
                    let mut delivery = delivery;
                    let mut taken = 0;
                    let ended = loop {
                        match delivery {
                            Some(Ok(d)) => {
                                if !active {
                                    active = true;
                                    self.dispatcher.now_active();
                                }
                                let closed = self.receive(d, &mut coalescer, &mut tasks, &acks);
                                self.spawn_all(closed, &mut tasks);
                            }
                            Some(Err(e)) => break Some(anyhow::Error::new(e).context("consumer failed")),
                            None => break Some(anyhow::anyhow!("the broker cancelled the consumer")),
                        }
                        taken += 1;
                        if taken >= RECEIVE_BATCH || shutdown.is_triggered() {
                            break None;
                        }
                        match consumer.next().now_or_never() {
                            Some(next) => delivery = next,
                            None => break None,
                        }
                    };
                    if let Some(e) = ended {
                        break 'session Err(e);
                    }
                    // Under a backlog lapin's consumer is always ready and
                    // outside tokio's cooperative budget: on the one runtime
                    // thread the loop gives way here (after a full batch, or
                    // when the turns have used the budget) so the window
                    // tasks, the ack flusher, lapin's own tasks and /metrics run.
                    if taken >= RECEIVE_BATCH {
                        tokio::task::yield_now().await;
                    } else {
                        tokio::task::coop::consume_budget().await;
                    }
                }
            }
            self.metrics.open_windows.set(coalescer.len() as i64);
        };

        match end {
            Ok(()) => {
                self.health.set_shutting_down();
                let open = coalescer.drain();
                info!(
                    windows = open.len(),
                    in_flight = tasks.len(),
                    "draining before exit; the consumer stays registered until the drain ends"
                );
                self.spawn_all(open, &mut tasks);
                self.metrics.open_windows.set(0);
                // The consumer is still read, only to see the connection die:
                // the broker then hands these messages to a standby, so the
                // drain must stop calling WeChat. Deliveries that arrive from
                // now on are held as they came (not processed, not released:
                // no `Pending`, whose drop would nack) and return to the queue
                // when the channel closes.
                let mut unread: Vec<lapin::message::Delivery> = Vec::new();
                let drained = tokio::time::timeout(s.shutdown_grace, async {
                    loop {
                        tokio::select! {
                            done = tasks.join_next() => match done {
                                Some(done) => log_panic(done),
                                None => return None,
                            },
                            delivery = consumer.next() => match delivery {
                                Some(Ok(d)) => unread.push(d),
                                Some(Err(e)) => return Some(anyhow::Error::new(e)),
                                None => return Some(anyhow::anyhow!("the broker cancelled the consumer")),
                            },
                        }
                    }
                })
                .await;
                match drained {
                    Ok(None) => {}
                    Ok(Some(e)) => {
                        // As when the connection dies outside a drain: what is
                        // unsettled goes back with the channel, to the standby.
                        warn!(error = %format!("{e:#}"), "consumer lost during the drain; unfinished messages return to the queue for the next replica");
                        acks.abandon();
                        tasks.shutdown().await;
                        if acks.usable() {
                            flush(&acks).await;
                        }
                        drop((unread, consumer));
                        close(&conn).await;
                        return Ok(());
                    }
                    Err(_) => {
                        warn!("shutdown grace elapsed; unfinished messages stay unacked for the next replica");
                        acks.abandon();
                        tasks.shutdown().await;
                    }
                }
                // What was settled is acked before the consumer goes.
                flush(&acks).await;
                // Only now hand the queue to a standby: it must not call
                // WeChat beside this replica's drain.
                let cancel = consume.basic_cancel(
                    self.consumer_tag.as_str().into(),
                    BasicCancelOptions::default(),
                );
                let _ = tokio::time::timeout(CLOSE_LIMIT, cancel).await;
                self.health.set_consuming(false);
                self.metrics.consuming.set(0);
                drop((unread, consumer));
                close(&conn).await;
                Ok(())
            }
            Err(e) => {
                // The deliveries of a dead channel cannot be acked: the broker redelivers.
                acks.abandon();
                tasks.shutdown().await;
                // A cancelled consumer leaves the channel open: what was
                // settled need not come back.
                if acks.usable() {
                    flush(&acks).await;
                }
                drop(coalescer);
                close(&conn).await;
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
        acks: &Acks,
    ) -> Vec<Closed<Pending>> {
        self.metrics.events_received.inc();
        let mut pending = Pending::new(delivery, acks);
        pending.traced(&self.settings.queue);
        let parsed = match event::parse_any(&pending.body) {
            Ok(event::Event::Assigned(e)) => Ok(e),
            Ok(event::Event::Subscription(sub)) => {
                // In its user's lane, after the user's earlier notices; an
                // accept for our template takes the user's open window along.
                let window = match &self.dispatcher.ledger() {
                    Some(l)
                        if sub.status == event::SubscriptionStatus::Accept
                            && sub.template_id == l.template_id() =>
                    {
                        coalescer.take(&sub.user_id)
                    }
                    _ => None,
                };
                let ticket = self.dispatcher.lane(&sub.user_id);
                let dispatcher = self.dispatcher.clone();
                tasks.spawn(async move {
                    dispatcher.subscription(sub, pending, window, ticket).await;
                });
                return Vec::new();
            }
            Err(e) => Err(e),
        };
        match parsed {
            Ok(event) if self.dispatcher.already_delivered(&event.event_id) => {
                let mut pending = pending;
                pending.ack();
                info!(event_id = %event.event_id, "acked: delivered by the held notice's retry");
                Vec::new()
            }
            Ok(event) => coalescer.push(event, pending, Instant::now()),
            Err(invalid) => {
                self.metrics.event_invalid(invalid.kind.as_str());
                let dispatcher = self.dispatcher.clone();
                tasks.spawn(async move {
                    dispatcher
                        .dead_letter_invalid(pending, invalid.detail)
                        .await;
                });
                Vec::new()
            }
        }
    }

    fn spawn_all(&self, closed: Vec<Closed<Pending>>, tasks: &mut JoinSet<()>) {
        for window in closed {
            let dispatcher = self.dispatcher.clone();
            let ticket = dispatcher.ticket(&window);
            // Boxed: the task then holds a pointer, not the whole state
            // machine of a delivery, which tokio would copy as it stores it.
            tasks.spawn(Box::pin(
                async move { dispatcher.deliver(window, ticket).await },
            ));
        }
    }
}

/// How often the ledger's sweep runs: at least once a minute, and often
/// enough for a short `NOTIFIER_HOLD_FOR` (a quarter of it, at least 1 s).
fn sweep_every(s: &Settings) -> Duration {
    let hold_for = s.ledger.as_ref().map_or(Duration::MAX, |l| l.hold_for);
    (hold_for / 4).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Aborts its task when dropped (the sweep ends with its session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The queue a replica holds, exclusively, while it re-sends a held notice
/// (section "Configuration faults" of the README).
fn marker_name(queue: &str) -> String {
    format!("{queue}.held")
}

/// Declares the marker as an exclusive queue of this connection: the broker
/// deletes it when the connection goes, so a replica that dies while it
/// re-sends blocks nobody. `false` when it cannot (another replica holds it,
/// or the user may not declare it): the re-send then goes without it.
async fn take_marker(conn: &Connection, marker: &str) -> bool {
    let declared = async {
        let ch = conn.create_channel().await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        ch.queue_declare(
            marker.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
        let _ = ch.close(200, "marked".into()).await;
        Ok::<(), lapin::Error>(())
    };
    match tokio::time::timeout(CLOSE_LIMIT, declared).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            warn!(queue = %marker, error = %BrokerError::Amqp(e), "cannot mark the queue as taken; re-sending the held notice without the mark");
            false
        }
        Err(_) => {
            warn!(queue = %marker, "the broker did not answer the mark in time; re-sending the held notice without it");
            false
        }
    }
}

async fn drop_marker(conn: &Connection, marker: &str) {
    let deleted = async {
        let ch = conn.create_channel().await?;
        ch.queue_delete(marker.into(), QueueDeleteOptions::default())
            .await?;
        let _ = ch.close(200, "unmarked".into()).await;
        Ok::<(), lapin::Error>(())
    };
    if !matches!(tokio::time::timeout(CLOSE_LIMIT, deleted).await, Ok(Ok(()))) {
        warn!(queue = %marker, "the mark was not deleted; it goes with this connection");
    }
}

/// Waits while another replica holds the marker (it re-sends a held notice
/// whose events are in the queue). A broker that does not answer is left to
/// the consume that follows.
///
/// # Errors
/// The connection closed while waiting.
async fn wait_for_marker(conn: &Connection, marker: &str, retry: Duration) -> anyhow::Result<()> {
    let mut said = false;
    loop {
        match tokio::time::timeout(CLOSE_LIMIT, broker::inspect::queue(conn, marker)).await {
            Ok(Ok(Presence::Present { .. } | Presence::Mismatched(_))) => {}
            _ => return Ok(()),
        }
        if !said {
            info!(queue = %marker, "another replica is re-sending a held notice; consuming once it is done");
            said = true;
        }
        tokio::time::sleep(retry).await;
        if !conn.status().connected() {
            anyhow::bail!(
                "the broker connection closed while another replica re-sent a held notice"
            );
        }
    }
}

/// Who has the work queue (see [`QueueOwner`]). A queue found gone is
/// declared again as the settings say; if that fails the broker's reason is
/// left in `failed` for the session to end with.
async fn queue_owner(
    conn: &Connection,
    s: &Settings,
    failed: &std::sync::Mutex<Option<BrokerError>>,
) -> QueueOwner {
    match tokio::time::timeout(CLOSE_LIMIT, broker::inspect::queue(conn, &s.queue)).await {
        Ok(Ok(Presence::Present { consumers, .. })) if consumers > 0 => QueueOwner::Others,
        Ok(Ok(Presence::Present { .. })) => QueueOwner::Nobody,
        Ok(Ok(Presence::Missing | Presence::Mismatched(_))) => {
            let declared = async {
                let ch = conn.create_channel().await?;
                broker::declare_topology(&ch, s).await?;
                let _ = ch.close(200, "declared".into()).await;
                Ok::<(), BrokerError>(())
            };
            match tokio::time::timeout(CLOSE_LIMIT, declared).await {
                Ok(Ok(())) => {
                    warn!(queue = %s.queue, "the work queue was gone; declared it again");
                    QueueOwner::Recreated
                }
                Ok(Err(e)) => {
                    *failed.lock().expect("not poisoned") = Some(e);
                    QueueOwner::Unknown
                }
                Err(_) => QueueOwner::Unknown,
            }
        }
        _ => QueueOwner::Unknown,
    }
}

/// A notice task that panicked is a bug: say so. Its deliveries were released
/// when they were dropped (see `broker::Pending`).
fn log_panic(done: Result<(), JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            error!(error = %e, "a notice task panicked; its messages were returned to the queue");
        }
    }
}

/// How long to wait before retrying a broker problem that needs an operator.
fn operator_retry(settings: &Settings) -> Duration {
    settings.config_retry.max(RECONNECT_MAX)
}

/// Sends every settled ack, within a bound: a stalled socket must not hold
/// the shutdown past its grace (unsent acks only mean redeliveries).
async fn flush(acks: &Acks) {
    if tokio::time::timeout(FLUSH_LIMIT, acks.flush())
        .await
        .is_err()
    {
        warn!("acks not all sent in time; the broker will redeliver those messages");
    }
}

async fn close(conn: &Connection) {
    match tokio::time::timeout(CLOSE_LIMIT, conn.close(200, "bye".into())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(error = %e, "closing the broker connection"),
        Err(_) => warn!("the broker did not confirm the close in time; exiting anyway"),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}
