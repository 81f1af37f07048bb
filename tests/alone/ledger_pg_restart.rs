//! The grant ledger's PostgreSQL stopped during a hold and during a release
//! (contract 8.3 and 8.8): nothing is dead-lettered, `/readyz` answers 503
//! naming the ledger, and everything is delivered once it is back.
//!
//! STOPS THE SHARED PostgreSQL (`pg_ctlcluster 15 main stop`), so it lives
//! alone in its own test binary (`cargo test` runs binaries one after
//! another), and beside other agents it runs only under the exclusive lock:
//! `flock -x /tmp/broker.lock cargo test --test ledger_pg_restart`. A guard
//! starts the server again even when the test fails.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::{eventually, fault_for, TestEnv};
use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;
use serde_json::{json, Value};
use wechat_notifier::ledger::store::Store;
use wechat_notifier::sim::FaultAction;

const TEMPLATE: &str = "tmpl-ledger-test";
const WAIT: Duration = Duration::from_secs(30);

fn ledger_url() -> String {
    std::env::var("NOTIFIER_TEST_LEDGER_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Runs `pg_ctlcluster` on the machine's cluster, with every descriptor
/// above stderr closed: a server started by a process that holds a lock
/// file (a `flock` around the test run) must not keep that lock.
fn pg_ctl(action: &str) -> bool {
    let script = format!(
        "i=3; while [ $i -lt 256 ]; do eval \"exec $i>&-\" 2>/dev/null; i=$((i+1)); done; \
         exec pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -n 1) main {action}"
    );
    // bash: dash's `exec` takes one-digit descriptors only.
    Command::new("bash")
        .args(["-c", &script])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// PostgreSQL stopped until this is dropped (also when the test panics).
struct Stopped;

impl Stopped {
    fn now() -> Stopped {
        assert!(pg_ctl("stop"), "pg_ctlcluster stop");
        Stopped
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !pg_ctl("start") {
            eprintln!("PostgreSQL did not start again: run `pg_ctlcluster <version> main start`");
        }
    }
}

fn event(id: &str, user: &str) -> Value {
    json!({
        "event_id": id,
        "event_type": "customer.assigned",
        "occurred_at": chrono::Utc::now().to_rfc3339(),
        "source": "web",
        "assignee": {"user_id": user, "name": "张三"},
        "customer": {"id": id, "name": format!("客户{id}")},
    })
}

async fn publish_accept(env: &TestEnv, id: &str, user: &str) {
    let body = json!({
        "event_id": id,
        "event_type": "subscription.changed",
        "occurred_at": chrono::Utc::now().to_rfc3339(),
        "user": {"user_id": user, "openid": format!("o-{user}")},
        "template_id": TEMPLATE,
        "status": "accept",
    });
    env.channel
        .basic_publish(
            env.exchange().as_str().into(),
            "subscription.changed".into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&body).unwrap(),
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

fn calls_for(env: &TestEnv, user: &str) -> usize {
    env.sim
        .notice_calls()
        .iter()
        .filter(|c| c.body["notice"]["assignee"]["user_id"] == user)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_stopped_during_a_hold_and_a_release_dead_letters_nothing_and_delivers_all_once_back(
) {
    common::broker_lock::alone().await;
    let mut env = TestEnv::new("pgstop").await;
    env.set("NOTIFIER_LEDGER_URL", &ledger_url());
    env.set(
        "NOTIFIER_LEDGER_SCHEMA",
        &format!("t_pgstop_{:08x}", fastrand::u32(..)),
    );
    env.set("WECHAT_TEMPLATE_ID", TEMPLATE);
    // Were the ledger's trouble counted as attempts, the third would dead-letter.
    env.set("NOTIFIER_MAX_ATTEMPTS", "2");
    let settings = env.settings();
    let s = Store::connect(settings.ledger.as_ref().unwrap(), None).unwrap();
    s.migrate().await.unwrap();

    // u-rel: an event held (43101) before the ledger goes.
    let held = event("p-1", "u-rel");
    env.sim.push_fault(fault_for(
        &held,
        FaultAction::FunctionErrcode(43101),
        Some(1),
    ));
    env.declare().await;
    let svc = env.start_service().await;
    env.publish(std::slice::from_ref(&held)).await;
    assert!(
        eventually(WAIT, || async {
            s.held_of("u-rel").await.is_ok_and(|h| h.len() == 1) && env.settled(&svc.http).await
        })
        .await,
        "held before the ledger stops"
    );

    let stopped = Stopped::now();
    // u-hold: its notices answer 43101 while the ledger is away (a hold it cannot write).
    let to_hold = event("p-2", "u-hold");
    env.sim.push_fault(fault_for(
        &to_hold,
        FaultAction::FunctionErrcode(43101),
        None,
    ));
    env.publish(std::slice::from_ref(&to_hold)).await;
    // u-rel's accept: its release needs the ledger.
    publish_accept(&env, "s-p1", "u-rel").await;
    // u-ok: in credit, delivered and acked without the ledger.
    env.publish(&[event("p-3", "u-ok")]).await;
    assert!(
        eventually(WAIT, || async { env.notified_ids().contains("p-3") }).await,
        "a notice answered 0 goes while the ledger is away"
    );
    // Parked (not an attempt), and its copy parked again while the ledger
    // cannot say whether it holds the event: round the retry queue, never
    // dead-lettered (with MAX_ATTEMPTS=2, counted attempts would be).
    assert!(
        eventually(WAIT, || async {
            calls_for(&env, "u-hold") >= 1
                && common::metric(&svc.http, "wechat_notifier_retries_total", "").await >= 3.0
        })
        .await,
        "the notice that cannot be held goes round the retry queue: {} calls, {} parked",
        calls_for(&env, "u-hold"),
        common::metric(&svc.http, "wechat_notifier_retries_total", "").await
    );
    let (code, body) = common::readyz(&svc.http).await;
    assert_eq!(code, 503, "/readyz: {body}");
    assert!(body.contains("ledger"), "/readyz names the ledger: {body}");
    assert!(
        common::metric(&svc.http, "wechat_notifier_ledger_errors_total", "").await > 0.0,
        "a metric counts the ledger's trouble"
    );
    assert_eq!(
        env.ready(&env.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    assert_eq!(
        env.sim.delivered().len(),
        1,
        "nothing released without the ledger"
    );

    env.sim.clear_faults();
    drop(stopped);
    assert!(
        eventually(Duration::from_secs(60), || async {
            env.sim.delivered().len() == 3
                && env.settled(&svc.http).await
                && s.held_of("u-rel").await.is_ok_and(|h| h.is_empty())
        })
        .await,
        "everything delivered once the ledger is back: {:?}",
        env.sim.delivered()
    );
    let mut ids: Vec<String> = common::event_ids_of(&env.sim.delivered())
        .into_iter()
        .collect();
    ids.sort();
    assert_eq!(ids, ["p-1", "p-2", "p-3"]);
    assert_eq!(
        env.ready(&env.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    assert!(
        eventually(WAIT, || async { common::readyz(&svc.http).await.0 == 200 }).await,
        "/readyz 200 again"
    );
    svc.stop().await;
    env.cleanup().await;
}
