//! Adaptive batching.
//!
//! Rows collect in one open batch. The source closes it when the input is idle (the
//! replication channel has nothing ready), so under light load every transaction leaves at
//! once and is visible in milliseconds; under load the input is never idle and batches
//! grow until `max_events` or `max_bytes`, which amortizes each sink round trip over
//! thousands of rows. A transaction larger than a batch is cut into several: only the one
//! that holds its commit carries an `ack_lsn`, and positions make a partial replay exact.

use chrono::{DateTime, Utc};

use crate::event::{Batch, DeadLetter, EnrichedEvent, Feed};
use crate::lsn::Lsn;

pub struct Batcher {
    max_events: usize,
    max_bytes: usize,
    open: Batch,
    /// The highest LSN handed out as an acknowledgement point, so keepalives that repeat
    /// the same WAL end add no empty batches.
    marked: Lsn,
}

impl Batcher {
    pub fn new(max_events: usize, max_bytes: usize, marked: Lsn) -> Self {
        Batcher {
            max_events,
            max_bytes,
            open: Batch::default(),
            marked,
        }
    }

    pub fn push_event(&mut self, event: EnrichedEvent, bytes: usize) {
        self.open.bytes += bytes;
        self.open.events.push(event);
    }

    pub fn push_dead_letter(&mut self, dead: DeadLetter, bytes: usize) {
        self.open.bytes += bytes;
        self.open.dead_letters.push(dead);
    }

    /// A transaction ended at `end_lsn`: everything up to it is in this batch or earlier.
    pub fn commit(&mut self, end_lsn: Lsn, commit_ts: DateTime<Utc>) {
        self.mark(end_lsn);
        self.open.commit_ts = Some(commit_ts);
    }

    /// `lsn` is safe to acknowledge once this batch is applied (a commit end, or a
    /// keepalive's WAL end while no transaction is open).
    pub fn mark(&mut self, lsn: Lsn) {
        if lsn > self.marked {
            self.marked = lsn;
            self.open.feed = Feed::Stream { ack_lsn: Some(lsn) };
        }
    }

    pub fn is_full(&self) -> bool {
        self.open.rows() >= self.max_events || self.open.bytes >= self.max_bytes
    }

    pub fn has_pending(&self) -> bool {
        !self.open.is_empty()
    }

    /// Drops the open batch: its rows will be read again (a new replication session
    /// replays from the last acknowledged position).
    pub fn discard(&mut self) {
        self.open = Batch::default();
    }

    /// Closes the open batch; `None` when there is nothing to send.
    pub fn take(&mut self) -> Option<Batch> {
        if self.open.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut self.open))
    }
}
