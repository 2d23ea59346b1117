//! From configuration to a sink, in one place.
//!
//! Every command that writes to sinks goes the same way, in the spirit of Vector's
//! config → build → healthcheck → run:
//!
//! 1. [`build`]: the sink from its settings, with no I/O, so a bad setting fails at once;
//! 2. [`Sink::healthcheck`]: the probe `/readyz` runs on the sink's server, started
//!    before anything waits for that server, so an outage shows while walcast waits;
//! 3. [`Sink::open`]: connect, migrate, prove it ready (retried while transient);
//! 4. the fan-out feeds it (`pipeline::Sinks::add`).
//!
//! Adding a sink means a [`SinkKind`], its module, and one arm here.

use crate::config::{ConfigError, Destinations, RedisTarget, SinkKind, SourceArgs};
use crate::event::Batch;
use crate::health::Probe;
use crate::lsn::{Position, SourceId};

use super::postgres::PostgresSink;
use super::redis::RedisSink;
use super::redis_cluster::RedisClusterSink;
use super::webhook::WebhookSink;
use super::{Sink, SinkError};

/// One of walcast's sinks. Made once per sink and command, so their sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum AnySink {
    Redis(RedisSink),
    RedisCluster(RedisClusterSink),
    Postgres(PostgresSink),
    Webhook(WebhookSink),
}

/// Builds the sink of `kind` from its settings; connects to nothing.
pub fn build(
    kind: SinkKind,
    to: &Destinations,
    source: &SourceArgs,
) -> Result<AnySink, BuildError> {
    let partition = source.partition();
    let analytics = || to.analytics.pg_config(&source.url);
    Ok(match kind {
        SinkKind::Redis => match to.redis.target()? {
            RedisTarget::Single(client) => {
                AnySink::Redis(RedisSink::new(client).for_partition(partition))
            }
            RedisTarget::Cluster(client) => {
                AnySink::RedisCluster(RedisClusterSink::new(client).for_partition(partition))
            }
        },
        SinkKind::Postgres => {
            AnySink::Postgres(PostgresSink::new(analytics()?).for_partition(partition))
        }
        SinkKind::Webhook => {
            let mut sink = WebhookSink::new(&to.webhook, analytics()?)?.for_partition(partition);
            // With the analytics sink configured, `walcast run` feeds the webhook from the
            // facts: a backfill then leaves out what the stream brought there.
            sink.skip_streamed = to.sinks.contains(SinkKind::Postgres);
            AnySink::Webhook(sink)
        }
    })
}

/// A sink that cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// Calls `$call` on whichever sink `$any` holds.
macro_rules! each {
    ($any:expr, $sink:ident => $call:expr) => {
        match $any {
            AnySink::Redis($sink) => $call,
            AnySink::RedisCluster($sink) => $call,
            AnySink::Postgres($sink) => $call,
            AnySink::Webhook($sink) => $call,
        }
    };
}

impl Sink for AnySink {
    fn name(&self) -> &'static str {
        each!(self, sink => sink.name())
    }

    async fn open(&mut self) -> Result<(), SinkError> {
        each!(self, sink => sink.open().await)
    }

    fn healthcheck(&self) -> Probe {
        each!(self, sink => sink.healthcheck())
    }

    fn linger(&self) -> std::time::Duration {
        each!(self, sink => sink.linger())
    }

    fn has_write_deadline(&self) -> bool {
        each!(self, sink => sink.has_write_deadline())
    }

    fn reset(&mut self) {
        each!(self, sink => sink.reset())
    }

    async fn claim_history(&mut self, current: SourceId) -> Result<(), SinkError> {
        each!(self, sink => sink.claim_history(current).await)
    }

    async fn checkpoint(&mut self) -> Result<Option<Position>, SinkError> {
        each!(self, sink => sink.checkpoint().await)
    }

    fn lost_writes(&self) -> Option<Position> {
        each!(self, sink => sink.lost_writes())
    }

    async fn write(&mut self, batches: &[&Batch]) -> Result<(), SinkError> {
        each!(self, sink => sink.write(batches).await)
    }

    async fn backfill_cursor(&mut self, job: &str) -> Result<Option<i64>, SinkError> {
        each!(self, sink => sink.backfill_cursor(job).await)
    }
}
