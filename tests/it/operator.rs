//! Operator tools that are safe in production: `dlq` acts once per message
//! even while the service dead-letters its replays again, `check` and
//! `status` change nothing, each command asks only for its own settings, and
//! every failure is one line that says what to fix. Also: the repository
//! stands alone, and the example configuration is read by the real parser.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{fault_for, ids, TestEnv};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::Value;
use wechat_notifier::settings::{Settings, Source, VARIABLES};
use wechat_notifier::sim::{Api, Fault, FaultAction};

const WAIT: Duration = Duration::from_secs(20);

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one line a failing command printed (and that there was only one).
fn one_line(out: &Output) -> String {
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr: {err}");
    assert!(
        !err.contains('\x1b'),
        "no colour codes off a terminal: {err:?}"
    );
    lines[0].to_string()
}

/// Runs the binary with exactly `vars` as its environment.
async fn run(args: &[&str], vars: Vec<(String, String)>) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_wechat-notifier"))
            .args(args)
            .env_clear()
            .envs(vars)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// A local port nothing listens on (bound, read, released at once).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Only the broker's settings of a test (no WECHAT_* at all).
fn broker_vars(env: &TestEnv) -> Vec<(String, String)> {
    env.vars
        .iter()
        .filter(|(k, _)| {
            k == "AMQP_URL"
                || k == "NOTIFIER_EXCHANGE"
                || k == "NOTIFIER_QUEUE"
                || k == "NOTIFIER_DEAD_QUEUE"
                || k == "NOTIFIER_RETRY_QUEUE_PREFIX"
                || k == "NOTIFIER_RETRY_DELAYS"
        })
        .cloned()
        .collect()
}

fn with(mut vars: Vec<(String, String)>, key: &str, value: &str) -> Vec<(String, String)> {
    vars.retain(|(k, _)| k != key);
    vars.push((key.into(), value.into()));
    vars
}

/// Polls the ready count of `queue` until `want` or the deadline.
async fn wait_ready(env: &TestEnv, queue: &str, want: u32) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if env.ready(queue).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// How many WeChat notice calls covered each event id.
fn calls_per_event(env: &TestEnv) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for call in env.sim.notice_calls() {
        for id in call.body["notice"]["event_ids"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            *out.entry(id.as_str().unwrap_or_default().to_string())
                .or_insert(0) += 1;
        }
    }
    out
}

