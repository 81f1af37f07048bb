//! A held configuration fault and the rate budget around it, as WeChat sees
//! them: a notice accepted once, retries spaced by `NOTIFIER_CONFIG_RETRY`
//! while the fault stands (never a burst of the held windows), and never more
//! than R + B calls in any second, across a token fetch and a takeover.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{eventually, ids, metric, most_in_any_window, readyz, wait_until, TestEnv};
use serde_json::{json, Value};
use wechat_notifier::broker::{header_str, headers};
use wechat_notifier::sim::{Api, Call, Fault, FaultAction};

const WAIT: Duration = Duration::from_secs(30);

fn on(api: Api, action: FaultAction, times: Option<u32>) -> Fault {
    Fault {
        api: Some(api),
        user_id: None,
        action,
        times,
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

/// The shortest gap (ms) between two notice calls among `calls`.
fn shortest_gap(calls: &[Call]) -> f64 {
    let mut at: Vec<f64> = calls.iter().map(|c| c.at_ms).collect();
    at.sort_by(f64::total_cmp);
    at.windows(2)
        .map(|w| w[1] - w[0])
        .fold(f64::INFINITY, f64::min)
}

async fn wait_for_fault(http: &str) {
    assert!(
        eventually(WAIT, || async {
            let (status, text) = readyz(http).await;
            status == 503 && text.contains("configuration fault")
        })
        .await,
        "the fault is held: {:?}",
        readyz(http).await
    );
}

/// A fault found on a real send, then the consuming connection lost: the new
/// session sends the held notice again before it consumes, and when WeChat
/// accepts it, its events are acked as they come back from the queue, not
/// sent again in a new window: no event reaches WeChat twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reconnect_during_a_held_fault_each_event_is_accepted_once() {
    let mut env = TestEnv::new("held-reconnect").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.set("NOTIFIER_CONFIG_RETRY", "300ms");
    env.declare().await;
    let svc = env.start_ready().await;
    // Only a real send finds it (the function's own template check).
    env.sim.push_fault(on(
        Api::InvokeCloudFunction,
        FaultAction::NoticeFunctionErrcode(85088),
        None,
    ));
    let events = env.bulk(3, 1, false);
    env.publish(&events).await;
    wait_for_fault(&svc.http).await;

    assert!(env.close_consuming_connection(&env.queue()));
    // The old session is gone once its deliveries are back in the queue.
    assert!(
        eventually(WAIT, || async {
            env.queue_state(&env.queue()).await.0 >= 3
        })
        .await,
        "the held deliveries returned to the queue"
    );
    env.sim.clear_faults();

    let want = ids(&events);
    assert!(
        eventually(WAIT, || async {
            want.iter()
                .all(|id| delivered_counts(&env).contains_key(id))
                && env.queue_state(&env.queue()).await.0 == 0
                && metric(&svc.http, "wechat_notifier_unacked_deliveries", "").await == 0.0
        })
        .await,
        "delivered and acked once fixed"
    );
    let counts = delivered_counts(&env);
    assert!(
        counts.values().all(|n| *n == 1),
        "each event accepted once: {counts:?}"
    );
    assert_eq!(readyz(&svc.http).await.0, 200);
    svc.stop().await;
    env.cleanup().await;
}

/// A transient answer (here a 500) to the held notice's retry says nothing
/// of the settings: the fault stays held and the replica does not consume, so
/// the held windows never all call at once; only the one retry goes, every
/// `NOTIFIER_CONFIG_RETRY`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_answer_to_the_retried_notice_does_not_end_a_held_fault() {
    const RETRY_MS: f64 = 600.0;
    let mut env = TestEnv::new("held-transient").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.set("NOTIFIER_CONFIG_RETRY", "600ms");
    // The held windows cannot be sent: the stop gives up on them quickly.
    env.set("NOTIFIER_SHUTDOWN_GRACE", "1s");
    env.declare().await;
    let svc = env.start_ready().await;
    let held = on(
        Api::InvokeCloudFunction,
        FaultAction::NoticeFunctionErrcode(85088),
        None,
    );
    env.sim.push_fault(held.clone());
    let events = env.bulk(5, 5, false);
    env.publish(&events).await;
    wait_for_fault(&svc.http).await;

    // The session ends; the next answer to a notice is a 500, then the fault again.
    assert!(env.close_consuming_connection(&env.queue()));
    assert!(
        eventually(WAIT, || async {
            env.queue_state(&env.queue()).await.0 >= 5
        })
        .await,
        "the held deliveries returned to the queue"
    );
    let before = env.sim.notice_calls().len();
    // A 500 once per assignee (whichever notice is retried first meets one;
    // the start-up probe, which names no assignee, does not).
    let mut faults: Vec<Fault> = events
        .iter()
        .map(|e| common::fault_for(e, FaultAction::Http(500), Some(1)))
        .collect();
    faults.push(held);
    env.sim.replace_faults(faults);
    assert!(
        wait_until(WAIT, || env.sim.notice_calls().len() >= before + 4).await,
        "the held notice is retried"
    );
    let after: Vec<Call> = env.sim.notice_calls().split_off(before);
    assert!(
        after.iter().any(|c| c.http_status == 500),
        "the retry met the 500"
    );
    let gap = shortest_gap(&after);
    assert!(
        gap >= RETRY_MS * 0.8,
        "one retry every NOTIFIER_CONFIG_RETRY, never the held windows at once: gap {gap} ms"
    );
    let (status, text) = readyz(&svc.http).await;
    assert!(
        status == 503 && text.contains("configuration fault"),
        "{status} {text}"
    );
    assert_eq!(
        env.ready(&env.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    svc.stop().await;
    env.cleanup().await;
}

/// The fault found by a token fetch (the AppSecret rotated, the cached token
/// rejected): only the retried notice fetches again, once every
/// `NOTIFIER_CONFIG_RETRY`; the other held windows wait without asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_the_token_fetch_finds_is_retried_once_per_config_retry_not_by_every_window() {
    let mut env = TestEnv::new("held-token").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.set("NOTIFIER_CONFIG_RETRY", "1s");
    env.set("NOTIFIER_SHUTDOWN_GRACE", "1s");
    env.declare().await;
    let svc = env.start_ready().await;
    // Every fetch from now on answers 40125 (invalid AppSecret), and the
    // token in hand is rejected at its next use.
    env.sim
        .push_fault(on(Api::StableToken, FaultAction::Errcode(40125), None));
    env.sim
        .push_fault(on(Api::Token, FaultAction::Errcode(40125), None));
    env.sim.expire_tokens();
    let fetches = || {
        env.sim
            .calls()
            .iter()
            .filter(|c| matches!(c.api, Api::StableToken | Api::Token))
            .count()
    };
    let events = env.bulk(8, 8, false);
    env.publish(&events).await;
    wait_for_fault(&svc.http).await;
    // Windows that close while the fault is held: no token is cached now.
    let mut later = env.bulk(8, 8, false);
    for e in &mut later {
        let user = format!("later-{}", e["assignee"]["user_id"].as_str().unwrap());
        e["assignee"]["user_id"] = json!(user);
    }
    env.publish(&later).await;
    let at_hold = fetches();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let in_3s = fetches() - at_hold;
    assert!(
        in_3s <= 5,
        "{in_3s} token fetches in 3 s with NOTIFIER_CONFIG_RETRY=1s (16 windows held)"
    );
    assert!(in_3s >= 1, "the retried notice still fetches");
    assert!(env.sim.delivered().is_empty());
    svc.stop().await;
    env.cleanup().await;
}

/// In the direct mode an event without an openid is judged before any call:
/// it is dead-lettered `no_openid`, and it never ends a held fault (only
/// WeChat's answer may), even when it would have been the notice retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_no_openid_verdict_does_not_end_a_held_fault() {
    const RETRY_MS: f64 = 500.0;
    let mut env = TestEnv::new("held-no-openid").await;
    env.set("WECHAT_DELIVERY_MODE", "subscribe_message");
    env.set("WECHAT_TEMPLATE_ID", "tpl-customer-assigned");
    env.set(
        "WECHAT_TEMPLATE_DATA",
        r#"{"thing1":"{customer_names}","number2":"{customer_count}"}"#,
    );
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.set("NOTIFIER_CONFIG_RETRY", "500ms");
    env.set("NOTIFIER_MAX_AGE", "4s");
    env.set("NOTIFIER_SHUTDOWN_GRACE", "1s");
    env.declare().await;
    let svc = env.start_ready().await;
    env.sim
        .push_fault(on(Api::SubscribeSend, FaultAction::Errcode(40164), None));
    // The first notice finds the fault and is the one retried until it expires.
    let mut first = env.bulk(1, 1, false);
    let occurred = chrono::Local::now().fixed_offset() - chrono::Duration::milliseconds(2500);
    first[0]["occurred_at"] = json!(occurred.to_rfc3339());
    env.publish(&first).await;
    wait_for_fault(&svc.http).await;
    // Then one without an openid, and others that wait for the fault.
    let mut no_openid = env.bulk(1, 1, false);
    no_openid[0]["assignee"]["openid"] = Value::Null;
    env.publish(&no_openid).await;
    let waiting = env.bulk(4, 4, false);
    env.publish(&waiting).await;

    assert!(
        eventually(WAIT, || async { env.ready(&env.dead_queue()).await >= 2 }).await,
        "the expired notice and the one without an openid are dead-lettered"
    );
    let calls_then = env.sim.notice_calls().len();
    assert!(
        wait_until(WAIT, || env.sim.notice_calls().len() >= calls_then + 3).await,
        "the held fault is still retried"
    );
    let calls = env.sim.notice_calls();
    let gap = shortest_gap(&calls);
    assert!(
        gap >= RETRY_MS * 0.8,
        "only the one retry while the fault stands, never the waiting windows at once: gap {gap} ms"
    );
    let (status, text) = readyz(&svc.http).await;
    assert!(
        status == 503 && text.contains("configuration fault"),
        "{status} {text}"
    );
    let mut reasons: Vec<String> = env
        .drain(&env.dead_queue())
        .await
        .iter()
        .filter_map(|(_, p)| header_str(p, headers::REASON))
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["expired", "no_openid"]);
    svc.stop().await;
    env.cleanup().await;
}

