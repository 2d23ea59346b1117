//! The Redis sink: real-time keys for readers that must see an event within seconds.
//!
//! Each write applies its events and the checkpoint atomically: a crash (of walcast or of
//! the connection) leaves either all of a write or none of it. Each event is guarded twice:
//! by the checkpoint (position at or below it: already applied) and by its bit in
//! `walcast:ids:{n}` (set: already applied, e.g. by a backfill or by the stream before a
//! backfill), so counters never count an event twice, however old it is.
//!
//! A write takes two round trips of plain commands per 500 events, optimistic like any
//! compare-and-set: `WATCH` the id bitmaps (and the stream's checkpoint) and read them,
//! then apply the events the guards let through, with the checkpoint or the backfill's
//! cursor, in one `MULTI`/`EXEC`, which Redis refuses if a watched key changed in between
//! (the stream and a backfill writing at the same time). In the e2e benchmark's drain,
//! redis-server spent 16 µs per event on these commands against 21 µs for the same work
//! done by a Lua script, whose every `redis.call` costs about as much again as the command
//! itself. After a few refusals in a row the script applies the write: it needs no watch,
//! so no writer can starve another.
//!
//! Keys (the README's "Redis keys"):
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

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Datelike, Duration as ChronoDuration, DurationRound, Timelike, Utc};
use redis::AsyncConnectionConfig;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};

use super::{Progress, Sink, SinkError};
use crate::event::{Batch, EnrichedEvent, Hundredths, key_part};
use crate::health::Probe;
use crate::lsn::{Position, SourceId};

/// The stream's checkpoint; partition i of a partitioned source keeps its own under
/// `walcast:checkpoint:redis:<i>` ([`checkpoint_key`]).
pub const CHECKPOINT_KEY: &str = "walcast:checkpoint:redis";

/// Where `partition` keeps its checkpoint.
pub fn checkpoint_key(partition: crate::config::Partition) -> String {
    partition.state_name(CHECKPOINT_KEY)
}

