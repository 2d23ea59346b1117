//! The PostgreSQL analytics sink: one row per event in `analytics.enriched_events`, and
//! incremental aggregates that always equal a recomputation from those rows.
//!
//! One batch is one transaction:
//!
//! 1. `COPY` the batch's events into a session-local staging table, in text format.
//!    Measured on PostgreSQL 15 with 5,000-row batches of these columns: 2.6 µs per row
//!    by COPY against 15 µs per row by one multi-row `INSERT … VALUES`.
//! 2. One statement moves them into `enriched_events` with `ON CONFLICT (id) DO NOTHING
//!    RETURNING …` and feeds only the rows it actually inserted into the aggregate
//!    upserts. An event that is already there (a replay after a crash, an overlapping
//!    backfill) is returned by nobody and so counted by nobody.
//! 3. `distinct_users` stays exact under increments: each aggregate has a companion table
//!    of the users it has counted, and a user adds 1 only when inserting it there finds no
//!    row.
//! 4. Dead letters of the batch go to `analytics.dead_letters`, unique by position.
//! 5. The checkpoint (`analytics.walcast_checkpoint`, sink `postgres`) moves to the
//!    batch's last position, then `COMMIT`.
//!
//! The staged rows are also filtered by the checkpoint, so positions at or below it are
//! skipped before they reach the unique index at all.

use std::fmt::Write as _;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::{Client, Statement};

use super::{Sink, SinkError};
use crate::event::{
    BackfillMark, Batch, DeadLetter, DeadLetterReason, EnrichedEvent, Origin, rfc3339,
};
use crate::lsn::{Position, SourceId};

/// The sink's name in `analytics.walcast_checkpoint` and in metric labels.
pub const NAME: &str = "postgres";

/// How the sink's sessions appear in `pg_stat_activity`, unless the URL names one.
pub const APPLICATION_NAME: &str = "walcast-postgres-sink";

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

/// Columns of the staging table, in COPY order; `enriched_events` has these plus
/// `ingested_at`.
const COLUMNS: &str = "id, content_id, user_id, event_type, event_ts, duration_ms, device, \
     raw_payload, extra, content_type, length_seconds, title, slug, engagement_seconds, \
     engagement_pct, content_missing, commit_lsn, commit_seq, commit_ts";

/// The aggregate tables: name, key columns, and which events they count.
pub const AGGREGATES: [(&str, &str, &str); 4] = [
    (
        "content_engagement_metrics",
        "content_id",
        "content_id IS NOT NULL",
    ),
    (
        "content_engagement_daily",
        "content_id, day",
        "content_id IS NOT NULL",
    ),
    ("content_type_analysis", "content_type, day", "true"),
    ("device_analysis", "device, day", "true"),
];

