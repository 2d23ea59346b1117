//! `walcast backfill`: rows that already exist, through the same enrichment and sinks.
//!
//! Two uses:
//!
//! - **Initial snapshot** (no slot yet, no range): the slot is created together with an
//!   exported snapshot (`CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')`), and the content
//!   cache and `engagement_events` are read in a transaction that imports it. Every
//!   transaction committed before the slot's consistent point is in that snapshot, every
//!   later one will be streamed by `walcast run`: no row is missed, none is read twice.
//! - **Reprocessing** (the slot exists): the whole table, or a range (`--since/--until` on
//!   `event_ts`, `--from-id/--to-id`), read as it is now, safe while `walcast run` streams.
//!
//! Rows are read in pages in id order (keyset: `WHERE id > last ORDER BY id LIMIT n`) in
//! one repeatable-read transaction, turned into events by the stream's own transform, and
//! handed to the stream's fan-out as batches marked as backfill. Sinks apply them
//! idempotently by event id and store, in the same write, the highest id applied under the
//! backfill's name (its range): a backfill that was interrupted resumes after the lowest
//! cursor of all sinks instead of starting over. Finishing removes the cursors, so the
//! same command run later reprocesses the range again (and, idempotent, changes nothing).
//!
//! A backfilled event carries the snapshot's LSN and start time as `commit_lsn` and
//! `commit_ts`: its own commit is not known from the table.

use std::future::Future;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::{mpsc, watch};
use tokio_postgres::SimpleQueryMessage;

use crate::config::BackfillConfig;
use crate::decode::{Column, Relation, Value};
use crate::enrich::{ContentCache, EVENTS_TABLE, row_event};
use crate::event::{BackfillMark, Batch, Feed};
use crate::health::Health;
use crate::lsn::{Lsn, Position};
use crate::pipeline::{QueueLimits, fanout, open_sinks};
use crate::{Error, source};

/// How often progress is logged when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(
        "slot {slot} does not exist: the first backfill is the initial snapshot, run without \
         a range (walcast backfill), which creates the slot"
    )]
    RangeWithoutSlot { slot: String },
    #[error("the sinks stopped before the backfill ended")]
    SinksEnded,
}

/// What a backfill did.
#[derive(Debug)]
pub struct Summary {
    pub job: String,
    pub rows: u64,
    pub dead_letters: u64,
    pub elapsed: Duration,
    /// Where it started after, when it resumed an interrupted run.
    pub resumed_after: Option<i64>,
    /// Stopped by a signal before the end; running it again resumes.
    pub interrupted: bool,
}