/// A token fetch that takes 3 s (after WeChat called the token invalid) holds
/// no rate slot: the calls waiting for the token go out evenly spaced after
/// it, never all at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_token_fetch_does_not_let_the_calls_waiting_for_it_burst() {
    const RATE: usize = 20;
    const BURST: usize = 1;
    let mut env = TestEnv::new("token-burst").await;
    env.set("NOTIFIER_RATE_PER_SEC", &RATE.to_string());
    env.set("NOTIFIER_RATE_BURST", &BURST.to_string());
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.declare().await;
    let svc = env.start_service().await;
    assert!(
        eventually(WAIT, || async { readyz(&svc.http).await.0 == 200 }).await,
        "ready (its first token fetched)"
    );
    env.sim
        .push_fault(on(Api::StableToken, FaultAction::DelayMs(3000), Some(1)));
    env.sim.push_fault(on(
        Api::InvokeCloudFunction,
        FaultAction::Errcode(40001),
        Some(1),
    ));
    let events = env.bulk(80, 80, false);
    env.publish(&events).await;
    let want = ids(&events);
    assert!(
        wait_until(WAIT, || want.is_subset(&env.notified_ids())).await,
        "everything delivered"
    );
    let mut times: Vec<f64> = env.sim.notice_calls().iter().map(|c| c.at_ms).collect();
    times.sort_by(f64::total_cmp);
    let most = most_in_any_window(&times, 1000.0);
    assert!(
        most <= RATE + BURST,
        "at most R + B = {} calls in any 1 s, saw {most}",
        RATE + BURST
    );
    svc.stop().await;
    env.cleanup().await;
}

