//! Metric names and the few helpers that record them.
//!
//! Names follow Prometheus conventions (`walcast_<what>[_unit]`, base units, `_total` for
//! counters) and carry only low-cardinality labels (`table`, `op`, `sink`, `outcome`,
//! `reason`). Recording happens per batch, not per row, except the end-to-end histogram,
//! which gets one observation per delivered event so its count equals events delivered.

use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::event::Batch;
use crate::lsn::Lsn;

pub const REPLICATION_LAG_BYTES: &str = "walcast_replication_lag_bytes";
pub const REPLICATION_LAG_SECONDS: &str = "walcast_replication_lag_seconds";
pub const SLOT_RETAINED_WAL_BYTES: &str = "walcast_slot_retained_wal_bytes";
pub const EVENTS_TOTAL: &str = "walcast_events_total";
pub const DEAD_LETTERS_TOTAL: &str = "walcast_dead_letters_total";
pub const CONTENT_MISSING_TOTAL: &str = "walcast_content_missing_total";
pub const SINK_BATCHES_TOTAL: &str = "walcast_sink_batches_total";
pub const SINK_WRITE_SECONDS: &str = "walcast_sink_write_seconds";
pub const END_TO_END_SECONDS: &str = "walcast_end_to_end_seconds";
pub const CONTENT_CACHE_ENTRIES: &str = "walcast_content_cache_entries";
pub const FLUSHED_LSN: &str = "walcast_flushed_lsn";
pub const REPLICATION_RECONNECTS_TOTAL: &str = "walcast_replication_reconnects_total";
pub const SINK_CHECKPOINT_LAG_BYTES: &str = "walcast_sink_checkpoint_lag_bytes";
pub const SLOT_SAFE_WAL_SIZE_BYTES: &str = "walcast_slot_safe_wal_size_bytes";
pub const SLOT_IDLE_TIMEOUT_SECONDS: &str = "walcast_slot_idle_timeout_seconds";
pub const HEARTBEATS_TOTAL: &str = "walcast_heartbeats_total";

/// The outcomes of `walcast_sink_batches_total`.
pub const OUTCOMES: [&str; 4] = [
    Failure::OK,
    Failure::Retry.as_str(),
    Failure::DeadLetter.as_str(),
    Failure::Error.as_str(),
];

/// How a sink write that did not succeed ended: the `outcome` label of
/// `walcast_sink_batches_total` (`ok` for the ones that did).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Transient: the write is retried.
    Retry,
    /// The batch went to the dead letters.
    DeadLetter,
    /// Permanent: walcast stops.
    Error,
}

impl Failure {
    const OK: &'static str = "ok";

    pub const fn as_str(self) -> &'static str {
        match self {
            Failure::Retry => "retry",
            Failure::DeadLetter => "dead_letter",
            Failure::Error => "error",
        }
    }
}

/// Installs the Prometheus recorder; the handle renders `/metrics` (see `health::serve`).
/// Every metric gets its HELP text, and every counter an alert or the dashboard reads is
/// exported at 0 for each label value known in advance (`sinks`: those in use), so that
/// `increase()` sees the first event: a series that first appears at 1 has no increase.
///
/// With a partitioned source every metric carries the label `partition="<i>"`, so one
/// dashboard shows each instance's lag and sums their throughput.
pub fn install(
    sinks: &[&'static str],
    partition: crate::config::Partition,
) -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let buckets = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    let mut builder = PrometheusBuilder::new();
    if !partition.is_whole() {
        builder = builder.add_global_label("partition", partition.index.to_string());
    }
    let handle = builder
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &buckets,
        )?
        .install_recorder()?;
    describe();
    zero_counters(sinks);
    Ok(handle)
}

/// HELP text of every metric.
fn describe() {
    describe_gauge!(
        REPLICATION_LAG_BYTES,
        Unit::Bytes,
        "The server's current WAL position minus the position every sink confirmed."
    );
    describe_gauge!(
        REPLICATION_LAG_SECONDS,
        Unit::Seconds,
        "How long the oldest transaction read but not yet confirmed by every sink has waited since its commit; 0 when none is waiting."
    );
    describe_gauge!(
        SLOT_RETAINED_WAL_BYTES,
        Unit::Bytes,
        "WAL the server keeps for the slot (current position minus restart_lsn)."
    );
    describe_gauge!(
        SLOT_SAFE_WAL_SIZE_BYTES,
        Unit::Bytes,
        "WAL that can still be written before the slot is invalidated (only with max_slot_wal_keep_size)."
    );
    describe_gauge!(
        SLOT_IDLE_TIMEOUT_SECONDS,
        Unit::Seconds,
        "The server's idle_replication_slot_timeout (PostgreSQL 18; 0: none): how long the slot may go unused, walcast stopped, before PostgreSQL invalidates it."
    );
    describe_gauge!(
        SINK_CHECKPOINT_LAG_BYTES,
        Unit::Bytes,
        "The server's current WAL position minus what the sink has applied."
    );
    describe_counter!(
        EVENTS_TOTAL,
        "Row changes decoded from the replication stream, by table and operation."
    );
    describe_counter!(
        DEAD_LETTERS_TOTAL,
        "Rows that could not be events, events the analytics database refused, and webhook batches given up on, by reason."
    );
    describe_counter!(
        CONTENT_MISSING_TOTAL,
        "Events delivered with content_missing (their content_id NULL or unknown)."
    );
    describe_counter!(
        SINK_BATCHES_TOTAL,
        "Sink writes by outcome: ok, retry (transient failure), dead_letter (webhook batch given up on), error (permanent)."
    );
    describe_histogram!(SINK_WRITE_SECONDS, Unit::Seconds, "Time of one sink write.");
    describe_histogram!(
        END_TO_END_SECONDS,
        Unit::Seconds,
        "Commit timestamp to sink confirmation, one observation per event."
    );
    describe_gauge!(
        CONTENT_CACHE_ENTRIES,
        "Content rows in the enrichment cache."
    );
    describe_gauge!(
        FLUSHED_LSN,
        "The position every sink confirmed and walcast reported to PostgreSQL, as a number."
    );
    describe_counter!(
        REPLICATION_RECONNECTS_TOTAL,
        "Replication sessions opened after a lost one."
    );
    describe_counter!(
        HEARTBEATS_TOTAL,
        "Heartbeats written to the WAL (pg_logical_emit_message)."
    );
}

