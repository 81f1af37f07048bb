//! Typed settings (contract section 5), read once at start from the environment
//! and an optional TOML file. Nothing else in the crate reads the environment:
//! every other module takes a `Settings` (or a part of it), so a bad value is
//! caught here, named, and stops the program with exit code 2 before any work.
//!
//! This file holds the tree (`Settings`), where values come from (`Source`)
//! and what each subcommand reads (`Needs`); each concern reads its own
//! variables in its own file: `broker`, `wechat`, `pacing`, `operations`,
//! `ledger` (contract section 8.7), with `duration`, `value` and `secret` as
//! the shared readers and `variables` as the one list behind `--help`.

mod broker;
mod duration;
mod ledger;
mod operations;
mod pacing;
mod secret;
mod value;
mod variables;
mod wechat;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use duration::{format_duration, parse_duration};
pub use ledger::LedgerSettings;
pub use operations::LogFormat;
pub use secret::Secret;
pub use variables::{help_table, Variable, VARIABLES};
pub use wechat::{
    keyword_type, template_id, DeliveryMode, TemplateSettings, TokenMode, KEYWORD_TYPES,
    PLACEHOLDERS,
};

use duration::{duration, nonzero_duration};
use value::{choice, integer, name};
use variables::{known_file_key, TEMPLATE_KEYS};
use wechat::WeChatPart;

/// A setting that could not be used: the variable's name and what it expected.
/// Its `Display` is the one line the program prints before exiting with code 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {expected}")]
pub struct SettingsError {
    pub var: String,
    pub expected: String,
}

impl SettingsError {
    fn new(var: &str, expected: impl Into<String>) -> Self {
        SettingsError {
            var: var.to_string(),
            expected: expected.into(),
        }
    }
}

/// Every setting of contract section 5, parsed and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// One URL per cluster node, tried in turn.
    pub amqp_urls: Vec<String>,
    pub wechat_api_base: String,
    pub appid: String,
    pub appsecret: Secret,
    pub token_mode: TokenMode,
    pub delivery_mode: DeliveryMode,
    pub cloud_env: String,
    pub cloud_function: String,
    pub template: Option<TemplateSettings>,
    /// How long one WeChat call (token fetch or notice) may take before it
    /// counts as a timeout, which is transient (not in the contract).
    pub call_timeout: Duration,
    pub rate_per_sec: f64,
    pub rate_burst: u32,
    pub batch_window: Duration,
    pub batch_max_wait: Duration,
    pub batch_max: usize,
    pub prefetch: u16,
    /// WeChat calls one replica has under way at once (each waiting for its
    /// rate slot or its answer).
    pub max_in_flight: usize,
    pub retry_delays: Vec<Duration>,
    pub max_attempts: u32,
    pub max_age: Duration,
    pub shutdown_grace: Duration,
    /// How often a replica with a configuration fault checks again (not in the contract).
    pub config_retry: Duration,
    pub exchange: String,
    pub queue: String,
    pub dead_queue: String,
    pub retry_queue_prefix: String,
    pub metrics_addr: SocketAddr,
    pub log_format: LogFormat,
    /// RabbitMQ's management API (`status` asks it which replica is active);
    /// the URL may carry credentials, so it is kept as a secret.
    pub management_url: Option<Secret>,
    /// The grant ledger (contract section 8): `None` when `NOTIFIER_LEDGER_URL`
    /// is unset, and then 43101 dead-letters as it always did.
    pub ledger: Option<LedgerSettings>,
}

/// What a subcommand reads: `publish`, `dlq` and `status` only talk to the
/// broker, so they must start without any WeChat setting (a publisher host has
/// no business holding the AppSecret); `ledger` reads the ledger's too. `run`
/// and `check` read everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// `AMQP_URL`, the names, the retry ladder (it names the retry queues),
    /// `NOTIFIER_MANAGEMENT_URL` and `NOTIFIER_LOG_FORMAT`. Every other field
    /// holds its default (the WeChat ones are empty) and must not be used.
    Broker,
    /// Every setting, each checked.
    Everything,
    /// As `Broker`, plus the grant ledger's settings (the read-only `ledger`
    /// commands); `WECHAT_TEMPLATE_ID` is not required (they show every template).
    Ledger,
}

