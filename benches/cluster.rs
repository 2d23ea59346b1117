//! The Redis sink on one Redis and on a Redis Cluster, on throwaway servers
//! (`cargo bench --bench cluster`):
//!
//! EVENTS events (env `CLUSTER_EVENTS`, default 200,000; four event types, one content,
//! Zipf users over 100,000) are committed as transactions of 100 rows while nothing reads
//! them, into a slot per consumer. Then, one after the other in the same run, each drains
//! the same backlog with the Redis sink alone:
//!
//! 1. `pg_recvlogical` (pgoutput to /dev/null): the source side's limit;
//! 2. walcast writing to one redis-server;
//! 3. walcast writing to a cluster of three primaries with a replica each.
//!
//! For each: events/s, and CPU per event of walcast, of redis-server (one; or the primaries
//! together, the busiest primary, and the replicas together). Prints a Markdown table and
//! writes it to target/cluster-report.md.

// The tests' harness; a bench uses only part of it.
#[path = "measure/mod.rs"]
#[allow(dead_code)]
mod measure;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use measure::{ZIPF_USER, cpu_seconds, load_backlog};
use support::cluster::RedisCluster;
use support::{Env, Redis, eventually, find_binary};

struct Drain {
    label: &'static str,
    seconds: f64,
    walcast_cpu: f64,
    /// One server's, or the primaries' together.
    redis_cpu: f64,
    busiest_primary_cpu: Option<f64>,
    replicas_cpu: Option<f64>,
}

#[tokio::main]
async fn main() {
    let events = measure::env_number("CLUSTER_EVENTS", 200_000);
    let (pg, db) = measure::source().await;
    let redis = Redis::start().await;
    let cluster = RedisCluster::start().await;
    let env = |name: &str| {
        Env::new(&pg, "app", &redis)
            .set("WALCAST_LOG", "warn")
            .set("WALCAST_SINKS", "redis")
            .set("WALCAST_SLOT", name)
            .set("WALCAST_PUBLICATION", &format!("{name}_pub"))
    };
    let single = env("single");
    let clustered = env("cluster").set("WALCAST_REDIS_CLUSTER", &cluster.seeds());
    for env in [&single, &clustered] {
        env.succeed(&["setup"]);
    }
    db.batch_execute("SELECT pg_create_logical_replication_slot('reference', 'pgoutput')")
        .await
        .unwrap();
    let end_lsn = load_backlog(&db, events, ZIPF_USER).await;

    let recvlogical = find_binary("pg_recvlogical", "postgresql-client");
    let started = Instant::now();
    let mut child = Command::new(recvlogical)
        .args(["-d", &pg.url("app"), "--slot", "reference", "--start"])
        .args(["--no-loop", "-o", "proto_version=1"])
        .args(["-o", "publication_names=single_pub"])
        .args(["--endpos", &end_lsn, "-f", "/dev/null"])
        .spawn()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let reference = Drain {
        label: "pg_recvlogical (to /dev/null)",
        seconds: started.elapsed().as_secs_f64(),
        walcast_cpu: 0.0,
        redis_cpu: 0.0,
        busiest_primary_cpu: None,
        replicas_cpu: None,
    };

    // One Redis.
    let redis_before = cpu_seconds(redis.pid());
    let started = Instant::now();
    let running = single.spawn_run();
    eventually(
        "the backlog in Redis",
        Duration::from_secs(1800),
        || async { redis.total().await >= events },
    )
    .await;
    let one = Drain {
        label: "walcast, one redis-server",
        seconds: started.elapsed().as_secs_f64(),
        walcast_cpu: cpu_seconds(running.pid()),
        redis_cpu: cpu_seconds(redis.pid()) - redis_before,
        busiest_primary_cpu: None,
        replicas_cpu: None,
    };
    drop(running);

    // The cluster.
    let nodes = cluster.nodes().await;
    let cpu = |primary: bool| -> Vec<f64> {
        nodes
            .iter()
            .filter(|n| n.primary == primary)
            .map(|n| cpu_seconds(cluster.pid(n.port)))
            .collect()
    };
    let (primaries_before, replicas_before) = (cpu(true), cpu(false));
    let started = Instant::now();
    let running = clustered.spawn_run();
    eventually(
        "the backlog in the cluster",
        Duration::from_secs(1800),
        || async { cluster.total().await >= events },
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let primaries: Vec<f64> = cpu(true)
        .iter()
        .zip(&primaries_before)
        .map(|(after, before)| after - before)
        .collect();
    let replicas: f64 = cpu(false)
        .iter()
        .zip(&replicas_before)
        .map(|(after, before)| after - before)
        .sum();
    let three = Drain {
        label: "walcast, cluster of 3 primaries + 3 replicas",
        seconds,
        walcast_cpu: cpu_seconds(running.pid()),
        redis_cpu: primaries.iter().sum(),
        busiest_primary_cpu: primaries.iter().copied().reduce(f64::max),
        replicas_cpu: Some(replicas),
    };
    drop(running);

    let per_event = |cpu: f64| format!("{:.1}", cpu / events as f64 * 1e6);
    let mut report = format!(
        "Backlog of {events} events (transactions of 100 rows), the Redis sink alone, drained \
         from a standstill on the same machine.\n\n\
         | consumer | seconds | events/s | walcast µs/event | redis-server µs/event (primaries) | \
         busiest primary µs/event | replicas µs/event |\n|---|---|---|---|---|---|---|\n"
    );
    for d in [&reference, &one, &three] {
        report.push_str(&format!(
            "| {} | {:.1} | {:.0} | {} | {} | {} | {} |\n",
            d.label,
            d.seconds,
            events as f64 / d.seconds,
            per_event(d.walcast_cpu),
            per_event(d.redis_cpu),
            d.busiest_primary_cpu.map_or("—".to_owned(), per_event),
            d.replicas_cpu.map_or("—".to_owned(), per_event),
        ));
    }
    println!("{report}");
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned());
    std::fs::write(format!("{target}/cluster-report.md"), &report).unwrap();
}
