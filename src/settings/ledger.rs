//! The grant ledger's settings (contract section 8.7): where PostgreSQL is,
//! the schema its tables live in, and the limits of holding. The ledger is off
//! (`Settings::ledger` is `None`) unless `NOTIFIER_LEDGER_URL` is set; then
//! `WECHAT_TEMPLATE_ID` is required in both delivery modes, since it is the
//! ledger's key and the template the cloud function sends.
//!
//! The URL carries a password: it is a `Secret`, and no error here echoes it
//! (only the URL parser's own fixed message, which never quotes its input).

use std::time::Duration;

use super::duration::parse_duration;
use super::value::integer;
use super::wechat::template_id;
use super::{Secret, SettingsError, Source};

/// The grant ledger's settings, read when `NOTIFIER_LEDGER_URL` is set.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerSettings {
    /// `NOTIFIER_LEDGER_URL`: `postgres://user:password@host:port/db`; a
    /// `Secret`, so neither `{:?}` nor a log line prints it.
    pub url: Secret,
    /// `NOTIFIER_LEDGER_SCHEMA`: an SQL identifier the tables live under, safe
    /// to write into a statement unquoted (checked here, never from input).
    pub schema: String,
    /// `NOTIFIER_LEDGER_POOL`: connections per replica.
    pub pool: u32,
    /// `NOTIFIER_HOLD_FOR`: how long an event may wait for an accept, counted
    /// from when it was first held; also how long settled event ids are kept.
    pub hold_for: Duration,
    /// `NOTIFIER_HOLD_MAX_EVENTS`: held events per user at most.
    pub hold_max_events: u32,
    /// `NOTIFIER_CREDITS_LOW`: `notifier.credits_low` is published when an
    /// exact count falls to this or below after a send.
    pub credits_low: u32,
    /// `NOTIFIER_CREDIT_PROBE`: how often a user held at an exact 0 gets one real call.
    pub credit_probe: Duration,
    /// `WECHAT_TEMPLATE_ID`: the template whose credits the ledger counts.
    /// Empty only for `Needs::Ledger` (the read-only `ledger` commands, which
    /// show every template) when it is not set.
    pub template_id: String,
}

impl LedgerSettings {
    /// The URL without its user, password and query (which may carry one too):
    /// `postgres://db.example:5432/crm`, for log lines and `check`.
    pub fn redacted_url(&self) -> String {
        match reqwest::Url::parse(self.url.expose()) {
            Ok(u) => format!(
                "{}://{}{}{}",
                u.scheme(),
                u.host_str().unwrap_or(""),
                u.port().map(|p| format!(":{p}")).unwrap_or_default(),
                u.path()
            ),
            Err(_) => "<malformed PostgreSQL URL>".into(),
        }
    }
}

/// The ledger's settings: `None` when `NOTIFIER_LEDGER_URL` is unset. With
/// `require_template`, a missing `WECHAT_TEMPLATE_ID` is an error naming it.
pub(super) fn read(
    src: &Source,
    require_template: bool,
) -> Result<Option<LedgerSettings>, SettingsError> {
    let Some(raw) = src.get("NOTIFIER_LEDGER_URL") else {
        return Ok(None);
    };
    let template_id = match template_id(src) {
        Some(t) if t.chars().count() > 128 => {
            return Err(SettingsError::new(
                "WECHAT_TEMPLATE_ID",
                "a template id of 1..128 characters",
            ))
        }
        Some(t) => t,
        None if !require_template => String::new(),
        None => {
            return Err(SettingsError::new(
                "WECHAT_TEMPLATE_ID",
                "the subscribe-message template id (required in both delivery modes when \
                 NOTIFIER_LEDGER_URL is set: it is the grant ledger's key), but it is not set",
            ))
        }
    };
    Ok(Some(LedgerSettings {
        url: url(raw)?,
        schema: schema(src)?,
        pool: integer(src, "NOTIFIER_LEDGER_POOL", "4", 1u32, 64)?,
        hold_for: long_duration(src, "NOTIFIER_HOLD_FOR", "7d")?,
        hold_max_events: integer(src, "NOTIFIER_HOLD_MAX_EVENTS", "1000", 1u32, 1_000_000)?,
        credits_low: integer(src, "NOTIFIER_CREDITS_LOW", "1", 0u32, 1_000_000)?,
        credit_probe: long_duration(src, "NOTIFIER_CREDIT_PROBE", "1h")?,
        template_id,
    }))
}

