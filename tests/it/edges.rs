//! The last edges of the held fault, the token cache and the publisher, each
//! checked where a user would see it: the copies the broker confirmed or
//! failed, the token fetches counted against those WeChat answered, and the
//! times and tokens of the calls WeChat received.

use crate::common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, ids, wait_until, TestEnv};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use wechat_notifier::broker::publisher::MAX_QUEUED;
use wechat_notifier::broker::Publisher;
use wechat_notifier::event::parse;
use wechat_notifier::metrics::Metrics;
use wechat_notifier::notice::Notice;
use wechat_notifier::settings::Settings;
use wechat_notifier::sim::{Api, Call, Fault, FaultAction, Sim, SimConfig};
use wechat_notifier::wechat::{Outcome, WeChat};

const WAIT: Duration = Duration::from_secs(60);

/// A TCP proxy in front of the broker whose forwarding stops while the
/// returned flag is `true` (a blocked connection: bytes are neither lost nor
/// delivered until it is `false` again). Returns the proxy's AMQP URL.
async fn stalling_proxy() -> (String, watch::Sender<bool>) {
    let url = common::amqp_url();
    let uri: lapin::uri::AMQPUri = url.parse().expect("AMQP_URL parses");
    let target = format!("{}:{}", uri.authority.host, uri.authority.port);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stall, stalled) = watch::channel(false);
    let pipe = |mut from: tokio::net::tcp::OwnedReadHalf,
                mut to: tokio::net::tcp::OwnedWriteHalf,
                mut stalled: watch::Receiver<bool>| async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if stalled.wait_for(|s| !*s).await.is_err() {
                break;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let via = url.replacen(&target, &addr.to_string(), 1);
    assert_ne!(via, url, "the proxy stands in for the broker's address");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe(cr, sw, stalled.clone()));
            tokio::spawn(pipe(sr, cw, stalled.clone()));
        }
    });
    (via, stall)
}

/// Issue 24 item 6: a flood of copies (thousands of invalid events
/// dead-lettered at once), and the publisher's connection blocked for a
/// moment in the middle. The copy in flight is not confirmed in time and
/// fails; the copies queued behind it at that moment fail with it, and no
/// others: each failure sends one original back to the queue (one more
/// delivery towards its limit), so at most the queue bound + 1 originals are
/// redelivered, not the rest of the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_fails_mid_flood_fails_only_the_copies_queued_behind_it() {
    const COPIES: usize = 600;
    let env = TestEnv::new("flood").await;
    let queue = format!("{}.copies", env.prefix);
    env.channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (url, stall) = stalling_proxy().await;
    let publisher = Arc::new(Publisher::new(vec![url], "edges-flood-publish".into()));
    let (tx, mut rx) = mpsc::unbounded_channel();
    for i in 0..COPIES {
        let (publisher, tx, queue) = (publisher.clone(), tx.clone(), queue.clone());
        tokio::spawn(async move {
            let body = format!("{{\"copy\":{i}}}");
            let sent = publisher
                .publish("", &queue, body.as_bytes(), BasicProperties::default())
                .await;
            let _ = tx.send(sent.map_err(|e| e.to_string()));
        });
    }
    drop(tx);
    let (mut confirmed, mut failed) = (0usize, Vec::new());
    while let Some(sent) = rx.recv().await {
        match sent {
            Ok(()) => confirmed += 1,
            Err(e) => failed.push(e),
        }
        // A hundred copies in, the connection blocks; it unblocks as soon as
        // a copy failed (well before a new connection would give up).
        if confirmed == 100 && failed.is_empty() {
            stall.send_replace(true);
        }
        if !failed.is_empty() {
            stall.send_replace(false);
        }
    }
    assert_eq!(confirmed + failed.len(), COPIES);
    assert!(!failed.is_empty(), "the blocked connection failed a copy");
    assert!(
        failed.len() <= MAX_QUEUED + 1,
        "{} copies failed (so many originals redelivered), at most {} may: {:?}",
        failed.len(),
        MAX_QUEUED + 1,
        &failed[..3.min(failed.len())]
    );
    // Every confirmed copy is in the queue (a failed one may be there too:
    // the broker can take a copy whose confirm never came back in time).
    let ready = env.ready(&queue).await as usize;
    assert!(ready >= confirmed, "{ready} ready, {confirmed} confirmed");
    let _ = env
        .channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    publisher.close().await;
    env.cleanup().await;
}

/// Settings for a WeChat client of its own that points at `sim`.
fn client_settings(sim: &Sim) -> Settings {
    Settings::from_pairs(vec![
        ("WECHAT_API_BASE".to_string(), sim.url()),
        ("WECHAT_APPID".to_string(), sim.config().appid.clone()),
        ("WECHAT_APPSECRET".to_string(), sim.config().secret.clone()),
        (
            "WECHAT_CLOUD_ENV".to_string(),
            sim.config().cloud_env.clone(),
        ),
    ])
    .expect("test settings are valid")
}

