//! What an operator relies on, end to end against real servers: the lag gauges, the
//! end-to-end histogram, /healthz and /readyz, `walcast status`, the heartbeat, and the
//! exit on an invalidated slot.

use std::time::Duration;

use crate::support::{
    EPISODE, Redis, Stack, confirmed_flush, current_lsn, episode_sql, eventually, http_get,
    load_plays, metric, scrape_metrics, signal_pid, try_http_get, wait_for,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

async fn stack() -> Stack {
    stack_with(Redis::start().await).await
}

async fn stack_with(redis: Redis) -> Stack {
    Stack::start(redis, &episode_sql()).await
}

/// Loads `n` events (`per_tx` a transaction) and waits until Redis has them all and
/// `/readyz` says ready.
async fn load_until_ready(s: &Stack, port: u16, n: i64, per_tx: i64) {
    load_plays(&s.db, n, per_tx).await;
    eventually(&format!("{n} events in Redis, ready"), WAIT, || async {
        s.redis.total().await == n && ready(port).await
    })
    .await;
}

/// `/readyz` answers 200 (`false` also while nothing listens yet).
async fn ready(port: u16) -> bool {
    matches!(try_http_get(port, "/readyz").await, Ok((200, _)))
}

#[tokio::test]
async fn lag_gauges_rise_while_a_sink_stalls_and_return_to_zero_after() {
    let s = stack().await;
    let walcast = s.run();
    let port = s.env.metrics_port;
    load_until_ready(&s, port, 10, 10).await;

    // Redis stops answering (frozen, connections open): its writes hang.
    signal_pid(s.redis.pid(), libc::SIGSTOP);
    load_plays(&s.db, 1_000, 100).await;
    let stalled =
        wait_for("lag gauges to show the stalled sink", WAIT, || async {
            let m = scrape_metrics(port).await;
            let lag_bytes = metric(&m, "walcast_replication_lag_bytes")?;
            let lag_seconds = metric(&m, "walcast_replication_lag_seconds")?;
            let redis = metric(&m, r#"walcast_sink_checkpoint_lag_bytes{sink="redis"}"#)?;
            let postgres = metric(&m, r#"walcast_sink_checkpoint_lag_bytes{sink="postgres"}"#)?;
            let (status, body) = http_get(port, "/readyz").await;
            (lag_bytes > 0.0 && lag_seconds >= 2.0 && redis > postgres && status == 503)
                .then_some((lag_bytes, lag_seconds, redis, postgres, body))
        })
        .await;
    let (lag_bytes, lag_seconds, redis_lag, postgres_lag, body) = stalled;
    assert!(body.contains("redis"), "/readyz names the sink: {body}");
    eprintln!(
        "stalled: lag {lag_bytes} bytes, {lag_seconds} s; checkpoint lag redis {redis_lag}, postgres {postgres_lag}"
    );
    let flushed_while_stalled = confirmed_flush(&s.db, "walcast").await.unwrap();

    signal_pid(s.redis.pid(), libc::SIGCONT);
    eventually("caught up: gauges back near zero, ready", WAIT, || async {
        let m = scrape_metrics(port).await;
        s.redis.total().await == 1_010
            && metric(&m, "walcast_replication_lag_seconds") == Some(0.0)
            && metric(&m, "walcast_replication_lag_bytes").is_some_and(|b| b < 65_536.0)
            && ready(port).await
    })
    .await;
    // The slot learns the new position at the next status update.
    eventually("the slot moved on", WAIT, || async {
        confirmed_flush(&s.db, "walcast").await.unwrap() > flushed_while_stalled
    })
    .await;

    // One end-to-end observation per event delivered, per sink.
    eventually("end-to-end counts equal events delivered", WAIT, || async {
        let m = scrape_metrics(port).await;
        ["redis", "postgres"].iter().all(|sink| {
            metric(
                &m,
                &format!("walcast_end_to_end_seconds_count{{sink=\"{sink}\"}}"),
            ) == Some(1_010.0)
        })
    })
    .await;
    let m = scrape_metrics(port).await;
    assert_eq!(
        metric(
            &m,
            r#"walcast_events_total{table="engagement_events",op="insert"}"#
        ),
        Some(1_010.0),
        "metrics:\n{m}"
    );
    assert!(walcast.log().contains("sink unreachable"));
}

#[tokio::test]
async fn readyz_turns_not_ready_while_redis_is_down_and_ready_after() {
    let mut s = stack_with(Redis::start_persistent().await).await;
    let _walcast = s.run();
    let port = s.env.metrics_port;
    eventually("ready", WAIT, || ready(port)).await;
    assert_eq!(http_get(port, "/healthz").await, (200, "ok\n".to_owned()));

    s.redis.stop();
    let body = wait_for("/readyz to report redis", WAIT, || async {
        let (status, body) = http_get(port, "/readyz").await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(
        body.contains("sink redis is unreachable"),
        "readyz body: {body}"
    );
    assert!(!body.contains("postgres"), "only redis is down: {body}");
    assert_eq!(http_get(port, "/healthz").await.0, 200, "alive all along");

    s.redis.restart().await;
    eventually("ready again", WAIT, || ready(port)).await;
    load_plays(&s.db, 1, 1).await;
    eventually("events flow again", WAIT, || async {
        s.redis.total().await == 1
    })
    .await;
}

#[tokio::test]
async fn heartbeat_moves_the_slot_of_a_quiet_database() {
    let mut s = stack().await;
    s.env.put("WALCAST_HEARTBEAT_INTERVAL", "1s");
    let _walcast = s.run();
    let port = s.env.metrics_port;
    eventually("ready", WAIT, || ready(port)).await;
    // Nothing is written by the test from here: only the heartbeat writes WAL.
    eventually("a heartbeat", WAIT, || async {
        metric(&scrape_metrics(port).await, "walcast_heartbeats_total").is_some_and(|n| n >= 1.0)
    })
    .await;
    let after_heartbeat = current_lsn(&s.db).await;
    eventually("the slot moved past the heartbeat", WAIT, || async {
        confirmed_flush(&s.db, "walcast").await.unwrap() >= after_heartbeat
    })
    .await;
}

#[tokio::test]
async fn idle_publication_keeps_retained_wal_small_under_unrelated_writes() {
    let s = stack().await;
    let _walcast = s.run();
    let port = s.env.metrics_port;
    eventually("ready", WAIT, || ready(port)).await;
    s.db.batch_execute("CREATE TABLE unrelated (v text)")
        .await
        .unwrap();
    let start = current_lsn(&s.db).await;
    for _ in 0..4 {
        s.db.batch_execute(
            "INSERT INTO unrelated SELECT repeat('x', 500) FROM generate_series(1, 20000)",
        )
        .await
        .unwrap();
    }
    let end = current_lsn(&s.db).await;
    let written = end - start;
    assert!(
        written > 32 * 1024 * 1024,
        "the load wrote {written} bytes of WAL"
    );
    eventually(
        "keepalives moved the slot past the unrelated writes",
        WAIT,
        || async { confirmed_flush(&s.db, "walcast").await.unwrap() >= end },
    )
    .await;
    eventually(
        "retained WAL back under 16 MiB",
        Duration::from_secs(60),
        || async {
            // A checkpoint logs the running transactions, which lets the slot's restart_lsn
            // move up to what walcast confirmed.
            s.db.batch_execute("CHECKPOINT").await.unwrap();
            metric(
                &scrape_metrics(port).await,
                "walcast_slot_retained_wal_bytes",
            )
            .is_some_and(|b| b < 16.0 * 1024.0 * 1024.0)
        },
    )
    .await;
}

#[tokio::test]
async fn status_prints_the_slot_and_each_checkpoint_as_a_table_and_as_json() {
    let s = stack().await;
    let _walcast = s.run();
    load_plays(&s.db, 5, 5).await;
    eventually("delivered", WAIT, || async { s.redis.total().await == 5 }).await;
    eventually("analytics checkpoint", WAIT, || async {
        let out = s.env.output(&["status", "--json"]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        out.status.success()
            && report["sinks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|sink| sink["checkpoint"].is_string())
    })
    .await;

    let out = s.env.output(&["status", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let slot = &report["slot"];
    assert_eq!(slot["name"], "walcast");
    assert_eq!(slot["exists"], true);
    assert_eq!(slot["active"], true);
    assert_eq!(slot["wal_status"], "reserved");
    assert!(slot["retained_wal_bytes"].is_u64());
    assert!(slot["lag_bytes"].is_u64());
    assert!(
        slot["safe_wal_size"].is_null(),
        "max_slot_wal_keep_size is unlimited"
    );
    let sinks: Vec<&str> = report["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sink| sink["sink"].as_str().unwrap())
        .collect();
    assert_eq!(sinks, ["redis", "postgres"]);

    let out = s.env.output(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    for line in [
        "wal_status           reserved",
        "retained_wal_bytes",
        "redis     checkpoint",
        "postgres  checkpoint",
    ] {
        assert!(table.contains(line), "{line:?} in:\n{table}");
    }
}

#[tokio::test]
async fn an_invalidated_slot_stops_walcast_with_the_way_out() {
    let s = stack().await;
    let mut walcast = s.run();
    let port = s.env.metrics_port;
    load_until_ready(&s, port, 1, 1).await;
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "SELECT pg_reload_conf()",
        "CREATE TABLE unrelated (v text)",
    ] {
        s.db.batch_execute(sql).await.unwrap();
    }

    // A stalled sink holds the slot while far more WAL than allowed is written.
    signal_pid(s.redis.pid(), libc::SIGSTOP);
    load_plays(&s.db, 1, 1).await;
    for _ in 0..3 {
        s.db.batch_execute(
            "INSERT INTO unrelated SELECT repeat('x', 500) FROM generate_series(1, 30000);
             SELECT pg_switch_wal();",
        )
        .await
        .unwrap();
    }
    s.db.batch_execute("CHECKPOINT").await.unwrap();
    let status = walcast.wait_exit(WAIT).await;
    signal_pid(s.redis.pid(), libc::SIGCONT);
    assert!(!status.success(), "walcast exits non-zero");
    let log = walcast.log();
    assert!(
        log.contains("was invalidated") && log.contains("walcast backfill"),
        "the error says what happened and how to recover:\n{log}"
    );

    // The next start says the same at once, and so does status.
    let out = s.env.output(&["run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("was invalidated"), "{stderr}");
    let out = s.env.output(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(1), "status exits 1 for a lost slot");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["slot"]["wal_status"], "lost");
}

/// `promtool check metrics` wants HELP for every metric, and `increase()` sees a counter's
/// first event only if the series existed at 0 before it.
#[tokio::test]
async fn every_metric_has_help_and_alerting_counters_start_at_zero() {
    let s = stack().await;
    let walcast = s.run();
    let port = s.env.metrics_port;
    eventually("ready", WAIT, || ready(port)).await;
    // The slot monitor's gauges appear with its first reading.
    let m = wait_for("the slot monitor's first reading", WAIT, || async {
        let m = scrape_metrics(port).await;
        metric(&m, "walcast_slot_retained_wal_bytes").map(|_| m)
    })
    .await;
    let families: Vec<&str> = m
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    assert!(families.len() >= 10, "{m}");
    for family in &families {
        assert!(
            m.contains(&format!("# HELP {family} ")),
            "no HELP for {family}:\n{m}"
        );
    }
    for series in [
        r#"walcast_dead_letters_total{reason="null_event_ts"}"#,
        r#"walcast_dead_letters_total{reason="invalid_value"}"#,
        r#"walcast_dead_letters_total{reason="webhook_rejected"}"#,
        r#"walcast_sink_batches_total{sink="redis",outcome="retry"}"#,
        r#"walcast_sink_batches_total{sink="postgres",outcome="error"}"#,
        "walcast_replication_reconnects_total",
        "walcast_content_missing_total",
    ] {
        assert_eq!(metric(&m, series), Some(0.0), "{series} at 0:\n{m}");
    }
    drop(walcast);
}

/// A sink that is down when walcast starts is waited for, with the same backoff as a
/// failed write: /readyz and the retry counter say so, and events flow once it is up.
#[tokio::test]
async fn a_sink_down_at_start_is_retried_until_it_answers() {
    let mut s = stack().await;
    let redis_port = s.redis.url().rsplit(':').next().unwrap().to_owned();
    s.redis.stop();
    let mut walcast = s.run();
    let port = s.env.metrics_port;
    let body = wait_for(
        "/readyz to name redis and retries counted",
        WAIT,
        || async {
            let (status, body) = try_http_get(port, "/readyz").await.ok()?;
            let m = scrape_metrics(port).await;
            let retries = metric(
                &m,
                r#"walcast_sink_batches_total{sink="redis",outcome="retry"}"#,
            )?;
            (status == 503 && body.contains("redis") && retries >= 2.0).then_some(body)
        },
    )
    .await;
    assert!(body.contains("sink redis is unreachable"), "{body}");
    assert!(walcast.is_running(), "log:\n{}", walcast.log());
    let log = walcast.log();
    assert!(
        log.contains(&format!("WALCAST_REDIS_URL (127.0.0.1:{redis_port})")),
        "the setting and host:port are named:\n{log}"
    );

    s.redis.restart().await;
    load_until_ready(&s, port, 5, 5).await;
}

/// A publication altered to leave `engagement_events` out streams nothing of it: walcast
/// turns not ready within seconds and names the fix, which (with a backfill of what was
/// committed meanwhile) leaves every sink exact. A dropped and recreated table stops it.
#[tokio::test]
async fn a_publication_that_loses_the_table_is_noticed_and_a_recreated_table_stops_walcast() {
    let s = stack().await;
    let mut walcast = s.run();
    let port = s.env.metrics_port;
    load_until_ready(&s, port, 3, 3).await;
    s.db.batch_execute("ALTER PUBLICATION walcast_pub DROP TABLE engagement_events")
        .await
        .unwrap();
    load_plays(&s.db, 3, 3).await;
    let body = wait_for(
        "/readyz to say the publication lost the table",
        WAIT,
        || async {
            let (status, body) = http_get(port, "/readyz").await;
            (status == 503).then_some(body)
        },
    )
    .await;
    assert!(
        body.contains("does not cover public.engagement_events")
            && body.contains("ALTER PUBLICATION walcast_pub ADD TABLE"),
        "{body}"
    );
    assert!(
        walcast.log().contains("does not cover"),
        "{}",
        walcast.log()
    );

    s.db.batch_execute("ALTER PUBLICATION walcast_pub ADD TABLE engagement_events")
        .await
        .unwrap();
    eventually("ready again", WAIT, || ready(port)).await;
    s.env.succeed(&["backfill", "--from-id", "4"]);
    load_plays(&s.db, 2, 2).await;
    eventually("every event in every sink", WAIT, || async {
        s.redis.total().await == 8
            && crate::support::count(&s.db, "analytics.enriched_events").await == 8
    })
    .await;
    let out = s.env.output(&["verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    s.db.batch_execute(
        "DROP TABLE engagement_events;
         CREATE TABLE engagement_events (id BIGSERIAL PRIMARY KEY, content_id UUID, user_id UUID,
             event_type TEXT, event_ts TIMESTAMPTZ NOT NULL, duration_ms INTEGER, device TEXT,
             raw_payload JSONB)",
    )
    .await
    .unwrap();
    let status = walcast.wait_exit(WAIT).await;
    assert!(!status.success());
    assert!(
        walcast.log().contains("engagement_events was dropped"),
        "{}",
        walcast.log()
    );
}

/// A hung analytics server (its walcast backend SIGSTOPped, connection open): the write
/// deadline turns /readyz not ready naming the sink, Redis keeps receiving, and after
/// SIGCONT every event is in both sinks exactly once.
#[tokio::test]
async fn a_hung_analytics_backend_is_noticed_within_the_write_deadline() {
    let mut s = stack().await;
    s.env.put("WALCAST_SINK_WRITE_TIMEOUT", "2s");
    let walcast = s.run();
    let port = s.env.metrics_port;
    load_plays(&s.db, 10, 10).await;
    eventually("10 events in both sinks, ready", WAIT, || async {
        s.redis.total().await == 10
            && crate::support::count(&s.db, "analytics.enriched_events").await == 10
            && ready(port).await
    })
    .await;
    let backend: i32 =
        s.db.query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&walcast::sink::postgres::APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0);
    signal_pid(backend as u32, libc::SIGSTOP);
    let hung = std::time::Instant::now();
    load_plays(&s.db, 10, 10).await;
    let body = wait_for("/readyz to name the hung sink", WAIT, || async {
        let (status, body) = http_get(port, "/readyz").await;
        (status == 503 && body.contains("postgres")).then_some(body)
    })
    .await;
    eprintln!(
        "hung analytics backend: /readyz 503 naming it {:?} after SIGSTOP (deadline 2 s)",
        hung.elapsed()
    );
    assert!(body.contains("sink postgres writes are failing"), "{body}");
    eventually("redis keeps receiving", WAIT, || async {
        s.redis.total().await == 20
    })
    .await;
    assert!(
        walcast.log().contains("WALCAST_SINK_WRITE_TIMEOUT"),
        "{}",
        walcast.log()
    );
    signal_pid(backend as u32, libc::SIGCONT);
    eventually("everything in analytics, ready", WAIT, || async {
        crate::support::count(&s.db, "analytics.enriched_events").await == 20 && ready(port).await
    })
    .await;
    let out = s.env.output(&["verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// SIGTERM while a sink hangs ends within the bound, acknowledging only what every sink
/// confirmed.
#[tokio::test]
async fn sigterm_while_redis_hangs_exits_within_the_bound() {
    let s = stack().await;
    let mut walcast = s.run();
    load_plays(&s.db, 10, 10).await;
    eventually("10 events delivered", WAIT, || async {
        s.redis.total().await == 10
    })
    .await;
    signal_pid(s.redis.pid(), libc::SIGSTOP);
    load_plays(&s.db, 10, 10).await;
    eventually("analytics has the new events", WAIT, || async {
        crate::support::count(&s.db, "analytics.enriched_events").await == 20
    })
    .await;
    let stopped = std::time::Instant::now();
    let status = walcast.terminate().await;
    let took = stopped.elapsed();
    eprintln!("SIGTERM with Redis hung: exited in {took:?}");
    signal_pid(s.redis.pid(), libc::SIGCONT);
    assert!(status.success(), "exit {status}:\n{}", walcast.log());
    assert!(
        took < Duration::from_secs(20),
        "took {took:?}:\n{}",
        walcast.log()
    );
    // Redis never confirmed the second transaction: the slot must not have passed it.
    let redis_checkpoint: String = redis::cmd("GET")
        .arg("walcast:checkpoint:redis")
        .query_async(&mut s.redis.conn().await)
        .await
        .unwrap();
    let redis_lsn = u64::from_str_radix(&redis_checkpoint[..16], 16).unwrap();
    let flushed = confirmed_flush(&s.db, "walcast").await.unwrap();
    let last_commit: i64 =
        s.db.query_one(
            "SELECT (max(commit_lsn) - '0/0')::bigint FROM analytics.enriched_events",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        flushed <= last_commit as u64 && flushed > redis_lsn,
        "slot {flushed:X} between redis's {redis_lsn:X} and the unconfirmed {last_commit:X}"
    );
    // The next start delivers the rest to Redis, once.
    let walcast = s.env.spawn_run();
    eventually("redis catches up", WAIT, || async {
        s.redis.total().await == 20
    })
    .await;
    drop(walcast);
}

/// A replication connection black-holed by the network (packets dropped, sockets open):
/// walcast notices the silence within three heartbeat intervals, reconnects through a
/// working route, and delivers everything.
// The proxy runs on the test's runtime, beside blocking `walcast setup` calls: two threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_replication_connection_is_noticed_and_replaced() {
    // The server's default wal_sender_timeout (60 s): the old session's walsender holds
    // the slot that long unless walcast ends it.
    let pg = crate::support::Postgres::start().await;
    let db = pg.create_source_db("app").await;
    db.batch_execute(&episode_sql()).await.unwrap();
    let redis = Redis::start().await;
    let proxy = crate::support::Proxy::start(pg.port).await;
    let mut env = crate::support::Env::new(&pg, "app", &redis);
    env.put(
        "WALCAST_SOURCE_URL",
        &format!("postgres://postgres@127.0.0.1:{}/app", proxy.port),
    );
    env.put("WALCAST_ANALYTICS_URL", &pg.url("app"));
    env.put("WALCAST_HEARTBEAT_INTERVAL", "1s");
    let s = Stack { pg, redis, db, env };
    let walcast = s.run();
    load_plays(&s.db, 5, 5).await;
    eventually("5 events delivered", WAIT, || async {
        s.redis.total().await == 5
    })
    .await;
    proxy.black_hole_open_connections();
    let cut = std::time::Instant::now();
    load_plays(&s.db, 5, 5).await;
    eventually("the rest delivered over a new connection", WAIT, || async {
        s.redis.total().await == 10
            && crate::support::count(&s.db, "analytics.enriched_events").await == 10
    })
    .await;
    let log = walcast.log();
    assert!(log.contains("nothing received from the server"), "{log}");
    assert!(
        log.contains("the lost session's walsender still held the slot; ended it"),
        "{log}"
    );
    assert!(log.contains("replication resumed"), "{log}");
    eprintln!("black hole noticed and healed in {:?}", cut.elapsed());
    let out = s.env.output(&["verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Peak resident memory of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kib * 1024
}

/// Rows of a megabyte while Redis hangs: what walcast buffers is bounded in bytes (the
/// replication client's few messages, the batches, the sinks' queues), not in rows, so
/// its memory does not grow with the backlog; after SIGCONT every row is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabyte_rows_behind_a_hung_sink_take_bounded_memory() {
    const ROWS: i64 = 500;
    let s = stack().await;
    let walcast = s.run();
    load_plays(&s.db, 1, 1).await;
    eventually("the first event delivered", WAIT, || async {
        s.redis.total().await == 1
    })
    .await;
    let before = peak_rss(walcast.pid());
    // Stored as is, so that the WAL holds every byte too.
    s.db.batch_execute(
        "ALTER TABLE engagement_events ALTER COLUMN raw_payload SET STORAGE EXTERNAL",
    )
    .await
    .unwrap();
    signal_pid(s.redis.pid(), libc::SIGSTOP);
    for _ in 0..ROWS / 10 {
        s.db.batch_execute(&format!(
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, device, raw_payload)
             SELECT '{EPISODE}', gen_random_uuid(), 'play', now(), 'ios',
                    jsonb_build_object('blob', repeat(md5(g::text), 32768))
             FROM generate_series(1, 10) g"
        ))
        .await
        .unwrap();
    }
    let end = current_lsn(&s.db).await;
    // Everything is committed; walcast reads until its buffers are full and then waits on
    // Redis: the analytics sink, fed by the same fan-out, stops short of the backlog.
    // (count seen last, how many polls in a row saw it)
    let seen = std::cell::Cell::new((-1, 0));
    let held = wait_for("the analytics sink to stop advancing", WAIT, || async {
        let now = crate::support::count(&s.db, "analytics.enriched_events").await;
        let (last, times) = seen.get();
        let times = if now == last { times + 1 } else { 0 };
        seen.set((now, times));
        tokio::time::sleep(Duration::from_millis(500)).await;
        (times >= 4).then_some(now)
    })
    .await;
    assert!(held < ROWS, "backpressure: analytics got {held} of {ROWS}");
    let stalled = peak_rss(walcast.pid());
    signal_pid(s.redis.pid(), libc::SIGCONT);
    eventually(
        "every row in both sinks",
        Duration::from_secs(120),
        || async {
            s.redis.total().await == ROWS + 1
                && crate::support::count(&s.db, "analytics.enriched_events").await == ROWS + 1
        },
    )
    .await;
    eventually("the slot past the backlog", WAIT, || async {
        confirmed_flush(&s.db, "walcast").await.unwrap() >= end
    })
    .await;
    let after = peak_rss(walcast.pid());
    eprintln!(
        "{ROWS} rows of 1 MiB behind a hung Redis: peak RSS {} MiB before, {} MiB stalled, {} MiB through the catch-up",
        before >> 20,
        stalled >> 20,
        after >> 20
    );
    // The backlog is 500 MiB. What walcast buffers of it is bounded (32 messages, a batch
    // being built, two closed ones, two batches' bytes in each sink's queue: about 96 MiB
    // of rows); with the copies writes make and what the allocator keeps, well under it.
    assert!(
        after < 300 << 20,
        "peak RSS {} MiB for a {ROWS} MiB backlog",
        after >> 20
    );
}
