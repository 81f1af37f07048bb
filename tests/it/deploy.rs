//! The deployment files under `deploy/` checked against the service itself:
//! every query of the Grafana dashboard and of the alert rules names only
//! metrics a real `/metrics` exports, and the Kubernetes manifests agree with
//! each other and with the service (ports, probe paths a running service
//! answers, the secret file, every setting through the real parser, the drain
//! inside the grace period, memory sized from the benchmark). The schemas
//! themselves are checked by `promtool` and `kubernetes-validate` in `.ci/run`.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use common::yaml::{load_all, root, str_of};
use common::TestEnv;
use serde_json::Value;
use wechat_notifier::cli::{Cli, Command};
use wechat_notifier::settings::Settings;
use wechat_notifier::sim::{Api, Fault, FaultAction};
use yaml_rust2::Yaml;

// ---------------------------------------------------------------------------
// Metric names: the dashboard and the alert rules against a real /metrics.

/// The sample names a `/metrics` text can carry, from its `# TYPE` lines
/// (prometheus-client prints one for every registered family, touched or not):
/// a counter's `_total`, a histogram's `_bucket`, `_sum` and `_count`.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// The metric names a PromQL expression selects: identifiers outside label
/// matchers, ranges and strings that are not functions, keywords,
/// aggregations or the label lists of `by (…)`, `without (…)`, `on (…)`,
/// `ignoring (…)`.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const LABEL_LISTS: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Operators, and aggregations (`sum by (le) (…)` puts a word between the
    // name and its parenthesis).
    const KEYWORDS: [&str; 19] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips from an opening delimiter to its closing one (strings inside included).
    let skip_to = |i: &mut usize, close: char| {
        while *i < chars.len() && chars[*i] != close {
            if chars[*i] == '"' || chars[*i] == '\'' {
                let quote = chars[*i];
                *i += 1;
                while *i < chars.len() && chars[*i] != quote {
                    *i += if chars[*i] == '\\' { 2 } else { 1 };
                }
            }
            *i += 1;
        }
        *i += 1;
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            skip_to(&mut i, '}');
        } else if c == '[' {
            skip_to(&mut i, ']');
        } else if c == '"' || c == '\'' || c == '`' {
            i += 1;
            skip_to(&mut i, c);
        } else if c == '$' || c.is_ascii_digit() {
            // A Grafana variable, a number or a duration.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_.".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let called = next < chars.len() && chars[next] == '(';
            if LABEL_LISTS.contains(&word.as_str()) {
                if called {
                    i = next + 1;
                    skip_to(&mut i, ')');
                }
            } else if !called && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_names_are_told_from_functions_labels_and_keywords() {
    let expr = r#"sum by (le, api) (rate(wechat_notifier_a_bucket{api=~"x|y", b!="wechat_notifier_no"}[$__rate_interval]))
        / on (api) group_left sum without (instance) (wechat_notifier_b_total offset 15m)
        > 0.2 and absent(wechat_notifier_c) or vector(1) unless wechat_notifier_d:ratio > bool 1e-9"#;
    let want: BTreeSet<String> = [
        "wechat_notifier_a_bucket",
        "wechat_notifier_b_total",
        "wechat_notifier_c",
        "wechat_notifier_d:ratio",
    ]
    .map(String::from)
    .into();
    assert_eq!(promql_metric_names(expr), want);
}

/// Every expression of the dashboard: panel targets and variable queries
/// (`label_values(metric, label)` selects `metric`).
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap().to_string();
            exprs.push((title, target["expr"].as_str().unwrap().to_string()));
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        let query = var["query"]["query"].as_str().unwrap();
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.split(',').next())
            .unwrap_or(query);
        exprs.push((format!("variable {}", var["name"]), inner.to_string()));
    }
    exprs
}

