//! The webhook sink: enriched events to a system walcast does not control, as batched
//! JSON POSTs.
//!
//! The receiver cannot store walcast's checkpoint atomically with what it does, so
//! delivery is at-least-once, made safe for the receiver by keys that never change:
//!
//! 1. Before a batch is sent, its exact body and `Idempotency-Key` (derived from its first
//!    and last position) are stored in `analytics.walcast_webhook_outbox`.
//! 2. It is POSTed, retried on 5xx, 408, timeouts and connection errors with exponential
//!    backoff and jitter, and after `Retry-After` on 429, within the retry budget.
//! 3. On 2xx one transaction removes the outbox row and moves the checkpoint
//!    (`analytics.walcast_checkpoint`, sink `webhook`) to the batch's last position. On
//!    another 4xx, or once the budget is spent, the batch goes to `analytics.dead_letters`
//!    in that same transaction (or, with `WALCAST_WEBHOOK_ON_FAILURE=block`, the sink keeps
//!    retrying and the acknowledgement waits).
//!
//! After a crash the outbox row is sent again first, byte for byte under the same key;
//! events after the checkpoint follow in new batches. A receiver that deduplicates by
//! `Idempotency-Key` (or by event id) therefore sees every event once.
//!
//! When `WALCAST_WEBHOOK_SECRET` is set, `Walcast-Signature: t=<unix seconds>,v1=<hex>`
//! carries HMAC-SHA256(secret, "<t>.<body>") (see [`sign`] and [`verify`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use hmac::{Hmac, Mac};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use sha2::Sha256;
use tokio_postgres::Client;

use serde_json::value::RawValue;

use super::{Progress, Sink, SinkError, claimed};
use crate::config::{OnFailure, Partition, WebhookArgs, WebhookEndpoint};
use crate::event::{Batch, Content, DeadLetterReason, EnrichedEvent, Hundredths};
use crate::health::Health;
use crate::lsn::{Position, SourceId};
use crate::metrics;
use crate::retry::backoff;
use crate::state::{self, Outbox, PgState, StateStore, migrate};

/// The sink's name in `analytics.walcast_checkpoint` and in metric labels.
pub const NAME: &str = crate::config::SinkKind::Webhook.name();
/// How the sink's analytics session appears in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "walcast-webhook-sink";
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";
pub const SIGNATURE_HEADER: &str = "Walcast-Signature";
/// How much of a rejecting response's body is kept.
const SNIPPET_CHARS: usize = 500;
/// The longest `Retry-After` honoured as given.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// How long the follower waits before looking for new facts after it found fewer than a
/// full batch: the webhook's latency over the analytics sink's, and ten small queries a
/// second on the analytics database while the stream is idle.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// `t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac(secret, timestamp, body))
    )
}

/// Whether `header` is a valid signature of `body` under `secret` (what a receiver
/// checks; it should also refuse a timestamp far from its clock).
pub fn verify(secret: &[u8], header: &str, body: &[u8]) -> bool {
    let mut timestamp = None;
    let mut signature = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v)) => signature = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any size");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&signature).is_ok()
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any size");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

/// How a delivery ended.
#[derive(Debug)]
pub enum Delivery {
    Delivered,
    /// A 4xx other than 408 and 429 (or a redirect): sending it again will not help.
    Rejected {
        status: u16,
        snippet: String,
    },
    /// The retry budget ran out.
    Exhausted {
        attempts: u32,
        last_error: String,
    },
}

/// One POST's outcome.
enum Attempt {
    Accepted,
    Retry {
        why: String,
        after: Option<Duration>,
    },
    Reject {
        status: u16,
        snippet: String,
    },
}

/// The HTTP side: POSTs one body until it is accepted, rejected or out of budget.
pub struct Deliverer {
    http: reqwest::Client,
    url: reqwest::Url,
    secret: Option<Vec<u8>>,
    budget: Duration,
    /// Where the follower's retries are reported while they go on (`health`'s entry).
    health: Option<(Arc<Health>, usize)>,
}

