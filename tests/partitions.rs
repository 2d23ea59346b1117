//! Several walcast instances over one source (`WALCAST_PARTITIONS`, `WALCAST_PARTITION`):
//! each its own slot, publication row filter and checkpoints, sharing the sinks, every
//! event once in each sink across kill -9 of either instance.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::{
    Env, Redis, Stack, Walcast, column, count, episode_sql, eventually, load_plays, metric, scalar,
    scrape_metrics,
};
use crate::webhook::{Receiver, Reply};

const WAIT: Duration = Duration::from_secs(60);
const PARTITIONS: u32 = 2;

/// The environment of partition `index`: the stack's, with its own metrics port.
pub(crate) fn partition_env(s: &Stack, index: u32) -> Env {
    let mut env = Env::new(&s.pg, "app", &s.redis);
    for (name, value) in &s.env.vars {
        if name != "WALCAST_METRICS_ADDR" {
            env.put(name, value);
        }
    }
    env.set("WALCAST_PARTITIONS", &PARTITIONS.to_string())
        .set("WALCAST_PARTITION", &index.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_partitions_deliver_every_event_once_across_kill_9_of_each() {
    let receiver = Receiver::start(|_| Reply::Ok).await;
    let mut s = Stack::start(Redis::start().await, &episode_sql()).await;
    s.env.put("WALCAST_SINKS", "redis,postgres,webhook");
    s.env.put("WALCAST_WEBHOOK_URL", &receiver.url);
    s.env.put("WALCAST_WEBHOOK_BATCH_MAX_EVENTS", "200");
    let envs: Vec<Env> = (0..PARTITIONS).map(|i| partition_env(&s, i)).collect();
    for env in &envs {
        env.succeed(&["setup"]);
    }
    let filters: Vec<(String, Option<String>)> =
        s.db.query(
            "SELECT pubname::text, rowfilter FROM pg_publication_tables
             WHERE tablename = 'engagement_events' ORDER BY pubname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        filters,
        vec![
            (
                "walcast_pub_0".to_owned(),
                Some("((id % (2)::bigint) = 0)".to_owned())
            ),
            (
                "walcast_pub_1".to_owned(),
                Some("((id % (2)::bigint) = 1)".to_owned())
            ),
        ]
    );
    // Rows that cannot be events: their dead letters must not collide across partitions.
    s.db.batch_execute("ALTER TABLE engagement_events ALTER COLUMN event_ts DROP NOT NULL")
        .await
        .unwrap();
    let mut running: Vec<Walcast> = envs.iter().map(Env::spawn_run).collect();

    let writer = {
        let db = s.pg.client("app").await;
        tokio::spawn(async move { load_plays(&db, 40_000, 100).await })
    };
    // Kill each instance at a different depth of the load, one of them twice.
    for (index, target) in [(0usize, 4_000), (1, 12_000), (0, 22_000), (1, 30_000)] {
        eventually(&format!("{target} events in Redis"), WAIT, || async {
            s.redis.total().await >= target
        })
        .await;
        running[index].kill9();
        running[index] = envs[index].spawn_run();
    }
    writer.await.unwrap();
    // One transaction, one bad row for each partition: both are its first change there.
    s.db.batch_execute(
        "INSERT INTO engagement_events (event_type, event_ts)
         SELECT 'play', NULL FROM generate_series(1, 2)",
    )
    .await
    .unwrap();
    assert_eq!(s.source_count().await, 40_002);
    let expected = 40_000;
    let facts = s.pg.client("app").await;
    eventually("every event in every sink", WAIT, || async {
        s.redis.total().await >= expected
            && count(&facts, "analytics.enriched_events").await >= expected
            && receiver.delivered().len() as i64 >= expected
    })
    .await;

    // Once in each sink.
    let logs = || {
        running
            .iter()
            .map(Walcast::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    assert_eq!(s.redis.total().await, expected, "Redis; logs:\n{}", logs());
    assert_eq!(
        count(&facts, "analytics.enriched_events").await,
        expected,
        "analytics"
    );
    eventually("both bad rows dead-lettered", WAIT, || async {
        scalar(
            &facts,
            "SELECT count(*) FROM analytics.dead_letters WHERE origin = 'source'",
        )
        .await
            >= 2
    })
    .await;
    assert_eq!(
        scalar(
            &facts,
            "SELECT count(DISTINCT raw->>'id') FROM analytics.dead_letters WHERE origin = 'source'"
        )
        .await,
        2
    );
    let delivered = receiver.delivered();
    let unique: BTreeSet<i64> = delivered.iter().copied().collect();
    assert_eq!(
        delivered.len(),
        unique.len(),
        "an event delivered under two keys"
    );
    assert_eq!(unique.len() as i64, expected, "webhook");
    let twice = receiver.under_two_keys();
    assert!(twice.is_empty(), "events sent under two keys: {twice:?}");
    // The shared aggregate is exact: one row, every event and user counted once.
    assert_eq!(
        scalar(
            &facts,
            "SELECT (events - 40000) + (distinct_users - 40000) \
             FROM analytics.content_engagement_metrics"
        )
        .await,
        0
    );
    // Each partition keeps its own checkpoints.
    let checkpoints: Vec<String> = column(
        &facts,
        "SELECT sink FROM analytics.walcast_checkpoint ORDER BY sink",
    )
    .await;
    assert_eq!(
        checkpoints,
        ["postgres:0", "postgres:1", "webhook:0", "webhook:1"]
    );
    let mut redis = s.redis.conn().await;
    for index in 0..PARTITIONS {
        let key = format!("walcast:checkpoint:redis:{index}");
        let stored: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(stored.is_some(), "{key} missing");
    }

    // verify reconciles the whole and each partition.
    let out = envs[0].output(&["verify"]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "verify: {report}");
    for index in 0..PARTITIONS {
        assert!(
            report.contains(&format!("partition {index:<8} 20000 events, 0 missing")),
            "{report}"
        );
    }
    // status reads every partition when none is named.
    let mut all = s.env.clone();
    all.put("WALCAST_PARTITIONS", &PARTITIONS.to_string());
    let out = all.output(&["status", "--json"]);
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let slots: Vec<&str> = status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["slot"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(slots, ["walcast_0", "walcast_1"]);
    // Each instance's metrics carry its partition.
    for (index, env) in envs.iter().enumerate() {
        let exposition = scrape_metrics(env.metrics_port).await;
        let series = format!("walcast_replication_lag_bytes{{partition=\"{index}\"}}");
        assert!(
            metric(&exposition, &series).is_some(),
            "{series} not in:\n{exposition}"
        );
    }
}

#[tokio::test]
async fn a_partition_setting_out_of_range_or_missing_is_refused() {
    let s = Stack::start(Redis::start().await, &episode_sql()).await;
    for (vars, says) in [
        (
            vec![("WALCAST_PARTITIONS", "2")],
            "WALCAST_PARTITION: must be set",
        ),
        (
            vec![("WALCAST_PARTITIONS", "2"), ("WALCAST_PARTITION", "2")],
            "partitions are numbered 0 to 1",
        ),
        (
            vec![("WALCAST_PARTITIONS", "0")],
            "WALCAST_PARTITIONS: must be 1 to",
        ),
    ] {
        let mut env = s.env.clone();
        for (name, value) in vars {
            env.put(name, value);
        }
        let out = env.output(&["run"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{stderr}");
    }
    // A publication whose filter is not this instance's is refused, not used.
    s.db.batch_execute(
        "CREATE PUBLICATION walcast_pub FOR TABLE content, engagement_events WHERE (id > 100)",
    )
    .await
    .unwrap();
    let out = s.env.output(&["setup"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("filters public.engagement_events by"),
        "{stderr}"
    );
}

/// A Redis that restarted empty under two partitions: each instance finds its Redis
/// checkpoint gone while its analytics checkpoint holds events, and rebuilds its own share
/// from the table; together they leave Redis exact, and streaming goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_partition_rebuilds_its_share_of_a_redis_that_restarted_empty() {
    let mut s = Stack::start(Redis::start().await, &episode_sql()).await;
    let envs: Vec<Env> = (0..PARTITIONS).map(|i| partition_env(&s, i)).collect();
    for env in &envs {
        env.succeed(&["setup"]);
    }
    let mut running: Vec<Walcast> = envs.iter().map(Env::spawn_run).collect();
    load_plays(&s.db, 6_000, 100).await;
    eventually("the events in Redis", WAIT, || async {
        s.redis.total().await == 6_000
    })
    .await;
    for walcast in &mut running {
        walcast.kill9();
    }
    s.redis.restart().await;
    assert_eq!(s.redis.total().await, 0, "Redis restarted empty");
    // Committed while nothing streams: the slots hold these, the table holds all.
    load_plays(&s.db, 1_000, 100).await;
    let running: Vec<Walcast> = envs.iter().map(Env::spawn_run).collect();
    load_plays(&s.db, 1_000, 100).await;
    eventually("every event in both sinks again", WAIT, || async {
        s.redis.total().await >= 8_000 && count(&s.db, "analytics.enriched_events").await >= 8_000
    })
    .await;
    // The line comes once the rebuild's last write is confirmed, after Redis shows it.
    eventually("both partitions say they rebuilt", WAIT, || async {
        running
            .iter()
            .all(|w| w.log().contains("sinks rebuilt from the table"))
    })
    .await;
    for (index, walcast) in running.iter().enumerate() {
        let log = walcast.log();
        let job = format!("job=\"all,partition:{index}/{PARTITIONS}\"");
        assert!(log.contains(&job), "each rebuilt its own share: {log}");
    }
    assert_eq!(s.redis.total().await, 8_000);
    let listed: i64 = redis::cmd("HGET")
        .arg("stats:events")
        .arg("type:play")
        .query_async(&mut s.redis.conn().await)
        .await
        .unwrap();
    assert_eq!(listed, 8_000);
    let out = envs[1].output(&["verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Going from one instance to two, as the README says: stop it, start the partitions
/// (new slots, from now), backfill each partition's share (the sinks skip what they hold),
/// tear the old slot down. Nothing committed in between is lost, nothing is doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn going_from_one_instance_to_two_loses_and_doubles_nothing() {
    let s = Stack::start(Redis::start().await, &episode_sql()).await;
    let mut single = s.run();
    load_plays(&s.db, 3_000, 100).await;
    eventually("the events in Redis", WAIT, || async {
        s.redis.total().await == 3_000
    })
    .await;
    single.terminate().await;
    // Committed while nothing streams, and no new slot exists yet: only the table has them.
    load_plays(&s.db, 1_000, 100).await;
    let envs: Vec<Env> = (0..PARTITIONS).map(|i| partition_env(&s, i)).collect();
    let _running: Vec<Walcast> = envs
        .iter()
        .map(|env| {
            env.succeed(&["setup"]);
            env.spawn_run()
        })
        .collect();
    load_plays(&s.db, 1_000, 100).await;
    for env in &envs {
        env.succeed(&["backfill"]);
    }
    s.env.succeed(&["teardown"]);
    eventually("every event in both sinks", WAIT, || async {
        s.redis.total().await >= 5_000 && count(&s.db, "analytics.enriched_events").await >= 5_000
    })
    .await;
    assert_eq!(s.redis.total().await, 5_000);
    assert_eq!(count(&s.db, "analytics.enriched_events").await, 5_000);
    let out = envs[0].output(&["verify"]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    let slots: Vec<String> = column(
        &s.db,
        "SELECT slot_name::text FROM pg_replication_slots ORDER BY 1",
    )
    .await;
    assert_eq!(slots, ["walcast_0", "walcast_1"]);
}
