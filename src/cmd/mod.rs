//! One file per subcommand of the command line (contract section 7): each
//! reads only the settings it uses, starts logging, does its work and answers
//! with an exit code. `main.rs` only parses and dispatches here.
//!
//! Exit codes: 0 done, 1 failed (one line on stderr saying why), 2 a bad
//! setting or argument (one line naming it).

pub mod check;
pub mod demo;
pub mod dlq;
pub mod ledger;
pub mod publish;
pub mod run;
pub mod sim;
pub mod status;

use std::process::ExitCode;

use crate::cli::{Cli, Command};
use crate::settings::{Needs, Settings};

/// Runs the chosen subcommand (`run` when none is given).
pub async fn dispatch(cli: Cli) -> ExitCode {
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run::main().await,
        Command::Sim(args) => sim::main(args).await,
        Command::Publish(args) => publish::main(args).await,
        Command::Demo(args) => demo::main(args).await,
        Command::Check => check::main().await,
        Command::Status => status::main().await,
        Command::Dlq(cmd) => dlq::main(cmd).await,
        Command::Ledger(cmd) => ledger::main(cmd).await,
    }
}

/// Prints `wechat-notifier: {why}` (one line) and returns exit code 1.
pub fn fail(why: impl std::fmt::Display) -> ExitCode {
    eprintln!("wechat-notifier: {}", one_line(&why.to_string()));
    ExitCode::from(1)
}

/// Prints `wechat-notifier: {why}` (one line) and returns exit code 2.
pub fn bad_usage(why: impl std::fmt::Display) -> ExitCode {
    eprintln!("wechat-notifier: {}", one_line(&why.to_string()));
    ExitCode::from(2)
}

/// The settings `needs` asks for from the environment, or exit code 2 with
/// the one line naming the variable.
pub fn settings(needs: Needs) -> Result<Settings, ExitCode> {
    Settings::from_env_for(needs).map_err(bad_usage)
}

/// Whatever a library error holds, the operator gets one line.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
