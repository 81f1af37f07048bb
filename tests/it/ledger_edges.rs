//! The grant ledger's edges (contract sections 8.3-8.5 and 8.8): expiry and
//! the hold limit dead-letter what waited too long or too much, the signals
//! the CRM listens for, the direct mode's hold for want of an openid, a
//! replica killed in the middle of a hold or a release, and a handover while
//! events are held. Real RabbitMQ, real PostgreSQL (each test its own
//! schema), the in-process simulator; the crash tests run the service as a
//! real process.

use crate::common;

use std::time::Duration;

use common::ledger::{
    event, held_count, ledger_env, locked, notice_calls_for, pg, publish_subscription, schema,
    someone_waits_on, store, subscription, TEMPLATE,
};
use common::{eventually, fault_for, TestEnv};
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{json, Value};
use wechat_notifier::broker::{header_int, header_str};
use wechat_notifier::ledger::store::Store;
use wechat_notifier::ledger::Status;
use wechat_notifier::sim::{Api, FaultAction};

const WAIT: Duration = Duration::from_secs(15);

fn accept(id: &str, user: &str) -> Value {
    subscription(id, user, TEMPLATE, "accept")
}

/// The dead letters now in the test's dead queue: (reason, errcode, body).
async fn dead_letters(env: &TestEnv) -> Vec<(Option<String>, Option<i64>, Vec<u8>)> {
    env.drain(&env.dead_queue())
        .await
        .into_iter()
        .map(|(body, p)| {
            (
                header_str(&p, "x-notifier-reason"),
                header_int(&p, "x-notifier-errcode"),
                body,
            )
        })
        .collect()
}

/// A user held at an exact 0 with `first` as the held event (its notice answered 43101).
async fn hold_first(env: &TestEnv, s: &Store, http: &str, first: &Value, user: &str) {
    env.publish(std::slice::from_ref(first)).await;
    assert!(
        eventually(WAIT, || async {
            held_count(s, user).await == 1 && env.settled(http).await
        })
        .await,
        "the 43101 notice is held"
    );
}

