//! A notice's claim on the grant ledger (contract 8.4 and 8.8): the ids a
//! claim records are the ids the notice is sent with, even when window
//! events expire before the call or the claim's commit answer is lost; and
//! an accept that took a window along is acked only once its release was
//! done. Real RabbitMQ, real PostgreSQL (each test its own schema, the lost
//! commit through a proxy of the test's), the in-process simulator.

use crate::common;

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::ledger::{
    aged, dead_ids, delivered_in, event, held_at_zero, held_count, ledger_env, ledger_url, locked,
    pg, publish_subscription, store, subscription, TEMPLATE,
};
use common::{eventually, fault_for, TestEnv};
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use wechat_notifier::notice::notice_id;
use wechat_notifier::sim::FaultAction;

const WAIT: Duration = Duration::from_secs(30);

/// X1: a release takes an open window along whose first event is past
/// `NOTIFIER_MAX_AGE` when the call would go: it is dead-lettered and the
/// notice goes with the rest under a new id. The ledger's claim follows it
/// (the rows are claimed by the id actually sent, the expired one's row is
/// gone), so a crash during the call could repeat the notice only with the
/// same ids, and the accepted notice is recorded under its own id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_events_expiring_before_the_call_leave_the_claim_which_follows_the_sent_notice() {
    let mut env = ledger_env("claim-expiry").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "2000");
    env.set("NOTIFIER_MAX_AGE", "20s");
    let h1 = event("xe-1", "u-xe", "c1");
    env.declare().await;
    let s = store(&env.settings()).await;
    held_at_zero(&s, "u-xe", &h1).await;
    let svc = env.start_ready().await;
    // The release is slow at WeChat: the test reads the claim during the call.
    env.sim
        .push_fault(fault_for(&h1, FaultAction::DelayMs(3000), Some(1)));
    env.publish(&[
        aged(event("xe-old", "u-xe", "c2"), 60_000),
        event("xe-new", "u-xe", "c3"),
    ])
    .await;
    publish_subscription(&env, &subscription("s-xe", "u-xe", TEMPLATE, "accept")).await;
    assert!(
        eventually(WAIT, || async { env.sim.in_flight() == 1 }).await,
        "the release is at WeChat"
    );
    let sent_id = notice_id(&["xe-1", "xe-new"]);
    let claimed: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT event_id, claimed_by FROM held WHERE user_id = 'u-xe' ORDER BY event_id",
    )
    .fetch_all(&mut pg(&env).await)
    .await
    .unwrap();
    assert_eq!(
        claimed,
        [
            ("xe-1".to_string(), Some(sent_id.clone())),
            ("xe-new".to_string(), Some(sent_id.clone())),
        ],
        "during the call the ledger claims exactly the notice sent"
    );
    assert!(
        eventually(WAIT, || async {
            held_count(&s, "u-xe").await == 0 && env.settled(&svc.http).await
        })
        .await,
        "released and settled"
    );
    let delivered = env.sim.delivered();
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(delivered[0]["event_ids"], json!(["xe-1", "xe-new"]));
    assert_eq!(delivered[0]["notice_id"], json!(sent_id));
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM held")
        .fetch_one(&mut pg(&env).await)
        .await
        .unwrap();
    assert_eq!(left, 0, "no row left, the expired window event's neither");
    let sends: Vec<String> = sqlx::query_scalar("SELECT notice_id FROM sends")
        .fetch_all(&mut pg(&env).await)
        .await
        .unwrap();
    assert_eq!(sends, [sent_id], "the credit spent under the id sent");
    let dead = dead_ids(&env).await;
    assert_eq!(dead, [("xe-old".to_string(), "expired".to_string())]);
    svc.stop().await;
    env.cleanup().await;
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
    // The accept's retry queue: 1 s, so its return is far from the first
    // sweep's, even on a loaded machine.
    env.set("NOTIFIER_RETRY_DELAYS", "1s,5s,30s");
    let h1 = event("cw-1", "u-cw", "c1");
    env.declare().await;
    let s = store(&env.settings()).await;
    held_at_zero(&s, "u-cw", &h1).await;
    let svc = env.start_ready().await;
    let mut c = locked(&env, "held", "EXCLUSIVE").await;
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

/// A TCP proxy in front of PostgreSQL that loses the answer to the first
/// claim's COMMIT: the COMMIT reaches the server and is carried out, then
/// the service's connection is cut before the answer. With `refuse`, every
/// connection is cut with it and new ones are refused for that long.
struct LostCommit {
    port: u16,
    lost: Arc<AtomicUsize>,
}

