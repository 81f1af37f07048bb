//! The WeChat settings: the appid and its secret, the token mode, the delivery
//! mode and what each mode needs (the cloud function's environment, or the
//! direct mode's template and its keyword mapping, contract section 4). They
//! are read together because the delivery mode decides which are required.

use std::collections::BTreeMap;

use super::value::{choice, name};
use super::{Secret, SettingsError, Source};

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

pub(super) fn appsecret(src: &Source) -> Result<Secret, SettingsError> {
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

/// `WECHAT_TEMPLATE_ID`, or the TOML file's `[subscribe_message] template_id`:
/// the direct mode's template, and with the grant ledger its key in both modes
/// (`publish --accept` takes it as its default too).
pub fn template_id(src: &Source) -> Option<String> {
    src.get("WECHAT_TEMPLATE_ID")
        .map(str::to_string)
        .or_else(|| {
            src.file_template
                .as_ref()?
                .get("template_id")?
                .as_str()
                .filter(|t| !t.trim().is_empty())
                .map(str::to_string)
        })
}

fn template(src: &Source) -> Result<TemplateSettings, SettingsError> {
    let file = src.file_template.clone().unwrap_or_default();
    let file_str = |key: &str| file.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let template_id = template_id(src).ok_or_else(|| {
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
pub(super) struct WeChatPart {
    pub(super) api_base: String,
    pub(super) appid: String,
    pub(super) appsecret: Secret,
    pub(super) token_mode: TokenMode,
    pub(super) delivery_mode: DeliveryMode,
    pub(super) cloud_env: String,
    pub(super) cloud_function: String,
    pub(super) template: Option<TemplateSettings>,
}

impl WeChatPart {
    pub(super) fn read(src: &Source) -> Result<Self, SettingsError> {
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
    pub(super) fn unused() -> Self {
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

#[cfg(test)]
mod tests {
    use super::super::tests::with;
    use super::super::Settings;

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
}
