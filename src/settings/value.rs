//! The generic readers every concern uses: a bounded integer, an AMQP name,
//! one of a fixed set of words. Each error names the variable and what it
//! expected, in one line (the line the program prints before exit code 2).

use std::fmt;

use super::{SettingsError, Source};

pub(super) fn integer<T: std::str::FromStr + PartialOrd + fmt::Display + Copy>(
    src: &Source,
    var: &str,
    default: &str,
    min: T,
    max: T,
) -> Result<T, SettingsError> {
    let raw = src.or(var, default);
    match raw.trim().parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(SettingsError::new(
            var,
            format!("an integer from {min} to {max}, got {raw:?}"),
        )),
    }
}

pub(super) fn name(src: &Source, var: &str, default: &str) -> Result<String, SettingsError> {
    let raw = src.or(var, default).trim();
    if raw.len() > 255 || raw.is_empty() {
        return Err(SettingsError::new(
            var,
            "a name of 1..255 bytes (AMQP short string)",
        ));
    }
    Ok(raw.to_string())
}

pub(super) fn choice<T: Copy>(
    src: &Source,
    var: &str,
    default: &str,
    options: &[(&str, T)],
) -> Result<T, SettingsError> {
    let raw = src.or(var, default).trim();
    options
        .iter()
        .find(|(k, _)| *k == raw)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = options.iter().map(|(k, _)| *k).collect();
            SettingsError::new(var, format!("one of {}, got {raw:?}", names.join(", ")))
        })
}
