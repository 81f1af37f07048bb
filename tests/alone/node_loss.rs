//! Losing a broker node mid-stream: the local broker grows into a three-node
//! cluster (`scripts/rabbitmq-cluster.sh up`), the work queue's leader and both
//! replicas' connections sit on the second node, and that node is stopped
//! while events stream in. Nothing may be lost.
//!
//! This changes the shared broker, so it has it alone (`tests/alone/main.rs`):
//! a queue another test declared meanwhile would get members on the nodes
//! that leave again. It never stops the machine's own node (port 5672), and
//! shrinks the cluster back on the way out, even when an assertion fails.

use crate::common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{ids, wait_until, TestEnv};
use tokio::time::Instant;
use wechat_notifier::{broker, publish};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/rabbitmq-cluster.sh")
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A three-node cluster for as long as it lives.
struct Cluster {
    /// The running nodes, as the script printed them (`rabbit2@HOST`, ...).
    running: String,
}

impl Cluster {
    fn up() -> Cluster {
        let out = Command::new("bash")
            .arg(script())
            .arg("up")
            .output()
            .expect("the cluster script runs");
        let cluster = Cluster {
            running: String::from_utf8_lossy(&out.stdout).into_owned(),
        };
        assert!(
            cluster.running.contains("rabbit2@") && cluster.running.contains("rabbit3@"),
            "three nodes running: {} {}",
            cluster.running,
            String::from_utf8_lossy(&out.stderr)
        );
        cluster
    }

    /// The full name of node `n` (2 or 3), from the script's output.
    fn node(&self, n: u8) -> String {
        let start = self
            .running
            .find(&format!("rabbit{n}@"))
            .expect("the node is running");
        self.running[start..]
            .split(|c: char| c == '\'' || c == '"' || c.is_whitespace() || c == ',')
            .next()
            .unwrap()
            .to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script()).arg("down").output();
    }
}

fn url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_node_with_the_leader_and_the_connections_loses_nothing() {
    common::broker_lock::alone().await;
    let cluster = Cluster::up();
    let node2 = cluster.node(2);

    let mut env = TestEnv::new("nodeloss").await;
    // The replicas try the second node first: their connections and (declared
    // from there) the work queue's leader live on it.
    env.set("AMQP_URL", &[url(5673), url(5674), url(5672)].join(","));
    env.set("NOTIFIER_BATCH_WINDOW_MS", "200");
    let active = env.spawn_process();
    let standby = env.spawn_process();
    let queue = env.queue();
    assert!(
        wait_until(Duration::from_secs(30), || {
            rabbitmqctl(&[
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "leader",
                "members",
            ])
            .lines()
            .any(|l| {
                l.starts_with(&format!("{queue}\t")) && l.contains(&node2) && l.contains("rabbit3@")
            })
        })
        .await,
        "the work queue is replicated and led from the second node"
    );

    // The CRM publishes through the third node, which stays up.
    let crm = broker::connect(&[url(5674)], "wechat-notifier-test-crm")
        .await
        .expect("the third node");
    let channel = broker::confirm_channel(&crm).await.unwrap();
    let before = env.bulk(40, 8, false);
    let after = env.bulk(40, 8, false);
    let exchange = env.exchange();
    publish::publish_events(&channel, &exchange, &before, Some(40.0), None)
        .await
        .unwrap();

    // Mid-stream, the second node goes away with the leader and both replicas' connections.
    let stopped = Command::new("rabbitmqctl")
        .args(["-n", &node2, "stop_app"])
        .status()
        .unwrap();
    assert!(stopped.success());
    let started = Instant::now();
    let mut published = false;
    for _ in 0..60 {
        if publish::publish_events(&channel, &exchange, &after, Some(40.0), None)
            .await
            .is_ok()
        {
            published = true;
            break;
        }
        // A publish during the leader election may be refused: the CRM publishes again.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        published,
        "the cluster takes events again without the second node"
    );

    let mut want = ids(&before);
    want.extend(ids(&after));
    assert!(
        wait_until(Duration::from_secs(60), || want
            .is_subset(&env.notified_ids()))
        .await,
        "every event is delivered after the node loss ({} of {} after {:?})",
        want.intersection(&env.notified_ids()).count(),
        want.len(),
        started.elapsed()
    );
    assert!(
        env.drain(&env.dead_queue()).await.is_empty(),
        "nothing dead-lettered"
    );
    drop((active, standby));
    let _ = crm.close(200, "bye".into()).await;
    env.cleanup().await;
}
