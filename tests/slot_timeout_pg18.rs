//! PostgreSQL 18's `idle_replication_slot_timeout` (this binary runs on PostgreSQL 18, see
//! tests/support): a slot left unused past it is invalidated, and `status` and `run` say
//! so with its own cause and what to do.

use std::time::Duration;

use crate::support::{Env, Postgres, Redis, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_left_idle_past_the_timeout_is_reported_with_its_own_cause() {
    let pg = Postgres::start_with(&[("idle_replication_slot_timeout", "1s")]).await;
    let redis = Redis::start().await;
    let db = pg.create_source_db("app").await;
    let env = Env::new(&pg, "app", &redis);
    env.succeed(&["setup"]);
    let status = env.succeed(&["status"]);
    assert!(status.contains("idle timeout         1s"), "{status}");
    // The server invalidates idle slots at checkpoints.
    eventually(
        "the idle slot invalidated",
        Duration::from_secs(30),
        || async {
            db.batch_execute("CHECKPOINT").await.unwrap();
            db.query_one(
                "SELECT invalidation_reason FROM pg_replication_slots WHERE slot_name = 'walcast'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, Option<String>>(0)
            .as_deref()
                == Some("idle_timeout")
        },
    )
    .await;
    let out = env.output(&["status"]);
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{status}");
    assert!(
        status.contains("invalidation_reason  idle_timeout"),
        "{status}"
    );
    assert!(status.contains("inactive_since"), "{status}");
    let out = env.output(&["run"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("idle_replication_slot_timeout") && said.contains("walcast backfill"),
        "{said}"
    );
}
