//! The `publish` subcommand: sample `customer.assigned` events published as the
//! CRM would (persistent, JSON, `message_id`, with publisher confirms) — one
//! event, or a bulk assignment of N customers over M assignees sharing one
//! `batch.id`. Used by the demo, the tests and load runs. With `--accept
//! USER_ID` it publishes one `subscription.changed` answer instead (contract
//! section 8.1), as the CRM does when the user taps "allow". It reads only the
//! broker's settings: a publisher host needs no WeChat secret.

use std::process::ExitCode;
use std::time::Duration;

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use lapin::{BasicProperties, Channel};
use serde_json::{json, Value};

use crate::broker::{self, BrokerError, ROUTING_KEY, SUBSCRIPTION_ROUTING_KEY};
use crate::cli::PublishArgs;
use crate::event::{self, Event, SubscriptionEvent, SubscriptionStatus};
use crate::progress::Progress;
use crate::settings::{self, Needs, Settings, Source};
use crate::telemetry;

/// The `publish` subcommand.
pub async fn main(args: PublishArgs) -> ExitCode {
    if let Some(rate) = args.rate {
        if let Err(why) = check_rate(rate) {
            return super::bad_usage(why);
        }
    }
    let settings = match super::settings(Needs::Broker) {
        Ok(s) => s,
        Err(code) => return code,
    };
    telemetry::init(settings.log_format, "warn");
    if let Some(user_id) = &args.accept {
        return accept(&settings, &args, user_id).await;
    }
    let mut bulk = Bulk::new(args.customers, args.assignees);
    if args.no_batch {
        bulk.batch_id = None;
        bulk.source = "web";
    }
    let events = sample_events(&bulk);
    let result = async {
        let conn = broker::connect(&settings.amqp_urls, "wechat-notifier-publish").await?;
        let channel = broker::confirm_channel(&conn).await?;
        // So that a publish before the first `run` is not returned as unroutable.
        broker::declare_topology(&channel, &settings).await?;
        let progress = Progress::start("published", events.len(), "events");
        publish_events(
            &channel,
            &settings.exchange,
            &events,
            args.rate,
            Some(&progress),
        )
        .await?;
        progress.finish();
        let _ = conn.close(200, "published".into()).await;
        Ok::<_, BrokerError>(())
    }
    .await;
    match result {
        Ok(()) => {
            println!(
                "published {} event(s) to {}",
                events.len(),
                settings.exchange
            );
            ExitCode::SUCCESS
        }
        Err(e) => super::fail(e),
    }
}

/// `publish --accept USER_ID`: one `subscription.changed` event, checked by
/// the service's own parser before it leaves, published as the CRM would.
async fn accept(settings: &Settings, args: &PublishArgs, user_id: &str) -> ExitCode {
    // The template: the flag, else the service's own setting (the ledger's key).
    let template_id = args.template_id.clone().or_else(|| {
        Source::from_env()
            .ok()
            .and_then(|src| settings::template_id(&src))
    });
    let Some(template_id) = template_id else {
        return super::bad_usage(
            "--template-id: the template the user answered for, or WECHAT_TEMPLATE_ID, but neither is set",
        );
    };
    let status = SubscriptionStatus::named(&args.status).expect("clap checks the word");
    let event = match subscription_event(user_id, args.openid.as_deref(), &template_id, status) {
        Ok(e) => e,
        Err(why) => return super::bad_usage(why),
    };
    let result = async {
        let conn = broker::connect(&settings.amqp_urls, "wechat-notifier-publish").await?;
        let channel = broker::confirm_channel(&conn).await?;
        // The exchange, so the CRM side may start first. The subscription
        // binding is the service's to make (only with its ledger on): a
        // publish nobody is bound for is returned, and said so, below.
        broker::declare_topology(&channel, settings).await?;
        publish_subscription(&channel, &settings.exchange, &event).await?;
        let _ = conn.close(200, "published".into()).await;
        Ok::<_, BrokerError>(())
    }
    .await;
    match result {
        Ok(()) => {
            println!(
                "published {} {} for user {} (template {}, event {}) to {}",
                event::subscription::EVENT_TYPE,
                status.as_str(),
                event.user_id,
                event.template_id,
                event.event_id,
                settings.exchange
            );
            ExitCode::SUCCESS
        }
        Err(BrokerError::Unroutable(_)) => super::fail(format!(
            "nothing is bound to routing key {SUBSCRIPTION_ROUTING_KEY} on {}: the service binds its \
             work queue to it when it runs with the grant ledger (NOTIFIER_LEDGER_URL); the event was not kept",
            settings.exchange
        )),
        Err(e) => super::fail(e),
    }
}

