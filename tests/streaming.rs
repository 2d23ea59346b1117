//! End-to-end streaming into Redis against real PostgreSQL and Redis servers.

use std::time::Duration;

use crate::support::{
    Redis, Stack, Walcast, confirmed_flush, current_lsn, eventually, poll_until, scrape_metrics,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const EPISODE: &str = "00000000-0000-0000-0000-000000000001";
const ZERO_LENGTH: &str = "00000000-0000-0000-0000-000000000002";
const NO_LENGTH: &str = "00000000-0000-0000-0000-000000000003";
const USER: &str = "10000000-0000-0000-0000-000000000001";

async fn stack() -> Stack {
    let content = format!(
        "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES
           ('{EPISODE}', 'episode', 'An episode', 'podcast', 300, now()),
           ('{ZERO_LENGTH}', 'zero', 'Zero length', 'video', 0, now()),
           ('{NO_LENGTH}', 'nolen', 'No length', 'newsletter', NULL, now())"
    );
    Stack::start(Redis::start().await, &content).await
}

/// What these tests do with a stack (a trait, so that this module can be compiled twice:
/// once on each PostgreSQL).
trait Events {
    async fn insert(&self, content: Option<&str>, duration_ms: Option<i32>) -> i64;
    async fn wait_event(&self, id: i64, walcast: &Walcast) -> Value;
}

impl Events for Stack {
    /// Inserts one event and returns its id.
    async fn insert(&self, content: Option<&str>, duration_ms: Option<i32>) -> i64 {
        self.db
            .query_one(
                "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
                 VALUES ($1::text::uuid, $2::text::uuid, 'play', now(), $3, 'ios', '{\"k\": [1, 2]}') RETURNING id",
                &[&content, &USER, &duration_ms],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn wait_event(&self, id: i64, walcast: &Walcast) -> Value {
        match poll_until(WAIT, || self.redis.event(id)).await {
            Some(event) => event,
            None => panic!(
                "event:{id} not in redis after {WAIT:?}; walcast log:\n{}",
                walcast.log()
            ),
        }
    }
}

/// The keys of a JSON object as written, duplicates included (`serde_json::Value` would
/// keep only the last of two equal keys).
fn top_level_keys(json: &str) -> Vec<String> {
    struct Keys;
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut keys = Vec::new();
            while let Some((key, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                keys.push(key);
            }
            Ok(keys)
        }
    }
    let mut de = serde_json::Deserializer::from_str(json);
    serde::Deserializer::deserialize_map(&mut de, Keys).unwrap()
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

#[tokio::test]
async fn enrichment_golden_case_and_null_zero_rules() {
    let s = stack().await;
    let walcast = s.run();
    // Drop the FK so an unknown content id can exist (a user's copy without it).
    s.db.batch_execute(
        "ALTER TABLE engagement_events DROP CONSTRAINT engagement_events_content_id_fkey",
    )
    .await
    .unwrap();

    let golden = s.insert(Some(EPISODE), Some(7000)).await;
    let null_duration = s.insert(Some(EPISODE), None).await;
    let zero_duration = s.insert(Some(EPISODE), Some(0)).await;
    let zero_length = s.insert(Some(ZERO_LENGTH), Some(5000)).await;
    let null_length = s.insert(Some(NO_LENGTH), Some(5000)).await;
    let half_up = s.insert(Some(EPISODE), Some(1005)).await;
    let no_content = s.insert(None, Some(1000)).await;
    let unknown = s
        .insert(Some("99999999-9999-9999-9999-999999999999"), Some(1000))
        .await;

    let e = s.wait_event(golden, &walcast).await;
    assert_eq!(num(&e["engagement_seconds"]), Some(7.0));
    assert_eq!(num(&e["engagement_pct"]), Some(0.02));
    assert_eq!(e["content_type"], "podcast");
    assert_eq!(e["length_seconds"], 300);
    assert_eq!(e["title"], "An episode");
    assert_eq!(e["slug"], "episode");
    assert_eq!(e["content_missing"], false);
    assert_eq!(e["user_id"], USER);
    assert_eq!(e["device"], "ios");
    assert_eq!(e["event_type"], "play");
    assert_eq!(e["raw_payload"], serde_json::json!({"k": [1, 2]}));
    assert!(e["commit_lsn"].as_str().unwrap().contains('/'));
    assert!(e["commit_ts"].as_str().unwrap().ends_with('Z'));

    let e = s.wait_event(null_duration, &walcast).await;
    assert!(e["engagement_seconds"].is_null() && e["engagement_pct"].is_null());
    let e = s.wait_event(zero_duration, &walcast).await;
    assert_eq!(
        (num(&e["engagement_seconds"]), num(&e["engagement_pct"])),
        (Some(0.0), Some(0.0))
    );
    let e = s.wait_event(zero_length, &walcast).await;
    assert_eq!(num(&e["engagement_seconds"]), Some(5.0));
    assert!(e["engagement_pct"].is_null(), "length 0 gives NULL pct");
    let e = s.wait_event(null_length, &walcast).await;
    assert!(e["engagement_pct"].is_null(), "NULL length gives NULL pct");
    let e = s.wait_event(half_up, &walcast).await;
    assert_eq!(
        num(&e["engagement_seconds"]),
        Some(1.01),
        "half away from zero"
    );
    for id in [no_content, unknown] {
        let e = s.wait_event(id, &walcast).await;
        assert_eq!(e["content_missing"], true);
        assert!(
            e["title"].is_null() && e["content_type"].is_null() && e["length_seconds"].is_null()
        );
        assert_eq!(num(&e["engagement_seconds"]), Some(1.0));
    }

    // Every derived value equals PostgreSQL's own round(numeric, 2).
    let rows =
        s.db.query(
            "SELECT e.id, round(e.duration_ms::numeric / 1000, 2)::float8,
                    round(e.duration_ms::numeric / 1000 / NULLIF(c.length_seconds, 0), 2)::float8
             FROM engagement_events e LEFT JOIN content c ON c.id = e.content_id",
            &[],
        )
        .await
        .unwrap();
    for row in rows {
        let e = s.wait_event(row.get(0), &walcast).await;
        assert_eq!(num(&e["engagement_seconds"]), row.get::<_, Option<f64>>(1));
        assert_eq!(num(&e["engagement_pct"]), row.get::<_, Option<f64>>(2));
    }
}

async fn redis_stream_ids(redis: &Redis, key: &str) -> Vec<i64> {
    let mut conn = redis.conn().await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    entries
        .into_iter()
        .map(|(_, fields)| {
            let json: Value = serde_json::from_str(&fields[0].1).unwrap();
            json["id"].as_i64().unwrap()
        })
        .collect()
}

#[tokio::test]
async fn content_changes_apply_in_commit_order() {
    let s = stack().await;
    let walcast = s.run();
    let fresh = "00000000-0000-0000-0000-0000000000f1";
    let big_title: String = (0..400).map(|i| format!("{i:08x}")).collect(); // TOASTed

    // Content inserted and used in one transaction.
    let same_tx: i64 = {
        s.db.batch_execute(&format!(
            "BEGIN;
             INSERT INTO content VALUES ('{fresh}', 'fresh', '{big_title}', 'video', 100, now());
             INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms) VALUES ('{fresh}', 'play', now(), 50000);
             COMMIT;"
        ))
        .await
        .unwrap();
        s.db.query_one("SELECT max(id) FROM engagement_events", &[])
            .await
            .unwrap()
            .get(0)
    };
    let e = s.wait_event(same_tx, &walcast).await;
    assert_eq!(e["content_missing"], false);
    assert_eq!(num(&e["engagement_pct"]), Some(0.5));

    // An update is seen only by events that commit after it; the TOASTed title the
    // update leaves alone keeps its value.
    let before = s.insert(Some(fresh), Some(10000)).await;
    s.db.batch_execute(&format!(
        "UPDATE content SET length_seconds = 200 WHERE id = '{fresh}'"
    ))
    .await
    .unwrap();
    let after = s.insert(Some(fresh), Some(10000)).await;
    let e = s.wait_event(before, &walcast).await;
    assert_eq!(
        (e["length_seconds"].as_i64(), num(&e["engagement_pct"])),
        (Some(100), Some(0.1))
    );
    let e = s.wait_event(after, &walcast).await;
    assert_eq!(
        (e["length_seconds"].as_i64(), num(&e["engagement_pct"])),
        (Some(200), Some(0.05))
    );
    assert_eq!(
        e["title"].as_str(),
        Some(big_title.as_str()),
        "unchanged TOAST value kept"
    );
    assert_eq!(e["slug"], "fresh");

    // A deleted content row no longer enriches anything.
    s.db.batch_execute(&format!(
        "ALTER TABLE engagement_events DROP CONSTRAINT engagement_events_content_id_fkey;
         DELETE FROM content WHERE id = '{fresh}'"
    ))
    .await
    .unwrap();
    let gone = s.insert(Some(fresh), Some(10000)).await;
    assert_eq!(s.wait_event(gone, &walcast).await["content_missing"], true);
}

#[tokio::test]
async fn transactions_are_delivered_in_commit_order_not_id_order() {
    let s = stack().await;
    let walcast = s.run();
    let early = s.pg.client("app").await;
    early.batch_execute("BEGIN").await.unwrap();
    async fn click(db: &tokio_postgres::Client) -> i64 {
        db.query_one(
            "INSERT INTO engagement_events (event_type, event_ts) VALUES ('click', now()) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    }
    let first_id = click(&early).await;
    // A later id commits first.
    let second_id = click(&s.db).await;
    s.wait_event(second_id, &walcast).await;
    early.batch_execute("COMMIT").await.unwrap();
    s.wait_event(first_id, &walcast).await;
    assert!(first_id < second_id);
    assert_eq!(
        redis_stream_ids(&s.redis, "events:click").await,
        vec![second_id, first_id]
    );
}

#[tokio::test]
async fn large_transaction_streams_through_in_bounded_batches_and_moves_the_slot() {
    let s = stack().await;
    let walcast = s.run();
    let before = confirmed_flush(&s.db, "walcast").await.unwrap();
    s.db.batch_execute(&format!(
        "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device)
         SELECT '{EPISODE}', gen_random_uuid(), (ARRAY['play','pause','finish','click'])[1 + i % 4],
                now() - (i % 600) * interval '1 second', (i % 9000) * 10, 'web'
         FROM generate_series(1, 100000) i"
    ))
    .await
    .unwrap();
    let committed = current_lsn(&s.db).await;
    eventually(
        "100000 events counted in stats:events",
        Duration::from_secs(120),
        || async { s.redis.total().await == 100_000 },
    )
    .await;
    // The slot moves past the transaction only after Redis applied it.
    eventually("confirmed_flush_lsn past the commit", WAIT, || async {
        confirmed_flush(&s.db, "walcast").await.unwrap() >= committed
    })
    .await;
    assert!(committed > before);
    // Bounded memory: the 100k-row transaction was never held whole. Peak RSS stays far
    // below what holding it would take (every event is ~600 bytes of JSON).
    let status = std::fs::read_to_string(format!("/proc/{}/status", walcast.pid())).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(peak_kb < 200 * 1024, "peak RSS {peak_kb} kB");
    assert_eq!(s.redis.total().await, s.source_count().await);
}

/// Inserts `n` events in transactions of `per_tx` rows.
async fn load(db: &tokio_postgres::Client, n: i64, per_tx: i64) {
    let mut done = 0;
    while done < n {
        let rows = per_tx.min(n - done);
        db.batch_execute(&format!(
            "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms, device)
             SELECT '{EPISODE}', 'play', now(), i, 'android' FROM generate_series(1, {rows}) i"
        ))
        .await
        .unwrap();
        done += rows;
    }
}

#[tokio::test]
async fn kill_9_mid_stream_then_restart_loses_and_doubles_nothing() {
    let s = stack().await;
    let mut walcast = s.run();
    let writer = {
        let db = s.pg.client("app").await;
        tokio::spawn(async move { load(&db, 60_000, 200).await })
    };
    // Kill it three times while the load is being applied, at different depths.
    for target in [5_000, 20_000, 40_000] {
        eventually(&format!("{target} events applied"), WAIT, || async {
            s.redis.total().await >= target
        })
        .await;
        walcast.kill9();
        walcast = s.env.spawn_run();
    }
    writer.await.unwrap();
    let expected = s.source_count().await;
    assert_eq!(expected, 60_000);
    eventually(
        "every source event applied",
        Duration::from_secs(60),
        || async { s.redis.total().await >= expected },
    )
    .await;
    let committed = current_lsn(&s.db).await;
    eventually("slot acknowledged everything", WAIT, || async {
        confirmed_flush(&s.db, "walcast").await.unwrap() >= committed
    })
    .await;
    assert_eq!(
        s.redis.total().await,
        expected,
        "nothing doubled; log:\n{}",
        walcast.log()
    );
    // One more restart replays nothing.
    walcast.kill9();
    let walcast = s.env.spawn_run();
    let marker = s.insert(Some(EPISODE), Some(1)).await;
    s.wait_event(marker, &walcast).await;
    assert_eq!(s.redis.total().await, expected + 1);
}

#[tokio::test]
async fn schema_change_and_bad_rows_do_not_stop_the_stream() {
    let s = stack().await;
    let walcast = s.run();
    let first = s.insert(Some(EPISODE), Some(1000)).await;
    s.wait_event(first, &walcast).await;

    s.db.batch_execute("ALTER TABLE engagement_events ADD COLUMN campaign text")
        .await
        .unwrap();
    let with_column: i64 = s
        .db
        .query_one(
            "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms, campaign)
             VALUES ($1::text::uuid, 'finish', now(), 2000, 'autumn') RETURNING id",
            &[&EPISODE],
        )
        .await
        .unwrap()
        .get(0);
    let e = s.wait_event(with_column, &walcast).await;
    assert_eq!(e["campaign"], "autumn");
    assert_eq!(num(&e["engagement_seconds"]), Some(2.0));

    // Added columns named like walcast's own keys: every key appears once, and those
    // columns travel under `extra`.
    s.db.batch_execute(
        "ALTER TABLE engagement_events ADD COLUMN title text, ADD COLUMN commit_lsn text",
    )
    .await
    .unwrap();
    let colliding: i64 =
        s.db.query_one(
            "INSERT INTO engagement_events (content_id, event_type, event_ts, title, commit_lsn)
             VALUES ($1::text::uuid, 'play', now(), 'from the source', 'not an lsn') RETURNING id",
            &[&EPISODE],
        )
        .await
        .unwrap()
        .get(0);
    let e = s.wait_event(colliding, &walcast).await;
    assert_eq!(e["title"], "An episode", "the content's title: {e}");
    assert_eq!(e["extra"]["title"], "from the source", "{e}");
    assert_eq!(e["extra"]["commit_lsn"], "not an lsn", "{e}");
    let raw: String = redis::cmd("GET")
        .arg(format!("event:{colliding}"))
        .query_async(&mut s.redis.conn().await)
        .await
        .unwrap();
    let keys = top_level_keys(&raw);
    for key in ["title", "commit_lsn", "extra"] {
        assert_eq!(
            keys.iter().filter(|k| *k == key).count(),
            1,
            "{key} once in {raw}"
        );
    }

    // A user schema without NOT NULL lets a NULL event_ts in: rejected, counted, skipped.
    s.db.batch_execute(
        "ALTER TABLE engagement_events ALTER COLUMN event_ts DROP NOT NULL;
         INSERT INTO engagement_events (event_type, event_ts) VALUES ('play', NULL);",
    )
    .await
    .unwrap();
    let after_bad = s.insert(Some(EPISODE), Some(3000)).await;
    s.wait_event(after_bad, &walcast).await;
    assert_eq!(s.redis.total().await, 4);
    let metrics = scrape_metrics(s.env.metrics_port).await;
    assert!(
        metrics.contains("walcast_dead_letters_total{reason=\"null_event_ts\"} 1"),
        "metrics:\n{metrics}"
    );
    assert!(walcast.log().contains("row rejected"));
}

#[tokio::test]
async fn sigterm_finishes_the_batch_acknowledges_and_exits_0() {
    let s = stack().await;
    let mut walcast = s.run();
    let id = s.insert(Some(EPISODE), Some(1000)).await;
    let event = s.wait_event(id, &walcast).await;
    // The slot must pass the event's commit record (later WAL, such as the analytics
    // sink's own writes, is acknowledged by the next keepalive, which may come later).
    let commit: walcast::lsn::Lsn = event["commit_lsn"].as_str().unwrap().parse().unwrap();
    let status = walcast.terminate().await;
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        walcast.log()
    );
    let flushed = confirmed_flush(&s.db, "walcast").await.unwrap();
    assert!(
        flushed > commit.0,
        "slot at {flushed:X}, event committed at {commit}"
    );
}

#[tokio::test]
async fn top_prints_content_by_engagement_over_minute_buckets() {
    let s = stack().await;
    let walcast = s.run();
    s.db.batch_execute(&format!(
        "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms) VALUES
           ('{EPISODE}', 'play', now(), 60000),
           ('{EPISODE}', 'play', now() - interval '3 minutes', 30000),
           ('{NO_LENGTH}', 'play', now(), 50000),
           ('{ZERO_LENGTH}', 'play', now() - interval '1 day', 999000)"
    ))
    .await
    .unwrap();
    eventually("4 events applied", WAIT, || async {
        s.redis.total().await == 4
    })
    .await;
    let out = s.env.output(&["top", "--minutes", "10", "--limit", "10"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [format!("{EPISODE} 90.00"), format!("{NO_LENGTH} 50.00")],
        "a day-old event stays out of the window"
    );
    let out = s.env.output(&["top", "--minutes", "2", "--limit", "1"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [format!("{EPISODE} 60.00")]
    );
    drop(walcast);
}