/// The statement that moves staged events into the facts table and increments the
/// aggregates by exactly the rows it inserted. `$1` is the sink name whose checkpoint
/// filters the staged rows; a backfill passes a name that has none, and `$2` true, which
/// marks its rows as backfilled (see sql/007).
fn apply_statement() -> String {
    let mut sql = format!(
        "WITH checkpoint AS (
    SELECT commit_lsn, seq FROM analytics.walcast_checkpoint WHERE sink = $1
),
new AS (
    INSERT INTO analytics.enriched_events ({COLUMNS}, backfilled)
    SELECT {COLUMNS}, $2::bool FROM pg_temp.walcast_stage s
    WHERE NOT EXISTS (
        SELECT FROM checkpoint c WHERE (s.commit_lsn, s.commit_seq) <= (c.commit_lsn, c.seq))
    ORDER BY id
    ON CONFLICT (id) DO NOTHING
    RETURNING content_id, user_id, event_type, event_ts,
        left(device, {key_chars}) AS device, left(content_type, {key_chars}) AS content_type,
        engagement_seconds, engagement_pct, (event_ts AT TIME ZONE 'UTC')::date AS day
)",
        key_chars = crate::event::KEY_CHARS
    );
    // Rows are inserted in key order so that two writers (the stream and a backfill) lock
    // aggregate rows in the same order; a deadlock is still retried as transient.
    for (i, (table, keys, filter)) in AGGREGATES.iter().enumerate() {
        write!(
            sql,
            ",
users_{i} AS (
    INSERT INTO analytics.{table}_users ({keys}, user_id)
    SELECT DISTINCT {keys}, user_id FROM new WHERE {filter} AND user_id IS NOT NULL
    ORDER BY {keys}, user_id
    ON CONFLICT DO NOTHING
    RETURNING {keys}
),
aggregate_{i} AS (
    INSERT INTO analytics.{table} AS t ({keys}, events, plays, pauses, finishes, clicks,
        distinct_users, engagement_seconds_total, engagement_pct_sum, engagement_pct_events,
        last_event_ts)
    SELECT {keys},
        count(*) FILTER (WHERE NOT is_user),
        count(*) FILTER (WHERE event_type = 'play'),
        count(*) FILTER (WHERE event_type = 'pause'),
        count(*) FILTER (WHERE event_type = 'finish'),
        count(*) FILTER (WHERE event_type = 'click'),
        count(*) FILTER (WHERE is_user),
        coalesce(sum(engagement_seconds), 0),
        coalesce(sum(engagement_pct), 0),
        count(engagement_pct),
        max(event_ts)
    FROM (
        SELECT {keys}, false AS is_user, event_type, engagement_seconds, engagement_pct, event_ts
        FROM new WHERE {filter}
        UNION ALL
        SELECT {keys}, true, NULL::text, NULL::numeric, NULL::numeric, NULL::timestamptz
        FROM users_{i}
    ) AS r
    GROUP BY {keys}
    ORDER BY {keys}
    ON CONFLICT ({keys}) DO UPDATE SET
        events = t.events + excluded.events,
        plays = t.plays + excluded.plays,
        pauses = t.pauses + excluded.pauses,
        finishes = t.finishes + excluded.finishes,
        clicks = t.clicks + excluded.clicks,
        distinct_users = t.distinct_users + excluded.distinct_users,
        engagement_seconds_total = t.engagement_seconds_total + excluded.engagement_seconds_total,
        engagement_pct_sum = t.engagement_pct_sum + excluded.engagement_pct_sum,
        engagement_pct_events = t.engagement_pct_events + excluded.engagement_pct_events,
        last_event_ts = greatest(t.last_event_ts, excluded.last_event_ts)
)"
        )
        .expect("writing to a String");
    }
    sql.push_str("\nSELECT count(*) FROM new");
    sql
}

/// Unique by (origin, commit_lsn, seq) for rows from the stream, by row id for rows of a
/// backfill: either way a replay inserts nothing twice.
const INSERT_DEAD_LETTERS: &str = "INSERT INTO analytics.dead_letters
    (origin, reason, detail, source_table, commit_lsn, seq, raw, row_id)
SELECT $7, reason, detail, source_table, lsn::pg_lsn, seq, raw::jsonb, row_id
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::text[], $8::int8[])
    AS d(reason, detail, source_table, lsn, seq, raw, row_id)
ON CONFLICT DO NOTHING";

/// The checkpoint filter of a backfill: no sink has this name, so nothing is filtered.
const NO_CHECKPOINT: &str = "";

const SAVE_BACKFILL_CURSOR: &str = "INSERT INTO analytics.walcast_backfill AS b
    (job, last_id, updated_at)
VALUES ($1, $2, now())
ON CONFLICT (job) DO UPDATE SET last_id = excluded.last_id, updated_at = excluded.updated_at";

const END_BACKFILL: &str = "DELETE FROM analytics.walcast_backfill WHERE job = $1";

const SAVE_CHECKPOINT: &str = "INSERT INTO analytics.walcast_checkpoint AS c
    (sink, commit_lsn, seq, updated_at)
VALUES ($1, $2::text::pg_lsn, $3, now())
ON CONFLICT (sink) DO UPDATE SET
    commit_lsn = excluded.commit_lsn, seq = excluded.seq, updated_at = excluded.updated_at
