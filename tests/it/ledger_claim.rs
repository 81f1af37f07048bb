//! A notice's claim on the grant ledger (contract 8.4 and 8.8): an accept
//! that took a window along is acked only once its release was done. Real
//! RabbitMQ, real PostgreSQL (each test its own schema), the in-process
//! simulator.

use crate::common;

use std::time::Duration;

use common::ledger::{
    event, ledger_env, ledger_url, publish_subscription, store, subscription, TEMPLATE,
};
use common::{eventually, readyz, TestEnv};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use wechat_notifier::ledger::store::{Along, Store, ToHold};

const WAIT: Duration = Duration::from_secs(30);

async fn held_count(s: &Store, user: &str) -> usize {
    s.held_of(user).await.map(|h| h.len()).unwrap_or(usize::MAX)
}

fn schema(env: &TestEnv) -> String {
    env.settings().ledger.expect("ledger on").schema.clone()
}

/// A connection of the test's own to the ledger's schema.
async fn pg(env: &TestEnv) -> PgConnection {
    let mut c = PgConnection::connect(&ledger_url()).await.unwrap();
    sqlx::query(&format!("SET search_path TO {}", schema(env)))
        .execute(&mut c)
        .await
        .unwrap();
    c
}

/// Holds `e` for `user` at an exact 0, as after a `43101`.
async fn held_at_zero(s: &Store, user: &str, e: &Value) {
    s.hold(
        user,
        TEMPLATE,
        "",
        &[ToHold {
            event_id: e["event_id"].as_str().unwrap().into(),
            body: serde_json::to_vec(e).unwrap(),
            traceparent: None,
            attempts: 0,
        }],
        "no_credit",
        Some(43101),
        Some(0),
        Along::default(),
    )
    .await
    .unwrap();
}

/// 8.4: an accept takes the user's open window along, and the claim of the
/// held events fails (the test locks the table against row locks; the
/// count is recorded): the window goes alone, and the accept is not acked
/// without its release; it waits in a retry queue (not as a failed
/// attempt) and releases the held event once the ledger answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_that_took_a_window_along_is_not_acked_before_its_release() {
    let mut env = ledger_env("claim-window").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "2000");
    let h1 = event("cw-1", "u-cw", "c1");
    env.declare().await;
    let s = store(&env.settings()).await;
    held_at_zero(&s, "u-cw", &h1).await;
    let svc = env.start_service().await;
    assert!(
        eventually(WAIT, || async { readyz(&svc.http).await.0 == 200 }).await,
        "ready"
    );
    let mut c = pg(&env).await;
    sqlx::query("BEGIN").execute(&mut c).await.unwrap();
    sqlx::query("LOCK TABLE held IN EXCLUSIVE MODE")
        .execute(&mut c)
        .await
        .unwrap();
    env.publish(&[event("cw-2", "u-cw", "c2")]).await;
    publish_subscription(&env, &subscription("s-cw", "u-cw", TEMPLATE, "accept")).await;
    assert!(
        eventually(WAIT, || async { env.sim.delivered().len() == 1 }).await,
        "the window goes alone once the claim failed"
    );
    assert_eq!(env.sim.delivered()[0]["event_ids"], json!(["cw-2"]));
    sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
    // Well before the first sweep (30 s after the start) could release it.
    assert!(
        eventually(Duration::from_secs(8), || async {
            env.sim.delivered().len() == 2 && env.settled(&svc.http).await
        })
        .await,
        "the accept came back and released the held event: {:?}",
        env.sim.delivered()
    );
    assert_eq!(env.sim.delivered()[1]["event_ids"], json!(["cw-1"]));
    assert_eq!(held_count(&s, "u-cw").await, 0);
    assert_eq!(
        env.ready(&env.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    svc.stop().await;
    env.cleanup().await;
}
