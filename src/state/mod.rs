//! walcast's own state in the analytics database, in one place: which migrations ran,
//! each sink's checkpoint and the WAL history it belongs to, backfill cursors, the
//! webhook's outbox and the dead letters.
//!
//! | table | what a row is |
//! |---|---|
//! | `analytics.walcast_migrations` | a migration applied |
//! | `analytics.walcast_checkpoint` | a sink's checkpoint (`postgres`, `webhook`) and its source |
//! | `analytics.walcast_backfill` | an unfinished backfill's cursor, per job (`webhook/<job>` for the webhook's) |
//! | `analytics.walcast_webhook_outbox` | the webhook batch sent but not yet confirmed |
//! | `analytics.dead_letters` | a row or batch that could not be applied, with its origin and reason |
//!
//! [`StateStore`] is the one way in: [`PgState`] over a connection or inside a sink's own
//! transaction (so state moves atomically with the data), and [`MemoryState`], its
//! in-memory twin, for unit tests of the logic built on it. `tests/main.rs` runs the same
//! contract against both, so the twin cannot drift from the SQL. Redis keeps its own
//! checkpoint in Redis, atomically with its keys (see `sink::redis`).

mod memory;
mod pg;

pub use memory::MemoryState;
pub use pg::{PgState, Prepared, migrate};

use std::future::Future;

use crate::event::{DeadLetter, DeadLetterReason, Origin};
use crate::lsn::{Position, SourceId};

/// A state read or write the analytics database refused or could not answer.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {}", crate::pg::detail(source))]
pub struct StateError {
    pub context: &'static str,
    #[source]
    pub source: tokio_postgres::Error,
}

impl StateError {
    /// Whether the analytics schema (or one of its tables) is not there yet.
    pub fn is_undefined_object(&self) -> bool {
        crate::pg::is_undefined_object(&self.source)
    }
}

/// A webhook batch as it is sent: kept in the outbox until confirmed, then resent as it
/// was after a crash, under the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbox {
    pub key: String,
    pub first: Position,
    pub last: Position,
    pub body: String,
}

/// A webhook dead letter not yet replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreplayed {
    pub id: i64,
    pub key: Option<String>,
    pub body: String,
}

/// The operations on walcast's state. Every write is idempotent: a retried write after an
/// error changes nothing twice.
pub trait StateStore: Send {
    /// The position `sink` has applied everything up to; `None` before its first write.
    fn checkpoint(
        &mut self,
        sink: &str,
    ) -> impl Future<Output = Result<Option<Position>, StateError>> + Send;