WHERE c.commit_lsn IS NULL OR (c.commit_lsn, c.seq) < (excluded.commit_lsn, excluded.seq)";

/// A connection with the staging table and the prepared statements of one session.
struct Session {
    client: Client,
    apply: Statement,
    dead_letters: Statement,
    save_checkpoint: Statement,
}

impl Session {
    async fn open(config: &crate::pg::Target) -> Result<Session, SinkError> {
        let client = connect(config).await?;
        let context = "preparing the analytics session";
        let pg = |source| SinkError::Postgres { context, source };
        client
            .batch_execute(&format!(
                "CREATE TEMP TABLE walcast_stage ON COMMIT DELETE ROWS AS
                 SELECT {COLUMNS} FROM analytics.enriched_events WITH NO DATA"
            ))
            .await
            .map_err(pg)?;
        let apply = client.prepare(&apply_statement()).await.map_err(pg)?;
        let dead_letters = client.prepare(INSERT_DEAD_LETTERS).await.map_err(pg)?;
        let save_checkpoint = client.prepare(SAVE_CHECKPOINT).await.map_err(pg)?;
        Ok(Session {
            client,
            apply,
            dead_letters,
            save_checkpoint,
        })
    }
}

/// Connects to the analytics database.
async fn connect(config: &crate::pg::Target) -> Result<Client, SinkError> {
    Ok(crate::pg::connect("WALCAST_ANALYTICS_URL", config).await?)
}

pub struct PostgresSink {
    config: crate::pg::Target,
    /// `None` after the connection was lost; the next write reconnects.
    session: Option<Session>,
}

impl PostgresSink {
    /// Connects, applies the analytics migrations that are missing, and prepares the
    /// session. Returns the migrations it applied.
    pub async fn connect(
        mut config: crate::pg::Target,
    ) -> Result<(Self, Vec<&'static str>), SinkError> {
        if config.get_application_name().is_none() {
            config.application_name(APPLICATION_NAME);
        }
        let mut client = connect(&config).await?;
        let version: String = client
            .query_one("SHOW server_version_num", &[])
            .await
            .map_err(|source| SinkError::Postgres {
                context: "reading the analytics server version",
                source,
            })?
            .get(0);
        if version.parse::<u32>().unwrap_or(0) < 150_000 {
            return Err(SinkError::Unsupported(format!(
                "the analytics database runs PostgreSQL {version} (server_version_num); the \
                 analytics schema needs 15 or later: point WALCAST_ANALYTICS_URL at one"
            )));
        }
        let applied = migrate(&mut client)
            .await
            .map_err(|source| SinkError::Postgres {
                context: "creating the analytics schema",
                source,
            })?;
        let session = Session::open(&config).await?;
        Ok((
            PostgresSink {
                config,
                session: Some(session),
            },
            applied,
        ))
    }

    async fn session(&mut self) -> Result<&mut Session, SinkError> {
        if self.session.as_ref().is_some_and(|s| s.client.is_closed()) {
            self.session = None;
        }
        if self.session.is_none() {
            self.session = Some(Session::open(&self.config).await?);
            tracing::info!(sink = NAME, "reconnected to the analytics database");
        }
        Ok(self.session.as_mut().expect("just opened"))
    }
}

/// Applies the migrations not yet recorded, in one transaction, under an advisory lock so
/// two processes starting together do not race.
pub async fn migrate(client: &mut Client) -> Result<Vec<&'static str>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
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
    .await?;
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS {
        let done = tx
            .query_opt(
                "SELECT 1 FROM analytics.walcast_migrations WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if !done {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO analytics.walcast_migrations (version) VALUES ($1)",
                &[version],
            )
            .await?;
            applied.push(*version);
        }
    }
    tx.commit().await?;
    Ok(applied)
}

