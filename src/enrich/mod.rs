//! Enrichment: the content cache and the engagement-event transform.
//!
//! The [`Enricher`] sees every change of the stream in commit order. Changes to `content`
//! update the [`ContentCache`] at once, so an event sees exactly the content rows that
//! committed before it; inserts on `engagement_events` become [`EnrichedEvent`]s, or
//! [`DeadLetter`]s when the row cannot be an event at all. Columns are always found by
//! name through the table's latest Relation message, never by position, so added,
//! dropped or reordered columns do not shift values.

mod content;
mod transform;

pub use content::ContentCache;
pub use transform::{engagement_pct, engagement_seconds, event as row_event, parse_timestamptz};

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::decode::{Change, DecodeError, Relation, RelationCache};
use crate::event::{DeadLetter, EnrichedEvent};
use crate::lsn::Position;

pub use crate::event::{CONTENT_TABLE, EVENTS_TABLE};

/// What one change turned into.
#[derive(Debug)]
pub enum Outcome {
    Event(Box<EnrichedEvent>),
    DeadLetter(Box<DeadLetter>),
    /// A content change applied to the cache, a Relation, or a change walcast does not
    /// deliver (updates and deletes of events, other tables).
    Applied,
    /// `engagement_events` was truncated: its ids may start over, while every sink still
    /// holds the events it had under them (see `pipeline`: walcast stops here).
    EventsTruncated,
}

/// Which table a relation id is, as far as walcast cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Content,
    Events,
    Other,
}

/// Per-session decoding state plus the content cache.
pub struct Enricher {
    relations: RelationCache,
    tables: HashMap<u32, Table>,
    cache: ContentCache,
}

impl Enricher {
    pub fn new(cache: ContentCache) -> Self {
        Enricher {
            relations: RelationCache::default(),
            tables: HashMap::new(),
            cache,
        }
    }

    pub fn cache(&self) -> &ContentCache {
        &self.cache
    }

    /// Forgets the relations of a finished replication session; the cache stays.
    pub fn reset_session(&mut self) {
        self.relations = RelationCache::default();
        self.tables.clear();
    }

    /// Applies one change. `position` is the change's position in its transaction.
    pub fn apply(
        &mut self,
        change: Change,
        position: Position,
        commit_ts: DateTime<Utc>,
    ) -> Result<Outcome, DecodeError> {
        match change {
            Change::Relation(relation) => {
                let table = classify(&relation);
                self.tables.insert(relation.id, table);
                self.relations.insert(relation);
                Ok(Outcome::Applied)
            }
            Change::Insert { relation, new } => {
                let rel = Arc::clone(self.relations.get(relation)?);
                match self.table(relation) {
                    Table::Events => Ok(
                        match transform::event(&rel, &new, position, commit_ts, &self.cache) {
                            Ok(event) => Outcome::Event(Box::new(event)),
                            Err(dead) => Outcome::DeadLetter(Box::new(dead)),
                        },
                    ),
                    Table::Content => Ok(self.content_upsert(&rel, None, &new, position)),
                    Table::Other => Ok(Outcome::Applied),
                }
            }
            Change::Update { relation, old, new } => {
                let rel = Arc::clone(self.relations.get(relation)?);
                match self.table(relation) {
                    Table::Content => Ok(self.content_upsert(&rel, old.as_ref(), &new, position)),
                    Table::Events | Table::Other => Ok(Outcome::Applied),
                }
            }
            Change::Delete { relation, old } => {
                let rel = Arc::clone(self.relations.get(relation)?);
                if self.table(relation) == Table::Content {
                    self.cache.delete(&rel, &old);
                }
                Ok(Outcome::Applied)
            }
            Change::Truncate { relations } => {
                if relations.iter().any(|&r| self.table(r) == Table::Events) {
                    return Ok(Outcome::EventsTruncated);
                }
                if relations.iter().any(|&r| self.table(r) == Table::Content) {
                    self.cache.clear();
                }
                Ok(Outcome::Applied)
            }
            Change::Ignored(_) => Ok(Outcome::Applied),
        }
    }

    /// The table a relation id is, as a metric label.
    pub fn table_label(&self, relation: u32) -> &'static str {
        match self.table(relation) {
            Table::Content => CONTENT_TABLE,
            Table::Events => EVENTS_TABLE,
            Table::Other => "other",
        }
    }

    fn table(&self, relation: u32) -> Table {
        self.tables.get(&relation).copied().unwrap_or(Table::Other)
    }

    fn content_upsert(
        &mut self,
        rel: &Relation,
        old: Option<&crate::decode::Tuple>,
        new: &crate::decode::Tuple,
        position: Position,
    ) -> Outcome {
        match self.cache.upsert(rel, old, new) {
            Ok(()) => Outcome::Applied,
            Err(detail) => Outcome::DeadLetter(Box::new(DeadLetter {
                position,
                table: rel.name.clone(),
                reason: crate::event::DeadLetterReason::InvalidValue,
                detail,
                raw: transform::raw_values(rel, new),
            })),
        }
    }
}

fn classify(relation: &Relation) -> Table {
    if relation.namespace != "public" {
        return Table::Other;
    }
    match relation.name.as_str() {
        CONTENT_TABLE => Table::Content,
        EVENTS_TABLE => Table::Events,
        _ => Table::Other,
    }
}
