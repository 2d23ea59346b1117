//! End-to-end measurements on throwaway servers (`cargo bench --bench e2e`):
//!
//! 1. Backlog drain: EVENTS events (env `E2E_EVENTS`, default 1,000,000) committed as
//!    transactions of 100 rows while walcast is stopped, into three slots. `pg_recvlogical`
//!    drains one (pgoutput to /dev/null: the source-side physical limit), walcast with the
//!    Redis sink only the second, and walcast with Redis and the analytics sink the third,
//!    one after the other; events/s of each and the ratio to pg_recvlogical, from the same
//!    run, and the CPU per event of walcast, redis-server and PostgreSQL in each. As the
//!    Redis side's floor, this process then sends the two writes per event the contract
//!    asks for (`SET event:{id} … EX`, `XADD`) plainly to a fresh Redis and reports its
//!    CPU per event.
//! 2. Steady load: single-row inserts from 8 connections at each rate of `E2E_RATES`
//!    (default 1000,5000 events/s) for `E2E_STEADY_SECS` (default 60) while walcast (both
//!    sinks) streams. A reader on the `events:play` stream (XREAD BLOCK) compares each
//!    arrival with the event's `commit_ts` (p50/p95/p99); /metrics is sampled for the lag;
//!    walcast's RSS is read at the end of each phase, and the lag once the writers stop
//!    (near 0 when walcast kept up).
//! 3. Max producer: 8 connections insert single rows as fast as PostgreSQL takes them for
//!    `E2E_MAX_PRODUCER_SECS` (default 60) while walcast streams with both sinks; the
//!    achieved rate and walcast's largest lag (it kept up if that stayed under 1 s).
//! 4. The drain of phase 1 again, with both sinks, into a fresh slot, Redis and analytics
//!    database, over a backlog whose users follow Zipf's law over 100,000 of them (a
//!    realistic population: most events are by users the aggregates have seen). Then, to
//!    that walcast, one transaction of `E2E_BIG_TX` rows (default 1,000,000): how long
//!    until it is in Redis, and walcast's resident memory while it streams.
//!
//! `benches/guard.py` compares a report's CPU per event with the committed baseline
//! (`benches/e2e-baseline.json`).
//!
//! Prints a Markdown table and writes it, with a JSON report, to target/e2e-report.md and
//! target/e2e-report.json.

// The tests' harness; a bench uses only part of it.
#[path = "measure/mod.rs"]
#[allow(dead_code)]
mod measure;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use measure::{
    CONTENT, DrainCpu, ZIPF_USER, children_cpu, cpu_by_role_since, cpu_seconds, cpu_since,
    load_backlog, rss_kb, status_kb,
};
use support::{Env, Postgres, Redis, Walcast, count, eventually, find_binary};

