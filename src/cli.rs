//! The command line of contract section 7. The doc comments are the help text.
//! Settings come from the environment (see `settings`); flags here only choose
//! what a subcommand does.

use std::net::SocketAddr;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "wechat-notifier",
    version,
    about = "Tells a salesperson on WeChat that CRM customers were assigned to them."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (the default): consume, coalesce, notify, ack.
    Run,
    /// Run a WeChat API simulator with fault injection (tests, demos, docker-compose).
    Sim(SimArgs),
    /// Publish sample customer.assigned events as the CRM would.
    Publish(PublishArgs),
    /// Run the simulator, the service and a bulk assignment in one process; print what WeChat received.
    Demo(DemoArgs),
    /// Validate the settings, reach the broker and WeChat; exit 0, or 1 with the reason.
    Check,
    /// List, replay or purge the dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters: reason, errcode, attempts, age, event id.
    List {
        #[command(flatten)]
        filter: DlqFilter,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move chosen dead letters back into the work queue (each confirmed before it leaves).
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Delete chosen dead letters.
    Purge {
        #[command(flatten)]
        filter: DlqFilter,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
}

/// Which dead letters (all when neither is given).
#[derive(Debug, clap::Args)]
pub struct DlqFilter {
    /// Only this reason (invalid_event, wechat_rejected, function_failed, no_openid, retries_exhausted, expired, delivery_limit).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only this event id.
    #[arg(long)]
    pub event_id: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, env = "SIM_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// The appid the simulator accepts.
    #[arg(long, env = "WECHAT_APPID", default_value = "wx-sim-appid")]
    pub appid: String,
    /// The AppSecret the simulator accepts.
    #[arg(
        long,
        env = "WECHAT_APPSECRET",
        default_value = "sim-secret-do-not-log",
        hide_env_values = true
    )]
    pub secret: String,
    /// The cloud environment id it accepts.
    #[arg(long, env = "WECHAT_CLOUD_ENV", default_value = "sim-env")]
    pub cloud_env: String,
    /// The cloud function name it accepts.
    #[arg(
        long,
        env = "WECHAT_CLOUD_FUNCTION",
        default_value = "quickstartFunctions"
    )]
    pub function: String,
}

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// Customers to assign (one event each).
    #[arg(long, default_value_t = 1)]
    pub customers: usize,
    /// Assignees the customers are spread over.
    #[arg(long, default_value_t = 1)]
    pub assignees: usize,
    /// Events per second (default: as fast as confirms allow).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Publish independent assignments instead of one CRM batch.
    #[arg(long)]
    pub no_batch: bool,
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Customers in the bulk assignment.
    #[arg(long, default_value_t = 50)]
    pub customers: usize,
    /// Assignees they are spread over.
    #[arg(long, default_value_t = 3)]
    pub assignees: usize,
}
