//! Typed settings (contract section 5), read once at start from the environment
//! and an optional TOML file. Nothing else in the crate reads the environment:
//! every other module takes a `Settings` (or a part of it), so a bad value is
//! caught here, named, and stops the program with exit code 2 before any work.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A value that must never be printed: its `Debug` and `Display` redact it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The only way to read the value; grep for it to audit every use.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMode {
    /// `POST /cgi-bin/stable_token`: safe to share between every replica and service.
    Stable,
    /// `GET /cgi-bin/token`: every fetch invalidates the tokens others hold.
    Classic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    CloudFunction,
    SubscribeMessage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The direct mode's template (contract section 4).
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateSettings {
    pub template_id: String,
    pub page: Option<String>,
    pub miniprogram_state: String,
    pub lang: String,
    /// keyword key (`thing1`) -> pattern with placeholders (`{customer_names}`)
    pub data: BTreeMap<String, String>,
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
}

/// What a subcommand reads: `publish`, `dlq` and `status` only talk to the
/// broker, so they must start without any WeChat setting (a publisher host has
/// no business holding the AppSecret). `run` and `check` read everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// `AMQP_URL`, the names, the retry ladder (it names the retry queues),
    /// `NOTIFIER_MANAGEMENT_URL` and `NOTIFIER_LOG_FORMAT`. Every other field
    /// holds its default (the WeChat ones are empty) and must not be used.
    Broker,
    /// Every setting, each checked.
    Everything,
}

/// One setting: its variable, its default as written, what it means. The one
/// list behind `--help`, the TOML file's known keys and `config.example.toml`'s test.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
}

const fn var(name: &'static str, default: &'static str, meaning: &'static str) -> Variable {
    Variable {
        name,
        default,
        meaning,
    }
}

/// Every setting the program reads (contract section 5, plus ours).
pub const VARIABLES: &[Variable] = &[
    var(
        "AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "broker URL(s), comma-separated for a cluster",
    ),
    var(
        "WECHAT_API_BASE",
        "https://api.weixin.qq.com",
        "where the WeChat HTTP API lives",
    ),
    var(
        "WECHAT_APPID",
        "required (run, check)",
        "mini program appid",
    ),
    var(
        "WECHAT_APPSECRET",
        "this or the _FILE (run, check)",
        "the AppSecret (never logged)",
    ),
    var("WECHAT_APPSECRET_FILE", "-", "a file holding the AppSecret"),
    var("WECHAT_TOKEN_MODE", "stable", "stable or classic"),
    var(
        "WECHAT_DELIVERY_MODE",
        "cloud_function",
        "cloud_function or subscribe_message",
    ),
    var(
        "WECHAT_CLOUD_ENV",
        "required in cloud_function mode",
        "cloud environment id",
    ),
    var(
        "WECHAT_CLOUD_FUNCTION",
        "quickstartFunctions",
        "cloud function name",
    ),
    var(
        "WECHAT_TEMPLATE_ID",
        "required in subscribe_message mode",
        "subscribe-message template id",
    ),
    var(
        "WECHAT_TEMPLATE_PAGE",
        "-",
        "direct mode: page the notice opens",
    ),
    var(
        "WECHAT_MINIPROGRAM_STATE",
        "formal",
        "direct mode: developer, trial or formal",
    ),
    var("WECHAT_LANG", "zh_CN", "direct mode: language"),
    var(
        "WECHAT_TEMPLATE_DATA",
        "required in subscribe_message mode",
        "direct mode: keyword mapping as JSON",
    ),
    var(
        "WECHAT_CALL_TIMEOUT",
        "15s",
        "how long one WeChat call may take",
    ),
    var(
        "NOTIFIER_CONFIG",
        "-",
        "a TOML file adding to the environment",
    ),
    var(
        "NOTIFIER_RATE_PER_SEC",
        "10",
        "WeChat calls per second, whole fleet",
    ),
    var("NOTIFIER_RATE_BURST", "1", "calls allowed back to back"),
    var(
        "NOTIFIER_BATCH_WINDOW_MS",
        "2000",
        "quiet period closing a window (ms)",
    ),
    var(
        "NOTIFIER_BATCH_MAX_WAIT_MS",
        "10000",
        "longest a window stays open (ms)",
    ),
    var("NOTIFIER_BATCH_MAX", "50", "events per notice (1..1000)"),
    var(
        "NOTIFIER_PREFETCH",
        "2000",
        "unacked deliveries a replica holds",
    ),
    var(
        "NOTIFIER_RETRY_DELAYS",
        "5s,30s,2m,10m,30m",
        "the retry ladder, one queue per step",
    ),
    var(
        "NOTIFIER_MAX_ATTEMPTS",
        "10",
        "then dead-letter retries_exhausted",
    ),
    var(
        "NOTIFIER_MAX_AGE",
        "24h",
        "older events are dead-lettered expired",
    ),
    var(
        "NOTIFIER_SHUTDOWN_GRACE",
        "20s",
        "how long SIGTERM may take",
    ),
    var(
        "NOTIFIER_CONFIG_RETRY",
        "15s",
        "recheck interval during a configuration fault",
    ),
    var("NOTIFIER_EXCHANGE", "crm.events", "the CRM's exchange"),
    var(
        "NOTIFIER_QUEUE",
        "wechat-notifier.customer-assigned",
        "the work queue",
    ),
    var(
        "NOTIFIER_DEAD_QUEUE",
        "wechat-notifier.dead",
        "the dead-letter queue",
    ),
    var(
        "NOTIFIER_RETRY_QUEUE_PREFIX",
        "wechat-notifier.retry",
        "retry queues are <prefix>.<delay>",
    ),
    var(
        "NOTIFIER_METRICS_ADDR",
        "0.0.0.0:9090",
        "/metrics, /healthz, /readyz",
    ),
    var(
        "NOTIFIER_LOG_FORMAT",
        "text",
        "text or json (level from RUST_LOG)",
    ),
    var(
        "NOTIFIER_MANAGEMENT_URL",
        "-",
        "RabbitMQ management API, for status",
    ),
];

