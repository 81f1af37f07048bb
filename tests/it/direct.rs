//! The direct mode (`WECHAT_DELIVERY_MODE=subscribe_message`) against the real
//! broker and the simulator, which checks each `subscribe/send` body by
//! WeChat's rules (a missing key or a value too long for its keyword type is
//! 47003; an openid WeChat does not know is 40003).

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{eventually, wait_until, TestEnv};
use serde_json::{json, Value};
use wechat_notifier::broker::{header_int, header_str, headers};
use wechat_notifier::notice::notice_id;
use wechat_notifier::sim::Api;

const WAIT: Duration = Duration::from_secs(30);

/// A direct-mode environment whose template mapping comes from a TOML file,
/// as an operator would write it.
async fn direct_env(tag: &str) -> (TestEnv, std::path::PathBuf) {
    let mut env = TestEnv::new(tag).await;
    let path = std::env::temp_dir().join(format!("{}.toml", env.prefix));
    std::fs::write(
        &path,
        r#"
wechat_delivery_mode = "subscribe_message"

[subscribe_message]
template_id = "tpl-customer-assigned"
page = "pages/customer/list?notice={notice_id}"
miniprogram_state = "trial"
lang = "zh_CN"

[subscribe_message.data]
thing1 = "{customer_names}"
number2 = "{customer_count}"
name3 = "{assigned_by}"
time4 = "{last_assigned_at}"
phrase5 = "{source}"
"#,
    )
    .unwrap();
    env.set("NOTIFIER_CONFIG", path.to_str().unwrap());
    env.set("NOTIFIER_BATCH_WINDOW_MS", "200");
    env.declare().await;
    (env, path)
}

