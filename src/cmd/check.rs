//! `check`: the settings parse, the broker answers and holds the topology the
//! settings name, and WeChat answers the same probe the service makes before
//! consuming. Read-only: passive declares only, so a mistyped queue name is
//! reported missing, never created. Exit 0, or 1 with one line naming every
//! problem (the report on stdout has the details). With the grant ledger on,
//! it also reaches PostgreSQL and finds the ledger's tables (it never migrates).

use std::process::ExitCode;
use std::sync::Arc;

use crate::broker::inspect::{self, Presence};
use crate::broker::{self, redact_url};
use crate::metrics::Metrics;
use crate::settings::{Needs, Settings};
use crate::telemetry;
use crate::wechat::WeChat;

/// The `check` subcommand.
pub async fn main() -> ExitCode {
    let settings = match super::settings(Needs::Everything) {
        Ok(s) => s,
        Err(code) => return code,
    };
    telemetry::init(settings.log_format, "warn");
    let (report, problems) = run(&settings).await;
    print!("{report}");
    if problems.is_empty() {
        println!("ok");
        ExitCode::SUCCESS
    } else {
        super::fail(format!("check failed: {}", problems.join("; ")))
    }
}

/// Checks everything; returns the report and the problems found (none: ok).
pub async fn run(settings: &Settings) -> (String, Vec<String>) {
    let mut report = format!(
        "settings            ok: {}\n",
        super::run::effective(settings)
    );
    let mut problems = Vec::new();
    let brokers: Vec<String> = settings.amqp_urls.iter().map(|u| redact_url(u)).collect();
    match broker::connect(&settings.amqp_urls, "wechat-notifier-check").await {
        Err(e) => {
            report.push_str(&format!("broker              {e}\n"));
            problems.push(format!("broker: {e}"));
        }
        Ok(conn) => {
            report.push_str(&format!(
                "broker              reachable ({})\n",
                brokers.join(", ")
            ));
            match inspect::topology(&conn, settings).await {
                Err(e) => problems.push(format!("broker: {e}")),
                Ok(found) => {
                    for f in &found {
                        report.push_str(&format!("{f}\n"));
                    }
                    let missing: Vec<String> = found
                        .iter()
                        .filter(|f| f.presence == Presence::Missing)
                        .map(|f| format!("{} {}", f.role, f.name))
                        .collect();
                    if !missing.is_empty() {
                        problems.push(format!(
                            "missing (`run` declares them): {}",
                            missing.join(", ")
                        ));
                    }
                    for f in &found {
                        if let Presence::Mismatched(why) = &f.presence {
                            problems.push(format!("{} {} mismatched: {why}", f.role, f.name));
                        }
                    }
                }
            }
            match inspect::management(settings) {
                None => report.push_str(
                    "                    arguments not compared: a passive declare cannot see them \
                     (set NOTIFIER_MANAGEMENT_URL to compare through the management API)\n",
                ),
                // Set but not answering: the comparison above silently did not happen.
                Some(api) => match api.get("overview").await {
                    Ok(_) => report.push_str("management API      ok (arguments compared)\n"),
                    Err(e) => {
                        report.push_str(&format!("management API      {e}\n"));
                        problems.push(format!("NOTIFIER_MANAGEMENT_URL: {e}"));
                    }
                },
            }
            let _ = conn.close(200, "check done".into()).await;
        }
    }
    // The ledger: reached, and migrated (never migrated here: `check`
    // changes nothing).
    if let Some(l) = &settings.ledger {
        let reached = match crate::ledger::Store::connect(l, None) {
            Ok(store) => store.ping().await,
            Err(e) => Err(e),
        };
        match reached {
            Ok(()) => report.push_str(&format!("ledger              ok (schema {})\n", l.schema)),
            Err(e) => {
                report.push_str(&format!("ledger              {e}\n"));
                problems.push(format!(
                    "ledger: {e} (a replica migrates the schema at start; `check` never does)"
                ));
            }
        }
    }
    // The very probe a replica makes before consuming: a token, and in
    // cloud-function mode a call the function answers without sending.
    let wechat = WeChat::new(settings, Arc::new(Metrics::new()));
    match wechat.probe().await {
        Ok(()) => report.push_str(&format!(
            "WeChat              ok ({} at {})\n",
            wechat.api_name(),
            settings.wechat_api_base
        )),
        Err(e) => {
            report.push_str(&format!("WeChat              {}\n", e.detail));
            problems.push(format!("WeChat ({}): {}", e.outcome.as_str(), e.detail));
        }
    }
    (report, problems)
}
