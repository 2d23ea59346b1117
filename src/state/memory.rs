//! [`StateStore`] in memory: the twin of [`super::PgState`] for unit tests. Kept to the
//! same contract by [`super::contract::check`], which runs on both.

use std::collections::{BTreeMap, HashMap};

use super::{Outbox, StateError, StateStore, Unreplayed};
use crate::event::{DeadLetter, DeadLetterReason, Origin};
use crate::lsn::{Position, SourceId};

#[derive(Debug, Clone, Default)]
struct CheckpointRow {
    position: Option<Position>,
    source: Option<SourceId>,
}

#[derive(Debug, Clone)]
struct DeadRow {
    origin: Origin,
    position: Position,
    row_id: Option<i64>,
    key: Option<String>,
    body: String,
    replayed: bool,
}

/// Every table of the state as a map.
#[derive(Debug, Default)]
pub struct MemoryState {
    checkpoints: HashMap<String, CheckpointRow>,
    cursors: HashMap<String, i64>,
    outboxes: HashMap<String, Outbox>,
    /// By id, in insertion order, as `BIGSERIAL` numbers them.
    dead: BTreeMap<i64, DeadRow>,
}

impl MemoryState {
    pub fn new() -> Self {
        Self::default()
    }

    /// The two unique constraints of `analytics.dead_letters`.
    fn insert_dead(&mut self, row: DeadRow) {
        let taken = self.dead.values().any(|d| {
            (d.origin == row.origin && d.position == row.position)
                || (row.origin == Origin::Backfill
                    && d.origin == Origin::Backfill
                    && row.row_id.is_some()
                    && d.row_id == row.row_id)
        });
        if !taken {
            let id = self.dead.keys().next_back().map_or(1, |id| id + 1);
            self.dead.insert(id, row);
        }
    }

    fn raise(&mut self, sink: &str, at: Position) {
        let row = self.checkpoints.entry(sink.to_owned()).or_default();
        if row.position.is_none_or(|held| held < at) {
            row.position = Some(at);
        }
    }
}

impl StateStore for MemoryState {
    async fn checkpoint(&mut self, sink: &str) -> Result<Option<Position>, StateError> {
        Ok(self.checkpoints.get(sink).and_then(|row| row.position))
    }

    async fn raise_checkpoint(&mut self, sink: &str, at: Position) -> Result<(), StateError> {
        self.raise(sink, at);
        Ok(())
    }

    async fn source(&mut self, sink: &str) -> Result<Option<SourceId>, StateError> {
        Ok(self.checkpoints.get(sink).and_then(|row| row.source))
    }

    async fn claim_source(&mut self, sink: &str, source: SourceId) -> Result<(), StateError> {
        self.checkpoints.entry(sink.to_owned()).or_default().source = Some(source);
        Ok(())
    }

    async fn backfill_cursor(&mut self, job: &str) -> Result<Option<i64>, StateError> {
        Ok(self.cursors.get(job).copied())
    }

    async fn save_backfill_cursor(
        &mut self,
        job: &str,
        cursor: Option<i64>,
    ) -> Result<(), StateError> {
        match cursor {
            Some(id) => self.cursors.insert(job.to_owned(), id),
            None => self.cursors.remove(job),
        };
        Ok(())
    }

    async fn outbox(&mut self, sink: &str) -> Result<Option<Outbox>, StateError> {
        Ok(self.outboxes.get(sink).cloned())
    }

    async fn save_outbox(&mut self, sink: &str, outbox: &Outbox) -> Result<(), StateError> {
        self.outboxes.insert(sink.to_owned(), outbox.clone());
        Ok(())
    }

    async fn finish_outbox(
        &mut self,
        sink: &str,
        outbox: &Outbox,
        dead: Option<(DeadLetterReason, &str)>,
    ) -> Result<(), StateError> {
        if dead.is_some() {
            self.insert_dead(DeadRow {
                origin: Origin::Webhook,
                position: outbox.first,
                row_id: None,
                key: Some(outbox.key.clone()),
                body: outbox.body.clone(),
                replayed: false,
            });
        }
        self.outboxes.remove(sink);
        self.raise(sink, outbox.last);
        Ok(())
    }

    async fn insert_dead_letters(
        &mut self,
        origin: Origin,
        dead: &[&DeadLetter],
    ) -> Result<(), StateError> {
        for letter in dead {
            self.insert_dead(DeadRow {
                origin,
                position: letter.position,
                row_id: letter.row_id(),
                key: None,
                body: letter.raw_json(),
                replayed: false,
            });
        }
        Ok(())
    }

    async fn count_dead_letters(&mut self, origin: Origin) -> Result<u64, StateError> {
        Ok(self.dead.values().filter(|d| d.origin == origin).count() as u64)
    }

    async fn unreplayed(&mut self) -> Result<Vec<Unreplayed>, StateError> {
        let mut rows: Vec<(&i64, &DeadRow)> = self
            .dead
            .iter()
            .filter(|(_, d)| d.origin == Origin::Webhook && !d.replayed)
            .collect();
        rows.sort_by_key(|(_, d)| d.position);
        Ok(rows
            .into_iter()
            .map(|(id, d)| Unreplayed {
                id: *id,
                key: d.key.clone(),
                body: d.body.clone(),
            })
            .collect())
    }

    async fn mark_replayed(&mut self, id: i64) -> Result<(), StateError> {
        if let Some(row) = self.dead.get_mut(&id) {
            row.replayed = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_twin_keeps_the_contract() {
        super::super::contract::check(&mut MemoryState::new()).await;
    }
}
