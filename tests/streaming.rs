//! End-to-end streaming into Redis against real PostgreSQL and Redis servers.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{
    Env, Postgres, Redis, Walcast, confirmed_flush, current_lsn, eventually, poll_until, wait_for,
};

const WAIT: Duration = Duration::from_secs(30);
const EPISODE: &str = "00000000-0000-0000-0000-000000000001";
const ZERO_LENGTH: &str = "00000000-0000-0000-0000-000000000002";
const NO_LENGTH: &str = "00000000-0000-0000-0000-000000000003";
const USER: &str = "10000000-0000-0000-0000-000000000001";

struct Stack {
    pg: Postgres,
    redis: Redis,
    db: tokio_postgres::Client,
    env: Env,
}

async fn stack() -> Stack {
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let db = pg.create_source_db("app").await;
    db.batch_execute(&format!(
        "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES
           ('{EPISODE}', 'episode', 'An episode', 'podcast', 300, now()),
           ('{ZERO_LENGTH}', 'zero', 'Zero length', 'video', 0, now()),
           ('{NO_LENGTH}', 'nolen', 'No length', 'newsletter', NULL, now())"
    ))
    .await
    .unwrap();
    let env = Env::new(&pg, "app", &redis);
    Stack { pg, redis, db, env }
}

impl Stack {
    /// `walcast setup` (slot and publication), then `walcast run` in the background: rows
    /// committed after setup returns are streamed.
    fn run(&self) -> Walcast {
        let out = self.env.output(&["setup"]);
        assert!(
            out.status.success(),
            "walcast setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.env.spawn_run()
    }

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

    async fn source_count(&self) -> i64 {
        self.db
            .query_one("SELECT count(*) FROM engagement_events", &[])
            .await
            .unwrap()
            .get(0)
    }
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
