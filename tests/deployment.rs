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
    assert!(!text.contains("change-me"), "no password in compose.yaml");
    assert!(
        text.contains("${POSTGRES_PASSWORD:?"),
        "the password comes from .env"
    );
    let example = read(".env.example");
    for var in [
        "POSTGRES_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
        "GENERATOR_RATE",
    ] {
        assert!(
            example.contains(&format!("{var}=")),
            "{var} in .env.example"
        );
    }
    // The walcast environment names are the contract's.
    assert!(text.contains("WALCAST_SOURCE_URL:") && text.contains("WALCAST_REDIS_URL:"));
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