impl Deliverer {
    pub fn new(args: &WebhookEndpoint) -> Result<Self, SinkError> {
        let invalid = |e: &dyn std::fmt::Display| SinkError::Unsupported(e.to_string());
        let http = reqwest::Client::builder()
            .timeout(args.webhook_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("walcast/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| invalid(&e))?;
        Ok(Deliverer {
            http,
            url: args.url().map_err(|e| invalid(&e))?,
            secret: args.secret().map_err(|e| invalid(&e))?,
            budget: args.webhook_retry_budget,
            health: None,
        })
    }

    pub async fn deliver(&self, key: &str, body: &str) -> Delivery {
        let started = Instant::now();
        let mut attempts: u32 = 0;
        loop {
            attempts += 1;
            let (why, after) = match self.post(key, body).await {
                Attempt::Accepted => return Delivery::Delivered,
                Attempt::Reject { status, snippet } => {
                    return Delivery::Rejected { status, snippet };
                }
                Attempt::Retry { why, after } => (why, after),
            };
            let delay = after.map_or_else(|| backoff(attempts - 1), |d| d.min(MAX_RETRY_AFTER));
            if started.elapsed() + delay > self.budget {
                return Delivery::Exhausted {
                    attempts,
                    last_error: why,
                };
            }
            metrics::sink_failed(NAME, metrics::Failure::Retry);
            if let Some((health, index)) = &self.health {
                health.sink(*index).set_failing(true);
            }
            tracing::warn!(sink = NAME, key, error = %why, attempt = attempts, retry_in_ms = delay.as_millis() as u64, "webhook delivery failed, retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn post(&self, key: &str, body: &str) -> Attempt {
        let mut request = self
            .http
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_HEADER, key)
            .body(body.to_owned());
        if let Some(secret) = &self.secret {
            let signature = sign(secret, Utc::now().timestamp(), body.as_bytes());
            request = request.header(SIGNATURE_HEADER, signature);
        }
        let response = match request.send().await {
            Ok(response) => response,
            // Without the URL, which may carry credentials.
            Err(err) => {
                return Attempt::Retry {
                    why: err.without_url().to_string(),
                    after: None,
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            return Attempt::Accepted;
        }
        let after = retry_after(response.headers().get(RETRY_AFTER));
        if status.as_u16() == 429 || status.as_u16() == 408 || status.is_server_error() {
            return Attempt::Retry {
                why: format!("HTTP {status}"),
                after: if status.as_u16() == 429 { after } else { None },
            };
        }
        let text = response.text().await.unwrap_or_default();
        Attempt::Reject {
            status: status.as_u16(),
            snippet: text.chars().take(SNIPPET_CHARS).collect(),
        }
    }
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after(value: Option<&reqwest::header::HeaderValue>) -> Option<Duration> {
    let text = value?.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// A batch of `events` as it is sent, keyed `[<system id>/<timeline>:]<first>-<last>`.
fn outbox(events: &[&EnrichedEvent], source: Option<SourceId>) -> Outbox {
    let first = events.first().expect("a batch has events").position;
    let last = events.last().expect("a batch has events").position;
    let history = source.map_or(String::new(), |s| format!("{}:", s.stored()));
    Outbox {
        key: format!("{history}{}-{}", first.to_sortable(), last.to_sortable()),
        first,
        last,
        body: body(first, last, events),
    }
}

/// `{"batch": {"first": pos, "last": pos}, "events": [...]}`, a position being
/// `{"commit_lsn": "X/Y", "seq": n}`.
fn body(first: Position, last: Position, events: &[&EnrichedEvent]) -> String {
    let position = |p: Position| format!(r#"{{"commit_lsn":"{}","seq":{}}}"#, p.commit_lsn, p.seq);
    let mut out = format!(
        r#"{{"batch":{{"first":{},"last":{}}},"events":["#,
        position(first),
        position(last)
    );
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&event.to_json());
    }
    out.push_str("]}");
    out
}

/// The analytics database: checkpoint, outbox, dead letters.
struct Store {
    config: crate::pg::Target,
    client: Option<Client>,
}

fn pg(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SinkError {
    move |source| SinkError::Postgres { context, source }
}

impl Store {
    async fn client(&mut self) -> Result<&mut Client, SinkError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(crate::pg::connect("WALCAST_ANALYTICS_URL", &self.config).await?);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// The state on the connection.
    async fn state(&mut self) -> Result<PgState<'_, Client>, SinkError> {
        Ok(PgState::new(self.client().await?))
    }

    /// Which of `ids` the stream brought into `analytics.enriched_events`: the follower
    /// sends those (or has), under the stream's keys.
    async fn streamed(&mut self, ids: &[i64]) -> Result<std::collections::HashSet<i64>, SinkError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id FROM analytics.enriched_events WHERE id = ANY($1) AND NOT backfilled",
                &[&ids],
            )
            .await
            .map_err(pg("reading which backfilled events were streamed"))?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Up to `limit` events the stream brought into `analytics.enriched_events` after
    /// `after`, in position order (backfilled rows are left out: see sql/007).
    async fn facts_after(
        &mut self,
        after: Option<Position>,
        limit: usize,
        partition: Partition,
    ) -> Result<Vec<EnrichedEvent>, SinkError> {
        let (lsn, seq) = after.map_or(("0/0".to_owned(), -1), |p| {
            (p.commit_lsn.to_string(), self::seq(p))
        });
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let rows = client
            .query(
                FACTS_AFTER,
                &[
                    &lsn,
                    &seq,
                    &limit,
                    &i64::from(partition.count),
                    &i64::from(partition.index),
                ],
            )
            .await
            .map_err(pg("reading the analytics facts to send"))?;
        rows.iter().map(fact).collect()
    }
}

/// The facts the stream brought, after a position, in the stream's order: every column the
/// event JSON is made of. `$4`, `$5`: the partition's share (`id % count = index`; 1 and 0
/// for the whole stream).
const FACTS_AFTER: &str = "SELECT id, content_id::text, user_id::text, event_type,
    (extract(epoch FROM event_ts) * 1000000)::int8, duration_ms, device, raw_payload::text,
    extra::text, content_type, length_seconds, title, slug, engagement_seconds::text,
    engagement_pct::text, content_missing, commit_lsn::text, commit_seq,
    (extract(epoch FROM commit_ts) * 1000000)::int8
FROM analytics.enriched_events
WHERE NOT backfilled AND (commit_lsn, commit_seq) > ($1::text::pg_lsn, $2)
    AND id % $4 = $5
ORDER BY commit_lsn, commit_seq
LIMIT $3";

/// A row of [`FACTS_AFTER`] as the event it was made from.
fn fact(row: &tokio_postgres::Row) -> Result<EnrichedEvent, SinkError> {
    let bad = |what: &str| SinkError::Unsupported(format!("analytics.enriched_events: {what}"));
    let micros = |i: usize| {
        chrono::DateTime::from_timestamp_micros(row.get::<_, i64>(i))
            .ok_or_else(|| bad("a timestamp out of range"))
    };
    let hundredths = |i: usize| -> Result<Option<Hundredths>, SinkError> {
        row.get::<_, Option<String>>(i)
            .map(|text| Hundredths::parse(&text).ok_or_else(|| bad("an engagement value")))
            .transpose()
    };
    let raw_payload = row
        .get::<_, Option<String>>(7)
        .map(RawValue::from_string)
        .transpose()
        .map_err(|_| bad("raw_payload is not JSON"))?;
    let extra = match row.get::<_, Option<String>>(8) {
        None => Vec::new(),
        Some(text) => serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text)
            .map_err(|_| bad("extra is not a JSON object"))?
            .into_iter()
            .map(|(name, value)| {
                let value = match value {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(text) => Some(text),
                    other => Some(other.to_string()),
                };
                (name, value)
            })
            .collect(),
    };
    let content_id: Option<String> = row.get(1);
    let missing: bool = row.get(15);
    let content = match (&content_id, missing) {
        (Some(id), false) => Some(Arc::new(Content {
            id: id.clone(),
            content_type: row.get(9),
            length_seconds: row.get(10),
            title: row.get(11),
            slug: row.get(12),
        })),
        _ => None,
    };
    let lsn: String = row.get(16);
    let seq: i32 = row.get(17);
    Ok(EnrichedEvent {
        position: Position::new(
            lsn.parse().map_err(|_| bad("a commit_lsn"))?,
            u32::try_from(seq).map_err(|_| bad("a negative commit_seq"))?,
        ),
        commit_ts: micros(18)?,
        id: row.get(0),
        content_id,
        user_id: row.get(2),
        event_type: row.get(3),
        event_ts: micros(4)?,
        duration_ms: row.get(5),
        device: row.get(6),
        raw_payload,
        extra,
        content,
        engagement_seconds: hundredths(13)?,
        engagement_pct: hundredths(14)?,
    })
}

/// The webhook's own name for backfill `job`'s cursor: its cursor is not the other sinks'.
fn backfill_job(job: &str) -> String {
    format!("webhook/{job}")
}

fn seq(position: Position) -> i32 {
    i32::try_from(position.seq).unwrap_or(i32::MAX)
}

pub struct WebhookSink {
    deliverer: Deliverer,
    store: Store,
    batch_max_events: usize,
    on_failure: OnFailure,
    checkpoint: Option<Position>,
    /// A batch sent but not confirmed, read at start or kept after a failed write: sent
    /// again first, as it was.
    outbox: Option<Outbox>,
    /// The source's WAL history, part of every idempotency key: positions repeat across
    /// histories, keys must not.
    source: Option<SourceId>,
    /// Whether `walcast run` feeds this webhook from the analytics facts (the analytics
    /// sink is configured): a backfill then leaves out the events the stream brought there,
    /// which the follower sends, so no event goes under a stream key and a backfill key.
    pub skip_streamed: bool,
    /// The share of the events this webhook sends, and its rows in walcast's state:
    /// `webhook`, or `webhook:<i>` for partition i of a partitioned source.
    partition: Partition,
    state_name: String,
}

impl WebhookSink {
    /// The sink, not yet connected to the analytics database (see [`Sink::open`]).
    pub fn new(args: &WebhookArgs, mut analytics: crate::pg::Target) -> Result<Self, SinkError> {
        if analytics.get_application_name().is_none() {
            analytics.application_name(APPLICATION_NAME);
        }
        Ok(WebhookSink {
            deliverer: Deliverer::new(&args.endpoint)?,
            store: Store {
                config: analytics,
                client: None,
            },
            batch_max_events: args.webhook_batch_max_events.max(1),
            on_failure: args.webhook_on_failure,
            checkpoint: None,
            outbox: None,
            source: None,
            skip_streamed: false,
            partition: Partition::WHOLE,
            state_name: NAME.to_owned(),
        })
    }

    /// The webhook of one partition of the source: it follows that partition's facts and
    /// keeps its own checkpoint and outbox.
    pub fn for_partition(mut self, partition: Partition) -> Self {
        self.partition = partition;
        self.state_name = partition.state_name(NAME);
        self
    }

    /// Sends one batch and records the outcome. On an error the batch stays in
    /// `self.outbox`, so the retried write sends it again under the same key.
    async fn send(&mut self, outbox: Outbox) -> Result<(), SinkError> {
        let dead = match self.deliverer.deliver(&outbox.key, &outbox.body).await {
            Delivery::Delivered => None,
            failed if self.on_failure == OnFailure::Block => {
                let why = format!(
                    "batch {} not accepted ({failed:?}); WALCAST_WEBHOOK_ON_FAILURE=block holds the pipeline",
                    outbox.key
                );
                self.outbox = Some(outbox);
                return Err(SinkError::WebhookBlocked(why));
            }
            Delivery::Rejected { status, snippet } => {
                tracing::warn!(sink = NAME, key = %outbox.key, status, "webhook rejected a batch; dead-lettered");
                Some((
                    DeadLetterReason::WebhookRejected,
                    format!("HTTP {status}: {snippet}"),
                ))
            }
            Delivery::Exhausted {
                attempts,
                last_error,
            } => {
                tracing::warn!(sink = NAME, key = %outbox.key, attempts, "webhook retry budget spent; dead-lettered");
                Some((
                    DeadLetterReason::WebhookExhausted,
                    format!("gave up after {attempts} attempts: {last_error}"),
                ))
            }
        };
        let finished = self
            .store
            .state()
            .await?
            .finish_outbox(
                &self.state_name,
                &outbox,
                dead.as_ref().map(|(r, d)| (*r, d.as_str())),
            )
            .await;
        if let Err(err) = finished {
            self.outbox = Some(outbox);
            return Err(err.into());
        }
        if let Some((reason, _)) = dead {
            metrics::sink_failed(NAME, metrics::Failure::DeadLetter);
            metrics::dead_lettered(reason);
        }
        self.checkpoint = self.checkpoint.max(Some(outbox.last));
        Ok(())
    }

    /// Backfilled events: delivered in batches keyed by the backfill and the ids, with
    /// no outbox and no checkpoint (the stream's are not touched); the cursor is kept in
    /// `analytics.walcast_backfill` under `webhook/<job>`.
    async fn backfill(
        &mut self,
        batches: &[&Batch],
        job: &str,
        cursor: Option<i64>,
    ) -> Result<(), SinkError> {
        let mut events: Vec<&EnrichedEvent> = super::events(batches).collect();
        if self.skip_streamed {
            let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
            let streamed = self.store.streamed(&ids).await?;
            events.retain(|e| !streamed.contains(&e.id));
        }
        for chunk in events.chunks(self.batch_max_events) {
            let first = chunk[0];
            let last = chunk[chunk.len() - 1];
            let outbox = Outbox {
                key: format!("backfill-{job}-{}-{}", first.id, last.id),
                first: first.position,
                last: last.position,
                body: body(first.position, last.position, chunk),
            };
            match self.deliverer.deliver(&outbox.key, &outbox.body).await {
                Delivery::Delivered => {}
                failed => {
                    return Err(SinkError::WebhookBlocked(format!(
                        "backfill batch {} not accepted: {failed:?}",
                        outbox.key
                    )));
                }
            }
        }
        self.store
            .state()
            .await?
            .save_backfill_cursor(&backfill_job(job), cursor)
            .await?;
        Ok(())
    }
}

/// Following the analytics facts (the transactional-outbox pattern): with the analytics
/// sink enabled, `walcast run` does not give the webhook the stream at all. The analytics
/// sink's transactions are a durable, ordered log of every streamed event, each once
/// (`analytics.enriched_events`, one row per id, in position order); the webhook reads it
/// after its own checkpoint and delivers it as above. So a webhook that fails, rate-limits
/// or hangs holds back neither the slot nor Redis nor analytics: it falls behind, and
/// catches up from the facts, in commit order, under keys made of stored positions. After
/// a replication reconnect the replayed events never reach it, since the analytics sink
/// skipped them by its checkpoint.
impl WebhookSink {
    /// Fixes where following starts when the webhook holds no checkpoint (it is new, or
    /// was added to `WALCAST_SINKS`): after what the analytics sink holds, recorded at once
    /// so a restart starts there too. Events before it are sent by `walcast backfill`.
    /// Returns the checkpoint followed from.
    pub async fn start_following(&mut self) -> Result<Option<Position>, SinkError> {
        if self.checkpoint.is_none() {
            let mut state = self.store.state().await?;
            self.checkpoint = state::start_following(
                &mut state,
                &self.state_name,
                &self.partition.state_name(super::postgres::NAME),
            )
            .await?;
            if let Some(at) = self.checkpoint {
                tracing::info!(sink = NAME, from = %at, "the webhook holds no checkpoint: it starts after the events the analytics sink holds (walcast backfill sends earlier ones)");
            }
        }
        Ok(self.checkpoint)
    }

    /// Delivers the facts as they arrive, forever; failures are retried with backoff and
    /// reported in `health` (entry `index`) as a note, not as unreadiness.
    pub async fn follow(mut self, health: Arc<Health>, index: usize) {
        let state = health.sink(index);
        state.set_reachable(true);
        if let Some(at) = self.checkpoint {
            state.set_confirmed(at.commit_lsn);
        }
        self.deliverer.health = Some((Arc::clone(&health), index));
        let mut attempt: u32 = 0;
        loop {
            match self.follow_once().await {
                Ok(sent) => {
                    if attempt > 0 {
                        tracing::info!(sink = NAME, "webhook deliveries resumed");
                    }
                    attempt = 0;
                    state.set_failing(false);
                    if let Some(at) = self.checkpoint {
                        state.set_confirmed(at.commit_lsn);
                    }
                    if sent < self.batch_max_events {
                        tokio::time::sleep(FOLLOW_POLL).await;
                    }
                }
                Err(error) => {
                    state.set_failing(true);
                    let delay = backoff(attempt);
                    attempt = attempt.saturating_add(1);
                    metrics::sink_failed(NAME, metrics::Failure::Retry);
                    tracing::warn!(sink = NAME, error = %crate::error::Chain(&error), attempt, retry_in_ms = delay.as_millis() as u64, "webhook follower failed, retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Sends what is unconfirmed, then the next batch of facts; returns how many events
    /// the new batch had.
    async fn follow_once(&mut self) -> Result<usize, SinkError> {
        if let Some(outbox) = self.outbox.take() {
            self.send(outbox).await?;
        }
        let events = self
            .store
            .facts_after(self.checkpoint, self.batch_max_events, self.partition)
            .await?;
        if events.is_empty() {
            return Ok(0);
        }
        let started = Instant::now();
        let outbox = outbox(&events.iter().collect::<Vec<_>>(), self.source);
        self.store
            .state()
            .await?
            .save_outbox(&self.state_name, &outbox)
            .await?;
        self.send(outbox).await?;
        let batch = Batch {
            events,
            ..Batch::default()
        };
        metrics::sink_written(NAME, &[&batch], started.elapsed(), Utc::now());
        Ok(batch.events.len())
    }
}

impl Sink for WebhookSink {
    /// Connects to the analytics database, applying the migrations that are missing: the
    /// webhook keeps its checkpoint, outbox and dead letters there.
    async fn open(&mut self) -> Result<(), SinkError> {
        for version in migrate(self.store.client().await?).await? {
            tracing::info!(sink = NAME, version, "analytics migration applied");
        }
        Ok(())
    }

    fn has_write_deadline(&self) -> bool {
        false
    }

    async fn claim_history(&mut self, current: SourceId) -> Result<(), SinkError> {
        let mut state = self.store.state().await?;
        claimed(
            state::claim_history(&mut state, &self.state_name, current).await?,
            current,
        )?;
        self.source = Some(current);
        Ok(())
    }

    fn name(&self) -> &'static str {
        NAME
    }

    async fn checkpoint(&mut self) -> Result<Option<Position>, SinkError> {
        let mut state = self.store.state().await?;
        let checkpoint = state.checkpoint(&self.state_name).await?;
        let outbox = state.outbox(&self.state_name).await?;
        if let Some(outbox) = &outbox {
            tracing::info!(sink = NAME, key = %outbox.key, "a batch sent before the restart is unconfirmed; sending it again first");
        }
        self.checkpoint = checkpoint;
        self.outbox = outbox;
        Ok(checkpoint)
    }

    async fn write(&mut self, batches: &[&Batch]) -> Result<(), SinkError> {
        if let Progress::Backfill { job, cursor } = Progress::of(batches) {
            return self.backfill(batches, job, cursor).await;
        }
        if let Some(outbox) = self.outbox.take() {
            self.send(outbox).await?;
        }
        // Filtered against a running position, not only the checkpoint: after a replication
        // reconnect one write can hold the old session's batches and the new session's
        // replay of them, and each event must go once, in order, under one key.
        let mut running = self.checkpoint;
        let events: Vec<&EnrichedEvent> = super::events(batches)
            .filter(|e| {
                let fresh = running.is_none_or(|at| e.position > at);
                if fresh {
                    running = Some(e.position);
                }
                fresh
            })
            .collect();
        for chunk in events.chunks(self.batch_max_events) {
            let outbox = outbox(chunk, self.source);
            self.store
                .state()
                .await?
                .save_outbox(&self.state_name, &outbox)
                .await?;
            self.send(outbox).await?;
        }
        Ok(())
    }

    async fn backfill_cursor(&mut self, job: &str) -> Result<Option<i64>, SinkError> {
        let mut state = self.store.state().await?;
        Ok(state.backfill_cursor(&backfill_job(job)).await?)
    }
}

/// `walcast dead-letters replay --sink webhook`: sends every webhook dead letter not yet
/// replayed again, oldest first, under its original key; marks each one that is accepted.
/// Returns (replayed, still failing).
pub async fn replay(
    deliverer: &Deliverer,
    state: &mut impl StateStore,
) -> Result<(u64, u64), SinkError> {
    let (mut replayed, mut failed) = (0, 0);
    for letter in state.unreplayed().await? {
        let key = letter
            .key
            .unwrap_or_else(|| format!("dead-letter-{}", letter.id));
        match deliverer.deliver(&key, &letter.body).await {
            Delivery::Delivered => {
                state.mark_replayed(letter.id).await?;
                replayed += 1;
            }
            failed_delivery => {
                tracing::warn!(dead_letter = letter.id, key, outcome = ?failed_delivery, "replay not accepted");
                failed += 1;
            }
        }
    }
    Ok((replayed, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_with_the_secret_only() {
        let header = sign(b"secret", 1_700_000_000, br#"{"a":1}"#);
        assert!(header.starts_with("t=1700000000,v1="));
        assert!(verify(b"secret", &header, br#"{"a":1}"#));
        assert!(!verify(b"wrong", &header, br#"{"a":1}"#));
        assert!(!verify(b"secret", &header, br#"{"a":2}"#));
        assert!(!verify(b"secret", "v1=00", br#"{"a":1}"#));
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let value = |s: &str| reqwest::header::HeaderValue::from_str(s).unwrap();
        assert_eq!(retry_after(Some(&value("2"))), Some(Duration::from_secs(2)));
        assert_eq!(
            retry_after(Some(&value("Wed, 21 Oct 2015 07:28:00 GMT"))),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(Some(&value("soon"))), None);
        assert_eq!(retry_after(None), None);
    }
}
