//! Every fault the contract names, driven through the simulator against the real
//! broker: the errcode table, an outage, token expiry, a rejected assignee, a
//! killed replica and SIGTERM. (Broker restarts are in `tests/alone`.)

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::{eventually, fault_for, ids, unacked, wait_until, TestEnv};
use serde_json::Value;
use wechat_notifier::broker::{header_int, header_str, headers};
use wechat_notifier::sim::{Api, Fault, FaultAction};

const WAIT: Duration = Duration::from_secs(30);

fn fault(action: FaultAction, times: Option<u32>) -> Fault {
    Fault {
        api: Some(Api::InvokeCloudFunction),
        user_id: None,
        action,
        times,
    }
}

/// Publishes one event whose assignee meets `action` (`times` times, or always).
async fn publish_one_with_fault(
    env: &TestEnv,
    action: FaultAction,
    times: Option<u32>,
) -> Vec<Value> {
    let events = env.bulk(1, 1, false);
    env.sim.push_fault(fault_for(&events[0], action, times));
    env.publish(&events).await;
    events
}

async fn env(tag: &str) -> TestEnv {
    let mut env = TestEnv::new(tag).await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    // A held configuration fault is retried this often: recovery takes a moment.
    env.set("NOTIFIER_CONFIG_RETRY", "200ms");
    env.declare().await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_errors_fetch_a_token_again_and_deliver() {
    let env = env("token").await;
    let svc = env.start_service().await;
    for code in [40001, 40014, 41001, 42001] {
        let events = publish_one_with_fault(&env, FaultAction::Errcode(code), Some(1)).await;
        let want = ids(&events);
        assert!(
            wait_until(WAIT, || want.is_subset(&env.notified_ids())).await,
            "errcode {code}: delivered"
        );
    }
    assert!(env.drain(&env.dead_queue()).await.is_empty());
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_retry_with_backoff_and_deliver() {
    let mut env = env("transient").await;
    env.set("WECHAT_CALL_TIMEOUT", "1s");
    let svc = env.start_service().await;
    let mut actions: Vec<FaultAction> = [-1, -1000, -501001, -501002, -501003, -501004]
        .into_iter()
        .map(FaultAction::Errcode)
        .collect();
    actions.push(FaultAction::FunctionErrcode(43108));
    actions.push(FaultAction::Http(500));
    actions.push(FaultAction::Http(503));
    // Far longer than the client's 1 s timeout, and than this test: the held call
    // never answers while the test runs, so only a retry can deliver the notice.
    actions.push(FaultAction::DelayMs(120_000));
    // One assignee per fault, all at once: each meets its fault on its own.
    let mut cases = Vec::new();
    for action in actions {
        let events = publish_one_with_fault(&env, action.clone(), Some(1)).await;
        cases.push((action, ids(&events)));
    }
    let undelivered = || {
        let notified = env.notified_ids();
        cases
            .iter()
            .filter(|(_, want)| !want.is_subset(&notified))
            .map(|(action, _)| action.clone())
            .collect::<Vec<_>>()
    };
    wait_until(WAIT, || undelivered().is_empty()).await;
    assert_eq!(undelivered(), vec![], "every fault's notice is delivered");
    assert!(
        env.drain(&env.dead_queue()).await.is_empty(),
        "nothing dead-lettered"
    );
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_are_dead_lettered_with_their_errcode() {
    let env = env("rejected").await;
    let svc = env.start_service().await;
    let codes = [40003, 40037, 41030, 43101, 43107, 45168, 47003];
    let mut expected = HashMap::new();
    for code in codes {
        let events = env.bulk(1, 1, false);
        env.sim.push_fault(fault_for(
            &events[0],
            FaultAction::FunctionErrcode(code),
            None,
        ));
        expected.insert(serde_json::to_vec(&events[0]).unwrap(), code);
        env.publish(&events).await;
    }
    let dead_queue = env.dead_queue();
    let n = codes.len() as u32;
    assert!(eventually(WAIT, || async { env.ready(&dead_queue).await == n }).await);
    let dead = env.drain(&dead_queue).await;
    for (body, props) in dead {
        let code = expected[&body];
        assert_eq!(
            header_str(&props, headers::REASON).as_deref(),
            Some("wechat_rejected")
        );
        assert_eq!(header_int(&props, headers::ERRCODE), Some(code));
        assert_eq!(header_int(&props, headers::ATTEMPTS), Some(1));
    }
    assert!(env.sim.delivered().is_empty());
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throwing_function_is_retried_along_the_ladder_then_dead_lettered() {
    let mut env = env("throws").await;
    env.set("NOTIFIER_MAX_ATTEMPTS", "2");
    let svc = env.start_service().await;
    publish_one_with_fault(&env, FaultAction::Errcode(-504002), None).await;
    let dead_queue = env.dead_queue();
    assert!(eventually(WAIT, || async { env.ready(&dead_queue).await == 1 }).await);
    let (_, props) = env.drain(&dead_queue).await.remove(0);
    assert_eq!(
        header_str(&props, headers::REASON).as_deref(),
        Some("function_failed")
    );
    assert_eq!(header_int(&props, headers::ERRCODE), Some(-504002));
    assert_eq!(header_int(&props, headers::ATTEMPTS), Some(2));
    let calls = env.sim.notice_calls();
    let tries: Vec<&wechat_notifier::sim::Call> =
        calls.iter().filter(|c| c.errcode == -504002).collect();
    assert_eq!(tries.len(), 2, "one call per rung");
    assert!(
        tries[1].at_ms - tries[0].at_ms >= 1000.0,
        "the second waited out the 1 s retry queue"
    );
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_quota_parks_the_notice_in_a_retry_queue_then_delivers() {
    let env = env("daily").await;
    let svc = env.start_service().await;
    let events = publish_one_with_fault(&env, FaultAction::Errcode(45009), Some(1)).await;
    let want = ids(&events);
    assert!(wait_until(WAIT, || want.is_subset(&env.notified_ids())).await);
    let calls = env.sim.notice_calls();
    let refused = calls
        .iter()
        .find(|c| c.errcode == 45009)
        .expect("the quota answer");
    let sent = calls
        .iter()
        .find(|c| c.errcode == 0 && c.body.get("notice").is_some())
        .unwrap();
    assert!(
        sent.at_ms - refused.at_ms >= 1000.0,
        "came back through the 1 s retry queue"
    );
    assert!(env.drain(&env.dead_queue()).await.is_empty());
    svc.stop().await;
    env.cleanup().await;
}

// The minute quota's timing (no call before the next minute, one right
// after it, every time) is a unit test with the clock passed in: see
// `dispatch::policy` and `dispatch::budget`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_faults_hold_every_message_dead_letter_nothing_and_recover_when_fixed() {
    let env = env("config").await;
    let svc = env.start_service().await;
    let status = |http: String| async move {
        match reqwest::get(format!("http://{http}/readyz")).await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    };
    let unacked = |http: String| async move {
        common::metric(&http, "wechat_notifier_unacked_deliveries", "").await
    };
    for _ in 0..200 {
        if status(svc.http.clone()).await.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for code in [40125, 40164, -501005, -501000, 85088, -604101] {
        // Found on a real send (the start-up probe passed before).
        env.sim.push_fault(fault(FaultAction::Errcode(code), None));
        let events = env.bulk(2, 1, false);
        env.publish(&events).await;
        let mut reported = (0, String::new());
        for _ in 0..200 {
            reported = status(svc.http.clone()).await;
            if reported.0 == 503 && reported.1.contains("configuration fault") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            reported.1.contains(&format!("errcode {code}")),
            "errcode {code}: /readyz reports the fault: {reported:?}"
        );
        // Held: unacked by the replica, not back in the queue, not dead-lettered.
        assert_eq!(unacked(svc.http.clone()).await, 2.0, "errcode {code}");
        assert_eq!(env.ready(&env.queue()).await, 0, "errcode {code}: no churn");
        assert_eq!(env.ready(&env.dead_queue()).await, 0, "errcode {code}");
        env.sim.clear_faults();
        let want = ids(&events);
        assert!(
            wait_until(WAIT, || want.is_subset(&env.notified_ids())).await,
            "errcode {code}: delivered once fixed"
        );
        assert_eq!(status(svc.http.clone()).await.0, 200, "errcode {code}");
    }
    assert!(env.drain(&env.dead_queue()).await.is_empty());
    svc.stop().await;
    env.cleanup().await;
}

/// Calls covering an event that show it used up its in-memory retries (one
/// call and three retries, ≈4 s), was parked in the 1 s retry queue and came
/// back to fail again.
const PAST_THE_RETRY_QUEUE: usize = 5;

/// The fewest calls WeChat received for any of `events`.
fn fewest_calls_for_an_event(env: &TestEnv, events: &[Value]) -> usize {
    let mut counts: HashMap<String, usize> = ids(events).into_iter().map(|id| (id, 0)).collect();
    for call in env.sim.notice_calls() {
        let covered = call.body["notice"]["event_ids"].as_array().cloned();
        for id in covered.unwrap_or_default() {
            if let Some(n) = id.as_str().and_then(|id| counts.get_mut(id)) {
                *n += 1;
            }
        }
    }
    counts.into_values().min().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_loses_nothing_and_acks_nothing_early() {
    let env = env("outage").await;
    let svc = env.start_service().await;
    let events = env.bulk(20, 5, false);
    env.sim.push_fault(Fault {
        api: Some(Api::InvokeCloudFunction),
        user_id: None,
        action: FaultAction::Http(503),
        times: None,
    });
    env.publish(&events).await;
    // Every message is ready in the work queue or a retry queue, or held
    // unacked by the service: never acked while WeChat fails. Watched until
    // every notice has been through the retry queue and failed again.
    let held = || async {
        env.ready_in_work_and_retry().await + unacked(&svc.http).await.unwrap_or(0) as u32
    };
    let until = tokio::time::Instant::now() + WAIT;
    let mut samples = 0;
    while fewest_calls_for_an_event(&env, &events) < PAST_THE_RETRY_QUEUE {
        assert!(
            tokio::time::Instant::now() < until,
            "some notice never came back from the retry queue to fail again"
        );
        // A message between two queues (a retry copy confirmed, its original
        // not yet acked; a TTL-expired copy on its way back) can make one
        // reading short for a moment; a lost message would stay missing.
        assert!(
            eventually(Duration::from_secs(3), || async { held().await >= 20 }).await,
            "fewer than 20 messages are in the work queue, a retry queue or unacked"
        );
        assert_eq!(
            env.ready(&env.dead_queue()).await,
            0,
            "nothing dead-lettered"
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(samples > 10, "{samples} readings");
    assert!(env.sim.delivered().is_empty());
    assert!(
        common::metric(&svc.http, "wechat_notifier_retries_total", "").await > 0.0,
        "notices were parked in the retry queue during the outage"
    );
    env.sim.clear_faults();
    let want = ids(&events);
    assert!(
        wait_until(WAIT, || want.is_subset(&env.notified_ids())).await,
        "everything delivered afterwards"
    );
    assert!(env.drain(&env.dead_queue()).await.is_empty());
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_mid_run_is_replaced() {
    let env = env("expiry").await;
    let svc = env.start_service().await;
    let first = env.bulk(3, 3, false);
    env.publish(&first).await;
    let want = ids(&first);
    assert!(wait_until(WAIT, || want.is_subset(&env.notified_ids())).await);
    env.sim.expire_tokens();
    let second = env.bulk(3, 3, false);
    env.publish(&second).await;
    let want = ids(&second);
    assert!(wait_until(WAIT, || want.is_subset(&env.notified_ids())).await);
    let calls = env.sim.calls();
    assert!(
        calls.iter().any(|c| c.errcode == 42001),
        "WeChat said the token expired"
    );
    assert!(
        calls.iter().filter(|c| c.api == Api::StableToken).count() >= 2,
        "a new token was fetched"
    );
    assert!(env.drain(&env.dead_queue()).await.is_empty());
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rejected_assignee_does_not_hold_up_the_others() {
    let env = env("oneuser").await;
    let svc = env.start_service().await;
    let events = env.bulk(10, 5, false);
    let bad = events[0]["assignee"]["user_id"].clone();
    env.sim.push_fault(fault_for(
        &events[0],
        FaultAction::FunctionErrcode(43101),
        None,
    ));
    env.publish(&events).await;
    let good: std::collections::BTreeSet<String> = events
        .iter()
        .filter(|e| e["assignee"]["user_id"] != bad)
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        wait_until(WAIT, || env.notified_ids() == good).await,
        "everyone else is notified"
    );
    let dead_queue = env.dead_queue();
    assert!(eventually(WAIT, || async { env.ready(&dead_queue).await == 2 }).await);
    for (body, props) in env.drain(&dead_queue).await {
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["assignee"]["user_id"], bad);
        assert_eq!(header_int(&props, headers::ERRCODE), Some(43101));
    }
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_the_open_window_before_exit() {
    let mut env = env("sigterm").await;
    // A long window, so the only way it closes in time is the shutdown.
    env.set("NOTIFIER_BATCH_WINDOW_MS", "30000");
    env.set("NOTIFIER_BATCH_MAX_WAIT_MS", "60000");
    let mut replica = env.spawn_process();
    let events = env.bulk(3, 1, false);
    env.publish(&events).await;
    let queue = env.queue();
    let http = replica.http.clone();
    assert!(
        eventually(WAIT, || async {
            env.ready(&queue).await == 0 && unacked(&http).await == Some(3)
        })
        .await,
        "the window holds the events"
    );
    assert!(env.sim.delivered().is_empty());
    replica.sigterm();
    let status = tokio::task::spawn_blocking(move || replica.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "clean exit");
    assert_eq!(
        env.notified_ids(),
        ids(&events),
        "sent at shutdown, before the quiet period ended"
    );
    assert_eq!(env.sim.delivered().len(), 1);
    assert_eq!(env.ready(&queue).await, 0, "nothing returned to the queue");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_active_of_three_replicas_loses_nothing() {
    let mut env = env("failover").await;
    // Windows stay open long enough that the kill finds events held unacked.
    env.set("NOTIFIER_BATCH_WINDOW_MS", "1500");
    env.set("NOTIFIER_RATE_PER_SEC", "50");
    let mut replicas: Vec<common::Replica> = (0..3).map(|_| env.spawn_process()).collect();
    let events = env.bulk(300, 30, false);
    let (first, rest) = events.split_at(100);
    env.publish(first).await;
    // Find the active replica: the one that received events.
    let mut active = None;
    for _ in 0..200 {
        for (i, r) in replicas.iter().enumerate() {
            if common::try_metric(&r.http, "wechat_notifier_events_received_total", "")
                .await
                .unwrap_or(0.0)
                > 0.0
            {
                active = Some(i);
            }
        }
        if active.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let active = active.expect("one replica is consuming");
    for (i, chunk) in rest.chunks(50).enumerate() {
        env.publish(chunk).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        if i == 0 {
            replicas[active].kill9();
        }
    }
    let want = ids(&events);
    assert!(
        wait_until(Duration::from_secs(60), || want
            .is_subset(&env.notified_ids()))
        .await,
        "every event notified"
    );
    let covered: usize = env
        .sim
        .delivered()
        .iter()
        .map(|n| n["event_ids"].as_array().unwrap().len())
        .sum();
    eprintln!(
        "failover: {} events, {} notified, {} duplicate notifications",
        want.len(),
        covered,
        covered - want.len()
    );
    assert!(env.drain(&env.dead_queue()).await.is_empty());
    drop(replicas);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_urls_are_tried_in_turn() {
    let mut env = env("cluster").await;
    // The first "node" refuses connections; the second is the real broker.
    env.set(
        "AMQP_URL",
        &format!("amqp://guest:guest@127.0.0.1:1/%2f,{}", common::amqp_url()),
    );
    let svc = env.start_service().await;
    let events = env.bulk(2, 2, false);
    env.publish(&events).await;
    let want = ids(&events);
    assert!(wait_until(WAIT, || want.is_subset(&env.notified_ids())).await);
    svc.stop().await;
    env.cleanup().await;
}

/// A quota answer to the start-up probe pauses every call as one to a notice
/// would: /readyz names it, and the first events wait (parked, since the
/// pause is long) instead of meeting the exhausted quota at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_quota_answer_to_the_start_up_probe_pauses_every_call() {
    let mut env = TestEnv::new("probe-quota").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.set("NOTIFIER_RETRY_DELAYS", "30s");
    env.set("NOTIFIER_SHUTDOWN_GRACE", "1s");
    env.declare().await;
    // The first call of the replica, its probe, meets the daily quota.
    env.sim
        .push_fault(fault(FaultAction::Errcode(45009), Some(1)));
    let svc = env.start_service().await;
    assert!(
        eventually(WAIT, || async {
            let (status, text) = common::readyz(&svc.http).await;
            status == 503 && text.contains("45009")
        })
        .await,
        "/readyz names the pause: {:?}",
        common::readyz(&svc.http).await
    );
    let events = env.bulk(3, 3, false);
    env.publish(&events).await;
    let retry = env.retry_queues();
    assert!(
        eventually(WAIT, || async { env.ready(&retry[0]).await == 3 }).await,
        "the events wait out the pause in the retry queue"
    );
    assert!(
        env.sim.notice_calls().is_empty(),
        "no notice met the exhausted quota"
    );
    svc.stop().await;
    env.cleanup().await;
}
