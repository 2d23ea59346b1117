//! `walcast backfill` end to end: the initial snapshot under concurrent writes followed by
//! streaming, reprocessing a range twice while streaming, and resuming after a SIGKILL.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use crate::support::{Dump, Redis, Stack, count, eventually, redis_dump, wait_for};

const WAIT: Duration = Duration::from_secs(60);
const EPISODE: &str = "00000000-0000-0000-0000-000000000001";
const VIDEO: &str = "00000000-0000-0000-0000-000000000002";

async fn stack() -> Stack {
    Stack::start(
        Redis::start().await,
        &format!(
            "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES
               ('{EPISODE}', 'episode', 'An episode', 'podcast', 300, now()),
               ('{VIDEO}', 'video', 'A video', 'video', 600, now())"
        ),
    )
    .await
}

/// `n` events spread over both contents, event types, devices and the last 6 hours, with
/// a few NULL durations and users, in one statement.
async fn preload(db: &tokio_postgres::Client, n: i64) {
    db.batch_execute(&format!(
        "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device)
         SELECT CASE WHEN g % 3 = 0 THEN '{VIDEO}'::uuid ELSE '{EPISODE}'::uuid END,
                CASE WHEN g % 11 = 0 THEN NULL ELSE md5((g % 500)::text)::uuid END,
                (ARRAY['play', 'pause', 'finish', 'click'])[1 + g % 4],
                now() - (g % 360) * interval '1 minute',
                CASE WHEN g % 7 = 0 THEN NULL ELSE (g % 600) * 1000 END,
                (ARRAY['ios', 'android', 'web'])[1 + g % 3]
         FROM generate_series(1, {n}) g"
    ))
    .await
    .unwrap();
}

/// Inserts small transactions on a connection of its own until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    inserted: Arc<AtomicI64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Writer {
    async fn start(s: &Stack) -> Writer {
        let mut writer = Writer {
            stop: Arc::default(),
            inserted: Arc::default(),
            task: None,
        };
        let (stop, inserted) = (Arc::clone(&writer.stop), Arc::clone(&writer.inserted));
        let db = s.pg.client("app").await;
        writer.task = Some(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                db.batch_execute(&format!(
                    "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device)
                     SELECT '{EPISODE}', gen_random_uuid(), 'play', now(), 1000, 'ios'
                     FROM generate_series(1, 20)"
                ))
                .await
                .unwrap();
                inserted.fetch_add(20, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
        writer
    }

    fn inserted(&self) -> i64 {
        self.inserted.load(Ordering::Relaxed)
    }

    /// Stops and waits for the insert in flight, so that nothing commits afterwards.
    async fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(task) = self.task.take() {
            task.await.expect("the writer task panicked");
        }
    }
}

/// Runs a walcast command to completion in a process of its own: exit status, output.
async fn walcast(s: &Stack, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = s.env.spawn(args);
    let status = child.wait_exit(WAIT).await;
    (status, child.log())
}

/// Waits until Redis and the analytics tables both hold `n` events.
async fn in_both_sinks(s: &Stack, n: i64) {
    eventually(&format!("{n} events in both sinks"), WAIT, || async {
        s.redis.total().await == n && count(&s.db, "analytics.enriched_events").await == n
    })
    .await;
}

/// Waits until both sinks hold as many events as the source; returns that number.
async fn wait_all_delivered(s: &Stack) -> i64 {
    wait_for("every source row in both sinks", WAIT, || async {
        let expected = s.source_count().await;
        (count(&s.db, "analytics.enriched_events").await == expected
            && s.redis.total().await == expected)
            .then_some(expected)
    })
    .await
}

