//! TLS to every server, with certificates made by the test: PostgreSQL taking `hostssl`
//! connections only (with a password, read from a file), Redis on `--tls-port` only
//! (with a password), walcast end to end over `sslmode=verify-full` and `rediss://`; a
//! wrong CA, a certificate for another name and an expired one refused at start, saying
//! which server, what did not verify and which setting to change.

use std::path::Path;
use std::time::Duration;

use crate::support::{Certs, Env, Postgres, Redis, Stack, count, eventually};

const WAIT: Duration = Duration::from_secs(60);
const EPISODE: &str = "00000000-0000-0000-0000-000000000001";
/// Characters a URL would need percent-encoded: from a file they need nothing.
const PG_PASSWORD: &str = "p@ss:w/rd?#%";
const REDIS_PASSWORD: &str = "redis s3cret";

fn write_secret(dir: &Path, name: &str, secret: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    path.to_str().unwrap().to_owned()
}

fn verify_full(ca: &Path) -> String {
    format!("sslmode=verify-full&sslrootcert={}", ca.display())
}

/// setup, run, status, backfill and verify, all over TLS with passwords from files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walcast_runs_end_to_end_over_verified_tls_with_passwords_from_files() {
    let certs = Certs::make();
    let pg = Postgres::start_tls(&certs, &certs.server_cert, "scram-sha-256").await;
    let db = pg.create_source_db("app").await;
    db.batch_execute(&format!(
        "ALTER ROLE postgres PASSWORD '{PG_PASSWORD}';
         INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)
         VALUES ('{EPISODE}', 'episode', 'An episode', 'podcast', 300, now())"
    ))
    .await
    .unwrap();
    let redis = Redis::start_tls(&certs, REDIS_PASSWORD).await;
    let mut env = Env::new(&pg, "app", &redis);
    env.put(
        "WALCAST_SOURCE_URL",
        &pg.tls_url("app", &verify_full(&certs.ca)),
    );
    env.put(
        "WALCAST_SOURCE_PASSWORD_FILE",
        &write_secret(certs.dir.path(), "pg-password", PG_PASSWORD),
    );
    env.put("WALCAST_REDIS_CA_FILE", certs.ca.to_str().unwrap());
    env.put(
        "WALCAST_REDIS_PASSWORD_FILE",
        &write_secret(certs.dir.path(), "redis-password", REDIS_PASSWORD),
    );
    let s = Stack { pg, redis, db, env };

    // Rows before the first run: the backfill's; rows after: the stream's.
    s.db.batch_execute(&insert(20)).await.unwrap();
    let mut walcast = s.run();
    s.db.batch_execute(&insert(30)).await.unwrap();
    eventually("the streamed events in both sinks", WAIT, || async {
        s.redis.total().await == 30 && count(&s.db, "analytics.enriched_events").await == 30
    })
    .await;
    let status = s.env.succeed(&["status"]);
    assert!(status.contains("redis"), "{status}");
    walcast.terminate().await;
    s.env.succeed(&["backfill"]);
    assert_eq!(s.redis.total().await, 50);
    let verify = s.env.succeed(&["verify"]);
    let logs = format!("{}{status}{verify}", walcast.log());
    for secret in [PG_PASSWORD, REDIS_PASSWORD] {
        assert!(!logs.contains(secret), "a password in the output: {logs}");
    }
    // Every session walcast had with the server was encrypted.
    let plain: i64 =
        s.db.query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
             WHERE NOT ssl AND client_addr IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 0);
}

fn insert(n: u32) -> String {
    format!(
        "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device)
         SELECT '{EPISODE}', gen_random_uuid(), 'play', now(), 1000, 'ios' FROM generate_series(1, {n})"
    )
}