/// Every counter at 0, for every label value known in advance.
fn zero_counters(sinks: &[&'static str]) {
    for reason in crate::event::DeadLetterReason::ALL {
        counter!(DEAD_LETTERS_TOTAL, "reason" => reason.as_str()).increment(0);
    }
    for sink in sinks {
        for outcome in OUTCOMES {
            counter!(SINK_BATCHES_TOTAL, "sink" => *sink, "outcome" => outcome).increment(0);
        }
    }
    for table in [
        crate::event::EVENTS_TABLE,
        crate::event::CONTENT_TABLE,
        "other",
    ] {
        for op in ["insert", "update", "delete", "truncate"] {
            counter!(EVENTS_TOTAL, "table" => table, "op" => op).increment(0);
        }
    }
    counter!(CONTENT_MISSING_TOTAL).increment(0);
    counter!(REPLICATION_RECONNECTS_TOTAL).increment(0);
    counter!(HEARTBEATS_TOTAL).increment(0);
}

/// A row or batch went to the dead letters.
pub fn dead_lettered(reason: crate::event::DeadLetterReason) {
    counter!(DEAD_LETTERS_TOTAL, "reason" => reason.as_str()).increment(1);
}

/// Changes decoded by the source, per table and operation, counted over one batch.
#[derive(Debug, Default)]
pub struct ChangeCounts {
    counts: Vec<(&'static str, &'static str, u64)>,
    pub content_missing: u64,
}

impl ChangeCounts {
    pub fn add(&mut self, table: &'static str, op: &'static str) {
        match self
            .counts
            .iter_mut()
            .find(|(t, o, _)| *t == table && *o == op)
        {
            Some(entry) => entry.2 += 1,
            None => self.counts.push((table, op, 1)),
        }
    }

    /// Records and resets.
    pub fn flush(&mut self, batch: &Batch) {
        for (table, op, n) in self.counts.drain(..) {
            counter!(EVENTS_TOTAL, "table" => table, "op" => op).increment(n);
        }
        if self.content_missing > 0 {
            counter!(CONTENT_MISSING_TOTAL).increment(self.content_missing);
            self.content_missing = 0;
        }
        for dead in &batch.dead_letters {
            dead_lettered(dead.reason);
        }
    }
}

/// A sink applied `batches` in one write that took `took`, confirmed at `now`.
pub fn sink_written(sink: &'static str, batches: &[&Batch], took: Duration, now: DateTime<Utc>) {
    let with_rows = batches.iter().filter(|b| b.rows() > 0).count();
    if with_rows == 0 {
        return;
    }
    counter!(SINK_BATCHES_TOTAL, "sink" => sink, "outcome" => Failure::OK)
        .increment(with_rows as u64);
    histogram!(SINK_WRITE_SECONDS, "sink" => sink).record(took.as_secs_f64());
    let end_to_end = histogram!(END_TO_END_SECONDS, "sink" => sink);
    for event in batches.iter().flat_map(|b| &b.events) {
        let seconds = (now - event.commit_ts).num_microseconds().unwrap_or(0) as f64 / 1e6;
        end_to_end.record(seconds.max(0.0));
    }
}

pub fn sink_failed(sink: &'static str, outcome: Failure) {
    counter!(SINK_BATCHES_TOTAL, "sink" => sink, "outcome" => outcome.as_str()).increment(1);
}

/// A new replication session replaced one that was lost.
pub fn replication_reconnected() {
    counter!(REPLICATION_RECONNECTS_TOTAL).increment(1);
}

pub fn flushed(lsn: Lsn) {
    gauge!(FLUSHED_LSN).set(lsn.0 as f64);
}

pub fn content_cache_entries(n: usize) {
    gauge!(CONTENT_CACHE_ENTRIES).set(n as f64);
}

/// The server's current WAL position minus what every sink confirmed.
pub fn replication_lag_bytes(bytes: u64) {
    gauge!(REPLICATION_LAG_BYTES).set(bytes as f64);
}

/// How long the oldest unconfirmed transaction has waited since its commit.
pub fn replication_lag_seconds(lag: Duration) {
    gauge!(REPLICATION_LAG_SECONDS).set(lag.as_secs_f64());
}

/// What `pg_replication_slots` says about the slot.
pub fn slot(retained_wal_bytes: u64, safe_wal_size: Option<i64>, idle_timeout_seconds: i64) {
    gauge!(SLOT_RETAINED_WAL_BYTES).set(retained_wal_bytes as f64);
    if let Some(bytes) = safe_wal_size {
        gauge!(SLOT_SAFE_WAL_SIZE_BYTES).set(bytes as f64);
    }
    gauge!(SLOT_IDLE_TIMEOUT_SECONDS).set(idle_timeout_seconds as f64);
}

/// The server's current WAL position minus what `sink` has applied.
pub fn sink_checkpoint_lag_bytes(sink: &'static str, bytes: u64) {
    gauge!(SINK_CHECKPOINT_LAG_BYTES, "sink" => sink).set(bytes as f64);
}

pub fn heartbeat() {
    counter!(HEARTBEATS_TOTAL).increment(1);
}