/// A standby's bucket fills while it waits. When it takes over from a replica
/// that was killed right after a burst, it must not add a burst of its own:
/// the fleet stays within R·T + B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_takes_over_adds_no_burst_of_its_own() {
    const RATE: usize = 4;
    const BURST: usize = 5;
    let mut env = TestEnv::new("takeover-burst").await;
    env.set("NOTIFIER_RATE_PER_SEC", &RATE.to_string());
    env.set("NOTIFIER_RATE_BURST", &BURST.to_string());
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.declare().await;
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
    // Both buckets fill (B / R = 1.25 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let events = env.bulk(12, 12, false);
    env.publish(&events).await;
    assert!(
        wait_until(WAIT, || env.sim.notice_calls().len() >= BURST).await,
        "the active replica spends its burst"
    );
    active.kill9();
    let want = ids(&events);
    assert!(
        wait_until(WAIT, || want.is_subset(&env.notified_ids())).await,
        "the standby delivers the rest"
    );
    let mut times: Vec<f64> = env.sim.notice_calls().iter().map(|c| c.at_ms).collect();
    times.sort_by(f64::total_cmp);
    let most = most_in_any_window(&times, 1000.0);
    assert!(
        most <= RATE + BURST,
        "at most R + B = {} calls in any 1 s across the takeover, saw {most}",
        RATE + BURST
    );
    drop(standby);
    env.cleanup().await;
}

