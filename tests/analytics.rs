//! Fan-out to Redis and the PostgreSQL analytics sink, end to end against real servers:
//! facts and aggregates, replays, crashes, a sink that goes away, dead letters.

use std::sync::Arc;
use std::time::Duration;

use crate::support::{
    Dump, Postgres, Redis, Stack, Walcast, confirmed_flush, count, current_lsn, eventually,
    redis_dump, scalar, scrape_metrics,
};
use chrono::{DateTime, Utc};
use rand::Rng;
use walcast::event::{BackfillMark, Batch, Content, EnrichedEvent, Feed, Hundredths};
use walcast::lsn::{Lsn, Position};
use walcast::sink::Sink;
use walcast::sink::postgres::PostgresSink;
use walcast::sink::redis::RedisSink;

const WAIT: Duration = Duration::from_secs(30);
const EPISODE: &str = "00000000-0000-0000-0000-000000000001";
const VIDEO: &str = "00000000-0000-0000-0000-000000000002";
const LETTER: &str = "00000000-0000-0000-0000-000000000003";
const UNKNOWN: &str = "00000000-0000-0000-0000-0000000000ff";
const ALICE: &str = "10000000-0000-0000-0000-00000000000a";
const BOB: &str = "10000000-0000-0000-0000-00000000000b";
const CAROL: &str = "10000000-0000-0000-0000-00000000000c";

/// PostgreSQL with the source schema and three content rows (a 300 s podcast, a video of
/// length 0, a newsletter of unknown length), without the foreign key so events may name
/// content that does not exist; and Redis.
async fn stack_with(redis: Redis) -> Stack {
    let content = format!(
        "ALTER TABLE engagement_events DROP CONSTRAINT engagement_events_content_id_fkey;
         INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES
           ('{EPISODE}', 'episode', 'An episode', 'podcast', 300, now()),
           ('{VIDEO}', 'video', 'A video', 'video', 0, now()),
           ('{LETTER}', 'letter', 'A letter', 'newsletter', NULL, now())"
    );
    Stack::start(redis, &content).await
}

async fn stack() -> Stack {
    stack_with(Redis::start().await).await
}

impl Stack {
    async fn analytics_count(&self) -> i64 {
        count(&self.db, "analytics.enriched_events").await
    }

