//! walcast: PostgreSQL change-data-capture for engagement analytics.
//!
//! ```text
//!  PostgreSQL ──pgoutput──▶ source ──▶ decode ──▶ enrich ──▶ batch ──▶ fan-out ──▶ sinks
//!  (slot walcast,           (pgwire-    (bytes →   (content   (whole      │    ├─ redis
//!   publication walcast_pub) replication) changes)  cache)     txns)       │    └─ …
//!        ▲                                                                 │
//!        └───────────── flush LSN = what every sink confirmed ◀────────────┘
//! ```
//!
//! - [`source`]: preflight checks, publication and slot, connections.
//! - [`decode`]: pgoutput messages → typed changes (hand-written; see its docs for why).
//! - [`enrich`]: the content cache and the engagement-event transform.
//! - [`pipeline`]: the source loop, batching, fan-out and the one owner of LSN progress.
//! - [`sink`]: the `Sink` trait and one module per destination.
//! - [`event`], [`lsn`]: plain data — events, batches, WAL positions.
//! - [`config`], [`metrics`], [`health`], [`shutdown`]: settings, metric names, the
//!   `/metrics` `/healthz` `/readyz` endpoint, stopping cleanly.
//! - [`backfill`]: existing rows through the same enrichment and sinks.
//! - [`generate`], [`demo`]: realistic load; a throwaway stack with a live view.
//! - [`verify`], [`status`]: reconcile every sink with the source; where slot and sinks stand.

pub mod backfill;
pub mod config;
pub mod decode;
pub mod demo;
pub mod enrich;
pub mod event;
pub mod generate;
pub mod health;
pub mod lsn;
pub mod metrics;
pub mod pg;
pub mod pipeline;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod status;
pub mod verify;

/// Why a walcast command stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
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
    #[error("cannot start sink {sink}: {source}")]
    SinkStart {
        sink: &'static str,
        #[source]
        source: sink::SinkError,
    },
    #[error("metrics endpoint at WALCAST_METRICS_ADDR: {0}")]
    Metrics(String),
    #[error(transparent)]
    Backfill(#[from] backfill::BackfillError),
}
