//! The command line of contract section 7. The doc comments are the help text;
//! the settings table at the end of `--help` is generated from
//! `settings::VARIABLES`. Settings come from the environment (see `settings`);
//! flags here only choose what a subcommand does.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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

impl Cli {
    /// Parses the process arguments; `--help` (of every subcommand) ends with
    /// the table of settings and their environment variables.
    pub fn parse_with_settings_help() -> Cli {
        let matches = with_settings_help(Cli::command()).get_matches();
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

/// `command` and every subcommand under it, with the settings table after `--help`.
pub fn with_settings_help(command: clap::Command) -> clap::Command {
    let names: Vec<String> = command
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    let mut command = command.after_long_help(crate::settings::help_table());
    for name in names {
        command = command.mut_subcommand(name, with_settings_help);
    }
    command
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (the default): consume, coalesce, notify, ack.
    Run,
    /// Run a WeChat API simulator with fault injection (tests, demos, docker-compose).
    Sim(SimArgs),
    /// Publish sample customer.assigned events as the CRM would (or, with --accept, a
    /// subscription.changed answer).
    Publish(PublishArgs),
    /// Run the simulator, the service and a bulk assignment in one process; print what WeChat received.
    Demo(DemoArgs),
    /// Read-only: settings, broker (each queue present, missing or mismatched; nothing is
    /// created) and the WeChat probe the service makes; exit 0, or 1 naming the problems.
    Check,
    /// Depth and consumers of the work, retry and dead-letter queues, and the active replica.
    Status,
    /// List, export, replay or purge the dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// The grant ledger, read-only: users with held events, or one user's credits and held
    /// events (needs NOTIFIER_LEDGER_URL).
    #[command(subcommand)]
    Ledger(LedgerCommand),
}

/// Both read the ledger and change nothing; neither needs a WeChat setting.
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Users with held events: how many, since when (the oldest), and why (no_credit: no
    /// subscription credit left; no_openid: direct mode, no openid known yet).
    Held {
        /// At most this many users, those waiting longest first.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One user: the credits per template (exact, or a lower bound), the openid the
    /// ledger knows, and the held events (customer ids; names only with --names).
    Show {
        /// The user (assignee.user_id of the CRM's events).
        user_id: String,
        /// Print a JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Also print customer names (personal data: off by default).
        #[arg(long)]
        names: bool,
    },
}

/// Every `dlq` action looks at most at the messages in the dead-letter queue
/// when it starts (a replayed message that fails again at once is not seen
/// twice) and holds a bounded number of them unacked at a time.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show dead letters: reason, errcode, attempts, age, assignee, event id, detail.
    /// Every message stays in the queue.
    List {
        #[command(flatten)]
        filter: DlqFilter,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write chosen dead letters as JSON lines (body and headers) so they can be
    /// republished elsewhere. Every message stays in the queue.
    Export {
        #[command(flatten)]
        filter: DlqFilter,
        /// Write to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Move chosen dead letters back into the work queue (each copy confirmed before the
    /// original leaves), with fresh attempts.
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

/// Which dead letters (every one when no filter is given).
#[derive(Debug, clap::Args)]
pub struct DlqFilter {
    /// Only this reason: invalid_event, wechat_rejected, function_failed, no_openid,
    /// retries_exhausted, expired, delivery_limit, and with the grant ledger
    /// no_subscription, hold_full, no_ledger.
    #[arg(long)]
    pub reason: Option<String>,
    /// Only this event id.
    #[arg(long)]
    pub event_id: Option<String>,
    /// Act on at most this many messages.
    #[arg(long)]
    pub limit: Option<usize>,
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
    /// Model subscription credits: a count per (openid, template), granted with
    /// `POST /sim/credits` {"openid", "template_id", "count"}, taken by each
    /// accepted notice; a notice with none left is answered 43101.
    #[arg(long)]
    pub credits: bool,
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
    /// Instead of assignments, publish one subscription.changed event for this user, as
    /// the CRM does when the user taps "allow" in the mini program's subscribe dialog
    /// (routing key subscription.changed; a service with the grant ledger counts it).
    #[arg(
        long,
        value_name = "USER_ID",
        conflicts_with_all = ["customers", "assignees", "rate", "no_batch"]
    )]
    pub accept: Option<String>,
    /// With --accept: the user's openid (the ledger remembers it for the user).
    #[arg(long, requires = "accept")]
    pub openid: Option<String>,
    /// With --accept: the template answered for [default: WECHAT_TEMPLATE_ID].
    #[arg(long, requires = "accept")]
    pub template_id: Option<String>,
    /// With --accept: the answer, accept (one more credit), reject (no change) or off
    /// (switched off in the settings: no credit left).
    #[arg(long, requires = "accept", default_value = "accept", value_parser = ["accept", "reject", "off"])]
    pub status: String,
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
