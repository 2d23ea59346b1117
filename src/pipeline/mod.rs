//! The streaming pipeline: source loop, batching, fan-out, acknowledgement, shutdown.
//!
//! ```text
//!  replication stream ──▶ source loop ──▶ [batches, bounded] ──▶ fan-out ──▶ sinks
//!        ▲                (decode, enrich, batch)                   │
//!        └──────── flush LSN ◀──── watch ◀──── AckTracker ◀─────────┘
//! ```
//!
//! The source loop (`source_loop`) is the only owner of the replication client: it reads,
//! and it reports the flush position the fan-out publishes (see `ack`, "Progress
//! tracking"). This module wires it up: sinks opened and checked, the slot ensured, a
//! sink behind it rebuilt (`rebuild`), and the tasks started.
//!
//! Every task `run` starts ends when it returns, in this order: the source loop returns;
//! the slot monitor is aborted; the fan-out drains (shutdown, bounded) or is aborted (an
//! error); then the task set `background` is dropped, which ends the sink probes, the
//! metrics endpoint and the webhook follower. An early return (`?`) drops the monitor's
//! and the fan-out's handles, which aborts them, and the set.

mod ack;
pub mod backfill;
mod batch;
pub(crate) mod fanout;
mod rebuild;
mod source_loop;

pub use ack::AckTracker;
pub use batch::Batcher;
pub use fanout::{FanoutError, QueueLimits, Sinks};
use source_loop::{SourceLoop, silence_limit};

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use crate::config::{Destinations, RunConfig, SinkKind, SourceArgs};
use crate::enrich::{ContentCache, Enricher};
use crate::health::{self, Health};
use crate::lsn::{Position, SourceId};
use crate::metrics::{self, ChangeCounts};
use crate::sink::fault::{Faults, Faulty};
use crate::sink::webhook::WebhookSink;
use crate::sink::{AnySink, BuildError, Sink, SinkError};
use crate::{Error, source};

/// Batches the source may have closed ahead of the fan-out.
const BATCH_QUEUE: usize = 2;

/// Streams until `shutdown` completes or an error stops it.
pub async fn run(config: RunConfig, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    run_with_faults(config, shutdown, Faults::default()).await
}

