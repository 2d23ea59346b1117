//! `walcast verify`: reconcile the sinks with the source.
//!
//! - Every `engagement_events` row is in `analytics.enriched_events` once, except the rows
//!   that were dead-lettered (by the stream or by a backfill). An event the analytics
//!   tables hold whose row the source no longer has was deleted at the source after it was
//!   delivered (walcast delivers inserts only): it is listed, and is no failure. Ids are
//!   compared page by page (keyset, 50,000 at a time), so memory stays flat for any table
//!   size and the source and analytics databases may be different servers.
//! - Every aggregate table equals a recomputation from the facts in SQL (both directions of
//!   `EXCEPT`, so a missing, an extra and a wrong row all count).
//! - Redis `stats:events` `total` equals the number of events.
//!
//! Run it when walcast has caught up (lag near 0): events still in flight show as missing.

use std::fmt;

use tokio_postgres::Client;

use crate::event::Origin;
use crate::sink::postgres::AGGREGATES;

const PAGE: i64 = 50_000;
/// Missing or deleted ids listed in the report, at most.
const SAMPLE: usize = 10;

/// What `verify` found.
#[derive(Debug, Default)]
pub struct Report {
    pub source_events: u64,
    /// Source rows the stream rejected (dead letters of `engagement_events`).
    pub dead_lettered: u64,
    pub analytics: Option<AnalyticsReport>,
    /// `stats:events` `total`, when Redis was checked.
    pub redis_total: Option<u64>,
}

#[derive(Debug, Default)]
pub struct AnalyticsReport {
    pub events: u64,
    pub missing: u64,
    pub missing_sample: Vec<i64>,
    /// Events the analytics database refused (dead letters of origin `postgres`): in
    /// Redis, not in the facts.
    pub rejected: u64,
    /// Delivered events whose source row is gone: deleted at the source afterwards.
    pub deleted_at_source: u64,
    pub deleted_sample: Vec<i64>,
    /// Per aggregate table, rows that differ from the recomputation.
    pub aggregate_diffs: Vec<(&'static str, u64)>,
    /// With a partitioned source (`WALCAST_PARTITIONS` above 1): per partition `i`, the
    /// facts and the missing events with `id % partitions = i`.
    pub by_partition: Vec<PartitionCounts>,
}

/// One partition's share of [`AnalyticsReport`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PartitionCounts {
    pub events: u64,
    pub missing: u64,
}

impl AnalyticsReport {
    /// A report that also counts per partition of `partitions` (none when 1).
    pub fn partitioned(partitions: u32) -> Self {
        let by_partition = if partitions > 1 {
            vec![PartitionCounts::default(); partitions as usize]
        } else {
            Vec::new()
        };
        AnalyticsReport {
            by_partition,
            ..AnalyticsReport::default()
        }
    }

    /// The partition's counts `id` belongs to, when counting per partition.
    fn partition_of(&mut self, id: i64) -> Option<&mut PartitionCounts> {
        let n = self.by_partition.len() as i64;
        (n > 1).then(|| &mut self.by_partition[id.rem_euclid(n) as usize])
    }
}

impl Report {
    /// Events every sink should hold: every source row that is not a dead letter, and
    /// those delivered before their row was deleted at the source.
    pub fn expected(&self) -> u64 {
        let deleted = self.analytics.as_ref().map_or(0, |a| a.deleted_at_source);
        self.source_events.saturating_sub(self.dead_lettered) + deleted
    }

    pub fn is_consistent(&self) -> bool {
        let analytics_ok = self
            .analytics
            .as_ref()
            .is_none_or(|a| a.missing == 0 && a.aggregate_diffs.iter().all(|(_, n)| *n == 0));
        let redis_ok = self.redis_total.is_none_or(|t| t == self.expected());
        analytics_ok && redis_ok
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "source events        {}", self.source_events)?;
        writeln!(f, "dead-lettered        {}", self.dead_lettered)?;
        writeln!(f, "expected in sinks    {}", self.expected())?;
        if let Some(a) = &self.analytics {
            writeln!(f, "analytics events     {}", a.events)?;
            writeln!(
                f,
                "  missing            {} {:?}",
                a.missing, a.missing_sample
            )?;
            writeln!(
                f,
                "  refused by it      {} (dead letters of origin postgres)",
                a.rejected
            )?;
            writeln!(
                f,
                "  deleted at source  {} {:?} (delivered, then deleted there; not a failure)",
                a.deleted_at_source, a.deleted_sample
            )?;
            for (i, counts) in a.by_partition.iter().enumerate() {
                writeln!(
                    f,
                    "  partition {i:<8} {} events, {} missing",
                    counts.events, counts.missing
                )?;
            }
            for (table, diffs) in &a.aggregate_diffs {
                writeln!(f, "  {table:<27} {diffs} rows differ from the facts")?;
            }
        }
        if let Some(total) = self.redis_total {
            writeln!(f, "redis stats total    {total}")?;
        }
        write!(
            f,
            "{}",
            if self.is_consistent() {
                "consistent"
            } else {
                "NOT consistent"
            }
        )
    }
}

