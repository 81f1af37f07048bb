//! The promises off the happy path: a configuration fault that only real
//! sends find is held (no churn, no dead letters), the handover on SIGTERM
//! keeps the fleet inside its budget, a copy that cannot be parked does not
//! cost its original, and hostile values from the network crash nothing.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use serde_json::Value;
use tokio::time::Instant;

use common::{eventually, fault_for, ids, metric, most_in_any_window, wait_until, TestEnv};
use wechat_notifier::broker;
use wechat_notifier::sim::{Fault, FaultAction, SimConfig};

const WAIT: Duration = Duration::from_secs(20);

async fn readyz(http: &str) -> (u16, String) {
    match reqwest::get(format!("http://{http}/readyz")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// How often each event id was covered by a notice WeChat accepted.
fn delivered_counts(env: &TestEnv) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for n in env.sim.delivered() {
        for id in n["event_ids"].as_array().into_iter().flatten() {
            *counts.entry(id.as_str().unwrap().to_string()).or_default() += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_level_85088_is_held_across_25_retries_then_each_event_is_delivered_once() {
    let mut env = TestEnv::new("hold").await;
    // Short, so 25 retries take about 5 s; what is proved does not depend on the length.
    env.set("NOTIFIER_CONFIG_RETRY", "200ms");
    let svc = env.start_service().await;
    assert!(
        eventually(WAIT, || async { readyz(&svc.http).await.0 == 200 }).await,
        "ready before the fault"
    );
    // The start-up probe passes; every real send is refused by the function.
    env.sim.push_fault(Fault {
        api: None,
        user_id: None,
        action: FaultAction::NoticeFunctionErrcode(85088),
        times: None,
    });
    let events = env.bulk(6, 2, false);
    env.publish(&events).await;

    // Arrival times (ms) of the notice calls the function refused.
    let refused = |env: &TestEnv| -> Vec<f64> {
        let mut at: Vec<f64> = env
            .sim
            .notice_calls()
            .iter()
            .filter(|c| c.errcode == 85088)
            .map(|c| c.at_ms)
            .collect();
        at.sort_by(f64::total_cmp);
        at
    };
    assert!(
        wait_until(WAIT, || !refused(&env).is_empty()).await,
        "the fault is met"
    );
    let held_from = Instant::now();
    // The two notices' first sends may both meet the fault; from then on one
    // notice retries for both. Not ready, with the reason, at every look while
    // 25 retries go out; nothing returns to the queue (no churn) and nothing
    // is dead-lettered.
    while refused(&env).len() < 27 {
        let (status, text) = readyz(&svc.http).await;
        assert_eq!(status, 503, "not ready during the fault: {text}");
        assert!(text.contains("configuration fault"), "{text}");
        assert!(
            held_from.elapsed() < Duration::from_secs(12),
            "retries go out every 200ms"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at = refused(&env);
    let retries = &at[2..];
    let held_for = (at[at.len() - 1] - at[0]) / 1000.0;
    assert!(
        (at.len() - 1) as f64 <= held_for / 0.2 + 2.0,
        "one retry every NOTIFIER_CONFIG_RETRY, not more: {} in {held_for:.1}s",
        at.len() - 1
    );
    // Each retry waits out the setting after the previous answer (a margin
    // for the arrival times' jitter on a loaded machine).
    let closest = retries
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(f64::INFINITY, f64::min);
    assert!(
        closest >= 150.0,
        "no two retries closer than NOTIFIER_CONFIG_RETRY: {closest:.0} ms"
    );
    assert_eq!(
        env.ready(&env.queue()).await,
        0,
        "nothing returned to the queue"
    );
    assert_eq!(
        env.ready(&env.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    assert_eq!(
        metric(&svc.http, "wechat_notifier_unacked_deliveries", "").await,
        6.0,
        "every delivery held"
    );
    assert_eq!(
        metric(&svc.http, "wechat_notifier_config_fault", "").await,
        1.0
    );

    // Fixed: every event delivered exactly once, ready again, queues empty.
    env.sim.clear_faults();
    let want = ids(&events);
    assert!(
        wait_until(WAIT, || want
            .iter()
            .all(|id| delivered_counts(&env).contains_key(id)))
        .await,
        "delivered once the function is fixed"
    );
    assert!(delivered_counts(&env).values().all(|n| *n == 1));
    assert_eq!(readyz(&svc.http).await.0, 200);
    assert!(
        eventually(WAIT, || async {
            metric(&svc.http, "wechat_notifier_unacked_deliveries", "").await == 0.0
        })
        .await,
        "every delivery acked"
    );
    assert_eq!(env.ready(&env.queue()).await, 0);
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_queue_over_only_after_the_drain_within_the_budget() {
    const RATE: usize = 10;
    const BURST: usize = 2;
    let mut env = TestEnv::new("handover").await;
    env.set("NOTIFIER_RATE_PER_SEC", &RATE.to_string());
    env.set("NOTIFIER_RATE_BURST", &BURST.to_string());
    env.declare().await;
    // Every call takes a while, so two calls for one assignee would overlap.
    env.sim.push_fault(Fault {
        api: Some(wechat_notifier::sim::Api::InvokeCloudFunction),
        user_id: None,
        action: FaultAction::DelayMs(120),
        times: None,
    });
    let mut active = env.spawn_process();
    assert!(
        eventually(WAIT, || async { readyz(&active.http).await.0 == 200 }).await,
        "the first replica is ready (and active)"
    );
    let standby = env.spawn_process();
    assert!(
        eventually(WAIT, || async { readyz(&standby.http).await.0 == 200 }).await,
        "the second replica is ready (standby)"
    );

    // A steady stream faster than the budget (30 events/s over 30 assignees
    // for 1.5 s, so the active replica has a backlog to drain); SIGTERM
    // mid-stream. Both replicas' calls then take 45 / RATE = 4.5 s at least.
    let events = env.bulk(45, 30, false);
    let exchange = env.exchange();
    let stream = wechat_notifier::publish::publish_events(
        &env.channel,
        &exchange,
        &events,
        Some(30.0),
        None,
    );
    let term = async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        active.sigterm();
        // The old replica says it is shutting down while it drains (it
        // answers: its endpoints live until the drain is over).
        assert!(
            eventually(WAIT, || async {
                let (status, text) = readyz(&active.http).await;
                status == 503 && text.contains("shutting down")
            })
            .await,
            "the draining replica answers /readyz 503 \"shutting down\": {:?}",
            readyz(&active.http).await
        );
    };
    let (published, ()) = tokio::join!(stream, term);
    published.unwrap();
    let want = ids(&events);
    assert!(
        wait_until(Duration::from_secs(30), || want
            .is_subset(&env.notified_ids()))
        .await,
        "nothing is lost across the handover"
    );
    let deadline = Instant::now() + WAIT;
    let exit = loop {
        if let Some(status) = active.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the old replica exits after its drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");

    let mut times: Vec<f64> = env.sim.notice_calls().iter().map(|c| c.at_ms).collect();
    times.sort_by(f64::total_cmp);
    let most = most_in_any_window(&times, 1000.0);
    assert!(
        most <= RATE + BURST,
        "at most R + B = {} calls in any 1 s, saw {most}",
        RATE + BURST
    );
    assert_eq!(
        env.sim.overlapping_calls(),
        0,
        "never two calls in flight for one assignee"
    );
    drop(standby);
    env.cleanup().await;
}

/// The status of a GET to `path` at `http`, 0 when nothing answers.
async fn status_of(http: &str, path: &str) -> u16 {
    match reqwest::get(format!("http://{http}{path}")).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoints_keep_answering_during_the_drain_after_sigterm() {
    let env = TestEnv::new("drainhttp").await;
    env.declare().await;
    let mut replica = env.spawn_process();
    assert!(
        eventually(WAIT, || async { readyz(&replica.http).await.0 == 200 }).await,
        "ready"
    );
    // Every notice call is held 5 s (after the start-up probe), so the drain
    // SIGTERM starts lasts that long.
    env.sim.push_fault(Fault {
        api: Some(wechat_notifier::sim::Api::InvokeCloudFunction),
        user_id: None,
        action: FaultAction::DelayMs(5000),
        times: None,
    });
    let events = env.bulk(10, 10, false);
    env.publish(&events).await;
    assert!(
        wait_until(WAIT, || env.sim.in_flight() > 0).await,
        "notice calls are under way"
    );
    replica.sigterm();
    assert!(
        eventually(WAIT, || async {
            let (status, text) = readyz(&replica.http).await;
            status == 503 && text.contains("shutting down")
        })
        .await,
        "/readyz answers 503 \"shutting down\" during the drain: {:?}",
        readyz(&replica.http).await
    );
    assert_eq!(status_of(&replica.http, "/healthz").await, 200, "/healthz");
    assert_eq!(status_of(&replica.http, "/metrics").await, 200, "/metrics");
    assert!(
        metric(&replica.http, "wechat_notifier_unacked_deliveries", "").await > 0.0,
        "/metrics is read while deliveries are held"
    );
    assert!(
        env.sim.in_flight() > 0 && replica.child.try_wait().unwrap().is_none(),
        "all of that during the drain"
    );
    // The drain then ends as before: everything delivered, a clean exit.
    let want = ids(&events);
    assert!(
        wait_until(Duration::from_secs(30), || want
            .is_subset(&env.notified_ids()))
        .await,
        "the drain delivers everything"
    );
    let deadline = Instant::now() + WAIT;
    let exit = loop {
        if let Some(status) = replica.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the replica exits after its drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
    assert_eq!(env.ready(&env.queue()).await, 0, "everything acked");
    env.cleanup().await;
}

/// The broker's id (`<rabbit@host.1.2.3>`) of the connection named `name`
/// (connections are named after the consumer tag, see `broker::connect`).
fn connection_pid(name: &str) -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl runs");
    let quoted = format!("\"{name}\"");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&quoted))
        .and_then(|l| l.split('\t').next())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_during_the_drain_ends_the_drain_s_calls() {
    let env = TestEnv::new("drainloss").await;
    env.declare().await;
    let log = std::env::temp_dir().join(format!("{}.a.log", env.prefix));
    let mut active = env.spawn_process_logging(Some(&log));
    assert!(
        eventually(WAIT, || async { readyz(&active.http).await.0 == 200 }).await,
        "the first replica is ready (and active)"
    );
    let standby = env.spawn_process();
    assert!(
        eventually(WAIT, || async { readyz(&standby.http).await.0 == 200 }).await,
        "the second replica is ready (standby)"
    );
    // The active replica's consuming connection, named after its consumer tag.
    let logs = std::fs::read_to_string(&log).unwrap();
    let tag = logs
        .lines()
        .find(|l| l.contains("consumer registered"))
        .and_then(|l| l.split("consumer_tag=").nth(1))
        .and_then(|t| t.split_whitespace().next())
        .expect("the replica logs its consumer tag")
        .to_string();
    let mut pid = None;
    assert!(
        wait_until(WAIT, || {
            pid = connection_pid(&tag);
            pid.is_some()
        })
        .await,
        "the broker lists the connection {tag}"
    );
    let pid = pid.unwrap();

    // Every call now takes 3 s; four assignees, one window each.
    env.sim.push_fault(Fault {
        api: Some(wechat_notifier::sim::Api::InvokeCloudFunction),
        user_id: None,
        action: FaultAction::DelayMs(3000),
        times: None,
    });
    let events = env.bulk(8, 4, false);
    env.publish(&events).await;
    assert!(
        wait_until(WAIT, || env.sim.in_flight() == 4).await,
        "the active replica has a call in flight for each assignee"
    );
    active.sigterm();
    assert!(
        wait_until(WAIT, || std::fs::read_to_string(&log)
            .unwrap()
            .contains("draining before exit"))
        .await,
        "the active replica is draining"
    );
    // Its connection dies mid-drain: the standby gets the same messages.
    let before_close = env.sim.calls().len();
    let closed = std::process::Command::new("rabbitmqctl")
        .args(["close_connection", &pid, "test"])
        .output()
        .unwrap();
    assert!(closed.status.success(), "{closed:?}");

    let want = ids(&events);
    assert!(
        wait_until(Duration::from_secs(30), || want
            .is_subset(&env.notified_ids()))
        .await,
        "every event is delivered in the end"
    );
    let exit = tokio::task::spawn_blocking(move || active.wait())
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(
        eventually(WAIT, || env.settled(&standby.http)).await,
        "the queue ends empty"
    );
    // Answered after the close: the standby's calls only. A call the draining
    // replica kept going would be accepted too, a second notice of the same events.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for call in &env.sim.calls()[before_close..] {
        if call.http_status != 200 || call.errcode != 0 {
            continue;
        }
        for id in call.body["notice"]["event_ids"]
            .as_array()
            .into_iter()
            .flatten()
        {
            *counts.entry(id.as_str().unwrap().to_string()).or_default() += 1;
        }
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "events accepted twice after the close: {twice:?}"
    );
    assert_eq!(
        env.sim.overlapping_calls(),
        0,
        "never two calls in flight for one assignee"
    );
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    drop(standby);
    let _ = std::fs::remove_file(&log);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_queue_deleted_while_a_notice_fails_costs_nothing_once_declared_again() {
    let env = TestEnv::new("noretryq").await;
    let svc = env.start_service().await;
    assert!(eventually(WAIT, || async { readyz(&svc.http).await.0 == 200 }).await);
    let events = env.bulk(1, 1, false);
    env.sim
        .push_fault(fault_for(&events[0], FaultAction::Http(500), None));
    // The retry queue goes away at run time (an operator's mistake).
    let retry_queue = env.settings().retry_queue(Duration::from_secs(1));
    env.channel
        .queue_delete(retry_queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    env.publish(&events).await;
    // 1 call + 3 in-memory retries, then the park fails (unroutable): the
    // message must come back for a fifth call, not be acked.
    assert!(
        wait_until(Duration::from_secs(30), || env.sim.notice_calls().len()
            >= 5)
        .await,
        "the message came back after its copy was returned"
    );
    assert_eq!(
        metric(&svc.http, "wechat_notifier_retries_total", "").await,
        0.0
    );
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    let held = metric(&svc.http, "wechat_notifier_unacked_deliveries", "").await;
    let ready = env.ready(&env.queue()).await;
    assert_eq!(
        held + f64::from(ready),
        1.0,
        "the original is still in the work queue"
    );

    env.declare().await;
    env.sim.clear_faults();
    let want = ids(&events);
    assert!(
        wait_until(WAIT, || want.is_subset(&env.notified_ids())).await,
        "delivered once the queue is declared again and WeChat answers"
    );
    assert_eq!(delivered_counts(&env).values().sum::<usize>(), 1);
    assert!(
        eventually(WAIT, || async {
            metric(&svc.http, "wechat_notifier_unacked_deliveries", "").await == 0.0
        })
        .await
    );
    assert_eq!(env.ready(&env.queue()).await, 0);
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    svc.stop().await;
    env.cleanup().await;
}

fn with_attempts(attempts: i64) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-notifier-attempts"),
        AMQPValue::LongLongInt(attempts),
    );
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_expires_in_and_attempts_headers_crash_nothing() {
    let env = TestEnv::with_sim(
        "hostile",
        SimConfig {
            token_ttl: 1 << 62,
            ..SimConfig::default()
        },
    )
    .await;
    env.declare().await;
    let svc = env.start_service().await;
    assert!(eventually(WAIT, || async { readyz(&svc.http).await.0 == 200 }).await);
    let events = env.bulk(2, 2, false);
    // Each notice fails once (the function threw), so its attempts header is used.
    for e in &events {
        env.sim
            .push_fault(fault_for(e, FaultAction::FunctionErrcode(-504002), Some(1)));
    }
    for (e, attempts) in events.iter().zip([i64::MAX, -5]) {
        broker::publish_confirmed(
            &env.channel,
            &env.exchange(),
            broker::ROUTING_KEY,
            &serde_json::to_vec(e).unwrap(),
            with_attempts(attempts),
        )
        .await
        .unwrap();
    }
    // -5 counts as a fresh message: parked once, then delivered.
    let fresh = ids(&events[1..]);
    assert!(
        wait_until(WAIT, || fresh.is_subset(&env.notified_ids())).await,
        "the message with a negative attempts header is retried and delivered"
    );
    // i64::MAX is past any limit: dead-lettered, the count saturated.
    let mut dead = Vec::new();
    let deadline = Instant::now() + WAIT;
    while dead.is_empty() && Instant::now() < deadline {
        dead = env.drain(&env.dead_queue()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead.len(), 1);
    let (body, props) = &dead[0];
    let event: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(event["event_id"], events[0]["event_id"]);
    assert_eq!(
        broker::header_str(props, broker::headers::REASON).as_deref(),
        Some("function_failed")
    );
    assert_eq!(
        broker::header_int(props, broker::headers::ATTEMPTS),
        Some(i64::MAX)
    );
    assert_eq!(readyz(&svc.http).await.0, 200, "the service still runs");
    let http = svc.http.clone();
    svc.stop().await;
    // Its endpoints live as long as the service, not longer.
    assert!(
        eventually(WAIT, || async { status_of(&http, "/healthz").await == 0 }).await,
        "the endpoints stop once run_until_stopped has returned"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_the_start_up_probe_finds_keeps_the_replica_from_consuming() {
    let mut env = TestEnv::new("probefault").await;
    env.set("NOTIFIER_CONFIG_RETRY", "300ms");
    env.declare().await;
    // A wrong function name: every call, the probe included, gets -501000.
    env.sim.push_fault(Fault {
        api: None,
        user_id: None,
        action: FaultAction::Errcode(-501000),
        times: None,
    });
    let events = env.bulk(3, 1, false);
    env.publish(&events).await;
    let svc = env.start_service().await;
    assert!(
        eventually(WAIT, || async {
            let (status, text) = readyz(&svc.http).await;
            status == 503 && text.contains("-501000")
        })
        .await,
        "not ready, naming the fault"
    );
    // Probes only, one every NOTIFIER_CONFIG_RETRY; the events wait in the queue untouched.
    assert!(wait_until(WAIT, || env.sim.calls().len() >= 6).await);
    assert!(env.sim.notice_calls().is_empty(), "no notice is sent");
    assert_eq!(
        env.ready(&env.queue()).await,
        3,
        "nothing is taken from the queue"
    );
    assert_eq!(
        metric(&svc.http, "wechat_notifier_consuming", "").await,
        0.0
    );
    env.sim.clear_faults();
    let want = ids(&events);
    assert!(
        wait_until(WAIT, || want.is_subset(&env.notified_ids())).await,
        "consumes and delivers once the probe passes"
    );
    assert!(eventually(WAIT, || async { readyz(&svc.http).await.0 == 200 }).await);
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    svc.stop().await;
    env.cleanup().await;
}