impl LostCommit {
    async fn start(refuse: Duration) -> LostCommit {
        let opts = PgConnectOptions::from_str(&ledger_url()).unwrap();
        let target = format!("{}:{}", opts.get_host(), opts.get_port());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let lost = Arc::new(AtomicUsize::new(0));
        let armed = Arc::new(AtomicBool::new(true));
        let cut_all = Arc::new(Notify::new());
        let refusing_until = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
        let l = lost.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let refused = refusing_until
                    .lock()
                    .unwrap()
                    .is_some_and(|t| std::time::Instant::now() < t);
                if refused {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                let (armed, lost, cut_all, until) = (
                    armed.clone(),
                    l.clone(),
                    cut_all.clone(),
                    refusing_until.clone(),
                );
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let cut = Arc::new(AtomicBool::new(false));
                    let cut_up = cut.clone();
                    let cut_others = cut_all.clone();
                    let up = async move {
                        let mut seen_claim = false;
                        let mut tail: Vec<u8> = Vec::new();
                        let mut buf = vec![0u8; 16384];
                        loop {
                            let n = cr.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            tail.extend_from_slice(&buf[..n]);
                            if !seen_claim
                                && contains(
                                    &tail,
                                    b"UPDATE held SET claimed_by = $1 WHERE event_id",
                                )
                            {
                                seen_claim = true;
                                tail.clear();
                            }
                            if seen_claim
                                && contains(&tail, b"COMMIT")
                                && armed.swap(false, Ordering::SeqCst)
                            {
                                cut_up.store(true, Ordering::SeqCst);
                            }
                            if tail.len() > 8192 {
                                tail.drain(..tail.len() - 256);
                            }
                            sw.write_all(&buf[..n]).await?;
                        }
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 16384];
                        loop {
                            let n = sr.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            if cut.load(Ordering::SeqCst) {
                                // The server answered the COMMIT: carried out.
                                lost.fetch_add(1, Ordering::SeqCst);
                                if !refuse.is_zero() {
                                    *until.lock().unwrap() =
                                        Some(std::time::Instant::now() + refuse);
                                    cut_others.notify_waiters();
                                }
                                return Ok(());
                            }
                            cw.write_all(&buf[..n]).await?;
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut_all.notified() => {}
                    }
                });
            }
        });
        LostCommit { port, lost }
    }

    /// The ledger URL through the proxy.
    fn url(&self) -> String {
        let direct = ledger_url();
        let (scheme, rest) = direct.split_once("://").unwrap();
        let (userinfo, hostpath) = match rest.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), rest),
        };
        let path = hostpath.find('/').map_or("", |i| &hostpath[i..]);
        format!("{scheme}://{userinfo}127.0.0.1:{}{path}", self.port)
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Checks that each event reached WeChat under one notice id only.
fn each_under_one_id(env: &TestEnv) {
    for (id, notices) in delivered_in(env) {
        let first = &notices[0];
        assert!(
            notices.iter().all(|n| n == first),
            "{id} reached WeChat under different notice ids: {notices:?}"
        );
    }
}

/// m-D: a claim's COMMIT is carried out but its answer is lost (the
/// connection cut): the claim is undone by its notice id before the window
/// goes alone, so no later notice sends the window's event again under
/// another id; the accept then releases the held event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_commit_answer_is_lost_is_undone_before_the_window_goes_alone() {
    let mut env = ledger_env("claim-commit").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "2000");
    let h1 = event("lc-1", "u-lc", "c1");
    env.declare().await;
    let s = store(&env.settings()).await;
    held_at_zero(&s, "u-lc", &h1).await;
    let proxy = LostCommit::start(Duration::ZERO).await;
    env.set("NOTIFIER_LEDGER_URL", &proxy.url());
    let svc = env.start_ready().await;
    env.publish(&[event("lc-2", "u-lc", "c2")]).await;
    publish_subscription(&env, &subscription("s-lc", "u-lc", TEMPLATE, "accept")).await;
    assert!(
        eventually(WAIT, || async {
            held_count(&s, "u-lc").await == 0 && env.settled(&svc.http).await
        })
        .await,
        "released and settled: {:?}",
        env.sim.delivered()
    );
    assert_eq!(
        proxy.lost.load(Ordering::SeqCst),
        1,
        "a commit's answer was lost"
    );
    // A second accept: a claim left in place would be sent again now.
    publish_subscription(&env, &subscription("s-lc2", "u-lc", TEMPLATE, "accept")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(eventually(WAIT, || async { env.settled(&svc.http).await }).await);
    each_under_one_id(&env);
    let delivered = delivered_in(&env);
    assert_eq!(
        delivered.keys().cloned().collect::<Vec<_>>(),
        ["lc-1", "lc-2"],
        "{delivered:?}"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM held")
        .fetch_one(&mut pg(&env).await)
        .await
        .unwrap();
    assert_eq!(left, 0, "no row left");
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    svc.stop().await;
    env.cleanup().await;
}

/// m-D: as above, but the ledger stays unreachable after the lost answer,
/// so the claim cannot be undone: the window is not sent (it may be the
/// claimed notice's), it waits in a retry queue (not as a failed attempt);
/// once the ledger answers, the claimed notice goes with the same ids and
/// the window's copy is acked without a notice of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_commit_answer_is_lost_and_cannot_be_undone_parks_the_window() {
    let mut env = ledger_env("claim-park").await;
    env.set("NOTIFIER_BATCH_WINDOW_MS", "2000");
    let h1 = event("lp-1", "u-lp", "c1");
    env.declare().await;
    let s = store(&env.settings()).await;
    held_at_zero(&s, "u-lp", &h1).await;
    let proxy = LostCommit::start(Duration::from_secs(5)).await;
    env.set("NOTIFIER_LEDGER_URL", &proxy.url());
    let svc = env.start_ready().await;
    env.publish(&[event("lp-2", "u-lp", "c2")]).await;
    publish_subscription(&env, &subscription("s-lp", "u-lp", TEMPLATE, "accept")).await;
    assert!(
        eventually(WAIT, || async { proxy.lost.load(Ordering::SeqCst) == 1 }).await,
        "a commit's answer was lost"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        env.sim.delivered().is_empty(),
        "the window is not sent beside its claim: {:?}",
        env.sim.delivered()
    );
    assert!(
        eventually(WAIT, || async {
            held_count(&s, "u-lp").await == 0 && env.settled(&svc.http).await
        })
        .await,
        "released and settled once the ledger answers: {:?}",
        env.sim.delivered()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    each_under_one_id(&env);
    let delivered = delivered_in(&env);
    assert_eq!(
        delivered.keys().cloned().collect::<Vec<_>>(),
        ["lp-1", "lp-2"],
        "{delivered:?}"
    );
    assert_eq!(
        delivered["lp-1"], delivered["lp-2"],
        "in the claimed notice"
    );
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    svc.stop().await;
    env.cleanup().await;
}