/// The checkpoint `sink` stored in `analytics.walcast_checkpoint`.
pub async fn read_checkpoint(
    client: &Client,
    sink: &str,
) -> Result<Option<Position>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT commit_lsn::text, seq FROM analytics.walcast_checkpoint WHERE sink = $1",
            &[&sink],
        )
        .await?;
    Ok(row.and_then(|row| {
        let lsn: Option<String> = row.get(0);
        let seq: Option<i32> = row.get(1);
        Some(Position::new(lsn?.parse().ok()?, u32::try_from(seq?).ok()?))
    }))
}

/// Raises `sink`'s checkpoint to `position` (never lowers it): the analytics sink's once a
/// rebuild from the table has brought everything up to it (see `pipeline::rebuild`), the
/// webhook's where it starts following the facts.
pub async fn raise_checkpoint(
    client: &Client,
    sink: &str,
    position: Position,
) -> Result<(), tokio_postgres::Error> {
    let seq = i32::try_from(position.seq).unwrap_or(i32::MAX);
    client
        .execute(
            SAVE_CHECKPOINT,
            &[&sink, &position.commit_lsn.to_string(), &seq],
        )
        .await?;
    Ok(())
}

/// The source identity `sink` stored with its checkpoint.
pub async fn read_source(
    client: &Client,
    sink: &str,
) -> Result<Option<SourceId>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT source FROM analytics.walcast_checkpoint WHERE sink = $1",
            &[&sink],
        )
        .await?;
    Ok(row
        .and_then(|row| row.get::<_, Option<String>>(0))
        .and_then(|s| SourceId::from_stored(&s)))
}

/// Records `source` as the history of `sink`'s checkpoint (before its first write, the
/// row has no position yet).
pub async fn claim_source(
    client: &Client,
    sink: &str,
    source: SourceId,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO analytics.walcast_checkpoint (sink, source, updated_at)
             VALUES ($1, $2, now())
             ON CONFLICT (sink) DO UPDATE SET source = excluded.source",
            &[&sink, &source.stored()],
        )
        .await?;
    Ok(())
}

impl Sink for PostgresSink {
    fn reset(&mut self) {
        self.session = None;
    }

    async fn source(&mut self) -> Result<Option<SourceId>, SinkError> {
        let session = self.session().await?;
        read_source(&session.client, NAME)
            .await
            .map_err(|source| SinkError::Postgres {
                context: "reading the analytics checkpoint's source",
                source,
            })
    }

    async fn set_source(&mut self, source: SourceId) -> Result<(), SinkError> {
        let session = self.session().await?;
        claim_source(&session.client, NAME, source)
            .await
            .map_err(|e| SinkError::Postgres {
                context: "recording the analytics checkpoint's source",
                source: e,
            })
    }

    fn name(&self) -> &'static str {
        NAME
    }

    /// A tenth of a second: a transaction of the analytics database costs about as much
    /// as a hundred of its rows, and analytics queries do not need the events sooner.
    fn linger(&self) -> std::time::Duration {
        std::time::Duration::from_millis(100)
    }

    async fn checkpoint(&mut self) -> Result<Option<Position>, SinkError> {
        let session = self.session().await?;
        read_checkpoint(&session.client, NAME)
            .await
            .map_err(|source| SinkError::Postgres {
                context: "reading the analytics checkpoint",
                source,
            })
    }

    async fn backfill_cursor(&mut self, job: &str) -> Result<Option<i64>, SinkError> {
        let session = self.session().await?;
        let row = session
            .client
            .query_opt(
                "SELECT last_id FROM analytics.walcast_backfill WHERE job = $1",
                &[&job],
            )
            .await
            .map_err(|source| SinkError::Postgres {
                context: "reading the backfill cursor",
                source,
            })?;
        Ok(row.map(|row| row.get(0)))
    }

    async fn write(&mut self, batches: &[&Batch]) -> Result<(), SinkError> {
        let progress = match (super::backfill_mark(batches), super::last_position(batches)) {
            (Some(mark), _) => Progress::Backfill(mark),
            (None, Some(last)) => Progress::Stream(last),
            (None, None) => return Ok(()), // acknowledgement markers: nothing to write
        };
        let result = match self.apply(batches, progress).await {
            Err(err) if refuses_rows(&err) => {
                tracing::warn!(sink = NAME, error = %err, "the analytics database refused a row; writing the events one by one to find it");
                self.apply_each(batches, progress).await
            }
            other => other,
        };
        if result.is_err() && self.session.as_ref().is_some_and(|s| s.client.is_closed()) {
            self.session = None;
        }
        result
    }
}

