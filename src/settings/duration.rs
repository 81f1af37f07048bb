//! Durations as settings write them (`500ms`, `5s`, `2m`, `24h`, `7d`), and the
//! readers of duration-valued variables. `format_duration` is also how a retry
//! queue's name spells its delay, so it never changes a name that exists.

use std::time::Duration;

use super::{SettingsError, Source};

/// Parses `500ms`, `5s`, `2m`, `24h` (contract section 7) and `7d` (the
/// ledger's `NOTIFIER_HOLD_FOR` is counted in days).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1_000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// Writes a duration the way settings are written. Whole days stay in hours
/// (`48h`): the retry queues are named by this, and a queue named
/// `….retry.24h` by an earlier release must keep its name.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

pub(super) fn duration(src: &Source, var: &str, default: &str) -> Result<Duration, SettingsError> {
    let raw = src.or(var, default);
    parse_duration(raw).ok_or_else(|| {
        SettingsError::new(
            var,
            format!("a duration like 500ms, 5s, 2m, 24h or 7d, got {raw:?}"),
        )
    })
}

/// As `duration`, refusing zero (a zero timeout would fail every call).
pub(super) fn nonzero_duration(
    src: &Source,
    var: &str,
    default: &str,
) -> Result<Duration, SettingsError> {
    match parse_duration(src.or(var, default)) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(SettingsError::new(
            var,
            format!(
                "a non-zero duration like 500ms, 5s or 2m, got {:?}",
                src.or(var, default)
            ),
        )),
    }
}

/// `NOTIFIER_BATCH_*_MS` are milliseconds by name; a bare number is read as such,
/// and a written duration (`2s`) is accepted too.
pub(super) fn millis(src: &Source, var: &str) -> Result<Duration, SettingsError> {
    let raw = src.or(var, "");
    raw.trim()
        .parse::<u64>()
        .ok()
        .filter(|ms| *ms <= 86_400_000)
        .map(Duration::from_millis)
        .ok_or_else(|| {
            SettingsError::new(
                var,
                format!("a number of milliseconds (or a duration like 2s), got {raw:?}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::super::tests::with;
    use super::*;

    #[test]
    fn durations_parse_as_written() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1w"), None);
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        // Days are written in hours: retry queue names must not change.
        assert_eq!(format_duration(Duration::from_secs(2 * 86_400)), "48h");
        assert_eq!(
            with(&[("NOTIFIER_BATCH_WINDOW_MS", "250")])
                .unwrap()
                .batch_window,
            Duration::from_millis(250)
        );
        assert_eq!(
            with(&[("NOTIFIER_MAX_AGE", "2d")]).unwrap().max_age,
            Duration::from_secs(2 * 86_400)
        );
    }
}
