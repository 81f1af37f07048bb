//! The `wechat-notifier` binary: parse the command line and dispatch to the
//! subcommand's file in `cmd/`. Exit codes: 0 done, 1 failed, 2 a bad setting
//! or argument (one line naming it).

use std::process::ExitCode;

use wechat_notifier::cli::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    wechat_notifier::cmd::dispatch(Cli::parse_with_settings_help()).await
}