/// Whether the database refused the rows rather than the write: a value it cannot store
/// (SQLSTATE class 22, data exception), a constraint (23), a limit such as an index entry
/// too large (54). Such a row becomes a dead letter and the stream goes on; a refusal of
/// everything (the schema gone: 42P01, a privilege revoked: 42501) still stops walcast.
fn refuses_rows(err: &SinkError) -> bool {
    match err {
        SinkError::Postgres { source, .. } => source
            .code()
            .is_some_and(|code| matches!(&code.code()[..2], "22" | "23" | "54")),
        _ => false,
    }
}

/// What a write records besides the rows, in the same transaction.
#[derive(Clone, Copy)]
enum Progress<'a> {
    /// The stream's checkpoint moves to this position.
    Stream(Position),
    /// A backfill's cursor moves (or, when it finished, goes).
    Backfill(&'a BackfillMark),
}

impl PostgresSink {
    /// Writes the events one transaction each, after a write of them all was refused for
    /// a row: an event the database refuses becomes a dead letter (origin `postgres`) in a
    /// transaction that also moves the checkpoint past it, so a replay neither retries nor
    /// loses it. Every transaction moves the checkpoint to its own event, so the sequence
    /// is as exactly-once as one write.
    async fn apply_each(
        &mut self,
        batches: &[&Batch],
        progress: Progress<'_>,
    ) -> Result<(), SinkError> {
        for event in super::events(batches) {
            let mark;
            let at = match progress {
                Progress::Stream(_) => Progress::Stream(event.position),
                Progress::Backfill(backfill) => {
                    mark = BackfillMark {
                        job: std::sync::Arc::clone(&backfill.job),
                        cursor: Some(event.id),
                    };
                    Progress::Backfill(&mark)
                }
            };
            let single = Batch {
                events: vec![event.clone()],
                ..Batch::default()
            };
            match self.apply(&[&single], at).await {
                Ok(()) => {}
                Err(err) if refuses_rows(&err) => {
                    tracing::warn!(sink = NAME, position = %event.position, id = event.id, error = %err, "row refused by the analytics database, dead-lettered");
                    self.reject(event, &err, at).await?;
                    crate::metrics::dead_lettered(DeadLetterReason::AnalyticsRejected);
                }
                Err(err) => return Err(err),
            }
        }
        // The batches' own dead letters, and the progress of the whole write.
        let rest = Batch {
            dead_letters: batches
                .iter()
                .flat_map(|b| b.dead_letters.iter().cloned())
                .collect(),
            ..Batch::default()
        };
        self.apply(&[&rest], progress).await
    }