/// A `postgres://` or `postgresql://` URL, as the PostgreSQL driver takes it.
/// The error never holds the value: it may carry the password.
fn url(raw: &str) -> Result<Secret, SettingsError> {
    let var = "NOTIFIER_LEDGER_URL";
    let expected = "a postgres:// or postgresql:// URL like postgres://user:password@host:5432/db";
    let raw = raw.trim();
    match reqwest::Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") => Ok(Secret::new(raw)),
        // Not even the scheme is named: in `user:password@host` without a
        // scheme, the parser takes the user name for one.
        Ok(_) => Err(SettingsError::new(
            var,
            format!("{expected}, but it has another scheme (the value is not shown, it may hold a password)"),
        )),
        // `ParseError`'s text is fixed ("invalid port number", ...), never the input.
        Err(e) => Err(SettingsError::new(
            var,
            format!("{expected}, but it is malformed ({e}; the value is not shown, it may hold a password)"),
        )),
    }
}

/// `NOTIFIER_LEDGER_SCHEMA`: lower case, so it needs no quoting and means the
/// same to every client; `pg_` is reserved by PostgreSQL for its own schemas.
fn schema(src: &Source) -> Result<String, SettingsError> {
    let var = "NOTIFIER_LEDGER_SCHEMA";
    let raw = src.or(var, "wechat_notifier").trim();
    let mut chars = raw.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && raw.len() <= 63 && !raw.starts_with("pg_") {
        Ok(raw.to_string())
    } else {
        Err(SettingsError::new(
            var,
            format!(
                "an SQL identifier of 1..63 characters a-z, 0-9 and _ (not starting with a digit or pg_), got {raw:?}"
            ),
        ))
    }
}