/// A real `/metrics` after a run that touches every labelled family (an
/// empty family prints nothing, not even its `# TYPE` line): one event
/// delivered, one invalid body (dead-lettered), and one event answered 45009
/// (a daily-quota pause and a retry).
async fn real_metrics() -> BTreeSet<String> {
    let env = TestEnv::new("deploy").await;
    env.declare().await;
    let svc = env.start_service().await;
    let good = env.bulk(1, 1, false);
    let mut quota = env.bulk(1, 1, false);
    quota[0]["assignee"]["user_id"] = format!("{}-quota", env.prefix).into();
    env.sim.push_fault(Fault {
        api: Some(Api::InvokeCloudFunction),
        user_id: Some(format!("{}-quota", env.prefix)),
        action: FaultAction::FunctionErrcode(45009),
        times: Some(1),
    });
    env.publish(&good).await;
    env.publish(&quota).await;
    env.publish_raw(&[b"not json".to_vec()]).await;
    let provoked = [
        "wechat_notifier_notices_sent_total",
        "wechat_notifier_dead_letters_total",
        "wechat_notifier_retries_total",
        "wechat_notifier_quota_pauses_total",
    ];
    let mut names = BTreeSet::new();
    for _ in 0..150 {
        let text = reqwest::get(format!("http://{}/metrics", svc.http))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        names = exported_names(&text);
        if provoked.iter().all(|n| names.contains(*n)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    svc.stop().await;
    env.cleanup().await;
    for name in provoked {
        assert!(names.contains(name), "the run exports {name}: {names:?}");
    }
    names
}

/// The grant ledger's sample names (README, "The grant ledger"). The run in
/// `real_metrics` has no ledger, so the dashboard's ledger row and the ledger
/// alerts are checked against this list: it holds the exact names the ledger
/// exports (a counter's `_total`, a histogram's `_bucket`), so a misspelt
/// query still fails. A run with the ledger on that provokes a hold, a
/// release, an expiry and a signal can replace the list.
const LEDGER_METRICS: [&str; 12] = [
    "wechat_notifier_ledger_held_events",
    "wechat_notifier_ledger_held_users",
    "wechat_notifier_ledger_held_users_over_a_day",
    "wechat_notifier_ledger_holds_total",
    "wechat_notifier_ledger_releases_total",
    "wechat_notifier_ledger_calls_saved_total",
    "wechat_notifier_ledger_expiries_total",
    "wechat_notifier_ledger_errors_total",
    "wechat_notifier_ledger_statement_duration_seconds_bucket",
    "wechat_notifier_ledger_statement_duration_seconds_sum",
    "wechat_notifier_ledger_statement_duration_seconds_count",
    "wechat_notifier_signals_total",
];

#[test]
fn the_readme_lists_every_ledger_metric() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for name in LEDGER_METRICS {
        let short = name
            .trim_start_matches("wechat_notifier_")
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            readme.contains(&format!("`{short}")),
            "the README's metrics list names {short}"
        );
    }
}

#[tokio::test]
async fn the_dashboard_and_the_alert_rules_query_only_exported_metrics() {
    let mut exported = real_metrics().await;
    exported.extend(LEDGER_METRICS.map(String::from));
    assert!(
        exported.contains("wechat_notifier_events_received_total")
            && exported.contains("wechat_notifier_events_per_notice_bucket"),
        "/metrics has TYPE lines: {exported:?}"
    );

    let path = "deploy/grafana/dashboards/wechat-notifier.json";
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join(path)).unwrap()).unwrap();
    let mut used = BTreeSet::new();
    for (title, expr) in dashboard_exprs(&dashboard) {
        let names = promql_metric_names(&expr);
        assert!(!names.is_empty(), "{title}: no metric in {expr}");
        for name in names {
            assert!(
                exported.contains(&name),
                "dashboard panel {title:?} queries {name}, which /metrics does not export"
            );
            used.insert(name);
        }
    }
    // What an operator looks for first (issue 12's list) is on the dashboard.
    for want in [
        "events_received_total",
        "notices_sent_total",
        "events_per_notice_bucket",
        "wechat_calls_total",
        "rate_limiter_wait_seconds_bucket",
        "open_windows",
        "unacked_deliveries",
        "dead_letters_total",
        "consuming",
        "ledger_held_events",
        "ledger_held_users",
        "ledger_held_users_over_a_day",
    ] {
        let name = format!("wechat_notifier_{want}");
        assert!(used.contains(&name), "the dashboard shows {name}");
    }

    let rules = &load_all("deploy/prometheus/alerts.yml")[0];
    let mut alerts = 0;
    let mut alerted = BTreeSet::new();
    for group in rules["groups"].as_vec().unwrap() {
        for rule in group["rules"].as_vec().unwrap() {
            let name = str_of(&rule["alert"]);
            let names = promql_metric_names(&str_of(&rule["expr"]));
            assert!(!names.is_empty(), "{name}");
            for metric in names {
                assert!(
                    exported.contains(&metric),
                    "alert {name} queries {metric}, which /metrics does not export"
                );
                alerted.insert(metric);
            }
            alerts += 1;
        }
    }
    assert!(alerts >= 6, "{alerts} alert rules");
    // Users held for more than a day, and a failing ledger, page someone.
    for want in [
        "wechat_notifier_ledger_held_users_over_a_day",
        "wechat_notifier_ledger_errors_total",
    ] {
        assert!(alerted.contains(want), "an alert rule queries {want}");
    }
}

// ---------------------------------------------------------------------------
// Kubernetes: the manifests against each other and the service.