/// Runs the backfill until done or until `shutdown` completes (then it finishes the rows
/// already read, so the cursor covers them).
pub async fn run(
    config: BackfillConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<Summary, Error> {
    config.validate()?;
    let started = Instant::now();
    let pg_config = config.source.pg_config()?;
    let pg_error = |context| move |source| Error::Postgres { context, source };
    let client = crate::pg::connect("WALCAST_SOURCE_URL", &pg_config).await?;
    for done in source::ensure_publication(&client, &config.source).await? {
        tracing::info!("{done}");
    }
    let slot = source::slot_info(&client, &config.source.slot()).await?;
    let job = config.job();

    let (snapshot_lsn, commit_ts) = open_snapshot(&client, &config, slot).await?;
    let cache = ContentCache::load(&client)
        .await
        .map_err(pg_error("loading the content cache"))?;
    tracing::info!(
        entries = cache.len(),
        "content cache loaded from the snapshot"
    );

    let built = crate::pipeline::build_sinks(&config.destinations, &config.source)?;
    let health = Health::new(&crate::pipeline::names(&built));
    // A one-off command holding a snapshot open: a sink that is not there fails it at
    // once rather than keep the snapshot (and the server's old row versions) waiting.
    let crate::pipeline::Opened { sinks, cursors, .. } = open_sinks(
        built,
        // A backfill's batches are bounded in events only; the stream's byte default
        // bounds its queues.
        QueueLimits::of_batches(
            config.batch_max_events,
            crate::config::DEFAULT_BATCH_MAX_BYTES,
            config.destinations.sink_write_timeout,
        ),
        &health,
        Some(&job),
        None,
        None,
        None::<&mut std::future::Pending<()>>,
    )
    .await?
    .expect("without a stop trigger, opening ends in the sinks or an error");
    // Resume only when every sink has a cursor: one without has applied nothing of it.
    let resumed_after = cursors
        .iter()
        .copied()
        .collect::<Option<Vec<i64>>>()
        .and_then(|c| c.into_iter().min());
    let range = Range::new(&config, resumed_after);
    let total: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM public.{EVENTS_TABLE} WHERE {}",
                range.filter(range.after)
            ),
            &[],
        )
        .await
        .map_err(pg_error("counting the rows to copy"))?
        .get(0);
    tracing::info!(
        job,
        rows = total,
        resumed_after,
        snapshot_lsn = %snapshot_lsn,
        "backfill started"
    );

    let (batch_tx, batch_rx) = mpsc::channel(2);
    let (ack_tx, _ack_rx) = watch::channel(Lsn::default());
    let mut fanout = tokio::spawn(fanout::run(sinks, batch_rx, Lsn::default(), ack_tx));
    let job: Arc<str> = Arc::from(job);
    let mut progress = Progress::new(total.max(0) as u64);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut reader = Reader {
        client: &client,
        range,
        page: config.batch_max_events,
        relation: None,
        position: Position::new(snapshot_lsn, 0),
        commit_ts,
        cache: &cache,
    };
    let (interrupted, dead_letters) = copy(
        &mut reader,
        &job,
        &mut progress,
        &batch_tx,
        &mut fanout,
        shutdown.as_mut(),
    )
    .await?;
    drop(batch_tx);
    match fanout.await {
        Ok(result) => result?,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(_) => {}
    }
    let _ = client.batch_execute("COMMIT").await;
    progress.finish();
    Ok(Summary {
        job: job.to_string(),
        rows: progress.rows,
        dead_letters,
        elapsed: started.elapsed(),
        resumed_after,
        interrupted,
    })
}

/// Opens the read transaction the backfill copies under, on a session whose text output
/// matches pgoutput's, with a snapshot that fits the slot: a new slot's own (so the stream
/// starts exactly where the copy ends), or now's when the slot exists (a range reprocess,
/// or a backfill beside `walcast run`: rows committed later are the stream's). Returns the
/// snapshot's WAL position and time, which the copied events carry.
async fn open_snapshot(
    client: &tokio_postgres::Client,
    config: &BackfillConfig,
    slot: Option<source::SlotInfo>,
) -> Result<(Lsn, DateTime<Utc>), Error> {
    let pg_error = |context| move |source| Error::Postgres { context, source };
    client
        .batch_execute(
            "SET DateStyle = ISO, MDY; SET TimeZone = 'UTC'; SET extra_float_digits = 3;
             BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        )
        .await
        .map_err(pg_error("starting the backfill transaction"))?;
    let snapshot_lsn = match slot {
        None if config.is_range() => {
            return Err(BackfillError::RangeWithoutSlot {
                slot: config.source.slot(),
            }
            .into());
        }
        Some(info) if info.is_lost() => {
            return Err(source::ReplicationError::SlotInvalidated {
                slot: config.source.slot(),
                reason: info.invalidation_reason.clone(),
            }
            .into());
        }
        None => {
            let created = source::create_slot_with_snapshot(&config.source).await?;
            client
                .batch_execute(&format!(
                    "SET TRANSACTION SNAPSHOT '{}'",
                    created.snapshot_name.replace('\'', "''")
                ))
                .await
                .map_err(pg_error("importing the slot's snapshot"))?;
            tracing::info!(
                slot = %config.source.slot(),
                consistent_point = %created.consistent_point,
                "created the slot with a snapshot; copying what committed before it"
            );
            // The transaction holds the snapshot now; the slot is free for `walcast run`.
            drop(created.session);
            created.consistent_point
        }
        Some(_) => source::wal_lsn(client).await?,
    };
    let micros: i64 = client
        .query_one("SELECT (extract(epoch FROM now()) * 1000000)::int8", &[])
        .await
        .map_err(pg_error("reading the snapshot time"))?
        .get(0);
    let commit_ts = DateTime::from_timestamp_micros(micros).unwrap_or_else(Utc::now);
    Ok((snapshot_lsn, commit_ts))
}

