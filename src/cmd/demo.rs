//! The `demo` subcommand: the simulator, the service and a bulk assignment in
//! one process against the broker at `AMQP_URL`, on queue names of its own
//! (deleted afterwards), printing what WeChat received. It reads only
//! `AMQP_URL`: everything else is its own.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use serde_json::Value;

use crate::broker;
use crate::cli::DemoArgs;
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
    match run(&args, &settings.amqp_urls.join(",")).await {
        Ok(table) => {
            print!("{table}");
            ExitCode::SUCCESS
        }
        Err(e) => super::fail(format!("{e:#}")),
    }
}

/// Runs the demo; returns the table it printed.
///
/// # Errors
/// The broker is unreachable, or the notices did not all arrive within a minute.
pub async fn run(args: &DemoArgs, amqp_url: &str) -> anyhow::Result<String> {
    // The broker first: unlike `run`, the demo does not wait for one to appear,
    // it says how to start one and exits.
    let urls: Vec<String> = amqp_url.split(',').map(str::to_string).collect();
    let conn = broker::connect(&urls, "wechat-notifier-demo").await?;
    let sim = Sim::start_local(SimConfig::default()).await?;
    let names = format!(
        "wechat-notifier-demo-{}-{:04x}",
        std::process::id(),
        fastrand::u16(..)
    );
    let retry = "1s";
    let settings = Settings::from_pairs([
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
    ])?;
    let (trigger, signal) = shutdown::channel();
    let service = Service::build(settings.clone(), signal).await?;
    let running = tokio::spawn(service.run_until_stopped());

    let channel = broker::confirm_channel(&conn).await?;
    broker::declare_topology(&channel, &settings).await?;
    let bulk = Bulk::new(args.customers, args.assignees);
    let events = publish::sample_events(&bulk);
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
    let table = render(&delivered, wanted.len());
    Ok(table)
}

/// One line per notice: assignee, count, summary, the customers listed.
pub fn render(notices: &[Value], events: usize) -> String {
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
        let more = if shown < count {
            format!(" … (+{})", count - shown)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "{:<12} {:<8} {:>9} {:<7}  {}{}\n",
            n["assignee"]["user_id"].as_str().unwrap_or("?"),
            n["assignee"]["name"].as_str().unwrap_or("-"),
            count,
            n["summary"].as_bool().unwrap_or(false),
            names.iter().take(3).copied().collect::<Vec<_>>().join("、"),
            more
        ));
    }
    out
}
