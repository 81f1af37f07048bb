//! Direct mode: a notice -> the `subscribe/send` body, filling the configured
//! keyword mapping and cutting each value to its keyword type's limit in
//! characters (contract section 4). Pure, so the rules are unit-tested.

use chrono::DateTime;
use serde_json::{json, Map, Value};

use super::outcome::{CallResult, Outcome};
use crate::notice::Notice;
use crate::settings::{keyword_type, TemplateSettings};

const ELLIPSIS: char = '…';

/// Cuts `value` to `limit` characters, keeping its beginning and ending with `…`.
pub fn cut(value: &str, limit: usize) -> String {
    if value.chars().count() <= limit {
        return value.to_string();
    }
    let mut out: String = value.chars().take(limit.saturating_sub(1)).collect();
    out.push(ELLIPSIS);
    out
}

/// `YYYY-MM-DD HH:mm` in the timestamp's own offset.
fn short_time(rfc3339: &str) -> String {
    DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_default()
}

/// Whole customer names joined by `、`, as many as fit in `limit`, then `…`.
fn customer_names(notice: &Notice, limit: Option<usize>) -> String {
    let names: Vec<&str> = notice.customers.iter().map(|c| c.name.as_str()).collect();
    let all = names.join("、");
    let complete = notice.customer_count <= names.len();
    match limit {
        Some(limit) if all.chars().count() > limit || !complete => {
            let mut out = String::new();
            for name in &names {
                let candidate = if out.is_empty() {
                    name.to_string()
                } else {
                    format!("{out}、{name}")
                };
                if candidate.chars().count() + 1 > limit {
                    break;
                }
                out = candidate;
            }
            if out.is_empty() {
                // Not even one whole name fits: cut the first one.
                return cut(names.first().copied().unwrap_or(""), limit);
            }
            out.push(ELLIPSIS);
            out
        }
        _ => all,
    }
}

fn placeholder(name: &str, notice: &Notice, limit: Option<usize>) -> String {
    match name {
        "customer_names" => customer_names(notice, limit),
        "first_customer" => notice
            .customers
            .first()
            .map(|c| c.name.clone())
            .unwrap_or_default(),
        "customer_count" => notice.customer_count.to_string(),
        "assignee" => notice
            .assignee
            .name
            .clone()
            .unwrap_or_else(|| notice.assignee.user_id.clone()),
        "assigned_by" => notice
            .assigned_by
            .as_ref()
            .map(|p| p.name.clone().unwrap_or_else(|| p.user_id.clone()))
            .unwrap_or_default(),
        "source" => notice.source.label_zh().to_string(),
        "first_assigned_at" => short_time(&notice.first_assigned_at),
        "last_assigned_at" => short_time(&notice.last_assigned_at),
        "notice_id" => notice.notice_id.clone(),
        _ => String::new(), // unknown placeholders are refused when settings load
    }
}

const NEVER_CUT: &[&str] = &["customer_count", "first_assigned_at", "last_assigned_at"];

/// Fills `pattern`; the result is cut to `limit` unless it is a lone number or time.
pub fn render(pattern: &str, notice: &Notice, limit: Option<usize>) -> String {
    let mut out = String::new();
    let mut rest = pattern;
    let mut lone_uncut = false;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').unwrap_or(after.len());
        let name = &after[..close];
        lone_uncut = pattern == format!("{{{name}}}") && NEVER_CUT.contains(&name);
        out.push_str(&placeholder(name, notice, limit));
        rest = after.get(close + 1..).unwrap_or("");
    }
    out.push_str(rest);
    let out = match limit {
        Some(limit) if !lone_uncut => cut(&out, limit),
        _ => out,
    };
    if out.trim().is_empty() {
        "-".into()
    } else {
        out
    }
}

