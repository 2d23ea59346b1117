//! Destinations for enriched events.
//!
//! Every sink implements the one small [`Sink`] trait. The pipeline gives each sink every
//! batch, in commit order, from a task of its own; a sink never sees batch N+1 before it
//! confirmed batch N. Exactly-once rests on two rules every sink keeps:
//!
//! 1. It stores the highest [`Position`] it applied atomically with the data (Redis: in the
//!    same MULTI/EXEC or script; PostgreSQL: in the same transaction), and skips positions
//!    at or below it. After a crash the slot replays from the last acknowledged commit,
//!    which may be behind what a sink applied; the checkpoint makes that replay a no-op.
//! 2. Each write is idempotent per event id, so a backfill overlapping the stream changes
//!    nothing twice. Backfill batches (rows read from the table, with no WAL position of
//!    their own) rely on this rule alone: they bypass the checkpoint, and each sink stores
//!    the backfill's resume cursor with them instead.

mod any;
pub mod fault;
pub mod postgres;
pub mod redis;
pub mod redis_cluster;
pub mod webhook;

pub use any::{AnySink, BuildError, build};

use std::future::Future;

use crate::event::{Batch, EnrichedEvent};
use crate::health::Probe;
use crate::lsn::{Position, SourceId};
use crate::state::StateError;

