//! Snapshot backfill throughput on throwaway servers (`cargo bench --bench backfill`):
//!
//! ROWS rows (env `BACKFILL_ROWS`, default 1,000,000) in `engagement_events`, then, one
//! after the other in the same run:
//!
//! 1. `psql \copy (SELECT * FROM engagement_events ORDER BY id) TO /dev/null`: reading the
//!    table in text form in id order, the source-side limit of any copy.
//! 2. `walcast backfill` (initial snapshot: creates its slot) into Redis only.
//! 3. `walcast backfill` (initial snapshot, another slot) into Redis and the analytics
//!    schema (in a database of its own on the same server).
//!
//! Rows/s of each, the ratio to the reference, and walcast's peak RSS (from `wait4`).
//! Prints a Markdown table.

// The tests' harness; a bench uses only part of it.
#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::process::{Command, Stdio};
use std::time::Instant;

use support::{Env, Postgres, Redis, count, find_binary};

const EPISODE: &str = "00000000-0000-0000-0000-000000000001";
const VIDEO: &str = "00000000-0000-0000-0000-000000000002";

#[tokio::main]
async fn main() {
    let rows: i64 = std::env::var("BACKFILL_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let pg = Postgres::start_with(&[("max_wal_size", "4GB"), ("shared_buffers", "256MB")]).await;
    let db = pg.create_source_db("app").await;
    pg.create_db("analytics").await;
    eprintln!("loading {rows} rows");
    db.batch_execute(&format!(
        "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES
           ('{EPISODE}', 'episode', 'An episode', 'podcast', 300, now()),
           ('{VIDEO}', 'video', 'A video', 'video', 600, now());
         INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
         SELECT CASE WHEN g % 3 = 0 THEN '{VIDEO}'::uuid ELSE '{EPISODE}'::uuid END,
                md5((g % 50000)::text)::uuid,
                (ARRAY['play', 'pause', 'finish', 'click'])[1 + g % 4],
                now() - (g % 10000) * interval '1 minute',
                (g * 37) % 600000,
                (ARRAY['ios', 'android', 'web'])[1 + g % 3],
                '{{\"v\": 1}}'
         FROM generate_series(1, {rows}) g"
    ))
    .await
    .unwrap();
    db.batch_execute("VACUUM ANALYZE engagement_events")
        .await
        .unwrap();

    let psql = find_binary("psql", "postgresql-client");
    let started = Instant::now();
    let status = Command::new(&psql)
        .arg(pg.url("app"))
        .args([
            "-c",
            "\\copy (SELECT * FROM engagement_events ORDER BY id) TO '/dev/null'",
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let reference = started.elapsed().as_secs_f64();

    let mut results = Vec::new();
    for (label, sinks, slot) in [
        ("redis", "redis", "walcast_redis"),
        ("redis + postgres", "redis,postgres", "walcast_both"),
    ] {
        let redis = Redis::start().await;
        let env = Env::new(&pg, "app", &redis)
            .set("WALCAST_LOG", "warn")
            .set("WALCAST_SINKS", sinks)
            .set("WALCAST_SLOT", slot)
            .set("WALCAST_ANALYTICS_URL", &pg.url("analytics"));
        let started = Instant::now();
        let (ok, max_rss_kb, cpu) = run_measured(&env, &["backfill"]);
        let secs = started.elapsed().as_secs_f64();
        let redis_cpu = redis_cpu_seconds(&redis).await;
        assert!(ok, "walcast backfill failed");
        assert_eq!(redis.total().await, rows, "every row in Redis");
        if sinks.contains("postgres") {
            let analytics = pg.client("analytics").await;
            assert_eq!(count(&analytics, "analytics.enriched_events").await, rows);
        }
        results.push((label, secs, max_rss_kb, cpu, redis_cpu));
    }

    println!("| measurement ({rows} rows) | value |");
    println!("|---|---|");
    println!(
        "| psql \\copy of the table in id order (reference) | {reference:.2} s, {:.0} rows/s |",
        rows as f64 / reference
    );
    for (label, secs, rss, cpu, redis_cpu) in results {
        println!(
            "| walcast backfill ({label}) | {secs:.2} s, {:.0} rows/s, ratio {:.2}, peak RSS {rss} kB, CPU walcast {cpu:.1} s, redis-server {redis_cpu:.1} s |",
            rows as f64 / secs,
            reference / secs
        );
    }
}

/// CPU seconds (user + system) redis-server has used, from `INFO cpu`.
async fn redis_cpu_seconds(redis: &Redis) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .sum()
}

/// Runs a walcast command to completion; whether it succeeded, its peak RSS in kB and its
/// CPU seconds (user + system).
#[allow(
    clippy::zombie_processes,
    reason = "reaped by wait4, which also gives its rusage"
)]
fn run_measured(env: &Env, args: &[&str]) -> (bool, i64, f64) {
    let child = env.command(args).stdout(Stdio::null()).spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet waited for; the pointers are to live locals.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4");
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        usage.ru_maxrss,
        seconds(usage.ru_utime) + seconds(usage.ru_stime),
    )
}
