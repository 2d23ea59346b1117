//! The slot monitor: an ordinary connection to the source that, every second, reads the
//! slot's row in `pg_replication_slots` and turns it into the lag gauges; writes the
//! heartbeat; and stops walcast when PostgreSQL has invalidated the slot.
//!
//! It also keeps the publication honest. A publication that no longer covers
//! `engagement_events` (altered by someone) streams nothing of it while everything looks
//! fine: walcast turns not ready and says how to fix it. An `engagement_events` that was
//! dropped (and maybe created again, with its ids starting over) stops walcast, as a
//! TRUNCATE does: neither shows in the stream itself.
//!
//! It never stops walcast for its own connection trouble: while the source is down the
//! replication stream reconnects, and so does the monitor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;

use super::{ReplicationError, SlotInfo, slot_info};
use crate::health::Health;
use crate::metrics;

/// How often the slot is read.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long one of the monitor's queries may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The prefix of heartbeat messages in the WAL.
pub const HEARTBEAT_PREFIX: &str = "walcast_heartbeat";

pub struct Monitor {
    pub config: crate::pg::Target,
    pub slot: String,
    pub publication: String,
    /// Whose row filter the publication must keep on `engagement_events`.
    pub partition: crate::config::Partition,
    /// The oid `public.engagement_events` had when walcast started.
    pub events_table: u32,
    pub heartbeat: Option<Duration>,
    pub retained_wal_warn: u64,
    pub health: Arc<Health>,
}

