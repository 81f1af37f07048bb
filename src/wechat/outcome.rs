//! What a WeChat answer means for the notice (the errcode table of contract
//! section 4). The client only classifies; retrying, pausing and dead-lettering
//! live in `dispatch`, in one place.

/// The treatment a call's result asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// errcode 0: ack.
    Delivered,
    /// The token is no longer valid: get a token again and retry at once.
    TokenInvalid,
    /// Retry with backoff (HTTP 5xx, timeouts, busy, 43108, unknown codes).
    Transient,
    /// 45011: pause every call until the next minute.
    MinuteQuota,
    /// 45009: pause, then retry along the ladder.
    DailyQuota,
    /// Rejected for this notice: dead-letter `wechat_rejected`.
    Rejected,
    /// -504002, the cloud function threw: the ladder, then `function_failed`.
    FunctionFailed,
    /// The recipient has no openid (direct mode): dead-letter `no_openid`.
    NoOpenid,
    /// A setting is wrong: stop consuming, report not ready, dead-letter nothing.
    ConfigFault,
}

impl Outcome {
    /// Whether this answer from WeChat shows the settings work (WeChat and
    /// the function got as far as judging the notice): it ends a held
    /// configuration fault. `NoOpenid` is decided locally, before any call,
    /// so it proves nothing; nor does a transient answer (a 5xx, a timeout,
    /// a quota), which may come before the settings are looked at.
    pub fn proves_settings(self) -> bool {
        matches!(self, Outcome::Delivered | Outcome::Rejected)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::TokenInvalid => "token_invalid",
            Outcome::Transient => "transient",
            Outcome::MinuteQuota => "minute_quota",
            Outcome::DailyQuota => "daily_quota",
            Outcome::Rejected => "rejected",
            Outcome::FunctionFailed => "function_failed",
            Outcome::NoOpenid => "no_openid",
            Outcome::ConfigFault => "config_fault",
        }
    }
}

/// The errcodes the contract's table names, with their treatment (40013,
/// an appid WeChat does not know, is a configuration fault too).
const TABLE: &[(&[i64], Outcome)] = &[
    (&[0], Outcome::Delivered),
    (&[40001, 40014, 41001, 42001], Outcome::TokenInvalid),
    (
        &[-1, -1000, -501001, -501002, -501003, -501004, 43108],
        Outcome::Transient,
    ),
    (&[45011], Outcome::MinuteQuota),
    (&[45009], Outcome::DailyQuota),
    (
        &[40003, 40037, 41030, 43101, 43107, 45168, 47003],
        Outcome::Rejected,
    ),
    (&[-504002], Outcome::FunctionFailed),
    (
        &[40125, 40164, -501005, -501000, 85088, -604101, 40013],
        Outcome::ConfigFault,
    ),
];

/// Classifies one WeChat errcode. A code the table does not name is
/// transient: never lose the notice, retry it.
pub fn classify(errcode: i64) -> Outcome {
    TABLE
        .iter()
        .find(|(codes, _)| codes.contains(&errcode))
        .map_or(Outcome::Transient, |(_, outcome)| *outcome)
}

/// Whether the table names `errcode` (bounds the metric's errcode label).
pub fn is_known(errcode: i64) -> bool {
    TABLE.iter().any(|(codes, _)| codes.contains(&errcode))
}

/// The result of one attempt to deliver a notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallResult {
    pub outcome: Outcome,
    pub errcode: Option<i64>,
    /// A sentence for logs and dead-letter headers; never holds a token or secret.
    pub detail: String,
}

impl CallResult {
    pub fn from_errcode(errcode: i64, errmsg: &str) -> Self {
        CallResult {
            outcome: classify(errcode),
            errcode: Some(errcode),
            detail: format!("WeChat answered errcode {errcode}: {errmsg}"),
        }
    }

    pub fn transient(detail: impl Into<String>) -> Self {
        CallResult {
            outcome: Outcome::Transient,
            errcode: None,
            detail: detail.into(),
        }
    }
}

// The table is tested row by row, through the policy, in
// `dispatch::policy::tests::every_row_of_the_errcode_table_gives_its_step`.
