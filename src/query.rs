//! The read side of the real-time tier: what `walcast top`, `walcast verify` and the demo
//! read from Redis, the same reads a consumer of its keys makes. The key names are the
//! sink's ([`crate::sink::redis::keys`]).

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use redis::aio::ConnectionManager;

use crate::sink::redis::{keys, minute_bucket};

/// `stats:events` field `total`: events applied, 0 before the first.
pub async fn total(conn: &mut ConnectionManager) -> Result<u64, redis::RedisError> {
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
/// one `now` falls in: `ZUNION N top:minute:… WITHSCORES`, best first.
pub async fn top(
    conn: &mut ConnectionManager,
    minutes: u32,
    limit: usize,
    now: DateTime<Utc>,
) -> Result<Vec<TopEntry>, redis::RedisError> {
    let keys: Vec<String> = (0..i64::from(minutes.max(1)))
        .map(|back| keys::top_minute(&minute_bucket(&(now - ChronoDuration::minutes(back)))))
        .collect();
    let scored: Vec<(String, f64)> = redis::cmd("ZUNION")
        .arg(keys.len())
        .arg(&keys)
        .arg("WITHSCORES")
        .query_async(conn)
        .await?;
    let mut entries: Vec<TopEntry> = scored
        .into_iter()
        .map(|(content_id, engagement_seconds)| TopEntry {
            content_id,
            engagement_seconds,
        })
        .collect();
    // ZUNION returns ascending scores; ties broken by id so the output is stable.
    entries.sort_by(|a, b| {
        b.engagement_seconds
            .total_cmp(&a.engagement_seconds)
            .then_with(|| a.content_id.cmp(&b.content_id))
    });
    entries.truncate(limit);
    Ok(entries)
}
