//! The one test harness: a real RabbitMQ at `AMQP_URL` (default 127.0.0.1:5672),
//! an in-process WeChat simulator, and the service either in-process or as a
//! real process. Every test gets its own exchange and queue names, so tests run
//! in parallel. Set `TEST_LOG=1` to see the service's logs.
//!
//! Queue state is read exactly and cheaply: ready and consumer counts by a
//! passive declare (the broker's live numbers, not trailing statistics), and
//! unacked deliveries from the service's own `wechat_notifier_unacked_deliveries`
//! gauge. Child processes bind port 0 and say where on stderr.
#![allow(dead_code)]

pub mod broker_lock;
pub mod ledger;
pub mod yaml;

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle as ThreadHandle;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use wechat_notifier::broker;
use wechat_notifier::publish::{self, Bulk};
use wechat_notifier::service::Service;
use wechat_notifier::settings::Settings;
use wechat_notifier::shutdown::{self, ShutdownTrigger};
use wechat_notifier::sim::{Api, Fault, FaultAction, Sim, SimConfig};

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn init_logs() {
    if std::env::var("TEST_LOG").is_ok() {
        wechat_notifier::telemetry::init(wechat_notifier::settings::LogFormat::Text, "info");
    }
}

/// The line `wechat-notifier run` prints on stderr once its HTTP endpoints are bound.
const LISTENING: &str = "wechat-notifier: http listening on ";

/// Everything one test needs: the simulator, its names, a broker connection.
pub struct TestEnv {
    pub sim: Sim,
    pub prefix: String,
    pub conn: Connection,
    pub channel: Channel,
    /// Settings on top of the defaults, as environment pairs.
    pub vars: Vec<(String, String)>,
}

impl TestEnv {
    pub async fn new(tag: &str) -> TestEnv {
        Self::with_sim(tag, SimConfig::default()).await
    }