/// The sink's name in logs and metric labels.
pub const NAME: &str = crate::config::SinkKind::Redis.name();
/// How long `event:{id}` keys live.
pub const EVENT_TTL_SECONDS: u64 = 24 * 3600;
/// How long a minute bucket lives after its minute ends.
pub const BUCKET_RETENTION_SECONDS: i64 = 2 * 3600;
/// The prefix of the backfill cursor keys.
pub const BACKFILL_KEY_PREFIX: &str = "walcast:backfill:";
/// `MAXLEN ~` of the `events:{event_type}` streams.
pub(super) const STREAM_MAXLEN: u64 = 100_000;
/// Length of the `content:{content_id}:events` lists.
pub(super) const LIST_LENGTH: usize = 100;
/// Ids per `walcast:ids:{n}` bitmap: 2^23, 1 MiB each.
const IDS_PER_SHARD: i64 = 1 << 23;
/// Values passed to the script per event.
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
///
/// The `@NAME@` placeholders are the same constants the MULTI/EXEC path uses, filled in by
/// [`apply_batch_script`], so the two ways of writing cannot drift apart.
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
  local a = 4 + i * @ARGS_PER_EVENT@
  local pos = ARGV[a]
  if not stream or checkpoint == false or pos > checkpoint then
    if redis.call('SETBIT', ARGV[a + 2], ARGV[a + 3], 1) == 0 then
      local id = ARGV[a + 1]
      local json = ARGV[a + 4]
      local content_id = ARGV[a + 5]
      local event_type = ARGV[a + 6]
      local recent = ARGV[a + 11] == '1'
      redis.call('SET', '@EVENT_PREFIX@' .. id, json, 'EX', @EVENT_TTL_SECONDS@)
      if content_id ~= '' then
        if recent then
          local list = '@CONTENT_PREFIX@' .. content_id .. '@CONTENT_SUFFIX@'
          if lists[list] == nil then
            lists[list] = {}
            list_keys[#list_keys + 1] = list
          end
          local ids = lists[list]
          ids[#ids + 1] = id
        end
        local minute = ARGV[a + 8]
        if minute ~= '' then
          local top = '@TOP_MINUTE_PREFIX@' .. minute
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
        redis.call('XADD', '@STREAM_PREFIX@' .. event_type, 'MAXLEN', '~', @STREAM_MAXLEN@, '*', 'event', json)
      end
      count('@TOTAL_FIELD@')
      count('@TYPE_FIELD_PREFIX@' .. event_type)
      count('@DEVICE_FIELD_PREFIX@' .. ARGV[a + 7])
      applied = applied + 1
    end
  end
end
for _, field in ipairs(count_fields) do
  redis.call('HINCRBY', '@STATS@', field, counts[field])
end
for _, top in ipairs(score_keys) do
  for content_id, hundredths in pairs(scores[top]) do
    redis.call('ZINCRBY', top, string.format('%.2f', hundredths / 100), content_id)
  end
  redis.call('EXPIREAT', top, expiries[top])
end
for _, list in ipairs(list_keys) do
  -- Only the newest @LIST_LENGTH@ survive the trim; push them oldest first.
  local ids = lists[list]
  local from = math.max(1, #ids - @LIST_LAST@)
  redis.call('LPUSH', list, unpack(ids, from, #ids))
  redis.call('LTRIM', list, 0, @LIST_LAST@)
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
    client: redis::Client,
    /// The sink's own connection, and not a [`ConnectionManager`]: a `WATCH` lives on the
    /// server's side of one connection, and a silent reconnect between it and `EXEC` would
    /// drop the guard. A write that fails drops the connection; the next one reconnects.
    conn: Option<MultiplexedConnection>,
    script: redis::Script,
    /// How often a chunk is tried with `WATCH` before the script applies it.
    watch_attempts: usize,
    /// `|<system id>/<timeline>` of the source, appended to every checkpoint written; empty
    /// until [`Sink::set_source`].
    source_suffix: String,
    /// Where this partition's checkpoint is kept ([`checkpoint_key`]).
    checkpoint_key: String,
    /// The last checkpoint this process wrote. Finding a lower one (or none) in Redis
    /// later means Redis lost confirmed writes while walcast ran.
    written: Option<Position>,
}

/// The stored checkpoint `LLLLLLLLLLLLLLLL:SSSSSSSS[|<system id>/<timeline>]`: a fixed-width
/// position first, so checkpoints still compare as strings, then the WAL history it
/// belongs to.
pub(super) fn parse_checkpoint(stored: &str) -> Result<(Position, Option<SourceId>), SinkError> {
    let position = Position::from_sortable(stored)
        .ok_or_else(|| SinkError::BadCheckpoint(stored.to_owned()))?;
    let source = stored
        .split_once('|')
        .and_then(|(_, source)| SourceId::from_stored(source));
    Ok((position, source))
}

/// The suffix every checkpoint of `current`'s history carries, once the `stored` checkpoint
/// proved to belong to it (or there is none).
pub(super) fn claim(stored: Option<String>, current: SourceId) -> Result<String, SinkError> {
    if let Some((_, Some(stored))) = stored.map(|s| parse_checkpoint(&s)).transpose()?
        && stored != current
    {
        return Err(SinkError::OtherHistory { stored, current });
    }
    Ok(format!("|{}", current.stored()))
}

/// A stored backfill cursor.
pub(super) fn parse_cursor(stored: Option<String>) -> Result<Option<i64>, SinkError> {
    stored
        .map(|s| s.parse().map_err(|_| SinkError::BadCheckpoint(s)))
        .transpose()
}

/// Events per `MULTI`/`EXEC`. Redis runs a transaction start to end, keeping every reader
/// waiting meanwhile: 500 events take it a few milliseconds. It also bounds the memory a
/// write holds encoded.
pub(super) const CHUNK_EVENTS: usize = 500;

/// How often a chunk is tried with `WATCH` before the script applies it.
const WATCH_ATTEMPTS: usize = 3;

impl RedisSink {
    /// The sink, not yet connected (see [`Sink::open`]).
    pub fn new(client: redis::Client) -> Self {
        RedisSink {
            client,
            conn: None,
            script: redis::Script::new(&apply_batch_script()),
            watch_attempts: WATCH_ATTEMPTS,
            source_suffix: String::new(),
            checkpoint_key: CHECKPOINT_KEY.to_owned(),
            written: None,
        }
    }

    /// The sink of one partition of the source: its own checkpoint key.
    pub fn for_partition(mut self, partition: crate::config::Partition) -> Self {
        self.checkpoint_key = checkpoint_key(partition);
        self
    }

    /// Connects, retrying while Redis is unreachable is the caller's choice: this returns
    /// the first error.
    pub async fn connect(client: redis::Client) -> Result<Self, SinkError> {
        let mut sink = Self::new(client);
        sink.open().await?;
        Ok(sink)
    }

    /// Applies every write with the script rather than `WATCH` and `MULTI`/`EXEC` (the two
    /// must leave Redis the same: the differential test compares them).
    pub fn script_only(mut self) -> Self {
        self.watch_attempts = 0;
        self
    }

    async fn conn(&mut self) -> Result<&mut MultiplexedConnection, redis::RedisError> {
        if self.conn.is_none() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(Duration::from_secs(30)));
            let conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// `GET key`; a failure drops the connection, as a failed write does.
    async fn get(&mut self, key: &str) -> Result<Option<String>, redis::RedisError> {
        let result = redis::cmd("GET")
            .arg(key)
            .query_async(self.conn().await?)
            .await;
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    async fn apply(&mut self, batches: &[&Batch]) -> Result<(), SinkError> {
        let now = Utc::now().timestamp();
        let progress = Progress::of(batches);
        if progress == Progress::Nothing {
            return Ok(());
        }
        let planned: Vec<Planned> = super::events(batches)
            .map(|event| Planned::new(event, now, progress.is_backfill()))
            .collect();
        self.apply_chunks(&planned, progress).await
    }

    /// The events in chunks of [`CHUNK_EVENTS`], each applied with the progress at its last
    /// event (the checkpoint at its position, a backfill's cursor at its id: backfills read
    /// in id order), the last one with `progress`: a crash between chunks leaves progress
    /// that a replay or a resumed backfill starts after.
    async fn apply_chunks(
        &mut self,
        planned: &[Planned<'_>],
        progress: Progress<'_>,
    ) -> Result<(), SinkError> {
        let mut chunks = planned.chunks(CHUNK_EVENTS).peekable();
        if chunks.peek().is_none() {
            // Dead letters only, or a finished backfill: the progress still moves.
            return self.apply_chunk(&[], progress).await;
        }
        while let Some(chunk) = chunks.next() {
            let last = chunk.last().expect("chunks are not empty").event;
            let upto = match chunks.peek() {
                None => progress,
                Some(_) => progress.at(last),
            };
            self.apply_chunk(chunk, upto).await?;
        }
        Ok(())
    }

    /// `WATCH` and read the guards, then `MULTI`/`EXEC` what they let through; the script
    /// when a concurrent writer keeps changing the watched keys.
    async fn apply_chunk(
        &mut self,
        planned: &[Planned<'_>],
        progress: Progress<'_>,
    ) -> Result<(), SinkError> {
        let stream = matches!(progress, Progress::Stream(_));
        // Events by id bitmap, each with its bit's offset.
        let mut shards: BTreeMap<i64, Vec<(usize, i64)>> = BTreeMap::new();
        for (i, p) in planned.iter().enumerate() {
            let id = p.event.id;
            shards
                .entry(id.div_euclid(IDS_PER_SHARD))
                .or_default()
                .push((i, id.rem_euclid(IDS_PER_SHARD)));
        }
        // The keys the guards read: a backfill's own cursor is no guard.
        let mut watched: Vec<String> = shards.keys().map(|shard| ids_key(*shard)).collect();
        if stream {
            watched.push(self.checkpoint_key.clone());
        }
        for _ in 0..self.watch_attempts {
            let mut read = redis::pipe();
            if !watched.is_empty() {
                read.cmd("WATCH").arg(&watched).ignore();
            }
            if stream {
                read.cmd("GET").arg(&self.checkpoint_key);
            }
            for (shard, members) in &shards {
                read.cmd("BITFIELD_RO").arg(ids_key(*shard));
                for (_, offset) in members {
                    read.arg("GET").arg("u1").arg(*offset);
                }
            }
            let mut bits: Vec<redis::Value> = if watched.is_empty() {
                Vec::new()
            } else {
                read.query_async(self.conn().await?).await?
            };
            let checkpoint = if stream {
                let stored: Option<String> =
                    redis::from_redis_value(bits.remove(0)).map_err(redis::RedisError::from)?;
                stored
                    .map(|s| Position::from_sortable(&s).ok_or(SinkError::BadCheckpoint(s)))
                    .transpose()?
            } else {
                None
            };
            // Backfills do not read the stream's checkpoint.
            if stream
                && let Some(written) = self.written
                && checkpoint.is_none_or(|c| c < written)
            {
                return Err(SinkError::LostState {
                    wrote: written,
                    found: checkpoint,
                });
            }
            let mut applied = vec![false; planned.len()];
            for ((_, members), bits) in shards.iter().zip(bits) {
                let bits: Vec<i64> =
                    redis::from_redis_value(bits).map_err(redis::RedisError::from)?;
                for ((i, _), bit) in members.iter().zip(bits) {
                    applied[*i] = bit != 0;
                }
            }
            let mut seen = HashSet::new();
            let fresh: Vec<&Planned> = planned
                .iter()
                .zip(applied)
                .filter(|(p, applied)| {
                    !applied
                        && checkpoint.is_none_or(|c| p.event.position > c)
                        && seen.insert(p.event.id)
                })
                .map(|(p, _)| p)
                .collect();
            let record = match progress {
                Progress::Stream(upto) if checkpoint.is_some_and(|c| upto <= c) => None,
                other => Some(other),
            };
            let write = transaction(&fresh, record, &self.checkpoint_key, &self.source_suffix);
            // `None`: EXEC refused, a watched key changed since it was read.
            let done: Option<Vec<redis::Value>> = write.query_async(self.conn().await?).await?;
            if done.is_some() {
                if let Some(Progress::Stream(upto)) = record {
                    self.written = self.written.max(Some(upto));
                }
                return Ok(());
            }
            tracing::debug!("a concurrent write changed the redis guards; trying again");
        }
        let (key, mode, mark) = match progress {
            Progress::Nothing => return Ok(()),
            Progress::Stream(upto) => (
                self.checkpoint_key.clone(),
                "stream",
                format!("{}{}", upto.to_sortable(), self.source_suffix),
            ),
            Progress::Backfill { job, cursor } => (
                backfill_key(job),
                "backfill",
                cursor.map_or(String::new(), |id| id.to_string()),
            ),
        };
        self.run_script(planned, key, mode, mark).await
    }

    /// One call of the batch script (see [`APPLY_BATCH`]).
    async fn run_script(
        &mut self,
        planned: &[Planned<'_>],
        key: String,
        mode: &str,
        mark: String,
    ) -> Result<(), SinkError> {
        let mut conn = self.conn().await?.clone();
        let mut invocation = self.script.key(key);
        invocation.arg(planned.len()).arg(mode).arg(mark);
        for p in planned {
            let event = p.event;
            invocation
                .arg(event.position.to_sortable())
                .arg(event.id)
                .arg(ids_key(event.id.div_euclid(IDS_PER_SHARD)))
                .arg(event.id.rem_euclid(IDS_PER_SHARD))
                .arg(event.to_json())
                .arg(event.content_id.as_deref().unwrap_or(""))
                .arg(p.event_type())
                .arg(p.device())
                .arg(p.minute.as_deref().unwrap_or(""))
                .arg(p.expires_at)
                .arg(event.score().0)
                .arg(if p.recent { "1" } else { "" });
        }
        let _applied: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }
}

/// The key names consumers read, in one place: the MULTI/EXEC path, the script (through
/// its placeholders) and the read side (src/query.rs) all take them from here.
pub mod keys {
    /// `event:{id}`: the event's JSON.
    pub const EVENT_PREFIX: &str = "event:";
    /// `content:{content_id}:events`: the content's newest event ids.
    pub const CONTENT_PREFIX: &str = "content:";
    pub const CONTENT_SUFFIX: &str = ":events";
    /// `events:{event_type}`: the stream of recent events of a type.
    pub const STREAM_PREFIX: &str = "events:";
    /// `top:minute:{YYYYMMDDHHMM}`: content by engagement seconds in that minute.
    pub const TOP_MINUTE_PREFIX: &str = "top:minute:";
    /// Counters: `total`, `type:{event_type}`, `device:{device}`.
    pub const STATS: &str = "stats:events";
    /// The `stats:events` field of all events.
    pub const TOTAL_FIELD: &str = "total";
    /// `stats:events` fields `type:{event_type}` and `device:{device}`.
    pub const TYPE_FIELD_PREFIX: &str = "type:";
    pub const DEVICE_FIELD_PREFIX: &str = "device:";

    pub fn event(id: i64) -> String {
        format!("{EVENT_PREFIX}{id}")
    }

    pub fn content_events(content_id: &str) -> String {
        format!("{CONTENT_PREFIX}{content_id}{CONTENT_SUFFIX}")
    }

    pub fn stream(event_type: &str) -> String {
        format!("{STREAM_PREFIX}{event_type}")
    }

    /// The bucket of minute `bucket` (`YYYYMMDDHHMM`, see [`super::minute_bucket`]).
    pub fn top_minute(bucket: &str) -> String {
        format!("{TOP_MINUTE_PREFIX}{bucket}")
    }
}

/// [`APPLY_BATCH`] with its placeholders filled in from the constants.
fn apply_batch_script() -> String {
    APPLY_BATCH
        .replace("@EVENT_PREFIX@", keys::EVENT_PREFIX)
        .replace("@CONTENT_PREFIX@", keys::CONTENT_PREFIX)
        .replace("@CONTENT_SUFFIX@", keys::CONTENT_SUFFIX)
        .replace("@STREAM_PREFIX@", keys::STREAM_PREFIX)
        .replace("@TOP_MINUTE_PREFIX@", keys::TOP_MINUTE_PREFIX)
        .replace("@STATS@", keys::STATS)
        .replace("@TOTAL_FIELD@", keys::TOTAL_FIELD)
        .replace("@TYPE_FIELD_PREFIX@", keys::TYPE_FIELD_PREFIX)
        .replace("@DEVICE_FIELD_PREFIX@", keys::DEVICE_FIELD_PREFIX)
        .replace("@ARGS_PER_EVENT@", &ARGS_PER_EVENT.to_string())
        .replace("@EVENT_TTL_SECONDS@", &EVENT_TTL_SECONDS.to_string())
        .replace("@STREAM_MAXLEN@", &STREAM_MAXLEN.to_string())
        .replace("@LIST_LENGTH@", &LIST_LENGTH.to_string())
        .replace("@LIST_LAST@", &(LIST_LENGTH - 1).to_string())
}

/// The bitmap that holds `id`'s bit is `walcast:ids:{shard}`.
fn ids_key(shard: i64) -> String {
    format!("walcast:ids:{shard}")
}

/// What the sink writes for one event, worked out once for either way of writing it.
pub(super) struct Planned<'a> {
    pub(super) event: &'a EnrichedEvent,
    /// The minute bucket, unless it has already expired.
    pub(super) minute: Option<String>,
    /// When the minute's bucket expires (unix seconds).
    pub(super) expires_at: i64,
    /// Whether it joins the recent lists and the stream.
    pub(super) recent: bool,
}

impl<'a> Planned<'a> {
    pub(super) fn new(event: &'a EnrichedEvent, now: i64, backfill: bool) -> Self {
        let minute_start = event
            .event_ts
            .duration_trunc(ChronoDuration::minutes(1))
            .unwrap_or(event.event_ts);
        let expires_at = minute_start.timestamp() + 60 + BUCKET_RETENTION_SECONDS;
        Planned {
            event,
            minute: (expires_at > now).then(|| minute_bucket(&event.event_ts)),
            expires_at,
            // Streamed events are news whatever their event time; backfilled ones only
            // while their minute is still kept.
            recent: !backfill || expires_at > now,
        }
    }

    /// The event type as the stream name and counter field take it (bounded, see
    /// [`key_part`]).
    pub(super) fn event_type(&self) -> &str {
        key_part(self.event.event_type.as_deref().unwrap_or("unknown"))
    }

    pub(super) fn device(&self) -> &str {
        key_part(self.event.device.as_deref().unwrap_or("unknown"))
    }
}

/// Where backfill `job`'s cursor is kept.
pub(super) fn backfill_key(job: &str) -> String {
    format!("{BACKFILL_KEY_PREFIX}{job}")
}

/// The `MULTI`/`EXEC` that applies `fresh` and, when given, records the progress.
fn transaction(
    fresh: &[&Planned],
    progress: Option<Progress>,
    checkpoint_key: &str,
    source_suffix: &str,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    apply_commands(&mut pipe, fresh);
    match progress {
        None | Some(Progress::Nothing) => {}
        Some(Progress::Stream(position)) => {
            pipe.cmd("SET")
                .arg(checkpoint_key)
                .arg(format!("{}{source_suffix}", position.to_sortable()))
                .ignore();
        }
        Some(Progress::Backfill {
            job,
            cursor: Some(id),
        }) => {
            pipe.cmd("SET").arg(backfill_key(job)).arg(id).ignore();
        }
        Some(Progress::Backfill { job, cursor: None }) => {
            pipe.cmd("DEL").arg(backfill_key(job)).ignore();
        }
    }
    pipe
}

/// The bytes a streamed write of `events` sends in its `MULTI`/`EXEC`, all of them new,
/// as of `now` (unix seconds): what the `redis_command_encoding` benchmark measures.
#[doc(hidden)]
pub fn encode_transaction(events: &[EnrichedEvent], now: i64) -> Vec<u8> {
    let planned: Vec<Planned> = events.iter().map(|e| Planned::new(e, now, false)).collect();
    let fresh: Vec<&Planned> = planned.iter().collect();
    let last = events.last().map(|e| Progress::Stream(e.position));
    transaction(&fresh, last, CHECKPOINT_KEY, "").get_packed_pipeline()
}

/// Appends the commands that apply `fresh` (events no guard stopped), with the same
/// result as the script: per event its key, its bit and its stream entry; counters,
/// leaderboard scores and recent lists summed over the events and written once per key.
fn apply_commands<'a>(pipe: &mut redis::Pipeline, fresh: &[&'a Planned<'a>]) {
    // `stats:events` fields as (prefix, name), so counting allocates nothing per event.
    let mut counts: Vec<((&str, &'a str), i64)> = Vec::new();
    let mut count =
        |field: (&'static str, &'a str)| match counts.iter_mut().find(|(f, _)| *f == field) {
            Some((_, n)) => *n += 1,
            None => counts.push((field, 1)),
        };
    // Minute bucket -> (expiry, content -> hundredths); list key -> ids, oldest first.
    let mut scores: BTreeMap<&str, (i64, BTreeMap<&str, i64>)> = BTreeMap::new();
    let mut lists: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    let mut shards: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for p in fresh {
        let event = p.event;
        let json = event.to_json();
        pipe.cmd("SET")
            .arg(keys::event(event.id))
            .arg(&json)
            .arg("EX")
            .arg(EVENT_TTL_SECONDS)
            .ignore();
        if p.recent {
            pipe.cmd("XADD")
                .arg(keys::stream(p.event_type()))
                .arg("MAXLEN")
                .arg("~")
                .arg(STREAM_MAXLEN)
                .arg("*")
                .arg("event")
                .arg(&json)
                .ignore();
        }
        if let Some(content_id) = event.content_id.as_deref() {
            if p.recent {
                lists.entry(content_id).or_default().push(event.id);
            }
            if let Some(minute) = p.minute.as_deref() {
                let (_, by_content) = scores
                    .entry(minute)
                    .or_insert((p.expires_at, BTreeMap::new()));
                *by_content.entry(content_id).or_default() += event.score().0;
            }
        }
        shards
            .entry(event.id.div_euclid(IDS_PER_SHARD))
            .or_default()
            .push(event.id.rem_euclid(IDS_PER_SHARD));
        count(("", keys::TOTAL_FIELD));
        count((keys::TYPE_FIELD_PREFIX, p.event_type()));
        count((keys::DEVICE_FIELD_PREFIX, p.device()));
    }
    for (shard, offsets) in shards {
        pipe.cmd("BITFIELD").arg(ids_key(shard));
        for offset in offsets {
            pipe.arg("SET").arg("u1").arg(offset).arg(1);
        }
        pipe.ignore();
    }
    for ((prefix, name), n) in counts {
        pipe.cmd("HINCRBY")
            .arg(keys::STATS)
            .arg(format!("{prefix}{name}"))
            .arg(n)
            .ignore();
    }
    for (minute, (expires_at, by_content)) in scores {
        let top = keys::top_minute(minute);
        for (content_id, hundredths) in by_content {
            pipe.cmd("ZINCRBY")
                .arg(&top)
                .arg(Hundredths(hundredths).to_string())
                .arg(content_id)
                .ignore();
        }
        pipe.cmd("EXPIREAT").arg(&top).arg(expires_at).ignore();
    }
    for (content_id, ids) in lists {
        // Only the newest 100 survive the trim; push them oldest first.
        let list = keys::content_events(content_id);
        let from = ids.len().saturating_sub(LIST_LENGTH);
        pipe.cmd("LPUSH").arg(&list).arg(&ids[from..]).ignore();
        pipe.cmd("LTRIM")
            .arg(&list)
            .arg(0)
            .arg(LIST_LENGTH - 1)
            .ignore();
    }
}

/// Raises the stream's checkpoint to `position` (of `source`'s history) once a rebuild from
/// the table has brought everything up to it (see `pipeline::rebuild`).
pub async fn raise_checkpoint(
    client: redis::Client,
    key: &str,
    position: Position,
    source: SourceId,
) -> Result<(), SinkError> {
    let mut conn = connect(client).await?;
    let stored: Option<String> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
    let current = stored.map(|s| parse_checkpoint(&s)).transpose()?;
    if current.is_none_or(|(p, _)| p < position) {
        redis::cmd("SET")
            .arg(key)
            .arg(format!("{}|{}", position.to_sortable(), source.stored()))
            .query_async::<()>(&mut conn)
            .await?;
    }
    Ok(())
}

/// A reconnecting, multiplexed connection.
pub async fn connect(client: redis::Client) -> Result<ConnectionManager, SinkError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_max_delay(Duration::from_secs(2));
    let endpoint = endpoint(&client);
    ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|error| SinkError::RedisConnect { endpoint, error })
}

/// `host:port` (or the socket path) a client connects to, for messages: never the
/// password.
pub fn endpoint(client: &redis::Client) -> String {
    client.get_connection_info().addr().to_string()
}

/// `YYYYMMDDHHMM` of the UTC minute `ts` falls in.
pub fn minute_bucket(ts: &DateTime<Utc>) -> String {
    // By hand: strftime re-reads its format string for every event.
    format!(
        "{:04}{:02}{:02}{:02}{:02}",
        ts.year(),
        ts.month(),
        ts.day(),
        ts.hour(),
        ts.minute()
    )
}

impl Sink for RedisSink {
    async fn open(&mut self) -> Result<(), SinkError> {
        match self.conn().await {
            Ok(_) => Ok(()),
            Err(error) => Err(SinkError::RedisConnect {
                endpoint: endpoint(&self.client),
                error,
            }),
        }
    }

    fn healthcheck(&self) -> Probe {
        Probe::redis(self.client.clone())
    }

    fn reset(&mut self) {
        self.conn = None;
    }

    fn name(&self) -> &'static str {
        NAME
    }

    /// Two milliseconds: under thousands of one-row transactions a second, a write then
    /// carries about ten events (a write costs Redis about as much as ten of its events)
    /// while readers still see every event within milliseconds.
    fn linger(&self) -> Duration {
        Duration::from_millis(2)
    }

    async fn checkpoint(&mut self) -> Result<Option<Position>, SinkError> {
        let key = self.checkpoint_key.clone();
        let stored = self.get(&key).await?;
        Ok(stored
            .map(|s| parse_checkpoint(&s))
            .transpose()?
            .map(|(p, _)| p))
    }

    /// Redis records the source with its first checkpoint: a checkpoint key without a
    /// position would not compare as one.
    async fn claim_history(&mut self, current: SourceId) -> Result<(), SinkError> {
        let key = self.checkpoint_key.clone();
        self.source_suffix = claim(self.get(&key).await?, current)?;
        Ok(())
    }

    async fn write(&mut self, batches: &[&Batch]) -> Result<(), SinkError> {
        let result = self.apply(batches).await;
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    async fn backfill_cursor(&mut self, job: &str) -> Result<Option<i64>, SinkError> {
        parse_cursor(self.get(&backfill_key(job)).await?)
    }
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
    fn the_script_takes_every_constant_from_the_code() {
        let script = apply_batch_script();
        assert!(!script.contains('@'), "a placeholder left: {script}");
        assert!(script.contains(&format!("local a = 4 + i * {ARGS_PER_EVENT}")));
        assert!(script.contains(&format!("'EX', {EVENT_TTL_SECONDS})")));
    }
}
