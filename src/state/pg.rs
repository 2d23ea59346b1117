//! [`StateStore`] in the analytics database, and its migrations.

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Statement};

use super::{Outbox, StateError, StateStore, Unreplayed};
use crate::event::{DeadLetter, DeadLetterReason, Origin};
use crate::lsn::{Position, SourceId};

/// Analytics migrations, applied in order, each once (recorded in
/// `analytics.walcast_migrations`). Hand-rolled rather than a migration crate: the runner
/// is one transaction under an advisory lock, and a crate would impose its own file naming
/// and history table on sql/, which also holds the source schema.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "003_analytics_schema",
        include_str!("../../sql/003_analytics_schema.sql"),
    ),
    ("004_backfill", include_str!("../../sql/004_backfill.sql")),
    ("005_webhook", include_str!("../../sql/005_webhook.sql")),
    (
        "006_checkpoint_source",
        include_str!("../../sql/006_checkpoint_source.sql"),
    ),
    (
        "007_webhook_follows_facts",
        include_str!("../../sql/007_webhook_follows_facts.sql"),
    ),
];

/// Applies the migrations not yet recorded, in one transaction, under an advisory lock so
/// two processes starting together do not race. Returns the ones it applied.
pub async fn migrate(client: &mut Client) -> Result<Vec<&'static str>, StateError> {
    let context = "creating the analytics schema";
    let pg = |source| StateError { context, source };
    let tx = client.transaction().await.map_err(pg)?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtext('walcast analytics migrations'));
         -- Only when missing: creating a schema takes CREATE on the database, which a role
         -- that was given schema analytics to own does not need.
         DO $$ BEGIN
             IF NOT EXISTS (SELECT FROM pg_namespace WHERE nspname = 'analytics') THEN
                 CREATE SCHEMA analytics;
             END IF;
         END $$;
         CREATE TABLE IF NOT EXISTS analytics.walcast_migrations (
             version    TEXT PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );",
    )
    .await
    .map_err(pg)?;
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS {
        let done = tx
            .query_opt(
                "SELECT 1 FROM analytics.walcast_migrations WHERE version = $1",
                &[version],
            )
            .await
            .map_err(pg)?
            .is_some();
        if !done {
            tx.batch_execute(sql).await.map_err(pg)?;
            tx.execute(
                "INSERT INTO analytics.walcast_migrations (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(pg)?;
            applied.push(*version);
        }
    }
    tx.commit().await.map_err(pg)?;
    Ok(applied)
}

/// Raises a checkpoint, never lowers it: `$1` sink, `$2` LSN text, `$3` seq.
const RAISE_CHECKPOINT: &str = "INSERT INTO analytics.walcast_checkpoint AS c
    (sink, commit_lsn, seq, updated_at)
VALUES ($1, $2::text::pg_lsn, $3, now())
ON CONFLICT (sink) DO UPDATE SET
    commit_lsn = excluded.commit_lsn, seq = excluded.seq, updated_at = excluded.updated_at
WHERE c.commit_lsn IS NULL OR (c.commit_lsn, c.seq) < (excluded.commit_lsn, excluded.seq)";

/// Unique by (origin, commit_lsn, seq) for rows from the stream, by row id for rows of a
/// backfill: either way a replay inserts nothing twice.
const INSERT_DEAD_LETTERS: &str = "INSERT INTO analytics.dead_letters
    (origin, reason, detail, source_table, commit_lsn, seq, raw, row_id)
SELECT $7, reason, detail, source_table, lsn::pg_lsn, seq, raw::jsonb, row_id
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::text[], $8::int8[])
    AS d(reason, detail, source_table, lsn, seq, raw, row_id)
ON CONFLICT DO NOTHING";