fn assert_verified(s: &Stack) {
    let out = s.env.output(&["verify"]);
    assert!(
        out.status.success(),
        "walcast verify:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_snapshot_under_concurrent_writes_then_streaming_delivers_every_row_once() {
    let s = stack().await;
    preload(&s.db, 200_000).await;
    let mut writer = Writer::start(&s).await;
    eventually("the writer is writing", WAIT, || async {
        writer.inserted() > 0
    })
    .await;

    let (status, log) = walcast(&s, &["backfill"]).await;
    assert!(status.success(), "backfill failed:\n{log}");
    eprintln!(
        "{}",
        log.lines()
            .filter(|l| l.starts_with("backfill "))
            .collect::<String>()
    );
    assert!(log.contains("created the slot with a snapshot"), "{log}");
    let copied = count(&s.db, "analytics.enriched_events").await;
    assert!(copied >= 200_000, "the snapshot held the preload: {copied}");

    let walcast = s.env.spawn_run();
    let at_start = writer.inserted();
    eventually("the writer went on while streaming", WAIT, || async {
        writer.inserted() >= at_start + 2_000
    })
    .await;
    writer.stop().await;
    let total = wait_all_delivered(&s).await;
    assert_eq!(total, 200_000 + writer.inserted());
    assert_verified(&s);
    assert!(walcast.log().contains("replication started"));
}

/// Everything a reader can see in both sinks, as text.
async fn sink_state(s: &Stack) -> String {
    let mut state = String::new();
    for table in [
        "content_engagement_metrics",
        "content_engagement_daily",
        "content_type_analysis",
        "device_analysis",
    ] {
        let row = s
            .db
            .query_one(
                &format!("SELECT coalesce(string_agg(t::text, ';' ORDER BY t::text), '') FROM analytics.{table} t"),
                &[],
            )
            .await
            .unwrap();
        state.push_str(&format!("{table}: {}\n", row.get::<_, String>(0)));
    }
    state.push_str(&format!(
        "facts: {} dead letters: {}\n",
        count(&s.db, "analytics.enriched_events").await,
        count(&s.db, "analytics.dead_letters").await
    ));
    // A minute bucket expires 2 h after its minute, and the rows' event times reach back
    // 6 h: one of them may expire between two snapshots. Keys that expire before a fixed
    // moment (the first snapshot's time plus an hour) are left out of every snapshot, so
    // each key is in all of them or in none.
    static CUTOFF_MS: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let cutoff_ms = *CUTOFF_MS.get_or_init(|| chrono::Utc::now().timestamp_millis() + 3_600_000);
    for line in redis_dump(&s.redis, Dump::Readable { cutoff_ms }).await {
        state.push_str(&line);
        state.push('\n');
    }
    state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprocessing_a_range_twice_while_streaming_changes_nothing_more_than_once() {
    let s = stack().await;
    let _walcast = s.run();
    preload(&s.db, 3_000).await;
    wait_all_delivered(&s).await;

    // Reprocess by id and by event time while a writer keeps the stream busy.
    let mut writer = Writer::start(&s).await;
    let since = "2000-01-01T00:00:00Z";
    let until = "2100-01-01T00:00:00Z";
    let by_id = ["backfill", "--from-id", "500", "--to-id", "2500"];
    let by_time = ["backfill", "--since", since, "--until", until];
    for args in [&by_id[..], &by_time[..]] {
        let (status, log) = walcast(&s, args).await;
        assert!(status.success(), "{log}");
    }
    writer.stop().await;
    let total = wait_all_delivered(&s).await;
    assert_eq!(total, 3_000 + writer.inserted());
    let once = sink_state(&s).await;

    for args in [&by_id[..], &by_time[..]] {
        let (status, log) = walcast(&s, args).await;
        assert!(status.success(), "{log}");
        assert!(
            !log.contains("resumed"),
            "a finished backfill starts over: {log}"
        );
    }
    let twice = sink_state(&s).await;
    assert_eq!(once, twice, "a second reprocessing changed sink state");
    assert_eq!(s.redis.total().await, total);
    assert_verified(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_backfill_resumes_and_doubles_nothing() {
    let s = stack().await;
    preload(&s.db, 200_000).await;
    let mut first = s.env.spawn(&["backfill"]);
    eventually("the backfill is under way", WAIT, || async {
        count(&s.db, "analytics.enriched_events").await >= 40_000
    })
    .await;
    first.kill9();
    let at_kill = count(&s.db, "analytics.enriched_events").await;
    assert!(at_kill < 200_000, "killed before the end ({at_kill})");
    let cursor: i64 =
        s.db.query_one(
            "SELECT last_id FROM analytics.walcast_backfill WHERE job = 'all'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(cursor > 0);

    let (status, log) = walcast(&s, &["backfill"]).await;
    assert!(status.success(), "{log}");
    assert!(log.contains("resumed after id"), "{log}");
    assert_eq!(count(&s.db, "analytics.enriched_events").await, 200_000);
    assert_eq!(s.redis.total().await, 200_000);
    assert_eq!(
        count(&s.db, "analytics.walcast_backfill").await,
        0,
        "cursor removed"
    );
    let mut conn = s.redis.conn().await;
    let left: Option<String> = redis::cmd("GET")
        .arg("walcast:backfill:all")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, None);
    assert_verified(&s);

    // The slot the first run created streams what comes next.
    let _walcast = s.env.spawn_run();
    preload(&s.db, 10).await;
    assert_eq!(wait_all_delivered(&s).await, 200_010);
}

/// A slot dropped while walcast was stopped (`walcast teardown`, an operator, a failover
/// that did not carry it): `walcast run` refuses to create a new one over sinks that hold
/// events, names the recovery, and the recovery (an initial-snapshot backfill, then `run`)
/// leaves every sink exact.
#[tokio::test]
async fn a_slot_dropped_while_stopped_is_refused_and_backfill_recovers_every_event() {
    let s = stack().await;
    let mut walcast = s.run();
    preload(&s.db, 10).await;
    in_both_sinks(&s, 10).await;
    assert!(walcast.terminate().await.success(), "{}", walcast.log());
    preload(&s.db, 10).await;
    s.db.batch_execute("SELECT pg_drop_replication_slot('walcast')")
        .await
        .unwrap();

    let mut walcast = s.env.spawn_run();
    let status = walcast.wait_exit(WAIT).await;
    let log = walcast.log();
    assert!(!status.success(), "walcast run must refuse:\n{log}");
    assert!(
        log.contains("replication slot walcast does not exist")
            && log.contains("redis up to")
            && log.contains("walcast backfill"),
        "names the slot, what the sinks hold and the recovery:\n{log}"
    );
    let slots = count(&s.db, "pg_replication_slots").await;
    assert_eq!(slots, 0, "no slot was created silently");

    s.env.succeed(&["backfill"]);
    let walcast = s.env.spawn_run();
    preload(&s.db, 10).await;
    in_both_sinks(&s, 30).await;
    assert_verified(&s);
    drop(walcast);
}

/// A partitioned `engagement_events`: walcast's publication publishes via the partition
/// root, so every event arrives under the table's name; `walcast backfill` and a second
/// `walcast run` work on it. A publication made beforehand without the setting is refused
/// with the fix.
#[tokio::test]
async fn a_partitioned_events_table_is_streamed_backfilled_and_verified() {
    let s = Stack::start(
        Redis::start().await,
        &format!(
            "DROP TABLE engagement_events;
             CREATE TABLE engagement_events (
                 id BIGSERIAL, content_id UUID REFERENCES content(id), user_id UUID,
                 event_type TEXT, event_ts TIMESTAMPTZ NOT NULL, duration_ms INTEGER,
                 device TEXT, raw_payload JSONB, PRIMARY KEY (id, event_ts)
             ) PARTITION BY RANGE (event_ts);
             CREATE TABLE engagement_events_old PARTITION OF engagement_events
                 FOR VALUES FROM (MINVALUE) TO ('2026-01-01');
             CREATE TABLE engagement_events_new PARTITION OF engagement_events
                 FOR VALUES FROM ('2026-01-01') TO (MAXVALUE);
             INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)
             VALUES ('{EPISODE}', 'episode', 'An episode', 'podcast', 300, now());
             CREATE PUBLICATION other_pub FOR TABLE content, engagement_events;"
        ),
    )
    .await;
    let insert = |when: &str| {
        format!(
            "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms)
             SELECT '{EPISODE}', 'play', {when}, 1000 FROM generate_series(1, 5)"
        )
    };
    // Rows in both partitions before walcast first runs: the initial snapshot.
    s.db.batch_execute(&insert("now()")).await.unwrap();
    s.db.batch_execute(&insert("'2025-06-01'")).await.unwrap();

    let refused = s
        .env
        .clone()
        .set("WALCAST_PUBLICATION", "other_pub")
        .output(&["setup"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains("publish_via_partition_root = true"),
        "names the fix: {err}"
    );

    s.env.succeed(&["backfill"]);
    let mut walcast = s.env.spawn_run();
    s.db.batch_execute(&insert("now()")).await.unwrap();
    s.db.batch_execute(&insert("'2025-06-01'")).await.unwrap();
    in_both_sinks(&s, 20).await;
    // A second start on the same publication.
    assert!(walcast.terminate().await.success(), "{}", walcast.log());
    let walcast = s.env.spawn_run();
    s.db.batch_execute(&insert("now()")).await.unwrap();
    in_both_sinks(&s, 25).await;
    assert_verified(&s);
    drop(walcast);
}

/// `walcast verify` after a backfill that dead-lettered rows, and after a delivered event
/// was deleted at the source: consistent, with both counted for what they are.
#[tokio::test]
async fn verify_counts_backfill_dead_letters_and_rows_deleted_at_the_source() {
    let s = stack().await;
    s.db.batch_execute(&format!(
        "ALTER TABLE engagement_events ALTER COLUMN event_ts DROP NOT NULL;
         INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms)
         SELECT '{EPISODE}', 'play', CASE WHEN g <= 2 THEN NULL ELSE now() END, 1000
         FROM generate_series(1, 10) g"
    ))
    .await
    .unwrap();
    s.env.succeed(&["backfill"]);
    let walcast = s.env.spawn_run();
    s.db.batch_execute(&format!(
        "INSERT INTO engagement_events (content_id, event_type, event_ts) VALUES ('{EPISODE}', 'click', now())"
    ))
    .await
    .unwrap();
    in_both_sinks(&s, 9).await;
    s.db.batch_execute("DELETE FROM engagement_events WHERE id = 5")
        .await
        .unwrap();
    let out = s.env.output(&["verify"]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |label: &str| {
        report
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label} in {report}"))
            .to_owned()
    };
    assert!(line("dead-lettered").ends_with(" 2"), "{report}");
    assert!(line("deleted at source").contains("1 [5]"), "{report}");
    assert!(line("missing").contains(" 0 "), "{report}");
    drop(walcast);
}

/// The source dumped and restored into a new cluster (another system identifier, WAL at
/// other positions) with the same sinks: walcast refuses to compare positions of two
/// histories, and the start-over it names (checkpoints deleted, an initial-snapshot
/// backfill, run) leaves every sink exact, the restored rows counted once.
#[tokio::test]
async fn a_source_restored_into_a_new_cluster_is_refused_and_the_start_over_is_exact() {
    let s = stack().await;
    let mut walcast = s.run();
    preload(&s.db, 10).await;
    in_both_sinks(&s, 10).await;
    assert!(walcast.terminate().await.success(), "{}", walcast.log());

    // "pg_dump | psql" into a new cluster: the same rows, ids and sequence.
    let restored = crate::support::Postgres::start_new_cluster().await;
    let db2 = restored.create_source_db("app").await;
    db2.batch_execute(&format!(
        "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES
           ('{EPISODE}', 'episode', 'An episode', 'podcast', 300, now()),
           ('{VIDEO}', 'video', 'A video', 'video', 600, now())"
    ))
    .await
    .unwrap();
    for row in
        s.db.query(
            "SELECT id, content_id::text, event_type, event_ts::text, duration_ms, device
             FROM engagement_events ORDER BY id",
            &[],
        )
        .await
        .unwrap()
    {
        let (id, content, kind, ts, duration, device): (
            i64,
            Option<String>,
            Option<String>,
            String,
            Option<i32>,
            Option<String>,
        ) = (
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
            row.get(5),
        );
        db2.execute(
            "INSERT INTO engagement_events (id, content_id, event_type, event_ts, duration_ms, device)
             VALUES ($1, $2::text::uuid, $3, $4::text::timestamptz, $5, $6)",
            &[&id, &content, &kind, &ts, &duration, &device],
        )
        .await
        .unwrap();
    }
    db2.batch_execute(
        "SELECT setval('engagement_events_id_seq', (SELECT max(id) FROM engagement_events))",
    )
    .await
    .unwrap();
    preload(&db2, 5).await;

    let analytics_url = s.pg.url("app");
    let env = s
        .env
        .clone()
        .set("WALCAST_SOURCE_URL", &restored.url("app"))
        .set("WALCAST_ANALYTICS_URL", &analytics_url);
    let mut refused = env.spawn_run();
    assert!(!refused.wait_exit(WAIT).await.success());
    let log = refused.log();
    assert!(
        log.contains("another WAL history")
            && log.contains("DELETE FROM analytics.walcast_checkpoint"),
        "names what happened and the start-over:\n{log}"
    );
    assert_eq!(s.redis.total().await, 10, "nothing was written");

    s.db.batch_execute("DELETE FROM analytics.walcast_checkpoint")
        .await
        .unwrap();
    redis::cmd("DEL")
        .arg("walcast:checkpoint:redis")
        .query_async::<()>(&mut s.redis.conn().await)
        .await
        .unwrap();
    env.succeed(&["backfill"]);
    let walcast = env.spawn_run();
    preload(&db2, 2).await;
    in_both_sinks(&s, 17).await;
    let out = env.output(&["verify"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(walcast);
}

/// A Redis that came back empty while walcast was stopped (no persistence: a cache), and a
/// sink left out of WALCAST_SINKS for a run and added back: each is found behind the slot
/// at start and rebuilt from the table before streaming; every sink ends exact.
#[tokio::test]
async fn a_sink_that_went_back_in_time_is_rebuilt_from_the_table_at_start() {
    let mut s = stack().await;
    let mut walcast = s.run();
    preload(&s.db, 10).await;
    in_both_sinks(&s, 10).await;
    assert!(walcast.terminate().await.success(), "{}", walcast.log());
    s.redis.restart().await; // not persistent: empty
    preload(&s.db, 5).await;
    let mut walcast = s.env.spawn_run();
    in_both_sinks(&s, 15).await;
    let log = walcast.log();
    assert!(log.contains("rebuilding it from the table"), "{log}");
    assert!(log.contains("sinks rebuilt from the table"), "{log}");
    assert_verified(&s);

    // Redis only for a while: the analytics sink misses those events.
    assert!(walcast.terminate().await.success(), "{}", walcast.log());
    let redis_only = s.env.clone().set("WALCAST_SINKS", "redis");
    let mut walcast = redis_only.spawn_run();
    preload(&s.db, 4).await;
    eventually("redis has them", WAIT, || async {
        s.redis.total().await == 19
    })
    .await;
    assert!(walcast.terminate().await.success(), "{}", walcast.log());
    let walcast = s.env.spawn_run();
    preload(&s.db, 1).await;
    in_both_sinks(&s, 20).await;
    assert_verified(&s);
    // A start with every sink in step rebuilds nothing.
    drop(walcast);
    let mut again = s.env.spawn_run();
    preload(&s.db, 1).await;
    eventually("streamed", WAIT, || async { s.redis.total().await == 21 }).await;
    assert!(!again.log().contains("rebuilding"), "{}", again.log());
    assert!(again.terminate().await.success());
}

/// Redis emptied under a running walcast (FLUSHALL, or a restart without persistence):
/// the next write notices its checkpoint went back, walcast stops and says so, and the next
/// start rebuilds Redis from the table.
#[tokio::test]
async fn redis_losing_its_data_under_a_running_walcast_stops_it_and_the_restart_rebuilds() {
    let s = stack().await;
    let mut walcast = s.run();
    preload(&s.db, 10).await;
    in_both_sinks(&s, 10).await;
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut s.redis.conn().await)
        .await
        .unwrap();
    preload(&s.db, 5).await;
    let status = walcast.wait_exit(WAIT).await;
    let log = walcast.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("Redis lost writes walcast had confirmed"),
        "{log}"
    );
    let walcast = s.env.spawn_run();
    in_both_sinks(&s, 15).await;
    assert_verified(&s);
    drop(walcast);
}
