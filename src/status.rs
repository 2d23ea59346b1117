//! `walcast status`: where the slot stands and where each sink's checkpoint stands, read
//! from the servers (it needs no running walcast).

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::config::{AnalyticsArgs, RedisArgs, RedisTarget, SinkArgs, SinkKind, SourceArgs};
use crate::lsn::{Lsn, Position};
use crate::sink::AnySink;
use crate::sink::Sink;
use crate::sink::redis::RedisSink;
use crate::sink::redis_cluster::RedisClusterSink;
use crate::source;
use crate::state::{PgState, StateStore};

/// How long each sink may take to answer.
const SINK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize)]
pub struct Report {
    /// The partition this is (with `WALCAST_PARTITIONS` above 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    pub slot: Slot,
    pub sinks: Vec<SinkCheckpoint>,
}

/// Every partition's report, and the totals over them.
#[derive(Debug, Serialize)]
pub struct Partitioned {
    pub partitions: Vec<Report>,
    /// The largest slot lag of any partition: how far behind the source the slowest is.
    pub max_lag_bytes: Option<u64>,
    /// WAL the server keeps for all the partitions' slots (the oldest restart_lsn's).
    pub max_retained_wal_bytes: Option<u64>,
}

impl Partitioned {
    pub fn of(partitions: Vec<Report>) -> Self {
        let max_lag_bytes = partitions.iter().filter_map(|r| r.slot.lag_bytes).max();
        let max_retained_wal_bytes = partitions
            .iter()
            .filter_map(|r| r.slot.retained_wal_bytes)
            .max();
        Partitioned {
            partitions,
            max_lag_bytes,
            max_retained_wal_bytes,
        }
    }
}

impl fmt::Display for Partitioned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for report in &self.partitions {
            writeln!(f, "partition {}", report.partition.unwrap_or_default())?;
            write!(f, "{report}")?;
        }
        let or_dash = |v: Option<u64>| v.map_or("-".to_owned(), |b| b.to_string());
        writeln!(f, "all {} partitions", self.partitions.len())?;
        writeln!(
            f,
            "  max lag_bytes            {}",
            or_dash(self.max_lag_bytes)
        )?;
        writeln!(
            f,
            "  max retained_wal_bytes   {}",
            or_dash(self.max_retained_wal_bytes)
        )
    }
}

