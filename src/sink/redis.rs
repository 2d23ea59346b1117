//! The Redis sink: real-time keys for readers that must see an event within seconds.
//!
//! One batch is one Lua script call, so the whole batch and the checkpoint apply
//! atomically: a crash (of walcast or of the connection) leaves either all of a batch or
//! none of it. Inside the script each event is guarded twice: by the checkpoint (position
//! at or below it: already applied) and by `SET event:{id} NX` (the event key exists:
//! already applied, e.g. by a backfill), so counters never count an event twice.
//!
//! Keys (DESIGN.md, "Redis"):
//!
//! | key | type | written |
//! |---|---|---|
//! | `event:{id}` | string, TTL 24 h | the enriched event JSON |
//! | `content:{content_id}:events` | list, newest first, 100 | event ids |
//! | `events:{event_type}` | stream, MAXLEN ~100000 | field `event` = the JSON |
//! | `top:minute:{YYYYMMDDHHMM}` | sorted set, expires 2 h after its minute | content_id by engagement seconds |
//! | `stats:events` | hash | `total`, `type:{event_type}`, `device:{device}` |
//! | `walcast:checkpoint:redis` | string | last applied position |
//!
//! A NULL `event_type` or `device` is counted under `unknown`. Events without content go
//! to no list or leaderboard. An event whose minute bucket has already expired (older than
//! 2 h) does not touch the leaderboards, so history never inflates "the last N minutes".

use std::time::Duration;

use chrono::{DateTime, Duration as ChronoDuration, DurationRound, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Sink, SinkError};
use crate::event::Batch;
use crate::lsn::Position;

pub const CHECKPOINT_KEY: &str = "walcast:checkpoint:redis";
/// How long `event:{id}` keys live.
pub const EVENT_TTL_SECONDS: u64 = 24 * 3600;
/// How long a minute bucket lives after its minute ends.
pub const BUCKET_RETENTION_SECONDS: i64 = 2 * 3600;
/// Values passed to the script per event.
#[cfg(test)]
const ARGS_PER_EVENT: usize = 9;

/// KEYS[1] = checkpoint key; ARGV[1] = event count; ARGV[2] = the batch's last position
/// (the new checkpoint); then per event: position, id, json, content_id or '', event_type,
/// device, minute bucket or '', bucket expiry (unix seconds), score.
const APPLY_BATCH: &str = r#"
local checkpoint = redis.call('GET', KEYS[1])
local n = tonumber(ARGV[1])
local applied = 0
for i = 0, n - 1 do
  local a = 3 + i * 9
  local pos = ARGV[a]
  if checkpoint == false or pos > checkpoint then
    local id = ARGV[a + 1]
    local json = ARGV[a + 2]
    if redis.call('SET', 'event:' .. id, json, 'EX', 86400, 'NX') then
      local content_id = ARGV[a + 3]
      local event_type = ARGV[a + 4]
      if content_id ~= '' then
        local list = 'content:' .. content_id .. ':events'
        redis.call('LPUSH', list, id)
        redis.call('LTRIM', list, 0, 99)
        local minute = ARGV[a + 6]
        if minute ~= '' then
          local top = 'top:minute:' .. minute
          redis.call('ZINCRBY', top, ARGV[a + 8], content_id)
          redis.call('EXPIREAT', top, ARGV[a + 7])
        end
      end
      redis.call('XADD', 'events:' .. event_type, 'MAXLEN', '~', 100000, '*', 'event', json)
      redis.call('HINCRBY', 'stats:events', 'total', 1)
      redis.call('HINCRBY', 'stats:events', 'type:' .. event_type, 1)
      redis.call('HINCRBY', 'stats:events', 'device:' .. ARGV[a + 5], 1)
      applied = applied + 1
    end
  end
end
if ARGV[2] ~= '' and (checkpoint == false or ARGV[2] > checkpoint) then
  redis.call('SET', KEYS[1], ARGV[2])
end
return applied
"#;

pub struct RedisSink {
    conn: ConnectionManager,
    script: redis::Script,
}

impl RedisSink {
    /// Connects, retrying while Redis is unreachable is the caller's choice: this returns
    /// the first error.
    pub async fn connect(url: &str) -> Result<Self, SinkError> {
        Ok(RedisSink {
            conn: connect(url).await?,
            script: redis::Script::new(APPLY_BATCH),
        })
    }
}

/// A reconnecting, multiplexed connection.
pub async fn connect(url: &str) -> Result<ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_with_config(client, config).await
}

/// `YYYYMMDDHHMM` of the UTC minute `ts` falls in.
pub fn minute_bucket(ts: &DateTime<Utc>) -> String {
    ts.format("%Y%m%d%H%M").to_string()
}

impl Sink for RedisSink {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn checkpoint(&mut self) -> Result<Option<Position>, SinkError> {
        let mut conn = self.conn.clone();
        let stored: Option<String> = redis::cmd("GET")
            .arg(CHECKPOINT_KEY)
            .query_async(&mut conn)
            .await?;
        stored
            .map(|s| Position::from_sortable(&s).ok_or(SinkError::BadCheckpoint(s)))
            .transpose()
    }

    async fn write(&mut self, batches: &[&Batch]) -> Result<(), SinkError> {
        let Some(last) = super::last_position(batches) else {
            return Ok(()); // acknowledgement markers: nothing to write
        };
        let now = Utc::now().timestamp();
        let mut invocation = self.script.key(CHECKPOINT_KEY);
        invocation
            .arg(super::events(batches).count())
            .arg(last.to_sortable());
        for event in super::events(batches) {
            let minute_start = event
                .event_ts
                .duration_trunc(ChronoDuration::minutes(1))
                .unwrap_or(event.event_ts);
            let expires_at = minute_start.timestamp() + 60 + BUCKET_RETENTION_SECONDS;
            let minute = if expires_at > now {
                minute_bucket(&event.event_ts)
            } else {
                String::new()
            };
            invocation
                .arg(event.position.to_sortable())
                .arg(event.id)
                .arg(event.to_json())
                .arg(event.content_id.as_deref().unwrap_or(""))
                .arg(event.event_type.as_deref().unwrap_or("unknown"))
                .arg(event.device.as_deref().unwrap_or("unknown"))
                .arg(minute)
                .arg(expires_at)
                .arg(event.score());
        }
        let mut conn = self.conn.clone();
        let _applied: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }
}

/// `stats:events` field `total`: events applied, 0 before the first.
pub async fn total(conn: &mut ConnectionManager) -> Result<u64, redis::RedisError> {
    let total: Option<u64> = redis::cmd("HGET")
        .arg("stats:events")
        .arg("total")
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
        .map(|back| {
            format!(
                "top:minute:{}",
                minute_bucket(&(now - ChronoDuration::minutes(back)))
            )
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minute_buckets_are_utc_minutes() {
        let ts = DateTime::parse_from_rfc3339("2026-11-21T19:57:59.999+01:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(minute_bucket(&ts), "202611211857");
    }

    #[test]
    fn script_reads_as_many_arguments_per_event_as_write_passes() {
        assert!(APPLY_BATCH.contains(&format!("local a = 3 + i * {ARGS_PER_EVENT}")));
    }
}
