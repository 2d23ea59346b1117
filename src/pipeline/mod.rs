//! The streaming pipeline: source loop, batching, fan-out, acknowledgement, shutdown.
//!
//! ```text
//!  replication stream ──▶ source loop ──▶ [batches, bounded] ──▶ fan-out ──▶ sinks
//!        ▲                (decode, enrich, batch)                   │
//!        └──────── flush LSN ◀──── watch ◀──── AckTracker ◀─────────┘
//! ```
//!
//! The source loop is the only owner of the replication client: it reads, and it reports
//! the flush position the fan-out publishes (see `ack`, "Progress tracking").

mod ack;
mod batch;
pub(crate) mod fanout;
mod rebuild;

pub use ack::AckTracker;
pub use batch::Batcher;
pub use fanout::{FanoutError, QueueLimits, Sinks};

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pgwire_replication::{ReplicationClient, ReplicationEvent};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use crate::config::{Destinations, RunConfig, SinkKind, SourceArgs};
use crate::decode::{self, Change};
use crate::enrich::{ContentCache, Enricher, Outcome};
use crate::event::Batch;
use crate::health::{self, Health, Probe};
use crate::lsn::{Lsn, Position, SourceId};
use crate::metrics::{self, ChangeCounts};
use crate::sink::Sink;
use crate::sink::postgres::PostgresSink;
use crate::sink::redis::RedisSink;
use crate::sink::webhook::WebhookSink;
use crate::{Error, source};

