//! The Redis sink on a Redis Cluster (`WALCAST_REDIS_CLUSTER`): six nodes made by the test,
//! every key exact across a backfill, kill -9 of walcast, and a primary failing over to a
//! replica that was behind.

use std::time::Duration;

use walcast::sink::redis_cluster::slot;

use crate::support::cluster::RedisCluster;
use crate::support::{
    EPISODE, Redis, Stack, confirmed_flush, count, current_lsn, episode_sql, eventually,
    load_plays, scalar,
};

const WAIT: Duration = Duration::from_secs(60);

/// A stack whose Redis sink writes to `cluster`; its single Redis must stay empty.
async fn stack_on(cluster: &RedisCluster, sinks: &str) -> Stack {
    let mut s = Stack::start(Redis::start().await, &episode_sql()).await;
    s.env.put("WALCAST_REDIS_CLUSTER", &cluster.seeds());
    s.env.put("WALCAST_SINKS", sinks);
    s
}

async fn xlen(cluster: &RedisCluster, key: &str) -> i64 {
    redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut cluster.conn().await)
        .await
        .unwrap()
}

async fn list(cluster: &RedisCluster, key: &str) -> Vec<i64> {
    redis::cmd("LRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(&mut cluster.conn().await)
        .await
        .unwrap()
}

/// Every key the source's `expected` plays of the episode make, as a reader sees them.
async fn assert_exact(s: &Stack, cluster: &RedisCluster, expected: i64, partitioned: bool) {
    // Every slot of a write is applied before its checkpoint moves, and the source's slot
    // only after that: once it passed all that was committed, every key is final.
    let committed = current_lsn(&s.db).await;
    let slots: &[&str] = if partitioned {
        &["walcast_0", "walcast_1"]
    } else {
        &["walcast"]
    };
    for slot in slots {
        eventually(&format!("slot {slot} past every commit"), WAIT, || async {
            confirmed_flush(&s.db, slot).await.unwrap() >= committed
        })
        .await;
    }
    assert_eq!(cluster.total().await, expected, "stats:events total");
    assert_eq!(cluster.stat("type:play").await, expected, "type:play");
    assert_eq!(cluster.stat("device:ios").await, expected, "device:ios");
    assert_eq!(xlen(cluster, "events:play").await, expected, "events:play");
    assert_eq!(
        cluster.count_keys("event:*").await as i64,
        expected,
        "event:{{id}} keys"
    );
    // The newest 100, newest first, each once. Two partitions each push their own events
    // as they apply them, so there the list holds the last 100 applied, in no id order.
    let newest: Vec<i64> = crate::support::column(
        &s.db,
        "SELECT id FROM engagement_events ORDER BY id DESC LIMIT 100",
    )
    .await;
    let recent = list(cluster, &format!("content:{EPISODE}:events")).await;
    if partitioned {
        let distinct: std::collections::BTreeSet<i64> = recent.iter().copied().collect();
        assert_eq!((recent.len(), distinct.len()), (100, 100), "{recent:?}");
    } else {
        assert_eq!(recent, newest, "content:{EPISODE}:events");
    }
    // Every play is g seconds long: the leaderboards hold their exact sum.
    let seconds = scalar(
        &s.db,
        "SELECT (sum(duration_ms) / 1000)::bigint FROM engagement_events",
    )
    .await;
    let top = s.env.succeed(&["top", "--minutes", "120", "--limit", "5"]);
    assert_eq!(top.trim(), format!("{EPISODE} {seconds}.00"), "walcast top");
    // Nothing went to WALCAST_REDIS_URL.
    let keys: i64 = redis::cmd("DBSIZE")
        .query_async(&mut s.redis.conn().await)
        .await
        .unwrap();
    assert_eq!(keys, 0, "keys written to the single Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_holds_every_event_once_across_backfill_and_kill_9() {
    let cluster = RedisCluster::start().await;
    let s = stack_on(&cluster, "redis,postgres").await;
    // Rows from before the slot: the initial snapshot copies them.
    load_plays(&s.db, 5_000, 500).await;
    s.env.succeed(&["backfill"]);
    assert_eq!(cluster.total().await, 5_000);

    let mut running = s.env.spawn_run();
    let writer = {
        let db = s.pg.client("app").await;
        tokio::spawn(async move { load_plays(&db, 15_000, 100).await })
    };
    for target in [8_000, 14_000] {
        eventually(&format!("{target} events in Redis"), WAIT, || async {
            cluster.total().await >= target
        })
        .await;
        running.kill9();
        running = s.env.spawn_run();
    }
    writer.await.unwrap();
    let expected = 20_000;
    let facts = s.pg.client("app").await;
    eventually("every event in both sinks", WAIT, || async {
        cluster.total().await >= expected
            && count(&facts, "analytics.enriched_events").await >= expected
    })
    .await;
    // Reprocessing the whole table while the stream runs changes nothing.
    s.env.succeed(&["backfill", "--from-id", "1"]);
    assert_exact(&s, &cluster, expected, false).await;
    let verified = s.env.output(&["verify"]);
    assert!(
        verified.status.success(),
        "walcast verify: {}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    running.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_thousands_of_events_redis_already_has_changes_no_key() {
    let cluster = RedisCluster::start().await;
    let s = stack_on(&cluster, "redis,postgres").await;
    let mut running = s.run();
    let facts = s.pg.client("app").await;
    load_plays(&s.db, 1_000, 100).await;
    eventually("1000 events in both sinks", WAIT, || async {
        cluster.total().await >= 1_000 && count(&facts, "analytics.enriched_events").await >= 1_000
    })
    .await;
    // The analytics sink stalls, so nothing more is acknowledged while Redis goes on:
    // after a kill -9, the slot replays all of it to Redis, far more than a recent list
    // keeps.
    let lock = s.pg.client("app").await;
    lock.batch_execute("BEGIN; LOCK TABLE analytics.enriched_events IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    load_plays(&s.db, 3_000, 100).await;
    eventually("4000 events in Redis", WAIT, || async {
        cluster.total().await >= 4_000
    })
    .await;
    running.kill9();
    lock.batch_execute("ROLLBACK").await.unwrap();
    let running = s.env.spawn_run();
    let expected = 4_000;
    eventually("every event in both sinks", WAIT, || async {
        count(&facts, "analytics.enriched_events").await >= expected
    })
    .await;
    assert_exact(&s, &cluster, expected, false).await;
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_failing_over_to_a_replica_behind_is_noticed_and_its_slots_rebuilt() {
    let mut cluster = RedisCluster::start().await;
    // Redis alone: the slots' own checkpoints are all that can show the loss.
    let s = stack_on(&cluster, "redis").await;
    let mut running = s.run();
    load_plays(&s.db, 3_000, 100).await;
    eventually("3000 events in Redis", WAIT, || async {
        cluster.total().await >= 3_000
    })
    .await;

    // The shard of `stats:events`, which is not the one of the checkpoint.
    let (primary, replica) = cluster.shard_of(slot(b"stats:events")).await;
    let (checkpoint_primary, _) = cluster.shard_of(slot(b"walcast:checkpoint:redis")).await;
    assert_ne!(
        primary.id, checkpoint_primary.id,
        "the test needs stats:events and the checkpoint on different primaries"
    );
    // The replica has all of it (`WAIT` answers how many replicas acknowledged every write
    // so far), then stops following: what the primary applies from now on, it lacks.
    let acked = cluster
        .on_node(primary.port, redis::cmd("WAIT").arg(1).arg(10_000))
        .await
        .unwrap();
    assert_eq!(acked, redis::Value::Int(1), "the replica did not catch up");
    cluster.signal(replica.port, libc::SIGSTOP);
    cluster
        .on_node(
            primary.port,
            redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica"),
        )
        .await
        .unwrap();
    load_plays(&s.db, 3_000, 100).await;
    eventually("6000 events in Redis", WAIT, || async {
        cluster.total().await >= 6_000
    })
    .await;
    // The primary dies; its replica, 3000 events behind, takes over.
    cluster.kill(primary.port);
    cluster.signal(replica.port, libc::SIGCONT);
    cluster
        .on_node(
            replica.port,
            redis::cmd("CLUSTER").arg("FAILOVER").arg("TAKEOVER"),
        )
        .await
        .unwrap();
    cluster.wait_ok().await;
    assert_eq!(cluster.total().await, 3_000, "the replica was not behind");

    // The next write to those slots finds them behind: walcast stops rather than go on.
    load_plays(&s.db, 1_000, 100).await;
    let status = running.wait_exit(WAIT).await;
    assert!(!status.success(), "walcast went on: {}", running.log());
    assert!(
        running.log().contains("slot lost writes"),
        "{}",
        running.log()
    );
    // Started again, it rebuilds the slots behind from the table, then streams.
    let running = s.env.spawn_run();
    let expected = 7_000;
    eventually("every event in Redis again", WAIT, || async {
        cluster.total().await >= expected
    })
    .await;
    load_plays(&s.db, 1_000, 100).await;
    let expected = 8_000;
    eventually("the rows after the rebuild", WAIT, || async {
        cluster.total().await >= expected
    })
    .await;
    assert!(
        running.log().contains("hold less than walcast confirmed"),
        "{}",
        running.log()
    );
    assert_exact(&s, &cluster, expected, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_resharded_under_load_holds_every_event_once() {
    let cluster = RedisCluster::start().await;
    let s = stack_on(&cluster, "redis").await;
    let mut running = s.run();
    let writer = {
        let db = s.pg.client("app").await;
        tokio::spawn(async move { load_plays(&db, 10_000, 50).await })
    };
    eventually("2000 events in Redis", WAIT, || async {
        cluster.total().await >= 2_000
    })
    .await;
    // Move the slots of stats:events and the content's list to another primary while
    // walcast writes to them: scripts meet MOVED, ASK and TRYAGAIN.
    let (to, _) = cluster.shard_of(slot(b"walcast:checkpoint:redis")).await;
    let list = format!("content:{EPISODE}:events");
    for key in ["stats:events", list.as_str()] {
        let (from, _) = cluster.shard_of(slot(key.as_bytes())).await;
        if from.id != to.id {
            cluster.move_slot(slot(key.as_bytes()), &from, &to).await;
        }
        let (moved, _) = cluster.shard_of(slot(key.as_bytes())).await;
        assert_eq!(moved.id, to.id, "{key} did not move");
    }
    // And walcast killed once meanwhile.
    eventually("7000 events in Redis", WAIT, || async {
        cluster.total().await >= 7_000
    })
    .await;
    // The slots moved under walcast's own map of them: a node refused, and the write went
    // slot by slot.
    assert!(
        running.log().contains("a node refused its slots"),
        "{}",
        running.log()
    );
    running.kill9();
    let running = s.env.spawn_run();
    writer.await.unwrap();
    let expected = 10_000;
    eventually("every event in Redis", WAIT, || async {
        cluster.total().await >= expected
    })
    .await;
    assert_exact(&s, &cluster, expected, false).await;
    drop(running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_partitions_on_a_cluster_write_every_event_once_across_kill_9_of_each() {
    let cluster = RedisCluster::start().await;
    let s = stack_on(&cluster, "redis").await;
    let envs: Vec<_> = (0..2)
        .map(|i| crate::partitions::partition_env(&s, i))
        .collect();
    for env in &envs {
        env.succeed(&["setup"]);
    }
    let mut running: Vec<_> = envs.iter().map(|env| env.spawn_run()).collect();
    let writer = {
        let db = s.pg.client("app").await;
        tokio::spawn(async move { load_plays(&db, 12_000, 100).await })
    };
    for (index, target) in [(0usize, 3_000), (1, 8_000)] {
        eventually(&format!("{target} events in Redis"), WAIT, || async {
            cluster.total().await >= target
        })
        .await;
        running[index].kill9();
        running[index] = envs[index].spawn_run();
    }
    writer.await.unwrap();
    let expected = 12_000;
    eventually("every event in Redis", WAIT, || async {
        cluster.total().await >= expected
    })
    .await;
    assert_exact(&s, &cluster, expected, true).await;
    drop(running);
}
