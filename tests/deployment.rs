//! The deployment files parse and agree with the code: compose services, the health
//! check, Prometheus' target and rules, the Grafana dashboard. (No Docker engine runs here:
//! this checks what can be checked without one.)

use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

fn yaml(path: &str) -> Yaml {
    let mut docs = YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(docs.len(), 1, "{path}: one document");
    docs.remove(0)
}

#[test]
fn compose_runs_the_whole_stack_with_secrets_from_the_environment() {
    let compose = yaml("compose.yaml");
    let services = &compose["services"];
    for name in [
        "secrets-check",
        "postgres",
        "redis",
        "walcast",
        "generator",
        "prometheus",
        "grafana",
    ] {
        assert!(!services[name].is_badvalue(), "service {name}");
    }
    let pg_command: Vec<&str> = services["postgres"]["command"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(pg_command.contains(&"wal_level=logical"));
    assert_eq!(
        services["walcast"]["build"]["dockerfile"].as_str(),
        Some("docker/Dockerfile")
    );
    let text = read("compose.yaml");
    assert!(
        !text.contains("change-me\n") && !text.contains("=change-me"),
        "no password in compose.yaml"
    );
    // Every secret comes from the environment (.env) and reaches the services as a file.
    let example = read(".env.example");
    for (secret, var) in [
        ("postgres_password", "POSTGRES_PASSWORD"),
        ("walcast_db_password", "WALCAST_DB_PASSWORD"),
        ("grafana_db_password", "GRAFANA_DB_PASSWORD"),
        ("redis_password", "REDIS_PASSWORD"),
        ("grafana_admin_password", "GRAFANA_ADMIN_PASSWORD"),
    ] {
        assert_eq!(
            compose["secrets"][secret]["environment"].as_str(),
            Some(var),
            "secret {secret}"
        );
        assert!(
            example.contains(&format!("{var}=")),
            "{var} in .env.example"
        );
    }
    assert!(example.contains("GENERATOR_RATE="));
    // The walcast environment names are the contract's, and walcast is not the superuser.
    let walcast_env = &services["walcast"]["environment"];
    assert_eq!(
        walcast_env["WALCAST_SOURCE_URL"].as_str(),
        Some("postgres://walcast@postgres:5432/app")
    );
    for var in [
        "WALCAST_SOURCE_PASSWORD_FILE",
        "WALCAST_REDIS_URL",
        "WALCAST_REDIS_PASSWORD_FILE",
    ] {
        assert!(!walcast_env[var].is_badvalue(), "walcast's {var}");
    }
    let roles = read("docker/postgres/010_roles.sh");
    assert!(roles.contains("CREATE ROLE walcast LOGIN REPLICATION"));
    assert!(roles.contains("CREATE SCHEMA analytics AUTHORIZATION walcast"));
}

#[test]
fn compose_is_hardened_as_an_operator_ships_it() {
    let compose = yaml("compose.yaml");
    let services = compose["services"].as_hash().unwrap();
    for (name, service) in services {
        let name = name.as_str().unwrap();
        assert!(
            service["ports"].is_badvalue(),
            "{name} publishes a port by default (compose.ports.yaml does that on request)"
        );
        if let Some(image) = service["image"].as_str() {
            let tag = image.rsplit_once(':').map(|(_, tag)| tag).unwrap_or("");
            assert!(
                tag.contains('.') && tag != "latest",
                "{name}: image {image} is not pinned to a minor version"
            );
        }
        if name != "secrets-check" {
            assert!(
                !service["deploy"]["resources"]["limits"]["memory"].is_badvalue(),
                "{name} has no memory limit"
            );
            assert_eq!(
                service["depends_on"]["secrets-check"]["condition"].as_str(),
                (name == "postgres" || name == "redis").then_some("service_completed_successfully"),
                "{name}"
            );
        }
    }
    let walcast = &compose["services"]["walcast"];
    let check: Vec<&str> = walcast["healthcheck"]["test"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(
        check.iter().any(|part| part.contains("/readyz")),
        "{check:?}"
    );
    let generator = &compose["services"]["generator"];
    assert_eq!(generator["profiles"][0].as_str(), Some("load"));
    assert!(
        read("compose.yaml").contains("change-me"),
        "the secrets check refuses change-me"
    );
    let ports = yaml("compose.ports.yaml");
    for (name, service) in ports["services"].as_hash().unwrap() {
        for port in service["ports"].as_vec().unwrap() {
            assert!(
                port.as_str().unwrap().starts_with("127.0.0.1:"),
                "{name:?}: {port:?} beyond loopback"
            );
        }
    }
    let dockerfile = read("docker/Dockerfile");
    for line in dockerfile.lines().filter(|l| l.starts_with("FROM ")) {
        let image = line.split_whitespace().nth(1).unwrap();
        assert!(
            image.contains('.'),
            "{image} is not pinned to a minor version"
        );
    }
}

#[test]
fn the_image_runs_unprivileged_with_a_health_check_on_healthz() {
    let dockerfile = read("docker/Dockerfile");
    assert!(dockerfile.contains("\nUSER walcast\n"));
    assert!(dockerfile.contains("HEALTHCHECK") && dockerfile.contains("/healthz"));
    assert!(
        dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM ")) >= 2,
        "multi-stage"
    );
}

#[test]
fn prometheus_scrapes_walcast_and_the_rules_use_real_metric_names() {
    let config = yaml("docker/prometheus/prometheus.yml");
    let target = config["scrape_configs"][0]["static_configs"][0]["targets"][0].as_str();
    assert_eq!(target, Some("walcast:9187"));
    let rules = read("docker/prometheus/alerts.yml");
    yaml("docker/prometheus/alerts.yml");
    for metric in [
        walcast::metrics::REPLICATION_LAG_SECONDS,
        walcast::metrics::SLOT_RETAINED_WAL_BYTES,
        walcast::metrics::SINK_BATCHES_TOTAL,
        walcast::metrics::DEAD_LETTERS_TOTAL,
        walcast::metrics::REPLICATION_RECONNECTS_TOTAL,
        walcast::metrics::SLOT_IDLE_TIMEOUT_SECONDS,
    ] {
        assert!(rules.contains(metric), "an alert on {metric}");
    }
}

#[test]
fn the_partitions_override_runs_two_partitions_and_prometheus_scrapes_both() {
    let compose = yaml("compose.partitions.yaml");
    let services = &compose["services"];
    for (service, partition) in [("walcast", "0"), ("walcast-1", "1")] {
        let environment = &services[service]["environment"];
        assert_eq!(environment["WALCAST_PARTITIONS"].as_str(), Some("2"));
        assert_eq!(environment["WALCAST_PARTITION"].as_str(), Some(partition));
    }
    assert_eq!(
        services["walcast-1"]["extends"]["service"].as_str(),
        Some("walcast")
    );
    let config = yaml("docker/prometheus/prometheus.partitions.yml");
    let targets: Vec<&str> = config["scrape_configs"][0]["static_configs"][0]["targets"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(targets, ["walcast:9187", "walcast-1:9187"]);
    let command: Vec<&str> = services["prometheus"]["command"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(command.contains(&"--config.file=/etc/prometheus/prometheus.partitions.yml"));
    // The tables' owner creates each partition's publication, with the filter walcast
    // expects of it.
    let roles = read("docker/postgres/010_roles.sh");
    for index in 0..2 {
        let partition = walcast::config::Partition { index, count: 2 };
        let expected = format!(
            "CREATE PUBLICATION walcast_pub_{index} FOR TABLE public.content,\n    public.engagement_events WHERE ({})",
            partition.condition()
        );
        assert!(roles.contains(&expected), "{expected}");
    }
}

#[test]
fn the_cluster_override_makes_a_three_by_two_cluster_that_both_partitions_write_to() {
    let compose = yaml("compose.cluster.yaml");
    let services = &compose["services"];
    for n in 1..=6 {
        let node = &services[format!("redis-node-{n}").as_str()];
        assert_eq!(
            node["hostname"].as_str(),
            Some(format!("redis-node-{n}").as_str())
        );
        let command: Vec<&str> = node["command"]
            .as_vec()
            .unwrap()
            .iter()
            .filter_map(Yaml::as_str)
            .collect();
        let line = command.join(" ");
        for flag in [
            "--cluster-enabled yes",
            "--requirepass",
            "--masterauth",
            "--appendonly yes",
        ] {
            assert!(line.contains(flag), "redis-node-{n} lacks {flag}: {line}");
        }
    }
    let create = services["redis-cluster-create"]["entrypoint"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(Yaml::as_str)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(create.contains("--cluster create") && create.contains("--cluster-replicas 1"));
    for service in ["walcast", "walcast-1"] {
        let seeds = services[service]["environment"]["WALCAST_REDIS_CLUSTER"]
            .as_str()
            .unwrap_or_else(|| panic!("{service} has no WALCAST_REDIS_CLUSTER"));
        let redis = walcast::config::RedisArgs {
            redis_url: "redis://redis:6379".to_owned(),
            redis_password_file: None,
            redis_ca_file: None,
            redis_cert_file: None,
            redis_key_file: None,
            redis_cluster: Some(seeds.to_owned()),
        };
        assert!(matches!(
            redis.target(),
            Ok(walcast::config::RedisTarget::Cluster(_))
        ));
        assert_eq!(
            services[service]["depends_on"]["redis-cluster-create"]["condition"].as_str(),
            Some("service_completed_successfully")
        );
    }
}

#[test]
fn the_dashboard_parses_and_queries_metrics_that_exist() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("docker/grafana/dashboards/walcast.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Replication lag",
        "Throughput",
        "Commit to sink",
        "Dead letters",
        "Top content",
    ] {
        assert!(
            titles.iter().any(|t| t.starts_with(wanted)),
            "a {wanted} panel in {titles:?}"
        );
    }
    let known = [
        walcast::metrics::REPLICATION_LAG_BYTES,
        walcast::metrics::REPLICATION_LAG_SECONDS,
        walcast::metrics::EVENTS_TOTAL,
        walcast::metrics::END_TO_END_SECONDS,
        walcast::metrics::DEAD_LETTERS_TOTAL,
        walcast::metrics::SINK_BATCHES_TOTAL,
        walcast::metrics::SLOT_RETAINED_WAL_BYTES,
        walcast::metrics::SINK_CHECKPOINT_LAG_BYTES,
    ];
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            if let Some(expr) = target["expr"].as_str() {
                assert!(
                    known.iter().any(|m| expr.contains(m)),
                    "unknown metric in {expr}"
                );
            }
        }
    }
    let datasources = yaml("docker/grafana/provisioning/datasources/datasources.yml");
    let uids: Vec<&str> = datasources["datasources"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|d| d["uid"].as_str())
        .collect();
    assert_eq!(uids, ["prometheus", "analytics"]);
    yaml("docker/grafana/provisioning/dashboards/dashboards.yml");
}
