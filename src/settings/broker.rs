//! The broker's settings: the node URLs, the retry ladder (it names the retry
//! queues) and the management API. These are what every subcommand reads,
//! `publish`, `dlq` and `status` included. No URL is ever echoed in an error:
//! it may carry a password.

use std::time::Duration;

use super::duration::{format_duration, parse_duration};
use super::{Secret, Settings, SettingsError, Source};

pub(super) fn amqp_urls(src: &Source) -> Result<Vec<String>, SettingsError> {
    let var = "AMQP_URL";
    let raw = src.or(var, "amqp://guest:guest@127.0.0.1:5672/%2f");
    let urls: Vec<String> = raw
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    for url in &urls {
        // Checked by lapin's own parser so a URL it will not take never passes here;
        // the message deliberately does not echo the URL (it may carry a password).
        if url.parse::<lapin::uri::AMQPUri>().is_err() {
            return Err(SettingsError::new(
                var,
                "amqp:// or amqps:// URLs, comma-separated, one of them is malformed",
            ));
        }
    }
    if urls.is_empty() {
        return Err(SettingsError::new(var, "at least one amqp:// URL"));
    }
    Ok(urls)
}

pub(super) fn retry_delays(src: &Source) -> Result<Vec<Duration>, SettingsError> {
    let var = "NOTIFIER_RETRY_DELAYS";
    let raw = src.or(var, "5s,30s,2m,10m,30m");
    let delays: Option<Vec<Duration>> = raw.split(',').map(parse_duration).collect();
    match delays {
        Some(d) if !d.is_empty() && d.iter().all(|d| !d.is_zero()) => {
            let mut seen = d.clone();
            seen.sort();
            seen.dedup();
            if seen.len() != d.len() {
                return Err(SettingsError::new(
                    var,
                    format!("distinct delays (one retry queue each), got {raw:?}"),
                ));
            }
            Ok(d)
        }
        _ => Err(SettingsError::new(
            var,
            format!("comma-separated non-zero durations like 5s,30s,2m, got {raw:?}"),
        )),
    }
}

pub(super) fn management_url(src: &Source) -> Result<Option<Secret>, SettingsError> {
    let var = "NOTIFIER_MANAGEMENT_URL";
    let Some(raw) = src.get(var) else {
        return Ok(None);
    };
    match reqwest::Url::parse(raw.trim()) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            Ok(Some(Secret::new(raw.trim().trim_end_matches('/'))))
        }
        // Not echoed: the URL may carry the management user's password.
        _ => Err(SettingsError::new(
            var,
            "an http:// or https:// URL like http://user:pass@host:15672, but it is malformed",
        )),
    }
}

impl Settings {
    /// The retry queue of one ladder step, e.g. `wechat-notifier.retry.30s`.
    pub fn retry_queue(&self, delay: Duration) -> String {
        format!("{}.{}", self.retry_queue_prefix, format_duration(delay))
    }
}