fn subscribe_calls(env: &TestEnv) -> Vec<wechat_notifier::sim::Call> {
    env.sim
        .calls()
        .into_iter()
        .filter(|c| c.api == Api::SubscribeSend)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_assignment_is_one_subscribe_message_per_assignee_cut_by_characters() {
    let (env, path) = direct_env("direct-bulk").await;
    let mut events = env.bulk(60, 3, true);
    // A long manager title: a `name` keyword holds 10 characters.
    for e in &mut events {
        e["assigned_by"]["name"] = json!("华东大区市场部高级客户经理欧阳");
    }
    let svc = env.start_service().await;
    env.publish(&events).await;

    assert!(
        wait_until(WAIT, || env.sim.delivered().len() == 3).await,
        "three messages accepted, got {:?}",
        subscribe_calls(&env)
    );
    // Once every delivery is acked, no queue holds a message and no call is
    // open, nothing can reach WeChat any more: the count below is final.
    assert!(
        eventually(WAIT, || env.settled(&svc.http)).await,
        "all 60 acked"
    );
    let calls = subscribe_calls(&env);
    assert_eq!(calls.len(), 3, "one subscribe/send per assignee");

    let mut by_openid: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for e in &events {
        by_openid
            .entry(e["assignee"]["openid"].as_str().unwrap().to_string())
            .or_default()
            .push(e);
    }
    for call in &calls {
        assert_eq!(call.errcode, 0, "WeChat's body rules pass: {}", call.body);
        let body = &call.body;
        let openid = body["touser"].as_str().unwrap();
        let mine = &by_openid[openid];
        assert_eq!(body["template_id"], "tpl-customer-assigned");
        assert_eq!(body["miniprogram_state"], "trial");
        assert_eq!(body["lang"], "zh_CN");

        let ids: Vec<&str> = mine
            .iter()
            .map(|e| e["event_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            body["page"],
            format!("pages/customer/list?notice={}", notice_id(&ids))
        );

        let data = &body["data"];
        let names = data["thing1"]["value"].as_str().unwrap();
        assert!(
            names.chars().count() <= 20 && names.len() > 20,
            "cut by characters, not bytes: {names}"
        );
        assert!(names.ends_with('…'), "a cut list ends with …: {names}");
        let first = mine[0]["customer"]["name"].as_str().unwrap();
        assert!(names.starts_with(first), "{names} starts with {first}");
        assert_eq!(data["number2"]["value"], "20");
        assert_eq!(data["name3"]["value"], "华东大区市场部高级…");
        assert_eq!(data["phrase5"]["value"], "批量分配");
        let time = data["time4"]["value"].as_str().unwrap();
        assert!(
            chrono::NaiveDateTime::parse_from_str(time, "%Y-%m-%d %H:%M").is_ok(),
            "time as YYYY-MM-DD HH:mm: {time}"
        );
    }
    let openids: BTreeSet<&str> = calls
        .iter()
        .map(|c| c.body["touser"].as_str().unwrap())
        .collect();
    assert_eq!(openids.len(), 3);
    assert!(env.drain(&env.dead_queue()).await.is_empty());
    svc.stop().await;
    env.cleanup().await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_openid_is_rejected_40003_and_a_missing_one_is_no_openid() {
    let (env, path) = direct_env("direct-openid").await;
    let mut events = env.bulk(3, 3, false);
    events[0]["assignee"]["openid"] = json!("not-a-wechat-openid");
    events[1]["assignee"]
        .as_object_mut()
        .unwrap()
        .remove("openid");
    let good = events[2]["assignee"]["openid"]
        .as_str()
        .unwrap()
        .to_string();
    let svc = env.start_service().await;
    env.publish(&events).await;

    let dead_queue = env.dead_queue();
    assert!(eventually(WAIT, || async { env.ready(&dead_queue).await == 2 }).await);
    let dead = env.drain(&dead_queue).await;
    assert_eq!(dead.len(), 2);
    for (body, props) in dead {
        let event: Value = serde_json::from_slice(&body).unwrap();
        if event["event_id"] == events[0]["event_id"] {
            assert_eq!(
                header_str(&props, headers::REASON).as_deref(),
                Some("wechat_rejected")
            );
            assert_eq!(header_int(&props, headers::ERRCODE), Some(40003));
        } else {
            assert_eq!(event["event_id"], events[1]["event_id"]);
            assert_eq!(
                header_str(&props, headers::REASON).as_deref(),
                Some("no_openid")
            );
            assert_eq!(header_int(&props, headers::ERRCODE), None);
        }
    }
    assert!(wait_until(WAIT, || env.sim.delivered().len() == 1).await);
    assert_eq!(env.sim.delivered()[0]["touser"], good.as_str());
    // The event without an openid never reached WeChat (counted once all is settled).
    assert!(eventually(WAIT, || env.settled(&svc.http)).await);
    assert_eq!(subscribe_calls(&env).len(), 2);
    svc.stop().await;
    env.cleanup().await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_without_an_errcode_is_never_taken_for_a_success() {
    let (env, path) = direct_env("direct-noerrcode").await;
    // A gateway answers 200 with `{}`, then with an HTML page; then WeChat answers.
    for body in ["{}", "<html><body>502 Bad Gateway</body></html>"] {
        env.sim.push_fault(wechat_notifier::sim::Fault {
            api: Some(Api::SubscribeSend),
            user_id: None,
            action: wechat_notifier::sim::FaultAction::Body(body.into()),
            times: Some(1),
        });
    }
    let svc = env.start_service().await;
    let events = env.bulk(1, 1, false);
    env.publish(&events).await;
    let want: BTreeSet<String> = common::ids(&events);
    assert!(
        wait_until(WAIT, || subscribe_calls(&env)
            .iter()
            .any(|c| c.errcode == 0))
        .await,
        "delivered after the two answers without errcode"
    );
    let calls = subscribe_calls(&env);
    let answers: Vec<(u16, i64)> = calls.iter().map(|c| (c.http_status, c.errcode)).collect();
    assert_eq!(
        answers,
        vec![(200, -2), (200, -2), (200, 0)],
        "retried, not acked"
    );
    let page = calls[2].body["page"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(page.contains(&notice_id(&want.iter().cloned().collect::<Vec<_>>())));
    let mut unacked = 1.0;
    for _ in 0..100 {
        unacked = common::metric(&svc.http, "wechat_notifier_unacked_deliveries", "").await;
        if unacked == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(unacked, 0.0, "acked after the success");
    assert_eq!(env.ready(&env.queue()).await, 0);
    assert_eq!(env.ready(&env.dead_queue()).await, 0);
    svc.stop().await;
    env.cleanup().await;
    let _ = std::fs::remove_file(path);
}