#[tokio::main]
async fn main() {
    let events = measure::env_number("E2E_EVENTS", 1_000_000);
    let (pg, db) = measure::source().await;
    let redis_only = Redis::start().await;
    let redis = Redis::start().await;
    let env_redis = Env::new(&pg, "app", &redis_only)
        .set("WALCAST_LOG", "warn")
        .set("WALCAST_SINKS", "redis");
    let (analytics, env) = both_sinks(&pg, &redis, "analytics", "walcast_both").await;
    assert!(env_redis.output(&["setup"]).status.success());
    db.batch_execute("SELECT pg_create_logical_replication_slot('reference', 'pgoutput')")
        .await
        .unwrap();

    // Every event a new user: the analytics sink's worst case.
    let end_lsn = load_backlog(&db, events, "gen_random_uuid()").await;

    // Reference: pg_recvlogical drains its slot to /dev/null.
    let recvlogical = find_binary("pg_recvlogical", "postgresql-client");
    let pg_before = children_cpu(pg.pid());
    let started = Instant::now();
    let status = Command::new(recvlogical)
        .args([
            "-d",
            &pg.url("app"),
            "--slot",
            "reference",
            "--start",
            "--no-loop",
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=walcast_pub",
        ])
        .args(["--endpos", &end_lsn, "-f", "/dev/null"])
        .status()
        .unwrap();
    assert!(status.success());
    let reference_secs = started.elapsed().as_secs_f64();
    let reference_pg_cpu = cpu_since(pg.pid(), &pg_before);

    // walcast drains the same backlog into Redis, then into Redis and analytics.
    let (redis_secs, redis_rss, redis_cpu, walcast) =
        drain(&env_redis, redis_only.pid(), pg.pid(), || async {
            redis_only.total().await >= events
        })
        .await;
    drop(walcast);
    // Redis's own floor for the same events: the two writes per event the contract asks
    // for, sent plainly by this process.
    let floor_us = redis_floor(&redis_only, events.min(200_000)).await;
    // The load has one writer, so commit order is id order: once the last id is in the
    // analytics table, everything is (batches commit whole). An index probe, not a count.
    let last_id: i64 = db
        .query_one("SELECT max(id) FROM engagement_events", &[])
        .await
        .unwrap()
        .get(0);
    let (both_secs, both_rss, both_cpu, walcast) = drain(&env, redis.pid(), pg.pid(), || async {
        delivered(&redis, &analytics, events, last_id).await
    })
    .await;
    assert_eq!(count(&analytics, "analytics.enriched_events").await, events);
    // Measure latency in the steady state: first let the slot catch up with everything
    // written so far (the drain's own WAL included).
    let caught_up = support::current_lsn(&db).await;
    eventually("slot caught up", Duration::from_secs(600), || async {
        support::confirmed_flush(&db, "walcast_both")
            .await
            .is_some_and(|flushed| flushed >= caught_up)
    })
    .await;

    // Steady load, measured outside walcast: single-row inserts at each rate, a reader on
    // the events:play stream comparing each arrival with the event's commit_ts.
    let rates: Vec<u32> = std::env::var("E2E_RATES")
        .unwrap_or_else(|_| "1000,5000".to_owned())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let steady_secs: u64 = std::env::var("E2E_STEADY_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let mut phases = Vec::new();
    for rate in rates {
        let phase = steady(&pg, &redis, &walcast, env.metrics_port, rate, steady_secs).await;
        phases.push(phase);
    }
    let max_secs: u64 = std::env::var("E2E_MAX_PRODUCER_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    eprintln!("max producer: 8 connections for {max_secs} s");
    let max = max_producer(&pg, env.metrics_port, max_secs).await;
    drop(walcast);

    // The drain again with a realistic user population: a fresh slot, Redis and analytics
    // database, and a backlog whose users follow Zipf's law over 100,000 of them.
    let redis_zipf = Redis::start().await;
    let (analytics_zipf, env_zipf) =
        both_sinks(&pg, &redis_zipf, "analytics_zipf", "walcast_zipf").await;
    load_backlog(&db, events, ZIPF_USER).await;
    let last_id: i64 = db
        .query_one("SELECT max(id) FROM engagement_events", &[])
        .await
        .unwrap()
        .get(0);
    let (zipf_secs, zipf_rss, zipf_cpu, walcast) =
        drain(&env_zipf, redis_zipf.pid(), pg.pid(), || async {
            delivered(&redis_zipf, &analytics_zipf, events, last_id).await
        })
        .await;
    // Last, so that the autovacuum of what it wrote runs during no other measurement.
    let big_rows: i64 = std::env::var("E2E_BIG_TX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    eprintln!("one transaction of {big_rows} rows");
    let big = big_transaction(&db, &redis_zipf, &walcast, "walcast_zipf", big_rows).await;
    drop(walcast);

    let drains = [
        ("redis", redis_secs, redis_rss, redis_cpu),
        ("redis + postgres", both_secs, both_rss, both_cpu),
        (
            "redis + postgres, Zipf over 100,000 users",
            zipf_secs,
            zipf_rss,
            zipf_cpu,
        ),
    ];
    let mut md = String::new();
    md.push_str("| measurement | value |\n|---|---|\n");
    md.push_str(&format!(
        "| backlog | {events} events, {} transactions of 100 rows |\n",
        events / 100
    ));
    md.push_str(&format!(
        "| pg_recvlogical drain | {reference_secs:.2} s, {:.0} events/s; CPU per event: postgres {:.1} µs |\n",
        events as f64 / reference_secs,
        reference_pg_cpu * 1e6 / events as f64,
    ));
    md.push_str(&format!(
        "| Redis floor: `SET event:{{id}} … EX` + `XADD events:{{type}}` per event, pipelined 500 at a time from outside walcast | redis-server CPU per event {floor_us:.1} µs |\n"
    ));
    for (sinks, secs, rss_kb, cpu) in &drains {
        md.push_str(&format!(
            "| walcast drain ({sinks}) | {secs:.2} s, {:.0} events/s, ratio {:.2}, peak RSS {rss_kb} kB; CPU per event: walcast {:.1} µs, redis-server {:.1} µs, postgres {:.1} µs (analytics backend {:.1}, walsender {:.1}, other {:.1}) |\n",
            events as f64 / secs,
            reference_secs / secs,
            cpu.walcast * 1e6 / events as f64,
            cpu.redis * 1e6 / events as f64,
            cpu.postgres * 1e6 / events as f64,
            cpu.postgres_by_role["analytics"] * 1e6 / events as f64,
            cpu.postgres_by_role["walsender"] * 1e6 / events as f64,
            cpu.postgres_by_role["other"] * 1e6 / events as f64,
        ));
    }
    for p in &phases {
        md.push_str(&format!(
            "| steady {}/s for {steady_secs} s (both sinks; achieved {:.0}/s) | commit → redis p50 / p95 / p99 {:.2} / {:.2} / {:.2} ms; max lag {:.0} bytes, {:.3} s; lag at the end {:.3} s; RSS {} kB (peak {} kB) |\n",
            p.rate, p.achieved, p.p50, p.p95, p.p99, p.max_lag_bytes, p.max_lag_seconds, p.lag_at_end_seconds, p.rss_kb, p.peak_rss_kb
        ));
    }
    md.push_str(&format!(
        "| one transaction of {big_rows} rows, streamed (both sinks) | in Redis {:.2} s after its commit; walcast RSS before {} kB, at most {} kB while it streamed |\n",
        big.seconds, big.rss_before_kb, big.max_rss_kb
    ));
    md.push_str(&format!(
        "| max producer: 8 connections for {max_secs} s (both sinks) | achieved {:.0}/s; max lag {:.3} s, at the end {:.3} s; kept up (under 1 s): {} |\n",
        max.achieved,
        max.max_lag_seconds,
        max.lag_at_end_seconds,
        if max.max_lag_seconds < 1.0 { "yes" } else { "no" }
    ));
    print!("{md}");
    let report = serde_json::json!({
        "events": events,
        "redis_floor_us_per_event": floor_us,
        "pg_recvlogical": {"seconds": reference_secs, "events_per_s": events as f64 / reference_secs,
            "cpu_seconds": {"postgres": reference_pg_cpu}},
        "drains": drains.iter().map(|(sinks, secs, rss, cpu)| serde_json::json!({
            "sinks": sinks, "seconds": secs, "events_per_s": events as f64 / secs,
            "ratio": reference_secs / secs, "peak_rss_kb": rss,
            "cpu_seconds": {"walcast": cpu.walcast, "redis_server": cpu.redis, "postgres": cpu.postgres},
            "cpu_us_per_event": {"walcast": cpu.walcast * 1e6 / events as f64,
                "redis_server": cpu.redis * 1e6 / events as f64,
                "postgres": cpu.postgres * 1e6 / events as f64,
                "postgres_by_role": cpu.postgres_by_role.iter()
                    .map(|(role, cpu)| (role.to_string(), serde_json::json!(cpu * 1e6 / events as f64)))
                    .collect::<serde_json::Map<_, _>>()},
        })).collect::<Vec<_>>(),
        "steady": phases.iter().map(|p| serde_json::json!({
            "rate": p.rate, "seconds": steady_secs, "achieved_per_s": p.achieved,
            "latency_ms": {"p50": p.p50, "p95": p.p95, "p99": p.p99},
            "max_lag_bytes": p.max_lag_bytes, "max_lag_seconds": p.max_lag_seconds,
            "lag_at_end_seconds": p.lag_at_end_seconds,
            "rss_kb": p.rss_kb, "peak_rss_kb": p.peak_rss_kb,
        })).collect::<Vec<_>>(),
        "max_producer": {"seconds": max_secs, "achieved_per_s": max.achieved,
            "max_lag_seconds": max.max_lag_seconds, "lag_at_end_seconds": max.lag_at_end_seconds,
            "kept_up": max.max_lag_seconds < 1.0},
        "big_transaction": {"rows": big_rows, "seconds": big.seconds,
            "rss_before_kb": big.rss_before_kb, "max_rss_kb": big.max_rss_kb},
        "pg_recvlogical_us_per_event": reference_pg_cpu * 1e6 / events as f64,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::write(dir.join("e2e-report.md"), &md).unwrap();
    std::fs::write(
        dir.join("e2e-report.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    eprintln!("reports: target/e2e-report.md, target/e2e-report.json");
}

/// walcast with both sinks on slot `slot` (set up), the analytics schema in database
/// `analytics` of its own on the same server, as the README recommends: logical decoding
/// skips other databases' WAL records cheaply, while the source database's own analytics
/// writes would all be decoded and then filtered out.
async fn both_sinks(
    pg: &Postgres,
    redis: &Redis,
    analytics: &str,
    slot: &str,
) -> (tokio_postgres::Client, Env) {
    let client = pg.create_db(analytics).await;
    let env = Env::new(pg, "app", redis)
        .set("WALCAST_LOG", "warn")
        .set("WALCAST_SLOT", slot)
        .set("WALCAST_ANALYTICS_URL", &pg.url(analytics));
    assert!(env.output(&["setup"]).status.success());
    (client, env)
}

/// Whether both sinks have the backlog: Redis counted `events`, and the last id is in
/// the facts. The load has one writer, so commit order is id order and batches commit
/// whole: once the last id is there, everything is. An index probe, not a count.
async fn delivered(
    redis: &Redis,
    analytics: &tokio_postgres::Client,
    events: i64,
    last_id: i64,
) -> bool {
    redis.total().await >= events
        && analytics
            .query_one(
                "SELECT EXISTS (SELECT FROM analytics.enriched_events WHERE id = $1)",
                &[&last_id],
            )
            .await
            .is_ok_and(|row| row.get(0))
}

/// One steady-load phase.
struct Phase {
    rate: u32,
    achieved: f64,
    p50: f64,
    p95: f64,
    p99: f64,
    max_lag_bytes: f64,
    max_lag_seconds: f64,
    /// `walcast_replication_lag_seconds` once the writers stopped: near 0 when walcast
    /// kept up.
    lag_at_end_seconds: f64,
    rss_kb: u64,
    peak_rss_kb: u64,
}

/// One transaction of many rows, streamed: how long after its commit its last row was in
/// Redis, and walcast's resident memory before it and at most (sampled every 50 ms)
/// while it was streamed.
struct BigTransaction {
    seconds: f64,
    rss_before_kb: u64,
    max_rss_kb: u64,
}

async fn big_transaction(
    db: &tokio_postgres::Client,
    redis: &Redis,
    walcast: &Walcast,
    slot: &str,
    rows: i64,
) -> BigTransaction {
    // From a caught-up stream.
    let written = support::current_lsn(db).await;
    eventually("the slot caught up", Duration::from_secs(600), || async {
        support::confirmed_flush(db, slot)
            .await
            .is_some_and(|flushed| flushed >= written)
    })
    .await;
    let before = redis.total().await;
    let rss_before_kb = rss_kb(walcast.pid());
    db.batch_execute(&format!(
        "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device)
         SELECT '{CONTENT}', {ZIPF_USER}, 'play', now(), 1000, 'ios' FROM generate_series(1, {rows})"
    ))
    .await
    .unwrap();
    let committed = Instant::now();
    let mut max_rss_kb = rss_before_kb;
    let deadline = committed + Duration::from_secs(1800);
    while redis.total().await < before + rows {
        assert!(Instant::now() < deadline, "the transaction reached Redis");
        max_rss_kb = max_rss_kb.max(rss_kb(walcast.pid()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    BigTransaction {
        seconds: committed.elapsed().as_secs_f64(),
        rss_before_kb,
        max_rss_kb,
    }
}

async fn lag_seconds(metrics_port: u16) -> f64 {
    let m = support::scrape_metrics(metrics_port).await;
    support::metric(&m, "walcast_replication_lag_seconds").unwrap_or(0.0)
}

/// The max-producer phase: 8 connections insert single rows as fast as PostgreSQL takes
/// them for `secs` seconds while walcast streams.
struct MaxProducer {
    achieved: f64,
    max_lag_seconds: f64,
    lag_at_end_seconds: f64,
}

async fn max_producer(pg: &Postgres, metrics_port: u16, secs: u64) -> MaxProducer {
    const WRITERS: u32 = 8;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let db = pg.client("app").await;
        writers.push(tokio::spawn(async move {
            let insert = db
                .prepare(&format!(
                    "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms)
                     VALUES ('{CONTENT}', {ZIPF_USER}, 'play', now(), 1000)"
                ))
                .await
                .unwrap();
            let mut n = 0u64;
            while Instant::now() < deadline {
                db.execute(&insert, &[]).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut max_lag_seconds = 0.0f64;
    while writers.iter().any(|w| !w.is_finished()) {
        max_lag_seconds = max_lag_seconds.max(lag_seconds(metrics_port).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut inserted = 0;
    for w in writers {
        inserted += w.await.unwrap();
    }
    MaxProducer {
        achieved: inserted as f64 / started.elapsed().as_secs_f64(),
        max_lag_seconds,
        lag_at_end_seconds: lag_seconds(metrics_port).await,
    }
}

/// `rate` single-row inserts per second for `secs` seconds from 8 connections, while a
/// reader times each event's arrival on `events:play` and /metrics is sampled for lag.
async fn steady(
    pg: &Postgres,
    redis: &Redis,
    walcast: &Walcast,
    metrics_port: u16,
    rate: u32,
    secs: u64,
) -> Phase {
    const WRITERS: u32 = 8;
    let expected = u64::from(rate) * secs;
    let reader = {
        let url = redis.url();
        tokio::spawn(async move {
            let client = redis::Client::open(url).unwrap();
            let mut conn = client
                .get_multiplexed_async_connection_with_config(
                    &redis::AsyncConnectionConfig::new().set_response_timeout(None),
                )
                .await
                .unwrap();
            let mut last = "$".to_owned();
            let mut latencies = Vec::with_capacity(expected as usize);
            while (latencies.len() as u64) < expected {
                let reply: redis::streams::StreamReadReply = redis::cmd("XREAD")
                    .arg("BLOCK")
                    .arg(0)
                    .arg("STREAMS")
                    .arg("events:play")
                    .arg(&last)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let now = chrono::Utc::now();
                for key in reply.keys {
                    for entry in key.ids {
                        last = entry.id.clone();
                        let json: String = entry.get("event").unwrap();
                        let event: serde_json::Value = serde_json::from_str(&json).unwrap();
                        let commit = chrono::DateTime::parse_from_rfc3339(
                            event["commit_ts"].as_str().unwrap(),
                        )
                        .unwrap();
                        latencies.push(
                            (now - commit.with_timezone(&chrono::Utc))
                                .num_microseconds()
                                .unwrap() as f64
                                / 1000.0,
                        );
                    }
                }
            }
            latencies
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await; // let XREAD block first
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let db = pg.client("app").await;
        let per_writer = u64::from(rate / WRITERS) * secs + u64::from(w < rate % WRITERS) * secs;
        let period = Duration::from_secs_f64(secs as f64 / per_writer.max(1) as f64);
        writers.push(tokio::spawn(async move {
            let insert = db
                .prepare(&format!(
                    "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms)
                     VALUES ('{CONTENT}', 'play', now(), 1000)"
                ))
                .await
                .unwrap();
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for _ in 0..per_writer {
                tick.tick().await;
                db.execute(&insert, &[]).await.unwrap();
            }
        }));
    }
    let (mut max_lag_bytes, mut max_lag_seconds) = (0.0f64, 0.0f64);
    while writers.iter().any(|w| !w.is_finished()) {
        let m = support::scrape_metrics(metrics_port).await;
        let value = |name: &str| support::metric(&m, name).unwrap_or(0.0);
        max_lag_bytes = max_lag_bytes.max(value("walcast_replication_lag_bytes"));
        max_lag_seconds = max_lag_seconds.max(value("walcast_replication_lag_seconds"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let achieved = expected as f64 / started.elapsed().as_secs_f64();
    let lag_at_end_seconds = lag_seconds(metrics_port).await;
    let mut latencies = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .expect("every event of the phase reached Redis")
        .unwrap();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let kb = |field: &str| status_kb(walcast.pid(), field);
    Phase {
        rate,
        achieved,
        p50: pct(0.50),
        p95: pct(0.95),
        p99: pct(0.99),
        max_lag_bytes,
        max_lag_seconds,
        lag_at_end_seconds,
        rss_kb: kb("VmRSS:"),
        peak_rss_kb: kb("VmHWM:"),
    }
}

/// redis-server CPU in µs per event for `n` events' `SET event:{id} <json> EX 86400` and
/// `XADD events:play MAXLEN ~ 100000 * event <json>`, in pipelines of 500, into a fresh
/// Redis. The JSON is that of an event walcast wrote to `drained`.
async fn redis_floor(drained: &Redis, n: i64) -> f64 {
    let json = drained
        .event(1)
        .await
        .expect("event 1 in redis")
        .to_string();
    let redis = Redis::start().await;
    let mut conn = redis.conn().await;
    let before = cpu_seconds(redis.pid());
    for first in (0..n).step_by(500) {
        let mut pipe = redis::pipe();
        for id in first..(first + 500).min(n) {
            pipe.cmd("SET")
                .arg(format!("event:{id}"))
                .arg(&json)
                .arg("EX")
                .arg(86400)
                .ignore();
            pipe.cmd("XADD")
                .arg("events:play")
                .arg("MAXLEN")
                .arg("~")
                .arg(100_000)
                .arg("*")
                .arg("event")
                .arg(&json)
                .ignore();
        }
        pipe.exec_async(&mut conn).await.unwrap();
    }
    (cpu_seconds(redis.pid()) - before) * 1e6 / n as f64
}

/// Starts `walcast run` and waits until `done`; seconds taken (start-up included), peak
/// RSS in kB, the CPU walcast, the redis-server at `redis_pid` and the PostgreSQL under
/// `postmaster` used meanwhile, and the still running process.
async fn drain<F, Fut>(
    env: &Env,
    redis_pid: u32,
    postmaster: u32,
    done: F,
) -> (f64, String, DrainCpu, Walcast)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    let redis_before = cpu_seconds(redis_pid);
    let pg_before = children_cpu(postmaster);
    let walcast = env.spawn_run();
    eventually(
        "walcast drained the backlog",
        Duration::from_secs(1800),
        done,
    )
    .await;
    let secs = started.elapsed().as_secs_f64();
    let postgres_by_role = cpu_by_role_since(postmaster, &pg_before);
    let cpu = DrainCpu {
        walcast: cpu_seconds(walcast.pid()),
        redis: cpu_seconds(redis_pid) - redis_before,
        postgres: postgres_by_role.values().sum(),
        postgres_by_role,
    };
    let peak_kb = status_kb(walcast.pid(), "VmHWM:").to_string();
    (secs, peak_kb, cpu, walcast)
}
