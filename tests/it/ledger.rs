//! The grant ledger (subscription credits in PostgreSQL): a `43101` holds the
//! notice instead of dead-lettering it, an exact 0 saves the call, the next
//! accept releases one summary of everything that waited. Real RabbitMQ,
//! real PostgreSQL (each test its own schema), the in-process simulator.

use crate::common;

use std::time::Duration;

use common::ledger::{
    event, ledger_env, notice_calls_for, publish_subscription, store, subscription, TEMPLATE,
};
use common::{eventually, fault_for, TestEnv};
use serde_json::{json, Value};
use wechat_notifier::ledger::store::{HoldArgs, HoldDone, ToHold};
use wechat_notifier::ledger::Status;
use wechat_notifier::sim::FaultAction;

#[tokio::test]
async fn a_43101_holds_the_notice_an_exact_zero_saves_the_call_and_an_accept_releases_one_summary()
{
    let env = ledger_env("hold").await;
    let e1 = event("h-1", "u-hold", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let svc = env.start_service().await;
    env.publish(std::slice::from_ref(&e1)).await;
    let s = store(&env.settings()).await;

    // Held: written to the ledger, acked, nothing dead-lettered.
    assert!(
        eventually(Duration::from_secs(10), || async {
            s.held_of("u-hold").await.unwrap().len() == 1 && env.settled(&svc.http).await
        })
        .await,
        "the 43101 notice is held and its message acked"
    );
    assert_eq!(
        env.ready(&env.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    assert_eq!(notice_calls_for(&env, "u-hold").len(), 1);
    let held = s.user("u-hold", TEMPLATE).await.unwrap();
    assert_eq!((held.credit.count, held.credit.exact), (0, true));

    // The next event meets an exact 0: held without a call.
    env.publish(&[event("h-2", "u-hold", "c2")]).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            s.held_of("u-hold").await.unwrap().len() == 2 && env.settled(&svc.http).await
        })
        .await
    );
    assert_eq!(
        notice_calls_for(&env, "u-hold").len(),
        1,
        "an exact 0 saves the call"
    );
    assert_eq!(
        common::metric(&svc.http, "wechat_notifier_ledger_calls_saved_total", "").await,
        1.0
    );

    // Operators see it: `ledger held` and `ledger show` (names only when asked).
    let out = env.command(&["ledger", "held", "--json"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let held: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(held[0]["user_id"], "u-hold");
    assert_eq!(held[0]["held_events"], 2);
    assert_eq!(held[0]["reason"], "no_credit");
    let out = env.command(&["ledger", "show", "u-hold"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("h-1") && text.contains("h-2"),
        "{text}"
    );
    assert!(
        !text.contains("客户c1"),
        "no customer name without --names: {text}"
    );
    let out = env.command(&["ledger", "show", "u-hold", "--names"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("客户c1"));

    // The accept releases one notice with both events, oldest first.
    publish_subscription(&env, &subscription("s-1", "u-hold", TEMPLATE, "accept")).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            s.held_of("u-hold").await.unwrap().is_empty() && env.settled(&svc.http).await
        })
        .await,
        "the accept releases the held events"
    );
    let delivered = env.sim.delivered();
    assert_eq!(delivered.len(), 1, "one summary: {delivered:?}");
    let n = &delivered[0];
    assert_eq!(n["event_ids"], json!(["h-1", "h-2"]));
    assert_eq!(n["customer_count"], 2);
    assert_eq!(n["summary"], true);
    assert_eq!(n["template_id"], TEMPLATE);
    assert_eq!(n["assignee"]["openid"], "o-u-hold", "the ledger's openid");
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    let after = s.user("u-hold", TEMPLATE).await.unwrap();
    assert_eq!(
        (after.credit.count, after.credit.exact),
        (0, true),
        "the accept's credit was spent"
    );
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn with_the_ledger_off_a_subscription_event_is_dead_lettered_no_ledger() {
    let env = TestEnv::new("noledger").await;
    env.declare().await;
    // A binding left by an earlier run with the ledger on.
    env.channel
        .queue_bind(
            env.queue().as_str().into(),
            env.exchange().as_str().into(),
            "subscription.changed".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let svc = env.start_service().await;
    publish_subscription(&env, &subscription("s-off-1", "u-x", TEMPLATE, "accept")).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.ready(&env.dead_queue()).await == 1
        })
        .await
    );
    let dead = env.drain(&env.dead_queue()).await;
    let reason = wechat_notifier::broker::header_str(&dead[0].1, "x-notifier-reason");
    assert_eq!(reason.as_deref(), Some("no_ledger"));
    let body: Value = serde_json::from_slice(&dead[0].0).unwrap();
    assert_eq!(body["event_id"], "s-off-1", "the original body is kept");
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_redelivered_subscription_event_counts_once_off_zeroes_and_reject_changes_nothing() {
    let env = ledger_env("count").await;
    let s = store(&env.settings()).await;
    let a = s
        .subscription("sub-1", "u-c", TEMPLATE, Some("o-c"), Status::Accept)
        .await
        .unwrap();
    assert!(a.counted);
    assert_eq!((a.credit.count, a.credit.exact), (1, false));
    let again = s
        .subscription("sub-1", "u-c", TEMPLATE, None, Status::Accept)
        .await
        .unwrap();
    assert!(!again.counted, "the same event id counts once");
    assert_eq!(again.credit.count, 1);
    assert_eq!(
        again.openid.as_deref(),
        Some("o-c"),
        "an absent openid keeps the known one"
    );
    let r = s
        .subscription("sub-2", "u-c", TEMPLATE, None, Status::Reject)
        .await
        .unwrap();
    assert_eq!((r.credit.count, r.credit.version), (1, a.credit.version));
    let off = s
        .subscription("sub-3", "u-c", TEMPLATE, None, Status::Off)
        .await
        .unwrap();
    assert_eq!((off.credit.count, off.credit.exact), (0, true));
    // Another template's count is its own.
    let other = s
        .subscription("sub-4", "u-c", "another-template", None, Status::Accept)
        .await
        .unwrap();
    assert_eq!(other.credit.count, 1);
    assert_eq!(s.user("u-c", TEMPLATE).await.unwrap().credit.count, 0);
}

#[tokio::test]
async fn a_hold_after_a_credit_was_counted_is_refused_and_a_decrement_counts_once_per_notice() {
    let env = ledger_env("guard").await;
    let s = store(&env.settings()).await;
    let read = s.user("u-g", TEMPLATE).await.unwrap();
    // An accept counted while the notice was in flight.
    s.subscription("sub-g1", "u-g", TEMPLATE, None, Status::Accept)
        .await
        .unwrap();
    let ev = ToHold {
        event_id: "g-1".into(),
        body: b"{}".to_vec(),
        traceparent: None,
        attempts: 0,
    };
    let hold = |version: i64| HoldArgs {
        user_id: "u-g".into(),
        notice_id: "n-0".into(),
        events: vec![ev.clone()],
        reason: "no_credit",
        errcode: Some(43101),
        guard_version: Some(version),
        ..HoldArgs::default()
    };
    let refused = s.hold(TEMPLATE, &hold(read.credit.version)).await.unwrap();
    assert_eq!(refused, HoldDone::CreditCounted);
    assert!(
        s.held_of("u-g").await.unwrap().is_empty(),
        "nothing written"
    );
    // With the current version it holds, once per event id.
    let v = s.user("u-g", TEMPLATE).await.unwrap().credit.version;
    for _ in 0..2 {
        let done = s.hold(TEMPLATE, &hold(v)).await.unwrap();
        assert!(matches!(done, HoldDone::Held { held: 1, .. }), "{done:?}");
    }
    // A decrement is keyed by its notice id.
    s.subscription("sub-g2", "u-g", TEMPLATE, None, Status::Accept)
        .await
        .unwrap();
    s.subscription("sub-g3", "u-g", TEMPLATE, None, Status::Accept)
        .await
        .unwrap();
    let first = s.accepted("n-1", "u-g", TEMPLATE).await.unwrap();
    let again = s.accepted("n-1", "u-g", TEMPLATE).await.unwrap();
    assert_eq!(first.credit.map(|c| c.count), Some(1));
    assert!(again.credit.is_none(), "a retried commit counts once");
    assert_eq!(s.user("u-g", TEMPLATE).await.unwrap().credit.count, 1);
}

#[tokio::test]
async fn an_accept_for_another_template_does_not_release() {
    let env = ledger_env("other").await;
    let e1 = event("o-1", "u-other", "c1");
    env.sim
        .push_fault(fault_for(&e1, FaultAction::FunctionErrcode(43101), Some(1)));
    env.declare().await;
    let svc = env.start_service().await;
    env.publish(std::slice::from_ref(&e1)).await;
    let s = store(&env.settings()).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            s.held_of("u-other").await.unwrap().len() == 1 && env.settled(&svc.http).await
        })
        .await
    );
    publish_subscription(
        &env,
        &subscription("s-o1", "u-other", "not-our-template", "accept"),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.settled(&svc.http).await
        })
        .await
    );
    assert_eq!(s.held_of("u-other").await.unwrap().len(), 1, "still held");
    assert!(env.sim.delivered().is_empty());
    svc.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_ledger_that_cannot_be_reached_keeps_the_replica_from_consuming_and_readyz_names_it() {
    let mut env = ledger_env("down").await;
    env.set(
        "NOTIFIER_LEDGER_URL",
        "postgres://postgres:hunter2@127.0.0.1:1/postgres",
    );
    env.declare().await;
    let svc = env.start_service().await;
    env.publish(&[event("d-1", "u-down", "c1")]).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            let (code, body) = common::readyz(&svc.http).await;
            code == 503 && body.contains("ledger")
        })
        .await,
        "/readyz 503 naming the ledger"
    );
    assert_eq!(env.ready(&env.queue()).await, 1, "not consumed");
    assert!(env.sim.notice_calls().is_empty());
    let (_, body) = common::readyz(&svc.http).await;
    assert!(!body.contains("hunter2"), "no password in /readyz: {body}");
    svc.stop().await;
    env.cleanup().await;
}