/// The settings as a table for `--help` (generated, so it cannot miss one).
pub fn help_table() -> String {
    let width = VARIABLES.iter().map(|v| v.name.len()).max().unwrap_or(0);
    let mut out = String::from(
        "Settings (environment variables; a TOML file named by NOTIFIER_CONFIG may set the same\n\
         names in lowercase, the environment wins; see config.example.toml):\n",
    );
    for v in VARIABLES {
        out.push_str(&format!(
            "  {:<width$}  {}  [default: {}]\n",
            v.name, v.meaning, v.default
        ));
    }
    out
}

/// The top-level TOML keys a configuration file may hold: every variable in
/// lowercase (not `notifier_config` itself), and the `[subscribe_message]` table.
fn known_file_key(key: &str) -> bool {
    key == "subscribe_message"
        || VARIABLES
            .iter()
            .any(|v| v.name != "NOTIFIER_CONFIG" && v.name.to_ascii_lowercase() == key)
}

/// The keys `[subscribe_message]` may hold.
const TEMPLATE_KEYS: &[&str] = &["template_id", "page", "miniprogram_state", "lang", "data"];

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

/// Parses `500ms`, `5s`, `2m`, `24h` (contract section 7).
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
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// Writes a duration the way settings are written.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1_000 == 0 {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

fn duration(src: &Source, var: &str, default: &str) -> Result<Duration, SettingsError> {
    let raw = src.or(var, default);
    parse_duration(raw).ok_or_else(|| {
        SettingsError::new(
            var,
            format!("a duration like 500ms, 5s, 2m or 24h, got {raw:?}"),
        )
    })
}