    /// Records a refused event as a dead letter, with the progress past it.
    async fn reject(
        &mut self,
        event: &EnrichedEvent,
        refusal: &SinkError,
        progress: Progress<'_>,
    ) -> Result<(), SinkError> {
        let session = self.session().await?;
        let context = "dead-lettering a refused row";
        let pg = |source| SinkError::Postgres { context, source };
        let tx = session.client.transaction().await.map_err(pg)?;
        let dead = DeadLetter {
            position: event.position,
            table: crate::enrich::EVENTS_TABLE.to_owned(),
            reason: DeadLetterReason::AnalyticsRejected,
            detail: refusal.to_string(),
            raw: vec![
                ("id".to_owned(), Some(event.id.to_string())),
                ("event".to_owned(), Some(event.to_json())),
            ],
        };
        insert_dead_letters(&tx, &session.dead_letters, &[&dead], Origin::Postgres)
            .await
            .map_err(pg)?;
        save_progress(&tx, &session.save_checkpoint, progress)
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)
    }

    async fn apply(&mut self, batches: &[&Batch], progress: Progress<'_>) -> Result<(), SinkError> {
        let session = self.session().await?;
        let context = "writing a batch to the analytics database";
        let pg = |source| SinkError::Postgres { context, source };
        let tx = session.client.transaction().await.map_err(pg)?;
        if super::events(batches).next().is_some() {
            let copy = tx
                .copy_in::<_, Bytes>("COPY pg_temp.walcast_stage FROM STDIN")
                .await
                .map_err(pg)?;
            let mut copy = std::pin::pin!(copy);
            copy.send(copy_rows(super::events(batches)))
                .await
                .map_err(pg)?;
            copy.as_mut().finish().await.map_err(pg)?;
            let (checkpoint_of, backfilled) = match progress {
                Progress::Stream(_) => (NAME, false),
                Progress::Backfill(_) => (NO_CHECKPOINT, true),
            };
            tx.query_one(&session.apply, &[&checkpoint_of, &backfilled])
                .await
                .map_err(pg)?;
        }
        let dead: Vec<&DeadLetter> = batches.iter().flat_map(|b| &b.dead_letters).collect();
        if !dead.is_empty() {
            let origin = match progress {
                Progress::Stream(_) => Origin::Source,
                Progress::Backfill(_) => Origin::Backfill,
            };
            insert_dead_letters(&tx, &session.dead_letters, &dead, origin)
                .await
                .map_err(pg)?;
        }
        save_progress(&tx, &session.save_checkpoint, progress)
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)
    }
}

/// `dead` into `analytics.dead_letters` under `origin`, inside the write's transaction.
async fn insert_dead_letters(
    tx: &tokio_postgres::Transaction<'_>,
    statement: &Statement,
    dead: &[&DeadLetter],
    origin: Origin,
) -> Result<(), tokio_postgres::Error> {
    let columns = DeadLetterColumns::new(dead);
    tx.execute(
        statement,
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
    )
    .await?;
    Ok(())
}

/// The checkpoint or the backfill's cursor, inside the write's transaction.
async fn save_progress(
    tx: &tokio_postgres::Transaction<'_>,
    save_checkpoint: &Statement,
    progress: Progress<'_>,
) -> Result<(), tokio_postgres::Error> {
    match progress {
        Progress::Stream(last) => {
            let seq = i32::try_from(last.seq).unwrap_or(i32::MAX);
            tx.execute(
                save_checkpoint,
                &[&NAME, &last.commit_lsn.to_string(), &seq],
            )
            .await?;
        }
        Progress::Backfill(BackfillMark {
            job,
            cursor: Some(id),
        }) => {
            tx.execute(SAVE_BACKFILL_CURSOR, &[&&**job, id]).await?;
        }
        Progress::Backfill(BackfillMark { job, cursor: None }) => {
            tx.execute(END_BACKFILL, &[&&**job]).await?;
        }
    }
    Ok(())
}

/// The batch's dead letters as parallel arrays, for one `unnest` insert.
struct DeadLetterColumns {
    reasons: Vec<&'static str>,
    details: Vec<String>,
    tables: Vec<String>,
    lsns: Vec<String>,
    seqs: Vec<i32>,
    raws: Vec<String>,
    /// The row's `id`, when it has one that parses.
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
            seqs: dead
                .iter()
                .map(|d| i32::try_from(d.position.seq).unwrap_or(i32::MAX))
                .collect(),
            raws: dead.iter().map(|d| raw_json(&d.raw)).collect(),
            row_ids: dead
                .iter()
                .map(|d| {
                    d.raw
                        .iter()
                        .find(|(name, _)| name == "id")
                        .and_then(|(_, value)| value.as_deref()?.parse().ok())
                })
                .collect(),
        }
    }
}

/// Column values by name as a JSON object (`null` for SQL NULL).
pub fn raw_json(values: &[(String, Option<String>)]) -> String {
    let object: serde_json::Map<String, serde_json::Value> = values
        .iter()
        .map(|(name, value)| {
            let value = value
                .as_ref()
                .map_or(serde_json::Value::Null, |v| v.clone().into());
            (name.clone(), value)
        })
        .collect();
    serde_json::Value::Object(object).to_string()
}

