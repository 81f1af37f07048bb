//! The `wechat-notifier` binary: parse the command line and dispatch to the
//! subcommand's file in `cmd/`. Exit codes: 0 done, 1 failed, 2 a bad setting
//! or argument (one line naming it).
//!
//! One runtime thread: the service is one consumer loop whose tasks wait on
//! the broker and WeChat, so a second worker only adds wake-ups across
//! threads (lapin reads the socket on a thread of its own). jemalloc instead
//! of the system allocator: every delivery and notice allocates, and glibc's
//! malloc was a sixth of the replica's CPU. README, "Performance", has the
//! figures for both.

use std::process::ExitCode;

use wechat_notifier::cli::Cli;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    wechat_notifier::cmd::dispatch(Cli::parse_with_settings_help()).await
}
