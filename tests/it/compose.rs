//! `docker-compose.yml` checked without Docker (this machine's client has no
//! compose plugin): parsed as YAML with its merge keys applied, each service's
//! settings run through the service's own settings parser and CLI, and the
//! pieces checked against each other (ports, secrets, Prometheus targets,
//! Grafana's data source and dashboards). `.ci/run` also runs the real
//! parser, `docker-compose config -q`.

use std::collections::BTreeSet;

use clap::Parser;
use wechat_notifier::cli::{Cli, Command};
use wechat_notifier::settings::{Needs, Settings, Source};
use yaml_rust2::Yaml;

use crate::common::yaml::{load_all, root, str_of};

/// Applies YAML merge keys (`<<: *anchor`) the way compose does; the loader
/// already replaced the aliases by copies of their anchors.
fn merged(y: &Yaml) -> Yaml {
    match y {
        Yaml::Hash(h) => {
            let mut out = yaml_rust2::yaml::Hash::new();
            if let Some(base) = h.get(&Yaml::String("<<".into())) {
                if let Yaml::Hash(b) = merged(base) {
                    out.extend(b);
                }
            }
            for (k, v) in h {
                if k.as_str() != Some("<<") {
                    out.insert(k.clone(), merged(v));
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(a) => Yaml::Array(a.iter().map(merged).collect()),
        other => other.clone(),
    }
}

fn load(path: &str) -> Yaml {
    merged(&load_all(path)[0])
}

fn environment(service: &Yaml) -> Vec<(String, String)> {
    service["environment"]
        .as_hash()
        .expect("an environment map")
        .iter()
        .map(|(k, v)| (str_of(k), str_of(v)))
        .collect()
}

fn var(env: &[(String, String)], key: &str) -> String {
    env.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("{key} is set"))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn the_compose_file_has_every_service_with_valid_settings() {
    let doc = load("docker-compose.yml");
    let services = doc["services"].as_hash().expect("services");
    let names: BTreeSet<String> = services.keys().map(str_of).collect();
    let want: BTreeSet<String> = [
        "rabbitmq",
        "postgres",
        "wechat-sim",
        "notifier-1",
        "notifier-2",
        "notifier-3",
        "publisher",
        "prometheus",
        "grafana",
        "jaeger",
    ]
    .map(String::from)
    .into();
    assert_eq!(names, want);

    // RabbitMQ with its management UI.
    let rabbit = &doc["services"]["rabbitmq"];
    assert!(str_of(&rabbit["image"]).contains("management"));
    let ports: Vec<String> = rabbit["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    assert!(ports.iter().any(|p| p.ends_with(":15672")), "{ports:?}");

    // PostgreSQL for the grant ledger: ready means it takes the ledger's own
    // user and database, and its data lives in a named volume.
    let postgres = &doc["services"]["postgres"];
    let pg_env = environment(postgres);
    let pg_health = postgres["healthcheck"]["test"]
        .as_vec()
        .expect("postgres: healthcheck")
        .iter()
        .map(str_of)
        .collect::<Vec<_>>();
    assert!(pg_health.iter().any(|a| a == "pg_isready"), "{pg_health:?}");
    let pg_user = var(&pg_env, "POSTGRES_USER");
    let pg_db = var(&pg_env, "POSTGRES_DB");
    for (flag, value) in [("-U", &pg_user), ("-d", &pg_db)] {
        let at = pg_health.iter().position(|a| a == flag);
        assert_eq!(
            at.map(|i| &pg_health[i + 1]),
            Some(value),
            "postgres: pg_isready {flag}"
        );
    }
    let data = mount_source(postgres, "/var/lib/postgresql/data");
    assert!(
        doc["volumes"][data.as_str()].as_hash().is_some(),
        "postgres: the data volume {data} is a named volume"
    );
    let pg_port = str_of(&postgres["ports"][0])
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();

    // The simulator the replicas talk to.
    let sim = &doc["services"]["wechat-sim"];
    assert_eq!(str_of(&sim["command"][0]), "sim");
    let sim_env = environment(sim);
    let sim_port = port_of(&var(&sim_env, "SIM_LISTEN"));

    // The secret file the compose `secrets:` section mounts.
    let secret_file = root().join(str_of(&doc["secrets"]["wechat_appsecret"]["file"]));
    let secret = std::fs::read_to_string(&secret_file).unwrap();
    assert_eq!(
        secret.trim(),
        var(&sim_env, "WECHAT_APPSECRET"),
        "the simulator's secret"
    );

    let mut targets = BTreeSet::new();
    for name in ["notifier-1", "notifier-2", "notifier-3"] {
        let svc = &doc["services"][name];
        assert_eq!(
            svc["secrets"].as_vec().unwrap()[0].as_str(),
            Some("wechat_appsecret")
        );
        assert!(
            svc["healthcheck"]["test"].as_vec().is_some(),
            "{name}: healthcheck"
        );
        for dependency in ["rabbitmq", "postgres", "wechat-sim"] {
            assert_eq!(
                svc["depends_on"][dependency]["condition"].as_str(),
                Some("service_healthy"),
                "{name} waits for {dependency}"
            );
        }
        // The ledger: the postgres service's user, password and database, and
        // the template id that keys it.
        let replica_env = environment(svc);
        let ledger = var(&replica_env, "NOTIFIER_LEDGER_URL");
        assert_eq!(
            ledger,
            format!(
                "postgres://{pg_user}:{}@postgres:{pg_port}/{pg_db}",
                var(&pg_env, "POSTGRES_PASSWORD")
            ),
            "{name}: NOTIFIER_LEDGER_URL"
        );
        assert!(!var(&replica_env, "WECHAT_TEMPLATE_ID").is_empty());
        // The replica's settings, as the service reads them (the secret at its mounted path).
        let env: Vec<(String, String)> = environment(svc)
            .into_iter()
            .map(|(k, v)| match k.as_str() {
                "WECHAT_APPSECRET_FILE" => {
                    assert_eq!(v, "/run/secrets/wechat_appsecret");
                    (k, secret_file.to_string_lossy().into_owned())
                }
                _ => (k, v),
            })
            .collect();
        let settings = Settings::from_pairs(env.clone())
            .unwrap_or_else(|e| panic!("{name}: the settings are refused: {e}"));
        assert_eq!(settings.appid, var(&sim_env, "WECHAT_APPID"));
        assert_eq!(settings.cloud_env, var(&sim_env, "WECHAT_CLOUD_ENV"));
        assert_eq!(
            settings.wechat_api_base,
            format!("http://wechat-sim:{sim_port}")
        );
        assert!(settings.amqp_urls[0].contains("@rabbitmq:5672/"));
        let metrics_port = settings.metrics_addr.port();
        let health = svc["healthcheck"]["test"]
            .as_vec()
            .unwrap()
            .iter()
            .map(str_of)
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            health.contains(&format!("localhost:{metrics_port}/healthz")),
            "{name}: {health}"
        );
        // Spans go to the Jaeger service, over OTLP/HTTP (port 4318).
        assert_eq!(
            var(&env, "OTEL_EXPORTER_OTLP_ENDPOINT"),
            "http://jaeger:4318",
            "{name}"
        );
        targets.insert(format!("{name}:{metrics_port}"));
    }

    // The one-shot publisher: a command the CLI accepts, run once.
    let publisher = &doc["services"]["publisher"];
    assert_eq!(str_of(&publisher["restart"]), "no");
    let mut argv = vec!["wechat-notifier".to_string()];
    argv.extend(publisher["command"].as_vec().unwrap().iter().map(str_of));
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(matches!(cli.command, Some(Command::Publish(_))));
    // It reads only the broker's settings, and holds no WeChat setting or secret.
    let env = environment(publisher);
    assert!(
        env.iter().all(|(k, _)| !k.starts_with("WECHAT_")),
        "the publisher holds no WeChat setting: {env:?}"
    );
    assert!(publisher["secrets"].is_badvalue(), "no secret mounted");
    let source = Source::from_pairs(env).expect("the publisher's settings");
    let settings = Settings::for_command(&source, Needs::Broker).expect("the publisher's settings");
    assert!(settings.amqp_urls[0].contains("@rabbitmq:5672/"));

    // Prometheus scrapes exactly the three replicas' metrics ports, and loads
    // rule files that are in the folder it mounts.
    let prom_service = &doc["services"]["prometheus"];
    let prom_dir = mount_source(prom_service, "/etc/prometheus");
    let prom = load(&format!("{prom_dir}/prometheus.yml"));
    let scraped: BTreeSet<String> = prom["scrape_configs"][0]["static_configs"][0]["targets"]
        .as_vec()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    assert_eq!(scraped, targets);
    let rule_files = prom["rule_files"].as_vec().expect("rule_files");
    assert!(!rule_files.is_empty());
    for file in rule_files {
        let path = root().join(&prom_dir).join(str_of(file));
        assert!(path.is_file(), "{} is mounted", path.display());
    }

    // Grafana reads Prometheus at its container port, and the dashboards
    // from the folder its provisioning names.
    let prom_port = str_of(&prom_service["ports"][0])
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let grafana = &doc["services"]["grafana"];
    let provisioning = mount_source(grafana, "/etc/grafana/provisioning");
    let sources = load(&format!("{provisioning}/datasources/prometheus.yml"));
    let source = &sources["datasources"][0];
    assert_eq!(
        str_of(&source["url"]),
        format!("http://prometheus:{prom_port}")
    );
    let uid = str_of(&source["uid"]);
    let providers = load(&format!("{provisioning}/dashboards/wechat-notifier.yml"));
    let in_container = str_of(&providers["providers"][0]["options"]["path"]);
    let dashboards = mount_source(grafana, &in_container);
    let home = var(
        &environment(grafana),
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH",
    );
    let home = home
        .strip_prefix(&format!("{in_container}/"))
        .expect("the home dashboard is a provisioned one");
    assert!(root().join(&dashboards).join(home).is_file(), "{home}");
    let mut count = 0;
    for entry in std::fs::read_dir(root().join(&dashboards)).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            if panel["type"] != "row" {
                assert_eq!(
                    panel["datasource"]["uid"],
                    uid.as_str(),
                    "{}",
                    panel["title"]
                );
            }
        }
        count += 1;
    }
    assert!(count > 0, "a dashboard in {dashboards}");
}

/// The host folder (relative, without `./`) a service mounts at `target`.
fn mount_source(service: &Yaml, target: &str) -> String {
    service["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .map(str_of)
        .find_map(|v| {
            let mut parts = v.split(':');
            let (source, to) = (parts.next()?, parts.next()?);
            (to == target).then(|| source.trim_start_matches("./").to_string())
        })
        .unwrap_or_else(|| panic!("a volume mounted at {target}"))
}

#[test]
fn the_image_builds_what_the_manifest_names() {
    // A manifest target (a bench, say) whose file the image does not copy breaks `docker build`.
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let manifest: toml::Table = std::fs::read_to_string(root().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    for kind in ["bench", "test", "example", "bin"] {
        for target in manifest
            .get(kind)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let default_dir = match kind {
                "bench" => "benches",
                "test" => "tests",
                "example" => "examples",
                _ => "src",
            };
            let path = target
                .get("path")
                .and_then(|p| p.as_str())
                .unwrap_or(default_dir);
            let dir = path.split('/').next().unwrap();
            assert!(
                dockerfile.contains(&format!("COPY {dir} ")),
                "the Dockerfile copies {dir}/ for [[{kind}]] {path}"
            );
        }
    }
}