/// Ids of `engagement_events` rows that became dead letters: by the stream (`origin =
/// 'source'`, the id in the raw values) or by a backfill (`origin = 'backfill'`, `row_id`).
fn dead_lettered_ids() -> String {
    format!(
        "SELECT (raw->>'id')::bigint AS id FROM analytics.dead_letters
         WHERE origin = '{source}' AND source_table = 'engagement_events'
           AND raw->>'id' ~ '^-?[0-9]+$'
         UNION
         SELECT row_id FROM analytics.dead_letters
         WHERE origin = '{backfill}' AND row_id IS NOT NULL",
        source = Origin::Source.as_str(),
        backfill = Origin::Backfill.as_str(),
    )
}

/// Counts the source rows and the dead letters of `engagement_events`.
pub async fn source(
    source: &Client,
    analytics: Option<&Client>,
) -> Result<Report, tokio_postgres::Error> {
    let source_events: i64 = source
        .query_one("SELECT count(*) FROM engagement_events", &[])
        .await?
        .get(0);
    let dead_lettered: i64 = match analytics {
        // Only those whose row the source still has: a deleted row is not expected anywhere.
        Some(client) => {
            let dead = ids(
                client,
                &format!("SELECT id FROM ({}) AS d ORDER BY id", dead_lettered_ids()),
                &[],
            )
            .await?;
            let still: i64 = source
                .query_one(
                    "SELECT count(*) FROM engagement_events WHERE id = ANY($1)",
                    &[&dead],
                )
                .await?
                .get(0);
            still
        }
        None => 0,
    };
    Ok(Report {
        source_events: source_events as u64,
        dead_lettered: dead_lettered as u64,
        ..Report::default()
    })
}

/// Compares the facts with the source, and the aggregates with the facts.
pub async fn analytics(
    source: &Client,
    analytics: &Client,
    partitions: u32,
) -> Result<AnalyticsReport, tokio_postgres::Error> {
    let mut report = AnalyticsReport::partitioned(partitions);
    // Not expected in the facts: rows that could not be events, and events the analytics
    // database refused.
    let dead = ids(
        analytics,
        &format!(
            "SELECT id FROM ({}
                             UNION SELECT row_id FROM analytics.dead_letters
                             WHERE origin = '{}' AND row_id IS NOT NULL) AS d
             ORDER BY id",
            dead_lettered_ids(),
            Origin::Postgres.as_str()
        ),
        &[],
    )
    .await?;
    report.rejected = analytics
        .query_one(
            "SELECT count(DISTINCT row_id) FROM analytics.dead_letters WHERE origin = $1",
            &[&Origin::Postgres.as_str()],
        )
        .await?
        .get::<_, i64>(0) as u64;
    let mut after = i64::MIN;
    loop {
        let page = ids(
            source,
            "SELECT id FROM engagement_events WHERE id > $1 ORDER BY id LIMIT $2",
            &[&after, &PAGE],
        )
        .await?;
        let Some(&last) = page.last() else { break };
        let held = ids(
            analytics,
            "SELECT id FROM analytics.enriched_events WHERE id > $1 AND id <= $2 ORDER BY id",
            &[&after, &last],
        )
        .await?;
        report.events += held.len() as u64;
        compare_sorted(&page, &held, &dead, &mut report);
        after = last;
    }
    let beyond = ids(
        analytics,
        "SELECT id FROM analytics.enriched_events WHERE id > $1 ORDER BY id",
        &[&after],
    )
    .await?;
    report.events += beyond.len() as u64;
    compare_sorted(&[], &beyond, &dead, &mut report);
    for (table, keys, filter) in AGGREGATES {
        let diffs: i64 = analytics
            .query_one(&recompute_statement(table, keys, filter), &[])
            .await?
            .get(0);
        report.aggregate_diffs.push((table, diffs as u64));
    }
    Ok(report)
}