/// A non-zero duration; days allowed (`7d`).
fn long_duration(src: &Source, var: &str, default: &str) -> Result<Duration, SettingsError> {
    let raw = src.or(var, default);
    match parse_duration(raw) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(SettingsError::new(
            var,
            format!("a non-zero duration like 30m, 24h or 7d, got {raw:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::with;
    use super::super::{Needs, Settings};
    use super::*;

    const URL: (&str, &str) = (
        "NOTIFIER_LEDGER_URL",
        "postgres://notifier:pg-pass-123@db.example:5432/crm",
    );

    #[test]
    fn the_ledger_is_off_unless_its_url_is_set() {
        assert_eq!(with(&[]).unwrap().ledger, None);
        // Its other settings are not read while it is off.
        assert_eq!(with(&[("NOTIFIER_LEDGER_POOL", "0")]).unwrap().ledger, None);
    }

    #[test]
    fn defaults_follow_the_contract() {
        let l = with(&[URL, ("WECHAT_TEMPLATE_ID", "tpl-1")])
            .unwrap()
            .ledger
            .unwrap();
        assert_eq!(l.url.expose(), URL.1);
        assert_eq!(l.schema, "wechat_notifier");
        assert_eq!(l.pool, 4);
        assert_eq!(l.hold_for, Duration::from_secs(7 * 86_400));
        assert_eq!(l.hold_max_events, 1000);
        assert_eq!(l.credits_low, 1);
        assert_eq!(l.credit_probe, Duration::from_secs(3600));
        assert_eq!(l.template_id, "tpl-1");
        let l = with(&[
            (
                "NOTIFIER_LEDGER_URL",
                "postgresql:///crm?host=/run/postgresql&user=u",
            ),
            ("WECHAT_TEMPLATE_ID", "t"),
            ("NOTIFIER_LEDGER_SCHEMA", "_ledger_2"),
            ("NOTIFIER_LEDGER_POOL", "64"),
            ("NOTIFIER_HOLD_FOR", "36h"),
            ("NOTIFIER_CREDITS_LOW", "0"),
        ])
        .unwrap()
        .ledger
        .unwrap();
        assert_eq!(
            (l.schema.as_str(), l.pool, l.hold_for, l.credits_low),
            ("_ledger_2", 64, Duration::from_secs(36 * 3600), 0)
        );
    }

    #[test]
    fn the_template_id_is_required_in_both_modes() {
        let err = with(&[URL]).unwrap_err();
        assert_eq!(err.var, "WECHAT_TEMPLATE_ID");
        assert!(err.expected.contains("NOTIFIER_LEDGER_URL"), "{err}");
        let err = with(&[
            URL,
            ("WECHAT_DELIVERY_MODE", "subscribe_message"),
            ("WECHAT_TEMPLATE_DATA", r#"{"thing1":"{customer_names}"}"#),
        ])
        .unwrap_err();
        assert_eq!(err.var, "WECHAT_TEMPLATE_ID");
        // The direct mode's template is the ledger's key.
        let s = with(&[
            URL,
            ("WECHAT_DELIVERY_MODE", "subscribe_message"),
            ("WECHAT_TEMPLATE_ID", "direct-tpl"),
            ("WECHAT_TEMPLATE_DATA", r#"{"thing1":"{customer_names}"}"#),
        ])
        .unwrap();
        assert_eq!(s.ledger.unwrap().template_id, "direct-tpl");
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        let cases: &[(&str, &str)] = &[
            ("NOTIFIER_LEDGER_URL", "mysql://u:p@h/db"),
            ("NOTIFIER_LEDGER_URL", "db.example:5432"),
            ("NOTIFIER_LEDGER_SCHEMA", "Ledger"),
            ("NOTIFIER_LEDGER_SCHEMA", "1ledger"),
            ("NOTIFIER_LEDGER_SCHEMA", "a-b"),
            ("NOTIFIER_LEDGER_SCHEMA", "pg_ledger"),
            ("NOTIFIER_LEDGER_SCHEMA", "x; drop table y"),
            (
                "NOTIFIER_LEDGER_SCHEMA",
                "a234567890123456789012345678901234567890123456789012345678901234",
            ),
            ("NOTIFIER_LEDGER_POOL", "0"),
            ("NOTIFIER_LEDGER_POOL", "65"),
            ("NOTIFIER_HOLD_FOR", "7"),
            ("NOTIFIER_HOLD_FOR", "0d"),
            ("NOTIFIER_HOLD_MAX_EVENTS", "0"),
            ("NOTIFIER_CREDITS_LOW", "-1"),
            ("NOTIFIER_CREDIT_PROBE", "often"),
        ];
        for (var, value) in cases {
            let mut pairs = vec![URL, ("WECHAT_TEMPLATE_ID", "t"), (*var, *value)];
            if *var == "NOTIFIER_LEDGER_URL" {
                pairs.remove(0);
            }
            let err = with(&pairs).unwrap_err();
            assert_eq!(&err.var, var, "{value}: {err}");
            assert!(err.to_string().starts_with(var));
            assert!(!err.to_string().contains('\n'));
        }
    }

    #[test]
    fn a_bad_url_is_refused_without_showing_its_password() {
        for bad in [
            "postgres://notifier:pg-pass-123@db.example:54x32/crm",
            "postgres://notifier:pg-pass-123@db.example:99999/crm",
            "mysql://notifier:pg-pass-123@db.example:3306/crm",
            "notifier:pg-pass-123@db.example",
        ] {
            let err =
                with(&[("NOTIFIER_LEDGER_URL", bad), ("WECHAT_TEMPLATE_ID", "t")]).unwrap_err();
            assert_eq!(err.var, "NOTIFIER_LEDGER_URL");
            let line = err.to_string();
            assert!(!line.contains("pg-pass-123"), "{line}");
            assert!(!line.contains("db.example"), "{line}");
        }
        let s = with(&[URL, ("WECHAT_TEMPLATE_ID", "t")]).unwrap();
        assert!(!format!("{s:?}").contains("pg-pass-123"));
        let ledger = s.ledger.unwrap();
        assert_eq!(ledger.redacted_url(), "postgres://db.example:5432/crm");
        let mut with_query = ledger.clone();
        with_query.url = Secret::new("postgres://h/db?user=u&password=pg-pass-123");
        assert_eq!(with_query.redacted_url(), "postgres://h/db");
    }

    #[test]
    fn a_broker_only_command_never_reads_the_ledger() {
        let src = Source::from_pairs([URL, ("NOTIFIER_LEDGER_POOL", "0")]).unwrap();
        assert_eq!(
            Settings::for_command(&src, Needs::Broker).unwrap().ledger,
            None
        );
        // The ledger's read-only commands read it without WeChat settings, and
        // need no template id (they show every template).
        let src = Source::from_pairs([URL]).unwrap();
        let s = Settings::for_command(&src, Needs::Ledger).unwrap();
        assert_eq!(s.ledger.unwrap().template_id, "");
        let src = Source::from_pairs([URL, ("NOTIFIER_LEDGER_POOL", "0")]).unwrap();
        assert_eq!(
            Settings::for_command(&src, Needs::Ledger).unwrap_err().var,
            "NOTIFIER_LEDGER_POOL"
        );
    }
}
