//! Fan-out: every sink gets every batch, in order, from a task of its own.
//!
//! ```text
//!                      ┌─▶ [queue] ─▶ sink task (redis)    ─┐
//!  batches ─▶ fan-out ─┼─▶ [queue] ─▶ sink task (postgres) ─┼─▶ confirmations ─▶ AckTracker ─▶ flush LSN
//!                      └─▶ [queue] ─▶ sink task (webhook)  ─┘
//! ```
//!
//! (The webhook is here only when the analytics sink is not: otherwise it follows the
//! analytics facts outside the fan-out; see `sink::webhook`.)
//!
//! Sinks write concurrently: a slow sink delays no other sink's writes, only the
//! acknowledgement. Each sink's queue is bounded in rows and in bytes, not in batches (two
//! semaphores, of row permits and of KiB permits, released when the sink has written
//! them): under a trickle of one-row transactions a sink that stalls still has room for
//! thousands of them, so the other sinks go on undisturbed; under a flood it holds a couple
//! of full batches; with rows of a megabyte it holds a couple of batches' bytes, not
//! thousands of rows.
//! When a slow sink's queue is full the fan-out waits, the source's queue fills, and the
//! source stops reading: backpressure all the way to the walsender instead of a growing
//! buffer.
//!
//! A sink that fell behind catches up by writing everything queued (up to a batch's worth
//! of rows) in one write: a few Redis transactions, one PostgreSQL transaction, instead of
//! paying the per-write cost once per small batch. While a sink keeps up, it lingers
//! between writes ([`Sink::linger`]) so that a steady stream of small transactions is
//! written in groups too.
//!
//! Confirmations travel on an unbounded channel on purpose: they are bounded by the
//! batches in flight (the queue capacities), and a bounded one could deadlock a sink
//! blocked on reporting while the fan-out is blocked on that sink's full queue.
//!
//! A transient sink error is retried with exponential backoff and jitter, forever: the
//! acknowledgement simply waits. A permanent one ends the fan-out with that error, having
//! acknowledged nothing the sink did not apply.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::ack::AckTracker;
use crate::event::Batch;
use crate::health::Health;
use crate::lsn::Lsn;
use crate::metrics;
use crate::sink::{Sink, SinkError};

/// A batch with its sequence number, shared by all sink tasks.
type Numbered = Arc<(u64, Batch)>;

/// A batch in one sink's queue, holding its share of that queue's capacity until written.
type Queued = (Numbered, Permits);

/// A batch's share of one queue: its rows and its KiB.
struct Permits {
    _rows: OwnedSemaphorePermit,
    _kib: OwnedSemaphorePermit,
}

/// How much each sink may have queued, and how much one write may take.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Rows a sink may have queued or in its current write.
    pub queue_rows: usize,
    /// Bytes of rows (as [`Batch::bytes`] counts them) a sink may have queued or in its
    /// current write.
    pub queue_bytes: usize,
    /// Rows one write takes from the queue at most (a single larger batch is still
    /// written whole).
    pub write_rows: usize,
    /// Bytes of rows one write takes from the queue at most (likewise).
    pub write_bytes: usize,
    /// Longest one write may take (sinks with [`Sink::has_write_deadline`]).
    pub write_timeout: Duration,
}

/// Full batches' worth of rows (and of bytes) each sink may have queued.
const SINK_QUEUE_BATCHES: usize = 2;

impl QueueLimits {
    /// For batches of up to `max_events` rows and `max_bytes`: each sink may have
    /// [`SINK_QUEUE_BATCHES`] of them queued, and takes one batch's worth per write.
    pub fn of_batches(max_events: usize, max_bytes: usize, write_timeout: Duration) -> Self {
        QueueLimits {
            queue_rows: SINK_QUEUE_BATCHES * max_events,
            queue_bytes: SINK_QUEUE_BATCHES * max_bytes,
            write_rows: max_events,
            write_bytes: max_bytes,
            write_timeout,
        }
    }
}

/// One sink's queue: the channel and its capacity in rows and in KiB.
struct Queue {
    tx: mpsc::UnboundedSender<Queued>,
    rows: Arc<Semaphore>,
    kib: Arc<Semaphore>,
}

impl Queue {
    /// Waits for room for `rows` rows and `kib` KiB.
    async fn room(&self, rows: u32, kib: u32) -> Permits {
        let closed = "the semaphore is never closed";
        Permits {
            _rows: Arc::clone(&self.rows)
                .acquire_many_owned(rows)
                .await
                .expect(closed),
            _kib: Arc::clone(&self.kib)
                .acquire_many_owned(kib)
                .await
                .expect(closed),
        }
    }
}

