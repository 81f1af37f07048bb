//! The core pipeline against the real broker and the simulator: one event, bulk
//! assignments, batch completion, invalid input, ack-after-success, two
//! replicas, and the rate budget.

use crate::common;

use std::time::Duration;

use common::{event_ids_of, eventually, fault_for, ids, unacked, wait_until, TestEnv};
use serde_json::{json, Value};
use wechat_notifier::broker::{header_int, header_str, headers};
use wechat_notifier::sim::{Api, FaultAction};

type Mutation = Box<dyn Fn(&mut Value)>;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_gives_one_plain_notice_and_the_queue_ends_empty() {
    let env = TestEnv::new("one").await;
    let svc = env.start_service().await;
    env.declare().await;
    let events = env.bulk(1, 1, false);
    env.publish(&events).await;

    assert!(
        wait_until(WAIT, || env.sim.delivered().len() == 1).await,
        "one notice arrives"
    );
    let n = &env.sim.delivered()[0];
    assert_eq!(n["summary"], json!(false));
    assert_eq!(n["customer_count"], json!(1));
    assert_eq!(n["event_ids"], json!([events[0]["event_id"]]));
    assert_eq!(n["customers"][0]["name"], events[0]["customer"]["name"]);
    assert_eq!(n["assignee"]["user_id"], events[0]["assignee"]["user_id"]);
    assert_eq!(
        n["notice_id"].as_str().unwrap(),
        wechat_notifier::notice::notice_id(&[events[0]["event_id"].as_str().unwrap()])
    );
    assert!(
        eventually(WAIT, || env.settled(&svc.http)).await,
        "acked after success"
    );
    svc.stop().await;
    assert_eq!(env.sim.delivered().len(), 1);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_events_of_one_batch_become_one_summary() {
    let mut env = TestEnv::new("bulk50").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "2000");
    env.set("NOTIFIER_BATCH_MAX_WAIT_MS", "10000");
    let svc = env.start_service().await;
    env.declare().await;
    let events = env.bulk(50, 1, true);
    env.publish(&events).await;

    assert!(wait_until(WAIT, || env.notified_ids() == ids(&events)).await);
    let notices = env.sim.delivered();
    assert_eq!(notices.len(), 1, "one notice for the whole bulk assignment");
    let n = &notices[0];
    assert_eq!(n["summary"], json!(true));
    assert_eq!(n["customer_count"], json!(50));
    assert_eq!(n["customers"].as_array().unwrap().len(), 10);
    assert_eq!(n["customers"][0]["id"], events[0]["customer"]["id"]);
    let event_ids: Vec<&Value> = events.iter().map(|e| &e["event_id"]).collect();
    assert_eq!(
        n["event_ids"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        event_ids,
        "arrival order"
    );
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_interleaved_assignees_get_three_notices() {
    let env = TestEnv::new("three").await;
    let svc = env.start_service().await;
    env.declare().await;
    let events = env.bulk(30, 3, true);
    env.publish(&events).await;

    assert!(wait_until(WAIT, || env.notified_ids() == ids(&events)).await);
    let notices = env.sim.delivered();
    assert_eq!(notices.len(), 3);
    let mut users: Vec<&str> = notices
        .iter()
        .map(|n| n["assignee"]["user_id"].as_str().unwrap())
        .collect();
    users.sort();
    users.dedup();
    assert_eq!(users.len(), 3);
    assert!(notices.iter().all(|n| n["customer_count"] == json!(10)));
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_120_with_batch_max_50_gives_50_50_20() {
    let mut env = TestEnv::new("max50").await;
    env.set("NOTIFIER_BATCH_MAX", "50");
    env.set("NOTIFIER_BATCH_WINDOW_MS", "5000");
    env.set("NOTIFIER_BATCH_MAX_WAIT_MS", "20000");
    let svc = env.start_service().await;
    env.declare().await;
    let events = env.bulk(120, 1, true);
    env.publish(&events).await;

    assert!(wait_until(WAIT, || env.notified_ids() == ids(&events)).await);
    let counts: Vec<u64> = env
        .sim
        .delivered()
        .iter()
        .map(|n| n["customer_count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, vec![50, 50, 20]);
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_batch_is_sent_without_waiting_out_a_30s_quiet_period() {
    let mut env = TestEnv::new("complete").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "30000");
    env.set("NOTIFIER_BATCH_MAX_WAIT_MS", "60000");
    let svc = env.start_service().await;
    env.declare().await;
    let events = env.bulk(20, 2, true);
    env.publish(&events).await;
    // Only batch completion can close these windows before 30 s.
    assert!(
        wait_until(Duration::from_secs(10), || env.notified_ids()
            == ids(&events))
        .await,
        "the completed batch was announced at once"
    );
    assert_eq!(env.sim.delivered().len(), 2);
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_is_dead_lettered_with_reason_and_original_bytes() {
    let env = TestEnv::new("invalid").await;
    let svc = env.start_service().await;
    env.declare().await;
    let good = env.bulk(1, 1, false)[0].clone();
    let mut cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "JSON"),
        (vec![b'{', 0xff, 0xfe, b'}'], "UTF-8"),
        (
            {
                let mut v = good.clone();
                v["padding"] = json!("x".repeat(70_000));
                serde_json::to_vec(&v).unwrap()
            },
            "bytes",
        ),
    ];
    let mutations: Vec<(&str, Mutation)> = vec![
        (
            "event_id",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("event_id");
            }),
        ),
        (
            "event_type",
            Box::new(|v| v["event_type"] = json!("customer.deleted")),
        ),
        (
            "occurred_at",
            Box::new(|v| v["occurred_at"] = json!("2026-11-25 14:03")),
        ),
        ("source", Box::new(|v| v["source"] = json!("fax"))),
        (
            "assignee",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("assignee");
            }),
        ),
        (
            "assignee.user_id",
            Box::new(|v| v["assignee"]["user_id"] = json!(-5)),
        ),
        (
            "customer.id",
            Box::new(|v| v["customer"]["id"] = json!(null)),
        ),
        (
            "customer.name",
            Box::new(|v| v["customer"]["name"] = json!("名".repeat(201))),
        ),
        (
            "batch.size",
            Box::new(|v| v["batch"] = json!({"id": "b", "size": 0})),
        ),
    ];
    for (field, mutate) in &mutations {
        let mut v = good.clone();
        mutate(&mut v);
        cases.push((serde_json::to_vec(&v).unwrap(), field));
    }
    let bodies: Vec<Vec<u8>> = cases.iter().map(|(b, _)| b.clone()).collect();
    env.publish_raw(&bodies).await;
    env.publish(std::slice::from_ref(&good)).await;

    assert!(
        wait_until(WAIT, || env.sim.delivered().len() == 1).await,
        "the valid event behind them arrives"
    );
    let dead_queue = env.dead_queue();
    let n = cases.len() as u32;
    assert!(
        eventually(WAIT, || async { env.ready(&dead_queue).await == n }).await,
        "every invalid message is dead-lettered"
    );
    let dead = env.drain(&env.dead_queue()).await;
    assert_eq!(dead.len(), cases.len());
    for (body, expect) in &cases {
        let (_, props) = dead
            .iter()
            .find(|(b, _)| b == body)
            .expect("original bytes kept");
        assert_eq!(
            header_str(props, headers::REASON).as_deref(),
            Some("invalid_event")
        );
        let detail = header_str(props, headers::DETAIL).unwrap();
        assert!(detail.contains(expect), "detail {detail:?} names {expect}");
        assert!(header_int(props, headers::ATTEMPTS).is_some());
        assert!(header_str(props, headers::FIRST_FAILED_AT).is_some());
    }
    assert!(eventually(WAIT, || env.settled(&svc.http)).await);
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_thousand_invalid_events_are_each_dead_lettered_once_without_churn() {
    const N: usize = 4000;
    let mut env = TestEnv::new("invalidflood").await;
    // All held at once, so every copy is queued for the publisher together:
    // more than it sends in the 5 s a copy has for its confirm (about 1-2 ms
    // each, one at a time), so the last ones wait longer than that for their turn.
    env.set("NOTIFIER_PREFETCH", &N.to_string());
    env.declare().await;
    let log = std::env::temp_dir().join(format!("{}.log", env.prefix));
    let mut replica = env.spawn_process_logging(Some(&log));
    env.publish_raw(&vec![b"{}".to_vec(); N]).await;

    let dead_queue = env.dead_queue();
    assert!(
        eventually(Duration::from_secs(60), || async {
            env.ready(&dead_queue).await as usize >= N && env.settled(&replica.http).await
        })
        .await,
        "every invalid event is dead-lettered and the work queue ends empty"
    );
    // Each was received once: no copy failed, so no original went back to the queue.
    let received = common::metric(&replica.http, "wechat_notifier_events_received_total", "").await;
    assert_eq!(received as usize, N, "no invalid event was redelivered");
    let dead = env.drain(&dead_queue).await;
    assert_eq!(dead.len(), N, "exactly one dead letter per invalid event");
    for (body, props) in &dead {
        assert_eq!(body.as_slice(), b"{}");
        assert_eq!(
            header_str(props, headers::REASON).as_deref(),
            Some("invalid_event")
        );
    }
    replica.sigterm();
    let _ = tokio::task::spawn_blocking(move || replica.wait()).await;
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("invalid event dead-lettered"),
        "the log was captured"
    );
    assert!(
        !logs.contains("not confirmed"),
        "no copy counted as not confirmed"
    );
    let _ = std::fs::remove_file(&log);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_stays_unacked_while_wechat_holds_the_call_and_returns_when_the_replica_dies() {
    let env = TestEnv::new("hold").await;
    env.declare().await;
    let events = env.bulk(1, 1, false);
    env.sim
        .push_fault(fault_for(&events[0], FaultAction::DelayMs(60_000), Some(1)));
    let mut replica = env.spawn_process();
    env.publish(&events).await;

    assert!(
        wait_until(WAIT, || env.sim.in_flight() == 1).await,
        "the call is held open"
    );
    let queue = env.queue();
    assert_eq!(env.ready(&queue).await, 0, "the replica took the message");
    assert_eq!(
        unacked(&replica.http).await,
        Some(1),
        "the replica holds the message unacked while WeChat has not answered"
    );
    assert_eq!(env.sim.in_flight(), 1, "still held");
    replica.kill9();
    assert!(
        eventually(WAIT, || async { env.ready(&queue).await == 1 }).await,
        "back in the queue after the kill: it was never acked"
    );
    assert!(env.sim.delivered().is_empty());
    env.cleanup().await;
}

/// Acks leave in `multiple` frames where they can (one frame for a run of
/// settled deliveries): such a frame must never cover a delivery still held in
/// front of it. Two assignees' calls hang while six others' are accepted; their
/// deliveries sit between the others' in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_for_settled_messages_never_cover_the_held_ones_between_them() {
    let mut env = TestEnv::new("ackrun").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.declare().await;
    // 8 assignees in turn: the held ones (2 and 5) are every 8th delivery.
    let events = env.bulk(40, 8, false);
    let (held, others): (Vec<Value>, Vec<Value>) = events.iter().cloned().partition(|e| {
        [&events[2], &events[5]]
            .iter()
            .any(|h| h["assignee"] == e["assignee"])
    });
    for h in [&events[2], &events[5]] {
        env.sim
            .push_fault(fault_for(h, FaultAction::DelayMs(60_000), Some(1)));
    }
    let mut replica = env.spawn_process();
    env.publish(&events).await;

    assert!(
        wait_until(WAIT, || env.notified_ids() == ids(&others)).await,
        "the six other assignees are notified"
    );
    assert!(
        eventually(WAIT, || async {
            unacked(&replica.http).await == Some(held.len() as u64)
        })
        .await,
        "every accepted delivery is acked; the held ones are not"
    );
    assert_eq!(env.sim.in_flight(), 2, "both held calls still open");
    let queue = env.queue();
    replica.kill9();
    assert!(
        eventually(WAIT, || async {
            env.ready(&queue).await == held.len() as u32
        })
        .await,
        "exactly the held deliveries come back after the kill"
    );
    // A new replica delivers them (the faults were for one call each).
    let before = env.sim.delivered().len();
    let again = env.spawn_process();
    assert!(
        wait_until(WAIT, || env.notified_ids() == ids(&events)).await,
        "the held events are delivered by the next replica"
    );
    let back = event_ids_of(&env.sim.delivered()[before..]);
    assert_eq!(
        back,
        ids(&held),
        "the held events, and only those, were never acked"
    );
    drop(again);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replica_processes_one_consumes_and_each_assignee_gets_one_notice() {
    let env = TestEnv::new("tworep").await;
    env.declare().await;
    let a = env.spawn_process();
    let b = env.spawn_process();
    // Each registers its consumer (readiness says so); the broker counts only
    // the active one of a single-active-consumer queue, so it cannot tell.
    let registered = |http: String| async move {
        reqwest::get(format!("http://{http}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success())
    };
    assert!(
        eventually(WAIT, || async {
            registered(a.http.clone()).await && registered(b.http.clone()).await
        })
        .await,
        "both replicas register"
    );
    let events = env.bulk(60, 4, true);
    env.publish(&events).await;

    assert!(wait_until(WAIT, || env.notified_ids() == ids(&events)).await);
    let notices = env.sim.delivered();
    assert_eq!(notices.len(), 4, "one notice per assignee");
    let ra = common::metric(&a.http, "wechat_notifier_events_received_total", "").await;
    let rb = common::metric(&b.http, "wechat_notifier_events_received_total", "").await;
    assert_eq!(
        (ra.min(rb), ra.max(rb)),
        (0.0, 60.0),
        "only one replica consumed"
    );
    drop((a, b));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_spaced_by_the_rate_budget() {
    let mut env = TestEnv::new("rate").await;
    let (rate, n) = (5.0, 11usize);
    env.set("NOTIFIER_RATE_PER_SEC", "5");
    env.set("NOTIFIER_RATE_BURST", "1");
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    let svc = env.start_service().await;
    env.declare().await;
    let events = env.bulk(n, n, false);
    env.publish(&events).await;

    assert!(wait_until(WAIT, || env.sim.delivered().len() == n).await);
    // Every WeChat call but token fetches counts (the start-up probe too).
    let times: Vec<f64> = env
        .sim
        .calls()
        .iter()
        .filter(|c| c.api == Api::InvokeCloudFunction)
        .map(|c| c.at_ms)
        .collect();
    let span = times.last().unwrap() - times.first().unwrap();
    let min = (times.len() - 1) as f64 / rate * 1000.0;
    // The simulator sees arrivals, not sends: a loaded machine can delay the
    // first arrival more than the last. Half a slot of tolerance for that
    // still fails a budget that lets a single extra call through.
    let tolerance = 0.5 / rate * 1000.0;
    assert!(
        span >= min - tolerance,
        "{} calls took {span:.0} ms, less than {min:.0} ms",
        times.len()
    );
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..].iter().take_while(|u| **u < t + 1000.0).count();
        assert!(
            in_window as f64 <= rate + 1.0,
            "{in_window} calls in one second"
        );
    }
    svc.stop().await;
    env.cleanup().await;
}

/// `NOTIFIER_MAX_IN_FLIGHT` bounds the calls under way: 12 assignees' notices,
/// a rate budget out of the way, WeChat holding each call 400 ms. WeChat sees
/// exactly 3 at once at most (so calls for different assignees still overlap),
/// and every notice arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_under_way_never_exceed_notifier_max_in_flight() {
    let mut env = TestEnv::new("inflight").await;
    env.set("NOTIFIER_MAX_IN_FLIGHT", "3");
    env.set("NOTIFIER_RATE_PER_SEC", "1000");
    env.set("NOTIFIER_RATE_BURST", "100");
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    let svc = env.start_service().await;
    env.declare().await;
    env.sim.push_fault(wechat_notifier::sim::Fault {
        api: Some(Api::InvokeCloudFunction),
        user_id: None,
        action: FaultAction::DelayMs(400),
        times: None,
    });
    let events = env.bulk(12, 12, false);
    env.publish(&events).await;

    assert!(
        wait_until(WAIT, || env.notified_ids() == ids(&events)).await,
        "every notice arrives"
    );
    assert_eq!(env.sim.delivered().len(), 12);
    assert_eq!(
        env.sim.peak_in_flight(),
        3,
        "WeChat saw this many calls at once"
    );
    svc.stop().await;
    env.cleanup().await;
}

/// The broker cancels the consumer (the work queue was deleted) while the
/// replica holds a backlog in open windows: the session ends, the replica
/// declares the queue again and consumes what arrives next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_queue_deleted_under_a_backlog_is_declared_again_and_consumed() {
    let mut env = TestEnv::new("qdel").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "60000");
    env.set("NOTIFIER_BATCH_MAX_WAIT_MS", "120000");
    env.declare().await;
    let replica = env.spawn_process();
    let backlog = env.bulk(3000, 3000, false);
    env.publish(&backlog).await;
    let queue = env.queue();
    env.channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    assert!(
        eventually(WAIT, || async {
            env.queue_exists(&queue).await && env.consumers(&queue).await == 1
        })
        .await,
        "the replica declared the queue again and consumes from it"
    );
    let mut next = env.bulk(1, 1, false);
    next[0]["assignee"]["user_id"] = json!("after-the-delete");
    env.publish(&next).await;
    // Held by the replica (a delivery that arrives during the drain would go
    // back to the queue, with no replica left to take it).
    assert!(
        eventually(WAIT, || async { env.queue_state(&queue).await.0 == 0 }).await,
        "the replica took the event"
    );
    // Its window is the 60 s one of the replica: SIGTERM sends it at once.
    replica.sigterm();
    assert!(
        wait_until(WAIT, || env.notified_ids().is_superset(&ids(&next))).await,
        "the event published after the delete is delivered"
    );
    env.cleanup().await;
}