#[tokio::test]
async fn an_event_held_past_hold_for_is_dead_lettered_no_subscription_with_its_body_and_leaves_the_ledger(
) {
    let mut env = ledger_env("expiry").await;
    env.set("NOTIFIER_HOLD_FOR", "2s");
    let e1 = event("x-1", "u-exp", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let svc = env.start_service().await;
    let s = store(&env.settings()).await;
    hold_first(&env, &s, &svc.http, &e1, "u-exp").await;
    assert_eq!(env.ready(&env.dead_queue()).await, 0, "held, not dead");

    assert!(
        eventually(WAIT, || async { env.ready(&env.dead_queue()).await == 1 }).await,
        "the sweep dead-letters the event held past NOTIFIER_HOLD_FOR"
    );
    let dead = dead_letters(&env).await;
    assert_eq!(dead.len(), 1);
    let (reason, errcode, body) = &dead[0];
    assert_eq!(reason.as_deref(), Some("no_subscription"));
    assert_eq!(*errcode, Some(43101));
    assert_eq!(
        serde_json::from_slice::<Value>(body).unwrap(),
        e1,
        "the original body"
    );
    assert!(
        eventually(WAIT, || async { held_count(&s, "u-exp").await == 0 }).await,
        "the expired event left the ledger"
    );
    assert!(env.sim.delivered().is_empty(), "never sent");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn max_age_does_not_apply_to_a_held_event() {
    let mut env = ledger_env("maxage").await;
    // Long enough that the first send, under a loaded machine, still comes
    // before the max age; the hold then outlasts it.
    env.set("NOTIFIER_MAX_AGE", "4s");
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    let e1 = event("m-1", "u-age", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let svc = env.start_service().await;
    let s = store(&env.settings()).await;
    hold_first(&env, &s, &svc.http, &e1, "u-age").await;
    // The event grows older than NOTIFIER_MAX_AGE while it is held.
    tokio::time::sleep(Duration::from_secs(5)).await;
    publish_subscription(&env, &accept("s-age", "u-age")).await;
    assert!(
        eventually(WAIT, || async {
            env.sim.delivered().len() == 1 && env.settled(&svc.http).await
        })
        .await,
        "the accept releases the held event, however old"
    );
    assert_eq!(env.sim.delivered()[0]["event_ids"], json!(["m-1"]));
    assert_eq!(
        env.ready(&env.dead_queue()).await,
        0,
        "not dead-lettered `expired`"
    );
    assert!(eventually(WAIT, || async { held_count(&s, "u-age").await == 0 }).await);
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn past_hold_max_events_the_oldest_is_dead_lettered_hold_full() {
    let mut env = ledger_env("full").await;
    env.set("NOTIFIER_HOLD_MAX_EVENTS", "2");
    let e1 = event("f-1", "u-full", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let svc = env.start_service().await;
    let s = store(&env.settings()).await;
    hold_first(&env, &s, &svc.http, &e1, "u-full").await;
    // Each in a window of its own, held at the exact 0 without a call.
    env.publish(&[event("f-2", "u-full", "c2")]).await;
    assert!(
        eventually(WAIT, || async {
            held_count(&s, "u-full").await == 2 && env.settled(&svc.http).await
        })
        .await
    );
    env.publish(&[event("f-3", "u-full", "c3")]).await;
    assert!(
        eventually(WAIT, || async {
            env.ready(&env.dead_queue()).await == 1 && env.settled(&svc.http).await
        })
        .await,
        "one event dead-lettered past the limit"
    );
    let dead = dead_letters(&env).await;
    let (reason, errcode, body) = &dead[0];
    assert_eq!(reason.as_deref(), Some("hold_full"));
    assert_eq!(*errcode, Some(43101));
    assert_eq!(
        serde_json::from_slice::<Value>(body).unwrap()["event_id"],
        "f-1",
        "the oldest goes"
    );
    let mut left: Vec<String> = s
        .held_of("u-full")
        .await
        .unwrap()
        .into_iter()
        .map(|(_, r)| r.event_id)
        .collect();
    left.sort();
    assert_eq!(left, ["f-2", "f-3"], "two stay");
    assert_eq!(notice_calls_for(&env, "u-full").len(), 1);
    svc.stop().await;
    env.cleanup().await;
}

/// Binds a queue of the test's own to the CRM signals.
async fn signal_queue(env: &TestEnv) -> String {
    let q = format!("{}.signals", env.prefix);
    env.channel
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for key in ["notifier.notice_held", "notifier.credits_low"] {
        env.channel
            .queue_bind(
                q.as_str().into(),
                env.exchange().as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    q
}

/// The signals now in `q`: (routing key, body).
async fn signals(env: &TestEnv, q: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    while let Some(m) = env
        .channel
        .basic_get(q.into(), Default::default())
        .await
        .unwrap()
    {
        m.delivery.acker.ack(Default::default()).await.unwrap();
        out.push((
            m.delivery.routing_key.to_string(),
            serde_json::from_slice(&m.delivery.data).unwrap(),
        ));
    }
    out
}

#[tokio::test]
async fn notice_held_once_per_spell_of_holding_and_credits_low_after_a_send_leaves_a_low_exact_count(
) {
    let env = ledger_env("signals").await;
    let e1 = event("g-1", "u-sig", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let q = signal_queue(&env).await;
    let svc = env.start_service().await;
    let s = store(&env.settings()).await;
    hold_first(&env, &s, &svc.http, &e1, "u-sig").await;
    // A second event in the same spell of holding: no second notice_held.
    env.publish(&[event("g-2", "u-sig", "c2")]).await;
    assert!(
        eventually(WAIT, || async {
            held_count(&s, "u-sig").await == 2 && env.settled(&svc.http).await
        })
        .await
    );
    assert!(
        eventually(WAIT, || async { env.ready(&q).await >= 1 }).await,
        "notice_held published"
    );
    let first = signals(&env, &q).await;
    assert_eq!(first.len(), 1, "one notice_held per spell: {first:?}");
    let (key, body) = &first[0];
    assert_eq!(key, "notifier.notice_held");
    assert_eq!(body["user_id"], "u-sig");
    assert_eq!(body["template_id"], TEMPLATE);
    assert_eq!(body["reason"], "no_credit");
    assert_eq!(body["held_events"], 1);
    let oldest = body["oldest_held_at"].as_str().expect("oldest_held_at");
    chrono::DateTime::parse_from_rfc3339(oldest).expect("an RFC 3339 time");

    // The accept raises the exact 0 to 1; the release spends it: exact 0 <= 1.
    publish_subscription(&env, &accept("s-sig", "u-sig")).await;
    assert!(
        eventually(WAIT, || async { env.ready(&q).await >= 1 }).await,
        "credits_low published"
    );
    let low = signals(&env, &q).await;
    assert_eq!(low.len(), 1, "{low:?}");
    assert_eq!(low[0].0, "notifier.credits_low");
    assert_eq!(
        low[0].1,
        json!({"user_id": "u-sig", "template_id": TEMPLATE, "credits": 0})
    );
    assert!(eventually(WAIT, || async { held_count(&s, "u-sig").await == 0 }).await);

    // The release emptied the hold: the next hold is a new spell.
    env.publish(&[event("g-3", "u-sig", "c3")]).await;
    assert!(
        eventually(WAIT, || async { env.ready(&q).await >= 1 }).await,
        "a new spell, a new notice_held"
    );
    let again = signals(&env, &q).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].0, "notifier.notice_held");
    assert_eq!(again[0].1["held_events"], 1);
    svc.stop().await;
    env.cleanup().await;
}

/// The direct mode's settings (`subscribe_message`, the ledger's template), in a file.
fn direct_config(env: &TestEnv) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{}.toml", env.prefix));
    std::fs::write(
        &path,
        format!(
            r#"
wechat_delivery_mode = "subscribe_message"

[subscribe_message]
template_id = "{TEMPLATE}"
page = "pages/customer/list?notice={{notice_id}}"

[subscribe_message.data]
thing1 = "{{customer_names}}"
number2 = "{{customer_count}}"
"#
        ),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn direct_mode_holds_an_event_without_an_openid_until_an_accept_brings_one() {
    let mut env = ledger_env("direct").await;
    let path = direct_config(&env);
    env.set("NOTIFIER_CONFIG", path.to_str().unwrap());
    env.declare().await;
    let q = signal_queue(&env).await;
    let svc = env.start_service().await;
    let s = store(&env.settings()).await;
    env.publish(&[event("d-1", "u-dir", "c1")]).await;
    assert!(
        eventually(WAIT, || async {
            held_count(&s, "u-dir").await == 1 && env.settled(&svc.http).await
        })
        .await,
        "held for want of an openid"
    );
    assert_eq!(env.ready(&env.dead_queue()).await, 0, "not dead-lettered");
    let held = s.held_of("u-dir").await.unwrap();
    assert_eq!(held[0].1.reason, "no_openid");
    assert!(eventually(WAIT, || async { env.ready(&q).await >= 1 }).await);
    let held_signal = signals(&env, &q).await;
    assert_eq!(held_signal[0].0, "notifier.notice_held");
    assert_eq!(held_signal[0].1["reason"], "no_openid");
    assert!(
        env.sim.calls().iter().all(|c| c.api != Api::SubscribeSend),
        "no call without an openid"
    );

    publish_subscription(&env, &accept("s-dir", "u-dir")).await;
    assert!(
        eventually(WAIT, || async {
            env.sim.delivered().len() == 1 && env.settled(&svc.http).await
        })
        .await,
        "the accept's openid releases it"
    );
    let sent = &env.sim.delivered()[0];
    assert_eq!(sent["touser"], "o-u-dir");
    assert_eq!(sent["template_id"], TEMPLATE);
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    assert!(eventually(WAIT, || async { held_count(&s, "u-dir").await == 0 }).await);
    svc.stop().await;
    env.cleanup().await;
    let _ = std::fs::remove_file(path);
}

/// Whether a statement that begins with `statement` waits for the
/// backend `pid` (the test's open transaction).
async fn blocked_by(env: &TestEnv, pid: i32, statement: &str) -> bool {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE $1 = ANY(pg_blocking_pids(pid)) AND query LIKE $2",
    )
    .bind(pid)
    .bind(format!("{statement}%"))
    .fetch_one(&mut pg(env).await)
    .await
    .unwrap();
    n > 0
}

/// Sends a signal (`-STOP`) to a replica's process.
fn signal(r: &common::Replica, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(sig)
        .arg(r.child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_between_the_ledger_s_hold_and_the_ack_loses_nothing_and_sends_nothing_twice() {
    let env = ledger_env("kill-hold").await;
    let e1 = event("k-1", "u-kh", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let s = store(&env.settings()).await;
    let mut a = env.spawn_process();
    assert!(eventually(WAIT, || async { env.consumers(&env.queue()).await == 1 }).await);
    // The test inserts the same event id in a transaction it keeps open: the
    // replica's hold (after the 43101, before its ack) waits for it as it
    // executes. (A table lock would stop it earlier, while it is prepared,
    // before the statement was sent whole.)
    let mut c = pg(&env).await;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut c)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut c).await.unwrap();
    sqlx::query(
        "INSERT INTO held (event_id, user_id, template_id, body, reason) VALUES ('k-1', 'u-kh', $1, '', 'test')",
    )
    .bind(TEMPLATE)
    .execute(&mut c)
    .await
    .unwrap();
    env.publish(std::slice::from_ref(&e1)).await;
    assert!(
        eventually(WAIT, || async { blocked_by(&env, pid, "WITH g AS").await }).await,
        "the hold waits for the test's transaction"
    );
    // Stopped, the replica cannot read the ledger's answer (nor ack); its
    // connection stays open, so its statement commits once the test's
    // transaction is gone. Then the kill.
    signal(&a, "-STOP");
    sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
    assert!(
        eventually(WAIT, || async { held_count(&s, "u-kh").await == 1 }).await,
        "the hold is written"
    );
    assert_eq!(
        s.held_of("u-kh").await.unwrap()[0].1.reason,
        "no_credit",
        "the replica's row, not the test's"
    );
    a.kill9();
    assert!(
        eventually(WAIT, || async { env.ready(&env.queue()).await == 1 }).await,
        "the held event's message was never acked: it is back in the queue"
    );

    let b = env.spawn_process();
    assert!(
        eventually(WAIT, || async {
            env.consumers(&env.queue()).await == 1 && env.settled(&b.http).await
        })
        .await,
        "the redelivered copy is acked"
    );
    assert_eq!(held_count(&s, "u-kh").await, 1);
    assert_eq!(notice_calls_for(&env, "u-kh").len(), 1, "no second call");
    publish_subscription(&env, &accept("s-kh", "u-kh")).await;
    assert!(
        eventually(WAIT, || async {
            held_count(&s, "u-kh").await == 0 && env.settled(&b.http).await
        })
        .await
    );
    let delivered = env.sim.delivered();
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(delivered[0]["event_ids"], json!(["k-1"]));
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    drop(b);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_between_a_release_s_send_and_its_ledger_update_repeats_it_only_with_the_same_ids()
{
    let mut env = ledger_env("kill-rel").await;
    // The sweep (every HOLD_FOR/4, 5 s) sends the claimed events again.
    env.set("NOTIFIER_HOLD_FOR", "20s");
    let e1 = event("r-1", "u-kr", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let s = store(&env.settings()).await;
    let mut a = env.spawn_process();
    hold_first(&env, &s, &a.http, &e1, "u-kr").await;
    env.publish(&[event("r-2", "u-kr", "c2")]).await;
    assert!(
        eventually(WAIT, || async {
            held_count(&s, "u-kr").await == 2 && env.settled(&a.http).await
        })
        .await
    );
    // The test holds `sends`: the release's decrement waits for it, after WeChat accepted.
    let mut c = locked(&env, "sends", "SHARE ROW EXCLUSIVE").await;
    publish_subscription(&env, &accept("s-kr", "u-kr")).await;
    assert!(
        eventually(WAIT, || async {
            someone_waits_on(&env, "sends", "WITH q AS (%INSERT INTO sends").await
        })
        .await,
        "the release's ledger update waits for the test's lock"
    );
    assert_eq!(env.sim.delivered().len(), 1, "the release was accepted");
    a.kill9();
    // The killed replica's statement never commits.
    sqlx::query(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE NOT granted AND relation = '{}.sends'::regclass",
        schema(&env)
    ))
    .execute(&mut c)
    .await
    .unwrap();
    sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
    let claimed = s.held_of("u-kr").await.unwrap();
    assert_eq!(
        claimed.len(),
        2,
        "the claimed events are still in the ledger"
    );
    assert!(claimed.iter().all(|(_, r)| r.claimed_by.is_some()));

    let b = env.spawn_process();
    assert!(
        eventually(Duration::from_secs(30), || async {
            held_count(&s, "u-kr").await == 0 && env.settled(&b.http).await
        })
        .await,
        "the notice whose outcome was unknown is sent again and recorded"
    );
    let delivered = env.sim.delivered();
    assert!(
        (1..=2).contains(&delivered.len()),
        "at most one repeat: {delivered:?}"
    );
    for n in &delivered {
        assert_eq!(n["event_ids"], json!(["r-1", "r-2"]));
        assert_eq!(n["notice_id"], delivered[0]["notice_id"], "the same notice");
    }
    let after = s.user("u-kr", TEMPLATE).await.unwrap();
    assert_eq!(
        (after.credit.count, after.credit.exact),
        (0, true),
        "the one accept's credit was spent once"
    );
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    drop(b);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_handover_while_events_are_held_the_standby_releases_them_on_the_next_accept() {
    let env = ledger_env("handover").await;
    let e1 = event("ho-1", "u-ho", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let s = store(&env.settings()).await;
    let mut a = env.spawn_process();
    assert!(
        eventually(WAIT, || async { env.consumers(&env.queue()).await >= 1 }).await,
        "the first replica consumes"
    );
    let b = env.spawn_process();
    hold_first(&env, &s, &a.http, &e1, "u-ho").await;
    env.publish(&[event("ho-2", "u-ho", "c2")]).await;
    assert!(
        eventually(WAIT, || async {
            held_count(&s, "u-ho").await == 2 && env.settled(&a.http).await
        })
        .await
    );
    a.kill9();
    publish_subscription(&env, &accept("s-ho", "u-ho")).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            held_count(&s, "u-ho").await == 0 && env.settled(&b.http).await
        })
        .await,
        "the standby took over and released the held events"
    );
    let delivered = env.sim.delivered();
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(delivered[0]["event_ids"], json!(["ho-1", "ho-2"]));
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    drop(b);
    env.cleanup().await;
}

#[tokio::test]
async fn direct_mode_an_event_held_for_want_of_an_openid_expires_without_an_errcode() {
    let mut env = ledger_env("direct-exp").await;
    let path = direct_config(&env);
    env.set("NOTIFIER_CONFIG", path.to_str().unwrap());
    env.set("NOTIFIER_HOLD_FOR", "2s");
    env.declare().await;
    let svc = env.start_service().await;
    let s = store(&env.settings()).await;
    let e1 = event("dx-1", "u-dx", "c1");
    env.publish(std::slice::from_ref(&e1)).await;
    assert!(
        eventually(WAIT, || async { env.ready(&env.dead_queue()).await == 1 }).await,
        "dead-lettered once NOTIFIER_HOLD_FOR passed"
    );
    let dead = dead_letters(&env).await;
    let (reason, errcode, body) = &dead[0];
    assert_eq!(reason.as_deref(), Some("no_subscription"));
    assert_eq!(*errcode, None, "no errcode for want of an openid");
    assert_eq!(serde_json::from_slice::<Value>(body).unwrap(), e1);
    assert!(eventually(WAIT, || async { held_count(&s, "u-dx").await == 0 }).await);
    assert!(env.sim.delivered().is_empty());
    svc.stop().await;
    env.cleanup().await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn a_release_refused_for_good_dead_letters_its_events_wechat_rejected_and_the_accept_is_acked(
) {
    let env = ledger_env("refused").await;
    let e1 = event("rf-1", "u-rf", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let svc = env.start_service().await;
    let s = store(&env.settings()).await;
    hold_first(&env, &s, &svc.http, &e1, "u-rf").await;
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(40003), Some(1)));
    publish_subscription(&env, &accept("s-rf", "u-rf")).await;
    assert!(
        eventually(WAIT, || async {
            env.ready(&env.dead_queue()).await == 1 && env.settled(&svc.http).await
        })
        .await,
        "the refused release dead-letters the held event, the accept is acked"
    );
    let dead = dead_letters(&env).await;
    let (reason, errcode, body) = &dead[0];
    assert_eq!(reason.as_deref(), Some("wechat_rejected"));
    assert_eq!(*errcode, Some(40003));
    assert_eq!(serde_json::from_slice::<Value>(body).unwrap(), e1);
    assert_eq!(held_count(&s, "u-rf").await, 0, "it left the ledger");
    assert!(env.sim.delivered().is_empty());
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_release_that_fails_for_now_is_retried_and_counts_the_credit_once() {
    let env = ledger_env("transient").await;
    let e1 = event("tr-1", "u-tr", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let svc = env.start_service().await;
    let s = store(&env.settings()).await;
    hold_first(&env, &s, &svc.http, &e1, "u-tr").await;
    env.sim
        .push_fault(fault_for(&e1, FaultAction::Http(500), Some(2)));
    publish_subscription(&env, &accept("s-tr", "u-tr")).await;
    assert!(
        eventually(WAIT, || async {
            env.sim.delivered().len() == 1
                && env.settled(&svc.http).await
                && held_count(&s, "u-tr").await == 0
        })
        .await,
        "released after the 500s"
    );
    assert_eq!(
        notice_calls_for(&env, "u-tr").len(),
        4,
        "43101, 500, 500, 0"
    );
    assert_eq!(env.sim.delivered()[0]["event_ids"], json!(["tr-1"]));
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    let after = s.user("u-tr", TEMPLATE).await.unwrap();
    assert_eq!(
        (after.credit.count, after.credit.exact),
        (0, true),
        "one accept, one credit, spent once"
    );
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn nothing_expires_while_its_release_is_being_tried() {
    let mut env = ledger_env("untried").await;
    env.set("NOTIFIER_HOLD_FOR", "2s");
    let e1 = event("un-1", "u-un", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let svc = env.start_service().await;
    let s = store(&env.settings()).await;
    hold_first(&env, &s, &svc.http, &e1, "u-un").await;
    // The release fails for now, again and again: its events stay claimed.
    env.sim
        .push_fault(fault_for(&e1, FaultAction::Http(503), None));
    publish_subscription(&env, &accept("s-un", "u-un")).await;
    assert!(
        eventually(WAIT, || async { notice_calls_for(&env, "u-un").len() >= 2 }).await,
        "the release was tried"
    );
    let counted = s.user("u-un", TEMPLATE).await.unwrap();
    assert_eq!((counted.credit.count, counted.credit.exact), (1, true));
    // Past NOTIFIER_HOLD_FOR (and several sweeps, one a second): still held.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(env.ready(&env.dead_queue()).await, 0, "not expired");
    assert_eq!(held_count(&s, "u-un").await, 1);
    env.sim.clear_faults();
    // One release cycle (three in-memory retries, then the accept parked for
    // 1 s) takes several seconds, more on a loaded machine: allow a few.
    assert!(
        eventually(Duration::from_secs(40), || async {
            env.sim.delivered().len() == 1 && held_count(&s, "u-un").await == 0
        })
        .await,
        "released once WeChat answers"
    );
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_credit_probe_makes_one_real_call_and_the_notice_covers_the_held_events_first() {
    let mut env = ledger_env("probe").await;
    env.set("NOTIFIER_CREDIT_PROBE", "1s");
    let e1 = event("pr-1", "u-pr", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let svc = env.start_service().await;
    let s = store(&env.settings()).await;
    hold_first(&env, &s, &svc.http, &e1, "u-pr").await;
    // An accept that never reached the ledger: WeChat has a credit.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    env.publish(&[event("pr-2", "u-pr", "c2")]).await;
    assert!(
        eventually(WAIT, || async {
            env.sim.delivered().len() == 1
                && env.settled(&svc.http).await
                && held_count(&s, "u-pr").await == 0
        })
        .await,
        "the probe's call is accepted"
    );
    let n = &env.sim.delivered()[0];
    assert_eq!(n["event_ids"], json!(["pr-1", "pr-2"]), "held first");
    assert_eq!(n["customer_count"], 2);
    assert_eq!(notice_calls_for(&env, "u-pr").len(), 2);
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn batch_max_bounds_the_window_not_the_held_part_of_a_release() {
    let mut env = ledger_env("batchmax").await;
    env.set("NOTIFIER_BATCH_MAX", "2");
    let e1 = event("bm-1", "u-bm", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let svc = env.start_service().await;
    let s = store(&env.settings()).await;
    hold_first(&env, &s, &svc.http, &e1, "u-bm").await;
    env.publish(&[event("bm-2", "u-bm", "c2"), event("bm-3", "u-bm", "c3")])
        .await;
    assert!(
        eventually(WAIT, || async {
            held_count(&s, "u-bm").await == 3 && env.settled(&svc.http).await
        })
        .await
    );
    publish_subscription(&env, &accept("s-bm", "u-bm")).await;
    assert!(
        eventually(WAIT, || async {
            held_count(&s, "u-bm").await == 0 && env.settled(&svc.http).await
        })
        .await
    );
    let delivered = env.sim.delivered();
    assert_eq!(delivered.len(), 1, "one release: {delivered:?}");
    assert_eq!(delivered[0]["event_ids"], json!(["bm-1", "bm-2", "bm-3"]));
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_counted_credit_not_yet_tried_releases_the_held_events_instead_of_expiring_them() {
    let mut env = ledger_env("untried").await;
    env.set("NOTIFIER_HOLD_FOR", "2s");
    let e1 = event("ut-1", "u-ut", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let svc = env.start_service().await;
    let s = store(&env.settings()).await;
    hold_first(&env, &s, &svc.http, &e1, "u-ut").await;
    svc.stop().await;
    // An accept counted by a replica that stopped before its release.
    s.subscription("s-ut", "u-ut", TEMPLATE, None, Status::Accept)
        .await
        .unwrap();
    // The event is now held longer than NOTIFIER_HOLD_FOR.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let svc = env.start_service().await;
    assert!(
        eventually(WAIT, || async {
            env.sim.delivered().len() == 1 && held_count(&s, "u-ut").await == 0
        })
        .await,
        "the sweep releases it"
    );
    assert_eq!(env.sim.delivered()[0]["event_ids"], json!(["ut-1"]));
    assert_eq!(env.ready(&env.dead_queue()).await, 0, "not expired");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_during_a_release_that_took_a_window_along_repeats_the_same_notice_and_acks_the_copies(
) {
    let mut env = ledger_env("kill-win").await;
    env.set("NOTIFIER_HOLD_FOR", "20s");
    env.set("NOTIFIER_BATCH_WINDOW_MS", "2000");
    let e1 = event("w-1", "u-kw", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let s = store(&env.settings()).await;
    let mut a = env.spawn_process();
    hold_first(&env, &s, &a.http, &e1, "u-kw").await;
    // The release (e1 and the open window's w-2) is slow at WeChat: the
    // replica dies while the call is open, before any ack or ledger update.
    env.sim
        .push_fault(fault_for(&e1, FaultAction::DelayMs(3000), Some(1)));
    env.publish(&[event("w-2", "u-kw", "c2")]).await;
    publish_subscription(&env, &accept("s-kw", "u-kw")).await;
    assert!(
        eventually(WAIT, || async { env.sim.in_flight() == 1 }).await,
        "the release is at WeChat"
    );
    let claimed: Vec<String> = sqlx::query_scalar(
        "SELECT event_id FROM held WHERE user_id = 'u-kw' AND claimed_by IS NOT NULL ORDER BY event_id",
    )
    .fetch_all(&mut pg(&env).await)
    .await
    .unwrap();
    assert_eq!(
        claimed,
        ["w-1", "w-2"],
        "the window's event is claimed with the held one"
    );
    a.kill9();

    let b = env.spawn_process();
    assert!(
        eventually(Duration::from_secs(30), || async {
            env.sim.in_flight() == 0
                && held_count(&s, "u-kw").await == 0
                && env.consumers(&env.queue()).await == 1
                && env.settled(&b.http).await
        })
        .await,
        "the claimed events are sent again and the redelivered copies acked"
    );
    let delivered = env.sim.delivered();
    assert!(
        (1..=2).contains(&delivered.len()),
        "at most one repeat: {delivered:?}"
    );
    for n in &delivered {
        assert_eq!(n["event_ids"], json!(["w-1", "w-2"]));
        assert_eq!(n["notice_id"], delivered[0]["notice_id"], "the same notice");
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM held WHERE user_id = 'u-kw'")
        .fetch_one(&mut pg(&env).await)
        .await
        .unwrap();
    assert_eq!(left, 0, "no row left, the window's neither");
    let after = s.user("u-kw", TEMPLATE).await.unwrap();
    assert_eq!(
        (after.credit.count, after.credit.exact),
        (0, true),
        "the one accept's credit was spent once"
    );
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    drop(b);
    env.cleanup().await;
}