/// The `subscribe/send` request body for `notice`.
///
/// # Errors
/// `NoOpenid` when the notice carries no openid for the assignee.
pub fn subscribe_body(t: &TemplateSettings, notice: &Notice) -> Result<Value, CallResult> {
    let Some(openid) = notice.assignee.openid.as_deref().filter(|o| !o.is_empty()) else {
        return Err(CallResult {
            outcome: Outcome::NoOpenid,
            errcode: None,
            detail: "the assignee has no openid, which subscribe_message mode needs".into(),
        });
    };
    let mut data = Map::new();
    for (key, pattern) in &t.data {
        let limit = keyword_type(key).and_then(|(_, l)| l);
        data.insert(
            key.clone(),
            json!({ "value": render(pattern, notice, limit) }),
        );
    }
    let mut body = json!({
        "touser": openid,
        "template_id": t.template_id,
        "miniprogram_state": t.miniprogram_state,
        "lang": t.lang,
        "data": data,
    });
    if let Some(page) = &t.page {
        body["page"] = json!(render(page, notice, None));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{AssignSource, Customer, Person};

    fn notice(names: &[&str]) -> Notice {
        Notice {
            notice_id: "abc".into(),
            assignee: Person {
                user_id: "1024".into(),
                name: Some("张三".into()),
                openid: Some("o1".into()),
            },
            customer_count: names.len(),
            customers: names
                .iter()
                .take(10)
                .map(|n| Customer {
                    id: "1".into(),
                    name: n.to_string(),
                })
                .collect(),
            assigned_by: Some(Person {
                user_id: "7".into(),
                name: Some("李经理".into()),
                openid: None,
            }),
            source: AssignSource::PublicPool,
            first_assigned_at: "2026-11-25T14:03:27+08:00".into(),
            last_assigned_at: "2026-11-25T14:05:59+08:00".into(),
            summary: names.len() > 1,
            event_ids: vec![],
        }
    }

    #[test]
    fn values_are_cut_by_characters_with_an_ellipsis() {
        assert_eq!(cut("上海某某贸易有限公司", 5), "上海某某…");
        assert_eq!(cut("abc", 5), "abc");
        let n = notice(&[
            "上海某某贸易有限公司",
            "北京某某科技有限公司",
            "深圳某某电子有限公司",
        ]);
        let names = render("{customer_names}", &n, Some(20));
        assert_eq!(names, "上海某某贸易有限公司…");
        assert!(names.chars().count() <= 20);
        assert_eq!(render("{assigned_by}", &n, Some(10)), "李经理");
        assert_eq!(render("{source}", &n, Some(5)), "公海");
        assert_eq!(render("{last_assigned_at}", &n, None), "2026-11-25 14:05");
        assert_eq!(render("{customer_count}", &n, Some(32)), "3");
        assert_eq!(
            render("共{customer_count}位客户", &n, Some(20)),
            "共3位客户"
        );
    }

    #[test]
    fn empty_values_are_a_dash_and_no_openid_is_refused() {
        let mut n = notice(&["甲"]);
        n.assigned_by = None;
        assert_eq!(render("{assigned_by}", &n, Some(10)), "-");
        n.assignee.openid = None;
        let t = TemplateSettings {
            template_id: "t".into(),
            page: None,
            miniprogram_state: "formal".into(),
            lang: "zh_CN".into(),
            data: [("thing1".to_string(), "{customer_names}".to_string())].into(),
        };
        assert_eq!(
            subscribe_body(&t, &n).unwrap_err().outcome,
            Outcome::NoOpenid
        );
    }

    /// The cases the cloud function's tests read too: both sides cut alike.
    #[test]
    fn the_cloud_functions_shared_cases_give_the_same_values() {
        let cases: Vec<serde_json::Value> = serde_json::from_str(include_str!(
            "../../cloudfunction/quickstartFunctions/test/template-cases.json"
        ))
        .unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let notice: Notice = serde_json::from_value(case["notice"].clone()).unwrap();
            let mut notice = notice;
            notice.assignee.openid = Some("oCase".into());
            let data = case["mapping"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            let t = TemplateSettings {
                template_id: "t".into(),
                page: None,
                miniprogram_state: "formal".into(),
                lang: "zh_CN".into(),
                data,
            };
            let body = subscribe_body(&t, &notice).unwrap();
            for (key, want) in case["data"].as_object().unwrap() {
                assert_eq!(body["data"][key]["value"], *want, "{}: {key}", case["name"]);
            }
        }
    }
}
