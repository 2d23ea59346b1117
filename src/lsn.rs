//! WAL positions.
//!
//! [`Lsn`] is a byte offset in PostgreSQL's write-ahead log, printed the way the server
//! prints it (`16/B374D848`: high and low 32 bits in hex). [`Position`] orders events:
//! the commit LSN of the event's transaction, then the event's index inside it. Commit
//! LSNs are strictly increasing in the order pgoutput delivers transactions, so positions
//! are totally ordered and the same on every replay of the slot.
//!
//! Positions compare only within one WAL history. [`SourceId`] names that history: the
//! cluster's system identifier (new with every initdb, so a dump restored elsewhere has
//! another) and the timeline (new after a point-in-time recovery or a standby's
//! promotion). Sinks store it with their checkpoint; walcast never compares a position of
//! one history with one of another.

use std::fmt;
use std::str::FromStr;

/// A WAL location.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);

    /// Bytes of WAL from `earlier` to `self`; zero when `earlier` is ahead.
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hex numbers separated by '/', like 16/B374D848")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl From<pgwire_replication::Lsn> for Lsn {
    fn from(lsn: pgwire_replication::Lsn) -> Self {
        Lsn(lsn.as_u64())
    }
}

impl From<Lsn> for pgwire_replication::Lsn {
    fn from(lsn: Lsn) -> Self {
        pgwire_replication::Lsn::from_u64(lsn.0)
    }
}

/// Where an event sits in the stream: `(commit_lsn, seq)`.
///
/// `seq` counts the row changes (insert, update, delete) of the transaction from 0, so it
/// is the same on every replay. A transaction cut into several batches is resumed exactly
/// by skipping positions at or below a sink's checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub commit_lsn: Lsn,
    pub seq: u32,
}

impl Position {
    pub fn new(commit_lsn: Lsn, seq: u32) -> Self {
        Position { commit_lsn, seq }
    }

    /// A fixed-width form whose byte order is the position order (`0000000016B374D8:00000042`):
    /// what sinks store as checkpoints, so a store that only compares strings (a Redis
    /// script) can compare positions.
    pub fn to_sortable(self) -> String {
        format!("{:016X}:{:08X}", self.commit_lsn.0, self.seq)
    }

    /// Parses [`Position::to_sortable`]'s form; what follows a `|` (the source identity a
    /// checkpoint carries) is not part of it.
    pub fn from_sortable(s: &str) -> Option<Position> {
        let s = s.split_once('|').map_or(s, |(position, _)| position);
        let (lsn, seq) = s.split_once(':')?;
        if lsn.len() != 16 || seq.len() != 8 {
            return None;
        }
        Some(Position {
            commit_lsn: Lsn(u64::from_str_radix(lsn, 16).ok()?),
            seq: u32::from_str_radix(seq, 16).ok()?,
        })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.commit_lsn, self.seq)
    }
}

/// The WAL history positions belong to, as `IDENTIFY_SYSTEM` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceId {
    pub system_id: u64,
    pub timeline: u32,
}

impl SourceId {
    /// `<system id>/<timeline>`, as stored beside checkpoints.
    pub fn stored(self) -> String {
        format!("{}/{}", self.system_id, self.timeline)
    }

    /// Parses [`SourceId::stored`]'s form.
    pub fn from_stored(s: &str) -> Option<SourceId> {
        let (system_id, timeline) = s.split_once('/')?;
        Some(SourceId {
            system_id: system_id.parse().ok()?,
            timeline: timeline.parse().ok()?,
        })
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "system {} timeline {}", self.system_id, self.timeline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::ZERO);
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
    }

    #[test]
    fn sortable_positions_order_like_positions() {
        let a = Position::new(Lsn(0xFF), 9);
        let b = Position::new(Lsn(0x100), 0);
        let c = Position::new(Lsn(0x100), 10);
        assert!(a < b && b < c);
        assert!(a.to_sortable() < b.to_sortable() && b.to_sortable() < c.to_sortable());
        assert_eq!(Position::from_sortable(&c.to_sortable()), Some(c));
        assert_eq!(Position::from_sortable("garbage"), None);
    }
}
