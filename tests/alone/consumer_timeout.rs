//! A quota pause longer than RabbitMQ's `consumer_timeout`, against the real
//! broker with that timeout lowered. The timeout is a broker-wide setting
//! (RabbitMQ before 3.12 has no per-queue one), so this test has the broker
//! alone (`tests/alone`, see its `main.rs`).

use crate::common;

use std::time::Duration;

use common::{eventually, metric, readyz, TestEnv};
use wechat_notifier::sim::{Api, Fault, FaultAction};

const WAIT: Duration = Duration::from_secs(30);

fn on(api: Api, action: FaultAction, times: Option<u32>) -> Fault {
    Fault {
        api: Some(api),
        user_id: None,
        action,
        times,
    }
}

/// The broker's `consumer_timeout` (and how often it checks it) for the
/// channels opened while this lives; restored when dropped, even on a panic.
struct ConsumerTimeout;

impl ConsumerTimeout {
    fn set(timeout_ms: u64) -> ConsumerTimeout {
        common::rabbitmqctl(&[
            "eval",
            &format!(
                "application:set_env(rabbit, consumer_timeout, {timeout_ms}), \
                 application:set_env(rabbit, channel_tick_interval, 1000)."
            ),
        ]);
        ConsumerTimeout
    }
}

impl Drop for ConsumerTimeout {
    fn drop(&mut self) {
        common::rabbitmqctl(&[
            "eval",
            "application:set_env(rabbit, consumer_timeout, 1800000), \
             application:set_env(rabbit, channel_tick_interval, 60000).",
        ]);
    }
}

/// A daily quota (45009) pauses every call longer than the broker lets a
/// delivery stay unacked: the windows are parked in a retry queue for the
/// pause instead of held, so the broker never closes the channel, nothing is
/// dead-lettered, and /readyz names the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_quota_pause_parks_the_windows_instead_of_holding_them_past_the_consumer_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(6);
    common::broker_lock::alone().await;
    let mut env = TestEnv::new("quota-timeout").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "50");
    // A short first rung: the first pause (2 s) is waited out, the run of
    // 45009s then grows it past what a window may wait.
    env.set("NOTIFIER_RETRY_DELAYS", "2s,30s,2m");
    env.set("NOTIFIER_SHUTDOWN_GRACE", "1s");
    env.declare().await;
    env.sim.push_fault(on(
        Api::InvokeCloudFunction,
        FaultAction::Errcode(45009),
        None,
    ));
    let timeout = ConsumerTimeout::set(TIMEOUT.as_millis() as u64);
    let svc = env.start_service().await;
    assert!(
        eventually(WAIT, || async { readyz(&svc.http).await.0 == 200 }).await,
        "ready"
    );
    let consuming = env.consuming_channels(&env.queue());
    assert_eq!(consuming.len(), 1, "{consuming:?}");

    let events = env.bulk(50, 50, false);
    let published = tokio::time::Instant::now();
    env.publish(&events).await;
    assert!(
        eventually(WAIT, || async {
            let (status, text) = readyz(&svc.http).await;
            status == 503 && text.contains("daily quota") && text.contains("45009")
        })
        .await,
        "/readyz names the pause: {:?}",
        readyz(&svc.http).await
    );
    assert!(
        eventually(WAIT, || async {
            metric(&svc.http, "wechat_notifier_unacked_deliveries", "").await == 0.0
        })
        .await,
        "the windows are parked, not held through the pause"
    );
    // Past the broker's timeout for the first deliveries, which came right
    // after `published` (it checks every second here): still the same
    // channel. (Waiting from `published`, not from the parking, is enough:
    // a copy that comes back from its retry queue meanwhile meets the
    // running pause and is parked again at once.)
    tokio::time::sleep_until(published + TIMEOUT + Duration::from_secs(2)).await;
    assert_eq!(
        env.consuming_channels(&env.queue()),
        consuming,
        "the broker closed no channel"
    );
    drop(timeout);
    assert_eq!(
        env.ready(&env.dead_queue()).await,
        0,
        "nothing dead-lettered"
    );
    assert!(
        eventually(WAIT, || async {
            env.ready_in_work_and_retry().await
                + metric(&svc.http, "wechat_notifier_unacked_deliveries", "").await as u32
                == 50
        })
        .await,
        "every event is still in a queue or held"
    );
    svc.stop().await;
    env.cleanup().await;
}
