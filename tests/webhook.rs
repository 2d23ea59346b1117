//! The webhook sink against a small real HTTP receiver inside the test process: order,
//! idempotency keys across a kill -9, retries, Retry-After, dead letters and their replay,
//! isolation from Redis, signatures.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{
    EPISODE, Redis, Stack, count, episode_sql, eventually, load_plays, metric, scrape_metrics,
    wait_for,
};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use walcast::sink::webhook::verify;

const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "s3cret";

/// What the receiver answers to its n-th request (from 0).
#[derive(Clone, Copy)]
pub(crate) enum Reply {
    Ok,
    Status(u16),
    RetryAfter(u64),
    /// Sleep, then 200.
    Slow(Duration),
}

#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) key: String,
    signature: Option<String>,
    pub(crate) body: Bytes,
    at: Instant,
    status: u16,
    /// When the response was sent (after any sleep).
    answered: Option<Instant>,
}

type Script = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

/// A webhook receiver: every request logged, answered as a script says.
#[derive(Clone)]
pub(crate) struct Receiver {
    pub(crate) url: String,
    log: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    pub(crate) async fn start(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Receiver {
        let log: Arc<Mutex<Vec<Received>>> = Arc::default();
        let script: Script = Arc::new(script);
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state((Arc::clone(&log), script));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { url, log }
    }

    /// Answers the first request with `first`, every later one with 200.
    async fn first_then_ok(first: Reply) -> Receiver {
        Receiver::start(move |n| if n == 0 { first } else { Reply::Ok }).await
    }

    pub(crate) fn requests(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    /// Event ids of accepted requests, one request per key, in order of arrival.
    pub(crate) fn delivered(&self) -> Vec<i64> {
        let mut seen = BTreeSet::new();
        let mut ids = Vec::new();
        for request in self.requests() {
            if request.status == 200
                && request.answered.is_some()
                && seen.insert(request.key.clone())
            {
                ids.extend(event_ids(&request.body));
            }
        }
        ids
    }
}

impl Receiver {
    /// The idempotency keys each event travelled under, over every request.
    pub(crate) fn keys_by_event(&self) -> BTreeMap<i64, BTreeSet<String>> {
        let mut keys_of: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
        for request in self.requests() {
            for id in event_ids(&request.body) {
                keys_of.entry(id).or_default().insert(request.key.clone());
            }
        }
        keys_of
    }

    /// Up to five events that travelled under more than one key, with their keys.
    pub(crate) fn under_two_keys(&self) -> Vec<(i64, BTreeSet<String>)> {
        self.keys_by_event()
            .into_iter()
            .filter(|(_, keys)| keys.len() > 1)
            .take(5)
            .collect()
    }
}

pub(crate) fn event_ids(body: &[u8]) -> Vec<i64> {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap();
    value["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect()
}

async fn receive(
    State((log, script)): State<(Arc<Mutex<Vec<Received>>>, Script)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let index = {
        let mut log = log.lock().unwrap();
        log.push(Received {
            key: header("idempotency-key").unwrap_or_default(),
            signature: header("walcast-signature"),
            body,
            at: Instant::now(),
            status: 0,
            answered: None,
        });
        log.len() - 1
    };
    let reply = script(index);
    let (status, response) = match reply {
        Reply::Ok => (200, StatusCode::OK.into_response()),
        Reply::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap();
            (code, (status, "bad payload: field x").into_response())
        }
        Reply::RetryAfter(seconds) => (
            429,
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", seconds.to_string())],
            )
                .into_response(),
        ),
        Reply::Slow(delay) => {
            tokio::time::sleep(delay).await;
            (200, StatusCode::OK.into_response())
        }
    };
    let mut log = log.lock().unwrap();
    log[index].status = status;
    log[index].answered = Some(Instant::now());
    response
}

async fn stack(receiver: &Receiver) -> Stack {
    let mut s = Stack::start(Redis::start().await, &episode_sql()).await;
    s.env.put("WALCAST_SINKS", "redis,postgres,webhook");
    s.env.put("WALCAST_WEBHOOK_URL", &receiver.url);
    s.env.put("WALCAST_WEBHOOK_SECRET", SECRET);
    s.env.put("WALCAST_WEBHOOK_BATCH_MAX_EVENTS", "50");
    s
}

async fn source_ids(s: &Stack) -> Vec<i64> {
    s.db.query("SELECT id FROM engagement_events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_in_order_and_a_kill_9_resends_under_the_same_key() {
    let receiver = Receiver::start(|_| Reply::Slow(Duration::from_millis(100))).await;
    let s = stack(&receiver).await;
    let mut walcast = s.run();
    let writer = {
        let db = s.pg.client("app").await;
        tokio::spawn(async move { load_plays(&db, 3_000, 30).await })
    };
    eventually("part of the load delivered", WAIT, || async {
        receiver.delivered().len() >= 600
    })
    .await;
    // Kill while a request is in flight (the receiver takes 100 ms over each).
    walcast.kill9();
    writer.await.unwrap();
    let _walcast = s.env.spawn_run();
    let expected = source_ids(&s).await;
    eventually("every event delivered", WAIT, || async {
        receiver.delivered().len() >= expected.len()
    })
    .await;

    let delivered = receiver.delivered();
    assert_eq!(delivered, expected, "each event once, in commit order");
    // However often a batch was sent, its events always travelled under one key.
    let resent = receiver.under_two_keys();
    assert!(resent.is_empty(), "events sent under two keys: {resent:?}");
    let keys_of = receiver.keys_by_event();
    let requests = receiver.requests();
    for request in &requests {
        let signature = request.signature.as_deref().expect("signed");
        assert!(verify(SECRET.as_bytes(), signature, &request.body));
        assert!(!verify(b"wrong secret", signature, &request.body));
    }
    eprintln!(
        "{} requests for {} events ({} repeated after the kill)",
        requests.len(),
        delivered.len(),
        requests.len() - keys_of.values().flatten().collect::<BTreeSet<_>>().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_until_accepted() {
    let receiver = Receiver::start(|n| if n < 4 { Reply::Status(503) } else { Reply::Ok }).await;
    let s = stack(&receiver).await;
    let _walcast = s.run();
    load_plays(&s.db, 100, 100).await;
    let expected = source_ids(&s).await;
    eventually("delivered after the errors", WAIT, || async {
        receiver.delivered() == expected
    })
    .await;
    let requests = receiver.requests();
    assert!(requests[..4].iter().all(|r| r.status == 503));
    assert_eq!(requests[4].status, 200);
    assert!(
        requests[..5].iter().all(|r| r.key == requests[0].key),
        "retries reuse the key"
    );
    assert_eq!(count(&s.db, "analytics.dead_letters").await, 0);
    let m = scrape_metrics(s.env.metrics_port).await;
    assert!(
        metric(
            &m,
            r#"walcast_sink_batches_total{sink="webhook",outcome="retry"}"#
        )
        .is_some_and(|n| n >= 4.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_waits_as_long_as_retry_after_says() {
    let receiver = Receiver::first_then_ok(Reply::RetryAfter(2)).await;
    let s = stack(&receiver).await;
    let _walcast = s.run();
    load_plays(&s.db, 1, 1).await;
    eventually("delivered", WAIT, || async {
        receiver.delivered().len() == 1
    })
    .await;
    let requests = receiver.requests();
    let waited = requests[1].at - requests[0].at;
    eprintln!("retried {waited:?} after a 429 with Retry-After: 2");
    assert!(
        waited >= Duration::from_millis(1_900) && waited < Duration::from_secs(5),
        "waited {waited:?} after Retry-After: 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_batch_is_dead_lettered_later_ones_flow_and_replay_resends_it() {
    let receiver = Receiver::first_then_ok(Reply::Status(400)).await;
    let s = stack(&receiver).await;
    let _walcast = s.run();
    load_plays(&s.db, 3, 3).await;
    eventually("the dead letter", WAIT, || async {
        count(&s.db, "analytics.dead_letters").await == 1
    })
    .await;
    let row =
        s.db.query_one(
            "SELECT origin, reason, detail, idempotency_key, jsonb_array_length(raw->'events')
             FROM analytics.dead_letters",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "webhook");
    assert_eq!(row.get::<_, String>(1), "webhook_rejected");
    let detail: String = row.get(2);
    assert!(
        detail.contains("HTTP 400") && detail.contains("bad payload"),
        "{detail}"
    );
    let key: String = row.get(3);
    let rejected = receiver.requests()[0].clone();
    assert_eq!(key, rejected.key);
    let rejected_ids = event_ids(&rejected.body);
    assert_eq!(
        row.get::<_, i32>(4) as usize,
        rejected_ids.len(),
        "the whole batch is kept"
    );

    load_plays(&s.db, 2, 2).await;
    eventually("later batches flow", WAIT, || async {
        receiver.delivered().len() == 5 - rejected_ids.len()
    })
    .await;
    let m = scrape_metrics(s.env.metrics_port).await;
    assert_eq!(
        metric(
            &m,
            r#"walcast_dead_letters_total{reason="webhook_rejected"}"#
        ),
        Some(1.0)
    );

    let out = s
        .env
        .output(&["dead-letters", "replay", "--sink", "webhook"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("replayed 1"), "{stdout}");
    let last = receiver.requests().last().cloned().unwrap();
    assert_eq!(last.key, key, "replayed under its original key");
    assert_eq!(event_ids(&last.body), rejected_ids);
    let replayed: bool =
        s.db.query_one(
            "SELECT replayed_at IS NOT NULL FROM analytics.dead_letters",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(replayed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_webhook_does_not_delay_redis() {
    let receiver = Receiver::start(|_| Reply::Slow(Duration::from_secs(5))).await;
    let s = stack(&receiver).await;
    let _walcast = s.run();
    for round in 1..=3 {
        load_plays(&s.db, 1, 1).await;
        let committed = Instant::now();
        eventually("the event in Redis", Duration::from_secs(2), || async {
            s.redis.total().await == round
        })
        .await;
        eprintln!(
            "round {round}: in Redis {:?} after commit",
            committed.elapsed()
        );
    }
    // All three are in Redis while the webhook has not answered the first request yet.
    eventually("the webhook called", WAIT, || async {
        !receiver.requests().is_empty()
    })
    .await;
    let requests = receiver.requests();
    assert!(
        requests.iter().all(|r| r.answered.is_none()),
        "Redis did not wait for the webhook"
    );
}

/// With the analytics sink, the webhook follows its facts: a batch it will not take holds
/// back nothing but the webhook itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_failure_block_the_batch_is_retried_and_nothing_else_waits() {
    on_failure_block(true).await;
}

/// Without the analytics sink there is no durable log to follow: the webhook is fed from
/// the stream, and the acknowledgement waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_analytics_on_failure_block_holds_the_acknowledgement() {
    on_failure_block(false).await;
}

async fn on_failure_block(with_analytics: bool) {
    let accept = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = {
        let accept = Arc::clone(&accept);
        Receiver::start(move |_| {
            if accept.load(std::sync::atomic::Ordering::Relaxed) {
                Reply::Ok
            } else {
                Reply::Status(400)
            }
        })
        .await
    };
    let mut s = stack(&receiver).await;
    s.env.put("WALCAST_WEBHOOK_ON_FAILURE", "block");
    if !with_analytics {
        s.env.put("WALCAST_SINKS", "redis,webhook");
    }
    let _walcast = s.run();
    load_plays(&s.db, 1, 1).await;
    eventually(
        "in Redis, and refused by the webhook three times",
        WAIT,
        || async { s.redis.total().await == 1 && receiver.requests().len() >= 3 },
    )
    .await;
    let event = s.redis.event(source_ids(&s).await[0]).await.unwrap();
    let commit: walcast::lsn::Lsn = event["commit_lsn"].as_str().unwrap().parse().unwrap();
    assert_eq!(count(&s.db, "analytics.dead_letters").await, 0);
    if with_analytics {
        // Nothing held: the slot passes the event, analytics has it, /readyz is ready and
        // says what the webhook is doing.
        eventually("the slot moves past the event", WAIT, || async {
            crate::support::confirmed_flush(&s.db, "walcast")
                .await
                .unwrap()
                > commit.0
        })
        .await;
        assert_eq!(count(&s.db, "analytics.enriched_events").await, 1);
        let (status, body) = crate::support::http_get(s.env.metrics_port, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("note: sink webhook deliveries are failing"),
            "{body}"
        );
    } else {
        // Held: the slot short of the event's commit, /readyz says why.
        let flushed = crate::support::confirmed_flush(&s.db, "walcast")
            .await
            .unwrap();
        assert!(flushed < commit.0, "slot at {flushed:X} passed {commit}");
        let (status, body) = crate::support::http_get(s.env.metrics_port, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("sink webhook writes are failing"), "{body}");
    }

    accept.store(true, std::sync::atomic::Ordering::Relaxed);
    eventually("delivered once accepted", WAIT, || async {
        receiver.delivered().len() == 1
    })
    .await;
    let requests = receiver.requests();
    assert!(
        requests.iter().all(|r| r.key == requests[0].key),
        "every attempt under one key"
    );
    eventually("the slot moves past the event", WAIT, || async {
        crate::support::confirmed_flush(&s.db, "walcast")
            .await
            .unwrap()
            > commit.0
    })
    .await;
    assert_eq!(count(&s.db, "analytics.dead_letters").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_retry_budget_dead_letters_the_batch() {
    let receiver = Receiver::start(|n| if n < 6 { Reply::Status(503) } else { Reply::Ok }).await;
    let mut s = stack(&receiver).await;
    s.env.put("WALCAST_WEBHOOK_RETRY_BUDGET", "1s");
    let _walcast = s.run();
    load_plays(&s.db, 1, 1).await;
    eventually("the dead letter", WAIT, || async {
        count(&s.db, "analytics.dead_letters").await == 1
    })
    .await;
    let row =
        s.db.query_one(
            "SELECT reason, detail FROM analytics.dead_letters WHERE origin = 'webhook'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "webhook_exhausted");
    let detail: String = row.get(1);
    assert!(
        detail.starts_with("gave up after") && detail.contains("503"),
        "{detail}"
    );
    let spent = receiver.requests().last().unwrap().at - receiver.requests()[0].at;
    assert!(
        spent < Duration::from_secs(2),
        "retried for {spent:?} on a 1 s budget"
    );
}

/// After replication reconnects, one write can hold the old session's batches and the new
/// session's replay of them: every event still goes once, in order, under one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_reconnects_send_no_event_under_two_keys() {
    let receiver = Receiver::start(|_| Reply::Slow(Duration::from_millis(300))).await;
    let s = stack(&receiver).await;
    let walcast = s.run();
    let writer = {
        let db = s.pg.client("app").await;
        tokio::spawn(async move { load_plays(&db, 30 * 120, 120).await })
    };
    let mut ended = 0;
    for _ in 0..7 {
        // Wait for the next session's walsender (walcast reconnected), then end it.
        let pid: i32 = wait_for("a new walsender", WAIT, || async {
            s.db.query_opt(
                "SELECT pid FROM pg_stat_replication WHERE application_name = 'walcast' AND pid <> $1",
                &[&ended],
            )
            .await
            .unwrap()
            .map(|row| row.get(0))
        })
        .await;
        s.db.execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
        ended = pid;
    }
    writer.await.unwrap();
    let expected = source_ids(&s).await;
    eventually(
        "every event delivered",
        Duration::from_secs(120),
        || async { receiver.delivered().len() >= expected.len() },
    )
    .await;
    let twice = receiver.under_two_keys();
    assert!(twice.is_empty(), "events sent under two keys: {twice:?}");
    assert_eq!(
        receiver.delivered(),
        expected,
        "each event once, in commit order"
    );
    assert!(
        walcast.log().contains("replication resumed"),
        "{}",
        walcast.log()
    );
}

/// The webhook follows the analytics facts: what it sends is, key for key, the event
/// Redis got from the stream, whatever the row holds (NULLs, unknown content, JSON
/// payloads, added columns, one of them named like an enrichment key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_sends_the_events_redis_has() {
    let receiver = Receiver::start(|_| Reply::Ok).await;
    let s = stack(&receiver).await;
    s.db.batch_execute(
        "ALTER TABLE engagement_events ADD COLUMN region TEXT, ADD COLUMN title INTEGER,
             DROP CONSTRAINT engagement_events_content_id_fkey",
    )
    .await
    .unwrap();
    let _walcast = s.run();
    s.db.batch_execute(&format!(
        r#"INSERT INTO engagement_events
             (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload, region, title)
         VALUES
             ('{EPISODE}', gen_random_uuid(), 'play', now(), 12345, 'ios',
              '{{"b": [1, 2.5, null], "a": {{"nested": "é \"q\""}}}}', 'eu', 7),
             ('{EPISODE}', NULL, 'pause', '2026-01-02 03:04:05.678901+00', NULL, NULL, NULL, NULL, NULL),
             ('00000000-0000-0000-0000-0000000000ff', gen_random_uuid(), 'click', now(), 1, 'web', '[]', 'us', NULL),
             (NULL, gen_random_uuid(), 'finish', now(), 333333, 'tv', '{{}}', NULL, -1)"#
    ))
    .await
    .unwrap();
    let ids = source_ids(&s).await;
    eventually("every event delivered", WAIT, || async {
        receiver.delivered().len() == ids.len()
    })
    .await;
    let mut sent = Vec::new();
    for request in receiver.requests().iter().filter(|r| r.status == 200) {
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        sent.extend(body["events"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(sent.len(), ids.len());
    for event in &sent {
        let id = event["id"].as_i64().unwrap();
        let in_redis = s.redis.event(id).await.expect("the event in Redis");
        assert_eq!(event, &in_redis, "event {id}: webhook against Redis");
    }
    assert_eq!(sent[0]["extra"]["title"], "7", "{}", sent[0]);
    assert_eq!(sent[0]["region"], "eu");
}

/// Commit → visible in Redis, measured from outside while ~500 events/s stream in for
/// `seconds`: one probe event every 200 ms, each waited for in Redis.
async fn redis_latencies(s: &Stack, seconds: u64) -> Vec<Duration> {
    let writer = {
        let db = s.pg.client("app").await;
        tokio::spawn(async move {
            for _ in 0..seconds * 20 {
                load_plays(&db, 25, 25).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut latencies = Vec::new();
    while !writer.is_finished() {
        let id: i64 = s
            .db
            .query_one(
                &format!(
                    "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, device)
                     VALUES ('{EPISODE}', gen_random_uuid(), 'play', now(), 'probe') RETURNING id"
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let committed = Instant::now();
        eventually("the probe's event in Redis", WAIT, || async {
            s.redis.event(id).await.is_some()
        })
        .await;
        latencies.push(committed.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    writer.await.unwrap();
    latencies.sort();
    latencies
}

fn summary(latencies: &[Duration]) -> String {
    format!(
        "{} probes: p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100],
        latencies[latencies.len() - 1]
    )
}

/// A webhook answering 503 holds back neither Redis, nor analytics, nor the slot; once it
/// answers again it gets every event, in commit order, each under one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_holds_back_neither_redis_nor_the_slot() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = {
        let failing = Arc::clone(&failing);
        Receiver::start(move |_| {
            if failing.load(std::sync::atomic::Ordering::Relaxed) {
                Reply::Status(503)
            } else {
                Reply::Ok
            }
        })
        .await
    };
    let mut s = stack(&receiver).await;
    s.env.put("WALCAST_WEBHOOK_BATCH_MAX_EVENTS", "500");
    let _walcast = s.run();
    let healthy = redis_latencies(&s, 8).await;
    eventually("the webhook has everything so far", WAIT, || async {
        receiver.delivered().len() == s.source_count().await as usize
    })
    .await;
    let before = receiver.delivered().len();

    failing.store(true, std::sync::atomic::Ordering::Relaxed);
    let outage = redis_latencies(&s, 8).await;
    let expected = source_ids(&s).await;
    let end = crate::support::current_lsn(&s.db).await;
    eventually("Redis and analytics hold every event", WAIT, || async {
        s.redis.total().await == expected.len() as i64
            && count(&s.db, "analytics.enriched_events").await == expected.len() as i64
    })
    .await;
    eventually("the slot past the load", WAIT, || async {
        crate::support::confirmed_flush(&s.db, "walcast")
            .await
            .unwrap()
            >= end
    })
    .await;
    let behind = crate::support::current_lsn(&s.db).await
        - crate::support::confirmed_flush(&s.db, "walcast")
            .await
            .unwrap();
    assert_eq!(
        receiver.delivered().len(),
        before,
        "the webhook accepted nothing during the outage"
    );
    let failed = receiver
        .requests()
        .iter()
        .filter(|r| r.status == 503)
        .count();
    assert!(failed >= 2, "the webhook was tried and retried");
    eprintln!(
        "commit → Redis with the webhook accepting: {}; answering 503: {}; {} events of the \
         outage in Redis and analytics, and the slot past them ({behind} bytes behind the \
         server's WAL) before the webhook accepted any",
        summary(&healthy),
        summary(&outage),
        expected.len() - before
    );

    failing.store(false, std::sync::atomic::Ordering::Relaxed);
    eventually("the webhook caught up", WAIT, || async {
        receiver.delivered().len() >= expected.len()
    })
    .await;
    // Two writers: ids are not in commit order. The stream's positions are.
    let in_commit_order: Vec<i64> =
        s.db.query(
            "SELECT id FROM analytics.enriched_events ORDER BY commit_lsn, commit_seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        receiver.delivered(),
        in_commit_order,
        "each event once, in commit order"
    );
    let twice = receiver.under_two_keys();
    assert!(twice.is_empty(), "events sent under two keys: {twice:?}");
}

/// A backfill over events the webhook got from the stream sends them no second time (under
/// a backfill key); the ones the stream never brought to the analytics facts it sends, and
/// the stream's later replay of those sends nothing either: every event once, under one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_sends_only_what_the_stream_did_not() {
    let receiver = Receiver::start(|_| Reply::Ok).await;
    let s = stack(&receiver).await;
    let mut walcast = s.run();
    load_plays(&s.db, 20, 5).await;
    eventually("the streamed events delivered", WAIT, || async {
        receiver.delivered().len() == 20
    })
    .await;
    walcast.terminate().await;
    // Five more while walcast is stopped: in the slot, not yet in the sinks.
    load_plays(&s.db, 5, 5).await;
    s.env.succeed(&["backfill"]);
    let expected = source_ids(&s).await;
    assert_eq!(
        receiver.delivered(),
        expected,
        "the backfill sent the five, not the twenty again"
    );
    // The stream now replays the five: the analytics sink has them, the webhook sends
    // nothing more.
    let _walcast = s.env.spawn_run();
    let end = crate::support::current_lsn(&s.db).await;
    eventually("the slot past the replay", WAIT, || async {
        crate::support::confirmed_flush(&s.db, "walcast")
            .await
            .unwrap()
            >= end
    })
    .await;
    // One more event, after the replay in commit order: once the webhook has it, it would
    // have had anything the replay made it send.
    load_plays(&s.db, 1, 1).await;
    let expected = source_ids(&s).await;
    eventually("the event after the replay delivered", WAIT, || async {
        receiver.delivered().last() == expected.last()
    })
    .await;
    assert_eq!(receiver.delivered(), expected, "every event once");
    let twice = receiver.under_two_keys();
    assert!(twice.is_empty(), "events sent under two keys: {twice:?}");
}
