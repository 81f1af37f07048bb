//! The pace of WeChat calls and how events are coalesced: the fleet's rate
//! and the window rules (contract section 3).

use std::time::Duration;

use super::duration::{duration, millis};
use super::{SettingsError, Source};

pub(super) fn rate(src: &Source) -> Result<f64, SettingsError> {
    let var = "NOTIFIER_RATE_PER_SEC";
    let raw = src.or(var, "10");
    match raw.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1_000_000.0 => Ok(v),
        _ => Err(SettingsError::new(
            var,
            format!("a positive number of calls per second, got {raw:?}"),
        )),
    }
}

/// `NOTIFIER_BATCH_WINDOW_MS` and `NOTIFIER_BATCH_MAX_WAIT_MS`: (window, max wait).
/// Their relation is checked once every setting is read (`Settings::for_command`),
/// so a bad value of a later variable is still the one named first, as before.
pub(super) fn windows(src: &Source) -> Result<(Duration, Duration), SettingsError> {
    let batch_window = duration(src, "NOTIFIER_BATCH_WINDOW_MS", "2000ms")
        .or_else(|_| millis(src, "NOTIFIER_BATCH_WINDOW_MS"))?;
    let batch_max_wait = duration(src, "NOTIFIER_BATCH_MAX_WAIT_MS", "10000ms")
        .or_else(|_| millis(src, "NOTIFIER_BATCH_MAX_WAIT_MS"))?;
    Ok((batch_window, batch_max_wait))
}
