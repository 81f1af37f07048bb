//! The broker going away mid-run (`rabbitmqctl stop_app` / `start_app`): the
//! service reconnects by itself and everything is delivered.
//!
//! This stops the shared broker, so it is in `tests/alone` (see its `main.rs`).

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::{eventually, ids, unacked, wait_until, TestEnv};

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_reconnects_after_the_broker_restarts_and_delivers_everything() {
    common::broker_lock::alone().await;
    let mut env = TestEnv::new("restart").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "3000");
    env.declare().await;
    let svc = env.start_service().await;
    let queue = env.queue();
    assert!(
        eventually(Duration::from_secs(30), || async {
            env.consumers(&queue).await == 1
        })
        .await,
        "the service consumes"
    );
    // These sit in open windows, unacked, when the broker goes away.
    let before = env.bulk(20, 5, false);
    env.publish(&before).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.ready(&queue).await == 0 && unacked(&svc.http).await == Some(20)
        })
        .await,
        "the service holds the events before the broker stops"
    );

    rabbitmqctl(&["stop_app"]);
    assert!(
        eventually(Duration::from_secs(10), || async {
            common::metric(&svc.http, "wechat_notifier_consuming", "").await == 0.0
        })
        .await,
        "the service saw the broker go"
    );
    // Returns once the broker's application runs again; the service has been
    // failing to reconnect all the while.
    rabbitmqctl(&["start_app"]);

    env.reconnect().await;
    let after = env.bulk(20, 5, false);
    env.publish(&after).await;
    let mut want = ids(&after);
    want.extend(ids(&before));
    assert!(
        wait_until(Duration::from_secs(60), || want
            .is_subset(&env.notified_ids()))
        .await,
        "events held during the restart and published after it are delivered"
    );
    let ready = common::metric(&svc.http, "wechat_notifier_consuming", "").await;
    assert_eq!(ready, 1.0, "consuming again");
    svc.stop().await;
    assert!(env.drain(&env.dead_queue()).await.is_empty());
    env.cleanup().await;
}