/// Batches the source may have closed ahead of the fan-out.
const BATCH_QUEUE: usize = 2;
/// Full batches' worth of rows (and of bytes) each sink may have queued.
const SINK_QUEUE_BATCHES: usize = 2;
/// Messages the replication client may buffer ahead of the source loop (its default is
/// 8,192). It counts messages, not bytes, and a row is one message: with rows of a
/// megabyte this is what the buffer can hold, 32 MB; with rows of a few hundred bytes
/// it is well under a batch, and the socket's buffers hold the rest.
pub(crate) const REPLICATION_BUFFER_MESSAGES: usize = 32;
/// How long `run` waits at start for a slot that is still held before it gives up.
const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(30);
/// How long shutdown waits, after the sinks, for the final status update to reach
/// PostgreSQL and the slot to show it.
const FINAL_ACK_WAIT: Duration = Duration::from_secs(5);
/// How long shutdown waits for the sinks to confirm what they were given. A sink that
/// hangs (a stopped server, a webhook retrying under `block`) does not keep the process
/// alive past it: walcast acknowledges what every sink confirmed and exits; the next
/// start replays the rest, and the checkpoints skip what was applied after all.
const SHUTDOWN_DRAIN_WAIT: Duration = Duration::from_secs(10);
/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Streams until `shutdown` completes or an error stops it.
pub async fn run(config: RunConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    config.validate()?;
    let mut shutdown = std::pin::pin!(shutdown);
    let layout = Layout::of(&config.destinations);
    let health = Health::with_followers(&layout.fanned.sinks.kinds, &layout.followers());
    // Tasks that live as long as this function: dropping the set stops them.
    let mut background = JoinSet::new();
    if let Some(addr) = config.metrics_addr()? {
        let names: Vec<&'static str> = config
            .destinations
            .sinks
            .kinds
            .iter()
            .map(|k| k.name())
            .collect();
        let handle = metrics::install(&names).map_err(|e| Error::Metrics(e.to_string()))?;
        let bound = health::serve(addr, handle, Arc::clone(&health), &mut background)
            .await
            .map_err(|e| Error::Metrics(format!("cannot listen on {addr}: {e}")))?;
        tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    }
    // Probes first, so /readyz tells which sink is unreachable while walcast waits for it.
    for (index, probe) in probes(&layout.fanned, &config.source)?
        .into_iter()
        .enumerate()
    {
        background.spawn(health::probe_forever(probe, Arc::clone(&health), index));
    }
    let pg_config = config.source.pg_config()?;
    let client = crate::pg::connect("WALCAST_SOURCE_URL", &pg_config).await?;
    for done in source::ensure_publication(&client, &config.source).await? {
        tracing::info!("{done}");
    }
    let source_id = source::identify(&config.source).await?;
    tracing::info!(source = %source_id, "source identified");
    let opened = open_sinks(
        &config.source,
        &layout.fanned,
        (config.batch_max_events, config.batch_max_bytes),
        &health,
        None,
        Some(source_id),
        Some(&mut shutdown),
    )
    .await?;
    let Some(Opened {
        sinks, checkpoints, ..
    }) = opened
    else {
        tracing::info!("stopped before every sink was reachable; nothing was read");
        return Ok(());
    };
    let held: Vec<_> = checkpoints
        .iter()
        .filter_map(|(sink, checkpoint)| Some((*sink, (*checkpoint)?)))
        .collect();
    for done in ensure_slot(&client, &config.source, &held).await? {
        tracing::info!("{done}");
    }
    let slot = source::slot_info(&client, &config.source.slot)
        .await?
        .ok_or_else(|| source::ReplicationError::SlotMissing {
            slot: config.source.slot.clone(),
        })?;
    if slot.is_lost() {
        return Err(source::ReplicationError::SlotInvalidated {
            slot: config.source.slot.clone(),
            reason: slot.invalidation_reason.clone(),
        }
        .into());
    }
    let durable = slot.confirmed_flush_lsn.unwrap_or_default();
    if let Some((behind, ahead)) = rebuild::behind(&checkpoints, durable) {
        tracing::warn!(
            sinks = ?behind, holds = %ahead, slot = %durable,
            "a sink holds less than the others and the slot have confirmed (it restarted \
             empty, was restored from an older copy, or was left out of WALCAST_SINKS for a \
             while): rebuilding it from the table before streaming"
        );
        if !rebuild::rebuild(&config, &behind, ahead, source_id, shutdown.as_mut()).await? {
            tracing::info!("stopped during the rebuild; the next start resumes it");
            return Ok(());
        }
    }
    health.start_at(durable);
    if layout.webhook_follows {
        let follower = open_follower(&config, source_id).await?;
        background.spawn(follower.follow(Arc::clone(&health), layout.fanned.sinks.kinds.len()));
    }
    let events_table: u32 = client
        .query_one("SELECT 'public.engagement_events'::regclass::oid", &[])
        .await
        .map_err(|source| Error::Postgres {
            context: "looking up engagement_events",
            source,
        })?
        .get(0);

    let cache = ContentCache::load(&client)
        .await
        .map_err(|source| Error::Postgres {
            context: "loading the content cache",
            source,
        })?;
    metrics::content_cache_entries(cache.len());
    tracing::info!(entries = cache.len(), "content cache loaded");

    let release_source = Arc::clone(&sinks.release_source);
    // Aborted when dropped, so that an early return below stops them too.
    let monitor = AbortOnDropHandle::new(tokio::spawn(
        source::Monitor {
            config: pg_config,
            slot: config.source.slot.clone(),
            publication: config.source.publication.clone(),
            events_table,
            heartbeat: config.heartbeat(),
            retained_wal_warn: config.retained_wal_warn.as_u64(),
            health: Arc::clone(&health),
        }
        .run(),
    ));

    let repl = source::start_replication(&config.source, durable, config.status_interval).await?;
    let walsender = source::slot_holder(&config.source).await;
    health.set_replicating(true);
    tracing::info!(slot = %config.source.slot, from = %durable, "replication started");

    let (batch_tx, batch_rx) = mpsc::channel(BATCH_QUEUE);
    let (ack_tx, ack_rx) = watch::channel(durable);
    let fanout =
        AbortOnDropHandle::new(tokio::spawn(fanout::run(sinks, batch_rx, durable, ack_tx)));
    let source_loop = SourceLoop {
        repl,
        source: config.source.clone(),
        status_interval: config.status_interval,
        enricher: Enricher::new(cache),
        batcher: Batcher::new(config.batch_max_events, config.batch_max_bytes, durable),
        counts: ChangeCounts::default(),
        tx: None,
        batch_tx,
        ack_rx,
        acked: durable,
        release_source,
        health,
        unapplied: VecDeque::new(),
        silence_limit: config.heartbeat().map(silence_limit),
        last_heard: tokio::time::Instant::now(),
        walsender,
    };
    let result = source_loop.run(fanout, monitor, shutdown).await;
    drop(background);
    result
}