/// Where values come from: the environment first, then the TOML file's
/// lowercase top-level keys. Tests build one from pairs.
#[derive(Debug, Clone, Default)]
pub struct Source {
    env: BTreeMap<String, String>,
    file: BTreeMap<String, String>,
    /// `[subscribe_message]` of the TOML file, kept as a table.
    file_template: Option<toml::Table>,
}

impl Source {
    /// The process environment, plus the file named by `NOTIFIER_CONFIG`.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_pairs(std::env::vars())
    }

    /// Values as if they were the environment (the TOML file, if one is named, is read too).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, SettingsError> {
        let env: BTreeMap<String, String> = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let mut source = Source {
            env,
            ..Source::default()
        };
        if let Some(path) = source.env.get("NOTIFIER_CONFIG").filter(|p| !p.is_empty()) {
            source.load_file(PathBuf::from(path))?;
        }
        Ok(source)
    }

    fn load_file(&mut self, path: PathBuf) -> Result<(), SettingsError> {
        let var = "NOTIFIER_CONFIG";
        let text = std::fs::read_to_string(&path).map_err(|e| {
            SettingsError::new(
                var,
                format!("a readable TOML file, but {}: {e}", path.display()),
            )
        })?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let msg = e.message().to_string();
            SettingsError::new(var, format!("valid TOML in {}, but: {msg}", path.display()))
        })?;
        // A mistyped or upper-case key would otherwise be silently ignored.
        let mut unknown: Vec<String> = table
            .keys()
            .filter(|k| !known_file_key(k))
            .cloned()
            .collect();
        if let Some(toml::Value::Table(t)) = table.get("subscribe_message") {
            unknown.extend(
                t.keys()
                    .filter(|k| !TEMPLATE_KEYS.contains(&k.as_str()))
                    .map(|k| format!("subscribe_message.{k}")),
            );
        }
        if !unknown.is_empty() {
            return Err(SettingsError::new(
                var,
                format!(
                    "only known settings as lowercase keys (see config.example.toml), but {} has unknown key(s): {}",
                    path.display(),
                    unknown.join(", ")
                ),
            ));
        }
        for (key, value) in table {
            match value {
                toml::Value::Table(t) if key == "subscribe_message" => self.file_template = Some(t),
                toml::Value::String(s) => {
                    self.file.insert(key, s);
                }
                toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
                    self.file.insert(key, value.to_string());
                }
                _ => {
                    return Err(SettingsError::new(
                        var,
                        format!("top-level key `{key}` to be a string, number or boolean"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// The raw value of a variable: environment wins over the file; empty is unset.
    pub fn get(&self, var: &str) -> Option<&str> {
        self.env
            .get(var)
            .or_else(|| self.file.get(&var.to_ascii_lowercase()))
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    fn or<'a>(&'a self, var: &str, default: &'a str) -> &'a str {
        self.get(var).unwrap_or(default)
    }

    fn required(&self, var: &str, what: &str) -> Result<&str, SettingsError> {
        self.get(var)
            .ok_or_else(|| SettingsError::new(var, format!("{what}, but it is not set")))
    }
}

impl Settings {
    /// Reads the process environment (and `NOTIFIER_CONFIG`).
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_source(&Source::from_env()?)
    }

    /// Reads the given pairs as if they were the environment.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, SettingsError> {
        Self::from_source(&Source::from_pairs(pairs)?)
    }

    /// Every setting, each checked (what `run` and `check` need).
    pub fn from_source(src: &Source) -> Result<Self, SettingsError> {
        Self::for_command(src, Needs::Everything)
    }

    /// Reads the process environment for a subcommand that needs only `needs`.
    pub fn from_env_for(needs: Needs) -> Result<Self, SettingsError> {
        Self::for_command(&Source::from_env()?, needs)
    }

    /// The settings a subcommand uses, each checked; with `Needs::Broker` (and
    /// `Needs::Ledger`) the WeChat and service settings are not read at all (see `Needs`).
    pub fn for_command(src: &Source, needs: Needs) -> Result<Self, SettingsError> {
        // A broker-only command reads the service's settings from nothing, so a
        // bad value it never uses cannot stop it; they hold their defaults.
        let nothing = Source::default();
        let (svc, wechat) = match needs {
            Needs::Everything => (src, WeChatPart::read(src)?),
            Needs::Broker | Needs::Ledger => (&nothing, WeChatPart::unused()),
        };
        let (batch_window, batch_max_wait) = pacing::windows(svc)?;
        let settings = Settings {
            amqp_urls: broker::amqp_urls(src)?,
            wechat_api_base: wechat.api_base,
            appid: wechat.appid,
            appsecret: wechat.appsecret,
            token_mode: wechat.token_mode,
            delivery_mode: wechat.delivery_mode,
            cloud_env: wechat.cloud_env,
            cloud_function: wechat.cloud_function,
            template: wechat.template,
            call_timeout: nonzero_duration(svc, "WECHAT_CALL_TIMEOUT", "15s")?,
            rate_per_sec: pacing::rate(svc)?,
            rate_burst: integer(svc, "NOTIFIER_RATE_BURST", "1", 1u32, 10_000)?,
            batch_window,
            batch_max_wait,
            batch_max: integer(svc, "NOTIFIER_BATCH_MAX", "50", 1usize, 1000)?,
            prefetch: integer(svc, "NOTIFIER_PREFETCH", "2000", 1u16, u16::MAX)?,
            max_in_flight: integer(svc, "NOTIFIER_MAX_IN_FLIGHT", "64", 1usize, 10_000)?,
            retry_delays: broker::retry_delays(src)?,
            max_attempts: integer(svc, "NOTIFIER_MAX_ATTEMPTS", "10", 1u32, 1000)?,
            max_age: duration(svc, "NOTIFIER_MAX_AGE", "24h")?,
            shutdown_grace: duration(svc, "NOTIFIER_SHUTDOWN_GRACE", "20s")?,
            config_retry: nonzero_duration(svc, "NOTIFIER_CONFIG_RETRY", "15s")?,
            exchange: name(src, "NOTIFIER_EXCHANGE", "crm.events")?,
            queue: name(src, "NOTIFIER_QUEUE", "wechat-notifier.customer-assigned")?,
            dead_queue: name(src, "NOTIFIER_DEAD_QUEUE", "wechat-notifier.dead")?,
            retry_queue_prefix: name(src, "NOTIFIER_RETRY_QUEUE_PREFIX", "wechat-notifier.retry")?,
            metrics_addr: operations::metrics_addr(svc)?,
            log_format: choice(
                src,
                "NOTIFIER_LOG_FORMAT",
                "text",
                &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            )?,
            management_url: broker::management_url(src)?,
            ledger: match needs {
                Needs::Everything => ledger::read(src, true)?,
                Needs::Ledger => ledger::read(src, false)?,
                Needs::Broker => None,
            },
        };
        if settings.batch_max_wait < settings.batch_window {
            return Err(SettingsError::new(
                "NOTIFIER_BATCH_MAX_WAIT_MS",
                "a value no smaller than NOTIFIER_BATCH_WINDOW_MS",
            ));
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            ("WECHAT_APPID", "wx123"),
            ("WECHAT_APPSECRET", "s3cret"),
            ("WECHAT_CLOUD_ENV", "env-1"),
        ]
    }

    pub(super) fn with(extra: &[(&'static str, &'static str)]) -> Result<Settings, SettingsError> {
        let mut pairs = base();
        pairs.extend_from_slice(extra);
        Settings::from_pairs(pairs)
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = with(&[]).unwrap();
        assert_eq!(s.amqp_urls, vec!["amqp://guest:guest@127.0.0.1:5672/%2f"]);
        assert_eq!(s.token_mode, TokenMode::Stable);
        assert_eq!(s.delivery_mode, DeliveryMode::CloudFunction);
        assert_eq!(s.cloud_function, "quickstartFunctions");
        assert_eq!(s.rate_per_sec, 10.0);
        assert_eq!(s.rate_burst, 1);
        assert_eq!(s.batch_window, Duration::from_millis(2000));
        assert_eq!(s.batch_max_wait, Duration::from_millis(10000));
        assert_eq!(s.batch_max, 50);
        assert_eq!(s.prefetch, 2000);
        assert_eq!(s.max_in_flight, 64);
        assert_eq!(s.retry_delays.len(), 5);
        assert_eq!(s.retry_queue(s.retry_delays[2]), "wechat-notifier.retry.2m");
        assert_eq!(s.max_attempts, 10);
        assert_eq!(s.max_age, Duration::from_secs(86_400));
        assert_eq!(s.shutdown_grace, Duration::from_secs(20));
        assert_eq!(s.call_timeout, Duration::from_secs(15));
        assert_eq!(s.queue, "wechat-notifier.customer-assigned");
        assert_eq!(s.dead_queue, "wechat-notifier.dead");
        assert_eq!(s.exchange, "crm.events");
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        let cases: &[(&str, &str)] = &[
            ("NOTIFIER_RATE_PER_SEC", "fast"),
            ("NOTIFIER_RATE_PER_SEC", "0"),
            ("NOTIFIER_RATE_BURST", "0"),
            ("NOTIFIER_BATCH_MAX", "1001"),
            ("NOTIFIER_BATCH_WINDOW_MS", "soon"),
            ("NOTIFIER_PREFETCH", "70000"),
            ("NOTIFIER_MAX_IN_FLIGHT", "0"),
            ("NOTIFIER_RETRY_DELAYS", "5s,,2m"),
            ("NOTIFIER_MAX_AGE", "1w"),
            ("WECHAT_CALL_TIMEOUT", "15"),
            ("WECHAT_CALL_TIMEOUT", "0s"),
            ("WECHAT_TOKEN_MODE", "magic"),
            ("WECHAT_DELIVERY_MODE", "sms"),
            ("NOTIFIER_LOG_FORMAT", "xml"),
            ("NOTIFIER_METRICS_ADDR", "nowhere"),
            ("AMQP_URL", "http://x"),
            ("WECHAT_API_BASE", "ftp://x"),
        ];
        for (var, value) in cases {
            let err = with(&[(var, value)]).unwrap_err();
            assert_eq!(&err.var, var, "{err}");
            assert!(err.to_string().starts_with(var));
            assert!(!err.to_string().contains('\n'));
        }
    }

    #[test]
    fn missing_required_values_are_named() {
        let err = Settings::from_pairs([("WECHAT_APPSECRET", "x"), ("WECHAT_CLOUD_ENV", "e")])
            .unwrap_err();
        assert_eq!(err.var, "WECHAT_APPID");
        let err =
            Settings::from_pairs([("WECHAT_APPID", "x"), ("WECHAT_CLOUD_ENV", "e")]).unwrap_err();
        assert_eq!(err.var, "WECHAT_APPSECRET");
        let err =
            Settings::from_pairs([("WECHAT_APPID", "x"), ("WECHAT_APPSECRET", "e")]).unwrap_err();
        assert_eq!(err.var, "WECHAT_CLOUD_ENV");
    }

    #[test]
    fn toml_file_adds_to_the_environment_and_env_wins() {
        let path = std::env::temp_dir().join(format!("wn-conf-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "wechat_appid = \"from-file\"\nnotifier_batch_max = 7\nnotifier_rate_per_sec = 2.5\n",
        )
        .unwrap();
        let s = Settings::from_pairs([
            ("WECHAT_APPSECRET", "x"),
            ("WECHAT_CLOUD_ENV", "e"),
            ("NOTIFIER_RATE_PER_SEC", "4"),
            ("NOTIFIER_CONFIG", path.to_str().unwrap()),
        ])
        .unwrap();
        assert_eq!(s.appid, "from-file");
        assert_eq!(s.batch_max, 7);
        assert_eq!(s.rate_per_sec, 4.0);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_broker_only_command_needs_no_wechat_setting() {
        let src = Source::from_pairs([("AMQP_URL", "amqp://u:p@mq:5672/%2f")]).unwrap();
        let s = Settings::for_command(&src, Needs::Broker).unwrap();
        assert_eq!(s.amqp_urls, vec!["amqp://u:p@mq:5672/%2f"]);
        assert_eq!(s.dead_queue, "wechat-notifier.dead");
        assert_eq!(s.retry_delays.len(), 5);
        let err = Settings::for_command(&src, Needs::Everything).unwrap_err();
        assert!(err.var.starts_with("WECHAT_"), "{err}");
        // A bad value of a setting the command does not use does not stop it.
        let src = Source::from_pairs([("NOTIFIER_RATE_PER_SEC", "fast")]).unwrap();
        assert!(Settings::for_command(&src, Needs::Broker).is_ok());
        // The broker's own settings are still checked.
        let src = Source::from_pairs([("NOTIFIER_QUEUE", " ")]).unwrap();
        assert!(
            Settings::for_command(&src, Needs::Broker).is_ok(),
            "blank is unset"
        );
        let src = Source::from_pairs([("AMQP_URL", "http://x")]).unwrap();
        assert_eq!(
            Settings::for_command(&src, Needs::Broker).unwrap_err().var,
            "AMQP_URL"
        );
        let src = Source::from_pairs([("NOTIFIER_MANAGEMENT_URL", "nope")]).unwrap();
        assert_eq!(
            Settings::for_command(&src, Needs::Broker).unwrap_err().var,
            "NOTIFIER_MANAGEMENT_URL"
        );
    }

    #[test]
    fn unknown_toml_keys_are_named_and_case_matters() {
        let path = std::env::temp_dir().join(format!("wn-unknown-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "notifier_batch_max = 7\nNOTIFIER_RATE_PER_SEC = 3\nnotifier_rate_per_second = 2\n\
             [subscribe_message]\ntemplate_id = \"t\"\ntemplate = \"x\"\n",
        )
        .unwrap();
        let err = Source::from_pairs([("NOTIFIER_CONFIG", path.to_str().unwrap())]).unwrap_err();
        assert_eq!(err.var, "NOTIFIER_CONFIG");
        let msg = err.to_string();
        for key in [
            "NOTIFIER_RATE_PER_SEC",
            "notifier_rate_per_second",
            "subscribe_message.template",
        ] {
            assert!(msg.contains(key), "{key} in {msg}");
        }
        assert!(!msg.contains("notifier_batch_max"), "{msg}");
        assert!(!msg.contains('\n'));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn help_lists_every_variable_the_parser_reads() {
        let help = help_table();
        let code = [
            include_str!("mod.rs"),
            include_str!("broker.rs"),
            include_str!("duration.rs"),
            include_str!("ledger.rs"),
            include_str!("operations.rs"),
            include_str!("pacing.rs"),
            include_str!("value.rs"),
            include_str!("wechat.rs"),
        ]
        .concat();
        // Every quoted upper-case setting name in this file is in the table.
        for chunk in code.split('"').skip(1).step_by(2) {
            let looks_like_var = (chunk.starts_with("NOTIFIER_")
                || chunk.starts_with("WECHAT_")
                || chunk == "AMQP_URL")
                && chunk.chars().all(|c| c.is_ascii_uppercase() || c == '_');
            if looks_like_var {
                assert!(help.contains(chunk), "{chunk} is missing from --help");
            }
        }
        assert!(help.contains("WECHAT_CALL_TIMEOUT"));
    }
}