/// As `duration`, refusing zero (a zero timeout would fail every call).
fn nonzero_duration(src: &Source, var: &str, default: &str) -> Result<Duration, SettingsError> {
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

fn integer<T: std::str::FromStr + PartialOrd + fmt::Display + Copy>(
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

fn name(src: &Source, var: &str, default: &str) -> Result<String, SettingsError> {
    let raw = src.or(var, default).trim();
    if raw.len() > 255 || raw.is_empty() {
        return Err(SettingsError::new(
            var,
            "a name of 1..255 bytes (AMQP short string)",
        ));
    }
    Ok(raw.to_string())
}

fn choice<T: Copy>(
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

fn amqp_urls(src: &Source) -> Result<Vec<String>, SettingsError> {
    let var = "AMQP_URL";
    let raw = src.or(var, "amqp://guest:guest@127.0.0.1:5672/%2f");
    let urls: Vec<String> = raw
        .split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    for url in &urls {
        // Checked by lapin's own parser so a URL it will not take never passes here;
        // the message deliberately does not echo the URL (it may carry a password).
        if url.parse::<lapin::uri::AMQPUri>().is_err() {
            return Err(SettingsError::new(
                var,
                "amqp:// or amqps:// URLs, comma-separated, one of them is malformed",
            ));
        }
    }
    if urls.is_empty() {
        return Err(SettingsError::new(var, "at least one amqp:// URL"));
    }
    Ok(urls)
}

fn appsecret(src: &Source) -> Result<Secret, SettingsError> {
    if let Some(v) = src.get("WECHAT_APPSECRET") {
        return Ok(Secret::new(v.trim()));
    }
    let var = "WECHAT_APPSECRET_FILE";
    let Some(path) = src.get(var) else {
        return Err(SettingsError::new(
            "WECHAT_APPSECRET",
            "the mini program's AppSecret (or WECHAT_APPSECRET_FILE naming a file holding it), but neither is set",
        ));
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| SettingsError::new(var, format!("a readable file, but {path}: {e}")))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(SettingsError::new(
            var,
            format!("a file holding the AppSecret, but {path} is empty"),
        ));
    }
    Ok(Secret::new(secret))
}

fn api_base(src: &Source) -> Result<String, SettingsError> {
    let var = "WECHAT_API_BASE";
    let raw = src.or(var, "https://api.weixin.qq.com").trim();
    match reqwest::Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            Ok(raw.trim_end_matches('/').to_string())
        }
        _ => Err(SettingsError::new(
            var,
            format!("an http:// or https:// base URL, got {raw:?}"),
        )),
    }
}

