//! The one list of settings: every variable the program reads, its default as
//! written and what it means. `--help`'s table, the TOML file's known keys and
//! the test of `config.example.toml` all come from it, so none can miss one.

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
        "required in subscribe_message mode or with the ledger",
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
        "NOTIFIER_MAX_IN_FLIGHT",
        "64",
        "WeChat calls a replica has under way",
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
    var(
        "NOTIFIER_LEDGER_URL",
        "- (no ledger)",
        "the grant ledger: postgres://user:pass@host:port/db",
    ),
    var(
        "NOTIFIER_LEDGER_SCHEMA",
        "wechat_notifier",
        "ledger: the schema its tables live in",
    ),
    var(
        "NOTIFIER_LEDGER_POOL",
        "4",
        "ledger: connections per replica (1..64)",
    ),
    var(
        "NOTIFIER_HOLD_FOR",
        "7d",
        "ledger: how long an event waits for an accept",
    ),
    var(
        "NOTIFIER_HOLD_MAX_EVENTS",
        "1000",
        "ledger: held events per user at most",
    ),
    var(
        "NOTIFIER_CREDITS_LOW",
        "1",
        "ledger: publish notifier.credits_low at or below",
    ),
    var(
        "NOTIFIER_CREDIT_PROBE",
        "1h",
        "ledger: one real call per held user at an exact 0",
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
pub(super) fn known_file_key(key: &str) -> bool {
    key == "subscribe_message"
        || VARIABLES
            .iter()
            .any(|v| v.name != "NOTIFIER_CONFIG" && v.name.to_ascii_lowercase() == key)
}

/// The keys `[subscribe_message]` may hold.
pub(super) const TEMPLATE_KEYS: &[&str] =
    &["template_id", "page", "miniprogram_state", "lang", "data"];