/// The benchmark's memory row (README, Performance): RSS idle, and holding
/// 20,000 unacked deliveries.
const BENCH_IDLE_MIB: f64 = 17.3;
const BENCH_HELD_MIB: f64 = 50.0;
const BENCH_HELD: f64 = 20_000.0;

/// A Kubernetes quantity of memory, in MiB ("64Mi", "1Gi", "67108864").
fn mebibytes(q: &str) -> f64 {
    for (suffix, factor) in [("Ki", 1.0 / 1024.0), ("Mi", 1.0), ("Gi", 1024.0)] {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<f64>().unwrap() * factor;
        }
    }
    q.parse::<f64>().unwrap() / 1024.0 / 1024.0
}

struct Manifests {
    by_kind: BTreeMap<String, Yaml>,
}

impl Manifests {
    fn load() -> Manifests {
        let mut by_kind = BTreeMap::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/kubernetes"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for file in files {
            let rel = file
                .strip_prefix(root())
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            for doc in load_all(&rel) {
                let kind = str_of(&doc["kind"]);
                assert!(
                    by_kind.insert(kind.clone(), doc).is_none(),
                    "one {kind} only"
                );
            }
        }
        Manifests { by_kind }
    }

    fn get(&self, kind: &str) -> &Yaml {
        self.by_kind
            .get(kind)
            .unwrap_or_else(|| panic!("a {kind} in deploy/kubernetes"))
    }
}