fn rate(src: &Source) -> Result<f64, SettingsError> {
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

fn retry_delays(src: &Source) -> Result<Vec<Duration>, SettingsError> {
    let var = "NOTIFIER_RETRY_DELAYS";
    let raw = src.or(var, "5s,30s,2m,10m,30m");
    let delays: Option<Vec<Duration>> = raw.split(',').map(parse_duration).collect();
    match delays {
        Some(d) if !d.is_empty() && d.iter().all(|d| !d.is_zero()) => {
            let mut seen = d.clone();
            seen.sort();
            seen.dedup();
            if seen.len() != d.len() {
                return Err(SettingsError::new(
                    var,
                    format!("distinct delays (one retry queue each), got {raw:?}"),
                ));
            }
            Ok(d)
        }
        _ => Err(SettingsError::new(
            var,
            format!("comma-separated non-zero durations like 5s,30s,2m, got {raw:?}"),
        )),
    }
}

fn metrics_addr(src: &Source) -> Result<SocketAddr, SettingsError> {
    let var = "NOTIFIER_METRICS_ADDR";
    let raw = src.or(var, "0.0.0.0:9090");
    raw.trim()
        .parse()
        .map_err(|_| SettingsError::new(var, format!("an address like 0.0.0.0:9090, got {raw:?}")))
}

/// Keyword types a template key may start with, and their limits in characters
/// (`None`: never cut). Contract section 4.
pub const KEYWORD_TYPES: &[(&str, Option<usize>)] = &[
    ("character_string", Some(32)),
    ("thing", Some(20)),
    ("name", Some(10)),
    ("phrase", Some(5)),
    ("number", Some(32)),
    ("letter", Some(32)),
    ("symbol", Some(5)),
    ("amount", None),
    ("date", None),
    ("time", None),
    ("phone_number", Some(17)),
    ("car_number", Some(8)),
];

/// Placeholders a template value may use (contract section 4).
pub const PLACEHOLDERS: &[&str] = &[
    "customer_names",
    "first_customer",
    "customer_count",
    "assignee",
    "assigned_by",
    "source",
    "first_assigned_at",
    "last_assigned_at",
    "notice_id",
];

/// The keyword type of a key like `thing1` (the key minus its trailing digits).
pub fn keyword_type(key: &str) -> Option<(&'static str, Option<usize>)> {
    let prefix = key.trim_end_matches(|c: char| c.is_ascii_digit());
    if prefix.len() == key.len() {
        return None;
    }
    KEYWORD_TYPES
        .iter()
        .find(|(name, _)| *name == prefix)
        .copied()
}

fn check_pattern(var: &str, pattern: &str) -> Result<(), SettingsError> {
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(SettingsError::new(
                var,
                format!("placeholders closed with }}, in {pattern:?}"),
            ));
        };
        let name = &after[..close];
        if !PLACEHOLDERS.contains(&name) {
            return Err(SettingsError::new(
                var,
                format!(
                    "known placeholders ({}), got {{{name}}}",
                    PLACEHOLDERS.join(", ")
                ),
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

fn template(src: &Source) -> Result<TemplateSettings, SettingsError> {
    let file = src.file_template.clone().unwrap_or_default();
    let file_str = |key: &str| file.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let template_id = src
        .get("WECHAT_TEMPLATE_ID")
        .map(str::to_string)
        .or_else(|| file_str("template_id"))
        .ok_or_else(|| {
            SettingsError::new(
                "WECHAT_TEMPLATE_ID",
                "the subscribe-message template id (required in subscribe_message mode), but it is not set",
            )
        })?;
    let page = src
        .get("WECHAT_TEMPLATE_PAGE")
        .map(str::to_string)
        .or_else(|| file_str("page"));
    if let Some(page) = &page {
        check_pattern("WECHAT_TEMPLATE_PAGE", page)?;
    }
    let state_var = "WECHAT_MINIPROGRAM_STATE";
    let miniprogram_state = src
        .get(state_var)
        .map(str::to_string)
        .or_else(|| file_str("miniprogram_state"))
        .unwrap_or_else(|| "formal".into());
    if !["developer", "trial", "formal"].contains(&miniprogram_state.as_str()) {
        return Err(SettingsError::new(
            state_var,
            format!("one of developer, trial, formal, got {miniprogram_state:?}"),
        ));
    }
    let lang = src
        .get("WECHAT_LANG")
        .map(str::to_string)
        .or_else(|| file_str("lang"))
        .unwrap_or_else(|| "zh_CN".into());
    let data_var = "WECHAT_TEMPLATE_DATA";
    let mut data = BTreeMap::new();
    if let Some(json) = src.get(data_var) {
        let map: BTreeMap<String, String> = serde_json::from_str(json).map_err(|_| {
            SettingsError::new(data_var, "a JSON object of keyword key to pattern strings")
        })?;
        data = map;
    } else if let Some(toml::Value::Table(t)) = file.get("data") {
        for (k, v) in t {
            let v = v.as_str().ok_or_else(|| {
                SettingsError::new(
                    data_var,
                    format!("[subscribe_message.data] {k} to be a string"),
                )
            })?;
            data.insert(k.clone(), v.to_string());
        }
    }
    if data.is_empty() {
        return Err(SettingsError::new(
            data_var,
            "the keyword mapping (required in subscribe_message mode), but it is not set",
        ));
    }
    for (key, pattern) in &data {
        if keyword_type(key).is_none() {
            return Err(SettingsError::new(
                data_var,
                format!("keyword keys with a known type prefix (thing1, number2, …), got {key:?}"),
            ));
        }
        check_pattern(data_var, pattern)?;
    }
    Ok(TemplateSettings {
        template_id,
        page,
        miniprogram_state,
        lang,
        data,
    })
}

/// The WeChat half of the settings, read together because the delivery mode
/// decides which of them are required.
struct WeChatPart {
    api_base: String,
    appid: String,
    appsecret: Secret,
    token_mode: TokenMode,
    delivery_mode: DeliveryMode,
    cloud_env: String,
    cloud_function: String,
    template: Option<TemplateSettings>,
}

impl WeChatPart {
    fn read(src: &Source) -> Result<Self, SettingsError> {
        let delivery_mode = choice(
            src,
            "WECHAT_DELIVERY_MODE",
            "cloud_function",
            &[
                ("cloud_function", DeliveryMode::CloudFunction),
                ("subscribe_message", DeliveryMode::SubscribeMessage),
            ],
        )?;
        let cloud_env = match delivery_mode {
            DeliveryMode::CloudFunction => src
                .required(
                    "WECHAT_CLOUD_ENV",
                    "the cloud environment id (required in cloud_function mode)",
                )?
                .trim()
                .to_string(),
            DeliveryMode::SubscribeMessage => src.or("WECHAT_CLOUD_ENV", "").trim().to_string(),
        };
        let template = match delivery_mode {
            DeliveryMode::SubscribeMessage => Some(template(src)?),
            DeliveryMode::CloudFunction => None,
        };
        Ok(WeChatPart {
            api_base: api_base(src)?,
            appid: src
                .required("WECHAT_APPID", "the mini program's appid")?
                .trim()
                .to_string(),
            appsecret: appsecret(src)?,
            token_mode: choice(
                src,
                "WECHAT_TOKEN_MODE",
                "stable",
                &[
                    ("stable", TokenMode::Stable),
                    ("classic", TokenMode::Classic),
                ],
            )?,
            delivery_mode,
            cloud_env,
            cloud_function: name(src, "WECHAT_CLOUD_FUNCTION", "quickstartFunctions")?,
            template,
        })
    }

    /// For a command that never calls WeChat: nothing read, nothing usable.
    fn unused() -> Self {
        WeChatPart {
            api_base: "https://api.weixin.qq.com".into(),
            appid: String::new(),
            appsecret: Secret::new(""),
            token_mode: TokenMode::Stable,
            delivery_mode: DeliveryMode::CloudFunction,
            cloud_env: String::new(),
            cloud_function: "quickstartFunctions".into(),
            template: None,
        }
    }
}

fn management_url(src: &Source) -> Result<Option<Secret>, SettingsError> {
    let var = "NOTIFIER_MANAGEMENT_URL";
    let Some(raw) = src.get(var) else {
        return Ok(None);
    };
    match reqwest::Url::parse(raw.trim()) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            Ok(Some(Secret::new(raw.trim().trim_end_matches('/'))))
        }
        // Not echoed: the URL may carry the management user's password.
        _ => Err(SettingsError::new(
            var,
            "an http:// or https:// URL like http://user:pass@host:15672, but it is malformed",
        )),
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

    /// The settings a subcommand uses, each checked; with `Needs::Broker` the
    /// WeChat and service settings are not read at all (see `Needs`).
    pub fn for_command(src: &Source, needs: Needs) -> Result<Self, SettingsError> {
        // A broker-only command reads the service's settings from nothing, so a
        // bad value it never uses cannot stop it; they hold their defaults.
        let nothing = Source::default();
        let (svc, wechat) = match needs {
            Needs::Everything => (src, WeChatPart::read(src)?),
            Needs::Broker => (&nothing, WeChatPart::unused()),
        };
        let batch_window = duration(svc, "NOTIFIER_BATCH_WINDOW_MS", "2000ms")
            .or_else(|_| millis(svc, "NOTIFIER_BATCH_WINDOW_MS"))?;
        let batch_max_wait = duration(svc, "NOTIFIER_BATCH_MAX_WAIT_MS", "10000ms")
            .or_else(|_| millis(svc, "NOTIFIER_BATCH_MAX_WAIT_MS"))?;
        let settings = Settings {
            amqp_urls: amqp_urls(src)?,
            wechat_api_base: wechat.api_base,
            appid: wechat.appid,
            appsecret: wechat.appsecret,
            token_mode: wechat.token_mode,
            delivery_mode: wechat.delivery_mode,
            cloud_env: wechat.cloud_env,
            cloud_function: wechat.cloud_function,
            template: wechat.template,
            call_timeout: nonzero_duration(svc, "WECHAT_CALL_TIMEOUT", "15s")?,
            rate_per_sec: rate(svc)?,
            rate_burst: integer(svc, "NOTIFIER_RATE_BURST", "1", 1u32, 10_000)?,
            batch_window,
            batch_max_wait,
            batch_max: integer(svc, "NOTIFIER_BATCH_MAX", "50", 1usize, 1000)?,
            prefetch: integer(svc, "NOTIFIER_PREFETCH", "2000", 1u16, u16::MAX)?,
            retry_delays: retry_delays(src)?,
            max_attempts: integer(svc, "NOTIFIER_MAX_ATTEMPTS", "10", 1u32, 1000)?,
            max_age: duration(svc, "NOTIFIER_MAX_AGE", "24h")?,
            shutdown_grace: duration(svc, "NOTIFIER_SHUTDOWN_GRACE", "20s")?,
            config_retry: nonzero_duration(svc, "NOTIFIER_CONFIG_RETRY", "15s")?,
            exchange: name(src, "NOTIFIER_EXCHANGE", "crm.events")?,
            queue: name(src, "NOTIFIER_QUEUE", "wechat-notifier.customer-assigned")?,
            dead_queue: name(src, "NOTIFIER_DEAD_QUEUE", "wechat-notifier.dead")?,
            retry_queue_prefix: name(src, "NOTIFIER_RETRY_QUEUE_PREFIX", "wechat-notifier.retry")?,
            metrics_addr: metrics_addr(svc)?,
            log_format: choice(
                src,
                "NOTIFIER_LOG_FORMAT",
                "text",
                &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            )?,
            management_url: management_url(src)?,
        };
        if settings.batch_max_wait < settings.batch_window {
            return Err(SettingsError::new(
                "NOTIFIER_BATCH_MAX_WAIT_MS",
                "a value no smaller than NOTIFIER_BATCH_WINDOW_MS",
            ));
        }
        Ok(settings)
    }

    /// The retry queue of one ladder step, e.g. `wechat-notifier.retry.30s`.
    pub fn retry_queue(&self, delay: Duration) -> String {
        format!("{}.{}", self.retry_queue_prefix, format_duration(delay))
    }
}

/// `NOTIFIER_BATCH_*_MS` are milliseconds by name; a bare number is read as such,
/// and a written duration (`2s`) is accepted too.
fn millis(src: &Source, var: &str) -> Result<Duration, SettingsError> {
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
    use super::*;

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            ("WECHAT_APPID", "wx123"),
            ("WECHAT_APPSECRET", "s3cret"),
            ("WECHAT_CLOUD_ENV", "env-1"),
        ]
    }

    fn with(extra: &[(&'static str, &'static str)]) -> Result<Settings, SettingsError> {
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
            ("NOTIFIER_RETRY_DELAYS", "5s,,2m"),
            ("NOTIFIER_MAX_AGE", "1d"),
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
    fn secret_is_read_from_a_file_and_never_printed() {
        let path = std::env::temp_dir().join(format!("wn-secret-{}", std::process::id()));
        std::fs::write(&path, "from-file-secret\n").unwrap();
        let s = Settings::from_pairs([
            ("WECHAT_APPID", "wx"),
            ("WECHAT_CLOUD_ENV", "e"),
            ("WECHAT_APPSECRET_FILE", path.to_str().unwrap()),
        ])
        .unwrap();
        assert_eq!(s.appsecret.expose(), "from-file-secret");
        assert!(!format!("{s:?}").contains("from-file-secret"));
        assert_eq!(s.appsecret.to_string(), "***");
        std::fs::remove_file(path).unwrap();
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
    fn durations_parse_as_written() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(
            with(&[("NOTIFIER_BATCH_WINDOW_MS", "250")])
                .unwrap()
                .batch_window,
            Duration::from_millis(250)
        );
    }

    #[test]
    fn direct_mode_checks_the_template_mapping() {
        let ok = with(&[
            ("WECHAT_DELIVERY_MODE", "subscribe_message"),
            ("WECHAT_TEMPLATE_ID", "tpl"),
            (
                "WECHAT_TEMPLATE_DATA",
                r#"{"thing1":"{customer_names}","number2":"{customer_count}"}"#,
            ),
        ])
        .unwrap();
        assert_eq!(ok.template.unwrap().data.len(), 2);
        let err = with(&[
            ("WECHAT_DELIVERY_MODE", "subscribe_message"),
            ("WECHAT_TEMPLATE_ID", "tpl"),
            ("WECHAT_TEMPLATE_DATA", r#"{"thing1":"{nope}"}"#),
        ])
        .unwrap_err();
        assert_eq!(err.var, "WECHAT_TEMPLATE_DATA");
        let err = with(&[
            ("WECHAT_DELIVERY_MODE", "subscribe_message"),
            ("WECHAT_TEMPLATE_ID", "tpl"),
            ("WECHAT_TEMPLATE_DATA", r#"{"weird1":"{source}"}"#),
        ])
        .unwrap_err();
        assert_eq!(err.var, "WECHAT_TEMPLATE_DATA");
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
        let code = include_str!("settings.rs");
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
