//! `walcast generate` against a real PostgreSQL: the requested number of rows, with the
//! requested shares, in the shapes the schema allows.

use crate::support::{Env, Postgres, Redis};

/// 4,000 rows, a fifth of them awkward, over 50 content rows.
const TWO_SECONDS_AT_2000: [&str; 8] = [
    "--rate",
    "2000",
    "--duration",
    "2s",
    "--bad-share",
    "0.2",
    "--content",
    "50",
];

/// Runs `walcast generate` to completion; returns its stdout.
fn generate(env: &Env, args: &[&str]) -> String {
    let mut all = vec!["generate"];
    all.extend_from_slice(args);
    let out = env.output(&all);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "walcast generate failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn share(db: &tokio_postgres::Client, condition: &str) -> f64 {
    db.query_one(
        &format!(
            "SELECT (count(*) FILTER (WHERE {condition}))::float8 / count(*) FROM engagement_events"
        ),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn the_requested_rows_with_the_requested_shares() {
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let db = pg.create_source_db("app").await;
    let env = Env::new(&pg, "app", &redis);

    // The assessment's schema: a foreign key and NOT NULL event_ts, so every awkward row
    // is one without content.
    let out = generate(&env, &TWO_SECONDS_AT_2000);
    assert!(out.contains("generated 4000 events"), "{out}");
    assert_eq!(crate::support::count(&db, "content").await, 50);
    assert_eq!(crate::support::count(&db, "engagement_events").await, 4000);
    let missing = share(&db, "content_id IS NULL").await;
    assert!(
        (0.16..0.24).contains(&missing),
        "content missing share {missing}"
    );
    assert_eq!(
        share(&db, "event_type = 'click' AND duration_ms IS NOT NULL").await,
        0.0
    );
    assert_eq!(
        share(&db, "event_type <> 'click' AND duration_ms IS NULL").await,
        0.0
    );
    assert!(share(&db, "event_type = 'play'").await > 0.3);
    let devices: i64 = db
        .query_one("SELECT count(DISTINCT device) FROM engagement_events", &[])
        .await
        .unwrap()
        .get(0);
    assert!(devices >= 5, "{devices} devices");
    // Zipf: the most popular title has far more than an even share (2%).
    let top: f64 = db
        .query_one(
            "SELECT max(n)::float8 / sum(n) FROM (SELECT count(*) AS n FROM engagement_events
             WHERE content_id IS NOT NULL GROUP BY content_id) c",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(top > 0.08, "top share {top}");

    // A copy without the foreign key and with a nullable event_ts also gets dead letters.
    db.batch_execute(
        "TRUNCATE engagement_events;
         ALTER TABLE engagement_events DROP CONSTRAINT engagement_events_content_id_fkey;
         ALTER TABLE engagement_events ALTER COLUMN event_ts DROP NOT NULL;",
    )
    .await
    .unwrap();
    generate(&env, &TWO_SECONDS_AT_2000);
    assert_eq!(crate::support::count(&db, "engagement_events").await, 4000);
    let null_ts = share(&db, "event_ts IS NULL").await;
    assert!(
        (0.07..0.13).contains(&null_ts),
        "NULL event_ts share {null_ts}"
    );
    let missing = share(
        &db,
        "content_id IS NULL OR content_id NOT IN (SELECT id FROM content)",
    )
    .await;
    assert!(
        (0.07..0.13).contains(&missing),
        "content missing share {missing}"
    );
}
