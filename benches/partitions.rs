//! Sizing of a partitioned source on throwaway servers (`cargo bench --bench partitions`):
//!
//! EVENTS events (env `PARTITIONS_EVENTS`, default 300,000; Zipf users over 100,000) are
//! committed as transactions of 100 rows while nothing reads them, into a slot per
//! consumer. Then, one after the other in the same run, each drains the same backlog with
//! both sinks (Redis and analytics), from a fresh Redis and analytics database:
//!
//! 1. `pg_recvlogical` (pgoutput to /dev/null): the source side's limit for one consumer;
//! 2. one walcast (`WALCAST_PARTITIONS=1`);
//! 3. two walcast instances (`WALCAST_PARTITIONS=2`), started together.
//!
//! For each: events/s, and CPU per event of walcast (all instances), redis-server, the
//! walsenders and the analytics backends. Prints a Markdown table and writes it to
//! target/partitions-report.md.

// The tests' harness; a bench uses only part of it.
#[path = "measure/mod.rs"]
#[allow(dead_code)]
mod measure;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use measure::{ZIPF_USER, children_cpu, cpu_by_role_since, cpu_seconds, load_backlog};
use support::{Env, Postgres, Redis, Walcast, eventually, find_binary};

/// One drain's figures.
struct Drain {
    label: String,
    seconds: f64,
    walcast_cpu: f64,
    redis_cpu: f64,
    walsender_cpu: f64,
    analytics_cpu: f64,
}

#[tokio::main]
async fn main() {
    let events = measure::env_number("PARTITIONS_EVENTS", 300_000);
    let (pg, db) = measure::source().await;
    // Every consumer's slot exists before the backlog, so each drains all of it.
    let one = Consumer::new(&pg, 1).await;
    let two = Consumer::new(&pg, 2).await;
    db.batch_execute("SELECT pg_create_logical_replication_slot('reference', 'pgoutput')")
        .await
        .unwrap();
    let end_lsn = load_backlog(&db, events, ZIPF_USER).await;
    let last_ids: Vec<i64> = support::column(
        &db,
        "SELECT max(id) FROM engagement_events GROUP BY id % 2 ORDER BY 1",
    )
    .await;

    let recvlogical = find_binary("pg_recvlogical", "postgresql-client");
    let before = children_cpu(pg.pid());
    let started = Instant::now();
    let mut child = Command::new(recvlogical)
        .args(["-d", &pg.url("app"), "--slot", "reference", "--start"])
        .args(["--no-loop", "-o", "proto_version=1"])
        .args(["-o", "publication_names=n1_pub"])
        .args(["--endpos", &end_lsn, "-f", "/dev/null"])
        .spawn()
        .unwrap();
    // Its walsender ends with the stream, and its CPU with it: sampled while it runs.
    let mut walsender_cpu = 0.0f64;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        walsender_cpu = walsender_cpu.max(cpu_by_role_since(pg.pid(), &before)["walsender"]);
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    let reference = Drain {
        label: "pg_recvlogical (one slot, to /dev/null)".to_owned(),
        seconds: started.elapsed().as_secs_f64(),
        walcast_cpu: 0.0,
        redis_cpu: 0.0,
        walsender_cpu,
        analytics_cpu: 0.0,
    };
    let drains = [
        reference,
        one.drain(&pg, events, &last_ids).await,
        two.drain(&pg, events, &last_ids).await,
    ];

    let per_event = |cpu: f64| cpu / events as f64 * 1e6;
    let mut report = format!(
        "Backlog of {events} events (transactions of 100 rows, Zipf users over 100,000), \
         both sinks, drained from a standstill on the same servers.\n\n\
         | consumer | seconds | events/s | ratio to pg_recvlogical | walcast µs/event | \
         redis-server µs/event | walsenders µs/event | analytics backends µs/event |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    let reference_seconds = drains[0].seconds;
    for d in &drains {
        report.push_str(&format!(
            "| {} | {:.1} | {:.0} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            d.label,
            d.seconds,
            events as f64 / d.seconds,
            reference_seconds / d.seconds,
            per_event(d.walcast_cpu),
            per_event(d.redis_cpu),
            per_event(d.walsender_cpu),
            per_event(d.analytics_cpu),
        ));
    }
    println!("{report}");
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned());
    std::fs::write(format!("{target}/partitions-report.md"), &report).unwrap();
}

/// `partitions` walcast instances, each with its slot, sharing one Redis and one
/// analytics database of their own.
struct Consumer {
    partitions: u32,
    redis: Redis,
    analytics: tokio_postgres::Client,
    envs: Vec<Env>,
}

impl Consumer {
    async fn new(pg: &Postgres, partitions: u32) -> Consumer {
        let redis = Redis::start().await;
        let database = format!("analytics_{partitions}");
        let analytics = pg.create_db(&database).await;
        let envs: Vec<Env> = (0..partitions)
            .map(|index| {
                let env = Env::new(pg, "app", &redis)
                    .set("WALCAST_LOG", "warn")
                    .set("WALCAST_SLOT", &format!("n{partitions}"))
                    .set("WALCAST_PUBLICATION", &format!("n{partitions}_pub"))
                    .set("WALCAST_ANALYTICS_URL", &pg.url(&database));
                if partitions == 1 {
                    env
                } else {
                    env.set("WALCAST_PARTITIONS", &partitions.to_string())
                        .set("WALCAST_PARTITION", &index.to_string())
                }
            })
            .collect();
        for env in &envs {
            let out = env.output(&["setup"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Consumer {
            partitions,
            redis,
            analytics,
            envs,
        }
    }

    /// Starts every instance and waits until both sinks hold the backlog: Redis counted
    /// `events`, and each partition's last id is in the facts (each instance applies its
    /// share in commit order, which for one writer is id order).
    async fn drain(&self, pg: &Postgres, events: i64, last_ids: &[i64]) -> Drain {
        let pg_before = children_cpu(pg.pid());
        let redis_before = cpu_seconds(self.redis.pid());
        let started = Instant::now();
        let running: Vec<Walcast> = self.envs.iter().map(Env::spawn_run).collect();
        eventually(
            "the backlog drained",
            Duration::from_secs(1800),
            || async {
                self.redis.total().await >= events
                    && self
                        .analytics
                        .query_one(
                            "SELECT count(*) = cardinality($1::int8[]) FROM analytics.enriched_events WHERE id = ANY($1)",
                            &[&last_ids],
                        )
                        .await
                        .is_ok_and(|row| row.get(0))
            },
        )
        .await;
        let seconds = started.elapsed().as_secs_f64();
        let by_role = cpu_by_role_since(pg.pid(), &pg_before);
        let drain = Drain {
            label: match self.partitions {
                1 => "walcast, one instance".to_owned(),
                n => format!("walcast, {n} partitions"),
            },
            seconds,
            walcast_cpu: running.iter().map(|w| cpu_seconds(w.pid())).sum(),
            redis_cpu: cpu_seconds(self.redis.pid()) - redis_before,
            walsender_cpu: by_role["walsender"],
            analytics_cpu: by_role["analytics"],
        };
        drop(running);
        drain
    }
}
