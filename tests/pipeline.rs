//! `pipeline::run` in process, with faults injected into a real sink's writes
//! (`walcast::sink::fault`): what walcast promises is read off the slot and the sinks, not
//! off its logs.

use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use walcast::config::RunConfig;
use walcast::sink::fault::Faults;

use crate::support::{
    Redis, Stack, confirmed_flush, count, current_lsn, episode_sql, eventually, load_plays, scalar,
};

const WAIT: Duration = Duration::from_secs(30);

/// `walcast run`'s settings, parsed as the command line would.
#[derive(Parser)]
struct Run {
    #[command(flatten)]
    config: RunConfig,
}

fn config(s: &Stack, sinks: &str) -> RunConfig {
    let url = s.pg.url("app");
    let redis = s.redis.url();
    Run::parse_from([
        "run",
        "--source-url",
        url.as_str(),
        "--redis-url",
        redis.as_str(),
        "--sinks",
        sinks,
        // No endpoint: the exporter is a process-wide recorder.
        "--metrics-addr",
        "",
        "--status-interval",
        "100ms",
    ])
    .config
}

/// A streaming pipeline on its own task, stopped by its token.
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), walcast::Error>>,
}

fn start(config: RunConfig, faults: &Faults) -> Running {
    let stop = CancellationToken::new();
    let task = tokio::spawn(walcast::pipeline::run_with_faults(
        config,
        stop.clone().cancelled_owned(),
        faults.clone(),
    ));
    Running { stop, task }
}

impl Running {
    async fn shut_down(self) {
        self.stop.cancel();
        let ended = tokio::time::timeout(WAIT, self.task).await;
        ended
            .expect("run returns after shutdown")
            .expect("run does not panic")
            .expect("run ends without an error");
    }
}

async fn slot_at_least(s: &Stack, lsn: u64) {
    eventually("the slot confirmed everything", WAIT, || async {
        confirmed_flush(&s.db, "walcast").await.unwrap_or(0) >= lsn
    })
    .await;
}

/// While Redis's writes fail, analytics goes on, and the slot stays where the last write
/// both sinks confirmed left it; once they succeed, Redis catches up with every event once
/// and the slot moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_holds_the_acknowledgement_and_loses_nothing() {
    let s = Stack::start(Redis::start().await, &episode_sql()).await;
    s.env.succeed(&["setup"]);
    let mut faults = Faults::default();
    let redis = faults.for_sink("redis");
    let running = start(config(&s, "redis,postgres"), &faults);

    load_plays(&s.db, 100, 10).await;
    let loaded = current_lsn(&s.db).await;
    eventually("the first events in Redis", WAIT, || async {
        s.redis.total().await == 100
    })
    .await;
    slot_at_least(&s, loaded).await;

    redis.fail_writes(true);
    // Whatever the slot may still be told from here on was sent before the next rows
    // were committed: it can reach this far and no further.
    let before = current_lsn(&s.db).await;
    load_plays(&s.db, 50, 5).await;
    let analytics_has_them = || async { count(&s.db, "analytics.enriched_events").await == 150 };
    eventually(
        "analytics has the events Redis refuses",
        WAIT,
        analytics_has_them,
    )
    .await;
    eventually("Redis's writes are retried", WAIT, || async {
        redis.refused() >= 3
    })
    .await;
    let held = confirmed_flush(&s.db, "walcast").await.unwrap();
    assert!(
        held <= before,
        "the slot moved to {held} past {before}, beyond what Redis confirmed"
    );
    assert_eq!(
        s.redis.total().await,
        100,
        "Redis took nothing while failing"
    );

    redis.fail_writes(false);
    let after = current_lsn(&s.db).await;
    eventually("Redis caught up", WAIT, || async {
        s.redis.total().await == 150
    })
    .await;
    slot_at_least(&s, after).await;
    running.shut_down().await;
    assert_eq!(s.redis.total().await, 150, "each event once");
    assert_eq!(count(&s.db, "analytics.enriched_events").await, 150);
}

/// A pipeline dropped mid-write (its task aborted while Redis's writes fail, as a crash
/// would end it) and started again: the replay from the slot brings Redis every event it
/// missed, and analytics, which had them, takes none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_dropped_while_a_sink_fails_resumes_exactly() {
    let s = Stack::start(Redis::start().await, &episode_sql()).await;
    s.env.succeed(&["setup"]);
    let mut faults = Faults::default();
    let redis = faults.for_sink("redis");
    let running = start(config(&s, "redis,postgres"), &faults);
    load_plays(&s.db, 60, 6).await;
    eventually("the first events in Redis", WAIT, || async {
        s.redis.total().await == 60
    })
    .await;
    redis.fail_writes(true);
    load_plays(&s.db, 40, 4).await;
    eventually("analytics has them all", WAIT, || async {
        count(&s.db, "analytics.enriched_events").await == 100
    })
    .await;
    running.task.abort();
    let _ = running.task.await;

    let running = start(config(&s, "redis,postgres"), &Faults::default());
    let after = current_lsn(&s.db).await;
    eventually("Redis has every event", WAIT, || async {
        s.redis.total().await == 100
    })
    .await;
    slot_at_least(&s, after).await;
    running.shut_down().await;
    assert_eq!(s.redis.total().await, 100, "each event once in Redis");
    let distinct: i64 = scalar(
        &s.db,
        "SELECT count(DISTINCT id) FROM analytics.enriched_events",
    )
    .await;
    assert_eq!(distinct, 100);
    let users: i64 = scalar(
        &s.db,
        "SELECT distinct_users FROM analytics.content_engagement_metrics",
    )
    .await;
    assert_eq!(users, 100, "no aggregate counted twice");
}
