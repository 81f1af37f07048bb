//! The `check` subcommand: the settings already parsed, reach the broker (and
//! see that the topology it holds matches ours) and WeChat (fetch a token).

use crate::broker;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::wechat::WeChat;

/// Returns a short report, or the reason it failed.
///
/// # Errors
/// A sentence naming what could not be reached or does not match.
pub async fn run(settings: &Settings) -> Result<String, String> {
    let conn = broker::connect(&settings.amqp_urls, "wechat-notifier-check")
        .await
        .map_err(|e| format!("broker: {e}"))?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| format!("broker: {e}"))?;
    broker::declare_topology(&channel, settings)
        .await
        .map_err(|e| format!("broker topology does not match the settings: {e}"))?;
    let _ = conn.close(200, "check done".into()).await;
    let metrics = std::sync::Arc::new(Metrics::new());
    WeChat::new(settings, metrics)
        .probe()
        .await
        .map_err(|e| format!("WeChat: {}", e.detail))?;
    Ok(format!(
        "ok: broker reachable, topology matches ({}), WeChat token fetched",
        settings.queue
    ))
}
