//! What an operator sees and uses: settings errors, `check`, `dlq`, `demo`,
//! `/metrics`, and logs that never carry the secret or a token.

use crate::common;

use std::time::Duration;

use common::{eventually, fault_for, ids, wait_until, TestEnv};
use serde_json::Value;
use wechat_notifier::sim::{Api, Fault, FaultAction};

const WAIT: Duration = Duration::from_secs(30);

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn each_bad_setting_exits_2_naming_its_variable() {
    let env = TestEnv::new("cli").await;
    let cases: &[(&str, &str)] = &[
        ("NOTIFIER_RATE_PER_SEC", "fast"),
        ("NOTIFIER_BATCH_MAX", "0"),
        ("NOTIFIER_RETRY_DELAYS", "soon"),
        ("WECHAT_TOKEN_MODE", "magic"),
        ("AMQP_URL", "http://nowhere"),
        ("NOTIFIER_LOG_FORMAT", "xml"),
        ("WECHAT_CALL_TIMEOUT", "soon"),
        ("WECHAT_APPID", ""),
    ];
    for (var, value) in cases {
        let out = env.command(&["run"], &[(var, value)]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{var}={value}: {}",
            stderr(&out)
        );
        let err = stderr(&out);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(var), "{err}");
    }
    let out = env.command(&["run"], &[("WECHAT_APPSECRET", "")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("WECHAT_APPSECRET"));
    assert!(!stderr(&out).contains(&env.sim.config().secret));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exits_1_on_a_wrong_secret_and_0_against_the_simulator() {
    let env = TestEnv::new("check").await;
    // `check` only looks: the topology must exist for it to pass.
    env.declare().await;
    let vars = env.vars.clone();
    let (ok, bad) = tokio::task::spawn_blocking(move || {
        let run = |secret: &str| {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wechat-notifier"));
            cmd.arg("check")
                .env_clear()
                .envs(vars.iter().cloned())
                .env("WECHAT_APPSECRET", secret);
            cmd.output().unwrap()
        };
        (run("sim-secret-do-not-log"), run("wrong-secret-value"))
    })
    .await
    .unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("40125"), "{}", stderr(&bad));
    assert!(!stderr(&bad).contains("wrong-secret-value"));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_lists_and_replays_a_rejected_event_which_is_then_delivered() {
    let mut env = TestEnv::new("dlq").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.declare().await;
    let svc = env.start_service().await;
    let events = env.bulk(1, 1, false);
    env.sim.push_fault(fault_for(
        &events[0],
        FaultAction::FunctionErrcode(43101),
        Some(1),
    ));
    env.publish(&events).await;
    let dead = env.dead_queue();
    assert!(eventually(WAIT, || async { env.ready(&dead).await == 1 }).await);

    let vars = env.vars.clone();
    let run = move |args: Vec<&'static str>| {
        let vars = vars.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_wechat-notifier"))
                .args(args)
                .env_clear()
                .envs(vars)
                .output()
                .unwrap()
        })
    };
    let list = run(vec!["dlq", "list", "--json"]).await.unwrap();
    assert_eq!(list.status.code(), Some(0), "{}", stderr(&list));
    let rows: Vec<Value> = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["reason"], "wechat_rejected");
    assert_eq!(rows[0]["errcode"], 43101);
    assert_eq!(rows[0]["event_id"], events[0]["event_id"]);
    let table = run(vec!["dlq", "list"]).await.unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("wechat_rejected"));

    let purge = run(vec!["dlq", "purge"]).await.unwrap();
    assert_eq!(purge.status.code(), Some(2), "purge without --yes refuses");
    let replay = run(vec!["dlq", "replay", "--reason", "wechat_rejected"])
        .await
        .unwrap();
    assert_eq!(replay.status.code(), Some(0), "{}", stderr(&replay));
    let want = ids(&events);
    assert!(
        wait_until(WAIT, || want.is_subset(&env.notified_ids())).await,
        "the replayed event is delivered"
    );
    assert!(env.drain(&dead).await.is_empty());
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_exits_0_and_prints_one_line_per_assignee() {
    common::broker_lock::share_broker().await;
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_wechat-notifier"))
            .args(["demo", "--customers", "12", "--assignees", "4"])
            .env("AMQP_URL", common::amqp_url())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("WeChat received 4 notice(s) for 12 events"),
        "{text}"
    );
    let rows = text.lines().filter(|l| l.contains("有限公司")).count();
    assert_eq!(rows, 4, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_the_run_implies() {
    let mut env = TestEnv::new("metrics").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.declare().await;
    let svc = env.start_service().await;
    let events = env.bulk(6, 3, true);
    let rejected = env.bulk(1, 1, false);
    env.sim.push_fault(fault_for(
        &rejected[0],
        FaultAction::FunctionErrcode(43101),
        None,
    ));
    env.publish(&events).await;
    env.publish(&rejected).await;
    env.publish_raw(&[b"not json".to_vec()]).await;
    let want = ids(&events);
    assert!(wait_until(WAIT, || want.is_subset(&env.notified_ids())).await);
    let dead = env.dead_queue();
    assert!(eventually(WAIT, || async { env.ready(&dead).await == 2 }).await);
    let m = |name: &'static str, labels: &'static str| common::metric(&svc.http, name, labels);
    assert_eq!(m("wechat_notifier_events_received_total", "").await, 8.0);
    assert_eq!(
        m(
            "wechat_notifier_events_invalid_total",
            "reason=\"not_json\""
        )
        .await,
        1.0
    );
    assert_eq!(
        m("wechat_notifier_notices_sent_total", "summary=\"true\"").await,
        3.0
    );
    assert_eq!(m("wechat_notifier_events_per_notice_count", "").await, 3.0);
    assert_eq!(
        m(
            "wechat_notifier_wechat_calls_total",
            "outcome=\"delivered\""
        )
        .await,
        3.0
    );
    assert_eq!(
        m("wechat_notifier_wechat_calls_total", "errcode=\"43101\"").await,
        1.0
    );
    assert_eq!(
        m(
            "wechat_notifier_dead_letters_total",
            "reason=\"wechat_rejected\""
        )
        .await,
        1.0
    );
    assert_eq!(
        m(
            "wechat_notifier_dead_letters_total",
            "reason=\"invalid_event\""
        )
        .await,
        1.0
    );
    assert_eq!(m("wechat_notifier_consuming", "").await, 1.0);
    assert!(m("wechat_notifier_token_fetches_total", "outcome=\"ok\"").await >= 1.0);
    assert_eq!(m("wechat_notifier_unacked_deliveries", "").await, 0.0);
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stderr_nobody_reads_stops_no_delivery_and_no_ack() {
    let mut env = TestEnv::new("stalledlog").await;
    // Trace logs from every crate: far more than a pipe (64 KiB) and the
    // writer's queue hold.
    env.set("RUST_LOG", "trace");
    env.set("NOTIFIER_RATE_PER_SEC", "2000");
    env.set("NOTIFIER_RATE_BURST", "100");
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.declare().await;
    let (replica, _unread) = env.spawn_process_unread_stderr();
    assert!(
        eventually(WAIT, || async {
            reqwest::get(format!("http://{}/readyz", replica.http))
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await,
        "ready"
    );
    let events = env.bulk(3000, 1000, false);
    env.publish(&events).await;
    assert!(
        wait_until(WAIT, || env.sim.delivered_event_count() >= events.len()).await,
        "every event reaches WeChat though stderr is full: {} of {}",
        env.sim.delivered_event_count(),
        events.len()
    );
    assert!(ids(&events).is_subset(&env.notified_ids()));
    assert!(
        eventually(WAIT, || async { env.settled(&replica.http).await }).await,
        "the work queue ends empty and nothing is held unacked"
    );
    // What could not be written was dropped, and counted.
    assert!(
        common::metric(&replica.http, "wechat_notifier_log_lines_dropped_total", "").await > 0.0,
        "the dropped log lines are counted"
    );
    drop(replica);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_token_reaches_logs_or_metrics() {
    let mut env = TestEnv::new("leak").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.set("WECHAT_TOKEN_MODE", "classic");
    // Every library's debug logs too (HTTP client, connection pool, AMQP).
    env.set("RUST_LOG", "debug");
    env.set("WECHAT_CALL_TIMEOUT", "1s");
    env.declare().await;
    let log = std::env::temp_dir().join(format!("{}.log", env.prefix));
    let mut replica = env.spawn_process_logging(Some(&log));
    // Faults that put URLs with tokens into errors: a timeout, 5xx, token expiry, rejection.
    env.sim.push_fault(Fault {
        api: Some(Api::InvokeCloudFunction),
        user_id: None,
        action: FaultAction::DelayMs(120_000),
        times: Some(1),
    });
    env.sim.push_fault(Fault {
        api: Some(Api::InvokeCloudFunction),
        user_id: None,
        action: FaultAction::Http(502),
        times: Some(2),
    });
    env.sim.push_fault(Fault {
        api: Some(Api::InvokeCloudFunction),
        user_id: None,
        action: FaultAction::Errcode(42001),
        times: Some(1),
    });
    let events = env.bulk(4, 4, false);
    env.publish(&events).await;
    let want = ids(&events);
    assert!(
        wait_until(Duration::from_secs(60), || want
            .is_subset(&env.notified_ids()))
        .await
    );
    let metrics = common::metric(&replica.http, "wechat_notifier_events_received_total", "").await;
    assert_eq!(metrics, 4.0);
    let metrics_text = reqwest::get(format!("http://{}/metrics", replica.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    replica.sigterm();
    // Waits for the last log line too.
    let _ = tokio::task::spawn_blocking(move || replica.wait()).await;
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("notice delivered"), "the log was captured");
    let secret = env.sim.config().secret.clone();
    let tokens = env.sim.issued_tokens();
    assert!(tokens.len() >= 2, "a token was replaced during the run");
    for needle in std::iter::once(&secret).chain(tokens.iter()) {
        assert!(
            !logs.contains(needle.as_str()),
            "a secret or token is in the logs"
        );
        assert!(
            !metrics_text.contains(needle.as_str()),
            "a secret or token is in the metrics"
        );
    }
    assert!(!logs.contains("access_token="), "no URL with a token");
    let _ = std::fs::remove_file(&log);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_publish_shows_its_progress_and_every_event_arrives() {
    let env = TestEnv::new("progress").await;
    // 24 events at 15/s: over 1.5 s, past the first report (at one second).
    let out = tokio::task::spawn_blocking({
        let vars = env.vars.clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_wechat-notifier"))
                .args(["publish", "--customers", "24", "--assignees", "3"])
                .args(["--rate", "15"])
                .env_clear()
                .envs(vars)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let progress = stderr(&out);
    let lines: Vec<&str> = progress
        .lines()
        .filter(|l| l.starts_with("published: ") && l.contains("/24 events"))
        .collect();
    assert!(!lines.is_empty(), "a progress line on stderr: {progress}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("published 24 event(s)"),
        "the result on stdout"
    );
    let queue = env.queue();
    assert!(eventually(WAIT, || async { env.ready(&queue).await == 24 }).await);
    env.cleanup().await;
}