/// A one-event notice for `user`.
fn notice(user: &str) -> Notice {
    let event = parse(
        json!({
            "event_id": format!("ev-{user}"),
            "event_type": "customer.assigned",
            "occurred_at": "2026-11-25T14:03:27+08:00",
            "source": "web",
            "assignee": { "user_id": user, "name": "张三" },
            "customer": { "id": "88231", "name": "上海某某贸易有限公司" },
            "assigned_by": { "user_id": "7", "name": "李经理" }
        })
        .to_string()
        .as_bytes(),
    )
    .expect("a valid event");
    Notice::from_events(&[&event])
}

/// Token fetches counted in `metrics` (every mode and outcome).
fn token_fetches_counted(metrics: &Metrics) -> f64 {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("wechat_notifier_token_fetches_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Issue 24 item 7 (its first half): a refresh ahead of expiry whose answer
/// is discarded (the token it set out to refresh was rejected and replaced
/// by another caller's fetch meanwhile) was still a fetch WeChat answered,
/// and is counted as one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discarded_refresh_is_counted_as_a_token_fetch() {
    // A token that lives 6 s: refreshed at half its life.
    let sim = Sim::start_local(SimConfig {
        token_ttl: 6,
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts");
    let metrics = Arc::new(Metrics::new());
    let wechat = Arc::new(WeChat::new(&client_settings(&sim), metrics.clone()));
    assert_eq!(wechat.send(&notice("u0")).await.outcome, Outcome::Delivered);
    // The refresh takes 2 s at the simulator.
    sim.push_fault(Fault {
        api: Some(Api::StableToken),
        user_id: None,
        action: FaultAction::DelayMs(2000),
        times: Some(1),
    });
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let refreshing = {
        let wechat = wechat.clone();
        tokio::spawn(async move { wechat.send(&notice("u1")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile WeChat rejects the token, and the next call fetches a new one.
    sim.expire_tokens();
    assert_eq!(
        wechat.send(&notice("u2")).await.outcome,
        Outcome::TokenInvalid
    );
    assert_eq!(wechat.send(&notice("u3")).await.outcome, Outcome::Delivered);
    // The refresh answers after that: its answer is not kept.
    assert_eq!(refreshing.await.unwrap().outcome, Outcome::Delivered);
    let answered = sim
        .calls()
        .iter()
        .filter(|c| c.api == Api::StableToken)
        .count();
    assert_eq!(answered, 3, "the first fetch, the refresh, the forced one");
    assert_eq!(
        token_fetches_counted(&metrics),
        answered as f64,
        "every fetch WeChat answered is counted"
    );
}

/// The notice calls WeChat received, in arrival order.
fn notice_calls_in_order(sim: &Sim) -> Vec<Call> {
    let mut calls = sim.notice_calls();
    calls.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
    calls
}

/// A backlog of 20 assignees' notices, sent 4 a second (a call every
/// 250 ms), and a fault (`action`, once) on the next notice call once four
/// were delivered (whichever notice that is: the order in which windows
/// reach their slots is the runtime's): its answer comes right after its
/// slot, so the next notice already waits for the following slot when it
/// lands. Returns the environment once every event was delivered, and that
/// answer's call.
async fn a_backlog_meets(
    tag: &str,
    action: FaultAction,
    extra: &[(&str, &str)],
) -> (TestEnv, Call) {
    let mut env = TestEnv::new(tag).await;
    env.set("NOTIFIER_RATE_PER_SEC", "4");
    env.set("NOTIFIER_RATE_BURST", "1");
    env.set("NOTIFIER_BATCH_WINDOW_MS", "100");
    for (k, v) in extra {
        env.set(k, v);
    }
    env.declare().await;
    let svc = env.start_service().await;
    assert!(
        eventually(WAIT, || async { common::readyz(&svc.http).await.0 == 200 }).await,
        "ready"
    );
    let events = env.bulk(20, 20, false);
    env.publish(&events).await;
    assert!(wait_until(WAIT, || env.sim.delivered().len() >= 4).await);
    env.sim.push_fault(Fault {
        api: Some(Api::InvokeCloudFunction),
        user_id: None,
        action: action.clone(),
        times: Some(1),
    });
    let want = ids(&events);
    assert!(
        wait_until(WAIT, || want.is_subset(&env.notified_ids())).await,
        "every event delivered in the end"
    );
    svc.stop().await;
    let answer = notice_calls_in_order(&env.sim)
        .into_iter()
        .find(|c| c.errcode != 0)
        .unwrap_or_else(|| panic!("{action:?} was answered"));
    (env, answer)
}

/// No notice call reached WeChat after `answer` was sent back and before
/// `quiet_ms` later, though notices were waiting for their slots.
fn no_call_after(env: &TestEnv, answer: &Call, quiet_ms: f64) {
    let calls = notice_calls_in_order(&env.sim);
    let after: Vec<f64> = calls
        .iter()
        .filter(|c| c.at_ms > answer.answered_ms)
        .map(|c| c.at_ms - answer.answered_ms)
        .collect();
    assert!(
        after.len() >= 5,
        "notices were waiting for their slots when the answer came: {after:?}"
    );
    assert!(
        after[0] >= quiet_ms,
        "a call {:.0} ms after the answer (errcode {}) that stopped every call",
        after[0],
        answer.errcode
    );
}

/// Issue 24 item 10, a quota pause: a call that already waits for its rate
/// slot when another call's 45009 comes back does not go out at that slot;
/// it waits for the pause (the first retry step, 2 s) like every other call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_goes_out_after_the_daily_quota_answer_that_paused_them_all() {
    let (env, answer) = a_backlog_meets(
        "edge-daily",
        FaultAction::FunctionErrcode(45009),
        &[("NOTIFIER_RETRY_DELAYS", "2s")],
    )
    .await;
    assert_eq!(answer.errcode, 45009);
    no_call_after(&env, &answer, 1800.0);
    env.cleanup().await;
}

/// Issue 24 item 10, a held configuration fault: a call that already waits
/// for its rate slot when another call's 40164 (IP not whitelisted) comes
/// back does not go out at that slot; only the failed notice is retried,
/// after `NOTIFIER_CONFIG_RETRY` (here 2 s), and the calls resume when that
/// retry succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_goes_out_after_the_answer_that_began_a_held_fault() {
    let (env, answer) = a_backlog_meets(
        "edge-held",
        FaultAction::Errcode(40164),
        &[("NOTIFIER_CONFIG_RETRY", "2s")],
    )
    .await;
    assert_eq!(answer.errcode, 40164);
    no_call_after(&env, &answer, 1800.0);
    env.cleanup().await;
}

/// Issue 24 item 11: a backlog of notices took token #0 before their rate
/// slots; WeChat rejects #0, the refresh (slow) brings #1, WeChat rejects #1
/// too, and the next refresh is slow again. A notice still holding #0 when
/// its slot comes during that second refresh must not send it: no call
/// carries a token after WeChat rejected it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_wechat_rejected_is_never_sent_again_after_two_refreshes() {
    let mut env = TestEnv::new("edge-tokens").await;
    env.set("NOTIFIER_RATE_PER_SEC", "10");
    env.set("NOTIFIER_BATCH_WINDOW_MS", "100");
    env.declare().await;
    let svc = env.start_service().await;
    assert!(
        eventually(WAIT, || async { common::readyz(&svc.http).await.0 == 200 }).await,
        "ready"
    );
    let events = env.bulk(60, 60, false);
    env.publish(&events).await;
    // Every window closed and took the token (#0) before its slot.
    assert!(wait_until(WAIT, || env.sim.delivered().len() >= 5).await);
    // The next two token fetches take a second each.
    env.sim.push_fault(Fault {
        api: Some(Api::StableToken),
        user_id: None,
        action: FaultAction::DelayMs(1000),
        times: Some(2),
    });
    env.sim.expire_tokens();
    assert!(
        wait_until(WAIT, || env.sim.issued_tokens().len() >= 2).await,
        "a new token after the first rejection"
    );
    env.sim.expire_tokens();
    let want = ids(&events);
    assert!(
        wait_until(WAIT, || want.is_subset(&env.notified_ids())).await,
        "every event delivered in the end"
    );
    svc.stop().await;

    let calls = notice_calls_in_order(&env.sim);
    // When WeChat first answered that each token is no longer valid.
    let mut rejected: BTreeMap<String, f64> = BTreeMap::new();
    for c in &calls {
        if matches!(c.errcode, 40001 | 42001) {
            let t = c.token.clone().expect("a notice call carries a token");
            let at = rejected.entry(t).or_insert(c.answered_ms);
            *at = at.min(c.answered_ms);
        }
    }
    // Tokens named by their serial only ("SIMTOKEN0002"), not in full.
    let short = |t: &str| t.chars().take(12).collect::<String>();
    let named: Vec<(String, f64)> = rejected.iter().map(|(t, at)| (short(t), *at)).collect();
    assert!(rejected.len() >= 2, "two tokens rejected: {named:?}");
    // A call may be on its way while the answer is: 20 ms of slack (the
    // calls are 100 ms apart).
    let late: Vec<Value> = calls
        .iter()
        .filter(|c| {
            let t = c.token.as_deref().unwrap_or_default();
            rejected.get(t).is_some_and(|r| c.at_ms > r + 20.0)
        })
        .map(|c| {
            let token = short(c.token.as_deref().unwrap_or_default());
            json!({ "at_ms": c.at_ms, "token": token, "errcode": c.errcode })
        })
        .collect();
    assert!(
        late.is_empty(),
        "calls with a token WeChat had rejected (rejections: {named:?}): {late:?}"
    );
    env.cleanup().await;
}
