//! The `demo` subcommand: the simulator, the service and a bulk assignment in
//! one process against the broker at `AMQP_URL`, on queue names of its own
//! (deleted afterwards), printing what WeChat received. It reads only
//! `AMQP_URL` and `NOTIFIER_LEDGER_URL`: everything else is its own.
//!
//! With a reachable PostgreSQL (`NOTIFIER_LEDGER_URL`, else the URL
//! `scripts/services.sh` sets up) it runs with the grant ledger: the
//! simulator counts subscription credits, the first assignee has none, so its
//! notice is held; the demo then publishes that user's accept, as the CRM
//! would, and the held events go out as one summary. Without PostgreSQL it
//! says so and runs without the ledger.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use serde_json::Value;

use crate::broker;
use crate::cli::DemoArgs;
use crate::event::SubscriptionStatus;
use crate::ledger::Store;
use crate::progress::Progress;
use crate::publish::{self, Bulk};
use crate::service::Service;
use crate::settings::{Needs, Settings};
use crate::sim::{Sim, SimConfig};
use crate::{shutdown, telemetry};

/// The `demo` subcommand.
pub async fn main(args: DemoArgs) -> ExitCode {
    telemetry::init(telemetry::format_from_env(), "warn");
    let settings = match super::settings(Needs::Broker) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let ledger_url = std::env::var("NOTIFIER_LEDGER_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_LEDGER_URL.to_string());
    match run(&args, &settings.amqp_urls.join(","), Some(&ledger_url)).await {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => super::fail(format!("{e:#}")),
    }
}

/// The ledger `scripts/services.sh` creates (the demo's default).
pub const DEFAULT_LEDGER_URL: &str =
    "postgres://wechat_notifier:wechat_notifier@127.0.0.1:5432/wechat_notifier";

/// The template the demo's ledger counts credits of.
const DEMO_TEMPLATE: &str = "demo-customer-assigned";

/// Runs the demo; returns the table it printed. With `ledger_url` it tries
/// the grant ledger there (in a schema of its own, dropped afterwards).
///
/// # Errors
/// The broker is unreachable, or the notices did not all arrive within a minute.
pub async fn run(
    args: &DemoArgs,
    amqp_url: &str,
    ledger_url: Option<&str>,
) -> anyhow::Result<String> {
    // The broker first: unlike `run`, the demo does not wait for one to appear,
    // it says how to start one and exits.
    let urls: Vec<String> = amqp_url.split(',').map(str::to_string).collect();
    let conn = broker::connect(&urls, "wechat-notifier-demo").await?;
    let names = format!(
        "wechat-notifier-demo-{}-{:04x}",
        std::process::id(),
        fastrand::u16(..)
    );
    let schema = format!("demo_{}_{:04x}", std::process::id(), fastrand::u16(..));
    let ledger = match ledger_url {
        Some(url) => demo_ledger(url, &schema).await,
        None => None,
    };
    let sim = Sim::start_local(SimConfig {
        credits: ledger.is_some(),
        ..SimConfig::default()
    })
    .await?;
    let retry = "1s";
    let mut pairs = vec![
        ("AMQP_URL", amqp_url.to_string()),
        ("WECHAT_API_BASE", sim.url()),
        ("WECHAT_APPID", sim.config().appid.clone()),
        ("WECHAT_APPSECRET", sim.config().secret.clone()),
        ("WECHAT_CLOUD_ENV", sim.config().cloud_env.clone()),
        ("NOTIFIER_EXCHANGE", format!("{names}.events")),
        ("NOTIFIER_QUEUE", format!("{names}.work")),
        ("NOTIFIER_DEAD_QUEUE", format!("{names}.dead")),
        ("NOTIFIER_RETRY_QUEUE_PREFIX", format!("{names}.retry")),
        ("NOTIFIER_RETRY_DELAYS", retry.to_string()),
        ("NOTIFIER_METRICS_ADDR", "127.0.0.1:0".to_string()),
        ("NOTIFIER_RATE_PER_SEC", "20".to_string()),
    ];
    if let (Some(url), Some(_)) = (ledger_url, &ledger) {
        pairs.extend([
            ("NOTIFIER_LEDGER_URL", url.to_string()),
            ("NOTIFIER_LEDGER_SCHEMA", schema.clone()),
            ("WECHAT_TEMPLATE_ID", DEMO_TEMPLATE.to_string()),
        ]);
    }
    let settings = Settings::from_pairs(pairs)?;
    let (trigger, signal) = shutdown::channel();
    let service = Service::build(settings.clone(), signal).await?;
    let running = tokio::spawn(service.run_until_stopped());

    let channel = broker::confirm_channel(&conn).await?;
    broker::declare_topology(&channel, &settings).await?;
    let bulk = Bulk::new(args.customers, args.assignees);
    let events = publish::sample_events(&bulk);
    // With the ledger: every assignee but the first holds one credit.
    let held_user = format!("{}0", bulk.user_prefix);
    if ledger.is_some() {
        for a in 1..bulk.assignees {
            sim.grant(&format!("oSim{}{a}", bulk.user_prefix), DEMO_TEMPLATE, 1);
        }
    }
    eprintln!(
        "published a bulk assignment: {} customers over {} assignees (batch {})",
        args.customers,
        args.assignees,
        bulk.batch_id.as_deref().unwrap_or("-")
    );
    let progress = Progress::start("published", events.len(), "events");
    publish::publish_events(&channel, &settings.exchange, &events, None, Some(&progress)).await?;
    progress.finish();
    let progress = Progress::start("notified", events.len(), "events");

    let wanted: BTreeSet<String> = events
        .iter()
        .filter_map(|e| e["event_id"].as_str().map(str::to_string))
        .collect();
    if let Some(store) = &ledger {
        let of_held: usize = events
            .iter()
            .filter(|e| e["assignee"]["user_id"] == held_user.as_str())
            .count();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while store
            .held_of(&held_user)
            .await
            .map(|h| h.len())
            .unwrap_or(0)
            < of_held
        {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("{held_user}'s notice was not held within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "grant ledger: {held_user} had no subscription credit (WeChat answered 43101): \
             {of_held} events held, not dead-lettered"
        );
        sim.grant(&format!("oSim{held_user}"), DEMO_TEMPLATE, 1);
        let accept = publish::subscription_event(
            &held_user,
            Some(&format!("oSim{held_user}")),
            DEMO_TEMPLATE,
            SubscriptionStatus::Accept,
        )
        .map_err(anyhow::Error::msg)?;
        publish::publish_subscription(&channel, &settings.exchange, &accept).await?;
        eprintln!(
            "grant ledger: {held_user} accepted a new subscription (as `publish --accept` does)"
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let delivered = loop {
        let notices = sim.delivered();
        let seen: BTreeSet<String> = notices
            .iter()
            .flat_map(|n| n["event_ids"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        progress.set(wanted.intersection(&seen).count());
        if wanted.is_subset(&seen) {
            progress.finish();
            break notices;
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "only {} of {} events were notified within 60 s",
                wanted.intersection(&seen).count(),
                wanted.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    trigger.trigger();
    let _ = running.await;
    for q in std::iter::once(settings.queue.clone())
        .chain(std::iter::once(settings.dead_queue.clone()))
        .chain(
            settings
                .retry_delays
                .iter()
                .map(|d| settings.retry_queue(*d)),
        )
    {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .exchange_delete(settings.exchange.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "demo done".into()).await;
    if let Some(store) = &ledger {
        let _ = store.drop_schema().await;
    }
    let released = ledger.is_some().then_some(held_user.as_str());
    let table = render(&delivered, wanted.len(), released);
    Ok(table)
}

/// The demo's ledger at `url` in `schema`, migrated; `None` (said on
/// stderr) when PostgreSQL cannot be reached there.
async fn demo_ledger(url: &str, schema: &str) -> Option<Store> {
    let settings = Settings::from_pairs([
        ("WECHAT_APPID", "demo"),
        ("WECHAT_APPSECRET", "demo"),
        ("WECHAT_CLOUD_ENV", "demo"),
        ("NOTIFIER_LEDGER_URL", url),
        ("NOTIFIER_LEDGER_SCHEMA", schema),
        ("WECHAT_TEMPLATE_ID", DEMO_TEMPLATE),
    ]);
    let ledger = match settings {
        Ok(s) => s.ledger?,
        Err(e) => {
            eprintln!("grant ledger: off ({e})");
            return None;
        }
    };
    let store = Store::connect(&ledger, None).ok()?;
    match tokio::time::timeout(Duration::from_secs(5), store.migrate()).await {
        Ok(Ok(())) => {
            eprintln!(
                "grant ledger: on ({}, schema {schema})",
                ledger.redacted_url()
            );
            Some(store)
        }
        _ => {
            eprintln!(
                "grant ledger: off (no PostgreSQL at {}; `scripts/services.sh` sets one up)",
                ledger.redacted_url()
            );
            None
        }
    }
}

/// One line per notice: assignee, count, summary, the customers listed; the
/// notice of `released` (the user whose notice the ledger held) is marked.
pub fn render(notices: &[Value], events: usize, released: Option<&str>) -> String {
    let mut out = format!(
        "WeChat received {} notice(s) for {} events:\n{:<12} {:<8} {:>9} {:<7}  customers\n",
        notices.len(),
        events,
        "assignee",
        "name",
        "customers",
        "summary"
    );
    for n in notices {
        let names: Vec<&str> = n["customers"]
            .as_array()
            .map(|a| a.iter().filter_map(|c| c["name"].as_str()).collect())
            .unwrap_or_default();
        let count = n["customer_count"].as_u64().unwrap_or(0);
        let shown = names.len().min(3) as u64;
        let mut more = if shown < count {
            format!(" … (+{})", count - shown)
        } else {
            String::new()
        };
        let user = n["assignee"]["user_id"].as_str().unwrap_or("?");
        if released == Some(user) {
            more.push_str("  <- held for want of a credit, sent after the accept");
        }
        out.push_str(&format!(
            "{:<12} {:<8} {:>9} {:<7}  {}{}\n",
            user,
            n["assignee"]["name"].as_str().unwrap_or("-"),
            count,
            n["summary"].as_bool().unwrap_or(false),
            names.iter().take(3).copied().collect::<Vec<_>>().join("、"),
            more
        ));
    }
    out
}