#[derive(Debug, Serialize)]
pub struct Slot {
    pub name: String,
    pub exists: bool,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub current_wal_lsn: String,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    /// `current_wal_lsn - confirmed_flush_lsn`.
    pub lag_bytes: Option<u64>,
    /// `current_wal_lsn - restart_lsn`: WAL the server keeps for this slot.
    pub retained_wal_bytes: Option<u64>,
    pub wal_status: Option<String>,
    /// Whether PostgreSQL invalidated the slot (`wal_status` lost, or a reason given).
    pub invalidated: bool,
    pub safe_wal_size: Option<i64>,
    /// Why PostgreSQL invalidated the slot (PostgreSQL 17 and later).
    pub invalidation_reason: Option<String>,
    /// Since when no connection has used the slot (PostgreSQL 17 and later).
    pub inactive_since: Option<String>,
    /// `idle_replication_slot_timeout` in seconds (PostgreSQL 18; 0: none).
    pub idle_timeout_seconds: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct SinkCheckpoint {
    pub sink: &'static str,
    /// `commit_lsn#seq` of the last applied event; `None` when nothing was applied yet.
    pub checkpoint: Option<String>,
    /// `current_wal_lsn` minus the checkpoint's commit LSN.
    pub lag_bytes: Option<u64>,
    /// Why the checkpoint could not be read.
    pub error: Option<String>,
    /// Something worth knowing that is not an error, e.g. that the analytics schema does
    /// not exist yet before the first `walcast run`.
    pub note: Option<String>,
}

impl Report {
    /// The slot exists, is not invalidated, and every sink's checkpoint could be read.
    pub fn is_healthy(&self) -> bool {
        self.slot.exists && !self.slot.invalidated && self.sinks.iter().all(|s| s.error.is_none())
    }
}

/// Reads the slot from the source and each sink's checkpoint from its server.
pub async fn collect(
    source_args: &SourceArgs,
    redis: &RedisArgs,
    analytics: &AnalyticsArgs,
    sinks: &SinkArgs,
) -> anyhow::Result<Report> {
    let client = crate::pg::connect("WALCAST_SOURCE_URL", &source_args.pg_config()?).await?;
    let info = source::slot_info(&client, &source_args.slot()).await?;
    let current = match &info {
        Some(info) => info.current_wal_lsn,
        None => source::wal_lsn(&client).await?,
    };
    let text = |lsn: Option<Lsn>| lsn.map(|l| l.to_string());
    let slot = Slot {
        name: source_args.slot(),
        exists: info.is_some(),
        active: info.as_ref().is_some_and(|i| i.active_pid.is_some()),
        active_pid: info.as_ref().and_then(|i| i.active_pid),
        current_wal_lsn: current.to_string(),
        confirmed_flush_lsn: text(info.as_ref().and_then(|i| i.confirmed_flush_lsn)),
        restart_lsn: text(info.as_ref().and_then(|i| i.restart_lsn)),
        lag_bytes: info.as_ref().map(source::SlotInfo::lag_bytes),
        retained_wal_bytes: info.as_ref().map(source::SlotInfo::retained_wal_bytes),
        wal_status: info.as_ref().and_then(|i| i.wal_status.clone()),
        invalidated: info.as_ref().is_some_and(source::SlotInfo::is_lost),
        safe_wal_size: info.as_ref().and_then(|i| i.safe_wal_size),
        invalidation_reason: info.as_ref().and_then(|i| i.invalidation_reason.clone()),
        inactive_since: info.as_ref().and_then(|i| i.inactive_since.clone()),
        idle_timeout_seconds: info.as_ref().and_then(|i| i.idle_timeout_seconds),
    };
    let mut checkpoints = Vec::new();
    for kind in &sinks.kinds {
        let read = tokio::time::timeout(
            SINK_TIMEOUT,
            read_checkpoint(*kind, redis, analytics, source_args),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", SINK_TIMEOUT.as_secs())));
        checkpoints.push(match read {
            Ok(Stored::At(position)) => SinkCheckpoint {
                sink: kind.name(),
                checkpoint: position.map(|p| p.to_string()),
                lag_bytes: position.map(|p| current.bytes_since(p.commit_lsn)),
                error: None,
                note: None,
            },
            Ok(Stored::NoSchema) => SinkCheckpoint {
                sink: kind.name(),
                checkpoint: None,
                lag_bytes: None,
                error: None,
                note: Some(
                    "the analytics schema does not exist yet; the first walcast run creates it"
                        .to_owned(),
                ),
            },
            Err(error) => SinkCheckpoint {
                sink: kind.name(),
                checkpoint: None,
                lag_bytes: None,
                error: Some(error),
                note: None,
            },
        });
    }
    let partition = source_args.partition();
    Ok(Report {
        partition: (!partition.is_whole()).then_some(partition.index),
        slot,
        sinks: checkpoints,
    })
}

/// What a sink holds as its checkpoint.
enum Stored {
    At(Option<Position>),
    /// The analytics schema, where the checkpoint would be, is not there yet.
    NoSchema,
}

async fn read_checkpoint(
    kind: SinkKind,
    redis: &RedisArgs,
    analytics: &AnalyticsArgs,
    source_args: &SourceArgs,
) -> Result<Stored, String> {
    match kind {
        SinkKind::Redis => {
            let partition = source_args.partition();
            let mut sink = match redis
                .target()
                .map_err(|e| crate::error::Chain(&e).to_string())?
            {
                RedisTarget::Single(client) => {
                    AnySink::Redis(RedisSink::new(client).for_partition(partition))
                }
                RedisTarget::Cluster(client) => {
                    AnySink::RedisCluster(RedisClusterSink::new(client).for_partition(partition))
                }
            };
            sink.open()
                .await
                .map_err(|e| crate::error::Chain(&e).to_string())?;
            sink.checkpoint()
                .await
                .map(Stored::At)
                .map_err(|e| crate::error::Chain(&e).to_string())
        }
        // Both keep their checkpoint in the analytics database, under their own name.
        SinkKind::Postgres | SinkKind::Webhook => {
            let config = analytics
                .pg_config(&source_args.url)
                .map_err(|e| crate::error::Chain(&e).to_string())?;
            let client = crate::pg::connect("WALCAST_ANALYTICS_URL", &config)
                .await
                .map_err(|e| crate::error::Chain(&e).to_string())?;
            let name = source_args.partition().state_name(kind.name());
            match PgState::new(&client).checkpoint(&name).await {
                Ok(position) => Ok(Stored::At(position)),
                Err(e) if e.is_undefined_object() => Ok(Stored::NoSchema),
                Err(e) => Err(crate::pg::detail(&e.source)),
            }
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.slot;
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        writeln!(f, "slot {}", s.name)?;
        if !s.exists {
            writeln!(f, "  does not exist (run walcast setup)")?;
        } else {
            let active = s
                .active_pid
                .map_or("no".to_owned(), |pid| format!("yes (pid {pid})"));
            writeln!(f, "  active               {active}")?;
            writeln!(
                f,
                "  confirmed_flush_lsn  {}",
                or_dash(s.confirmed_flush_lsn.clone())
            )?;
            writeln!(
                f,
                "  restart_lsn          {}",
                or_dash(s.restart_lsn.clone())
            )?;
            writeln!(f, "  current_wal_lsn      {}", s.current_wal_lsn)?;
            writeln!(
                f,
                "  lag_bytes            {}",
                or_dash(s.lag_bytes.map(|b| b.to_string()))
            )?;
            writeln!(
                f,
                "  retained_wal_bytes   {}",
                or_dash(s.retained_wal_bytes.map(|b| b.to_string()))
            )?;
            writeln!(
                f,
                "  wal_status           {}",
                or_dash(s.wal_status.clone())
            )?;
            writeln!(
                f,
                "  safe_wal_size        {}",
                s.safe_wal_size
                    .map_or("unlimited (max_slot_wal_keep_size = -1)".to_owned(), |b| b
                        .to_string())
            )?;
            if let Some(since) = &s.inactive_since {
                writeln!(f, "  inactive_since       {since}")?;
            }
            if let Some(seconds) = s.idle_timeout_seconds.filter(|s| *s > 0) {
                writeln!(
                    f,
                    "  idle timeout         {} (idle_replication_slot_timeout: unused that long, the slot is invalidated)",
                    humantime::format_duration(std::time::Duration::from_secs(
                        seconds.unsigned_abs()
                    ))
                )?;
            }
            if let Some(reason) = &s.invalidation_reason {
                writeln!(f, "  invalidation_reason  {reason}")?;
            }
            if s.invalidated {
                writeln!(
                    f,
                    "  the slot was invalidated: walcast teardown, walcast backfill, walcast run"
                )?;
            }
        }
        writeln!(f, "sinks")?;
        for sink in &self.sinks {
            match (&sink.error, &sink.checkpoint) {
                (Some(error), _) => writeln!(f, "  {:<9} error: {error}", sink.sink)?,
                (None, None) if sink.note.is_some() => writeln!(
                    f,
                    "  {:<9} {}",
                    sink.sink,
                    sink.note.as_deref().unwrap_or_default()
                )?,
                (None, None) => writeln!(f, "  {:<9} nothing applied yet", sink.sink)?,
                (None, Some(checkpoint)) => writeln!(
                    f,
                    "  {:<9} checkpoint {checkpoint}  lag_bytes {}",
                    sink.sink,
                    or_dash(sink.lag_bytes.map(|b| b.to_string()))
                )?,
            }
        }
        Ok(())
    }
}
