//! The read side of the real-time tier: what `walcast top`, `walcast verify` and the demo
//! read from Redis, the same reads a consumer of its keys makes. The key names are the
//! sink's ([`crate::sink::redis::keys`]).

use std::collections::HashMap;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use redis::aio::ConnectionLike;

use crate::sink::redis::{keys, minute_bucket};

/// `stats:events` field `total`: events applied, 0 before the first.
pub async fn total(conn: &mut (impl ConnectionLike + Send)) -> Result<u64, redis::RedisError> {
    let total: Option<u64> = redis::cmd("HGET")
        .arg(keys::STATS)
        .arg(keys::TOTAL_FIELD)
        .query_async(conn)
        .await?;
    Ok(total.unwrap_or(0))
}

/// One line of `walcast top`.
#[derive(Debug, Clone, PartialEq)]
pub struct TopEntry {
    pub content_id: String,
    pub engagement_seconds: f64,
}

/// Top content by engagement seconds over the `minutes` minute buckets ending with the
/// one `now` falls in, best first. Each bucket is read on its own and the scores summed
/// here, as `ZUNION` would: on a Redis Cluster the buckets are in different slots.
pub async fn top(
    conn: &mut (impl ConnectionLike + Send),
    minutes: u32,
    limit: usize,
    now: DateTime<Utc>,
) -> Result<Vec<TopEntry>, redis::RedisError> {
    let mut sums: HashMap<String, f64> = HashMap::new();
    for back in 0..i64::from(minutes.max(1)) {
        let key = keys::top_minute(&minute_bucket(&(now - ChronoDuration::minutes(back))));
        let scored: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(conn)
            .await?;
        for (content_id, seconds) in scored {
            *sums.entry(content_id).or_default() += seconds;
        }
    }
    let mut entries: Vec<TopEntry> = sums
        .into_iter()
        .map(|(content_id, engagement_seconds)| TopEntry {
            content_id,
            engagement_seconds,
        })
        .collect();
    // Ties broken by id so the output is stable.
    entries.sort_by(|a, b| {
        b.engagement_seconds
            .total_cmp(&a.engagement_seconds)
            .then_with(|| a.content_id.cmp(&b.content_id))
    });
    entries.truncate(limit);
    Ok(entries)
}

/// A connection to the configured Redis, one server or a cluster, for the read side.
pub enum Connection {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Connection {
    pub async fn open(
        target: crate::config::RedisTarget,
    ) -> Result<Connection, crate::sink::SinkError> {
        match target {
            crate::config::RedisTarget::Single(client) => crate::sink::redis::connect(client)
                .await
                .map(Connection::Single),
            crate::config::RedisTarget::Cluster(client) => client
                .get_async_connection()
                .await
                .map(Connection::Cluster)
                .map_err(|error| crate::sink::SinkError::RedisConnect {
                    endpoint: "WALCAST_REDIS_CLUSTER".to_owned(),
                    error,
                }),
        }
    }
}

// By hand: the redis crate has no connection type that is either kind.
impl ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(conn) => conn.req_packed_command(cmd),
            Connection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(conn) => conn.get_db(),
            Connection::Cluster(conn) => conn.get_db(),
        }
    }
}
