//! The pipeline benchmark (`cargo bench --bench pipeline`): the service against
//! the local RabbitMQ and the simulator, row by row, each figure beside its
//! target. Prints a table and writes `target/bench/pipeline.json` so one run
//! can be compared with the next.
//!
//! `BENCH_ROWS=ceiling,drain` runs only some rows (ceiling and drain always run
//! together: drain is judged against the ceiling of the same run);
//! `BENCH_EVENTS` changes the drain size (100,000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use common::{eventually, metric, try_metric, wait_until, Replica, TestEnv};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::{json, Value};
use tokio::time::Instant;
use wechat_notifier::broker::{self, ROUTING_KEY};
use wechat_notifier::publish::{self, Bulk};
use wechat_notifier::sim::{Api, Call};

/// One row of the table and of the JSON file.
struct Row {
    row: &'static str,
    what: String,
    figure: f64,
    unit: &'static str,
    target: String,
    /// `None` for the reference row.
    pass: Option<bool>,
    details: Value,
}

fn wanted(row: &str) -> bool {
    match std::env::var("BENCH_ROWS") {
        Ok(rows) => rows.split(',').any(|r| r.trim() == row),
        Err(_) => true,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let rows = rt.block_on(run_rows());
    let table = render(&rows);
    println!("{table}");
    let machine = machine();
    let out = json!({
        "bench": "pipeline",
        "at": chrono::Local::now().to_rfc3339(),
        "machine": machine,
        "rows": rows.iter().map(|r| json!({
            "row": r.row,
            "what": r.what,
            "figure": r.figure,
            "unit": r.unit,
            "target": r.target,
            "pass": r.pass,
            "details": r.details,
        })).collect::<Vec<_>>(),
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pipeline.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("wrote {}", path.display());
}

async fn run_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    if wanted("ceiling") || wanted("drain") {
        let n: usize = std::env::var("BENCH_EVENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let (ceiling, drain) = ceiling_and_drain(n).await;
        rows.push(ceiling);
        rows.push(drain);
    }
    if wanted("latency") {
        rows.push(latency().await);
    }
    if wanted("rate") {
        rows.push(rate().await);
    }
    if wanted("memory") {
        rows.push(memory().await);
    }
    if wanted("coalescing") {
        rows.push(coalescing().await);
    }
    if wanted("failover") {
        rows.push(failover().await);
    }
    if wanted("naive") {
        rows.push(naive().await);
    }
    rows
}

fn render(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<11} {:>14} {:<8} {:<34} {:<6} {}\n",
        "row", "figure", "unit", "target", "pass", "what"
    );
    for r in rows {
        let pass = match r.pass {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        out.push_str(&format!(
            "{:<11} {:>14.2} {:<8} {:<34} {:<6} {}\n",
            r.row, r.figure, r.unit, r.target, pass, r.what
        ));
    }
    out
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let rabbit = std::process::Command::new("rabbitmqctl")
        .args(["version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "rabbitmq": rabbit,
    })
}

/// Bodies of `n` single-customer events, `per_assignee` consecutive events per
/// assignee (no CRM batch).
fn grouped_bodies(n: usize, per_assignee: usize, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut bulk = Bulk::new(n, 1);
    bulk.batch_id = None;
    bulk.source = "web";
    publish::sample_events(&bulk)
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e["assignee"]["user_id"] = json!(format!("{prefix}{}", i / per_assignee));
            let id = e["event_id"].as_str().unwrap().to_string();
            (id, serde_json::to_vec(&e).unwrap())
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn notice_calls(calls: &[Call]) -> Vec<&Call> {
    calls
        .iter()
        .filter(|c| c.api == Api::InvokeCloudFunction && c.body.get("notice").is_some())
        .collect()
}

/// ceiling: plain lapin on a plain quorum queue; drain: the service on the same
/// events, already queued.
async fn ceiling_and_drain(n: usize) -> (Row, Row) {
    let mut env = TestEnv::new("bench-drain").await;
    let bodies = grouped_bodies(n, 10, &format!("{}-a", env.prefix));

    // ceiling
    let exchange = format!("{}.ceiling-ex", env.prefix);
    let queue = format!("{}.ceiling", env.prefix);
    env.channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    env.channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    env.channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            ROUTING_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let t = Instant::now();
    publish::publish_bodies(&env.channel, &exchange, &bodies, None, None)
        .await
        .unwrap();
    let publish_secs = t.elapsed().as_secs_f64();
    let ch = env.conn.create_channel().await.unwrap();
    ch.basic_qos(2000, BasicQosOptions::default())
        .await
        .unwrap();
    let t = Instant::now();
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = 0;
    while got < n {
        let d = consumer.next().await.unwrap().unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        got += 1;
    }
    let consume_secs = t.elapsed().as_secs_f64();
    let _ = ch.close(200, "done".into()).await;
    let _ = env
        .channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = env
        .channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    let ceiling_rate = n as f64 / consume_secs;
    let ceiling = Row {
        row: "ceiling",
        what: format!(
            "plain lapin: consume-and-ack of {n} queued events on a quorum queue (publish with confirms: {:.0}/s)",
            n as f64 / publish_secs
        ),
        figure: ceiling_rate,
        unit: "events/s",
        target: "(reference)".into(),
        pass: None,
        details: json!({ "events": n, "publish_secs": publish_secs, "publish_rate": n as f64 / publish_secs, "consume_secs": consume_secs }),
    };

    // drain
    env.set("NOTIFIER_RATE_PER_SEC", "1000000");
    env.set("NOTIFIER_RATE_BURST", "10000");
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.set("NOTIFIER_BATCH_MAX", "50");
    env.declare().await;
    env.publish_bodies(&bodies).await;
    let t = Instant::now();
    let svc = env.start_service().await;
    let done = wait_until(Duration::from_secs(600), || {
        env.sim.delivered_event_count() >= n
    })
    .await;
    let drain_secs = t.elapsed().as_secs_f64();
    let calls = env.sim.calls();
    let notices = notice_calls(&calls).len();
    let drained = eventually(Duration::from_secs(60), || env.settled(&svc.http)).await;
    svc.stop().await;
    env.cleanup().await;
    let drain_rate = if done { n as f64 / drain_secs } else { 0.0 };
    let drain = Row {
        row: "drain",
        what: format!(
            "the service draining {n} queued events over {} assignees into {notices} notices",
            n / 10
        ),
        figure: drain_rate,
        unit: "events/s",
        target: format!(">= 0.5 x ceiling = {:.0}", 0.5 * ceiling_rate),
        pass: Some(done && drained && drain_rate >= 0.5 * ceiling_rate),
        details: json!({
            "events": n, "assignees": n / 10, "notices": notices, "secs": drain_secs,
            "ratio_to_ceiling": drain_rate / ceiling_rate, "all_notified": done, "queue_empty_after": drained,
        }),
    };
    (ceiling, drain)
}

/// Publish -> simulator receipt at 100 events/s, one event per assignee.
async fn latency() -> Row {
    const QUIET_MS: f64 = 200.0;
    const EVENTS: usize = 1000;
    let mut env = TestEnv::new("bench-latency").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", &format!("{QUIET_MS}"));
    env.set("NOTIFIER_RATE_PER_SEC", "1000");
    env.declare().await;
    let svc = env.start_service().await;
    let bodies = grouped_bodies(EVENTS, 1, &format!("{}-a", env.prefix));
    let exchange = env.exchange();
    // Warm up the connection pool and the token before the clock matters.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let start = Instant::now();
    for (i, (id, body)) in bodies.iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_millis(10) * i as u32).await;
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(id.as_str().into());
        sent_at.insert(id.clone(), Instant::now());
        broker::publish_confirmed(&env.channel, &exchange, ROUTING_KEY, body, props)
            .await
            .unwrap();
    }
    let done = wait_until(Duration::from_secs(60), || {
        env.sim.delivered_event_count() >= EVENTS
    })
    .await;
    let origin = env.sim.started();
    let mut lat: Vec<f64> = Vec::new();
    for call in notice_calls(&env.sim.calls()) {
        let received = origin + Duration::from_secs_f64(call.at_ms / 1000.0);
        for id in call.body["notice"]["event_ids"].as_array().unwrap() {
            if let Some(t) = sent_at.get(id.as_str().unwrap()) {
                lat.push(received.duration_since(*t).as_secs_f64() * 1000.0 - QUIET_MS);
            }
        }
    }
    svc.stop().await;
    env.cleanup().await;
    lat.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
    Row {
        row: "latency",
        what: format!(
            "publish -> simulator receipt at 100 events/s, minus the {QUIET_MS} ms quiet period: p99 (p50 {p50:.1} ms)"
        ),
        figure: p99,
        unit: "ms",
        target: "p99 <= 25 ms".into(),
        pass: Some(done && lat.len() == EVENTS && p99 <= 25.0),
        details: json!({ "events": EVENTS, "measured": lat.len(), "p50_ms": p50, "p90_ms": percentile(&lat, 90.0), "p99_ms": p99, "max_ms": lat.last() }),
    }
}

/// Waits until every replica answers `/metrics`, so their start-up probes are done.
async fn wait_ready(replicas: &[Replica]) {
    for r in replicas {
        let mut ok = false;
        for _ in 0..200 {
            if try_metric(&r.http, "wechat_notifier_consuming", "").await == Some(1.0) {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ok, "replica {} registered its consumer", r.http);
    }
}

/// 3 replicas at NOTIFIER_RATE_PER_SEC=50, 3,000 single-event assignees.
async fn rate() -> Row {
    const RATE: f64 = 50.0;
    const BURST: f64 = 1.0;
    const EVENTS: usize = 3000;
    let mut env = TestEnv::new("bench-rate").await;
    env.set("NOTIFIER_RATE_PER_SEC", &format!("{RATE}"));
    env.set("NOTIFIER_RATE_BURST", &format!("{BURST}"));
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.declare().await;
    let replicas: Vec<Replica> = (0..3).map(|_| env.spawn_process()).collect();
    wait_ready(&replicas).await;
    let bodies = grouped_bodies(EVENTS, 1, &format!("{}-a", env.prefix));
    env.publish_bodies(&bodies).await;
    let done = wait_until(Duration::from_secs(EVENTS as u64 / 50 + 60), || {
        env.sim.delivered_event_count() >= EVENTS
    })
    .await;
    let calls = env.sim.calls();
    let cpu: f64 = replicas.iter().map(|r| cpu_secs(r.child.id())).sum();
    drop(replicas);
    env.cleanup().await;
    let all: Vec<f64> = calls
        .iter()
        .filter(|c| matches!(c.api, Api::InvokeCloudFunction))
        .map(|c| c.at_ms)
        .collect();
    let notices: Vec<f64> = notice_calls(&calls).iter().map(|c| c.at_ms).collect();
    let achieved = if notices.len() > 1 {
        (notices.len() - 1) as f64 / ((notices[notices.len() - 1] - notices[0]) / 1000.0)
    } else {
        0.0
    };
    // The most calls (probes included) in any window of one second.
    let mut sorted = all.clone();
    sorted.sort_by(f64::total_cmp);
    let mut most = 0;
    let mut j = 0;
    for i in 0..sorted.len() {
        while sorted[i] - sorted[j] >= 1000.0 {
            j += 1;
        }
        most = most.max(i - j + 1);
    }
    let within = (achieved - RATE).abs() <= 0.03 * RATE;
    Row {
        row: "rate",
        what: format!(
            "3 replicas, rate {RATE}/s burst {BURST}, {EVENTS} single-event assignees: achieved rate (most in any 1 s: {most})"
        ),
        figure: achieved,
        unit: "calls/s",
        target: format!("within 3% of {RATE}; <= {} in any 1 s", RATE + BURST),
        pass: Some(done && within && most as f64 <= RATE + BURST),
        details: json!({ "notices": notices.len(), "achieved_per_sec": achieved, "most_in_any_second": most, "calls_including_probes": all.len(), "replicas_cpu_secs": cpu }),
    }
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    ticks / 100.0 // USER_HZ
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Peak RSS of one replica holding 20,000 unacked deliveries in open windows.
async fn memory() -> Row {
    const HELD: usize = 20_000;
    let mut env = TestEnv::new("bench-memory").await;
    env.set("NOTIFIER_PREFETCH", &HELD.to_string());
    env.set("NOTIFIER_BATCH_WINDOW_MS", "120000");
    env.set("NOTIFIER_BATCH_MAX_WAIT_MS", "300000");
    env.set("NOTIFIER_BATCH_MAX", "1000");
    env.declare().await;
    let replica = env.spawn_process();
    wait_ready(std::slice::from_ref(&replica)).await;
    let bodies = grouped_bodies(HELD, 10, &format!("{}-a", env.prefix));
    env.publish_bodies(&bodies).await;
    let mut held = 0.0;
    for _ in 0..600 {
        held = metric(&replica.http, "wechat_notifier_unacked_deliveries", "").await;
        if held >= HELD as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peak_mib = peak_rss_kib(replica.child.id()).unwrap_or(0) as f64 / 1024.0;
    drop(replica);
    env.cleanup().await;
    Row {
        row: "memory",
        what: format!(
            "peak RSS of a replica holding {held} unacked deliveries in {} open windows",
            HELD / 10
        ),
        figure: peak_mib,
        unit: "MiB",
        target: "<= 64 MiB".into(),
        pass: Some(held >= HELD as f64 && peak_mib > 0.0 && peak_mib <= 64.0),
        details: json!({ "unacked": held, "peak_rss_mib": peak_mib }),
    }
}

/// Publishes a bulk assignment spread evenly over `over`.
async fn publish_over(env: &TestEnv, events: &[Value], over: Duration) {
    let rate = events.len() as f64 / over.as_secs_f64();
    publish::publish_events(&env.channel, &env.exchange(), events, Some(rate), None)
        .await
        .unwrap();
}

/// 5,000 customers over 100 assignees published over 5 s, 3 replicas.
async fn coalescing() -> Row {
    let mut env = TestEnv::new("bench-coalesce").await;
    // The whole bulk must fit in the unacked deliveries a replica may hold:
    // with the default 2,000, windows of 20 events close on the quiet period.
    env.set("NOTIFIER_PREFETCH", "10000");
    env.set("NOTIFIER_RATE_PER_SEC", "10");
    env.set("NOTIFIER_BATCH_WINDOW_MS", "2000");
    env.set("NOTIFIER_BATCH_MAX_WAIT_MS", "10000");
    env.declare().await;
    let replicas: Vec<Replica> = (0..3).map(|_| env.spawn_process()).collect();
    wait_ready(&replicas).await;
    let events = env.bulk(5000, 100, true);
    publish_over(&env, &events, Duration::from_secs(5)).await;
    let done = wait_until(Duration::from_secs(120), || {
        env.sim.delivered_event_count() >= events.len()
    })
    .await;
    // A late second notice would show up within a window's length.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let delivered = env.sim.delivered();
    drop(replicas);
    env.cleanup().await;
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for n in &delivered {
        *per.entry(n["assignee"]["user_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let covered: BTreeSet<&str> = delivered
        .iter()
        .flat_map(|n| n["event_ids"].as_array().unwrap().iter())
        .filter_map(Value::as_str)
        .collect();
    let exactly_one = per.len() == 100 && per.values().all(|&c| c == 1);
    let max = per.values().copied().max().unwrap_or(0);
    Row {
        row: "coalescing",
        what: "5,000 customers over 100 assignees published over 5 s, 3 replicas: notices per assignee (most)".into(),
        figure: max as f64,
        unit: "notices",
        target: "exactly 1 per assignee".into(),
        pass: Some(done && exactly_one && covered.len() == events.len()),
        details: json!({ "assignees_notified": per.len(), "notices": delivered.len(), "events_covered": covered.len(), "most_for_one_assignee": max }),
    }
}

/// SIGKILL of the active replica -> the first call by a standby.
async fn failover() -> Row {
    let mut env = TestEnv::new("bench-failover").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "100");
    env.set("NOTIFIER_RATE_PER_SEC", "100");
    env.declare().await;
    let mut replicas: Vec<Replica> = (0..3).map(|_| env.spawn_process()).collect();
    wait_ready(&replicas).await;
    // A steady 50 events/s for 8 s, one assignee each.
    let bodies = grouped_bodies(400, 1, &format!("{}-a", env.prefix));
    let publisher = {
        let channel = env.channel.clone();
        let exchange = env.exchange();
        tokio::spawn(async move {
            publish::publish_bodies(&channel, &exchange, &bodies, Some(50.0), None)
                .await
                .unwrap();
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut active = None;
    for (i, r) in replicas.iter().enumerate() {
        if metric(&r.http, "wechat_notifier_events_received_total", "").await > 0.0 {
            active = Some(i);
        }
    }
    let active = active.expect("one replica is consuming");
    let killed_at = Instant::now();
    replicas[active].kill9();
    let killed_ms = killed_at.duration_since(env.sim.started()).as_secs_f64() * 1000.0;
    publisher.await.unwrap();
    let done = wait_until(Duration::from_secs(60), || {
        env.sim.delivered_event_count() >= 400
    })
    .await;
    let calls = env.sim.calls();
    drop(replicas);
    env.cleanup().await;
    let first_after = notice_calls(&calls)
        .iter()
        .map(|c| c.at_ms)
        .filter(|&t| t > killed_ms)
        .fold(f64::INFINITY, f64::min);
    let secs = (first_after - killed_ms) / 1000.0;
    let covered: BTreeSet<String> = notice_calls(&calls)
        .iter()
        .filter(|c| c.errcode == 0)
        .flat_map(|c| c.body["notice"]["event_ids"].as_array().unwrap().clone())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    Row {
        row: "failover",
        what: "SIGKILL of the active replica (of 3) under 50 events/s -> first call by a standby"
            .into(),
        figure: secs,
        unit: "s",
        target: "<= 3 s".into(),
        pass: Some(done && covered.len() == 400 && secs <= 3.0),
        details: json!({ "failover_secs": secs, "events_covered": covered.len(), "events_published": 400 }),
    }
}

/// Time until every assignee is told about every customer, at 20 calls/s:
/// the service (coalescing) against one call per event (batch max 1).
async fn naive() -> Row {
    async fn one(batch_max: &str) -> (f64, usize, bool) {
        let mut env = TestEnv::new("bench-naive").await;
        env.set("NOTIFIER_RATE_PER_SEC", "20");
        env.set("NOTIFIER_PREFETCH", "10000");
        env.set("NOTIFIER_BATCH_MAX", batch_max);
        env.set("NOTIFIER_BATCH_WINDOW_MS", "2000");
        env.set("NOTIFIER_BATCH_MAX_WAIT_MS", "10000");
        env.declare().await;
        let svc = env.start_service().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let events = env.bulk(5000, 100, true);
        let t = Instant::now();
        publish_over(&env, &events, Duration::from_secs(5)).await;
        let done = wait_until(Duration::from_secs(600), || {
            env.sim.delivered_event_count() >= events.len()
        })
        .await;
        let secs = t.elapsed().as_secs_f64();
        let calls = notice_calls(&env.sim.calls()).len();
        svc.stop().await;
        env.cleanup().await;
        (secs, calls, done)
    }
    let (coalesced, coalesced_calls, ok1) = one("50").await;
    let (naive, naive_calls, ok2) = one("1").await;
    let speedup = naive / coalesced;
    Row {
        row: "naive",
        what: format!(
            "5,000 customers / 100 assignees at 20 calls/s: every customer announced, coalesced {coalesced:.1} s ({coalesced_calls} calls) vs one call per event {naive:.1} s ({naive_calls} calls)"
        ),
        figure: speedup,
        unit: "x faster",
        target: ">= 20x".into(),
        pass: Some(ok1 && ok2 && speedup >= 20.0),
        details: json!({ "coalesced_secs": coalesced, "coalesced_calls": coalesced_calls, "naive_secs": naive, "naive_calls": naive_calls }),
    }
}