/// A destination for enriched events. Batches arrive in commit order. After a restart a
/// sink may be offered events it already applied: it must skip them (checkpoint) and
/// every write must be idempotent per event id.
pub trait Sink: Send + 'static {
    /// Low-cardinality name for logs and metric labels: "redis", "postgres", "webhook".
    fn name(&self) -> &'static str;

    /// Connects and prepares what the sink writes to (the analytics schema's migrations),
    /// so that a sink that cannot start stops walcast before replication begins. Safe to
    /// call again after an error. A sink also reconnects by itself after a failed write.
    fn open(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send {
        async { Ok(()) }
    }

    /// How `/readyz` checks the sink's server: every second, on a connection of its own,
    /// so an outage shows even when no event is flowing. By default the sink is judged by
    /// its writes alone (a system walcast does not control, such as the webhook).
    fn healthcheck(&self) -> Probe {
        Probe::Deliveries
    }

    /// The shortest time between the starts of two writes while the sink keeps up. Rows
    /// that arrive meanwhile go into the next write together: under a steady stream of
    /// small transactions a write then carries many rows instead of one, for the cost of
    /// one. A sink that is behind writes at once (a full write is queued, or its last write
    /// took longer than this), and so does one that was idle.
    fn linger(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Whether a write may be cut short by `WALCAST_SINK_WRITE_TIMEOUT`. The webhook's
    /// writes include its own retries within their budget, each POST bounded by its own
    /// timeout, so it opts out.
    fn has_write_deadline(&self) -> bool {
        true
    }

    /// Forgets the sink's connections after a write was cut short by its deadline: what
    /// was in flight on them is unknown, so the next write starts on fresh ones (its
    /// checkpoint makes the retry exact).
    fn reset(&mut self) {}

    /// Checks that the sink's checkpoint belongs to the source's WAL history `current`
    /// ([`SinkError::OtherHistory`] when it does not), and stores `current` with every
    /// checkpoint from now on (recording it now where the sink can do so without one).
    fn claim_history(
        &mut self,
        current: SourceId,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        let _ = current;
        async { Ok(()) }
    }

    /// Found by [`Sink::checkpoint`]: part of the sink lost writes that were confirmed
    /// (a Redis Cluster slot that failed over to a replica that was behind), although its
    /// checkpoint did not; the position is that checkpoint, which a rebuild restores.
    fn lost_writes(&self) -> Option<Position> {
        None
    }

    /// The highest position this sink has durably applied, read at start-up.
    fn checkpoint(&mut self) -> impl Future<Output = Result<Option<Position>, SinkError>> + Send;

    /// Durably applies consecutive batches, in order, and the checkpoint, all together.
    /// More than one batch arrives when the sink fell behind: writing them at once lets it
    /// catch up. `Ok` means they may be acknowledged upstream as far as this sink is
    /// concerned. Must be safe to call again with the same batches after an error.
    fn write(&mut self, batches: &[&Batch]) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Where an interrupted backfill named `job` got to in this sink: the highest id it
    /// applied, stored with the data by `write` (see [`Batch::backfill`]).
    fn backfill_cursor(
        &mut self,
        job: &str,
    ) -> impl Future<Output = Result<Option<i64>, SinkError>> + Send;
}

/// What a write records besides its rows, atomically with them, derived once from the
/// batches for every sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress<'a> {
    /// Acknowledgement markers only: nothing to write.
    Nothing,
    /// The stream's checkpoint moves to this position.
    Stream(Position),
    /// Backfill `job`'s cursor moves to `cursor`: the highest id applied; `None` when the
    /// backfill finished and the cursor goes.
    Backfill { job: &'a str, cursor: Option<i64> },
}

impl<'a> Progress<'a> {
    /// The progress of consecutive batches: that of the last one. Streamed batches move the
    /// checkpoint to their last row (none: nothing to record); backfill batches the cursor.
    pub fn of(batches: &[&'a Batch]) -> Self {
        match batches.last().and_then(|batch| batch.backfill()) {
            Some(mark) => Progress::Backfill {
                job: &mark.job,
                cursor: mark.cursor,
            },
            None => last_position(batches).map_or(Progress::Nothing, Progress::Stream),
        }
    }

    /// The same kind of progress, as far as `event`: for a write made in parts, each of
    /// which records how far it got (a backfill reads in id order).
    pub fn at(self, event: &EnrichedEvent) -> Self {
        match self {
            Progress::Nothing => Progress::Nothing,
            Progress::Stream(_) => Progress::Stream(event.position),
            Progress::Backfill { job, .. } => Progress::Backfill {
                job,
                cursor: Some(event.id),
            },
        }
    }

    pub fn is_backfill(self) -> bool {
        matches!(self, Progress::Backfill { .. })
    }
}

/// A claim of the state store ([`crate::state::claim_history`]) as a sink's answer.
pub fn claimed(history: crate::state::History, current: SourceId) -> Result<(), SinkError> {
    match history {
        crate::state::History::Claimed => Ok(()),
        crate::state::History::Other(stored) => Err(SinkError::OtherHistory { stored, current }),
    }
}

/// The events of consecutive batches, in order.
pub fn events<'a>(batches: &'a [&'a Batch]) -> impl Iterator<Item = &'a EnrichedEvent> + 'a {
    batches.iter().flat_map(|batch| &batch.events)
}

/// Position of the last row of the batches; `None` when they hold only acknowledgement
/// markers.
pub fn last_position(batches: &[&Batch]) -> Option<Position> {
    batches
        .iter()
        .filter_map(|batch| batch.last_position())
        .max()
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("redis")]
    Redis(#[from] ::redis::RedisError),
    /// Leaves no source: the hint belongs after the cause.
    #[error(
        "cannot connect to WALCAST_REDIS_URL ({endpoint}): {error}{}",
        crate::tls::hint(&error.to_string(), crate::tls::Peer::Redis)
    )]
    RedisConnect {
        endpoint: String,
        error: ::redis::RedisError,
    },
    #[error("{context}: {}{}", crate::pg::detail(source), postgres_hint(source))]
    Postgres {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "its checkpoint belongs to another WAL history ({stored}) than the source's \
         ({current}): the source was restored into a new cluster, recovered to a point in \
         time, or failed over, so positions do not compare and walcast will not guess which \
         events the sink has. If the source holds the same rows (a dump and restore, a \
         recovery you continue from), start over keeping the sinks' data: delete their \
         checkpoints (DELETE FROM analytics.walcast_checkpoint on the analytics database; \
         DEL walcast:checkpoint:redis on Redis), then walcast backfill (it copies the table, \
         and every sink skips the ids it has) and walcast run. If it holds other rows, first \
         remove the sinks' state as after a TRUNCATE"
    )]
    OtherHistory { stored: SourceId, current: SourceId },
    #[error(
        "Redis lost writes walcast had confirmed: its checkpoint went from {wrote} back to {}, \
         so it restarted empty or from an older snapshot, or failed over to a replica that \
         was behind, while walcast ran. Start walcast again: it finds Redis behind the slot \
         and rebuilds it from the table before streaming",
        found.map_or("none".to_owned(), |p| p.to_string())
    )]
    LostState {
        wrote: Position,
        found: Option<Position>,
    },
    #[error("checkpoint {0:?} stored by the sink is not a walcast position")]
    BadCheckpoint(String),
    /// The destination cannot work as configured; the message says what to change.
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Connect(#[from] crate::pg::ConnectError),
    /// Prints the state error itself, with the hint after it.
    #[error("{state}{}", postgres_hint(&state.source))]
    State { state: crate::state::StateError },
    /// A write took longer than `WALCAST_SINK_WRITE_TIMEOUT` (a hung server, a dead
    /// connection): retried on a fresh connection.
    #[error(
        "the write did not finish within {} (WALCAST_SINK_WRITE_TIMEOUT): the server hangs or \
         the connection is dead; retrying on a new connection",
        humantime::format_duration(*.0)
    )]
    Deadline(std::time::Duration),
    /// A write failed on purpose (see [`fault`]), as a lost connection would.
    #[error("write failed by an injected fault")]
    Injected,
    /// The webhook did not accept a batch within its retry budget, with
    /// `WALCAST_WEBHOOK_ON_FAILURE=block`: retried until it does.
    #[error("webhook: {0}")]
    WebhookBlocked(String),
}

