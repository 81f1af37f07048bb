//! The JavaScript halves, run with the machine's Node.js: the cloud function's
//! own tests (`node --test`, against the hand-made fake of wx-server-sdk), the
//! mini program's (`node --test`, against a hand-made fake of `wx`), and
//! the CRM's NestJS publisher example, built and run for real against the
//! broker while the service delivers what it published.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use common::{eventually, wait_until, TestEnv};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;
use wechat_notifier::broker::ROUTING_KEY;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(dir: &Path, program: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .envs(envs.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("{program} runs (Node.js 20 or newer is needed): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} in {}: {}\n{}\n{}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_cloud_functions_node_tests_pass() {
    let dir = root().join("cloudfunction/quickstartFunctions");
    let out = run(
        &dir,
        "node",
        &["--test", "test/"],
        &[("NODE_PATH", "test/fake_modules")],
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("# fail 0"), "{report}");
    assert!(!report.contains("# pass 0"), "tests ran: {report}");
}

#[test]
fn the_mini_programs_node_tests_pass() {
    let dir = root().join("miniprogram");
    let out = run(&dir, "node", &["--test", "test/"], &[]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("# fail 0"), "{report}");
    assert!(!report.contains("# pass 0"), "tests ran: {report}");
}

/// Installs (from the lock file) and compiles the example, once per test binary.
fn build_example(dir: &Path) {
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if *built {
        return;
    }
    if !dir.join("node_modules/.package-lock.json").exists() {
        run(
            dir,
            "npm",
            &["ci", "--prefer-offline", "--no-audit", "--no-fund"],
            &[],
        );
    }
    // tsc takes seconds here: skip it when its output is newer than every input.
    if !built_is_current(dir) {
        run(dir, "npm", &["run", "--silent", "build"], &[]);
    }
    *built = true;
}

/// Whether `dist/main.js` is newer than the sources, the TypeScript settings
/// and the installed packages.
fn built_is_current(dir: &Path) -> bool {
    fn newest(path: &Path) -> Option<SystemTime> {
        let meta = std::fs::metadata(path).ok()?;
        let mut time = meta.modified().ok()?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).ok()? {
                time = time.max(newest(&entry.ok()?.path())?);
            }
        }
        Some(time)
    }
    let Some(built) = newest(&dir.join("dist/main.js")) else {
        return false;
    };
    let inputs = [
        "src",
        "tsconfig.json",
        "package.json",
        "node_modules/.package-lock.json",
    ];
    inputs
        .iter()
        .all(|input| newest(&dir.join(input)).is_some_and(|t| t < built))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nestjs_publisher_example_ends_in_notices() {
    let dir = root().join("examples/crm-publisher");
    tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || build_example(&dir)
    })
    .await
    .unwrap();

    let env = TestEnv::new("nestjs").await;
    env.declare().await;
    // A tap on the CRM's exchange, to see the messages as the broker got them.
    let tap = format!("{}.tap", env.prefix);
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(120_000));
    env.channel
        .queue_declare(tap.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    env.channel
        .queue_bind(
            tap.as_str().into(),
            env.exchange().as_str().into(),
            ROUTING_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let svc = env.start_service().await;

    let exchange = env.exchange();
    let prefix = format!("{}-", env.prefix);
    let out = tokio::task::spawn_blocking({
        let (dir, url) = (dir.clone(), common::amqp_url());
        move || {
            run(
                &dir,
                "node",
                &[
                    "dist/main.js",
                    "--customers",
                    "30",
                    "--assignees",
                    "3",
                    "--user-prefix",
                    &prefix,
                ],
                &[("AMQP_URL", &url), ("CRM_EXCHANGE", &exchange)],
            )
        }
    })
    .await
    .unwrap();
    let printed: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    let published: BTreeSet<String> = printed["event_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(published.len(), 30);

    assert!(
        wait_until(Duration::from_secs(30), || env.notified_ids() == published).await,
        "every published event is covered by a notice"
    );
    let delivered = env.sim.delivered();
    assert_eq!(delivered.len(), 3, "one notice per assignee");
    for notice in &delivered {
        assert_eq!(notice["customer_count"], 10);
        assert_eq!(notice["source"], "batch");
        assert_eq!(notice["assigned_by"]["name"], "李经理");
    }
    assert!(eventually(Duration::from_secs(30), || env.settled(&svc.http)).await);
    assert!(
        env.drain(&env.dead_queue()).await.is_empty(),
        "none invalid"
    );

    // What the broker received: persistent JSON, message_id = event_id, one batch.
    let mut batch_ids = BTreeSet::new();
    for _ in 0..30 {
        let m = env
            .channel
            .basic_get(tap.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("the tap holds every event");
        let props = &m.delivery.properties;
        let event: Value = serde_json::from_slice(&m.delivery.data).unwrap();
        assert_eq!(props.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            props.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(
            props.message_id().as_ref().map(|s| s.as_str()),
            event["event_id"].as_str()
        );
        assert_eq!(event["batch"]["size"], 30);
        batch_ids.insert(event["batch"]["id"].as_str().unwrap().to_string());
    }
    assert_eq!(batch_ids.len(), 1);
    assert_eq!(
        batch_ids.first().map(String::as_str),
        printed["batch_id"].as_str()
    );

    svc.stop().await;
    let _ = env
        .channel
        .queue_delete(tap.as_str().into(), Default::default())
        .await;
    env.cleanup().await;
}

#[test]
fn the_nestjs_publisher_example_refuses_to_lose_an_unroutable_event() {
    common::broker_lock::share_broker_blocking();
    let dir = root().join("examples/crm-publisher");
    build_example(&dir);
    // An exchange nothing is bound to: the broker returns the events.
    let exchange = format!("t.unrouted.{:08x}", fastrand::u32(..));
    let out = Command::new("node")
        .args(["dist/main.js", "--customers", "2", "--assignees", "1"])
        .current_dir(&dir)
        .env("AMQP_URL", common::amqp_url())
        .env("CRM_EXCHANGE", &exchange)
        .output()
        .unwrap();
    let _ = Command::new("rabbitmqctl")
        .args(["delete_exchange", &exchange])
        .output();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unroutable"), "{stderr}");
}

/// The CRM's handler for the mini program's dialog answers, as its example
/// publishes them: one `subscription.changed` per answer in the shape of the
/// grant ledger's event (persistent JSON, `message_id` = `event_id`, the
/// openid the CRM holds), and a report sent again (same answer id) is the same
/// event, so the ledger counts it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nestjs_subscription_handler_publishes_one_event_per_answer() {
    let dir = root().join("examples/crm-publisher");
    tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || build_example(&dir)
    })
    .await
    .unwrap();

    let env = TestEnv::new("nestjs-sub").await;
    env.declare().await;
    let tap = format!("{}.subscriptions", env.prefix);
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(120_000));
    env.channel
        .queue_declare(tap.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    env.channel
        .queue_bind(
            tap.as_str().into(),
            env.exchange().as_str().into(),
            "subscription.changed".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let user = format!("{}-u1", env.prefix);
    let answers: [(&str, &str); 3] = [("a-1", "accept"), ("a-1", "accept"), ("a-2", "off")];
    let mut printed = Vec::new();
    for (answer_id, status) in answers {
        let out = tokio::task::spawn_blocking({
            let (dir, url, exchange, user) = (
                dir.clone(),
                common::amqp_url(),
                env.exchange(),
                user.clone(),
            );
            move || {
                run(
                    &dir,
                    "node",
                    &[
                        "dist/accept.js",
                        "--user-id",
                        &user,
                        "--openid",
                        "oCrmBound1",
                        "--template",
                        "tpl-assigned",
                        "--status",
                        status,
                        "--answer-id",
                        answer_id,
                    ],
                    &[("AMQP_URL", &url), ("CRM_EXCHANGE", &exchange)],
                )
            }
        })
        .await
        .unwrap();
        let event: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
        printed.push(event);
    }

    let mut received = Vec::new();
    for _ in 0..3 {
        let m = env
            .channel
            .basic_get(tap.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("one message per answer");
        let props = &m.delivery.properties;
        let event: Value = serde_json::from_slice(&m.delivery.data).unwrap();
        assert_eq!(props.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            props.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(
            props.message_id().as_ref().map(|s| s.as_str()),
            event["event_id"].as_str()
        );
        received.push(event);
    }
    for (event, (_, status)) in received.iter().zip(answers) {
        assert_eq!(event["event_type"], "subscription.changed");
        assert_eq!(event["user"]["user_id"], user.as_str());
        assert_eq!(event["user"]["openid"], "oCrmBound1");
        assert_eq!(event["template_id"], "tpl-assigned");
        assert_eq!(event["status"], status);
        let id = event["event_id"].as_str().unwrap();
        assert!((1..=128).contains(&id.chars().count()), "{id}");
        let at = event["occurred_at"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(at).is_ok(),
            "RFC 3339 with an offset: {at}"
        );
    }
    assert_eq!(received, printed, "what the broker got is what was printed");
    assert_eq!(
        received[0]["event_id"], received[1]["event_id"],
        "a report sent again is the same event"
    );
    assert_ne!(received[0]["event_id"], received[2]["event_id"]);

    let _ = env
        .channel
        .queue_delete(tap.as_str().into(), Default::default())
        .await;
    env.cleanup().await;
}
