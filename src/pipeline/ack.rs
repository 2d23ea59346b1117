//! # Progress tracking
//!
//! The one place that decides how far PostgreSQL may recycle WAL.
//!
//! Every batch gets a sequence number when it is handed to the sinks, and carries the LSN
//! that is safe to acknowledge once it is applied (`Batch::ack_lsn`: the end of the last
//! transaction it completes, or a keepalive's WAL end). Each sink confirms its batches in
//! order. The flushed position reported to PostgreSQL is the `ack_lsn` of the newest batch
//! that *every* sink has confirmed, together with all batches before it:
//!
//! ```text
//!   batches:   #7 ack 0/A0   #8 ack -   #9 ack 0/C8   #10 ack 0/D0
//!   redis      ──────────────────────────────────────▶ confirmed #10
//!   postgres   ─────────────────────────▶ confirmed #9
//!   flush = 0/C8 (#9 is the newest batch both confirmed; #8 ended mid-transaction)
//! ```
//!
//! Keepalive-only periods matter as much: when the publication's tables are quiet but the
//! rest of the database is busy, the server sends keepalives whose WAL end keeps moving.
//! The source turns each one (outside a transaction) into an empty batch carrying that
//! LSN, which flows through this same ordering; without it the slot's confirmed position
//! would stay at the last published commit and PostgreSQL would keep every WAL segment
//! written since, until the disk fills.

use std::collections::VecDeque;

use crate::lsn::Lsn;

#[derive(Debug)]
pub struct AckTracker {
    /// Per sink, how many batches it has confirmed (batches `0..confirmed[s]`).
    confirmed: Vec<u64>,
    /// Dispatched batches not yet confirmed by every sink: sequence number, ack LSN.
    pending: VecDeque<(u64, Option<Lsn>)>,
    next_seq: u64,
    acked: Lsn,
}

impl AckTracker {
    /// `acked` is where the slot already stands.
    pub fn new(sinks: usize, acked: Lsn) -> Self {
        AckTracker {
            confirmed: vec![0; sinks],
            pending: VecDeque::new(),
            next_seq: 0,
            acked,
        }
    }

    /// Registers a batch handed to the sinks; returns its sequence number.
    pub fn dispatch(&mut self, ack_lsn: Option<Lsn>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.push_back((seq, ack_lsn));
        seq
    }

    /// Sink `sink` applied batch `seq` (and, by ordering, all before it). Returns the new
    /// flush position when it moved.
    pub fn confirm(&mut self, sink: usize, seq: u64) -> Option<Lsn> {
        let confirmed = &mut self.confirmed[sink];
        *confirmed = (*confirmed).max(seq + 1);
        let everywhere = self.confirmed.iter().copied().min().unwrap_or(0);
        let mut newest = None;
        while let Some(&(seq, ack)) = self.pending.front() {
            if seq >= everywhere {
                break;
            }
            self.pending.pop_front();
            newest = ack.or(newest);
        }
        match newest {
            Some(lsn) if lsn > self.acked => {
                self.acked = lsn;
                Some(lsn)
            }
            _ => None,
        }
    }

    /// Batches some sink has not confirmed yet.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// The position every sink has confirmed.
    pub fn acked(&self) -> Lsn {
        self.acked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_is_the_newest_ack_every_sink_confirmed() {
        let mut t = AckTracker::new(2, Lsn(0x10));
        let a = t.dispatch(Some(Lsn(0xA0)));
        let b = t.dispatch(None); // ends mid-transaction
        let c = t.dispatch(Some(Lsn(0xC8)));
        assert_eq!(
            t.confirm(0, c),
            None,
            "the other sink has confirmed nothing"
        );
        assert_eq!(t.confirm(1, a), Some(Lsn(0xA0)));
        assert_eq!(
            t.confirm(1, b),
            None,
            "a mid-transaction batch moves nothing"
        );
        assert_eq!(t.confirm(1, c), Some(Lsn(0xC8)));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.acked(), Lsn(0xC8));
    }

    #[test]
    fn never_moves_backwards() {
        let mut t = AckTracker::new(1, Lsn(0x100));
        let a = t.dispatch(Some(Lsn(0x50)));
        assert_eq!(t.confirm(0, a), None);
        let b = t.dispatch(Some(Lsn(0x200)));
        assert_eq!(t.confirm(0, b), Some(Lsn(0x200)));
    }
}