impl Monitor {
    /// Runs until the slot is invalidated or dropped.
    pub async fn run(mut self) -> Result<(), ReplicationError> {
        let mut client: Option<tokio_postgres::Client> = None;
        let mut connect_failed = false;
        let mut above_warn = false;
        let mut last_heartbeat = Instant::now();
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            metrics::replication_lag_seconds(self.health.lag(Utc::now()));
            if client
                .as_ref()
                .is_none_or(tokio_postgres::Client::is_closed)
            {
                match crate::pg::connect("WALCAST_SOURCE_URL", &self.config).await {
                    Ok(new) => {
                        client = Some(new);
                        connect_failed = false;
                    }
                    Err(error) => {
                        if !connect_failed {
                            tracing::warn!(error = %crate::error::Chain(&error), "slot monitor cannot reach the source; lag gauges are stale until it can");
                        }
                        connect_failed = true;
                        continue;
                    }
                }
            }
            let db = client.as_ref().expect("connected above");
            // Bounded: a source that stopped answering must not stop the lag gauges from
            // showing it; a new connection is tried next time.
            let checked = tokio::time::timeout(QUERY_TIMEOUT, self.check_publication(db))
                .await
                .unwrap_or_else(|_| Err(ReplicationError::Monitor("no answer within 5 s".into())));
            if let Err(error) = checked {
                if let ReplicationError::EventsTableReplaced { .. } = error {
                    return Err(error);
                }
                tracing::debug!(error = %crate::error::Chain(&error), "reading the publication failed");
                client = None;
                continue;
            }
            let read = tokio::time::timeout(QUERY_TIMEOUT, slot_info(db, &self.slot)).await;
            let Ok(read) = read else {
                tracing::debug!("reading the slot took longer than 5 s; reconnecting");
                client = None;
                continue;
            };
            match read {
                Ok(Some(info)) => {
                    self.observe(&info, &mut above_warn)?;
                }
                Ok(None) => {
                    return Err(ReplicationError::SlotMissing {
                        slot: self.slot.clone(),
                    });
                }
                Err(error) => {
                    tracing::debug!(error = %crate::error::Chain(&error), "reading the slot failed");
                    client = None;
                    continue;
                }
            }
            if let Some(every) = self.heartbeat
                && last_heartbeat.elapsed() >= every
            {
                last_heartbeat = Instant::now();
                if tokio::time::timeout(QUERY_TIMEOUT, self.beat(db))
                    .await
                    .is_err()
                {
                    client = None;
                }
            }
        }
    }

    /// Whether `engagement_events` is still the table walcast started with, and still in
    /// the publication.
    async fn check_publication(&self, db: &tokio_postgres::Client) -> Result<(), ReplicationError> {
        let row = db
            .query_one(
                "SELECT to_regclass('public.engagement_events')::oid,
                        EXISTS (SELECT 1 FROM pg_publication_tables
                                WHERE pubname = $1 AND schemaname = 'public'
                                  AND tablename = 'engagement_events'),
                        (SELECT rowfilter FROM pg_publication_tables
                         WHERE pubname = $1 AND schemaname = 'public'
                           AND tablename = 'engagement_events')",
                &[&self.publication],
            )
            .await
            .map_err(|e| ReplicationError::Monitor(crate::pg::detail(&e)))?;
        let oid: Option<u32> = row.get(0);
        if oid != Some(self.events_table) {
            return Err(ReplicationError::EventsTableReplaced {
                publication: self.publication.clone(),
            });
        }
        let filter: Option<String> = row.get(2);
        let covered = row.get::<_, bool>(1) && self.partition.matches_row_filter(filter.as_deref());
        let problem = (!covered).then(|| {
            format!(
                "publication {p} does not cover public.engagement_events{filter} (someone \
                 altered it): rows of the table are not streamed. Run {fix}, then walcast \
                 backfill --since <when it was changed> to copy the rows committed meanwhile",
                p = self.publication,
                filter = if self.partition.is_whole() {
                    String::new()
                } else {
                    format!(" with the row filter {}", self.partition.condition())
                },
                fix = if self.partition.is_whole() {
                    format!(
                        "ALTER PUBLICATION {p} ADD TABLE public.engagement_events (or, if the \
                         table is still in it with a row filter, ALTER PUBLICATION {p} SET \
                         TABLE public.content, public.engagement_events)",
                        p = self.publication
                    )
                } else {
                    format!(
                        "ALTER PUBLICATION {} SET TABLE {}",
                        self.publication,
                        super::published_tables(self.partition)
                    )
                },
            )
        });
        if let Some(now) = self.health.set_source_problem(problem) {
            match now {
                Some(problem) => tracing::error!("{problem}"),
                None => {
                    tracing::info!(publication = %self.publication, "publication covers engagement_events again")
                }
            }
        }
        Ok(())
    }

    fn observe(&self, info: &SlotInfo, above_warn: &mut bool) -> Result<(), ReplicationError> {
        if info.is_lost() {
            return Err(ReplicationError::SlotInvalidated {
                slot: self.slot.clone(),
                reason: info.invalidation_reason.clone(),
            });
        }
        let current = info.current_wal_lsn;
        let flushed = self
            .health
            .acked()
            .max(info.confirmed_flush_lsn.unwrap_or_default());
        metrics::replication_lag_bytes(current.bytes_since(flushed));
        let retained = info.retained_wal_bytes();
        metrics::slot(
            retained,
            info.safe_wal_size,
            info.idle_timeout_seconds.unwrap_or(0),
        );
        for sink in self.health.sinks() {
            metrics::sink_checkpoint_lag_bytes(sink.name, current.bytes_since(sink.confirmed()));
        }
        let above = retained > self.retained_wal_warn;
        if above && !*above_warn {
            let behind: Vec<String> = self
                .health
                .sinks()
                .iter()
                .filter(|s| !s.follows)
                .map(|s| format!("{}={}", s.name, current.bytes_since(s.confirmed())))
                .collect();
            tracing::warn!(
                slot = %self.slot,
                retained_wal_bytes = retained,
                threshold_bytes = self.retained_wal_warn,
                wal_status = info.wal_status.as_deref().unwrap_or("-"),
                safe_wal_size = ?info.safe_wal_size,
                sinks_behind_bytes = %behind.join(","),
                "the slot holds back more WAL than WALCAST_RETAINED_WAL_WARN; the sink furthest \
                 behind is holding it"
            );
        } else if !above && *above_warn {
            tracing::info!(slot = %self.slot, retained_wal_bytes = retained, "retained WAL back under the threshold");
        }
        *above_warn = above;
        Ok(())
    }

    /// Writes a non-transactional logical message. It reaches no sink (walcast does not ask
    /// pgoutput for messages); it only gives the walsender WAL to move past, so the slot's
    /// confirmed position advances on a database where nothing else is written.
    async fn beat(&mut self, db: &tokio_postgres::Client) {
        let result = db
            .execute(
                "SELECT pg_logical_emit_message(false, $1, '')",
                &[&HEARTBEAT_PREFIX],
            )
            .await;
        match result {
            Ok(_) => metrics::heartbeat(),
            Err(error)
                if error.code()
                    == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) =>
            {
                tracing::warn!(error = %crate::error::Chain(&error), "heartbeat disabled: the role may not call pg_logical_emit_message; grant EXECUTE on it or set WALCAST_HEARTBEAT_INTERVAL=0");
                self.heartbeat = None;
            }
            Err(error) => tracing::debug!(error = %crate::error::Chain(&error), "heartbeat failed"),
        }
    }
}
