//! `status`: how deep the work, retry and dead-letter queues are and who
//! consumes them, and — where the management API can tell — which replica is
//! the active one. Read-only (passive declares, GETs); broker settings only.

use std::process::ExitCode;

use crate::broker::inspect::{self, Presence};
use crate::broker::{self};
use crate::settings::{Needs, Settings};
use crate::telemetry;

/// The `status` subcommand.
pub async fn main() -> ExitCode {
    let settings = match super::settings(Needs::Broker) {
        Ok(s) => s,
        Err(code) => return code,
    };
    telemetry::init(settings.log_format, "warn");
    match run(&settings).await {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => super::fail(e),
    }
}

/// The status table.
///
/// # Errors
/// The broker could not be reached (one line).
pub async fn run(settings: &Settings) -> Result<String, broker::BrokerError> {
    let conn = broker::connect(&settings.amqp_urls, "wechat-notifier-status").await?;
    let found = inspect::topology(&conn, settings).await;
    let _ = conn.close(200, "status done".into()).await;
    let mut out = format!(
        "{:<18} {:<44} {:>9} {:>9}\n",
        "queue", "name", "messages", "consumers"
    );
    for f in found?.iter().filter(|f| f.role != "exchange") {
        let (messages, consumers) = match &f.presence {
            Presence::Present {
                messages,
                consumers,
            } => (messages.to_string(), consumers.to_string()),
            Presence::Missing => ("missing".into(), "-".into()),
            Presence::Mismatched(_) => ("mismatched".into(), "-".into()),
        };
        out.push_str(&format!(
            "{:<18} {:<44} {:>9} {:>9}\n",
            f.role, f.name, messages, consumers
        ));
    }
    let active = match inspect::management(settings) {
        None => "unknown (set NOTIFIER_MANAGEMENT_URL)".to_string(),
        Some(api) => match api.active_consumer(&settings.queue).await {
            Ok(Some(who)) => who,
            Ok(None) => "none (no consumer is active)".to_string(),
            Err(e) => format!("unknown ({e})"),
        },
    };
    out.push_str(&format!(
        "messages: ready ones (a replica's unacked deliveries are not counted)\n\
         active replica: {active}\n"
    ));
    Ok(out)
}