/// Capacity limits as semaphore permits: within what one acquire can ask for.
fn permits(n: usize) -> usize {
    n.clamp(1, u32::MAX as usize)
}

#[derive(Debug, thiserror::Error)]
#[error("sink {sink} failed")]
pub struct FanoutError {
    pub sink: &'static str,
    #[source]
    pub source: SinkError,
}

/// The sink tasks, before the fan-out starts.
pub struct Sinks {
    limits: QueueLimits,
    health: Arc<Health>,
    /// Notified when a sink finds its server shutting down (see
    /// [`SinkError::is_server_shutdown`]): the source drops and reopens its replication
    /// connection.
    pub release_source: Arc<Notify>,
    tasks: JoinSet<Result<(), FanoutError>>,
    queues: Vec<Queue>,
    confirm_tx: mpsc::UnboundedSender<(usize, u64)>,
    confirm_rx: mpsc::UnboundedReceiver<(usize, u64)>,
}

impl Sinks {
    /// `health` has one entry per sink, in the order they are added.
    pub fn new(limits: QueueLimits, health: Arc<Health>) -> Self {
        let (confirm_tx, confirm_rx) = mpsc::unbounded_channel();
        Sinks {
            health,
            limits: QueueLimits {
                queue_rows: permits(limits.queue_rows),
                queue_bytes: limits.queue_bytes.max(1024),
                write_rows: limits.write_rows.max(1),
                write_bytes: limits.write_bytes.max(1),
                write_timeout: limits.write_timeout,
            },
            release_source: Arc::new(Notify::new()),
            tasks: JoinSet::new(),
            queues: Vec::new(),
            confirm_tx,
            confirm_rx,
        }
    }

    /// Starts the task that feeds `sink`.
    pub fn add<S: Sink>(&mut self, sink: S) {
        let index = self.queues.len();
        let (tx, rx) = mpsc::unbounded_channel();
        self.queues.push(Queue {
            tx,
            rows: Arc::new(Semaphore::new(self.limits.queue_rows)),
            kib: Arc::new(Semaphore::new(permits(self.limits.queue_bytes / 1024))),
        });
        let confirm = self.confirm_tx.clone();
        let limit = Fill {
            rows: self.limits.write_rows,
            bytes: self.limits.write_bytes,
        };
        let deadline = sink
            .has_write_deadline()
            .then_some(self.limits.write_timeout);
        let shared = Shared {
            release_source: Arc::clone(&self.release_source),
            health: Arc::clone(&self.health),
        };
        self.tasks
            .spawn(sink_task(sink, index, rx, limit, deadline, confirm, shared));
    }

    pub fn len(&self) -> usize {
        self.queues.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }
}

/// Runs the fan-out until `batches` closes and every sink confirmed every batch. Publishes
/// each new flush position on `ack`.
pub async fn run(
    sinks: Sinks,
    mut batches: mpsc::Receiver<Batch>,
    acked: Lsn,
    ack: watch::Sender<Lsn>,
) -> Result<(), FanoutError> {
    let Sinks {
        limits,
        health: _,
        release_source: _,
        mut tasks,
        queues,
        confirm_tx,
        mut confirm_rx,
    } = sinks;
    drop(confirm_tx);
    let mut tracker = AckTracker::new(queues.len(), acked);
    let mut queues = Some(queues);
    loop {
        tokio::select! {
            biased;
            // Priority 1: a sink task ended; before the input closed, only by failing.
            Some(joined) = tasks.join_next() => match joined {
                Ok(Err(err)) => return Err(err),
                Ok(Ok(())) => {}
                Err(panic) => std::panic::resume_unwind(panic.into_panic()),
            },
            // Priority 2: confirmations move the flush position.
            Some((sink, seq)) = confirm_rx.recv() => {
                if let Some(lsn) = tracker.confirm(sink, seq) {
                    metrics::flushed(lsn);
                    ack.send_replace(lsn);
                }
            }
            // Priority 3: the next batch. Cancel-safe: `recv` loses nothing when another
            // arm wins; the sends below run to completion inside the arm.
            batch = batches.recv(), if queues.is_some() => match batch {
                Some(batch) => {
                    let seq = tracker.dispatch(batch.ack_lsn());
                    // An acknowledgement marker takes one permit of each; a batch larger
                    // than the whole queue takes all of it.
                    let rows = batch.rows().clamp(1, limits.queue_rows) as u32;
                    let kib = batch.bytes.div_ceil(1024).clamp(1, permits(limits.queue_bytes / 1024)) as u32;
                    let numbered = Arc::new((seq, batch));
                    for queue in queues.iter().flatten() {
                        let permit = queue.room(rows, kib).await;
                        // A closed queue means that sink's task ended with an error, which
                        // the join arm reports next.
                        let _ = queue.tx.send((Arc::clone(&numbered), permit));
                    }
                }
                // Input closed: let the sink tasks drain their queues and end.
                None => queues = None,
            },
            else => break,
        }
        if queues.is_none() && tracker.in_flight() == 0 {
            break;
        }
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(result) => result?,
            Err(panic) => std::panic::resume_unwind(panic.into_panic()),
        }
    }
    Ok(())
}

