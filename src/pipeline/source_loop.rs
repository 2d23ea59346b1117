//! The source loop: reads the replication stream, decodes and enriches each change,
//! closes batches at transaction ends, hands them to the fan-out, and reports to
//! PostgreSQL what every sink confirmed; reconnects when the stream is lost; and, on
//! shutdown, drains within a bounded time and makes sure the slot shows the final
//! position.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use pgwire_replication::{ReplicationClient, ReplicationEvent};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::task::AbortOnDropHandle;

use super::{Batcher, FanoutError};
use crate::config::SourceArgs;
use crate::decode::{self, Change};
use crate::enrich::{Enricher, Outcome};
use crate::event::Batch;
use crate::health::Health;
use crate::lsn::{Lsn, Position};
use crate::metrics::{self, ChangeCounts};
use crate::{Error, source};

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

/// The transaction being read.
pub(super) struct Tx {
    commit_lsn: Lsn,
    commit_ts: DateTime<Utc>,
    /// Index of the next row change inside the transaction.
    seq: u32,
}

pub(super) struct SourceLoop {
    pub(super) repl: ReplicationClient,
    pub(super) source: SourceArgs,
    pub(super) status_interval: Duration,
    pub(super) enricher: Enricher,
    pub(super) batcher: Batcher,
    pub(super) counts: ChangeCounts,
    pub(super) tx: Option<Tx>,
    pub(super) batch_tx: mpsc::Sender<Batch>,
    pub(super) ack_rx: watch::Receiver<Lsn>,
    pub(super) acked: Lsn,
    pub(super) release_source: Arc<Notify>,
    pub(super) health: Arc<Health>,
    /// Commit LSN and time of transactions read but not yet confirmed by every sink, oldest
    /// first, for the lag in seconds. Only the oldest matters, so it is capped.
    pub(super) unapplied: VecDeque<(Lsn, DateTime<Utc>)>,
    /// See [`silence_limit`]; `None` without a heartbeat.
    pub(super) silence_limit: Option<Duration>,
    /// When the source loop last received something, or finished handling it (time spent
    /// waiting for the sinks is not the server's silence).
    pub(super) last_heard: tokio::time::Instant,
    /// The walsender process of the current session, when it could be read: after the
    /// session is lost, the one process walcast may end to free the slot.
    pub(super) walsender: Option<i32>,
}

/// How long the replication stream may stay silent before walcast takes the connection
/// for dead. With the heartbeat on, the walsender has WAL to send (and a keepalive after
/// it) at least once per heartbeat interval, so three intervals of nothing — not even a
/// keepalive — mean the connection is gone (a partition, a black-holed route), which TCP
/// alone would notice only after hours. Without the heartbeat an idle database may be
/// silent for good, so there is no such limit.
pub(super) fn silence_limit(heartbeat: Duration) -> Duration {
    (heartbeat * 3).max(Duration::from_secs(5))
}

/// Most transactions `SourceLoop::unapplied` remembers.
const UNAPPLIED_CAP: usize = 65_536;

impl SourceLoop {
    pub(super) async fn run(
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
                        Err(err) if source::is_reconnectable(&err) => crate::error::Chain(&err).to_string(),
                        Err(err) => break Err(source::classify(err, &self.source.slot()).into()),
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
            let delay = crate::retry::backoff(attempt);
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
                        tracing::warn!(error = %crate::error::Chain(&err), attempt, "reconnect failed, retrying");
                    }
                }
                Err(err) if err.may_reconnect() => {
                    tracing::warn!(error = %crate::error::Chain(&err), attempt, "reconnect failed, retrying");
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
        let partition = self.source.partition();
        let seq = partition.seq(tx.seq).ok_or(Error::PositionsExhausted {
            commit_lsn: tx.commit_lsn,
            partitions: partition.count,
        })?;
        let position = Position::new(tx.commit_lsn, seq);
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
                // Every partition decodes every `content` row; the first records its dead
                // letters, so each is recorded once.
                if partition.index == 0 || dead.table == crate::event::EVENTS_TABLE {
                    self.batcher.push_dead_letter(*dead, data.len());
                }
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
            Ok(Err(error)) => {
                tracing::debug!(error = %crate::error::Chain(&error), "replication stream closed with an error")
            }
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
                tracing::warn!(flushed = %last, error = %crate::error::Chain(&error), "stopped; could not check the slot's final position")
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
    Ok(source::confirm_slot(&client, &source_args.slot(), last, FINAL_ACK_WAIT).await?)
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
