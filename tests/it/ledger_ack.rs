//! The ack path with the grant ledger on (contract sections 3 and 8): a held
//! configuration fault whose notice carried held events, the sweep beside a
//! release, and copies of held events that come back while the ledger does
//! not answer. Each delivery is acked only once its notice was accepted or
//! its events are safe in the ledger or a retry or dead-letter queue, and no
//! event reaches WeChat in two notices with different ids.

use crate::common;

use std::time::Duration;

use common::ledger::{
    aged, dead_ids, delivered_in, event, held_at_zero, held_count, ledger_env, locked, pg,
    publish_subscription, someone_waits_on, store, subscription, TEMPLATE,
};
use common::{eventually, fault_for, readyz};
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::json;
use wechat_notifier::sim::{Api, Fault, FaultAction};

const WAIT: Duration = Duration::from_secs(30);

/// M-A: a release (two held events, one of them past `NOTIFIER_MAX_AGE`)
/// meets a configuration fault found on its send, and the session is lost.
/// The next session re-sends the held notice with exactly its claimed ids
/// (the max age does not apply to held events) and, once WeChat accepts it,
/// records it in the ledger as any accepted notice (events released, the
/// credit spent once): the accept that comes back releases nothing again,
/// and each event reaches WeChat in one notice only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_fault_re_send_of_a_release_settles_the_ledger_with_the_same_ids() {
    const MAX_AGE_MS: i64 = 20_000;
    let mut env = ledger_env("ack-resend").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    env.set("NOTIFIER_CONFIG_RETRY", "300ms");
    env.set("NOTIFIER_MAX_AGE", "20s");
    // Old, but fresh enough for its first send: it passes the max age while held.
    let h1 = aged(event("ar-1", "u-ar", "c1"), MAX_AGE_MS - 3_000);
    env.sim
        .push_fault(fault_for(&h1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let svc = env.start_service().await;
    let s = store(&env.settings()).await;
    env.publish(std::slice::from_ref(&h1)).await;
    assert!(
        eventually(WAIT, || async {
            held_count(&s, "u-ar").await == 1 && env.settled(&svc.http).await
        })
        .await,
        "the 43101 holds the first event"
    );
    // At an exact 0 the second is held without a call.
    env.publish(&[event("ar-2", "u-ar", "c2")]).await;
    assert!(
        eventually(WAIT, || async {
            held_count(&s, "u-ar").await == 2 && env.settled(&svc.http).await
        })
        .await,
        "the second event is held too"
    );
    tokio::time::sleep(Duration::from_millis(3_500)).await;

    // The release of both meets a fault only a real send finds.
    env.sim.push_fault(Fault {
        api: Some(Api::InvokeCloudFunction),
        user_id: None,
        action: FaultAction::NoticeFunctionErrcode(85088),
        times: None,
    });
    publish_subscription(&env, &subscription("s-ar", "u-ar", TEMPLATE, "accept")).await;
    assert!(
        eventually(WAIT, || async {
            let (status, text) = readyz(&svc.http).await;
            status == 503 && text.contains("configuration fault")
        })
        .await,
        "the fault is held"
    );
    assert!(env.close_consuming_connection(&env.queue()));
    assert!(
        eventually(WAIT, || async { env.ready(&env.queue()).await >= 1 }).await,
        "the accept returned to the queue"
    );
    env.sim.clear_faults();

    assert!(
        eventually(WAIT, || async {
            held_count(&s, "u-ar").await == 0 && env.settled(&svc.http).await
        })
        .await,
        "released and settled once fixed"
    );
    // A repeat would come with the accept's redelivery or the next sweep.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let delivered = delivered_in(&env);
    assert_eq!(
        delivered.keys().cloned().collect::<Vec<_>>(),
        ["ar-1", "ar-2"],
        "{delivered:?}"
    );
    for (id, notices) in &delivered {
        assert_eq!(notices.len(), 1, "{id} reached WeChat once: {delivered:?}");
    }
    assert_eq!(
        delivered["ar-1"], delivered["ar-2"],
        "in the one notice that claimed them"
    );
    let after = s.user("u-ar", TEMPLATE).await.unwrap();
    assert_eq!(
        (after.credit.count, after.credit.exact),
        (0, true),
        "the accept's credit was spent by the re-send"
    );
    assert_eq!(
        env.ready(&env.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    svc.stop().await;
    env.cleanup().await;
}

/// M-B: the sweep takes two expired events (users A and B) and is kept,
/// by a lock of the test's, in the middle of the first one's; meanwhile an
/// accept for B releases B's held event. An event is either released in a
/// notice or dead-lettered, never both: the rows a sweep is dead-lettering
/// are marked as its own in one statement, and a release's claim leaves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_sweep_is_dead_lettering_is_not_also_released() {
    let mut env = ledger_env("ack-sweep").await;
    // The sweep every 5 s; the test makes the events old enough itself.
    env.set("NOTIFIER_HOLD_FOR", "20s");
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    let ha = event("as-a", "u-as-a", "c1");
    let hb = event("as-b", "u-as-b", "c2");
    for e in [&ha, &hb] {
        env.sim
            .push_fault(fault_for(e, FaultAction::FunctionErrcode(43101), Some(1)));
    }
    env.declare().await;
    let svc = env.start_service().await;
    let s = store(&env.settings()).await;
    for (e, user) in [(&ha, "u-as-a"), (&hb, "u-as-b")] {
        env.publish(std::slice::from_ref(e)).await;
        assert!(
            eventually(WAIT, || async {
                held_count(&s, user).await == 1 && env.settled(&svc.http).await
            })
            .await,
            "{user}'s event is held"
        );
    }
    // The test holds A's spell: the sweep's removal of A's event waits for it.
    let mut c = pg(&env).await;
    sqlx::query("BEGIN").execute(&mut c).await.unwrap();
    sqlx::query("SELECT 1 FROM spells WHERE user_id = 'u-as-a' FOR UPDATE")
        .execute(&mut c)
        .await
        .unwrap();
    // Both past NOTIFIER_HOLD_FOR for the next sweep, A's the older.
    sqlx::query(
        "UPDATE held SET held_at = now() - CASE user_id WHEN 'u-as-a' THEN interval '60 s'
                                                         ELSE interval '59 s' END",
    )
    .execute(&mut pg(&env).await)
    .await
    .unwrap();
    assert!(
        eventually(WAIT, || async {
            someone_waits_on(&env, "spells", "WITH d AS").await
        })
        .await,
        "the sweep's removal of A's event waits for the test's lock"
    );
    publish_subscription(&env, &subscription("s-as", "u-as-b", TEMPLATE, "accept")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        eventually(WAIT, || async {
            env.ready(&env.queue()).await == 0 && env.sim.in_flight() == 0
        })
        .await,
        "the accept was handled"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();

    assert!(
        eventually(WAIT, || async {
            held_count(&s, "u-as-a").await == 0
                && held_count(&s, "u-as-b").await == 0
                && env.settled(&svc.http).await
        })
        .await,
        "both left the ledger"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delivered = delivered_in(&env);
    let dead = dead_ids(&env).await;
    for id in ["as-a", "as-b"] {
        let sent = delivered.contains_key(id);
        let dead_lettered = dead.iter().filter(|(d, _)| d == id).count();
        assert!(
            sent != (dead_lettered > 0),
            "{id}: released {sent}, dead-lettered {dead_lettered} times: {delivered:?} {dead:?}"
        );
    }
    assert!(dead.contains(&("as-a".into(), "no_subscription".into())));
    svc.stop().await;
    env.cleanup().await;
}

/// M-C: a copy of a held event comes back from a retry queue (it carries
/// `x-notifier-first-failed-at`) while the ledger cannot be read. Whether
/// the ledger holds its event is unknown, so it is neither sent nor acked:
/// it waits in a retry queue (not as a failed attempt); once the ledger
/// answers, it is acked as an event the ledger holds, without a notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_copy_of_a_held_event_waits_while_the_ledger_cannot_be_read() {
    let mut env = ledger_env("ack-copy").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    let e1 = event("ac-1", "u-ac", "c1");
    env.declare().await;
    let s = store(&env.settings()).await;
    // The event is held at an exact 0 (as after a 43101 whose ack was lost).
    held_at_zero(&s, "u-ac", &e1).await;
    let svc = env.start_ready().await;
    // The test locks the counts: reading the user fails (statement timeout).
    let mut c = locked(&env, "credits", "ACCESS EXCLUSIVE").await;
    let mut h = FieldTable::default();
    h.insert(
        "x-notifier-first-failed-at".into(),
        AMQPValue::LongString(chrono::Utc::now().to_rfc3339().into()),
    );
    h.insert("x-notifier-attempts".into(), AMQPValue::LongLongInt(1));
    env.channel
        .basic_publish(
            env.exchange().as_str().into(),
            "customer.assigned".into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&e1).unwrap(),
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_headers(h),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // Past the statement timeout (10 s): the read failed at least once.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        env.sim.delivered().is_empty(),
        "not sent beside the ledger's copy: {:?}",
        env.sim.delivered()
    );
    sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
    assert!(
        eventually(WAIT, || async { env.settled(&svc.http).await }).await,
        "the copy is acked once the ledger answers"
    );
    assert!(env.sim.delivered().is_empty(), "no notice for a held event");
    assert_eq!(held_count(&s, "u-ac").await, 1, "still held");
    assert_eq!(
        env.ready(&env.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    svc.stop().await;
    env.cleanup().await;
}

/// Minors: an accept whose release cannot claim the held events (the test
/// locks the table against row locks; the count is still recorded) is not
/// acked without its release, nor parked as a failed attempt: it waits in a
/// retry queue and releases the held event once the ledger answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_whose_release_cannot_claim_waits_and_releases_once_the_ledger_answers() {
    let mut env = ledger_env("ack-claim").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    let e1 = event("cl-1", "u-cl", "c1");
    env.declare().await;
    let s = store(&env.settings()).await;
    held_at_zero(&s, "u-cl", &e1).await;
    let svc = env.start_ready().await;
    // Reads go on (the accept is counted); the claim's row locks wait and time out.
    let mut c = locked(&env, "held", "EXCLUSIVE").await;
    publish_subscription(&env, &subscription("s-cl", "u-cl", TEMPLATE, "accept")).await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
    // Well before the first sweep (30 s after the start) could release it.
    assert!(
        eventually(Duration::from_secs(8), || async {
            env.sim.delivered().len() == 1 && env.settled(&svc.http).await
        })
        .await,
        "the accept came back and released the held event: {:?}",
        env.sim.delivered()
    );
    assert_eq!(env.sim.delivered()[0]["event_ids"], json!(["cl-1"]));
    assert_eq!(
        env.ready(&env.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    svc.stop().await;
    env.cleanup().await;
}