/// Which sinks the fan-out feeds, and whether the webhook follows the analytics facts
/// instead (see `sink::webhook`): it does whenever the analytics sink is enabled, since
/// those facts are then a durable log of every event.
struct Layout {
    fanned: Destinations,
    webhook_follows: bool,
}

impl Layout {
    fn of(to: &Destinations) -> Self {
        let webhook_follows =
            to.sinks.contains(SinkKind::Webhook) && to.sinks.contains(SinkKind::Postgres);
        let mut fanned = to.clone();
        if webhook_follows {
            fanned.sinks.kinds.retain(|kind| *kind != SinkKind::Webhook);
        }
        Layout {
            fanned,
            webhook_follows,
        }
    }

    fn followers(&self) -> Vec<SinkKind> {
        if self.webhook_follows {
            vec![SinkKind::Webhook]
        } else {
            Vec::new()
        }
    }
}

/// The webhook, ready to follow the analytics facts: connected, its checkpoint checked
/// against the source's history and read, and where it starts fixed.
async fn open_follower(config: &RunConfig, source_id: SourceId) -> Result<WebhookSink, Error> {
    let start = |source| Error::SinkStart {
        sink: crate::sink::webhook::NAME,
        source,
    };
    let pg_config = config
        .destinations
        .analytics
        .pg_config(&config.source.url)?;
    let (mut sink, _) = WebhookSink::connect(&config.destinations.webhook, pg_config)
        .await
        .map_err(start)?;
    claim_history(&mut sink, source_id).await.map_err(start)?;
    sink.checkpoint().await.map_err(start)?;
    let from = sink.start_following().await.map_err(start)?;
    tracing::info!(sink = sink.name(), checkpoint = ?from.map(|p| p.to_string()), "webhook follows the analytics facts");
    Ok(sink)
}

/// One probe per sink, in the fan-out's order.
fn probes(to: &Destinations, source: &SourceArgs) -> Result<Vec<Probe>, Error> {
    to.sinks
        .kinds
        .iter()
        .map(|kind| match kind {
            SinkKind::Redis => Ok(Probe::redis(to.redis.client()?)),
            SinkKind::Postgres => Ok(Probe::postgres(to.analytics.pg_config(&source.url)?)),
            // A system walcast does not control: judged by its deliveries, not probed.
            SinkKind::Webhook => Ok(Probe::Deliveries),
        })
        .collect()
}