/// `walcast setup` against a server presenting `cert`, with `params`: its exit status and
/// what it printed.
async fn setup_with(cert: fn(&Certs) -> &Path, params: fn(&Certs) -> String) -> (bool, String) {
    let certs = Certs::make();
    let pg = Postgres::start_tls(&certs, cert(&certs), "trust").await;
    pg.create_source_db("app").await;
    let redis = Redis::start().await;
    let env =
        Env::new(&pg, "app", &redis).set("WALCAST_SOURCE_URL", &pg.tls_url("app", &params(&certs)));
    let out = env.output(&["setup"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    (out.status.success(), text)
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let (ok, text) = setup_with(|c| &c.server_cert, |c| verify_full(&c.other_ca)).await;
    assert!(!ok, "{text}");
    assert!(text.contains("WALCAST_SOURCE_URL"), "{text}");
    assert!(text.contains("postgres@localhost:"), "{text}");
    assert!(text.contains("not signed by a CA walcast trusts"), "{text}");
    assert!(text.contains("sslrootcert"), "{text}");
}

#[tokio::test]
async fn a_certificate_for_another_host_name_is_refused_by_verify_full_only() {
    let (ok, text) = setup_with(|c| &c.other_name_cert, |c| verify_full(&c.ca)).await;
    assert!(!ok, "{text}");
    assert!(text.contains("WALCAST_SOURCE_URL"), "{text}");
    assert!(
        text.contains("not issued for the host name") && text.contains("sslmode=verify-ca"),
        "{text}"
    );
    let (ok, text) = setup_with(
        |c| &c.other_name_cert,
        |c| format!("sslmode=verify-ca&sslrootcert={}", c.ca.display()),
    )
    .await;
    assert!(ok, "verify-ca checks the CA, not the name: {text}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let (ok, text) = setup_with(|c| &c.expired_cert, |c| verify_full(&c.ca)).await;
    assert!(!ok, "{text}");
    assert!(text.contains("expired"), "{text}");
}

/// libpq's `require`: encrypted, the certificate not checked (any CA, any name).
#[tokio::test]
async fn sslmode_require_encrypts_without_verifying() {
    let (ok, text) = setup_with(|c| &c.other_name_cert, |_| "sslmode=require".to_owned()).await;
    assert!(ok, "{text}");
    let (ok, text) = setup_with(|c| &c.server_cert, |_| "sslmode=disable".to_owned()).await;
    assert!(!ok, "the server takes TLS only: {text}");
    assert!(text.contains("no pg_hba.conf entry"), "{text}");
}

#[tokio::test]
async fn a_redis_certificate_from_another_ca_is_refused() {
    let certs = Certs::make();
    let redis = Redis::start_tls(&certs, REDIS_PASSWORD).await;
    let pg = Postgres::start().await;
    pg.create_source_db("app").await;
    let env = Env::new(&pg, "app", &redis)
        .set("WALCAST_REDIS_CA_FILE", certs.other_ca.to_str().unwrap())
        .set(
            "WALCAST_REDIS_PASSWORD_FILE",
            &write_secret(certs.dir.path(), "redis-password", REDIS_PASSWORD),
        );
    let out = env.output(&["top"]);
    let text = String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("WALCAST_REDIS_URL"), "{text}");
    assert!(text.contains("WALCAST_REDIS_CA_FILE"), "{text}");
}

/// `cert` authentication: the server lets in only a client presenting a certificate its CA
/// signed for the user; walcast presents `sslcert`/`sslkey`, for the stream too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_authenticate_walcast_to_postgresql_and_redis() {
    let certs = Certs::make();
    let pg = Postgres::start_tls(&certs, &certs.server_cert, "cert").await;
    let db = pg.create_source_db("app").await;
    db.batch_execute(&format!(
        "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)
         VALUES ('{EPISODE}', 'episode', 'An episode', 'podcast', 300, now())"
    ))
    .await
    .unwrap();
    let redis = Redis::start_tls_with(&certs, REDIS_PASSWORD, true).await;
    let without = verify_full(&certs.ca);
    let with = format!(
        "{without}&sslcert={}&sslkey={}",
        certs.client_cert.display(),
        certs.client_key.display()
    );
    let mut env = Env::new(&pg, "app", &redis);
    env.put("WALCAST_SOURCE_URL", &pg.tls_url("app", &without));
    env.put("WALCAST_REDIS_CA_FILE", certs.ca.to_str().unwrap());
    env.put(
        "WALCAST_REDIS_PASSWORD_FILE",
        &write_secret(certs.dir.path(), "redis-password", REDIS_PASSWORD),
    );
    let out = env.output(&["setup"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "no client certificate, no entry: {said}"
    );
    assert!(said.contains("certificate"), "{said}");
    let out = env.output(&["top"]);
    assert!(
        !out.status.success(),
        "Redis asks for a client certificate too"
    );

    env.put("WALCAST_SOURCE_URL", &pg.tls_url("app", &with));
    env.put(
        "WALCAST_REDIS_CERT_FILE",
        certs.client_cert.to_str().unwrap(),
    );
    env.put("WALCAST_REDIS_KEY_FILE", certs.client_key.to_str().unwrap());
    let s = Stack { pg, redis, db, env };
    let _walcast = s.run();
    s.db.batch_execute(&insert(10)).await.unwrap();
    eventually("the events in both sinks", WAIT, || async {
        s.redis.total().await == 10 && count(&s.db, "analytics.enriched_events").await == 10
    })
    .await;
}