/// The container port a probe or a Service names (by name or number).
fn resolve_port(container: &Yaml, port: &Yaml) -> i64 {
    if let Some(n) = port.as_i64() {
        return n;
    }
    let name = str_of(port);
    container["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|p| str_of(&p["name"]) == name)
        .and_then(|p| p["containerPort"].as_i64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

#[tokio::test]
async fn the_kubernetes_manifests_agree_with_the_service() {
    let m = Manifests::load();
    let deployment = m.get("Deployment");
    let config_map = m.get("ConfigMap");
    let secret = m.get("Secret");
    let pod = &deployment["spec"]["template"];
    let pod_labels = pod["metadata"]["labels"].as_hash().unwrap();
    let containers = pod["spec"]["containers"].as_vec().unwrap();
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    assert_eq!(deployment["spec"]["replicas"].as_i64(), Some(3));
    // The image's entrypoint is the binary; its arguments must be `run`.
    let mut argv = vec!["wechat-notifier".to_string()];
    argv.extend(container["args"].as_vec().unwrap().iter().map(str_of));
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(matches!(cli.command, Some(Command::Run)), "{argv:?}");
    assert_eq!(
        deployment["spec"]["selector"]["matchLabels"].as_hash(),
        Some(pod_labels)
    );

    // The environment as the container gets it: the ConfigMap (envFrom) and
    // the container's own entries, secrets taken from the Secret.
    let cm_name = str_of(&config_map["metadata"]["name"]);
    let secret_name = str_of(&secret["metadata"]["name"]);
    let secret_data = secret["stringData"].as_hash().expect("stringData");
    let secret_value = |key: &str| -> String {
        str_of(
            secret_data
                .get(&Yaml::String(key.into()))
                .unwrap_or_else(|| panic!("the Secret has {key}")),
        )
    };
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let env_from = container["envFrom"].as_vec().expect("envFrom");
    assert_eq!(str_of(&env_from[0]["configMapRef"]["name"]), cm_name);
    for (k, v) in config_map["data"].as_hash().unwrap() {
        let key = str_of(k);
        // Anyone who can read the namespace reads a ConfigMap.
        assert!(
            !key.contains("SECRET") && key != "AMQP_URL" && key != "NOTIFIER_LEDGER_URL",
            "{key} belongs in the Secret"
        );
        env.insert(key, str_of(v));
    }
    for entry in container["env"].as_vec().unwrap() {
        let value = match &entry["valueFrom"]["secretKeyRef"] {
            Yaml::BadValue => str_of(&entry["value"]),
            r => {
                assert_eq!(str_of(&r["name"]), secret_name);
                secret_value(&str_of(&r["key"]))
            }
        };
        env.insert(str_of(&entry["name"]), value);
    }
    assert!(
        !env.contains_key("WECHAT_APPSECRET"),
        "the secret is a file"
    );
    // Both URLs hold a password: each comes from the Secret.
    for (var, key) in [
        ("AMQP_URL", "amqp-url"),
        ("NOTIFIER_LEDGER_URL", "ledger-url"),
    ] {
        let entry = container["env"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|e| str_of(&e["name"]) == var)
            .unwrap_or_else(|| panic!("the container sets {var}"));
        assert_eq!(
            str_of(&entry["valueFrom"]["secretKeyRef"]["key"]),
            key,
            "{var} from the Secret"
        );
    }
    assert!(env["NOTIFIER_LEDGER_URL"].starts_with("postgres://"));
    assert!(
        !env["WECHAT_TEMPLATE_ID"].is_empty(),
        "with the ledger on, WECHAT_TEMPLATE_ID is required"
    );

    // WECHAT_APPSECRET_FILE is the Secret's key, mounted where it points.
    let secret_file = env["WECHAT_APPSECRET_FILE"].clone();
    let (dir, file) = secret_file.rsplit_once('/').unwrap();
    let mount = container["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|v| str_of(&v["mountPath"]) == dir)
        .unwrap_or_else(|| panic!("a volume mounted at {dir}"));
    assert_eq!(mount["readOnly"].as_bool(), Some(true));
    let volume = pod["spec"]["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(str_of(&volume["secret"]["secretName"]), secret_name);
    let item = volume["secret"]["items"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|i| str_of(&i["path"]) == file)
        .unwrap_or_else(|| panic!("the Secret projects {file}"));
    let appsecret = secret_value(&str_of(&item["key"]));

    // Every setting through the real parser, the secret read from a file.
    let tmp = std::env::temp_dir().join(format!("k8s-appsecret-{:08x}", fastrand::u32(..)));
    std::fs::write(&tmp, format!("{appsecret}\n")).unwrap();
    let mut pairs = env.clone();
    pairs.insert(
        "WECHAT_APPSECRET_FILE".into(),
        tmp.to_string_lossy().into_owned(),
    );
    let parsed = Settings::from_pairs(pairs);
    std::fs::remove_file(&tmp).unwrap();
    let settings = parsed.unwrap_or_else(|e| panic!("the ConfigMap and Secret are refused: {e}"));
    assert_eq!(settings.appsecret.expose(), appsecret);

    // The metrics port: the container's, the probes', the Service's.
    let metrics_port = i64::from(settings.metrics_addr.port());
    let named = container["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|p| str_of(&p["name"]) == "metrics")
        .expect("a container port named metrics");
    assert_eq!(
        named["containerPort"].as_i64(),
        Some(metrics_port),
        "the metrics container port is NOTIFIER_METRICS_ADDR's"
    );
    let mut probes = BTreeMap::new();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(str_of(&get["path"]), path, "{probe}");
        assert_eq!(
            resolve_port(container, &get["port"]),
            metrics_port,
            "{probe}"
        );
        probes.insert(probe, path.to_string());
    }
    let service = m.get("Service");
    assert_eq!(service["spec"]["selector"].as_hash(), Some(pod_labels));
    assert_eq!(
        service["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true)
    );
    let port = &service["spec"]["ports"][0];
    assert_eq!(resolve_port(container, &port["targetPort"]), metrics_port);
    let annotations = &service["metadata"]["annotations"];
    assert_eq!(
        str_of(&annotations["prometheus.io/port"]),
        metrics_port.to_string()
    );

    // The drain fits in the grace period, with a margin for the last acks.
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace as f64 >= settings.shutdown_grace.as_secs_f64() + 5.0,
        "terminationGracePeriodSeconds {grace} leaves room after NOTIFIER_SHUTDOWN_GRACE {:?}",
        settings.shutdown_grace
    );

    // Memory: the request holds a full prefetch, by the benchmark's figures.
    let resources = &container["resources"];
    let request = mebibytes(&str_of(&resources["requests"]["memory"]));
    let limit = mebibytes(&str_of(&resources["limits"]["memory"]));
    let per_delivery = (BENCH_HELD_MIB - BENCH_IDLE_MIB) / BENCH_HELD;
    let needed = BENCH_IDLE_MIB + per_delivery * f64::from(settings.prefetch);
    assert!(
        request >= needed,
        "a memory request of {request} MiB holds NOTIFIER_PREFETCH={} ({needed:.1} MiB)",
        settings.prefetch
    );
    assert!(limit >= request);

    // One replica at a time may go, so a standby always remains.
    let pdb = m.get("PodDisruptionBudget");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"].as_hash(),
        Some(pod_labels)
    );
    assert_eq!(pdb["spec"]["maxUnavailable"].as_i64(), Some(1));

    // The probe paths, asked of a running service: both answer 200 once it
    // consumes (a path it does not serve would answer 404).
    let env = TestEnv::new("k8s").await;
    let svc = env.start_service().await;
    for (probe, path) in &probes {
        let url = format!("http://{}{path}", svc.http);
        let mut status = 0;
        for _ in 0..100 {
            status = reqwest::get(&url).await.unwrap().status().as_u16();
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, 200, "{probe} {path}");
    }
    svc.stop().await;
    env.cleanup().await;
}