/// Reads page after page and hands each to the fan-out, until the table is read or
/// `shutdown` (then the pages already read are still written, so the cursor covers them);
/// then, when it read to the end, the batch that ends the backfill. Returns whether it was
/// interrupted and how many dead letters it made.
async fn copy(
    reader: &mut Reader<'_>,
    job: &Arc<str>,
    progress: &mut Progress,
    batch_tx: &mpsc::Sender<Batch>,
    fanout: &mut tokio::task::JoinHandle<Result<(), fanout::FanoutError>>,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<(bool, u64), Error> {
    let mut interrupted = false;
    let mut dead_letters = 0;
    loop {
        let batch = tokio::select! {
            biased;
            () = &mut shutdown => {
                interrupted = true;
                break;
            }
            joined = &mut *fanout => return Err(fanout_ended(joined)),
            page = reader.next_page(job) => page?,
        };
        let Some(batch) = batch else { break };
        let rows = batch.rows() as u64;
        dead_letters += batch.dead_letters.len() as u64;
        tokio::select! {
            joined = &mut *fanout => return Err(fanout_ended(joined)),
            sent = batch_tx.send(batch) => if sent.is_err() { break },
        }
        progress.add(rows);
    }
    if !interrupted {
        // The end: every sink removes its cursor, in order after the last rows.
        let done = Batch {
            feed: Feed::Backfill(BackfillMark {
                job: Arc::clone(job),
                cursor: None,
            }),
            ..Batch::default()
        };
        let _ = batch_tx.send(done).await;
    }
    Ok((interrupted, dead_letters))
}

fn fanout_ended(joined: Result<Result<(), fanout::FanoutError>, tokio::task::JoinError>) -> Error {
    match joined {
        Ok(Err(err)) => err.into(),
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        _ => BackfillError::SinksEnded.into(),
    }
}

/// The rows a backfill reads, as SQL conditions built from validated numbers and times.
struct Range {
    /// Only ids above this (the resume point, or `--from-id` - 1).
    after: Option<i64>,
    to_id: Option<i64>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    /// Only this instance's share of the ids, when the source is partitioned.
    partition: crate::config::Partition,
}

impl Range {
    fn new(config: &BackfillConfig, resumed_after: Option<i64>) -> Self {
        let from = config.from_id.map(|id| id.saturating_sub(1));
        Range {
            after: from.max(resumed_after),
            to_id: config.to_id,
            since: config.since,
            until: config.until,
            partition: config.source.partition(),
        }
    }

    /// The WHERE clause for ids above `after`.
    fn filter(&self, after: Option<i64>) -> String {
        let mut conditions = vec!["true".to_owned()];
        if let Some(after) = after {
            conditions.push(format!("id > {after}"));
        }
        if let Some(to) = self.to_id {
            conditions.push(format!("id <= {to}"));
        }
        let time = |t: &DateTime<Utc>| format!("'{}'::timestamptz", crate::event::rfc3339(t));
        if let Some(since) = &self.since {
            conditions.push(format!("event_ts >= {}", time(since)));
        }
        if let Some(until) = &self.until {
            conditions.push(format!("event_ts < {}", time(until)));
        }
        if !self.partition.is_whole() {
            conditions.push(self.partition.condition());
        }
        conditions.join(" AND ")
    }
}

/// Reads pages of rows and turns them into batches.
struct Reader<'a> {
    client: &'a tokio_postgres::Client,
    range: Range,
    page: usize,
    /// The table's columns, from the first page (the same for the whole transaction).
    relation: Option<Relation>,
    /// The snapshot's LSN, and the index of the next row in this run.
    position: Position,
    commit_ts: DateTime<Utc>,
    cache: &'a ContentCache,
}