/// Finishes the webhook's batch in one statement, so all of it happens or none: the dead
/// letter when `$4` (reason) is set, the outbox emptied, the checkpoint raised.
const FINISH_OUTBOX: &str = "WITH dead AS (
    INSERT INTO analytics.dead_letters
        (origin, reason, detail, source_table, commit_lsn, seq, raw, idempotency_key)
    SELECT $6, $4, $5, 'engagement_events', $7::text::pg_lsn, $8, $9::text::jsonb, $10
    WHERE $4::text IS NOT NULL
    ON CONFLICT DO NOTHING
), emptied AS (
    DELETE FROM analytics.walcast_webhook_outbox WHERE sink = $1
)
INSERT INTO analytics.walcast_checkpoint AS c (sink, commit_lsn, seq, updated_at)
VALUES ($1, $2::text::pg_lsn, $3, now())
ON CONFLICT (sink) DO UPDATE SET
    commit_lsn = excluded.commit_lsn, seq = excluded.seq, updated_at = now()
WHERE c.commit_lsn IS NULL OR (c.commit_lsn, c.seq) < (excluded.commit_lsn, excluded.seq)";

/// The statements a sink's session runs on every write, prepared once per session.
pub struct Prepared {
    raise_checkpoint: Statement,
    insert_dead_letters: Statement,
}

impl Prepared {
    pub async fn new(client: &Client) -> Result<Self, StateError> {
        let pg = |source| StateError {
            context: "preparing the state statements",
            source,
        };
        Ok(Prepared {
            raise_checkpoint: client.prepare(RAISE_CHECKPOINT).await.map_err(pg)?,
            insert_dead_letters: client.prepare(INSERT_DEAD_LETTERS).await.map_err(pg)?,
        })
    }
}

/// The state on a connection, or inside a transaction (`&Transaction`): then every write
/// commits or rolls back with it.
pub struct PgState<'a, C> {
    client: &'a C,
    prepared: Option<&'a Prepared>,
}

impl<'a, C: GenericClient + Sync> PgState<'a, C> {
    pub fn new(client: &'a C) -> Self {
        PgState {
            client,
            prepared: None,
        }
    }

    /// Using a session's prepared statements.
    pub fn prepared(client: &'a C, prepared: &'a Prepared) -> Self {
        PgState {
            client,
            prepared: Some(prepared),
        }
    }

    /// Runs the prepared statement when there is one, else `sql`.
    async fn execute(
        &self,
        prepared: Option<&Statement>,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        context: &'static str,
    ) -> Result<u64, StateError> {
        let result = match prepared {
            Some(statement) => self.client.execute(statement, params).await,
            None => self.client.execute(sql, params).await,
        };
        result.map_err(|source| StateError { context, source })
    }

    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        context: &'static str,
    ) -> Result<Option<tokio_postgres::Row>, StateError> {
        self.client
            .query_opt(sql, params)
            .await
            .map_err(|source| StateError { context, source })
    }
}

/// A position's seq as stored (`INTEGER`).
fn seq(position: Position) -> i32 {
    i32::try_from(position.seq).unwrap_or(i32::MAX)
}

/// A position read back from `(lsn::text, seq)` columns; `None` for NULLs or a value
/// walcast never writes.
fn position(lsn: Option<String>, seq: Option<i32>) -> Option<Position> {
    Some(Position::new(lsn?.parse().ok()?, u32::try_from(seq?).ok()?))
}