/// How much one write takes, or may take: rows and bytes.
#[derive(Debug, Clone, Copy)]
struct Fill {
    rows: usize,
    bytes: usize,
}

impl Fill {
    fn of(batch: &Batch) -> Self {
        Fill {
            rows: batch.rows(),
            bytes: batch.bytes,
        }
    }

    fn full(self, limit: Fill) -> bool {
        self.rows >= limit.rows || self.bytes >= limit.bytes
    }

    /// `self` with `batch` added, when that stays within `limit`.
    fn with(self, batch: &Batch, limit: Fill) -> Option<Fill> {
        let rows = self.rows + batch.rows();
        let bytes = self.bytes + batch.bytes;
        (rows <= limit.rows && bytes <= limit.bytes).then_some(Fill { rows, bytes })
    }
}

/// Moves what is queued into `group` while it fits in `limit`; the first batch that does
/// not fit is returned, to start the next write.
fn take_queued(
    queue: &mut mpsc::UnboundedReceiver<Queued>,
    group: &mut Vec<Queued>,
    fill: &mut Fill,
    limit: Fill,
) -> Option<Queued> {
    while !fill.full(limit) {
        let Ok(next) = queue.try_recv() else { break };
        match fill.with(&next.0.1, limit) {
            Some(more) => *fill = more,
            None => return Some(next),
        }
        group.push(next);
    }
    None
}

/// What a sink task shares with the rest of the process.
struct Shared {
    release_source: Arc<Notify>,
    health: Arc<Health>,
}