/// The events as rows of PostgreSQL's COPY text format, in [`COLUMNS`] order.
///
/// Written by hand: neither tokio-postgres nor postgres-protocol encodes COPY text rows,
/// and the binary format would need a numeric encoder; the text format is a few escapes.
pub fn copy_rows<'a>(events: impl Iterator<Item = &'a EnrichedEvent>) -> Bytes {
    let mut out = String::with_capacity(events.size_hint().0 * 400);
    for event in events {
        let content = event.content.as_deref();
        let extra = (!event.extra.is_empty()).then(|| raw_json(&event.extra));
        let mut row = CopyRow::new(&mut out);
        row.value(event.id);
        row.text(event.content_id.as_deref());
        row.text(event.user_id.as_deref());
        row.text(event.event_type.as_deref());
        row.value(rfc3339(&event.event_ts));
        row.opt(event.duration_ms);
        row.text(event.device.as_deref());
        row.text(event.raw_payload.as_deref().map(|raw| raw.get()));
        row.text(extra.as_deref());
        row.text(content.and_then(|c| c.content_type.as_deref()));
        row.opt(content.and_then(|c| c.length_seconds));
        row.text(content.and_then(|c| c.title.as_deref()));
        row.text(content.and_then(|c| c.slug.as_deref()));
        row.opt(event.engagement_seconds);
        row.opt(event.engagement_pct);
        row.value(if event.content_missing() { 't' } else { 'f' });
        row.value(event.position.commit_lsn);
        row.value(event.position.seq);
        row.value(rfc3339(&event.commit_ts));
        out.push('\n');
    }
    Bytes::from(out)
}

/// Writes one COPY text row: fields separated by tabs, NULL as `\N`.
struct CopyRow<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> CopyRow<'a> {
    fn new(out: &'a mut String) -> Self {
        CopyRow { out, first: true }
    }

    fn separator(&mut self) {
        if !self.first {
            self.out.push('\t');
        }
        self.first = false;
    }

    /// A value whose text form needs no escaping (numbers, timestamps, LSNs).
    fn value(&mut self, value: impl std::fmt::Display) {
        self.separator();
        write!(self.out, "{value}").expect("writing to a String");
    }

    fn opt(&mut self, value: Option<impl std::fmt::Display>) {
        match value {
            Some(value) => self.value(value),
            None => self.text(None),
        }
    }

    /// Free text: backslash, tab, newline and carriage return escaped.
    fn text(&mut self, value: Option<&str>) {
        self.separator();
        let Some(value) = value else {
            self.out.push_str("\\N");
            return;
        };
        for c in value.chars() {
            match c {
                '\\' => self.out.push_str("\\\\"),
                '\t' => self.out.push_str("\\t"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                c => self.out.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_copy_would_misread() {
        let mut out = String::new();
        let mut row = CopyRow::new(&mut out);
        row.value(7);
        row.text(Some("a\tb\nc\\d\re"));
        row.text(None);
        row.opt(None::<i32>);
        assert_eq!(out, "7\ta\\tb\\nc\\\\d\\re\t\\N\t\\N");
    }

    #[test]
    fn apply_statement_has_one_user_set_and_upsert_per_aggregate() {
        let sql = apply_statement();
        for (table, keys, _) in AGGREGATES {
            assert!(sql.contains(&format!("INSERT INTO analytics.{table}_users ({keys}")));
            assert!(sql.contains(&format!("ON CONFLICT ({keys}) DO UPDATE")));
        }
    }

    #[test]
    fn raw_values_become_a_json_object() {
        let raw = vec![
            ("id".to_owned(), Some("5".to_owned())),
            ("event_ts".to_owned(), None),
        ];
        let parsed: serde_json::Value = serde_json::from_str(&raw_json(&raw)).unwrap();
        assert_eq!(parsed, serde_json::json!({"id": "5", "event_ts": null}));
    }
}
