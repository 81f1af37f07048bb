//! The `wechat-notifier` binary: parse the command line and dispatch to the
//! subcommand's file in `cmd/`. Exit codes: 0 done, 1 failed, 2 a bad setting
//! or argument (one line naming it).
//!
//! The service (`run`) gets one runtime thread: it is one consumer loop whose
//! tasks wait on the broker and WeChat, and a second worker only added
//! wake-ups across threads. lapin parses frames on a thread of its own, but
//! its socket, heartbeats and internal tasks are driven by this runtime, so
//! the service never blocks it. The other subcommands keep the multi-thread
//! runtime (`dlq list` writes to a terminal or pager that may stall).
//! jemalloc instead of the system allocator: every delivery and notice
//! allocates, and glibc's malloc was a sixth of the replica's CPU. README,
//! "Performance", has the figures for both.

use std::process::ExitCode;

use tokio::runtime::Builder;
use wechat_notifier::cli::{Cli, Command};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse_with_settings_help();
    let mut runtime = match cli.command {
        None | Some(Command::Run) => Builder::new_current_thread(),
        Some(_) => Builder::new_multi_thread(),
    };
    let code = match runtime.enable_all().build() {
        Ok(rt) => rt.block_on(wechat_notifier::cmd::dispatch(cli)),
        Err(e) => wechat_notifier::cmd::fail(format!("cannot start the async runtime: {e}")),
    };
    // Logs are written by a thread of their own: what it still holds goes out now.
    wechat_notifier::telemetry::flush();
    code
}
