//! `walcast setup` / `teardown` against real servers: each misconfiguration fails with a
//! message that names the fix.

use std::time::Duration;

use crate::support::{Env, Postgres, Redis, eventually};

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a walcast command that must fail; returns what it said.
fn refusal(env: &Env, args: &[&str]) -> String {
    let out = env.output(args);
    assert!(!out.status.success(), "walcast {args:?} succeeded");
    stderr_of(&out)
}

#[tokio::test]
async fn setup_is_idempotent_and_teardown_drops_everything() {
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    pg.create_source_db("app").await;
    let env = Env::new(&pg, "app", &redis);
    let out = env.output(&["setup"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("created publication walcast_pub"),
        "{stdout}"
    );
    assert!(
        stdout.contains("created replication slot walcast"),
        "{stdout}"
    );
    let again = env.output(&["setup"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to do"));

    let out = env.output(&["teardown"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let db = pg.client("app").await;
    let left: i64 = db
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[tokio::test]
async fn wal_level_replica_is_refused_with_the_fix() {
    let pg = Postgres::start_with(&[("wal_level", "replica")]).await;
    let redis = Redis::start().await;
    pg.create_source_db("app").await;
    let err = refusal(&Env::new(&pg, "app", &redis), &["setup"]);
    assert!(
        err.contains("wal_level is replica") && err.contains("wal_level = logical"),
        "{err}"
    );
}

#[tokio::test]
async fn missing_privilege_and_missing_table_are_refused_with_the_fix() {
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let db = pg.create_source_db("app").await;
    db.batch_execute("CREATE ROLE plain LOGIN; GRANT ALL ON ALL TABLES IN SCHEMA public TO plain")
        .await
        .unwrap();
    let plain = Env::new(&pg, "app", &redis).set(
        "WALCAST_SOURCE_URL",
        &format!("postgres://plain@127.0.0.1:{}/app", pg.port),
    );
    let err = refusal(&plain, &["setup"]);
    assert!(err.contains("ALTER ROLE plain REPLICATION"), "{err}");

    pg.create_db("empty").await;
    let empty = Env::new(&pg, "empty", &redis);
    let err = refusal(&empty, &["setup"]);
    assert!(
        err.contains("table public.content does not exist") && err.contains("sql/"),
        "{err}"
    );
    // The fix it names works.
    let out = empty.output(&["setup", "--create-schema"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
}

#[tokio::test]
async fn slot_in_use_and_slots_exhausted_are_refused_with_the_fix() {
    let pg = Postgres::start_with(&[("max_replication_slots", "1")]).await;
    let redis = Redis::start().await;
    pg.create_source_db("app").await;
    let env = Env::new(&pg, "app", &redis);
    assert!(env.output(&["setup"]).status.success());
    let mut first = env.spawn_run();
    let db = pg.client("app").await;
    eventually(
        "the first walcast holds the slot",
        Duration::from_secs(30),
        || async {
            db.query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'walcast'",
                &[],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
        },
    )
    .await;
    // Refused after the wait for the slot's release, made short here.
    let second = Env::new(&pg, "app", &redis).set("WALCAST_SLOT_RELEASE_WAIT", "1s");
    let err = refusal(&second, &["run"]);
    assert!(
        err.contains("in use by another process") && err.contains("WALCAST_SLOT"),
        "{err}"
    );
    let err = refusal(&second, &["teardown"]);
    assert!(
        err.contains("in use by another process"),
        "teardown refuses too: {err}"
    );
    assert!(first.terminate().await.success());

    // One slot allowed and taken: a second slot cannot be made.
    let other = Env::new(&pg, "app", &redis).set("WALCAST_SLOT", "walcast_two");
    let err = refusal(&other, &["setup"]);
    assert!(
        err.contains("max_replication_slots") && err.contains("pg_drop_replication_slot"),
        "{err}"
    );
}

#[tokio::test]
async fn bad_configuration_names_the_setting() {
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let env = Env::new(&pg, "app", &redis).set("WALCAST_SLOT", "Bad-Name");
    let err = refusal(&env, &["setup"]);
    assert!(err.contains("WALCAST_SLOT") && err.contains("a-z"), "{err}");
    let env = Env::new(&pg, "app", &redis).set("WALCAST_SINKS", "redis,kafka");
    let err = refusal(&env, &["run"]);
    assert!(err.contains("kafka") && err.contains("redis"), "{err}");
}

/// Every configuration problem is found before anything is connected: the source here is a
/// port where nothing listens, so an error about it would mean walcast tried it first.
#[tokio::test]
async fn configuration_is_checked_before_connecting_and_urls_hint_at_percent_encoding() {
    let closed = crate::support::free_port();
    let env = Env {
        vars: vec![
            (
                "WALCAST_SOURCE_URL".into(),
                format!("postgres://walcast:s3cret@127.0.0.1:{closed}/app"),
            ),
            (
                "WALCAST_REDIS_URL".into(),
                "redis://:p@ss@cache:6379".into(),
            ),
            ("WALCAST_METRICS_ADDR".into(), String::new()),
        ],
        metrics_port: 0,
    };
    let err = refusal(&env, &["run"]);
    assert!(
        err.contains("WALCAST_REDIS_URL") && err.contains("percent-encode"),
        "{err}"
    );
    assert!(!err.contains("connect"), "nothing was connected: {err}");
    assert!(!err.contains("p@ss"), "no secret in: {err}");

    // A valid configuration, and the source down: the error names the setting and the
    // host:port it tried, never the password.
    let env = env.set("WALCAST_REDIS_URL", "redis://127.0.0.1:1");
    let err = refusal(&env, &["run"]);
    assert!(
        err.contains("WALCAST_SOURCE_URL") && err.contains(&format!("127.0.0.1:{closed}")),
        "{err}"
    );
    assert!(err.contains("Connection refused"), "{err}");
    assert!(!err.contains("s3cret"), "no secret in: {err}");
}

/// `walcast status` before the first `run`: the analytics schema does not exist yet, which
/// is said and is no failure. A role without rights gets the server's own words.
#[tokio::test]
async fn status_before_the_first_run_and_without_rights_says_what_the_server_said() {
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let db = pg.create_source_db("app").await;
    let env = Env::new(&pg, "app", &redis);
    let out = env.output(&["setup"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = env.output(&["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status exits 0: {stdout}{}",
        stderr_of(&out)
    );
    assert!(
        stdout.contains("analytics schema does not exist yet"),
        "{stdout}"
    );

    db.batch_execute(
        "CREATE SCHEMA analytics; CREATE ROLE outsider LOGIN; GRANT CONNECT ON DATABASE app TO outsider",
    )
    .await
    .unwrap();
    let url = env
        .vars
        .iter()
        .find(|(k, _)| k == "WALCAST_SOURCE_URL")
        .unwrap()
        .1
        .replace("postgres@", "outsider@");
    let env = env.set("WALCAST_SOURCE_URL", &url);
    let out = env.output(&["status", "--sinks", "postgres"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("permission denied for schema analytics"),
        "{stdout}"
    );
    assert!(!stdout.contains("db error"), "{stdout}");
}

/// walcast as a least-privilege role: `walcast setup --print-sql`'s statements, applied by
/// the superuser, are all it needs to set up, stream, backfill, report and verify; without
/// one of them preflight names the missing GRANT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_role_runs_everything_with_the_printed_grants() {
    const EPISODE: &str = "00000000-0000-0000-0000-000000000001";
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let admin = pg.create_source_db("app").await;
    admin
        .batch_execute(&format!(
            "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)
             VALUES ('{EPISODE}', 'episode', 'An episode', 'podcast', 300, now())"
        ))
        .await
        .unwrap();
    let url = format!("postgres://walcast_app@127.0.0.1:{}/app", pg.port);
    let env = Env::new(&pg, "app", &redis).set("WALCAST_SOURCE_URL", &url);
    let sql = env.succeed(&["setup", "--print-sql"]);
    assert!(
        sql.contains("CREATE ROLE walcast_app LOGIN REPLICATION"),
        "{sql}"
    );

    // Without SELECT on the tables: named.
    admin
        .batch_execute("CREATE ROLE walcast_app LOGIN REPLICATION")
        .await
        .unwrap();
    let said = refusal(&env, &["setup"]);
    assert!(
        said.contains("GRANT SELECT ON public.content TO walcast_app"),
        "{said}"
    );
    // With SELECT but no publication (walcast_app may not create one): named.
    admin
        .batch_execute("GRANT SELECT ON public.content, public.engagement_events TO walcast_app")
        .await
        .unwrap();
    let said = refusal(&env, &["setup"]);
    assert!(
        said.contains("publication walcast_pub does not exist")
            && said.contains("CREATE PUBLICATION walcast_pub"),
        "{said}"
    );

    // Everything the printed statements say, then walcast's whole life as that role.
    admin
        .batch_execute(
            "REVOKE ALL ON public.content, public.engagement_events FROM walcast_app;
             DROP ROLE walcast_app",
        )
        .await
        .unwrap();
    admin.batch_execute(&sql).await.unwrap();
    env.succeed(&["setup"]);
    admin.batch_execute(&insert(40)).await.unwrap();
    env.succeed(&["backfill"]);
    let walcast = env.spawn_run();
    admin.batch_execute(&insert(60)).await.unwrap();
    eventually(
        "every event in both sinks",
        Duration::from_secs(60),
        || async {
            redis.total().await == 100
                && crate::support::count(&admin, "analytics.enriched_events").await == 100
        },
    )
    .await;
    let status = env.succeed(&["status"]);
    assert!(status.contains("postgres"), "{status}");
    env.succeed(&["verify"]);
    let log = walcast.log();
    assert!(!log.contains("ERROR"), "{log}");
    assert!(!log.contains("permission denied"), "{log}");
}

fn insert(n: u32) -> String {
    format!(
        "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device)
         SELECT '00000000-0000-0000-0000-000000000001', gen_random_uuid(), 'play', now(), 1000,
                'ios' FROM generate_series(1, {n})"
    )
}

/// The roles compose's PostgreSQL creates (docker/postgres/010_roles.sh) are enough for
/// walcast to stream, and let Grafana read the analytics tables and nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_roles_script_gives_walcast_and_grafana_what_they_need() {
    let script = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docker/postgres/010_roles.sh"
    ))
    .unwrap();
    let sql = script
        .split_once("<<'SQL'\n")
        .and_then(|(_, rest)| rest.split_once("\nSQL"))
        .map(|(sql, _)| sql)
        .expect("the script's SQL between <<'SQL' and SQL")
        .replace(":'walcast_pw'", "'w'")
        .replace(":'grafana_pw'", "'g'");
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let admin = pg.create_source_db("app").await;
    admin.batch_execute(&sql).await.unwrap();
    admin
        .batch_execute(
            "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)
             VALUES ('00000000-0000-0000-0000-000000000001', 'episode', 'An episode', 'podcast',
                     300, now())",
        )
        .await
        .unwrap();
    let env = Env::new(&pg, "app", &redis).set(
        "WALCAST_SOURCE_URL",
        &format!("postgres://walcast@127.0.0.1:{}/app", pg.port),
    );
    env.succeed(&["setup"]);
    let _walcast = env.spawn_run();
    admin.batch_execute(&insert(10)).await.unwrap();
    eventually(
        "the events in both sinks",
        Duration::from_secs(60),
        || async {
            redis.total().await == 10
                && crate::support::count(&admin, "analytics.enriched_events").await == 10
        },
    )
    .await;
    let (grafana, connection) = tokio_postgres::connect(
        &format!("postgres://grafana_reader@127.0.0.1:{}/app", pg.port),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let read: i64 = grafana
        .query_one(
            "SELECT sum(events)::int8 FROM analytics.content_engagement_metrics",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(read, 10);
    let write = grafana
        .batch_execute("DELETE FROM analytics.enriched_events")
        .await
        .unwrap_err();
    assert_eq!(
        write.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    let source = grafana
        .batch_execute("SELECT FROM public.engagement_events")
        .await
        .unwrap_err();
    assert_eq!(
        source.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
}