    pub async fn with_sim(tag: &str, config: SimConfig) -> TestEnv {
        broker_lock::share_broker().await;
        init_logs();
        let sim = Sim::start_local(config).await.expect("simulator starts");
        let prefix = format!("t.{tag}.{:08x}", fastrand::u32(..));
        let vars = vec![
            ("AMQP_URL", amqp_url()),
            ("WECHAT_API_BASE", sim.url()),
            ("WECHAT_APPID", sim.config().appid.clone()),
            ("WECHAT_APPSECRET", sim.config().secret.clone()),
            ("WECHAT_CLOUD_ENV", sim.config().cloud_env.clone()),
            ("NOTIFIER_EXCHANGE", format!("{prefix}.events")),
            ("NOTIFIER_QUEUE", format!("{prefix}.work")),
            ("NOTIFIER_DEAD_QUEUE", format!("{prefix}.dead")),
            ("NOTIFIER_RETRY_QUEUE_PREFIX", format!("{prefix}.retry")),
            ("NOTIFIER_RETRY_DELAYS", "1s".into()),
            ("NOTIFIER_METRICS_ADDR", "127.0.0.1:0".into()),
            ("NOTIFIER_RATE_PER_SEC", "200".into()),
            ("NOTIFIER_BATCH_WINDOW_MS", "300".into()),
            ("NOTIFIER_BATCH_MAX_WAIT_MS", "3000".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let conn = broker::connect(&[amqp_url()], "wechat-notifier-test")
            .await
            .expect("RabbitMQ at AMQP_URL");
        let channel = broker::confirm_channel(&conn).await.unwrap();
        TestEnv {
            sim,
            prefix,
            conn,
            channel,
            vars,
        }
    }

    /// Opens a new broker connection (after a broker restart), retrying for a while.
    pub async fn reconnect(&mut self) {
        for _ in 0..120 {
            if let Ok(conn) = broker::connect(&[amqp_url()], "wechat-notifier-test").await {
                if let Ok(channel) = broker::confirm_channel(&conn).await {
                    self.conn = conn;
                    self.channel = channel;
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("the broker did not come back");
    }

    /// Overrides (or adds) a setting for services started after this.
    pub fn set(&mut self, key: &str, value: &str) {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.to_string(), value.to_string()));
    }

    pub fn settings(&self) -> Settings {
        Settings::from_pairs(self.vars.clone()).expect("test settings are valid")
    }

    /// Declares the topology, as the CRM side may do before the service starts.
    pub async fn declare(&self) {
        broker::declare_topology(&self.channel, &self.settings())
            .await
            .unwrap();
    }

    pub fn exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }
    pub fn queue(&self) -> String {
        format!("{}.work", self.prefix)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// Starts the service in this process.
    pub async fn start_service(&self) -> InProcess {
        let (trigger, signal) = shutdown::channel();
        let service = Service::build(self.settings(), signal).await.unwrap();
        let http = service.http_addr();
        let handle = tokio::spawn(service.run_until_stopped());
        InProcess {
            trigger,
            handle,
            http: http.to_string(),
        }
    }

    /// Starts the service in this process and waits until `/readyz` answers 200.
    pub async fn start_ready(&self) -> InProcess {
        let svc = self.start_service().await;
        assert!(
            eventually(Duration::from_secs(30), || async {
                readyz(&svc.http).await.0 == 200
            })
            .await,
            "ready"
        );
        svc
    }

    /// Starts the service as a real process with this test's settings.
    pub fn spawn_process(&self) -> Replica {
        self.spawn_process_logging(None)
    }

    /// As `spawn_process`, writing its logs (stderr) to `log`.
    ///
    /// The child binds port 0 for its HTTP endpoints and prints the address on
    /// stderr right after binding, before it touches the broker or WeChat, so
    /// this blocks only for the process start. A thread keeps reading stderr
    /// (a full pipe would stall the child), forwarding each line to `log`, or
    /// to the test's stderr under `TEST_LOG`.
    pub fn spawn_process_logging(&self, log: Option<&std::path::Path>) -> Replica {
        self.spawn_process_wrapped(&[], log)
    }

    /// As `spawn_process_logging`, started through `wrap` (a profiler's
    /// command line, e.g. `["heaptrack", "-o", "out"]`) when it is not empty.
    pub fn spawn_process_wrapped(&self, wrap: &[&str], log: Option<&std::path::Path>) -> Replica {
        let bin = env!("CARGO_BIN_EXE_wechat-notifier");
        let mut cmd = match wrap.split_first() {
            None => Command::new(bin),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
        };
        cmd.arg("run").env_clear();
        if !wrap.is_empty() {
            if let Ok(path) = std::env::var("PATH") {
                cmd.env("PATH", path);
            }
        }
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd.env("NOTIFIER_METRICS_ADDR", "127.0.0.1:0")
            .env(
                "RUST_LOG",
                self.vars
                    .iter()
                    .find(|(k, _)| k == "RUST_LOG")
                    .map(|(_, v)| v.clone())
                    .or_else(|| std::env::var("RUST_LOG").ok())
                    .unwrap_or_else(|| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("the binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut sink: Option<Box<dyn Write + Send>> = match log {
            Some(path) => Some(Box::new(std::fs::File::create(path).unwrap())),
            None if std::env::var("TEST_LOG").is_ok() => Some(Box::new(std::io::stderr())),
            None => None,
        };
        let (addr_tx, addr_rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix(LISTENING) {
                    if let Some(tx) = addr_tx.take() {
                        let _ = tx.send(addr.trim().to_string());
                    }
                }
                if let Some(w) = sink.as_mut() {
                    let _ = writeln!(w, "{line}");
                }
            }
            if let Some(w) = sink.as_mut() {
                let _ = w.flush();
            }
        });
        let http = match addr_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                panic!("the replica never said where it listens (exit: {status:?})");
            }
        };
        Replica {
            child,
            http,
            reader: Some(reader),
        }
    }

    /// As `spawn_process`, with its stderr a pipe nobody reads (a log
    /// collector that stalled). The line saying where it listens is never
    /// read, so its HTTP endpoints get a port picked here. Hold the returned
    /// pipe: dropping it would close the pipe instead of leaving it full.
    pub fn spawn_process_unread_stderr(&self) -> (Replica, std::process::ChildStderr) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let http = format!("127.0.0.1:{port}");
        let mut child = Command::new(env!("CARGO_BIN_EXE_wechat-notifier"))
            .arg("run")
            .env_clear()
            .envs(self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("NOTIFIER_METRICS_ADDR", &http)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let replica = Replica {
            child,
            http,
            reader: None,
        };
        (replica, stderr)
    }

    /// Runs the binary with this test's settings (plus `extra`) and `args`, to completion.
    pub fn command(&self, args: &[&str], extra: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wechat-notifier"));
        cmd.args(args).env_clear();
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.output().expect("the binary runs")
    }

    /// Publishes events as the CRM would (confirmed).
    pub async fn publish(&self, events: &[Value]) {
        publish::publish_events(&self.channel, &self.exchange(), events, None, None)
            .await
            .unwrap();
    }

    /// Publishes bodies with their message ids, as fast as confirms allow.
    pub async fn publish_bodies(&self, bodies: &[(String, Vec<u8>)]) {
        publish::publish_bodies(&self.channel, &self.exchange(), bodies, None, None)
            .await
            .unwrap();
    }

    /// Publishes raw bodies (for invalid input).
    pub async fn publish_raw(&self, bodies: &[Vec<u8>]) {
        let bodies: Vec<(String, Vec<u8>)> =
            bodies.iter().map(|b| (String::new(), b.clone())).collect();
        self.publish_bodies(&bodies).await;
    }

    /// A bulk assignment's events, with this test's user ids.
    pub fn bulk(&self, customers: usize, assignees: usize, batch: bool) -> Vec<Value> {
        let mut b = Bulk::new(customers, assignees);
        if !batch {
            b.batch_id = None;
        }
        publish::sample_events(&b)
    }

    /// The channels (broker pids) whose consumer is the active one on
    /// `queue` (standbys of a single-active-consumer queue are left out), by
    /// `rabbitmqctl`.
    pub fn consuming_channels(&self, queue: &str) -> Vec<String> {
        let out = rabbitmqctl(&[
            "-q",
            "list_consumers",
            "--no-table-headers",
            "queue_name",
            "channel_pid",
            "active",
        ]);
        out.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').map(str::trim).collect();
                (f.len() == 3 && f[0] == queue && f[2] == "true").then(|| f[1].to_string())
            })
            .collect()
    }

    /// Closes, on the broker's side (`rabbitmqctl close_connection`), the
    /// connection of the active consumer of `queue` (as a network fault or an
    /// operator would). Returns false when no consumer is found within 10 s.
    ///
    /// Asks again for a while: with many tests side by side, a `rabbitmqctl`
    /// listing now and then comes back empty (the CLI's own Erlang node
    /// starting on a busy machine), which once failed a test that had a
    /// consumer all along.
    pub fn close_consuming_connection(&self, queue: &str) -> bool {
        for _ in 0..20 {
            if self.close_consuming_connection_once(queue) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        false
    }

    fn close_consuming_connection_once(&self, queue: &str) -> bool {
        let channels = self.consuming_channels(queue);
        if channels.is_empty() {
            return false;
        }
        let listing = rabbitmqctl(&[
            "-q",
            "list_channels",
            "--no-table-headers",
            "pid",
            "connection",
        ]);
        let mut closed = false;
        for line in listing.lines() {
            let mut f = line.split('\t');
            let (Some(ch), Some(conn)) = (f.next(), f.next()) else {
                continue;
            };
            if channels.iter().any(|c| c == ch.trim()) {
                rabbitmqctl(&["close_connection", conn.trim(), "closed by a test"]);
                closed = true;
            }
        }
        closed
    }

    /// Ready messages in a queue (passive declare: the broker's live count).
    pub async fn ready(&self, queue: &str) -> u32 {
        self.queue_state(queue).await.0
    }

    /// Consumers on a queue (passive declare). A single-active-consumer queue
    /// counts only its active consumer, not the standbys.
    pub async fn consumers(&self, queue: &str) -> u32 {
        self.queue_state(queue).await.1
    }

    /// (ready messages, consumers) of a queue, by a passive declare on a
    /// short-lived channel (a declare of a missing queue closes its channel).
    pub async fn queue_state(&self, queue: &str) -> (u32, u32) {
        let q = self
            .passive(queue)
            .await
            .unwrap_or_else(|e| panic!("queue {queue} exists: {e}"));
        (q.message_count(), q.consumer_count())
    }

    /// Whether a queue exists (without creating it).
    pub async fn queue_exists(&self, queue: &str) -> bool {
        self.passive(queue).await.is_ok()
    }

    /// A passive declare on a short-lived channel (a declare of a missing
    /// queue closes its channel).
    async fn passive(&self, queue: &str) -> Result<lapin::Queue, lapin::Error> {
        let ch = self.conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = ch.close(200, "ok".into()).await;
        q
    }

    /// The retry queues of this test's ladder.
    pub fn retry_queues(&self) -> Vec<String> {
        let s = self.settings();
        s.retry_delays.iter().map(|d| s.retry_queue(*d)).collect()
    }

    /// Messages ready in the work queue and every retry queue.
    pub async fn ready_in_work_and_retry(&self) -> u32 {
        let mut total = self.ready(&self.queue()).await;
        for q in self.retry_queues() {
            total += self.ready(&q).await;
        }
        total
    }

    /// Whether the service at `http` has settled everything: no message waits
    /// in the work queue or a retry queue, it holds none unacked, and WeChat
    /// has no call of it open. Nothing further can reach WeChat until new
    /// messages arrive.
    pub async fn settled(&self, http: &str) -> bool {
        self.ready_in_work_and_retry().await == 0
            && unacked(http).await == Some(0)
            && self.sim.in_flight() == 0
    }

    /// Takes every message now in `queue` (acking them).
    pub async fn drain(&self, queue: &str) -> Vec<(Vec<u8>, BasicProperties)> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            m.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .unwrap();
            out.push((m.delivery.data.clone(), m.delivery.properties.clone()));
        }
        out
    }

    /// Every event id covered by a notice WeChat accepted.
    pub fn notified_ids(&self) -> BTreeSet<String> {
        event_ids_of(&self.sim.delivered())
    }

    /// Deletes this test's queues and exchange.
    ///
    /// Each queue on its own channel, side by side: a quorum queue with a
    /// member on a stopped node (tests/alone/node_loss.rs) takes the broker's 5 s
    /// delete timeout, and one channel would wait those out one after another.
    pub async fn cleanup(&self) {
        let s = self.settings();
        let mut queues = vec![s.queue.clone(), s.dead_queue.clone()];
        queues.extend(s.retry_delays.iter().map(|d| s.retry_queue(*d)));
        futures_util::future::join_all(queues.iter().map(|q| async move {
            if let Ok(ch) = self.conn.create_channel().await {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
                let _ = ch.close(200, "ok".into()).await;
            }
        }))
        .await;
        if let Ok(ch) = self.conn.create_channel().await {
            let _ = ch
                .exchange_delete(s.exchange.as_str().into(), Default::default())
                .await;
            let _ = ch.close(200, "ok".into()).await;
        }
    }
}

