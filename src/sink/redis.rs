//! The Redis sink: real-time keys for readers that must see an event within seconds.
//!
//! One batch is one Lua script call, so the whole batch and the checkpoint apply
//! atomically: a crash (of walcast or of the connection) leaves either all of a batch or
//! none of it. Inside the script each event is guarded twice: by the checkpoint (position
//! at or below it: already applied) and by its bit in `walcast:ids:{n}` (set: already
//! applied, e.g. by a backfill or by the stream before a backfill), so counters never count
//! an event twice, however old it is.
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
//! | `walcast:ids:{n}` | bitmap | bit `id mod 2^23` of shard `n = id div 2^23`: the event was applied (1 MiB per 8,388,608 ids) |
//! | `walcast:backfill:{job}` | string | resume cursor of an unfinished backfill: the highest id applied |
//!
//! A NULL `event_type` or `device` is counted under `unknown`. Events without content go
//! to no list or leaderboard. An event whose minute bucket has already expired (older than
//! 2 h) does not touch the leaderboards, so history never inflates "the last N minutes".
//! A backfilled event older than that retention also joins no recent-events list and no
//! stream: those are for what is happening now. It is counted in `stats:events` and
//! stored under `event:{id}` like any other.

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
/// The prefix of the backfill cursor keys.
pub const BACKFILL_KEY_PREFIX: &str = "walcast:backfill:";
/// Ids per `walcast:ids:{n}` bitmap: 2^23, 1 MiB each.
const IDS_PER_SHARD: i64 = 1 << 23;
/// Values passed to the script per event.
#[cfg(test)]
const ARGS_PER_EVENT: usize = 12;

/// KEYS[1] = the checkpoint key (mode `stream`) or the backfill's cursor key (mode
/// `backfill`); ARGV[1] = event count; ARGV[2] = mode; ARGV[3] = the new checkpoint, or
/// the new cursor ('' when the backfill finished: the cursor is removed); then per event:
/// position, id, ids bitmap key, bit offset, json, content_id or '', event_type, device,
/// minute bucket or '', bucket expiry (unix seconds), score in hundredths of a second, '1'
/// when it joins the recent lists and streams.
///
/// Per event it sets the id's bit and `event:{id}`, and appends to the stream; counters,
/// leaderboard scores and recent lists are summed up over the batch and written once per
/// key at the end (a `redis.call` costs about as much as the work it does, so this is what
/// makes a batch cheap), with the same result as writing them event by event.
const APPLY_BATCH: &str = r#"
local stream = ARGV[2] == 'stream'
local checkpoint = false
if stream then
  checkpoint = redis.call('GET', KEYS[1])
end
local n = tonumber(ARGV[1])
local applied = 0
local counts, count_fields = {}, {}
local scores, score_keys, expiries = {}, {}, {}
local lists, list_keys = {}, {}
local function count(field)
  if counts[field] == nil then
    counts[field] = 0
    count_fields[#count_fields + 1] = field
  end
  counts[field] = counts[field] + 1
end
for i = 0, n - 1 do
  local a = 4 + i * 12
  local pos = ARGV[a]
  if not stream or checkpoint == false or pos > checkpoint then
    if redis.call('SETBIT', ARGV[a + 2], ARGV[a + 3], 1) == 0 then
      local id = ARGV[a + 1]
      local json = ARGV[a + 4]
      local content_id = ARGV[a + 5]
      local event_type = ARGV[a + 6]
      local recent = ARGV[a + 11] == '1'
      redis.call('SET', 'event:' .. id, json, 'EX', 86400)
      if content_id ~= '' then
        if recent then
          local list = 'content:' .. content_id .. ':events'
          if lists[list] == nil then
            lists[list] = {}
            list_keys[#list_keys + 1] = list
          end
          local ids = lists[list]
          ids[#ids + 1] = id
        end
        local minute = ARGV[a + 8]
        if minute ~= '' then
          local top = 'top:minute:' .. minute
          if scores[top] == nil then
            scores[top] = {}
            score_keys[#score_keys + 1] = top
            expiries[top] = ARGV[a + 9]
          end
          local by_content = scores[top]
          by_content[content_id] = (by_content[content_id] or 0) + tonumber(ARGV[a + 10])
        end
      end
      if recent then
        redis.call('XADD', 'events:' .. event_type, 'MAXLEN', '~', 100000, '*', 'event', json)
      end
      count('total')
      count('type:' .. event_type)
      count('device:' .. ARGV[a + 7])
      applied = applied + 1
    end
  end
end
for _, field in ipairs(count_fields) do
  redis.call('HINCRBY', 'stats:events', field, counts[field])
end
for _, top in ipairs(score_keys) do
  for content_id, hundredths in pairs(scores[top]) do
    redis.call('ZINCRBY', top, string.format('%.2f', hundredths / 100), content_id)
  end
  redis.call('EXPIREAT', top, expiries[top])
end
for _, list in ipairs(list_keys) do
  -- Only the newest 100 survive the trim; push them oldest first.
  local ids = lists[list]
  local from = math.max(1, #ids - 99)
  redis.call('LPUSH', list, unpack(ids, from, #ids))
  redis.call('LTRIM', list, 0, 99)
end
if stream then
  if ARGV[3] ~= '' and (checkpoint == false or ARGV[3] > checkpoint) then
    redis.call('SET', KEYS[1], ARGV[3])
  end
elseif ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[3])
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
        let now = Utc::now().timestamp();
        let backfill = super::backfill_mark(batches);
        let last = super::last_position(batches);
        let (key, mode, mark) = match backfill {
            Some(mark) => (
                format!("{BACKFILL_KEY_PREFIX}{}", mark.job),
                "backfill",
                mark.cursor.map_or(String::new(), |id| id.to_string()),
            ),
            // Acknowledgement markers only: nothing to write.
            None if last.is_none() => return Ok(()),
            None => (
                CHECKPOINT_KEY.to_owned(),
                "stream",
                last.map_or(String::new(), |p| p.to_sortable()),
            ),
        };
        let mut invocation = self.script.key(key);
        invocation
            .arg(super::events(batches).count())
            .arg(mode)
            .arg(mark);
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
            // Streamed events are news whatever their event time; backfilled ones only
            // while their minute is still kept.
            let recent = backfill.is_none() || expires_at > now;
            invocation
                .arg(event.position.to_sortable())
                .arg(event.id)
                .arg(format!(
                    "walcast:ids:{}",
                    event.id.div_euclid(IDS_PER_SHARD)
                ))
                .arg(event.id.rem_euclid(IDS_PER_SHARD))
                .arg(event.to_json())
                .arg(event.content_id.as_deref().unwrap_or(""))
                .arg(event.event_type.as_deref().unwrap_or("unknown"))
                .arg(event.device.as_deref().unwrap_or("unknown"))
                .arg(minute)
                .arg(expires_at)
                .arg(event.score().0)
                .arg(if recent { "1" } else { "" });
        }
        let mut conn = self.conn.clone();
        let _applied: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }

    async fn backfill_cursor(&mut self, job: &str) -> Result<Option<i64>, SinkError> {
        let mut conn = self.conn.clone();
        let stored: Option<String> = redis::cmd("GET")
            .arg(format!("{BACKFILL_KEY_PREFIX}{job}"))
            .query_async(&mut conn)
            .await?;
        stored
            .map(|s| s.parse().map_err(|_| SinkError::BadCheckpoint(s)))
            .transpose()
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
        assert!(APPLY_BATCH.contains(&format!("local a = 4 + i * {ARGS_PER_EVENT}")));
    }
}
