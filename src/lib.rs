//! walcast: PostgreSQL change-data-capture for engagement analytics.
//!
//! ```text
//!  PostgreSQL ──pgoutput──▶ source ──▶ decode ──▶ enrich ──▶ batch ──▶ fan-out ──▶ sinks
//!  (slot walcast,           (pgwire-    (bytes →   (content   (whole      │    ├─ redis
//!   publication walcast_pub) replication) changes)  cache)     txns)       │    └─ postgres ──▶ analytics facts
//!        ▲                                                                 │                          │
//!        └───────────── flush LSN = what every sink confirmed ◀────────────┘      webhook follows ◀───┘
//! ```
//!
//! With the analytics sink enabled the webhook is not in the fan-out: it reads the facts
//! in position order (see [`sink::webhook`]); without it, it is a fan-out sink like the
//! others.
//!
//! - [`source`]: preflight checks, publication and slot, connections.
//! - [`decode`]: pgoutput messages → typed changes (hand-written; see its docs for why).
//! - [`enrich`]: the content cache and the engagement-event transform.
//! - [`pipeline`]: the source loop, batching, fan-out and the one owner of LSN progress.
//! - [`state`]: walcast's own state in the analytics database (checkpoints, cursors, the
//!   webhook outbox, dead letters), and its in-memory twin.
//! - [`sink`]: the `Sink` trait, how a sink is built from its settings, one module per
//!   destination.
//! - [`event`], [`lsn`]: plain data — events, batches, WAL positions.
//! - [`config`], [`error`], [`metrics`], [`health`], [`shutdown`]: settings, how errors read,
//!   metric names, the `/metrics` `/healthz` `/readyz` endpoint, stopping cleanly.
//! - [`backfill`]: existing rows through the same enrichment and sinks.
//! - [`query`]: the read side of Redis (top content, totals).
//! - [`generate`], [`throwaway`], [`demo`]: realistic load; throwaway servers; a throwaway
//!   stack with a live view.
//! - [`verify`], [`status`]: reconcile every sink with the source; where slot and sinks stand.

pub mod config;
pub mod decode;
pub mod demo;
pub mod enrich;
pub mod error;
pub mod event;
pub mod generate;
pub mod health;
pub mod lsn;
pub mod metrics;
pub mod pg;
pub mod pipeline;
pub use pipeline::backfill;
pub mod query;
pub mod retry;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod state;
pub mod status;
pub mod throwaway;
pub mod tls;
pub mod verify;

/// Why a walcast command stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration")]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Setup(#[from] source::SetupError),
    #[error(transparent)]
    Replication(#[from] source::ReplicationError),
    #[error(transparent)]
    Fanout(#[from] pipeline::FanoutError),
    #[error("{context}: {}", crate::pg::detail(source))]
    Postgres {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Connect(#[from] pg::ConnectError),
    #[error("cannot start sink {sink}")]
    SinkStart {
        sink: &'static str,
        #[source]
        source: sink::SinkError,
    },
    #[error("metrics endpoint at WALCAST_METRICS_ADDR: {0}")]
    Metrics(String),
    #[error(transparent)]
    Backfill(#[from] backfill::BackfillError),
    #[error(
        "a pgoutput message at {lsn} ({kind}, {len} bytes) could not be decoded: {error}. \
         walcast stops rather than acknowledge past it (the slot still holds it, nothing is \
         lost); it is a walcast bug or a server feature it does not know: report it with this \
         line and the server version"
    )]
    Undecodable {
        lsn: lsn::Lsn,
        kind: String,
        len: usize,
        error: decode::DecodeError,
    },
    #[error(
        "engagement_events was truncated (in the transaction committing at {commit_lsn}). Its \
         ids may start again at 1 (TRUNCATE … RESTART IDENTITY) while every sink still holds \
         the events it had under those ids, so walcast stops here rather than drop the new \
         rows as already applied or mix them with the old ones; nothing after this point is \
         acknowledged. To start over from the table as it is now: walcast teardown; remove \
         the sinks' state (DROP SCHEMA analytics CASCADE on the analytics database, and on \
         Redis the event:*, content:*, events:*, top:minute:*, stats:events and walcast:* \
         keys, or FLUSHDB on a database walcast has to itself); then walcast backfill and \
         walcast run"
    )]
    EventsTruncated { commit_lsn: lsn::Lsn },
    #[error(
        "the transaction committing at {commit_lsn} has more changes than positions fit in \
         (seq is stored as a 31-bit INTEGER, shared by {partitions} partitions): walcast stops rather than give \
         two events one position; run with fewer WALCAST_PARTITIONS"
    )]
    PositionsExhausted {
        commit_lsn: lsn::Lsn,
        partitions: u32,
    },
}