impl Reader<'_> {
    /// The next page as a batch; `None` after the last.
    async fn next_page(&mut self, job: &Arc<str>) -> Result<Option<Batch>, Error> {
        // The simple query protocol returns every value in its text form, exactly what
        // pgoutput sends, so the stream's transform applies unchanged.
        let sql = format!(
            "SELECT * FROM public.{EVENTS_TABLE} WHERE {} ORDER BY id LIMIT {}",
            self.range.filter(self.range.after),
            self.page
        );
        let messages = self
            .client
            .simple_query(&sql)
            .await
            .map_err(|source| Error::Postgres {
                context: "reading engagement_events",
                source,
            })?;
        let mut batch = Batch::default();
        let mut last_id = None;
        for message in messages {
            let SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            let relation = self.relation.get_or_insert_with(|| Relation {
                id: 0,
                namespace: "public".to_owned(),
                name: EVENTS_TABLE.to_owned(),
                replica_identity: b'd',
                columns: row
                    .columns()
                    .iter()
                    .map(|c| Column {
                        name: c.name().to_owned(),
                        type_oid: 0,
                        is_key: c.name() == "id",
                    })
                    .collect(),
            });
            let tuple: Vec<Value> = (0..row.len())
                .map(|i| match row.get(i) {
                    Some(text) => Value::Text(Bytes::copy_from_slice(text.as_bytes())),
                    None => Value::Null,
                })
                .collect();
            let id: Option<i64> = relation
                .column_index("id")
                .and_then(|i| row.get(i))
                .and_then(|s| s.parse().ok());
            last_id = id.or(last_id);
            match row_event(relation, &tuple, self.position, self.commit_ts, self.cache) {
                Ok(event) => batch.events.push(event),
                Err(dead) => batch.dead_letters.push(dead),
            }
            self.position.seq = self.position.seq.saturating_add(1);
        }
        let Some(last_id) = last_id else {
            return Ok(None);
        };
        self.range.after = Some(last_id);
        batch.feed = Feed::Backfill(BackfillMark {
            job: Arc::clone(job),
            cursor: Some(last_id),
        });
        Ok(Some(batch))
    }
}

/// A progress bar on a terminal, a log line every few seconds otherwise.
struct Progress {
    total: u64,
    rows: u64,
    started: Instant,
    last_log: Instant,
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} rows  {per_sec}  eta {eta}  {elapsed}",
                )
                .expect("a valid template"),
            );
            bar
        });
        Progress {
            total,
            rows: 0,
            started: Instant::now(),
            last_log: Instant::now(),
            bar,
        }
    }

    fn add(&mut self, rows: u64) {
        self.rows += rows;
        if let Some(bar) = &self.bar {
            bar.set_position(self.rows);
            return;
        }
        if self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            let rate = self.rows as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
            let eta = self.total.saturating_sub(self.rows) as f64 / rate.max(1e-3);
            tracing::info!(
                rows = self.rows,
                total = self.total,
                rows_per_s = rate.round() as u64,
                eta_s = eta.round() as u64,
                "backfill progress"
            );
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: BackfillConfig,
    }

    fn config(args: &[&str]) -> BackfillConfig {
        let mut all = vec!["walcast", "--source-url", "postgres://u@h/db"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().config
    }

    #[test]
    fn the_job_is_named_by_its_range_so_a_rerun_finds_its_cursor() {
        assert_eq!(config(&[]).job(), "all");
        let ranged = config(&["--from-id", "5", "--since", "2026-11-21T09:00:00+01:00"]);
        assert_eq!(ranged.job(), "ids:5..,time:2026-11-21T08:00:00.000000Z..");
        assert!(ranged.is_range());
    }

    #[test]
    fn the_range_resumes_after_the_cursor_but_never_before_from_id() {
        let c = config(&["--from-id", "100", "--to-id", "200"]);
        assert_eq!(Range::new(&c, None).after, Some(99));
        assert_eq!(Range::new(&c, Some(150)).after, Some(150));
        let range = Range::new(&c, Some(150));
        assert_eq!(range.filter(range.after), "true AND id > 150 AND id <= 200");
        let timed = config(&["--until", "2026-11-21T00:00:00Z"]);
        let range = Range::new(&timed, None);
        assert_eq!(
            range.filter(None),
            "true AND event_ts < '2026-11-21T00:00:00.000000Z'::timestamptz"
        );
    }

    #[test]
    fn bad_ranges_are_refused_with_the_option_named() {
        let err = config(&["--from-id", "9", "--to-id", "1"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("--to-id"));
        let err = config(&[
            "--since",
            "2026-11-21T00:00:00Z",
            "--until",
            "2026-11-20T00:00:00Z",
        ])
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("--until"));
    }
}
