//! `run` (the default): wires the settings, logging and the shutdown signal
//! into `service::Service`, says once what it runs with, and waits.

use std::process::ExitCode;

use crate::broker::redact_url;
use crate::service::Service;
use crate::settings::{format_duration, DeliveryMode, Needs, Settings, TokenMode};
use crate::{shutdown, telemetry};

pub async fn main() -> ExitCode {
    let settings = match super::settings(Needs::Everything) {
        Ok(s) => s,
        Err(code) => return code,
    };
    // Before the logs: the notice's log span is exported through them.
    let traced = crate::trace::init();
    telemetry::init(settings.log_format, "info");
    // Spans are a help, never a condition: a bad endpoint is said and skipped.
    if let Err(e) = traced {
        tracing::warn!("{e}; spans are not exported");
    }
    tracing::info!("{}", startup_line(&settings));
    let (trigger, signal) = shutdown::channel();
    shutdown::on_signals(trigger);
    let service = match Service::build(settings, signal).await {
        Ok(s) => s,
        Err(e) => return super::fail(format!("cannot bind NOTIFIER_METRICS_ADDR: {e}")),
    };
    // Whatever the log level: scripts and tests read the bound address here
    // (NOTIFIER_METRICS_ADDR may name port 0).
    telemetry::say(&format!(
        "wechat-notifier: http listening on {}",
        service.http_addr()
    ));
    match service.run_until_stopped().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail(format!("{e:#}")),
    }
}

/// What this replica runs with, in one line: version, delivery mode, queue
/// names, rate, windows, prefetch, retry ladder, token mode. Secrets are not
/// in `Settings`' printable fields, and the AMQP URLs lose their password.
pub fn startup_line(s: &Settings) -> String {
    format!(
        "wechat-notifier {} starting: {}",
        env!("CARGO_PKG_VERSION"),
        effective(s)
    )
}

/// The effective settings in one line (`check` prints it too).
pub fn effective(s: &Settings) -> String {
    let mode = match s.delivery_mode {
        DeliveryMode::CloudFunction => format!(
            "cloud_function (env {}, function {})",
            s.cloud_env, s.cloud_function
        ),
        DeliveryMode::SubscribeMessage => "subscribe_message".to_string(),
    };
    let token = match s.token_mode {
        TokenMode::Stable => "stable",
        TokenMode::Classic => "classic",
    };
    let ladder: Vec<String> = s.retry_delays.iter().map(|d| format_duration(*d)).collect();
    let brokers: Vec<String> = s.amqp_urls.iter().map(|u| redact_url(u)).collect();
    let ledger = match &s.ledger {
        None => "ledger off".to_string(),
        Some(l) => format!(
            "ledger {} schema {} (pool {}, template {}, hold for {} up to {} events)",
            l.redacted_url(),
            l.schema,
            l.pool,
            l.template_id,
            format_duration(l.hold_for),
            l.hold_max_events
        ),
    };
    format!(
        "broker {}, appid {}, delivery {mode}, token {token}, \
         exchange {}, queue {}, dead-letter queue {}, retry queues {}.<{}>, \
         rate {}/s burst {}, window {} (max wait {}, max {} events), prefetch {}, \
         max attempts {}, max age {}, call timeout {}, {ledger}",
        brokers.join(","),
        s.appid,
        s.exchange,
        s.queue,
        s.dead_queue,
        s.retry_queue_prefix,
        ladder.join(","),
        s.rate_per_sec,
        s.rate_burst,
        format_duration(s.batch_window),
        format_duration(s.batch_max_wait),
        s.batch_max,
        s.prefetch,
        s.max_attempts,
        format_duration(s.max_age),
        format_duration(s.call_timeout),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_startup_line_names_the_settings_and_hides_the_secrets() {
        let s = Settings::from_pairs([
            ("AMQP_URL", "amqp://ops:amqp-pass-123@mq.example:5672/%2f"),
            ("WECHAT_APPID", "wx123"),
            ("WECHAT_APPSECRET", "appsecret-xyz"),
            ("WECHAT_CLOUD_ENV", "env-1"),
            ("NOTIFIER_RETRY_DELAYS", "5s,1m"),
        ])
        .unwrap();
        let line = startup_line(&s);
        for want in [
            env!("CARGO_PKG_VERSION"),
            "cloud_function",
            "wechat-notifier.customer-assigned",
            "wechat-notifier.dead",
            "rate 10/s burst 1",
            "window 2s",
            "prefetch 2000",
            "5s,1m",
            "token stable",
            "mq.example:5672",
        ] {
            assert!(line.contains(want), "{want} in {line}");
        }
        assert!(!line.contains("amqp-pass-123") && !line.contains("appsecret-xyz"));
        assert!(!line.contains('\n'));
    }

    #[test]
    fn the_startup_line_names_the_ledger_without_its_password() {
        let s = Settings::from_pairs([
            ("WECHAT_APPID", "wx123"),
            ("WECHAT_APPSECRET", "appsecret-xyz"),
            ("WECHAT_CLOUD_ENV", "env-1"),
            ("WECHAT_TEMPLATE_ID", "tpl-9"),
            (
                "NOTIFIER_LEDGER_URL",
                "postgres://notifier:pg-pass-123@db.example:5432/crm",
            ),
        ])
        .unwrap();
        let line = startup_line(&s);
        assert!(line.contains("ledger postgres://db.example:5432/crm schema wechat_notifier"));
        assert!(line.contains("template tpl-9"), "{line}");
        assert!(
            !line.contains("pg-pass-123") && !line.contains("notifier:"),
            "{line}"
        );
    }
}