/// A `subscription.changed` event with a fresh id, occurring now, checked by
/// the parser the service uses (so a bad `--openid` is refused here, not
/// dead-lettered there).
///
/// # Errors
/// The one line naming the bad value.
pub fn subscription_event(
    user_id: &str,
    openid: Option<&str>,
    template_id: &str,
    status: SubscriptionStatus,
) -> Result<SubscriptionEvent, String> {
    let draft = SubscriptionEvent {
        event_id: event_id(),
        occurred_at: chrono::Local::now().fixed_offset(),
        user_id: user_id.to_string(),
        openid: openid.map(str::to_string),
        template_id: template_id.to_string(),
        status,
    };
    let body = serde_json::to_vec(&draft.to_json()).expect("a JSON value serialises");
    match event::parse_any(&body) {
        Ok(Event::Subscription(e)) => Ok(e),
        Ok(Event::Assigned(_)) => unreachable!("the event_type is subscription.changed"),
        Err(e) => Err(format!("--accept: {e}")),
    }
}

/// Publishes one subscription event as the CRM would: persistent, JSON,
/// `message_id` = the event id, routing key `subscription.changed`, mandatory,
/// confirmed.
///
/// # Errors
/// `Unroutable` when no queue is bound for it; any failure to be confirmed.
pub async fn publish_subscription(
    channel: &Channel,
    exchange: &str,
    event: &SubscriptionEvent,
) -> Result<(), BrokerError> {
    let body = serde_json::to_vec(&event.to_json()).expect("a JSON value serialises");
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(event.event_id.as_str().into());
    broker::publish_confirmed(channel, exchange, SUBSCRIPTION_ROUTING_KEY, &body, props).await
}

/// `--rate` must be a positive, finite number of events per second (a zero
/// would mean an infinite spacing).
///
/// # Errors
/// The one line to print.
pub fn check_rate(rate: f64) -> Result<(), String> {
    if rate.is_finite() && rate > 0.0 {
        Ok(())
    } else {
        Err(format!(
            "--rate: a positive number of events per second (omit it for as fast as confirms allow), got {rate}"
        ))
    }
}

const SURNAMES: &[&str] = &[
    "张", "王", "李", "赵", "刘", "陈", "杨", "黄", "周", "吴", "徐", "孙",
];
const GIVEN: &[&str] = &[
    "伟", "芳", "娜", "敏", "静", "磊", "洋", "勇", "艳", "杰", "军", "涛",
];
const CITIES: &[&str] = &[
    "上海", "北京", "深圳", "杭州", "成都", "武汉", "南京", "苏州", "广州", "西安",
];
const TRADES: &[&str] = &[
    "贸易",
    "科技",
    "电子",
    "物流",
    "餐饮",
    "建材",
    "医疗器械",
    "文化传媒",
    "信息技术",
    "供应链管理",
];

/// What to publish.
#[derive(Debug, Clone)]
pub struct Bulk {
    pub customers: usize,
    pub assignees: usize,
    /// The CRM batch id; `None` publishes independent single assignments.
    pub batch_id: Option<String>,
    /// `user_id`s are `{prefix}{n}`, so runs do not mix.
    pub user_prefix: String,
    pub source: &'static str,
    /// Give assignees an openid (needed by the direct mode).
    pub with_openid: bool,
}

impl Bulk {
    pub fn new(customers: usize, assignees: usize) -> Self {
        let run = format!("{:06x}", fastrand::u32(..0xff_ffff));
        Bulk {
            customers,
            assignees: assignees.max(1),
            batch_id: Some(format!("b-{run}")),
            user_prefix: format!("u{run}-"),
            source: "batch",
            with_openid: true,
        }
    }
}

