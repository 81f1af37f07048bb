//! What operators point their tools at: the HTTP address of `/metrics`,
//! `/healthz` and `/readyz`, and the log format.

use std::net::SocketAddr;

use super::{SettingsError, Source};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

pub(super) fn metrics_addr(src: &Source) -> Result<SocketAddr, SettingsError> {
    let var = "NOTIFIER_METRICS_ADDR";
    let raw = src.or(var, "0.0.0.0:9090");
    raw.trim()
        .parse()
        .map_err(|_| SettingsError::new(var, format!("an address like 0.0.0.0:9090, got {raw:?}")))
}