    /// Waits until both sinks hold `n` events.
    async fn wait_delivered(&self, n: i64, walcast: &Walcast, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.analytics_count().await < n || self.redis.total().await < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{n} events not delivered within {timeout:?}: analytics {}, redis {}; log:\n{}",
                self.analytics_count().await,
                self.redis.total().await,
                walcast.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `walcast verify` must report consistent sinks.
    fn verify(&self) -> String {
        let out = self.env.output(&["verify"]);
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "walcast verify found differences:\n{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(report.contains("consistent"), "{report}");
        report
    }
}

/// Inserts `n` events in transactions of `per_tx` rows, varied the way real traffic is:
/// three known content items plus unknown and NULL content, 97 users and some anonymous,
/// every event type, three devices plus NULL, three days, NULL durations.
async fn load(db: &tokio_postgres::Client, n: i64, per_tx: i64) {
    let mut done = 0;
    while done < n {
        let (first, last) = (done + 1, (done + per_tx).min(n));
        db.batch_execute(&format!(
            "INSERT INTO engagement_events
                 (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
             SELECT
                 (CASE WHEN i % 50 = 0 THEN NULL
                       WHEN i % 37 = 0 THEN '{UNKNOWN}'
                       ELSE (ARRAY['{EPISODE}', '{VIDEO}', '{LETTER}'])[1 + i % 3] END)::uuid,
                 CASE WHEN i % 13 = 0 THEN NULL
                      ELSE ('20000000-0000-0000-0000-' || lpad((i % 97)::text, 12, '0'))::uuid END,
                 (ARRAY['play', 'pause', 'finish', 'click'])[1 + i % 4],
                 now() - (i % 3) * interval '1 day',
                 CASE WHEN i % 4 = 3 THEN NULL ELSE (i * 37) % 600000 END,
                 CASE WHEN i % 11 = 0 THEN NULL
                      ELSE (ARRAY['ios', 'android', 'web-chrome'])[1 + i % 3] END,
                 jsonb_build_object('seq', i)
             FROM generate_series({first}, {last}) AS i"
        ))
        .await
        .unwrap();
        done = last;
    }
}

#[tokio::test]
async fn facts_and_aggregates_match_the_enrichment_rules() {
    let s = stack().await;
    let walcast = s.run();
    s.db.batch_execute(&format!(
        "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device) VALUES
           ('{EPISODE}', '{ALICE}', 'play',   '2026-11-20 10:00:00+00', 7000, 'ios'),
           ('{EPISODE}', '{ALICE}', 'pause',  '2026-11-20 23:59:59+00', 1500, 'ios'),
           ('{EPISODE}', '{BOB}',   'finish', '2026-11-21 00:00:00+00', NULL, NULL),
           (NULL,        '{ALICE}', 'click',  '2026-11-21 09:00:00+00', NULL, 'web-safari'),
           ('{UNKNOWN}', '{CAROL}', 'play',   '2026-11-21 09:00:00+00', 2000, 'web-safari'),
           ('{VIDEO}',   '{BOB}',   'play',   '2026-11-21 09:30:00+00', 3000, 'android')"
    ))
    .await
    .unwrap();
    s.wait_delivered(6, &walcast, WAIT).await;

    let golden =
        s.db.query_one(
            "SELECT engagement_seconds::text, engagement_pct::text, title, slug, content_type,
                    length_seconds, content_missing, commit_lsn IS NOT NULL
             FROM analytics.enriched_events WHERE event_ts = '2026-11-20 10:00:00+00'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(golden.get::<_, String>(0), "7.00");
    assert_eq!(golden.get::<_, String>(1), "0.02");
    assert_eq!(golden.get::<_, String>(2), "An episode");
    assert_eq!(golden.get::<_, String>(3), "episode");
    assert_eq!(golden.get::<_, String>(4), "podcast");
    assert_eq!(golden.get::<_, i32>(5), 300);
    assert!(!golden.get::<_, bool>(6));
    assert!(golden.get::<_, bool>(7));
    let missing: Vec<bool> =
        s.db.query(
            "SELECT content_missing FROM analytics.enriched_events ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(missing, [false, false, false, true, true, false]);

    // (events, plays, pauses, finishes, clicks, distinct users, seconds, pct avg)
    let measures = "events, plays, pauses, finishes, clicks, distinct_users, \
                    engagement_seconds_total::text, round(engagement_pct_avg, 3)::text";
    let row = |sql: String| {
        let db = &s.db;
        async move {
            let r = db.query_one(&sql, &[]).await.unwrap();
            (
                (1..7).map(|i| r.get::<_, i64>(i - 1)).collect::<Vec<_>>(),
                r.get::<_, String>(6),
                r.get::<_, Option<String>>(7),
            )
        }
    };
    assert_eq!(
        row(format!(
            "SELECT {measures} FROM analytics.content_engagement_metrics WHERE content_id = '{EPISODE}'"
        ))
        .await,
        (vec![3, 1, 1, 1, 0, 2], "8.50".into(), Some("0.015".into()))
    );
    assert_eq!(
        row(format!(
            "SELECT {measures} FROM analytics.content_engagement_daily
             WHERE content_id = '{EPISODE}' AND day = '2026-11-20'"
        ))
        .await,
        (vec![2, 1, 1, 0, 0, 1], "8.50".into(), Some("0.015".into()))
    );
    // Unknown content is still counted under its id; NULL content only by type and device.
    assert_eq!(
        row(format!(
            "SELECT {measures} FROM analytics.content_engagement_metrics WHERE content_id = '{UNKNOWN}'"
        ))
        .await,
        (vec![1, 1, 0, 0, 0, 1], "2.00".into(), None)
    );
    assert_eq!(
        count(&s.db, "analytics.content_engagement_metrics").await,
        3,
        "episode, unknown, video"
    );
    assert_eq!(
        row(format!(
            "SELECT {measures} FROM analytics.content_type_analysis
             WHERE content_type IS NULL AND day = '2026-11-21'"
        ))
        .await,
        (vec![2, 1, 0, 0, 1, 2], "2.00".into(), None)
    );
    assert_eq!(
        row(format!(
            "SELECT {measures} FROM analytics.device_analysis WHERE device IS NULL"
        ))
        .await,
        (vec![1, 0, 0, 1, 0, 1], "0".into(), None)
    );
    assert_eq!(
        row(format!(
            "SELECT {measures} FROM analytics.device_analysis
             WHERE device = 'web-safari' AND day = '2026-11-21'"
        ))
        .await,
        (vec![2, 1, 0, 0, 1, 2], "2.00".into(), None)
    );
    let report = s.verify();
    assert!(report.contains("analytics events     6"), "{report}");
}

/// The 300 s podcast of [`stack_with`], as the content cache holds it.
fn episode() -> Arc<Content> {
    Arc::new(Content {
        id: EPISODE.into(),
        slug: Some("episode".into()),
        title: Some("An episode".into()),
        content_type: Some("podcast".into()),
        length_seconds: Some(300),
    })
}

/// An event at `position` with everything but the identity fixed.
fn event(id: i64, position: Position, user: &str, content: &Arc<Content>) -> EnrichedEvent {
    let ts: DateTime<Utc> = "2026-11-21T10:00:00Z".parse().unwrap();
    EnrichedEvent {
        position,
        commit_ts: ts,
        id,
        content_id: Some(content.id.clone()),
        user_id: Some(user.to_owned()),
        event_type: Some("play".into()),
        event_ts: ts,
        duration_ms: Some(1500),
        device: Some("ios".into()),
        raw_payload: None,
        extra: Vec::new(),
        content: Some(Arc::clone(content)),
        engagement_seconds: Some(Hundredths(150)),
        engagement_pct: Some(Hundredths(1)),
    }
}

/// Every aggregate row, as text, for comparing whole states.
async fn aggregate_state(db: &tokio_postgres::Client) -> Vec<String> {
    let mut state = Vec::new();
    for table in [
        "content_engagement_metrics",
        "content_engagement_daily",
        "content_type_analysis",
        "device_analysis",
    ] {
        for row in db
            .query(
                &format!("SELECT t::text FROM analytics.{table} AS t ORDER BY 1"),
                &[],
            )
            .await
            .unwrap()
        {
            state.push(format!("{table} {}", row.get::<_, String>(0)));
        }
    }
    state
}

#[tokio::test]
async fn replayed_and_overlapping_batches_never_count_twice() {
    let pg = Postgres::start().await;
    let db = pg.create_source_db("app").await;
    let config = walcast::pg::Target::parse(&pg.url("app")).unwrap();
    let (mut sink, migrated) = PostgresSink::connect(config.clone()).await.unwrap();
    assert_eq!(
        migrated,
        [
            "003_analytics_schema",
            "004_backfill",
            "005_webhook",
            "006_checkpoint_source",
            "007_webhook_follows_facts"
        ]
    );
    let content = episode();
    let at = |lsn: u64, seq: u32| Position::new(Lsn(lsn), seq);
    let batch = |events: Vec<EnrichedEvent>| Batch {
        events,
        ..Batch::default()
    };
    let first = batch(vec![
        event(1, at(100, 0), ALICE, &content),
        event(2, at(100, 1), BOB, &content),
    ]);
    sink.write(&[&first]).await.unwrap();
    let once = aggregate_state(&db).await;
    assert!(!once.is_empty());
    assert_eq!(sink.checkpoint().await.unwrap(), Some(at(100, 1)));

    // A replay after a crash: same positions, at or below the checkpoint.
    sink.write(&[&first]).await.unwrap();
    // An overlapping backfill: the same ids at later positions, with a new user.
    sink.write(&[&batch(vec![
        event(2, at(200, 0), BOB, &content),
        event(1, at(200, 1), ALICE, &content),
    ])])
    .await
    .unwrap();
    assert_eq!(aggregate_state(&db).await, once);
    assert_eq!(count(&db, "analytics.enriched_events").await, 2);

    // A new event by a user already counted adds an event, not a user.
    sink.write(&[&batch(vec![event(3, at(300, 0), ALICE, &content)])])
        .await
        .unwrap();
    let (events, users): (i64, i64) = {
        let r = db
            .query_one(
                "SELECT events, distinct_users FROM analytics.content_engagement_metrics",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((events, users), (3, 2));

    // A second start finds the schema in place and applies nothing.
    let (_again, migrated) = PostgresSink::connect(config).await.unwrap();
    assert!(migrated.is_empty());
}

/// The Redis sink writes streamed events in chunks of 500 under WATCH, and falls back to
/// its script when a concurrent writer keeps changing the watched keys: across chunk
/// boundaries, replays, and a backfill writing the same ids at the same time, every event
/// is counted exactly once.
#[tokio::test]
async fn redis_writes_count_once_across_chunks_replays_and_a_concurrent_backfill() {
    let redis = Redis::start().await;
    let mut sink = RedisSink::connect(redis::Client::open(redis.url()).unwrap())
        .await
        .unwrap();
    let content = episode();
    let streamed = |ids: std::ops::RangeInclusive<i64>, lsn: u64| Batch {
        events: ids
            .map(|id| event(id, Position::new(Lsn(lsn), id as u32), ALICE, &content))
            .collect(),
        ..Batch::default()
    };
    let mut conn = redis.conn().await;
    let mut counted = async || -> (i64, i64, usize) {
        let (total, plays): (i64, i64) = redis::cmd("HMGET")
            .arg("stats:events")
            .arg("total")
            .arg("type:play")
            .query_async(&mut conn)
            .await
            .unwrap();
        let list: Vec<i64> = redis::cmd("LRANGE")
            .arg(format!("content:{EPISODE}:events"))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        (total, plays, list.len())
    };

    // 1,234 events in one write: three chunks, then the checkpoint at the last one.
    let first = streamed(1..=1234, 100);
    sink.write(&[&first]).await.unwrap();
    assert_eq!(counted().await, (1234, 1234, 100));
    assert_eq!(
        sink.checkpoint().await.unwrap(),
        Some(Position::new(Lsn(100), 1234))
    );
    assert!(redis.event(1234).await.is_some());
    // A replay (positions at or below the checkpoint) and the same ids at later positions.
    sink.write(&[&first]).await.unwrap();
    sink.write(&[&streamed(1..=1234, 200)]).await.unwrap();
    assert_eq!(counted().await.0, 1234);

    // A backfill of the same ids: the script path, guarded by the same bits.
    let backfilled = |ids: std::ops::RangeInclusive<i64>| Batch {
        feed: Feed::Backfill(BackfillMark {
            job: "test".into(),
            cursor: Some(*ids.end()),
        }),
        events: ids
            .map(|id| event(id, Position::new(Lsn(1), 0), BOB, &content))
            .collect(),
        ..Batch::default()
    };
    sink.write(&[&backfilled(1..=1234)]).await.unwrap();
    assert_eq!(counted().await.0, 1234);

    // While the stream writes ids 2,001..=6,000, a backfill writes 6,001..=10,000 into the
    // same id bitmap: the stream's watched key keeps changing under it.
    let backfill = {
        let url = redis.url();
        let batches: Vec<Batch> = (6001..=10000)
            .step_by(100)
            .map(|low| backfilled(low..=low + 99))
            .collect();
        tokio::spawn(async move {
            let mut sink = RedisSink::connect(redis::Client::open(url.as_str()).unwrap())
                .await
                .unwrap();
            for batch in &batches {
                sink.write(&[batch]).await.unwrap();
            }
        })
    };
    for (n, low) in (2001..=6000).step_by(100).enumerate() {
        sink.write(&[&streamed(low..=low + 99, 300 + n as u64)])
            .await
            .unwrap();
    }
    backfill.await.unwrap();
    assert_eq!(counted().await.0, 1234 + 4000 + 4000);
    assert_eq!(
        sink.checkpoint().await.unwrap(),
        Some(Position::new(Lsn(339), 6000))
    );
}

#[tokio::test]
async fn kill_9_at_random_moments_under_200k_events_loses_and_doubles_nothing() {
    const EVENTS: i64 = 200_000;
    let s = stack().await;
    let mut walcast = s.run();
    let writer = {
        let db = s.pg.client("app").await;
        tokio::spawn(async move { load(&db, EVENTS, 500).await })
    };
    let mut rng = rand::rng();
    let mut kills = Vec::new();
    let mut target = 0;
    for _ in 0..4 {
        target += rng.random_range(10_000..45_000);
        // Whichever sink is behind decides: a kill lands mid-way for both.
        eventually(&format!("{target} events applied"), WAIT, || async {
            s.analytics_count().await.min(s.redis.total().await) >= target
        })
        .await;
        // A random extra delay, so the kill does not land right at a batch boundary.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        kills.push(s.analytics_count().await);
        walcast.kill9();
        walcast = s.env.spawn_run();
    }
    writer.await.unwrap();
    eprintln!("killed walcast at analytics counts {kills:?}");
    assert_eq!(s.source_count().await, EVENTS);
    s.wait_delivered(EVENTS, &walcast, Duration::from_secs(120))
        .await;
    let committed = current_lsn(&s.db).await;
    eventually("slot acknowledged everything", WAIT, || async {
        confirmed_flush(&s.db, "walcast").await.unwrap() >= committed
    })
    .await;
    let distinct: i64 = scalar(
        &s.db,
        "SELECT count(DISTINCT id) FROM analytics.enriched_events",
    )
    .await;
    assert_eq!(distinct, EVENTS, "killed at {kills:?}");
    assert_eq!(s.analytics_count().await, EVENTS, "killed at {kills:?}");
    assert_eq!(s.redis.total().await, EVENTS, "killed at {kills:?}");
    eprintln!("{}", s.verify());
}

#[tokio::test]
async fn redis_outage_holds_the_slot_and_loses_nothing() {
    let mut s = stack_with(Redis::start_persistent().await).await;
    let walcast = s.run();
    let writer = {
        let db = s.pg.client("app").await;
        tokio::spawn(async move {
            // About 20 s of steady load: 40,000 events, 200 per transaction, 2,000/s.
            for _ in 0..200 {
                load(&db, 200, 200).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    eventually("streaming under load", WAIT, || async {
        s.redis.total().await >= 2_000
    })
    .await;

    // Redis dies (SIGKILL; every write it acknowledged is on disk) for 10 s.
    s.redis.stop();
    let analytics_at_stop = s.analytics_count().await;
    let mut flushed_while_down = 0;
    let down_until = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < down_until {
        flushed_while_down =
            flushed_while_down.max(confirmed_flush(&s.db, "walcast").await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let analytics_while_down = s.analytics_count().await;
    assert!(
        analytics_while_down > analytics_at_stop,
        "the postgres sink kept writing while redis was down ({analytics_at_stop} -> {analytics_while_down})"
    );

    // Freeze walcast while Redis comes back, to read what Redis had applied.
    crate::support::signal_pid(walcast.pid(), libc::SIGSTOP);
    s.redis.restart().await;
    let applied: String = {
        let mut conn = s.redis.conn().await;
        redis::cmd("GET")
            .arg("walcast:checkpoint:redis")
            .query_async(&mut conn)
            .await
            .unwrap()
    };
    crate::support::signal_pid(walcast.pid(), libc::SIGCONT);
    let applied = Position::from_sortable(&applied).unwrap();
    // No event Redis had not applied lies below what the slot confirmed.
    let unapplied_below_flush: i64 =
        s.db.query_one(
            "SELECT count(*) FROM analytics.enriched_events
             WHERE commit_lsn < ('0/0'::pg_lsn + $1::text::numeric)
               AND (commit_lsn, commit_seq) > ($2::text::pg_lsn, $3)",
            &[
                &(flushed_while_down.to_string()),
                &applied.commit_lsn.to_string(),
                &(applied.seq as i32),
            ],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        unapplied_below_flush, 0,
        "confirmed_flush_lsn passed what redis applied ({applied})"
    );

    writer.await.unwrap();
    let expected = s.source_count().await;
    assert_eq!(expected, 40_000);
    s.wait_delivered(expected, &walcast, Duration::from_secs(60))
        .await;
    assert_eq!(s.redis.total().await, expected, "nothing doubled");
    assert!(
        walcast.log().contains("sink write failed, retrying"),
        "{}",
        walcast.log()
    );
    s.verify();
}

#[tokio::test]
async fn a_lost_analytics_connection_is_retried_and_loses_nothing() {
    let s = stack().await;
    let walcast = s.run();
    let writer = {
        let db = s.pg.client("app").await;
        tokio::spawn(async move {
            for _ in 0..100 {
                load(&db, 200, 200).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    for at in [2_000, 8_000] {
        eventually(&format!("{at} events in analytics"), WAIT, || async {
            s.analytics_count().await >= at
        })
        .await;
        let terminated: i64 = scalar(
            &s.db,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = 'walcast-postgres-sink'",
        )
        .await;
        assert!(terminated >= 1, "found the sink's session");
    }
    writer.await.unwrap();
    s.wait_delivered(20_000, &walcast, Duration::from_secs(60))
        .await;
    assert!(
        walcast
            .log()
            .contains("reconnected to the analytics database"),
        "{}",
        walcast.log()
    );
    s.verify();
}

#[tokio::test]
async fn postgres_restart_mid_stream_reconnects_and_delivers_everything_once() {
    let mut s = stack().await;
    let walcast = s.run();
    load(&s.db, 20_000, 500).await;
    eventually("streaming", WAIT, || async {
        s.analytics_count().await >= 3_000
    })
    .await;
    s.pg.restart().await;
    s.db = s.pg.client("app").await;
    load(&s.db, 5_000, 500).await;
    s.wait_delivered(25_000, &walcast, Duration::from_secs(60))
        .await;
    let log = walcast.log();
    assert!(log.contains("replication connection lost"), "{log}");
    assert!(log.contains("replication resumed"), "{log}");
    s.verify();
}

#[tokio::test]
async fn rows_that_cannot_be_events_become_dead_letters_and_the_stream_goes_on() {
    let s = stack().await;
    let walcast = s.run();
    let good = |n: i64| {
        let db = &s.db;
        async move {
            db.batch_execute(&format!(
                "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms)
                 SELECT '{EPISODE}', 'play', now(), i FROM generate_series(1, {n}) AS i"
            ))
            .await
            .unwrap();
        }
    };
    good(1).await;
    // invalid_value: a user schema where user_id is free text.
    s.db.batch_execute(
        "ALTER TABLE engagement_events ALTER COLUMN user_id TYPE text;
         INSERT INTO engagement_events (user_id, event_type, event_ts)
         VALUES ('not-a-uuid', 'play', now());",
    )
    .await
    .unwrap();
    good(1).await;
    // null_event_ts: a user schema without NOT NULL.
    s.db.batch_execute(
        "ALTER TABLE engagement_events ALTER COLUMN event_ts DROP NOT NULL;
         INSERT INTO engagement_events (event_type, event_ts, device) VALUES ('pause', NULL, 'tv');",
    )
    .await
    .unwrap();
    good(1).await;
    s.wait_delivered(3, &walcast, WAIT).await;
    // missing_column: a required column dropped.
    s.db.batch_execute(
        "ALTER TABLE engagement_events DROP COLUMN event_ts;
         INSERT INTO engagement_events (event_type, device) VALUES ('click', 'web-chrome');",
    )
    .await
    .unwrap();
    eventually("three dead letters", WAIT, || async {
        count(&s.db, "analytics.dead_letters").await == 3
    })
    .await;

    let rows =
        s.db.query(
            "SELECT reason, detail, source_table, raw::text, commit_lsn IS NOT NULL, seq, origin
             FROM analytics.dead_letters ORDER BY commit_lsn",
            &[],
        )
        .await
        .unwrap();
    let reasons: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        reasons,
        ["invalid_value", "null_event_ts", "missing_column"]
    );
    for row in &rows {
        assert_eq!(row.get::<_, String>(2), "engagement_events");
        assert!(row.get::<_, bool>(4), "commit_lsn recorded");
        assert_eq!(row.get::<_, i32>(5), 0, "first row of its transaction");
        assert_eq!(row.get::<_, String>(6), "source");
    }
    let raw = |i: usize| serde_json::from_str::<serde_json::Value>(rows[i].get(3)).unwrap();
    assert_eq!(raw(0)["user_id"], "not-a-uuid");
    assert!(raw(0)["id"].is_string());
    assert!(rows[0].get::<_, String>(1).contains("user_id"));
    assert_eq!(raw(1)["event_ts"], serde_json::Value::Null);
    assert_eq!(raw(1)["device"], "tv");
    assert_eq!(raw(2)["device"], "web-chrome");
    assert!(raw(2).get("event_ts").is_none());

    let metrics = scrape_metrics(s.env.metrics_port).await;
    for reason in ["invalid_value", "null_event_ts", "missing_column"] {
        assert!(
            metrics.contains(&format!(
                "walcast_dead_letters_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason} counted once; metrics:\n{metrics}"
        );
    }
    assert_eq!(s.redis.total().await, 3);
    assert_eq!(s.analytics_count().await, 3);
}

#[tokio::test]
async fn a_permanent_sink_error_stops_walcast_without_acknowledging_the_batch() {
    let s = stack().await;
    let mut walcast = s.run();
    s.db.batch_execute(&format!(
        "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms)
         VALUES ('{EPISODE}', 'play', now(), 1000)"
    ))
    .await
    .unwrap();
    s.wait_delivered(1, &walcast, WAIT).await;
    let committed = current_lsn(&s.db).await;
    eventually("first event acknowledged", WAIT, || async {
        confirmed_flush(&s.db, "walcast").await.unwrap() >= committed
    })
    .await;

    // Someone moves the facts table away: every write is refused, retrying cannot help
    // (a refused row alone becomes a dead letter instead, see below).
    s.db.batch_execute("ALTER TABLE analytics.enriched_events RENAME TO moved_away")
        .await
        .unwrap();
    let before = current_lsn(&s.db).await;
    s.db.batch_execute(&format!(
        "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms)
         VALUES ('{EPISODE}', 'play', now(), 9000)"
    ))
    .await
    .unwrap();
    let status = walcast.wait_exit(WAIT).await;
    assert!(!status.success(), "exit status {status}");
    let log = walcast.log();
    assert!(log.contains("sink postgres failed"), "{log}");
    assert!(log.contains("enriched_events"), "{log}");
    assert!(
        log.contains("the analytics schema is not the one walcast created"),
        "the fix is named: {log}"
    );
    assert!(
        confirmed_flush(&s.db, "walcast").await.unwrap() <= before,
        "the rejected batch was not acknowledged"
    );
}

/// `TRUNCATE engagement_events RESTART IDENTITY` makes ids start over while every sink
/// holds the old events under them: walcast stops there and stays stopped (nothing past
/// the truncate is acknowledged), and the recovery it names leaves every sink exact.
#[tokio::test]
async fn a_truncate_of_the_events_table_stops_walcast_until_the_sinks_start_over() {
    let s = stack().await;
    let mut walcast = s.run();
    load(&s.db, 10, 10).await;
    s.wait_delivered(10, &walcast, WAIT).await;
    s.db.batch_execute("TRUNCATE engagement_events RESTART IDENTITY")
        .await
        .unwrap();
    load(&s.db, 10, 10).await;
    let status = walcast.wait_exit(WAIT).await;
    let log = walcast.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("engagement_events was truncated") && log.contains("walcast backfill"),
        "{log}"
    );
    // The old events are still there, none of the new ones: event 1 is the old row.
    assert_eq!(s.redis.total().await, 10);
    // Nothing past the truncate was acknowledged: a restart meets it again.
    let mut again = s.env.spawn_run();
    assert!(!again.wait_exit(WAIT).await.success());
    assert!(
        again.log().contains("engagement_events was truncated"),
        "{}",
        again.log()
    );

    // The recovery the message names.
    s.env.succeed(&["teardown"]);
    s.db.batch_execute("DROP SCHEMA analytics CASCADE")
        .await
        .unwrap();
    redis::cmd("FLUSHDB")
        .query_async::<()>(&mut s.redis.conn().await)
        .await
        .unwrap();
    s.env.succeed(&["backfill"]);
    let walcast = s.env.spawn_run();
    load(&s.db, 5, 5).await;
    s.wait_delivered(15, &walcast, WAIT).await;
    s.verify();
}

/// One awkward value no longer stops walcast for good: a 3,000-character device is bounded
/// where it becomes an aggregate key (and a Redis field), and a row the analytics database
/// still refuses (here a constraint an operator added) becomes that sink's dead letter
/// while Redis gets it and the stream goes on.
#[tokio::test]
async fn a_row_the_analytics_database_refuses_is_dead_lettered_and_the_stream_goes_on() {
    let s = stack().await;
    let walcast = s.run();
    load(&s.db, 5, 5).await;
    s.wait_delivered(5, &walcast, WAIT).await;
    let long_device = "d".repeat(3_000);
    s.db.execute(
        "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms, device)
         VALUES ($1::text::uuid, 'play', now(), 1000, $2)",
        &[&EPISODE, &long_device],
    )
    .await
    .unwrap();
    s.wait_delivered(6, &walcast, WAIT).await;
    let key_device: String =
        s.db.query_one(
            "SELECT device FROM analytics.device_analysis WHERE length(device) > 100",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key_device.len(), walcast::event::KEY_CHARS);

    s.db.batch_execute(
        "ALTER TABLE analytics.enriched_events ADD CONSTRAINT short_plays CHECK (duration_ms < 500000)",
    )
    .await
    .unwrap();
    s.db.batch_execute(&format!(
        "INSERT INTO engagement_events (content_id, event_type, event_ts, duration_ms)
         VALUES ('{EPISODE}', 'play', now(), 1000), ('{EPISODE}', 'play', now(), 900000),
                ('{EPISODE}', 'play', now(), 2000)"
    ))
    .await
    .unwrap();
    load(&s.db, 3, 3).await;
    eventually(
        "every event in redis, all but the refused one in analytics",
        WAIT,
        || async { s.redis.total().await == 12 && s.analytics_count().await == 11 },
    )
    .await;
    let row = s
        .db
        .query_one(
            "SELECT reason, detail, (raw->>'id')::bigint FROM analytics.dead_letters WHERE origin = 'postgres'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "analytics_rejected");
    assert!(
        row.get::<_, String>(1).contains("short_plays"),
        "{}",
        row.get::<_, String>(1)
    );
    assert_eq!(row.get::<_, i64>(2), 8);
    let report = s.verify();
    assert!(report.contains("refused by it      1"), "{report}");
    let metrics = scrape_metrics(s.env.metrics_port).await;
    assert!(
        metrics.contains("walcast_dead_letters_total{reason=\"analytics_rejected\"} 1"),
        "{metrics}"
    );
}

/// The Redis key layout is written two ways, `WATCH` + `MULTI`/`EXEC` and the fallback
/// script: the same batches applied each way leave two Redis servers identical, key for
/// key (events with and without content, unknown types and devices, old and recent event
/// times, a list past its cap, replays, a backfill over streamed and new ids, its end).
#[tokio::test]
async fn both_ways_of_writing_redis_leave_the_same_keys() {
    let content = episode();
    let now = Utc::now();
    let varied = |id: i64, position: Position| {
        let mut e = event(
            id,
            position,
            if id % 2 == 0 { ALICE } else { BOB },
            &content,
        );
        e.event_ts = now - chrono::Duration::minutes(id % 7) - chrono::Duration::seconds(id % 50);
        match id % 5 {
            0 => {
                e.content = None;
                e.content_id = None;
            }
            1 => e.event_type = None,
            2 => e.device = Some(format!("device-{}", id % 3)),
            3 => e.event_ts = now - chrono::Duration::hours(5),
            _ => e.duration_ms = None,
        }
        if e.duration_ms.is_none() {
            e.engagement_seconds = None;
            e.engagement_pct = None;
        }
        e
    };
    let streamed = |ids: std::ops::RangeInclusive<i64>, lsn: u64| Batch {
        events: ids
            .map(|id| varied(id, Position::new(Lsn(lsn), id as u32)))
            .collect(),
        ..Batch::default()
    };
    let backfilled = |ids: std::ops::RangeInclusive<i64>, cursor: Option<i64>| Batch {
        feed: Feed::Backfill(BackfillMark {
            job: "differential".into(),
            cursor,
        }),
        events: ids.map(|id| varied(id, Position::new(Lsn(1), 0))).collect(),
        ..Batch::default()
    };
    let batches = [
        streamed(1..=300, 100),
        streamed(301..=320, 200),
        streamed(1..=320, 200),
        backfilled(250..=400, Some(400)),
        streamed(401..=420, 300),
        backfilled(401..=450, None),
    ];
    let (plain, scripted) = (Redis::start().await, Redis::start().await);
    let client = |redis: &Redis| redis::Client::open(redis.url()).unwrap();
    let mut by_watch = RedisSink::connect(client(&plain)).await.unwrap();
    let mut by_script = RedisSink::connect(client(&scripted))
        .await
        .unwrap()
        .script_only();
    for batch in &batches {
        by_watch.write(&[batch]).await.unwrap();
        by_script.write(&[batch]).await.unwrap();
    }
    let (a, b) = (
        redis_dump(&plain, Dump::Exact).await,
        redis_dump(&scripted, Dump::Exact).await,
    );
    assert!(a.len() > 20, "{a:?}");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y);
    }
    assert_eq!(a.len(), b.len());
}