/// A fault for the cloud-function calls about `event`'s assignee
/// (`times` times, or always).
pub fn fault_for(event: &Value, action: FaultAction, times: Option<u32>) -> Fault {
    Fault {
        api: Some(Api::InvokeCloudFunction),
        user_id: event["assignee"]["user_id"].as_str().map(str::to_string),
        action,
        times,
    }
}

/// `/readyz` at `http`: (status, body), (0, "") when nothing answers.
pub async fn readyz(http: &str) -> (u16, String) {
    match reqwest::get(format!("http://{http}/readyz")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// `rabbitmqctl` with `args`: its standard output.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The most entries of sorted `times` (ms) in any window of `width` ms.
pub fn most_in_any_window(times: &[f64], width: f64) -> usize {
    let mut most = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= width {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    most
}

/// Every event id the given notices cover.
pub fn event_ids_of(notices: &[Value]) -> BTreeSet<String> {
    notices
        .iter()
        .flat_map(|n| n["event_ids"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

pub fn ids(events: &[Value]) -> BTreeSet<String> {
    events
        .iter()
        .filter_map(|e| e["event_id"].as_str().map(str::to_string))
        .collect()
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    eventually(timeout, || std::future::ready(cond())).await
}

/// As `wait_until`, for a condition that has to ask something (the broker, `/metrics`).
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deliveries the service at `http` holds unacked (its own gauge), or `None`
/// while `/metrics` does not answer.
pub async fn unacked(http: &str) -> Option<u64> {
    try_metric(http, "wechat_notifier_unacked_deliveries", "")
        .await
        .map(|v| v as u64)
}

/// The in-process service.
pub struct InProcess {
    pub trigger: ShutdownTrigger,
    pub handle: JoinHandle<anyhow::Result<()>>,
    pub http: String,
}

impl InProcess {
    pub async fn stop(self) {
        self.trigger.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.handle).await;
    }
}

/// A replica as a real process; killed when dropped.
pub struct Replica {
    pub child: Child,
    /// Where its `/metrics`, `/healthz` and `/readyz` answer (it said so on stderr).
    pub http: String,
    /// Forwards its stderr; ends when the process does.
    reader: Option<ThreadHandle<()>>,
}

impl Replica {
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
    }
    /// Waits for the process to exit and for its last log line to be written.
    pub fn wait(&mut self) -> ExitStatus {
        let status = self.child.wait().expect("the replica can be waited for");
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        status
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A metric's value from a `/metrics` text (sum over the label sets that contain `labels`).
pub async fn metric(http: &str, name: &str, labels: &str) -> f64 {
    try_metric(http, name, labels)
        .await
        .expect("/metrics answers")
}

/// As `metric`, or `None` while the endpoint does not answer.
pub async fn try_metric(http: &str, name: &str, labels: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let sum = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{'))
        })
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum();
    Some(sum)
}