fn person_name(i: usize) -> String {
    format!(
        "{}{}",
        SURNAMES[i % SURNAMES.len()],
        GIVEN[(i / SURNAMES.len()) % GIVEN.len()]
    )
}

/// A realistic company name, e.g. `上海某某贸易有限公司`.
pub fn company_name(i: usize) -> String {
    format!(
        "{}{}{}有限公司",
        CITIES[i % CITIES.len()],
        ["恒通", "华信", "宏达", "瑞丰", "嘉禾", "永盛", "新锐"][(i / CITIES.len()) % 7],
        TRADES[(i / 7) % TRADES.len()]
    )
}

/// A fresh event id (random, UUID-shaped).
pub fn event_id() -> String {
    let a = fastrand::u128(..);
    let h = format!("{a:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The events of a bulk assignment: customer i goes to assignee i mod M.
pub fn sample_events(bulk: &Bulk) -> Vec<Value> {
    let now = chrono::Local::now().fixed_offset();
    (0..bulk.customers)
        .map(|i| {
            let a = i % bulk.assignees;
            let mut e = json!({
                "event_id": event_id(),
                "event_type": "customer.assigned",
                "occurred_at": now.to_rfc3339(),
                "source": bulk.source,
                "assignee": { "user_id": format!("{}{a}", bulk.user_prefix), "name": person_name(a) },
                "customer": { "id": (880_000 + i).to_string(), "name": company_name(i) },
                "assigned_by": { "user_id": "7", "name": "李经理" },
            });
            if bulk.with_openid {
                e["assignee"]["openid"] = json!(format!("oSim{}{a}", bulk.user_prefix));
            }
            if let Some(b) = &bulk.batch_id {
                e["batch"] = json!({ "id": b, "size": bulk.customers });
            }
            e
        })
        .collect()
}

/// Publishes raw bodies to `exchange` with the CRM's routing key, started in
/// order, keeping up to 256 confirms in flight. `rate` spaces them (events per second);
/// `None` publishes as fast as confirms allow. At 200/s or slower each confirm
/// is awaited in its own slot. `progress` counts confirmed events.
///
/// # Errors
/// The first publish that was not confirmed.
pub async fn publish_bodies(
    channel: &Channel,
    exchange: &str,
    bodies: &[(String, Vec<u8>)],
    rate: Option<f64>,
    progress: Option<&Progress>,
) -> Result<(), BrokerError> {
    // A rate that is not a positive number means no pacing (the CLI refuses it first).
    let spacing = rate
        .filter(|r| r.is_finite() && *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let in_flight = match spacing {
        Some(s) if s >= Duration::from_millis(5) => 1,
        _ => 256,
    };
    let start = tokio::time::Instant::now();
    let done = |r: Result<(), BrokerError>| {
        if r.is_ok() {
            if let Some(p) = progress {
                p.add(1);
            }
        }
        r
    };
    // Oldest first; polling the queue sends what was just pushed.
    let mut confirms = FuturesOrdered::new();
    for (i, (message_id, body)) in bodies.iter().enumerate() {
        if let Some(s) = spacing {
            tokio::time::sleep_until(start + s * i as u32).await;
        }
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(message_id.as_str().into());
        confirms.push_back(broker::publish_confirmed(
            channel,
            exchange,
            ROUTING_KEY,
            body,
            props,
        ));
        if confirms.len() >= in_flight {
            if let Some(r) = confirms.next().await {
                done(r)?;
            }
        }
        while let Some(Some(r)) = confirms.next().now_or_never() {
            done(r)?;
        }
    }
    while let Some(r) = confirms.next().await {
        done(r)?;
    }
    Ok(())
}

/// Publishes events (JSON values) as the CRM would.
///
/// # Errors
/// The first publish that was not confirmed.
pub async fn publish_events(
    channel: &Channel,
    exchange: &str,
    events: &[Value],
    rate: Option<f64>,
    progress: Option<&Progress>,
) -> Result<(), BrokerError> {
    let bodies: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|e| {
            let id = e
                .get("event_id")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            (id, serde_json::to_vec(e).expect("a JSON value serialises"))
        })
        .collect();
    publish_bodies(channel, exchange, &bodies, rate, progress).await
}