/// The first column of every row, as ids.
async fn ids(
    client: &Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<i64>, tokio_postgres::Error> {
    Ok(client
        .query(sql, params)
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
}

/// Merges one page of source ids with the analytics ids of the same range.
fn compare_sorted(source: &[i64], held: &[i64], dead: &[i64], report: &mut AnalyticsReport) {
    let (mut i, mut j) = (0, 0);
    while i < source.len() || j < held.len() {
        match (source.get(i), held.get(j)) {
            (Some(s), Some(h)) if s == h => {
                if let Some(counts) = report.partition_of(*h) {
                    counts.events += 1;
                }
                i += 1;
                j += 1;
            }
            (Some(s), h) if h.is_none_or(|h| s < h) => {
                if dead.binary_search(s).is_err() {
                    report.missing += 1;
                    if let Some(counts) = report.partition_of(*s) {
                        counts.missing += 1;
                    }
                    if report.missing_sample.len() < SAMPLE {
                        report.missing_sample.push(*s);
                    }
                }
                i += 1;
            }
            (_, Some(h)) => {
                if let Some(counts) = report.partition_of(*h) {
                    counts.events += 1;
                }
                report.deleted_at_source += 1;
                if report.deleted_sample.len() < SAMPLE {
                    report.deleted_sample.push(*h);
                }
                j += 1;
            }
            (None, None) => break,
            (Some(_), None) => unreachable!("handled above"),
        }
    }
}

/// Rows of `table` that differ from the aggregate recomputed from the facts, both ways.
fn recompute_statement(table: &str, keys: &str, filter: &str) -> String {
    format!(
        "WITH expected AS (
    SELECT {keys},
        count(*) AS events,
        count(*) FILTER (WHERE event_type = 'play') AS plays,
        count(*) FILTER (WHERE event_type = 'pause') AS pauses,
        count(*) FILTER (WHERE event_type = 'finish') AS finishes,
        count(*) FILTER (WHERE event_type = 'click') AS clicks,
        count(DISTINCT user_id) AS distinct_users,
        coalesce(sum(engagement_seconds), 0) AS engagement_seconds_total,
        avg(engagement_pct) AS engagement_pct_avg,
        max(event_ts) AS last_event_ts
    FROM (SELECT content_id, user_id, event_type, event_ts, engagement_seconds,
              engagement_pct, left(device, {key_chars}) AS device,
              left(content_type, {key_chars}) AS content_type,
              (event_ts AT TIME ZONE 'UTC')::date AS day
          FROM analytics.enriched_events) AS facts
    WHERE {filter}
    GROUP BY {keys}
),
actual AS (
    SELECT {keys}, events, plays, pauses, finishes, clicks, distinct_users,
        engagement_seconds_total, engagement_pct_avg, last_event_ts
    FROM analytics.{table}
)
SELECT (SELECT count(*) FROM (SELECT * FROM expected EXCEPT ALL SELECT * FROM actual) AS a)
     + (SELECT count(*) FROM (SELECT * FROM actual EXCEPT ALL SELECT * FROM expected) AS b)",
        key_chars = crate::event::KEY_CHARS
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_finds_missing_and_deleted_and_ignores_dead_letters() {
        let mut report = AnalyticsReport::default();
        compare_sorted(&[1, 2, 3, 5, 8], &[1, 3, 4, 5, 9], &[8], &mut report);
        assert_eq!(report.missing, 1);
        assert!(report.by_partition.is_empty());
        assert_eq!(report.missing_sample, vec![2]);
        assert_eq!(report.deleted_at_source, 2);
        assert_eq!(report.deleted_sample, vec![4, 9]);
    }

    #[test]
    fn partitions_are_counted_apart() {
        let mut report = AnalyticsReport::partitioned(2);
        compare_sorted(&[1, 2, 3, 4, 6], &[1, 3, 4, 5], &[], &mut report);
        assert_eq!(
            report.by_partition,
            vec![
                PartitionCounts {
                    events: 1,
                    missing: 2
                },
                PartitionCounts {
                    events: 3,
                    missing: 0
                },
            ]
        );
    }
}