/// `source::ensure_slot_for_run`, waiting a while for a slot that is still held. After
/// walcast was killed, the server keeps the slot active until its walsender notices the
/// connection is gone, which under load can take seconds; a restart right away must not
/// fail on that.
async fn ensure_slot(
    client: &tokio_postgres::Client,
    source_args: &SourceArgs,
    held: &[(&'static str, Position)],
) -> Result<Vec<String>, Error> {
    let deadline = Instant::now() + SLOT_RELEASE_WAIT;
    let mut attempt = 0;
    loop {
        match source::ensure_slot_for_run(client, &source_args.slot, held).await {
            Err(source::SetupError::SlotInUse { pid, .. }) if Instant::now() < deadline => {
                if attempt == 0 {
                    tracing::warn!(
                        slot = %source_args.slot,
                        pid,
                        wait_s = SLOT_RELEASE_WAIT.as_secs(),
                        "slot is held by another connection (the walsender of a walcast that \
                         stopped may not have noticed yet); waiting for it to be released"
                    );
                }
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            result => return Ok(result?),
        }
    }
}

/// The sinks, started, with what each holds.
pub(crate) struct Opened {
    pub sinks: Sinks,
    /// With a backfill job: each sink's cursor of it, in the sinks' order.
    pub cursors: Vec<Option<i64>>,
    /// Each sink's name and checkpoint, in the sinks' order.
    pub checkpoints: Vec<(&'static str, Option<Position>)>,
}

/// Connects every configured sink and reads its checkpoint, so a sink that cannot start
/// stops walcast before replication begins. With `backfill_job`, also reads each sink's
/// cursor of that backfill (in the sinks' order).
///
/// With `stop`, a sink that cannot be reached yet (refused, timed out, its server
/// starting) is retried with the same backoff as a failed write, logged and counted as a
/// `retry`, until it answers or `stop` completes (then `Ok(None)`); without, the first
/// error ends it.
pub(crate) async fn open_sinks<S: Future<Output = ()> + Unpin>(
    source: &SourceArgs,
    to: &Destinations,
    (batch_max_events, batch_max_bytes): (usize, usize),
    health: &Arc<Health>,
    backfill_job: Option<&str>,
    source_id: Option<SourceId>,
    mut stop: Option<&mut S>,
) -> Result<Option<Opened>, Error> {
    let mut sinks = Sinks::new(
        QueueLimits {
            queue_rows: SINK_QUEUE_BATCHES * batch_max_events,
            queue_bytes: SINK_QUEUE_BATCHES * batch_max_bytes,
            write_rows: batch_max_events,
            write_bytes: batch_max_bytes,
            write_timeout: to.sink_write_timeout,
        },
        Arc::clone(health),
    );
    let mut cursors = Vec::new();
    let mut checkpoints = Vec::new();
    for kind in &to.sinks.kinds {
        let mut attempt: u32 = 0;
        loop {
            let started = start_sink(
                *kind,
                source,
                to,
                &mut sinks,
                &mut cursors,
                backfill_job,
                source_id,
            );
            let started = async {
                checkpoints.push((kind.name(), started.await?));
                Ok(())
            };
            let error = match started.await {
                Ok(()) => break,
                Err(Error::SinkStart { sink, source }) if source.is_transient() => {
                    Error::SinkStart { sink, source }
                }
                Err(err) => return Err(err),
            };
            let Some(stop) = stop.as_deref_mut() else {
                return Err(error);
            };
            let delay = fanout::backoff(attempt);
            attempt = attempt.saturating_add(1);
            metrics::sink_failed(kind.name(), "retry");
            tracing::warn!(sink = kind.name(), %error, attempt, retry_in_ms = delay.as_millis() as u64, "sink not reachable at start, retrying");
            tokio::select! {
                () = &mut *stop => return Ok(None),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
    Ok(Some(Opened {
        sinks,
        cursors,
        checkpoints,
    }))
}

/// Connects one sink, proves it ready and starts feeding it; returns its checkpoint.
async fn start_sink(
    kind: SinkKind,
    source: &SourceArgs,
    to: &Destinations,
    sinks: &mut Sinks,
    cursors: &mut Vec<Option<i64>>,
    job: Option<&str>,
    source_id: Option<SourceId>,
) -> Result<Option<Position>, Error> {
    let start = |source| Error::SinkStart {
        sink: kind.name(),
        source,
    };
    let migrated = |sink: &'static str, versions: Vec<&'static str>| {
        for version in versions {
            tracing::info!(sink, version, "analytics migration applied");
        }
    };
    match kind {
        SinkKind::Redis => {
            let sink = RedisSink::connect(to.redis.client()?)
                .await
                .map_err(start)?;
            add(sinks, cursors, sink, job, source_id)
                .await
                .map_err(start)
        }
        SinkKind::Postgres => {
            let pg_config = to.analytics.pg_config(&source.url)?;
            let (sink, versions) = PostgresSink::connect(pg_config).await.map_err(start)?;
            migrated(sink.name(), versions);
            add(sinks, cursors, sink, job, source_id)
                .await
                .map_err(start)
        }
        SinkKind::Webhook => {
            let pg_config = to.analytics.pg_config(&source.url)?;
            let (mut sink, versions) = WebhookSink::connect(&to.webhook, pg_config)
                .await
                .map_err(start)?;
            sink.skip_streamed = to.sinks.contains(SinkKind::Postgres);
            migrated(sink.name(), versions);
            add(sinks, cursors, sink, job, source_id)
                .await
                .map_err(start)
        }
    }
}

/// Reads the sink's checkpoint (which also proves it reachable) and starts feeding it;
/// with `backfill_job`, first reads its cursor. With `source`, first checks that the
/// checkpoint belongs to the source's WAL history, and has the sink store it from now on.
/// Returns the checkpoint.
async fn add<S: Sink>(
    sinks: &mut Sinks,
    cursors: &mut Vec<Option<i64>>,
    mut sink: S,
    backfill_job: Option<&str>,
    source: Option<SourceId>,
) -> Result<Option<Position>, crate::sink::SinkError> {
    if let Some(current) = source {
        claim_history(&mut sink, current).await?;
    }
    let checkpoint = sink.checkpoint().await?;
    tracing::info!(sink = sink.name(), checkpoint = ?checkpoint.map(|p| p.to_string()), "sink ready");
    if let Some(job) = backfill_job {
        cursors.push(sink.backfill_cursor(job).await?);
    }
    sinks.add(sink);
    Ok(checkpoint)
}

/// Checks that the sink's checkpoint belongs to the source's WAL history `current`, and
/// has the sink store it from now on.
async fn claim_history<S: Sink>(
    sink: &mut S,
    current: SourceId,
) -> Result<(), crate::sink::SinkError> {
    if let Some(stored) = sink.source().await?
        && stored != current
    {
        return Err(crate::sink::SinkError::OtherHistory { stored, current });
    }
    sink.set_source(current).await
}

/// The transaction being read.
struct Tx {
    commit_lsn: Lsn,
    commit_ts: DateTime<Utc>,
    /// Index of the next row change inside the transaction.
    seq: u32,
}

struct SourceLoop {
    repl: ReplicationClient,
    source: SourceArgs,
    status_interval: Duration,
    enricher: Enricher,
    batcher: Batcher,
    counts: ChangeCounts,
    tx: Option<Tx>,
    batch_tx: mpsc::Sender<Batch>,
    ack_rx: watch::Receiver<Lsn>,
    acked: Lsn,
    release_source: Arc<Notify>,
    health: Arc<Health>,
    /// Commit LSN and time of transactions read but not yet confirmed by every sink, oldest
    /// first, for the lag in seconds. Only the oldest matters, so it is capped.
    unapplied: VecDeque<(Lsn, DateTime<Utc>)>,
    /// See [`silence_limit`]; `None` without a heartbeat.
    silence_limit: Option<Duration>,
    /// When the source loop last received something, or finished handling it (time spent
    /// waiting for the sinks is not the server's silence).
    last_heard: tokio::time::Instant,
    /// The walsender process of the current session, when it could be read: after the
    /// session is lost, the one process walcast may end to free the slot.
    walsender: Option<i32>,
}

/// How long the replication stream may stay silent before walcast takes the connection
/// for dead. With the heartbeat on, the walsender has WAL to send (and a keepalive after
/// it) at least once per heartbeat interval, so three intervals of nothing — not even a
/// keepalive — mean the connection is gone (a partition, a black-holed route), which TCP
/// alone would notice only after hours. Without the heartbeat an idle database may be
/// silent for good, so there is no such limit.
fn silence_limit(heartbeat: Duration) -> Duration {
    (heartbeat * 3).max(Duration::from_secs(5))
}

/// Most transactions `SourceLoop::unapplied` remembers.
const UNAPPLIED_CAP: usize = 65_536;

impl SourceLoop {
    async fn run(
        mut self,
        mut fanout: AbortOnDropHandle<Result<(), FanoutError>>,
        mut monitor: AbortOnDropHandle<Result<(), source::ReplicationError>>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        let mut shutdown = std::pin::pin!(shutdown);
        // A finished task must not be polled again.
        let mut monitor_running = true;
        let outcome: Result<(), Error> = loop {
            tokio::select! {
                biased;
                // Priority 1: stop reading on shutdown.
                () = &mut shutdown => break Ok(()),
                // Priority 2: the fan-out ended early, which only a sink failure does.
                joined = &mut fanout => return finish_fanout(joined),
                // Priority 2b: the slot monitor ended, which only an invalidated or dropped
                // slot does.
                joined = &mut monitor, if monitor_running => {
                    monitor_running = false;
                    match joined {
                        Ok(Err(err)) => break Err(err.into()),
                        Ok(Ok(())) => {}
                        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
                        Err(_) => {}
                    }
                }
                // Priority 3: report a new flush position.
                Ok(()) = self.ack_rx.changed() => self.report_ack(),
                // Priority 3b: a sink's server (maybe this one) is shutting down: let go of
                // the replication connection so the shutdown is not held up waiting for a
                // confirmation that sink cannot give, and come back when it can.
                () = self.release_source.notified() => {
                    let why = "a sink's database server is shutting down";
                    match self.reconnect(why, &mut shutdown).await {
                        Ok(true) => {}
                        Ok(false) => break Ok(()),
                        Err(err) => break Err(err),
                    }
                }
                // Priority 4: the next replication event. `recv` is cancel-safe (an mpsc
                // receive), so losing the race to another arm loses nothing.
                event = self.repl.recv() => {
                    let lost = match event {
                        Ok(Some(event)) => {
                            let handled = self.handle(event).await;
                            self.last_heard = tokio::time::Instant::now();
                            match handled {
                                Ok(()) => continue,
                                Err(err) => break Err(err),
                            }
                        }
                        Ok(None) => "the server ended the replication stream".to_owned(),
                        Err(err) if source::is_reconnectable(&err) => err.to_string(),
                        Err(err) => break Err(source::classify(err, &self.source.slot).into()),
                    };
                    match self.reconnect(&lost, &mut shutdown).await {
                        Ok(true) => {}
                        Ok(false) => break Ok(()),
                        Err(err) => break Err(err),
                    }
                }
                // Priority 4b: nothing at all from the server for too long: the connection
                // is dead even though no error says so.
                () = silent(self.last_heard, self.silence_limit) => {
                    let limit = self.silence_limit.unwrap_or_default();
                    let why = format!(
                        "nothing received from the server for {} (not even a keepalive, while \
                         the heartbeat writes WAL every {}): the connection is taken for dead",
                        humantime::format_duration(limit),
                        humantime::format_duration(limit / 3)
                    );
                    match self.reconnect(&why, &mut shutdown).await {
                        Ok(true) => {}
                        Ok(false) => break Ok(()),
                        Err(err) => break Err(err),
                    }
                }
                // Priority 5: nothing ready on the input: close the batch now rather than
                // wait for it to fill.
                () = std::future::ready(()), if self.batcher.has_pending() => {
                    if let Err(err) = self.flush().await {
                        break Err(err);
                    }
                }
            }
        };
        monitor.abort();
        if outcome.is_err() {
            // Acknowledge nothing more: the next start resumes from the slot.
            fanout.abort();
            return outcome;
        }
        self.shutdown(fanout).await
    }

    /// The replication connection is gone: drop what was read of an unfinished batch (the
    /// slot replays it) and open a new session from the last position every sink
    /// confirmed, retrying with backoff. Batches already handed to the sinks are applied
    /// meanwhile; what the new session replays of them, the sinks' checkpoints skip.
    /// `Ok(false)` when shutdown came first.
    async fn reconnect(
        &mut self,
        why: &str,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<bool, Error> {
        tracing::warn!(reason = why, resume_from = %self.acked, "replication connection lost, reconnecting");
        // Close the old connection now (when it is still open, the server may be waiting
        // for it to go away).
        self.repl.abort();
        self.health.set_replicating(false);
        self.tx = None;
        self.batcher.discard();
        self.enricher.reset_session();
        let mut attempt: u32 = 0;
        loop {
            let delay = fanout::backoff(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                () = shutdown.as_mut() => return Ok(false),
                () = tokio::time::sleep(delay) => {}
            }
            let started = tokio::select! {
                () = shutdown.as_mut() => return Ok(false),
                started = source::start_replication(&self.source, self.acked, self.status_interval) => started,
            };
            match started {
                Ok(repl) => {
                    self.repl = repl;
                    self.last_heard = tokio::time::Instant::now();
                    self.health.set_replicating(true);
                    metrics::replication_reconnected();
                    tracing::info!(from = %self.acked, attempt, "replication resumed");
                    self.walsender = source::slot_holder(&self.source).await;
                    return Ok(true);
                }
                Err(err @ source::ReplicationError::SlotInUse { .. })
                    if self.walsender.is_some() =>
                {
                    let pid = self.walsender.take().expect("checked above");
                    if source::end_stale_walsender(&self.source, pid).await {
                        tracing::warn!(
                            pid,
                            "the lost session's walsender still held the slot; ended it"
                        );
                    } else {
                        tracing::warn!(error = %err, attempt, "reconnect failed, retrying");
                    }
                }
                Err(err) if err.is_transient() => {
                    tracing::warn!(error = %err, attempt, "reconnect failed, retrying");
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    async fn handle(&mut self, event: ReplicationEvent) -> Result<(), Error> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                let tx = Tx {
                    commit_lsn: final_lsn.into(),
                    commit_ts: pg_timestamp(commit_time_micros),
                    seq: 0,
                };
                if self.unapplied.is_empty() {
                    self.health.set_oldest_unapplied(Some(tx.commit_ts));
                }
                if self.unapplied.len() < UNAPPLIED_CAP {
                    self.unapplied.push_back((tx.commit_lsn, tx.commit_ts));
                }
                self.tx = Some(tx);
            }
            ReplicationEvent::XLogData {
                data, wal_start, ..
            } => self.change(&data, wal_start.into())?,
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => {
                self.tx = None;
                self.batcher
                    .commit(end_lsn.into(), pg_timestamp(commit_time_micros));
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Outside a transaction everything before `wal_end` has been received, so it
                // is a safe acknowledgement point once the batches before it are applied.
                if self.tx.is_none() {
                    self.batcher.mark(wal_end.into());
                }
            }
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                ..
            } => {
                tracing::debug!(%prefix, transactional, lsn = %Lsn::from(lsn), "logical message");
            }
            ReplicationEvent::StoppedAt { .. } => {}
        }
        if self.batcher.is_full() {
            self.flush().await?;
        }
        Ok(())
    }

    /// Decodes and applies one pgoutput change. A row that cannot be an event becomes a
    /// dead letter and the stream goes on; a message that cannot be decoded at all, or a
    /// TRUNCATE of the events table, stops walcast before anything past it is acknowledged.
    fn change(&mut self, data: &bytes::Bytes, lsn: Lsn) -> Result<(), Error> {
        let undecodable = |error| Error::Undecodable {
            lsn,
            kind: decode::message_kind(data),
            len: data.len(),
            error,
        };
        let change = decode::decode(data).map_err(undecodable)?;
        let Some(tx) = self.tx.as_mut() else {
            // pgoutput sends row changes only inside Begin … Commit: what comes outside
            // carries nothing walcast delivers (a Relation, say) or is a protocol surprise.
            tracing::warn!(%lsn, kind = %decode::message_kind(data), "change outside a transaction ignored");
            return Ok(());
        };
        let position = Position::new(tx.commit_lsn, tx.seq);
        let (relation, op) = match &change {
            Change::Insert { relation, .. } => (Some(*relation), "insert"),
            Change::Update { relation, .. } => (Some(*relation), "update"),
            Change::Delete { relation, .. } => (Some(*relation), "delete"),
            Change::Truncate { .. } => (None, "truncate"),
            Change::Relation(_) | Change::Ignored(_) => (None, ""),
        };
        if let Some(relation) = relation {
            tx.seq += 1;
            self.counts.add(self.enricher.table_label(relation), op);
        }
        match self.enricher.apply(change, position, tx.commit_ts) {
            Ok(Outcome::Event(event)) => {
                if event.content_missing() {
                    self.counts.content_missing += 1;
                }
                self.batcher.push_event(*event, data.len());
            }
            Ok(Outcome::DeadLetter(dead)) => {
                // The detail quotes the offending value: it goes to the dead letters table,
                // never to the log.
                tracing::warn!(%lsn, position = %dead.position, table = %dead.table, reason = dead.reason.as_str(), "row rejected");
                self.batcher.push_dead_letter(*dead, data.len());
            }
            Ok(Outcome::Applied) => {}
            Ok(Outcome::EventsTruncated) => {
                return Err(Error::EventsTruncated {
                    commit_lsn: tx.commit_lsn,
                });
            }
            Err(error) => return Err(undecodable(error)),
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Error> {
        let Some(batch) = self.batcher.take() else {
            return Ok(());
        };
        self.counts.flush(&batch);
        metrics::content_cache_entries(self.enricher.cache().len());
        // Fails only when the fan-out ended; the fan-out arm reports why.
        let _ = self.batch_tx.send(batch).await;
        Ok(())
    }

    fn report_ack(&mut self) {
        let lsn = *self.ack_rx.borrow_and_update();
        self.acked = lsn;
        self.repl.update_applied_lsn(lsn.into());
        self.health.set_acked(lsn);
        // A transaction is confirmed once the flush position passed its commit record.
        while self
            .unapplied
            .front()
            .is_some_and(|(commit, _)| *commit < lsn)
        {
            self.unapplied.pop_front();
        }
        self.health
            .set_oldest_unapplied(self.unapplied.front().map(|(_, ts)| *ts));
    }

    /// Stop reading, flush the open batch, let every sink confirm, send the final status
    /// update, close.
    async fn shutdown(
        mut self,
        mut fanout: AbortOnDropHandle<Result<(), FanoutError>>,
    ) -> Result<(), Error> {
        let drained = tokio::time::Instant::now() + SHUTDOWN_DRAIN_WAIT;
        // Handing over the open batch waits for room when a sink is stuck: bounded too.
        let handed = tokio::time::timeout_at(drained, self.flush()).await;
        if let Ok(result) = handed {
            result?;
        }
        let SourceLoop {
            repl,
            batch_tx,
            mut ack_rx,
            source,
            ..
        } = self;
        drop(batch_tx);
        let joined = loop {
            tokio::select! {
                joined = &mut fanout => break Some(joined),
                Ok(()) = ack_rx.changed() => {
                    repl.update_applied_lsn((*ack_rx.borrow_and_update()).into());
                }
                () = tokio::time::sleep_until(drained) => break None,
            }
        };
        let fanned = match joined {
            Some(joined) => finish_fanout(joined),
            None => {
                fanout.abort();
                tracing::warn!(
                    wait_s = SHUTDOWN_DRAIN_WAIT.as_secs(),
                    "a sink did not confirm its writes in time; stopping with what every sink \
                     confirmed (the next start replays the rest)"
                );
                Ok(())
            }
        };
        let last = *ack_rx.borrow();
        repl.update_applied_lsn(last.into());
        // pgwire-replication sends no status update of its own on shutdown: wait (bounded)
        // until the last one carried our final position.
        // One deadline for the whole tail, so a source that stopped answering cannot hold
        // the exit either.
        let deadline = tokio::time::Instant::now() + FINAL_ACK_WAIT;
        while Lsn::from(repl.metrics().last_applied_lsn()) < last
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut repl = repl;
        match tokio::time::timeout_at(deadline, repl.shutdown()).await {
            Ok(Err(error)) => tracing::debug!(%error, "replication stream closed with an error"),
            Err(_) => repl.abort(),
            Ok(Ok(())) => {}
        }
        let confirmed = tokio::time::timeout_at(deadline, confirm_final(&source, last)).await;
        match confirmed {
            Ok(Ok(slot_at)) if slot_at >= last => tracing::info!(flushed = %last, "stopped"),
            Ok(Ok(slot_at)) => tracing::warn!(
                flushed = %last, %slot_at,
                "stopped; the slot did not show the final position in time (the next start \
                 replays from the slot, and the sinks skip what they applied)"
            ),
            Ok(Err(error)) => {
                tracing::warn!(flushed = %last, %error, "stopped; could not check the slot's final position")
            }
            Err(_) => {
                tracing::warn!(flushed = %last, "stopped; the slot's final position could not be checked in time")
            }
        }
        fanned
    }
}

/// The slot shows `last` once the walsender has read the final status update (see
/// [`source::confirm_slot`]).
async fn confirm_final(source_args: &SourceArgs, last: Lsn) -> Result<Lsn, Error> {
    let client = crate::pg::connect("WALCAST_SOURCE_URL", &source_args.pg_config()?).await?;
    Ok(source::confirm_slot(&client, &source_args.slot, last, FINAL_ACK_WAIT).await?)
}

fn finish_fanout(
    joined: Result<Result<(), FanoutError>, tokio::task::JoinError>,
) -> Result<(), Error> {
    match joined {
        Ok(result) => result.map_err(Error::from),
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(_) => Ok(()),
    }
}

/// Completes once `limit` has passed since `last_heard`; never without a limit.
async fn silent(last_heard: tokio::time::Instant, limit: Option<Duration>) {
    match limit {
        Some(limit) => tokio::time::sleep_until(last_heard + limit).await,
        None => std::future::pending().await,
    }
}

/// PostgreSQL timestamps count microseconds from 2000-01-01 UTC.
fn pg_timestamp(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros.saturating_add(PG_EPOCH_OFFSET_MICROS))
        .unwrap_or_default()
}