impl<C: GenericClient + Sync> StateStore for PgState<'_, C> {
    async fn checkpoint(&mut self, sink: &str) -> Result<Option<Position>, StateError> {
        let row = self
            .query_opt(
                "SELECT commit_lsn::text, seq FROM analytics.walcast_checkpoint WHERE sink = $1",
                &[&sink],
                "reading a checkpoint",
            )
            .await?;
        Ok(row.and_then(|row| position(row.get(0), row.get(1))))
    }

    async fn raise_checkpoint(&mut self, sink: &str, at: Position) -> Result<(), StateError> {
        let prepared = self.prepared.map(|p| &p.raise_checkpoint);
        self.execute(
            prepared,
            RAISE_CHECKPOINT,
            &[&sink, &at.commit_lsn.to_string(), &seq(at)],
            "recording a checkpoint",
        )
        .await?;
        Ok(())
    }

    async fn source(&mut self, sink: &str) -> Result<Option<SourceId>, StateError> {
        let row = self
            .query_opt(
                "SELECT source FROM analytics.walcast_checkpoint WHERE sink = $1",
                &[&sink],
                "reading a checkpoint's source",
            )
            .await?;
        Ok(row
            .and_then(|row| row.get::<_, Option<String>>(0))
            .and_then(|s| SourceId::from_stored(&s)))
    }

    async fn claim_source(&mut self, sink: &str, source: SourceId) -> Result<(), StateError> {
        self.execute(
            None,
            "INSERT INTO analytics.walcast_checkpoint (sink, source, updated_at)
             VALUES ($1, $2, now())
             ON CONFLICT (sink) DO UPDATE SET source = excluded.source",
            &[&sink, &source.stored()],
            "recording a checkpoint's source",
        )
        .await?;
        Ok(())
    }

    async fn backfill_cursor(&mut self, job: &str) -> Result<Option<i64>, StateError> {
        let row = self
            .query_opt(
                "SELECT last_id FROM analytics.walcast_backfill WHERE job = $1",
                &[&job],
                "reading a backfill cursor",
            )
            .await?;
        Ok(row.map(|row| row.get(0)))
    }

    async fn save_backfill_cursor(
        &mut self,
        job: &str,
        cursor: Option<i64>,
    ) -> Result<(), StateError> {
        let context = "recording a backfill cursor";
        match cursor {
            Some(id) => {
                self.execute(
                    None,
                    "INSERT INTO analytics.walcast_backfill AS b (job, last_id, updated_at)
                     VALUES ($1, $2, now())
                     ON CONFLICT (job) DO UPDATE SET
                         last_id = excluded.last_id, updated_at = excluded.updated_at",
                    &[&job, &id],
                    context,
                )
                .await?
            }
            None => {
                self.execute(
                    None,
                    "DELETE FROM analytics.walcast_backfill WHERE job = $1",
                    &[&job],
                    context,
                )
                .await?
            }
        };
        Ok(())
    }

    async fn outbox(&mut self, sink: &str) -> Result<Option<Outbox>, StateError> {
        let row = self
            .query_opt(
                "SELECT idempotency_key, first_lsn::text, first_seq, last_lsn::text, last_seq, body
                 FROM analytics.walcast_webhook_outbox WHERE sink = $1",
                &[&sink],
                "reading the webhook outbox",
            )
            .await?;
        Ok(row.and_then(|row| {
            Some(Outbox {
                key: row.get(0),
                first: position(row.get(1), row.get(2))?,
                last: position(row.get(3), row.get(4))?,
                body: row.get(5),
            })
        }))
    }

    async fn save_outbox(&mut self, sink: &str, outbox: &Outbox) -> Result<(), StateError> {
        self.execute(
            None,
            "INSERT INTO analytics.walcast_webhook_outbox
                 (sink, idempotency_key, first_lsn, first_seq, last_lsn, last_seq, body)
             VALUES ($1, $2, $3::text::pg_lsn, $4, $5::text::pg_lsn, $6, $7)
             ON CONFLICT (sink) DO UPDATE SET
                 idempotency_key = excluded.idempotency_key,
                 first_lsn = excluded.first_lsn, first_seq = excluded.first_seq,
                 last_lsn = excluded.last_lsn, last_seq = excluded.last_seq,
                 body = excluded.body, created_at = now()",
            &[
                &sink,
                &outbox.key,
                &outbox.first.commit_lsn.to_string(),
                &seq(outbox.first),
                &outbox.last.commit_lsn.to_string(),
                &seq(outbox.last),
                &outbox.body,
            ],
            "writing the webhook outbox",
        )
        .await?;
        Ok(())
    }

    async fn finish_outbox(
        &mut self,
        sink: &str,
        outbox: &Outbox,
        dead: Option<(DeadLetterReason, &str)>,
    ) -> Result<(), StateError> {
        let (reason, detail) = dead.map_or((None, None), |(r, d)| (Some(r.as_str()), Some(d)));
        self.execute(
            None,
            FINISH_OUTBOX,
            &[
                &sink,
                &outbox.last.commit_lsn.to_string(),
                &seq(outbox.last),
                &reason,
                &detail,
                &Origin::Webhook.as_str(),
                &outbox.first.commit_lsn.to_string(),
                &seq(outbox.first),
                &outbox.body,
                &outbox.key,
            ],
            "recording a webhook delivery",
        )
        .await?;
        Ok(())
    }

    async fn insert_dead_letters(
        &mut self,
        origin: Origin,
        dead: &[&DeadLetter],
    ) -> Result<(), StateError> {
        if dead.is_empty() {
            return Ok(());
        }
        let columns = DeadLetterColumns::new(dead);
        let prepared = self.prepared.map(|p| &p.insert_dead_letters);
        self.execute(
            prepared,
            INSERT_DEAD_LETTERS,
            &[
                &columns.reasons,
                &columns.details,
                &columns.tables,
                &columns.lsns,
                &columns.seqs,
                &columns.raws,
                &origin.as_str(),
                &columns.row_ids,
            ],
            "writing dead letters",
        )
        .await?;
        Ok(())
    }

    async fn count_dead_letters(&mut self, origin: Origin) -> Result<u64, StateError> {
        let row = self
            .query_opt(
                "SELECT count(*) FROM analytics.dead_letters WHERE origin = $1",
                &[&origin.as_str()],
                "counting dead letters",
            )
            .await?;
        Ok(row.map_or(0, |row| row.get::<_, i64>(0).unsigned_abs()))
    }

    async fn unreplayed(&mut self) -> Result<Vec<Unreplayed>, StateError> {
        let rows = self
            .client
            .query(
                "SELECT id, idempotency_key, raw::text FROM analytics.dead_letters
                 WHERE origin = $1 AND replayed_at IS NULL
                 ORDER BY commit_lsn, seq",
                &[&Origin::Webhook.as_str()],
            )
            .await
            .map_err(|source| StateError {
                context: "reading webhook dead letters",
                source,
            })?;
        Ok(rows
            .iter()
            .map(|row| Unreplayed {
                id: row.get(0),
                key: row.get(1),
                body: row.get(2),
            })
            .collect())
    }

    async fn mark_replayed(&mut self, id: i64) -> Result<(), StateError> {
        self.execute(
            None,
            "UPDATE analytics.dead_letters SET replayed_at = now() WHERE id = $1",
            &[&id],
            "marking a dead letter replayed",
        )
        .await?;
        Ok(())
    }
}

/// Dead letters as parallel arrays, for one `unnest` insert.
struct DeadLetterColumns {
    reasons: Vec<&'static str>,
    details: Vec<String>,
    tables: Vec<String>,
    lsns: Vec<String>,
    seqs: Vec<i32>,
    raws: Vec<String>,
    row_ids: Vec<Option<i64>>,
}

impl DeadLetterColumns {
    fn new(dead: &[&DeadLetter]) -> Self {
        DeadLetterColumns {
            reasons: dead.iter().map(|d| d.reason.as_str()).collect(),
            details: dead.iter().map(|d| d.detail.clone()).collect(),
            tables: dead.iter().map(|d| d.table.clone()).collect(),
            lsns: dead
                .iter()
                .map(|d| d.position.commit_lsn.to_string())
                .collect(),
            seqs: dead.iter().map(|d| seq(d.position)).collect(),
            raws: dead.iter().map(|d| d.raw_json()).collect(),
            row_ids: dead.iter().map(|d| d.row_id()).collect(),
        }
    }
}
