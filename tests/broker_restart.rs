//! The broker going away mid-run (`rabbitmqctl stop_app` / `start_app`): the
//! service reconnects by itself and everything is delivered.
//!
//! This stops the shared broker, so it lives alone in its own test binary:
//! `cargo test` runs test binaries one after another, never beside each other.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{ids, wait_until, TestEnv};

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_reconnects_after_the_broker_restarts_and_delivers_everything() {
    let mut env = TestEnv::new("restart").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "3000");
    env.declare().await;
    let svc = env.start_service().await;
    let warmup = env.bulk(1, 1, false);
    env.publish(&warmup).await;
    let want = ids(&warmup);
    assert!(
        wait_until(Duration::from_secs(30), || want
            .is_subset(&env.notified_ids()))
        .await
    );
    // These sit in open windows, unacked, when the broker goes away.
    let before = env.bulk(20, 5, false);
    env.publish(&before).await;

    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);

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