/// [`run`], with faults injected into the sinks' writes as `faults` says (see
/// [`crate::sink::fault`]): for tests of the failure paths.
pub async fn run_with_faults(
    config: RunConfig,
    shutdown: impl Future<Output = ()>,
    faults: Faults,
) -> Result<(), Error> {
    config.validate()?;
    let mut shutdown = std::pin::pin!(shutdown);
    let layout = Layout::of(&config.destinations);
    let built = build_sinks(&layout.fanned, &config.source)?;
    let health = Health::with_followers(&names(&built), &layout.followers());
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
        let handle = metrics::install(&names, config.source.partition())
            .map_err(|e| Error::Metrics(e.to_string()))?;
        let bound = health::serve(addr, handle, Arc::clone(&health), &mut background)
            .await
            .map_err(|e| Error::Metrics(format!("cannot listen on {addr}: {e}")))?;
        tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    }
    // Probes first, so /readyz tells which sink is unreachable while walcast waits for it.
    for (index, sink) in built.iter().enumerate() {
        let probe = sink.healthcheck();
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
        built,
        QueueLimits::of_batches(
            config.batch_max_events,
            config.batch_max_bytes,
            layout.fanned.sink_write_timeout,
        ),
        &health,
        None,
        Some(source_id),
        Some(&faults),
        Some(&mut shutdown),
    )
    .await?;
    let Some(Opened {
        sinks,
        checkpoints,
        lost,
        ..
    }) = opened
    else {
        tracing::info!("stopped before every sink was reachable; nothing was read");
        return Ok(());
    };
    let held: Vec<_> = checkpoints
        .iter()
        .filter_map(|(sink, checkpoint)| Some((*sink, (*checkpoint)?)))
        .collect();
    for done in ensure_slot(&client, &config.source, &held, config.slot_release_wait).await? {
        tracing::info!("{done}");
    }
    let slot = source::slot_info(&client, &config.source.slot())
        .await?
        .ok_or_else(|| source::ReplicationError::SlotMissing {
            slot: config.source.slot(),
        })?;
    if slot.is_lost() {
        return Err(source::ReplicationError::SlotInvalidated {
            slot: config.source.slot(),
            reason: slot.invalidation_reason.clone(),
        }
        .into());
    }
    let durable = slot.confirmed_flush_lsn.unwrap_or_default();
    if let Some((behind, ahead)) = rebuild::behind(&checkpoints, durable, &lost) {
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
            slot: config.source.slot(),
            publication: config.source.publication(),
            partition: config.source.partition(),
            events_table,
            heartbeat: config.heartbeat(),
            retained_wal_warn: config.retained_wal_warn.as_u64(),
            health: Arc::clone(&health),
        }
        .run(),
    ));

    // A session ended while it starts (the server restarting, an operator ending the
    // walsender) is retried as a lost one is later (`SourceLoop::reconnect`).
    let mut attempt: u32 = 0;
    let repl = loop {
        let started = tokio::select! {
            () = shutdown.as_mut() => return Ok(()),
            started = source::start_replication(&config.source, durable, config.status_interval) => started,
        };
        match started {
            Ok(repl) => break repl,
            Err(err) if err.may_reconnect() => {
                let delay = crate::retry::backoff(attempt);
                attempt = attempt.saturating_add(1);
                tracing::warn!(error = %crate::error::Chain(&err), attempt, retry_in_ms = delay.as_millis() as u64, "starting replication failed, retrying");
                tokio::select! {
                    () = shutdown.as_mut() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(err) => return Err(err.into()),
        }
    };
    let walsender = source::slot_holder(&config.source).await;
    health.set_replicating(true);
    tracing::info!(slot = %config.source.slot(), from = %durable, "replication started");

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

    fn followers(&self) -> Vec<&'static str> {
        if self.webhook_follows {
            vec![SinkKind::Webhook.name()]
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
    let mut sink = WebhookSink::new(&config.destinations.webhook, pg_config)
        .map_err(start)?
        .for_partition(config.source.partition());
    sink.open().await.map_err(start)?;
    sink.claim_history(source_id).await.map_err(start)?;
    sink.checkpoint().await.map_err(start)?;
    let from = sink.start_following().await.map_err(start)?;
    tracing::info!(sink = sink.name(), checkpoint = ?from.map(|p| p.to_string()), "webhook follows the analytics facts");
    Ok(sink)
}

/// The fan-out's sinks, built from their settings (no I/O yet), in the fan-out's order:
/// their health entries, probes and queues are all numbered from this one list.
pub(crate) fn build_sinks(to: &Destinations, source: &SourceArgs) -> Result<Vec<AnySink>, Error> {
    to.sinks
        .kinds
        .iter()
        .map(|kind| {
            crate::sink::build(*kind, to, source).map_err(|error| match error {
                BuildError::Config(e) => Error::Config(e),
                BuildError::Sink(source) => Error::SinkStart {
                    sink: kind.name(),
                    source,
                },
            })
        })
        .collect()
}

/// The sinks' names, in their order.
pub(crate) fn names(sinks: &[AnySink]) -> Vec<&'static str> {
    sinks.iter().map(Sink::name).collect()
}

/// `source::ensure_slot_for_run`, waiting a while for a slot that is still held. After
/// walcast was killed, the server keeps the slot active until its walsender notices the
/// connection is gone, which under load can take seconds; a restart right away must not
/// fail on that.
async fn ensure_slot(
    client: &tokio_postgres::Client,
    source_args: &SourceArgs,
    held: &[(&'static str, Position)],
    wait: Duration,
) -> Result<Vec<String>, Error> {
    let deadline = Instant::now() + wait;
    let mut attempt = 0;
    loop {
        match source::ensure_slot_for_run(client, &source_args.slot(), held).await {
            Err(source::SetupError::SlotInUse { pid, .. }) if Instant::now() < deadline => {
                if attempt == 0 {
                    tracing::warn!(
                        slot = %source_args.slot(),
                        pid,
                        wait_s = wait.as_secs(),
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
    /// Sinks that found at start that part of them lost confirmed writes, with the
    /// position a rebuild restores ([`Sink::lost_writes`]).
    pub lost: Vec<(&'static str, Position)>,
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
    built: Vec<AnySink>,
    limits: QueueLimits,
    health: &Arc<Health>,
    backfill_job: Option<&str>,
    source_id: Option<SourceId>,
    faults: Option<&Faults>,
    mut stop: Option<&mut S>,
) -> Result<Option<Opened>, Error> {
    let mut sinks = Sinks::new(limits, Arc::clone(health));
    let mut cursors = Vec::new();
    let mut checkpoints = Vec::new();
    let mut lost = Vec::new();
    for mut sink in built {
        let name = sink.name();
        let mut attempt: u32 = 0;
        let checkpoint = loop {
            let started = async {
                sink.open().await?;
                if let Some(current) = source_id {
                    sink.claim_history(current).await?;
                }
                let checkpoint = sink.checkpoint().await?;
                let cursor = match backfill_job {
                    Some(job) => Some(sink.backfill_cursor(job).await?),
                    None => None,
                };
                Ok::<_, SinkError>((checkpoint, cursor))
            };
            let error = match started.await {
                Ok((checkpoint, cursor)) => {
                    cursors.extend(cursor);
                    break checkpoint;
                }
                Err(source) if source.is_transient() => Error::SinkStart { sink: name, source },
                Err(source) => return Err(Error::SinkStart { sink: name, source }),
            };
            let Some(stop) = stop.as_deref_mut() else {
                return Err(error);
            };
            let delay = crate::retry::backoff(attempt);
            attempt = attempt.saturating_add(1);
            metrics::sink_failed(name, metrics::Failure::Retry);
            tracing::warn!(sink = name, error = %crate::error::Chain(&error), attempt, retry_in_ms = delay.as_millis() as u64, "sink not reachable at start, retrying");
            tokio::select! {
                () = &mut *stop => return Ok(None),
                () = tokio::time::sleep(delay) => {}
            }
        };
        tracing::info!(sink = name, checkpoint = ?checkpoint.map(|p| p.to_string()), "sink ready");
        checkpoints.push((name, checkpoint));
        lost.extend(sink.lost_writes().map(|position| (name, position)));
        match faults.and_then(|faults| faults.plan(name)) {
            Some(plan) => sinks.add(Faulty::new(sink, plan)),
            None => sinks.add(sink),
        }
    }
    Ok(Some(Opened {
        sinks,
        cursors,
        checkpoints,
        lost,
    }))
}