/// The work queue as a plain classic queue: the service's declare of a
/// quorum queue with its arguments then gets a 406.
async fn declare_classic_work_queue(env: &TestEnv) {
    env.channel
        .queue_declare(
            env.queue().as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_while_the_service_rejects_again_replays_each_message_once() {
    let mut env = TestEnv::new("replay-once").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.declare().await;
    let svc = env.start_service().await;
    // Every notice is refused for good (43101), so each replayed copy is
    // dead-lettered again at once, while the replay still runs.
    env.sim.push_fault(Fault {
        api: Some(Api::InvokeCloudFunction),
        user_id: None,
        action: FaultAction::FunctionErrcode(43101),
        times: None,
    });
    let events = env.bulk(30, 30, false);
    env.publish(&events).await;
    let dead = env.dead_queue();
    assert!(wait_ready(&env, &dead, 30).await, "30 dead letters");

    let out = run(&["dlq", "replay"], env.vars.clone()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(&format!("replayed 30 into {}", env.queue())),
        "{}",
        stdout(&out)
    );

    // Every replayed copy comes back (refused again), and then nothing moves.
    let want = ids(&events);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let calls = calls_per_event(&env);
        if env.ready(&dead).await == 30 && want.iter().all(|id| calls.get(id) == Some(&2)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "each event was sent twice (once, then once replayed): {calls:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    svc.stop().await;
    let calls = calls_per_event(&env);
    assert!(
        want.iter().all(|id| calls.get(id) == Some(&2)),
        "replayed once each, never twice: {calls:?}"
    );
    let left = env.drain(&dead).await;
    let left_ids: Vec<String> = left
        .iter()
        .map(|(body, _)| {
            serde_json::from_slice::<Value>(body).unwrap()["event_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(left_ids.len(), 30, "the same messages, once each");
    assert_eq!(left_ids.iter().cloned().collect::<BTreeSet<_>>(), want);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_export_and_purge_choose_exactly_and_keep_the_rest() {
    let mut env = TestEnv::new("dlq-tools").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.declare().await;
    let svc = env.start_service().await;
    let rejected = env.bulk(1, 1, false);
    env.sim.push_fault(fault_for(
        &rejected[0],
        FaultAction::FunctionErrcode(43101),
        None,
    ));
    env.publish(&rejected).await;
    env.publish_raw(&[b"not json".to_vec(), vec![0xff, 0xfe]])
        .await;
    let dead = env.dead_queue();
    assert!(wait_ready(&env, &dead, 3).await);
    svc.stop().await;
    let vars = broker_vars(&env);

    let typo = run(&["dlq", "list", "--reason", "invalid_evnt"], vars.clone()).await;
    assert_eq!(typo.status.code(), Some(2));
    let line = one_line(&typo);
    assert!(
        line.contains("invalid_evnt") && line.contains("invalid_event, wechat_rejected"),
        "{line}"
    );

    // Each command starts from the queue's ready count; a listing hands its
    // messages back as it ends, and the broker counts them ready again a
    // moment later (a quorum queue applies the returns through its log), so
    // the test waits for that before the next command, as an operator would
    // see it.
    let table = run(&["dlq", "list"], vars.clone()).await;
    assert_eq!(table.status.code(), Some(0), "{}", stderr(&table));
    let text = stdout(&table);
    let header = text.lines().next().unwrap();
    for col in [
        "reason", "errcode", "attempts", "age", "assignee", "event_id", "detail",
    ] {
        assert!(header.contains(col), "{col} in {header}");
    }
    let row = text
        .lines()
        .find(|l| l.starts_with("wechat_rejected"))
        .unwrap_or_else(|| panic!("{text}"));
    let user = rejected[0]["assignee"]["user_id"].as_str().unwrap();
    let event = rejected[0]["event_id"].as_str().unwrap();
    assert!(
        row.contains("43101") && row.contains(user) && row.contains(event),
        "{row}"
    );
    assert!(text.contains("3 shown"), "{text}");
    assert!(
        wait_ready(&env, &dead, 3).await,
        "a listing keeps every message"
    );

    let limited = run(&["dlq", "list", "--json", "--limit", "1"], vars.clone()).await;
    let rows: Vec<Value> = serde_json::from_slice(&limited.stdout).unwrap();
    assert_eq!(rows.len(), 1);
    assert!(
        wait_ready(&env, &dead, 3).await,
        "a listing keeps every message"
    );

    let file = std::env::temp_dir().join(format!("{}.jsonl", env.prefix));
    let export = run(
        &[
            "dlq",
            "export",
            "--reason",
            "invalid_event",
            "--out",
            file.to_str().unwrap(),
        ],
        vars.clone(),
    )
    .await;
    assert_eq!(export.status.code(), Some(0), "{}", stderr(&export));
    let lines: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let _ = std::fs::remove_file(&file);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().any(|l| l["body"] == "not json"));
    assert!(lines.iter().any(|l| l["body_base64"] == "//4="));
    assert!(lines
        .iter()
        .all(|l| l["headers"]["x-notifier-reason"] == "invalid_event"));
    assert!(
        wait_ready(&env, &dead, 3).await,
        "list and export keep every message"
    );

    let purge = run(
        &["dlq", "purge", "--yes", "--reason", "wechat_rejected"],
        vars.clone(),
    )
    .await;
    assert_eq!(purge.status.code(), Some(0), "{}", stderr(&purge));
    assert!(
        stdout(&purge).starts_with("purged 1;"),
        "{}",
        stdout(&purge)
    );
    let left = env.drain(&dead).await;
    assert_eq!(left.len(), 2);
    assert!(left
        .iter()
        .all(|(b, _)| !String::from_utf8_lossy(b).contains(event)));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_over_several_chunks_sees_each_message_once_and_keeps_them_all() {
    let mut env = TestEnv::new("dlq-chunks").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.declare().await;
    let svc = env.start_service().await;
    // More than two chunks of invalid events, each body distinct.
    let n = 2 * wechat_notifier::cmd::dlq::WINDOW as usize + 50;
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("not json {i}").into_bytes())
        .collect();
    env.publish_raw(&bodies).await;
    let dead = env.dead_queue();
    assert!(wait_ready(&env, &dead, n as u32).await);
    svc.stop().await;

    let out = run(&["dlq", "export"], broker_vars(&env)).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let seen: Vec<String> = stdout(&out)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["body"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(seen.len(), n, "each message once, no more");
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), n, "none twice");
    assert!(
        stderr(&out).contains(&format!("{n} of {n} message(s) examined")),
        "{}",
        stderr(&out)
    );
    // Put-back deliveries are back in the queue moments after the run closed.
    assert!(
        wait_ready(&env, &dead, n as u32).await,
        "export keeps every message"
    );

    // --limit stops a purge exactly.
    let out = run(
        &["dlq", "purge", "--yes", "--limit", "7"],
        broker_vars(&env),
    )
    .await;
    assert!(stdout(&out).starts_with("purged 7;"), "{}", stdout(&out));
    assert!(
        wait_ready(&env, &dead, n as u32 - 7).await,
        "exactly 7 purged"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_creates_nothing_and_names_every_missing_queue() {
    let env = TestEnv::new("check-empty").await;
    let s = env.settings();
    let retry = s.retry_queue(s.retry_delays[0]);
    let out = run(&["check"], env.vars.clone()).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let line = one_line(&out);
    for name in [&s.queue, &s.dead_queue, &retry, &s.exchange] {
        assert!(line.contains(name.as_str()), "{name} in {line}");
    }
    let report = stdout(&out);
    assert!(report.contains("missing"), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("WeChat") && l.contains(" ok (")),
        "WeChat answered the probe: {report}"
    );
    for q in [&s.queue, &s.dead_queue, &retry] {
        assert!(!env.queue_exists(q).await, "check created {q}");
    }
    // Declared, the same check passes.
    env.declare().await;
    let ok = run(&["check"], env.vars.clone()).await;
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_wechat_reports_a_configuration_fault() {
    let env = TestEnv::new("check-85088").await;
    env.declare().await;
    // The probe `run` makes before consuming, answered "cloud development not
    // enabled" by WeChat itself, then "TEMPLATE_ID is not set" by the function
    // inside resp_data: check must not say ok to either.
    for action in [
        FaultAction::Errcode(85088),
        FaultAction::FunctionErrcode(85088),
    ] {
        env.sim.clear_faults();
        env.sim.push_fault(Fault {
            api: Some(Api::InvokeCloudFunction),
            user_id: None,
            action: action.clone(),
            times: None,
        });
        let out = run(&["check"], env.vars.clone()).await;
        assert_eq!(out.status.code(), Some(1), "{action:?}: {}", stderr(&out));
        let line = one_line(&out);
        assert!(line.contains("85088"), "{action:?}: {line}");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_depths_with_broker_settings_only() {
    let env = TestEnv::new("status").await;
    env.declare().await;
    env.publish(&env.bulk(3, 1, true)).await;
    let out = run(&["status"], broker_vars(&env)).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let work = text
        .lines()
        .find(|l| l.starts_with("work queue"))
        .unwrap_or_else(|| panic!("{text}"));
    let cols: Vec<&str> = work.split_whitespace().collect();
    assert_eq!(cols[2], env.queue());
    assert_eq!((cols[3], cols[4]), ("3", "0"), "{work}");
    assert!(text.contains("dead-letter queue"), "{text}");
    assert!(
        text.contains("active replica: unknown (set NOTIFIER_MANAGEMENT_URL)"),
        "{text}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_needs_only_the_broker_and_refuses_a_zero_rate() {
    let env = TestEnv::new("publish-only").await;
    let vars = broker_vars(&env);
    assert!(vars.iter().all(|(k, _)| !k.starts_with("WECHAT_")));
    let out = run(
        &["publish", "--customers", "4", "--assignees", "2"],
        vars.clone(),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(wait_ready(&env, &env.queue(), 4).await);

    for rate in ["0", "-3", "NaN", "inf"] {
        let arg = format!("--rate={rate}");
        let out = run(&["publish", &arg], vars.clone()).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "--rate {rate}: {}",
            stderr(&out)
        );
        assert!(one_line(&out).contains("--rate"), "{}", stderr(&out));
    }
    assert_eq!(env.ready(&env.queue()).await, 4, "nothing more published");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_toml_key_stops_every_command_with_exit_2() {
    let env = TestEnv::new("toml-keys").await;
    let path = std::env::temp_dir().join(format!("{}.toml", env.prefix));
    std::fs::write(
        &path,
        "notifier_batch_max = 5\nNOTIFIER_RATE_PER_SEC = 3\nnotifer_prefetch = 10\n",
    )
    .unwrap();
    let vars = with(broker_vars(&env), "NOTIFIER_CONFIG", path.to_str().unwrap());
    for args in [&["publish"][..], &["run"][..]] {
        let out = run(args, vars.clone()).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let line = one_line(&out);
        assert!(
            line.contains("NOTIFIER_CONFIG")
                && line.contains("NOTIFIER_RATE_PER_SEC")
                && line.contains("notifer_prefetch"),
            "{line}"
        );
    }
    let _ = std::fs::remove_file(path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_and_a_mismatched_queue_each_say_so_in_one_line() {
    let env = TestEnv::new("reasons").await;
    let url = common::amqp_url();
    let wrong = url.replacen("guest:guest@", "guest:not-the-password@", 1);
    assert_ne!(url, wrong, "the test broker uses guest:guest");
    let vars = with(broker_vars(&env), "AMQP_URL", &wrong);
    for args in [&["status"][..], &["publish"][..], &["dlq", "list"][..]] {
        let out = run(args, vars.clone()).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let line = one_line(&out);
        assert!(
            line.contains("refused the login") && line.contains("AMQP_URL"),
            "{line}"
        );
        assert!(!line.contains("not-the-password"), "{line}");
    }

    // The work queue exists as a classic queue: `publish` declares the
    // topology and the broker answers 406.
    declare_classic_work_queue(&env).await;
    let out = run(&["publish"], broker_vars(&env)).await;
    assert_eq!(out.status.code(), Some(1));
    let line = one_line(&out);
    assert!(
        line.contains("other arguments") && line.contains(&env.queue()),
        "{line}"
    );
    assert!(!line.contains("connection was lost"), "{line}");

    // No broker at all: how to start one.
    let closed = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port());
    let out = run(&["demo"], vec![("AMQP_URL".into(), closed)]).await;
    assert_eq!(out.status.code(), Some(1));
    let line = one_line(&out);
    assert!(line.contains("scripts/broker.sh"), "{line}");
    env.cleanup().await;
}

/// Reads a child's stderr lines until one matches, or the deadline.
fn wait_for_line(
    lines: &std::sync::mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    want: impl Fn(&str) -> bool,
) -> Option<String> {
    let deadline = std::time::Instant::now() + WAIT;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if want(&line) {
                    return Some(line);
                }
            }
            Err(_) => return None,
        }
    }
    None
}

fn spawn_run(
    vars: Vec<(String, String)>,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wechat-notifier"))
        .arg("run")
        .env_clear()
        .envs(vars)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_says_where_it_listens_and_what_it_runs_with() {
    let env = TestEnv::new("startup").await;
    let vars = with(env.vars.clone(), "NOTIFIER_METRICS_ADDR", "127.0.0.1:0");
    let (mut child, lines) = spawn_run(vars);
    let (found, seen) = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let line = wait_for_line(&lines, &mut seen, |l| {
            l.starts_with("wechat-notifier: http listening on ")
        });
        (line, seen)
    })
    .await
    .unwrap();
    let line = found.unwrap_or_else(|| panic!("no listening line: {seen:?}"));
    let addr = line.trim_start_matches("wechat-notifier: http listening on ");
    let health = reqwest::get(format!("http://{addr}/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let _ = child.kill();
    let _ = child.wait();
    let startup = seen
        .iter()
        .find(|l| l.contains("starting:"))
        .unwrap_or_else(|| panic!("a start-up line: {seen:?}"));
    for want in [
        env!("CARGO_PKG_VERSION"),
        "cloud_function",
        &env.queue(),
        &env.dead_queue(),
        "rate 200/s",
        "prefetch 2000",
    ] {
        assert!(startup.contains(want), "{want} in {startup}");
    }
    assert!(!startup.contains(&env.sim.config().secret));
    assert!(
        seen.iter().all(|l| !l.contains('\x1b')),
        "no colour: {seen:?}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_a_broker_keeps_trying_and_says_how_to_start_one() {
    let env = TestEnv::new("nobroker").await;
    let closed = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port());
    let vars = with(
        with(env.vars.clone(), "AMQP_URL", &closed),
        "NOTIFIER_METRICS_ADDR",
        "127.0.0.1:0",
    );
    let (mut child, lines) = spawn_run(vars);
    let (found, seen) = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let line = wait_for_line(&lines, &mut seen, |l| l.contains("reconnecting"));
        (line, seen)
    })
    .await
    .unwrap();
    let still_running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let line = found.unwrap_or_else(|| panic!("a reconnect warning: {seen:?}"));
    assert!(line.contains("scripts/broker.sh"), "{line}");
    assert!(still_running, "a broker outage does not stop the service");
}

/// A stand-in for RabbitMQ's management API: answers queue and exchange
/// records for `queues` (name -> record), and requires basic auth ops:secret.
async fn fake_management(records: BTreeMap<String, Value>) -> String {
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::get;
    use axum::Json;
    type Shared = std::sync::Arc<BTreeMap<String, Value>>;
    async fn record(
        State(records): State<Shared>,
        headers: HeaderMap,
        Path((_kind, vhost, name)): Path<(String, String, String)>,
    ) -> Result<Json<Value>, StatusCode> {
        // "ops:secret", base64.
        if headers.get("authorization").and_then(|v| v.to_str().ok())
            != Some("Basic b3BzOnNlY3JldA==")
        {
            return Err(StatusCode::UNAUTHORIZED);
        }
        assert_eq!(vhost, "/", "the vhost of AMQP_URL");
        records
            .get(&name)
            .cloned()
            .map(Json)
            .ok_or(StatusCode::NOT_FOUND)
    }
    let app = axum::Router::new()
        .route(
            "/api/overview",
            get(|| async { Json(serde_json::json!({})) }),
        )
        .route("/api/{kind}/{vhost}/{name}", get(record))
        .with_state(std::sync::Arc::new(records));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://ops:secret@{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_management_api_status_names_the_active_replica_and_check_compares_arguments() {
    let env = TestEnv::new("mgmt").await;
    env.declare().await;
    let s = env.settings();
    let consumer = |tag: &str, active: bool| {
        serde_json::json!({"consumer_tag": tag, "active": active,
            "activity_status": if active { "single_active" } else { "waiting" },
            "channel_details": {"connection_name": tag}})
    };
    let mut records = BTreeMap::new();
    records.insert(
        s.exchange.clone(),
        serde_json::json!({"type": "topic", "durable": true}),
    );
    records.insert(
        s.queue.clone(),
        serde_json::json!({
            "arguments": {"x-queue-type": "quorum", "x-single-active-consumer": true,
                          "x-dead-letter-routing-key": s.dead_queue},
            "consumer_details": [consumer("wechat-notifier-a-7-0001", false),
                                 consumer("wechat-notifier-b-9-0002", true)]
        }),
    );
    // The dead-letter queue as the management API would show a classic queue.
    records.insert(
        s.dead_queue.clone(),
        serde_json::json!({"arguments": {}, "consumer_details": []}),
    );
    for d in &s.retry_delays {
        records.insert(
            s.retry_queue(*d),
            serde_json::json!({"arguments": {"x-queue-type": "quorum",
                "x-message-ttl": d.as_millis() as u64, "x-dead-letter-routing-key": s.queue}}),
        );
    }
    let url = fake_management(records).await;
    let vars = with(env.vars.clone(), "NOTIFIER_MANAGEMENT_URL", &url);

    let out = run(&["status"], vars.clone()).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("active replica: wechat-notifier-b-9-0002"),
        "{}",
        stdout(&out)
    );
    assert!(!stdout(&out).contains("secret"));

    let out = run(&["check"], vars).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let line = one_line(&out);
    assert!(
        line.contains(&format!("dead-letter queue {} mismatched", s.dead_queue))
            && line.contains("x-queue-type"),
        "{line}"
    );
    assert!(
        !line.contains("work queue"),
        "only the differing queue: {line}"
    );
    assert!(!line.contains("secret"), "{line}");

    // A management URL that does not answer is a problem, not a silent skip.
    let closed = format!("http://ops:secret@127.0.0.1:{}", closed_port());
    let out = run(
        &["check"],
        with(env.vars.clone(), "NOTIFIER_MANAGEMENT_URL", &closed),
    )
    .await;
    let line = one_line(&out);
    assert!(line.contains("NOTIFIER_MANAGEMENT_URL"), "{line}");
    assert!(!line.contains("secret"), "{line}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_names_a_mismatched_queue_when_it_retries() {
    let env = TestEnv::new("run-406").await;
    declare_classic_work_queue(&env).await;
    let vars = with(env.vars.clone(), "NOTIFIER_METRICS_ADDR", "127.0.0.1:0");
    let (mut child, lines) = spawn_run(vars);
    let (found, seen) = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let line = wait_for_line(&lines, &mut seen, |l| l.contains("reconnecting"));
        (line, seen)
    })
    .await
    .unwrap();
    // /readyz gives the same reason, not "broker connection is down".
    let http = seen
        .iter()
        .find_map(|l| l.split("http listening on ").nth(1))
        .map(|a| a.trim().to_string())
        .expect("the listening line");
    let readyz = reqwest::get(format!("http://{http}/readyz")).await.unwrap();
    assert_eq!(readyz.status().as_u16(), 503);
    let reason = readyz.text().await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let line = found.unwrap_or_else(|| panic!("a retry warning: {seen:?}"));
    assert!(
        line.contains("other arguments") && line.contains(&env.queue()),
        "{line}"
    );
    assert!(!line.contains("connection was lost"), "{line}");
    assert!(
        reason.contains("other arguments") && reason.contains(&env.queue()),
        "{reason}"
    );
    env.cleanup().await;
}

#[test]
fn the_example_configuration_documents_every_setting_and_parses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let text = std::fs::read_to_string(path).unwrap();
    for v in VARIABLES.iter().filter(|v| v.name != "NOTIFIER_CONFIG") {
        let key = v.name.to_ascii_lowercase();
        assert!(
            text.lines().any(|l| {
                let l = l.trim_start_matches('#').trim_start();
                l.starts_with(&format!("{key} ="))
            }),
            "config.example.toml documents {key}"
        );
    }
    // The real parser, as `run` would read it (the secret from the environment,
    // which wins over the file's example path).
    let settings = Settings::from_pairs([
        ("NOTIFIER_CONFIG", path),
        ("WECHAT_APPSECRET", "from-the-environment"),
    ])
    .unwrap_or_else(|e| panic!("config.example.toml: {e}"));
    assert_eq!(settings.appid, "wx0123456789abcdef");
    assert_eq!(settings.queue, "wechat-notifier.customer-assigned");
    // Its template table is valid too, in the direct mode.
    let direct = Settings::from_pairs([
        ("NOTIFIER_CONFIG", path),
        ("WECHAT_APPSECRET", "x"),
        ("WECHAT_DELIVERY_MODE", "subscribe_message"),
    ])
    .unwrap_or_else(|e| panic!("config.example.toml in direct mode: {e}"));
    assert_eq!(direct.template.unwrap().data.len(), 4);
    // Broker-only commands read it too.
    Source::from_pairs([("NOTIFIER_CONFIG", path)]).unwrap();
}

#[test]
fn no_tracked_file_names_a_path_outside_the_repository() {
    let root = env!("CARGO_MANIFEST_DIR");
    let files = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root)
        .output()
        .expect("git runs");
    // Built from pieces so this file does not match itself.
    let needles = [["..", "/shared"].concat(), ["shared", "/contract"].concat()];
    let mut offenders = Vec::new();
    let listed = String::from_utf8_lossy(&files.stdout).into_owned();
    let names: Vec<&str> = listed.split('\0').filter(|n| !n.is_empty()).collect();
    assert!(names.len() > 20, "git ls-files lists the repository");
    for name in names {
        let Ok(bytes) = std::fs::read(format!("{root}/{name}")) else {
            continue; // deleted in the worktree
        };
        let text = String::from_utf8_lossy(&bytes);
        for n in &needles {
            if text.contains(n.as_str()) {
                offenders.push(format!("{name} names {n}"));
            }
        }
    }
    assert!(offenders.is_empty(), "{offenders:?}");
}

#[test]
fn help_shows_every_settings_environment_variable() {
    for args in [
        &["--help"][..],
        &["run", "--help"][..],
        &["dlq", "replay", "--help"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_wechat-notifier"))
            .args(args)
            .env_clear()
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let text = stdout(&out);
        for v in VARIABLES {
            assert!(text.contains(v.name), "{args:?}: {} missing", v.name);
        }
    }
}