    /// Moves `sink`'s checkpoint to `position` if that is ahead of it; never back.
    fn raise_checkpoint(
        &mut self,
        sink: &str,
        position: Position,
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// The WAL history `sink`'s checkpoint belongs to; `None` when none was recorded.
    fn source(
        &mut self,
        sink: &str,
    ) -> impl Future<Output = Result<Option<SourceId>, StateError>> + Send;

    /// Records `source` as the history of `sink`'s checkpoint (also before its first write).
    fn claim_source(
        &mut self,
        sink: &str,
        source: SourceId,
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// The highest id backfill `job` applied; `None` when it never ran or finished.
    fn backfill_cursor(
        &mut self,
        job: &str,
    ) -> impl Future<Output = Result<Option<i64>, StateError>> + Send;

    /// Moves backfill `job`'s cursor to `cursor`; `None` ends the job (removes it).
    fn save_backfill_cursor(
        &mut self,
        job: &str,
        cursor: Option<i64>,
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// The batch `sink` sent but has not confirmed.
    fn outbox(
        &mut self,
        sink: &str,
    ) -> impl Future<Output = Result<Option<Outbox>, StateError>> + Send;

    /// Keeps `outbox` as `sink`'s batch in flight, replacing any before it.
    fn save_outbox(
        &mut self,
        sink: &str,
        outbox: &Outbox,
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Done with `sink`'s batch in flight, all at once: dead-lettered when `dead` says why
    /// (origin `webhook`, under the batch's key), the outbox emptied, the checkpoint raised
    /// to its last position.
    fn finish_outbox(
        &mut self,
        sink: &str,
        outbox: &Outbox,
        dead: Option<(DeadLetterReason, &str)>,
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Stores `dead` under `origin`. Unique by (origin, position) for rows from the stream
    /// and by row id for a backfill's: a replay inserts none twice.
    fn insert_dead_letters(
        &mut self,
        origin: Origin,
        dead: &[&DeadLetter],
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// How many dead letters `origin` wrote.
    fn count_dead_letters(
        &mut self,
        origin: Origin,
    ) -> impl Future<Output = Result<u64, StateError>> + Send;

    /// The webhook's dead letters not yet replayed, oldest position first.
    fn unreplayed(&mut self) -> impl Future<Output = Result<Vec<Unreplayed>, StateError>> + Send;

    /// Marks a webhook dead letter as replayed.
    fn mark_replayed(&mut self, id: i64) -> impl Future<Output = Result<(), StateError>> + Send;
}

/// Whether a checkpoint stored under one history may be used under `current`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum History {
    /// Nothing was recorded (a new sink, or one from before identities were stored), or
    /// it is the same history: `current` is now recorded.
    Claimed,
    /// The checkpoint belongs to another history: positions do not compare.
    Other(SourceId),
}

/// Checks that `sink`'s checkpoint belongs to `current` and records `current` from now on;
/// leaves an other history's record as it is.
pub async fn claim_history(
    store: &mut impl StateStore,
    sink: &str,
    current: SourceId,
) -> Result<History, StateError> {
    match store.source(sink).await? {
        Some(stored) if stored != current => Ok(History::Other(stored)),
        _ => {
            store.claim_source(sink, current).await?;
            Ok(History::Claimed)
        }
    }
}

/// Where a follower of `leader`'s facts starts: its own checkpoint, or, when it has none
/// (it is new, or was just enabled), `leader`'s, recorded at once as its own so a restart
/// starts there too.
pub async fn start_following(
    store: &mut impl StateStore,
    follower: &str,
    leader: &str,
) -> Result<Option<Position>, StateError> {
    if let Some(own) = store.checkpoint(follower).await? {
        return Ok(Some(own));
    }
    let Some(at) = store.checkpoint(leader).await? else {
        return Ok(None);
    };
    store.raise_checkpoint(follower, at).await?;
    Ok(Some(at))
}

/// The contract both stores keep, run on [`MemoryState`] by the unit tests and on
/// [`PgState`] against a real server by the integration tests.
pub mod contract {
    use super::*;
    use crate::lsn::Lsn;

    fn at(lsn: u64, seq: u32) -> Position {
        Position::new(Lsn(lsn), seq)
    }

    fn dead(position: Position, origin_row: Option<i64>) -> DeadLetter {
        DeadLetter {
            position,
            table: "engagement_events".to_owned(),
            reason: DeadLetterReason::InvalidValue,
            detail: "bad".to_owned(),
            raw: match origin_row {
                Some(id) => vec![("id".to_owned(), Some(id.to_string()))],
                None => vec![("x".to_owned(), None)],
            },
        }
    }

    /// Exercises every operation; panics at the first difference from the contract.
    pub async fn check(store: &mut impl StateStore) {
        let history = SourceId {
            system_id: 7,
            timeline: 1,
        };
        let other = SourceId {
            system_id: 8,
            timeline: 1,
        };
        // Checkpoints move forward only.
        assert_eq!(store.checkpoint("a").await.unwrap(), None);
        store.raise_checkpoint("a", at(100, 2)).await.unwrap();
        store.raise_checkpoint("a", at(100, 1)).await.unwrap();
        assert_eq!(store.checkpoint("a").await.unwrap(), Some(at(100, 2)));
        store.raise_checkpoint("a", at(200, 0)).await.unwrap();
        assert_eq!(store.checkpoint("a").await.unwrap(), Some(at(200, 0)));
        assert_eq!(store.checkpoint("b").await.unwrap(), None);

        // Histories: recorded before a first write, another one refused.
        assert_eq!(
            claim_history(store, "b", history).await.unwrap(),
            History::Claimed
        );
        assert_eq!(store.source("b").await.unwrap(), Some(history));
        assert_eq!(store.checkpoint("b").await.unwrap(), None);
        assert_eq!(
            claim_history(store, "b", other).await.unwrap(),
            History::Other(history)
        );
        assert_eq!(store.source("b").await.unwrap(), Some(history));
        // A claim keeps the checkpoint.
        claim_history(store, "a", history).await.unwrap();
        assert_eq!(store.checkpoint("a").await.unwrap(), Some(at(200, 0)));

        // A follower starts at the leader's checkpoint, then keeps its own.
        assert_eq!(
            start_following(store, "f", "a").await.unwrap(),
            Some(at(200, 0))
        );
        store.raise_checkpoint("a", at(300, 0)).await.unwrap();
        assert_eq!(
            start_following(store, "f", "a").await.unwrap(),
            Some(at(200, 0))
        );
        assert_eq!(start_following(store, "g", "none").await.unwrap(), None);
        assert_eq!(store.checkpoint("g").await.unwrap(), None);

        // Backfill cursors.
        assert_eq!(store.backfill_cursor("j").await.unwrap(), None);
        store.save_backfill_cursor("j", Some(10)).await.unwrap();
        store.save_backfill_cursor("j", Some(20)).await.unwrap();
        assert_eq!(store.backfill_cursor("j").await.unwrap(), Some(20));
        store.save_backfill_cursor("j", None).await.unwrap();
        assert_eq!(store.backfill_cursor("j").await.unwrap(), None);

        // The outbox: one batch in flight per sink, finished atomically.
        assert_eq!(store.outbox("w").await.unwrap(), None);
        let first = Outbox {
            key: "k1".to_owned(),
            first: at(400, 0),
            last: at(400, 3),
            body: r#"{"n":1}"#.to_owned(),
        };
        let second = Outbox {
            key: "k2".to_owned(),
            first: at(500, 0),
            last: at(500, 1),
            body: r#"{"n":2}"#.to_owned(),
        };
        store.save_outbox("w", &first).await.unwrap();
        store.save_outbox("w", &first).await.unwrap();
        assert_eq!(store.outbox("w").await.unwrap(), Some(first.clone()));
        store.finish_outbox("w", &first, None).await.unwrap();
        assert_eq!(store.outbox("w").await.unwrap(), None);
        assert_eq!(store.checkpoint("w").await.unwrap(), Some(at(400, 3)));
        store.save_outbox("w", &second).await.unwrap();
        store
            .finish_outbox(
                "w",
                &second,
                Some((DeadLetterReason::WebhookRejected, "HTTP 400")),
            )
            .await
            .unwrap();
        // Finishing again (a retry after an error) changes nothing.
        store
            .finish_outbox(
                "w",
                &second,
                Some((DeadLetterReason::WebhookRejected, "HTTP 400")),
            )
            .await
            .unwrap();
        assert_eq!(store.checkpoint("w").await.unwrap(), Some(at(500, 1)));
        // An older batch finished late does not move the checkpoint back.
        store.finish_outbox("w", &first, None).await.unwrap();
        assert_eq!(store.checkpoint("w").await.unwrap(), Some(at(500, 1)));

        // Webhook dead letters, replayed once.
        let unreplayed = store.unreplayed().await.unwrap();
        assert_eq!(unreplayed.len(), 1, "{unreplayed:?}");
        assert_eq!(unreplayed[0].key.as_deref(), Some("k2"));
        // PostgreSQL keeps the body as jsonb, so compare it as JSON.
        let json = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
        assert_eq!(json(&unreplayed[0].body), json(&second.body));
        store.mark_replayed(unreplayed[0].id).await.unwrap();
        assert!(store.unreplayed().await.unwrap().is_empty());

        // Dead letters of the stream are unique by position, so a replay adds none.
        let a = dead(at(600, 0), Some(1));
        let b = dead(at(600, 1), None);
        store
            .insert_dead_letters(Origin::Source, &[&a, &b])
            .await
            .unwrap();
        store
            .insert_dead_letters(Origin::Source, &[&a])
            .await
            .unwrap();
        assert_eq!(store.count_dead_letters(Origin::Source).await.unwrap(), 2);
        // A backfill's are unique by row id.
        let c = dead(at(0, 0), Some(5));
        store
            .insert_dead_letters(Origin::Backfill, &[&c])
            .await
            .unwrap();
        store
            .insert_dead_letters(Origin::Backfill, &[&c])
            .await
            .unwrap();
        assert_eq!(store.count_dead_letters(Origin::Backfill).await.unwrap(), 1);
        assert_eq!(store.count_dead_letters(Origin::Webhook).await.unwrap(), 1);
        // Other kinds of dead letters are not the webhook's to replay.
        assert!(store.unreplayed().await.unwrap().is_empty());
    }
}
