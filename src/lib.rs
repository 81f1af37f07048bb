//! wechat-notifier: tells a salesperson on WeChat, within seconds, that CRM
//! customers were assigned to them, reliably and within WeChat's quotas.
//!
//! Data flows one way — broker → validate → coalesce → rate-limit → WeChat →
//! ack — with retries and dead letters as side exits. The crate map:
//!
//! - [`settings`]: typed settings from the environment and a TOML file.
//! - [`event`]: raw bytes → a validated `AssignmentEvent` (pure).
//! - [`notice`]: the notice for a window and its deterministic id (pure).
//! - [`coalescer`]: per-assignee windows and their close rules (pure + time).
//! - [`broker`]: connect, declare the topology, publish with confirms;
//!   `broker::inspect` looks without changing anything (passive declares).
//! - [`reason`]: the one vocabulary of dead-letter reasons (headers, `dlq` filters, metric labels).
//! - [`dispatch`]: rate budget, one call per assignee, outcome → ack/park/dead-letter.
//! - [`ledger`]: the grant ledger in PostgreSQL (subscription credits, held notices).
//! - [`wechat`]: tokens, the cloud-function and subscribe-message calls, errcode → outcome.
//! - [`service`]: broker sessions, reconnects, shutdown drain (the `run` subcommand).
//! - [`sim`]: the WeChat simulator used by tests, the demo and docker-compose.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`; [`metrics`]: the registry.
//! - [`cli`]: the command line; [`cmd`]: one file per subcommand (`run`, `sim`,
//!   `publish`, `demo`, `check`, `status`, `dlq`); `main.rs` only dispatches there.
//!   [`publish`] is `cmd::publish`, re-exported: tests and benches publish with it.
//! - [`shutdown`], [`telemetry`], [`progress`]: signals, logs, progress of long CLI work;
//!   [`trace`]: W3C trace context in and out, OpenTelemetry spans and their export.

pub mod broker;
pub mod cli;
pub mod cmd;
pub mod coalescer;
pub mod dispatch;
pub mod event;
pub mod http;
pub mod ledger;
pub mod log_writer;
pub mod metrics;
pub mod notice;
pub mod progress;
pub mod reason;
pub mod service;
pub mod settings;
pub mod shutdown;
pub mod sim;
pub mod telemetry;
pub mod trace;
pub mod wechat;

pub use cmd::publish;