/// The held notice's events belong to whichever replica consumes the queue.
/// The active replica holds a fault found on a send; its connection is lost
/// and the broker gives the queue to the standby, which meets the same fault
/// with the same events. The first replica then must not re-send its held
/// notice beside the standby: once fixed, each event is accepted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_the_queue_does_not_re_send_the_events_another_now_holds() {
    let mut env = TestEnv::new("held-handover").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.set("NOTIFIER_CONFIG_RETRY", "300ms");
    env.set("NOTIFIER_SHUTDOWN_GRACE", "1s");
    env.declare().await;
    let first = env.start_service().await;
    assert!(
        eventually(WAIT, || async { readyz(&first.http).await.0 == 200 }).await,
        "the first replica is ready (and active)"
    );
    env.sim.push_fault(on(
        Api::InvokeCloudFunction,
        FaultAction::NoticeFunctionErrcode(85088),
        None,
    ));
    let events = env.bulk(3, 1, false);
    env.publish(&events).await;
    wait_for_fault(&first.http).await;
    let second = env.start_service().await;
    assert!(
        eventually(WAIT, || async { readyz(&second.http).await.0 == 200 }).await,
        "the second replica is ready (standby)"
    );

    // The first replica's connection goes; the standby gets the events and the fault.
    assert!(env.close_consuming_connection(&env.queue()));
    wait_for_fault(&second.http).await;
    env.sim.clear_faults();

    let want = ids(&events);
    assert!(
        eventually(WAIT, || async {
            want.iter()
                .all(|id| delivered_counts(&env).contains_key(id))
                && readyz(&first.http).await.0 == 200
                && readyz(&second.http).await.0 == 200
                && env.queue_state(&env.queue()).await.0 == 0
                && metric(&second.http, "wechat_notifier_unacked_deliveries", "").await == 0.0
        })
        .await,
        "delivered once fixed, both replicas ready"
    );
    let counts = delivered_counts(&env);
    assert!(
        counts.values().all(|n| *n == 1),
        "each event accepted once: {counts:?}"
    );
    first.stop().await;
    second.stop().await;
    env.cleanup().await;
}