/// Writes every batch of its queue to one sink, in order, retrying transient errors. What
/// has queued up while a write was in progress goes into the next write together, up to
/// `limit`.
async fn sink_task<S: Sink>(
    mut sink: S,
    index: usize,
    mut queue: mpsc::UnboundedReceiver<Queued>,
    limit: Fill,
    deadline: Option<Duration>,
    confirm: mpsc::UnboundedSender<(usize, u64)>,
    shared: Shared,
) -> Result<(), FanoutError> {
    let name = sink.name();
    let health = shared.health.sink(index);
    let linger = sink.linger();
    // A batch taken from the queue but left for the next write.
    let mut carried: Option<Queued> = None;
    let mut last_write: Option<tokio::time::Instant> = None;
    loop {
        let first = match carried.take() {
            Some(queued) => queued,
            None => match queue.recv().await {
                Some(queued) => queued,
                None => break,
            },
        };
        let mut fill = Fill::of(&first.0.1);
        let mut group = vec![first];
        carried = take_queued(&mut queue, &mut group, &mut fill, limit);
        // Linger only while the write is not full: a sink with a full write queued is
        // behind.
        if let (Some(last), None, false) = (last_write, &carried, fill.full(limit)) {
            // Sleeping holds no lock: the fan-out keeps queueing up to the queue's capacity.
            tokio::time::sleep_until(last + linger).await;
            carried = take_queued(&mut queue, &mut group, &mut fill, limit);
        }
        last_write = (!linger.is_zero()).then(tokio::time::Instant::now);
        let seq = group.last().expect("one at least").0.0;
        let batches: Vec<&Batch> = group.iter().map(|(numbered, _)| &numbered.1).collect();
        let mut attempt: u32 = 0;
        loop {
            let started = std::time::Instant::now();
            let written = match deadline {
                Some(limit) => match tokio::time::timeout(limit, sink.write(&batches)).await {
                    Ok(result) => result,
                    Err(_) => {
                        // The write's connection is in an unknown state: start afresh.
                        sink.reset();
                        Err(SinkError::Deadline(limit))
                    }
                },
                None => sink.write(&batches).await,
            };
            match written {
                Ok(()) => {
                    metrics::sink_written(name, &batches, started.elapsed(), Utc::now());
                    health.set_failing(false);
                    if let Some(lsn) = batches.iter().filter_map(|b| b.ack_lsn()).max() {
                        health.set_confirmed(lsn);
                    }
                    break;
                }
                Err(err) if err.is_transient() => {
                    metrics::sink_failed(name, metrics::Failure::Retry);
                    health.set_failing(true);
                    if err.is_server_shutdown() {
                        shared.release_source.notify_one();
                    }
                    let delay = crate::retry::backoff(attempt);
                    attempt += 1;
                    tracing::warn!(sink = name, error = %crate::error::Chain(&err), attempt, retry_in_ms = delay.as_millis() as u64, "sink write failed, retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(err) => {
                    metrics::sink_failed(name, metrics::Failure::Error);
                    return Err(FanoutError {
                        sink: name,
                        source: err,
                    });
                }
            }
        }
        // Confirming the last batch of the group confirms all before it; dropping the group
        // returns its rows to the queue's capacity.
        drop(batches);
        drop(group);
        if confirm.send((index, seq)).is_err() {
            break; // the fan-out ended
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EnrichedEvent, Feed};
    use crate::lsn::Position;

    /// Records the rows of each write; lingers like a real sink may.
    struct Recorder {
        linger: Duration,
        writes: mpsc::UnboundedSender<Vec<usize>>,
    }

    impl Sink for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }

        fn linger(&self) -> Duration {
            self.linger
        }

        async fn checkpoint(&mut self) -> Result<Option<Position>, SinkError> {
            Ok(None)
        }

        async fn write(&mut self, batches: &[&Batch]) -> Result<(), SinkError> {
            let _ = self.writes.send(batches.iter().map(|b| b.rows()).collect());
            Ok(())
        }

        async fn backfill_cursor(&mut self, _job: &str) -> Result<Option<i64>, SinkError> {
            Ok(None)
        }
    }

    fn one_row(lsn: u64) -> Batch {
        let mut batch = Batch::default();
        let ts = chrono::DateTime::UNIX_EPOCH;
        batch.events.push(EnrichedEvent {
            position: Position::new(Lsn(lsn), 0),
            commit_ts: ts,
            id: lsn as i64,
            content_id: None,
            user_id: None,
            event_type: None,
            event_ts: ts,
            duration_ms: None,
            device: None,
            raw_payload: None,
            extra: Vec::new(),
            content: None,
            engagement_seconds: None,
            engagement_pct: None,
        });
        batch.feed = Feed::Stream {
            ack_lsn: Some(Lsn(lsn)),
        };
        batch
    }

    /// One [`Recorder`] behind a fan-out queue of 100 rows, and the rows of each of its
    /// writes.
    fn recording(
        write_rows: usize,
        linger: Duration,
    ) -> (Sinks, mpsc::UnboundedReceiver<Vec<usize>>) {
        let limits = QueueLimits {
            queue_rows: 100,
            queue_bytes: 1 << 20,
            write_rows,
            write_bytes: 1 << 20,
            write_timeout: Duration::from_secs(30),
        };
        let mut sinks = Sinks::new(limits, Health::new(&["redis"]));
        let (writes_tx, writes) = mpsc::unbounded_channel();
        sinks.add(Recorder {
            linger,
            writes: writes_tx,
        });
        (sinks, writes)
    }

    /// After a write, a lingering sink waits before the next one, and what arrived
    /// meanwhile goes into it together.
    #[tokio::test(start_paused = true)]
    async fn a_lingering_sink_takes_what_arrived_meanwhile_in_one_write() {
        let (sinks, mut writes) = recording(100, Duration::from_millis(100));
        let (batches_tx, batches_rx) = mpsc::channel(16);
        let (ack_tx, _ack_rx) = watch::channel(Lsn(0));
        let fanout = tokio::spawn(run(sinks, batches_rx, Lsn(0), ack_tx));
        batches_tx.send(one_row(1)).await.unwrap();
        let mut seen = vec![writes.recv().await.unwrap()];
        // Five more, 10 ms apart: all within the 100 ms after the first write.
        for lsn in 2..=6 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            batches_tx.send(one_row(lsn)).await.unwrap();
        }
        drop(batches_tx);
        fanout.await.unwrap().unwrap();
        while let Ok(write) = writes.try_recv() {
            seen.push(write);
        }
        assert_eq!(seen, [vec![1], vec![1, 1, 1, 1, 1]]);
    }

    /// A sink with more queued than one write takes does not linger: it is behind.
    #[tokio::test(start_paused = true)]
    async fn a_sink_that_is_behind_writes_without_lingering() {
        let (sinks, mut writes) = recording(2, Duration::from_secs(10));
        let (batches_tx, batches_rx) = mpsc::channel(16);
        let (ack_tx, _ack_rx) = watch::channel(Lsn(0));
        for lsn in 1..=6 {
            batches_tx.send(one_row(lsn)).await.unwrap();
        }
        drop(batches_tx);
        let started = tokio::time::Instant::now();
        run(sinks, batches_rx, Lsn(0), ack_tx).await.unwrap();
        let mut seen = Vec::new();
        while let Ok(write) = writes.try_recv() {
            seen.push(write);
        }
        assert_eq!(seen, [vec![1, 1], vec![1, 1], vec![1, 1]]);
        // On the paused clock only a sleep moves time: no linger but the last write's.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    /// Never finishes a write (a hung server).
    struct Hung;

    impl Sink for Hung {
        fn name(&self) -> &'static str {
            "hung"
        }

        fn has_write_deadline(&self) -> bool {
            false
        }

        async fn checkpoint(&mut self) -> Result<Option<Position>, SinkError> {
            Ok(None)
        }

        async fn write(&mut self, _batches: &[&Batch]) -> Result<(), SinkError> {
            std::future::pending().await
        }

        async fn backfill_cursor(&mut self, _job: &str) -> Result<Option<i64>, SinkError> {
            Ok(None)
        }
    }

    /// A hung sink's queue fills by bytes long before it fills by rows: with 4 KiB of
    /// room, batches of one 2 KiB row stop being taken after two, though 100 rows fit.
    #[tokio::test(start_paused = true)]
    async fn a_queue_is_bounded_in_bytes_as_well_as_rows() {
        let limits = QueueLimits {
            queue_rows: 100,
            queue_bytes: 4 << 10,
            write_rows: 100,
            write_bytes: 4 << 10,
            write_timeout: Duration::from_secs(30),
        };
        let mut sinks = Sinks::new(limits, Health::new(&["redis"]));
        sinks.add(Hung);
        let (batches_tx, batches_rx) = mpsc::channel(1);
        let (ack_tx, _ack_rx) = watch::channel(Lsn(0));
        let _fanout = tokio::spawn(run(sinks, batches_rx, Lsn(0), ack_tx));
        let mut taken = 0;
        for lsn in 1..=10 {
            let mut batch = one_row(lsn);
            batch.bytes = 2 << 10;
            if batches_tx.try_send(batch).is_err() {
                break;
            }
            taken += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Two in the queue (one of them in the hung write), one waiting for room in the
        // fan-out, one in the channel.
        assert_eq!(taken, 4);
    }

    /// Hangs on its first write (a stopped server); counts resets; then writes.
    struct HangsOnce {
        writes: u32,
        resets: Arc<std::sync::atomic::AtomicU32>,
    }

    impl Sink for HangsOnce {
        fn name(&self) -> &'static str {
            "hangs-once"
        }

        fn reset(&mut self) {
            self.resets
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }

        async fn checkpoint(&mut self) -> Result<Option<Position>, SinkError> {
            Ok(None)
        }

        async fn write(&mut self, _batches: &[&Batch]) -> Result<(), SinkError> {
            self.writes += 1;
            if self.writes == 1 {
                std::future::pending::<()>().await;
            }
            Ok(())
        }

        async fn backfill_cursor(&mut self, _job: &str) -> Result<Option<i64>, SinkError> {
            Ok(None)
        }
    }

    /// A write past its deadline is cut, the sink's connections are dropped, the sink is
    /// reported failing, and the retry confirms the batch.
    #[tokio::test(start_paused = true)]
    async fn a_write_past_its_deadline_is_retried_on_fresh_connections() {
        let health = Health::new(&["redis"]);
        let limits = QueueLimits {
            queue_rows: 100,
            queue_bytes: 1 << 20,
            write_rows: 100,
            write_bytes: 1 << 20,
            write_timeout: Duration::from_secs(3),
        };
        let mut sinks = Sinks::new(limits, Arc::clone(&health));
        let resets = Arc::new(std::sync::atomic::AtomicU32::new(0));
        sinks.add(HangsOnce {
            writes: 0,
            resets: Arc::clone(&resets),
        });
        let (batches_tx, batches_rx) = mpsc::channel(16);
        let (ack_tx, mut ack_rx) = watch::channel(Lsn(0));
        let fanout = tokio::spawn(run(sinks, batches_rx, Lsn(0), ack_tx));
        batches_tx.send(one_row(7)).await.unwrap();
        let started = tokio::time::Instant::now();
        tokio::time::timeout(
            Duration::from_secs(60),
            ack_rx.wait_for(|lsn| *lsn == Lsn(7)),
        )
        .await
        .expect("the batch is confirmed, not held by the hung write")
        .unwrap();
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(resets.load(std::sync::atomic::Ordering::Relaxed), 1);
        drop(batches_tx);
        fanout.await.unwrap().unwrap();
    }
}
