//! The `wechat-notifier` binary: parse the command line, read the settings,
//! start logging, and hand over to the library. Exit codes: 0 done, 1 failed,
//! 2 a bad setting (one line naming the variable).

use std::process::ExitCode;

use clap::Parser;
use wechat_notifier::cli::{Cli, Command, DlqCommand};
use wechat_notifier::progress::Progress;
use wechat_notifier::settings::{Settings, Source};
use wechat_notifier::{broker, demo, dlq, publish, service, shutdown, sim, telemetry};

fn settings_or_exit() -> Result<Settings, ExitCode> {
    Settings::from_env().map_err(|e| {
        eprintln!("wechat-notifier: {e}");
        ExitCode::from(2)
    })
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("wechat-notifier: {e}");
    ExitCode::from(1)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let settings = match settings_or_exit() {
                Ok(s) => s,
                Err(code) => return code,
            };
            telemetry::init(settings.log_format, "info");
            let (trigger, signal) = shutdown::channel();
            shutdown::on_signals(trigger);
            match service::Service::build(settings, signal).await {
                Ok(svc) => {
                    // One fixed line (not a log record) so whoever started us with port 0
                    // learns the address, whatever the log format or level.
                    eprintln!("wechat-notifier: http listening on {}", svc.http_addr());
                    tracing::info!(http = %svc.http_addr(), "wechat-notifier starting");
                    match svc.run_until_stopped().await {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(e) => fail(format!("{e:#}")),
                    }
                }
                Err(e) => fail(format!("cannot bind NOTIFIER_METRICS_ADDR: {e}")),
            }
        }
        Command::Sim(args) => {
            telemetry::init(telemetry::format_from_env(), "info");
            let config = sim::SimConfig {
                appid: args.appid,
                secret: args.secret,
                cloud_env: args.cloud_env,
                cloud_function: args.function,
                ..sim::SimConfig::default()
            };
            match sim::Sim::start(config, args.listen).await {
                Ok(s) => {
                    println!("WeChat simulator listening on {}", s.url());
                    let (trigger, mut signal) = shutdown::channel();
                    shutdown::on_signals(trigger);
                    signal.wait().await;
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!("cannot listen on {}: {e}", args.listen)),
            }
        }
        Command::Publish(args) => {
            let settings = match settings_or_exit() {
                Ok(s) => s,
                Err(code) => return code,
            };
            telemetry::init(settings.log_format, "warn");
            let mut bulk = publish::Bulk::new(args.customers, args.assignees);
            if args.no_batch {
                bulk.batch_id = None;
                bulk.source = "web";
            }
            let events = publish::sample_events(&bulk);
            let result = async {
                let conn = broker::connect(&settings.amqp_urls, "wechat-notifier-publish").await?;
                let channel = broker::confirm_channel(&conn).await?;
                broker::declare_topology(&channel, &settings).await?;
                let progress = Progress::start("published", events.len(), "events");
                publish::publish_events(
                    &channel,
                    &settings.exchange,
                    &events,
                    args.rate,
                    Some(&progress),
                )
                .await?;
                progress.finish();
                let _ = conn.close(200, "published".into()).await;
                Ok::<_, broker::BrokerError>(())
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
                Err(e) => fail(e),
            }
        }
        Command::Demo(args) => {
            telemetry::init(telemetry::format_from_env(), "warn");
            let url = Source::from_env()
                .ok()
                .and_then(|s| s.get("AMQP_URL").map(str::to_string))
                .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
            match demo::run(&args, &url).await {
                Ok(table) => {
                    print!("{table}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!("{e:#}")),
            }
        }
        Command::Dlq(cmd) => {
            let settings = match settings_or_exit() {
                Ok(s) => s,
                Err(code) => return code,
            };
            telemetry::init(settings.log_format, "warn");
            let (action, filter, json) = match cmd {
                DlqCommand::List { filter, json } => (dlq::Action::List, filter, json),
                DlqCommand::Replay { filter } => (dlq::Action::Replay, filter, false),
                DlqCommand::Purge { filter, yes } => {
                    if !yes {
                        eprintln!(
                            "wechat-notifier: dlq purge deletes messages; add --yes to confirm"
                        );
                        return ExitCode::from(2);
                    }
                    (dlq::Action::Purge, filter, false)
                }
            };
            let filter = dlq::Filter {
                reason: filter.reason,
                event_id: filter.event_id,
            };
            match dlq::run(&settings, action, &filter).await {
                Ok(rows) => {
                    match (action, json) {
                        (dlq::Action::List, true) => println!(
                            "{}",
                            serde_json::to_string_pretty(&rows).unwrap_or_default()
                        ),
                        (dlq::Action::List, false) => print!("{}", dlq::render(&rows)),
                        (dlq::Action::Replay, _) => {
                            println!("replayed {} message(s) into {}", rows.len(), settings.queue)
                        }
                        (dlq::Action::Purge, _) => println!(
                            "purged {} message(s) from {}",
                            rows.len(),
                            settings.dead_queue
                        ),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Check => {
            let settings = match settings_or_exit() {
                Ok(s) => s,
                Err(code) => return code,
            };
            telemetry::init(settings.log_format, "warn");
            match wechat_notifier::check::run(&settings).await {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}
