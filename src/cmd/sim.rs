//! `sim`: the WeChat simulator on a local port until SIGTERM or Ctrl-C, for
//! demos and the docker-compose file (tests start it in-process instead).

use std::process::ExitCode;

use crate::cli::SimArgs;
use crate::sim::{Sim, SimConfig};
use crate::{shutdown, telemetry};

pub async fn main(args: SimArgs) -> ExitCode {
    telemetry::init(telemetry::format_from_env(), "info");
    let config = SimConfig {
        appid: args.appid,
        secret: args.secret,
        cloud_env: args.cloud_env,
        cloud_function: args.function,
        credits: args.credits,
        ..SimConfig::default()
    };
    match Sim::start(config, args.listen).await {
        Ok(s) => {
            println!("WeChat simulator listening on {}", s.url());
            let (trigger, mut signal) = shutdown::channel();
            shutdown::on_signals(trigger);
            signal.wait().await;
            ExitCode::SUCCESS
        }
        Err(e) => super::fail(format!("cannot listen on {}: {e}", args.listen)),
    }
}