impl From<crate::state::StateError> for SinkError {
    fn from(state: crate::state::StateError) -> Self {
        SinkError::State { state }
    }
}

/// SQLSTATE classes and codes after which the same statement may succeed: connection
/// exceptions, transaction rollbacks (serialization failure, deadlock), insufficient
/// resources, operator intervention (shutdown, crash recovery), lock not available and
/// system errors.
fn is_transient_sqlstate(code: &str) -> bool {
    matches!(&code[..2], "08" | "40" | "53" | "57" | "58") || code == "55P03"
}

/// What an operator can do about a permanent PostgreSQL error.
fn postgres_hint(err: &tokio_postgres::Error) -> &'static str {
    match err.code().map(|c| c.code()) {
        Some("42501") => {
            "; give the role of WALCAST_ANALYTICS_URL schema analytics to own (CREATE SCHEMA \
             analytics AUTHORIZATION <role>, or ALTER SCHEMA analytics OWNER TO <role>; walcast \
             setup --print-sql prints it), or CREATE on the database so walcast creates it"
        }
        Some("42P01" | "42703" | "42P10") => {
            "; the analytics schema is not the one walcast created: restore it, or drop schema \
             analytics so walcast recreates it and run walcast backfill"
        }
        Some(code) if code.starts_with("23") => {
            "; a constraint on the analytics tables rejects walcast's rows: drop it, or fix the \
             analytics schema to be the one walcast created"
        }
        _ => "",
    }
}

impl SinkError {
    /// Whether retrying the same write may succeed (a connection lost, a timeout, a server
    /// loading its data) as opposed to an error that repeats until someone fixes something.
    pub fn is_transient(&self) -> bool {
        match self {
            SinkError::Redis(err) => {
                err.is_io_error()
                    || err.is_timeout()
                    || err.is_connection_dropped()
                    || err.is_connection_refusal()
                    || !matches!(err.retry_method(), ::redis::RetryMethod::NoRetry)
            }
            // No SQLSTATE: the connection broke (I/O, closed, timed out).
            SinkError::Postgres { source, .. }
            | SinkError::State {
                state: StateError { source, .. },
            } => source
                .code()
                .is_none_or(|code| is_transient_sqlstate(code.code())),
            SinkError::Connect(err) => err.is_transient(),
            SinkError::RedisConnect { error, .. } => {
                (error.is_io_error() || error.is_timeout() || error.is_connection_refusal())
                    && !crate::tls::is_certificate_failure(&error.to_string())
            }
            SinkError::WebhookBlocked(_) | SinkError::Deadline(_) | SinkError::Injected => true,
            SinkError::BadCheckpoint(_)
            | SinkError::Unsupported(_)
            | SinkError::OtherHistory { .. }
            | SinkError::LostState { .. } => false,
        }
    }

    /// Whether the sink's server is shutting down or starting up (SQLSTATE 57P01, 57P02,
    /// 57P03). When that server is also the source, PostgreSQL's shutdown waits for the
    /// walsender, which waits for walcast to confirm, which waits for this sink: the
    /// pipeline must let go of the replication connection so the server can stop.
    pub fn is_server_shutdown(&self) -> bool {
        let source = match self {
            SinkError::Postgres { source, .. }
            | SinkError::State {
                state: StateError { source, .. },
            } => source,
            SinkError::Connect(err) => &err.source,
            _ => return false,
        };
        source
            .code()
            .is_some_and(|code| matches!(code.code(), "57P01" | "57P02" | "57P03"))
    }
}

#[cfg(test)]
mod tests {
    use crate::event::Origin;

    #[test]
    fn origins_of_sinks_are_their_names() {
        assert_eq!(Origin::Postgres.as_str(), super::postgres::NAME);
        assert_eq!(Origin::Webhook.as_str(), super::webhook::NAME);
    }
}
