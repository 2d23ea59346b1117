//! The Redis sink on a Redis Cluster (`WALCAST_REDIS_CLUSTER`): the same keys as on one
//! Redis (see [`super::redis`]), written so that every atomic write touches one hash slot.
//!
//! A cluster refuses a transaction over keys of more than one slot, so a write is split by
//! slot, and each slot's share of a chunk of events is applied atomically by a Lua script
//! on the node that serves the slot. Normally one script per node carries the shares of
//! all the slots it serves (see `RedisClusterSink::apply_slots`); when a node refuses,
//! one script per slot, which the cluster client routes through `MOVED` and `ASK`. The
//! scripts of one chunk run at the same time. A crash can then leave a chunk applied in
//! some slots and not in others, so each slot guards its own
//! writes, with keys in that slot. The stream's writes reach a slot in position order, so
//! a replay skips what is at or below the slot's own checkpoint (below). A backfill has no
//! positions and may overlap the stream, so each key that is not idempotent also has a
//! guard by event id:
//!
//! | key written | guard (in the key's slot) |
//! |---|---|
//! | `event:{id}` | none: `SET` of the same JSON is idempotent |
//! | `stats:events`, `events:{event_type}`, `top:minute:{…}` | bit `id mod 2^16` of `walcast:applied:{<tag>}:<key>:<id div 2^16>`, a bitmap of the ids that key counted (8 KiB per 65,536 ids); a minute's bitmaps expire with its bucket |
//! | `content:{content_id}:events` | the list itself: an id already in it is not pushed again, nor a backfilled id older than a full list's oldest |
//!
//! `<tag>` is a hash tag chosen to land in the key's slot ([`tag`]): a key's own name can
//! hold braces (a content id), so its slot is not always that of `{<key>}`.
//!
//! **Checkpoints.** The stream's checkpoint stays `walcast:checkpoint:redis` (with its
//! partition's suffix). It moves after every slot of a chunk applied it, in one script
//! with `{walcast:checkpoint:redis}:slots`, a hash of each slot written to the position of
//! its last write. Each slot keeps that position itself too, in
//! `walcast:checkpoint:redis:{<tag>}`, written by the same script as its data. A slot whose
//! own position is below what the hash says lost writes that were confirmed: its primary
//! failed over to a replica that was behind, or restarted empty. walcast notices on the
//! slot's next write (the script returns the position it found) and stops; at start it
//! compares every slot, and rebuilds only the slots that are behind, from the table, by
//! the backfill path (the guards skip what the other slots have).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::OnceLock;

use chrono::Utc;
use futures_util::future::try_join_all;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;

use super::redis::{
    CHUNK_EVENTS, EVENT_TTL_SECONDS, LIST_LENGTH, NAME, Planned, STREAM_MAXLEN, backfill_key,
    claim, keys, parse_checkpoint, parse_cursor,
};
use super::{Progress, Sink, SinkError};
use crate::event::Batch;
use crate::health::Probe;
use crate::lsn::{Position, SourceId};

/// Hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;
/// Ids per guard bitmap: 2^16, 8 KiB each.
const IDS_PER_GUARD: i64 = 1 << 16;
/// Values passed to the slot script per operation.
const ARGS_PER_OP: usize = 8;

/// The hash slot of `key`, as Redis Cluster computes it: CRC16 (XMODEM) of the key's hash
/// tag (what is between its first `{` and the next `}`, when not empty), or of the key.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % SLOTS
}

/// A short string whose slot is `slot`: `{<tag>}` in a key puts the key in that slot.
pub fn tag(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        // Numbers in base 36 until every slot has one: about 170,000 tries, once.
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = tags.len();
        let mut n: u64 = 0;
        while missing > 0 {
            let candidate = base36(n);
            let at = usize::from(self::slot(candidate.as_bytes()));
            if tags[at].is_empty() {
                tags[at] = candidate;
                missing -= 1;
            }
            n += 1;
        }
        tags
    });
    &tags[usize::from(slot % SLOTS)]
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii digits")
}

/// `<checkpoint>:{<tag>}`: slot `slot`'s own record of its last write.
fn slot_checkpoint_key(checkpoint_key: &str, slot: u16) -> String {
    format!("{checkpoint_key}:{{{}}}", tag(slot))
}

/// `{<checkpoint>}:slots`: in the checkpoint's slot, each slot's last write.
fn slots_key(checkpoint_key: &str) -> String {
    format!("{{{checkpoint_key}}}:slots")
}

/// The bitmap in `key`'s slot of the ids that `key` counted, for `id`'s range.
fn guard_key(key: &str, key_slot: u16, id: i64) -> String {
    format!(
        "walcast:applied:{{{}}}:{key}:{}",
        tag(key_slot),
        id.div_euclid(IDS_PER_GUARD)
    )
}

/// Applies the shares of one or more slots. ARGV[1] = 'stream' or 'backfill'; ARGV[2] = the
/// position each slot's checkpoint moves to (stream); ARGV[3] = 'slot' (one slot, every
/// key declared in KEYS) or 'node' (slots one node serves, KEYS only routes); then per
/// slot: its checkpoint key, the checkpoint this process last wrote there ('' for none),
/// its keys (count, then each), its operations (count, then each as kind, key index,
/// guard index (0: none), bit offset, the event's position and three values), and its
/// `event:{id}` keys (count, then key and JSON each).
///
/// Kinds: `s` counts into `stats:events` (values: the type field, the device field); `x`
/// appends to a stream (the JSON); `t` adds to a leaderboard (the content id, hundredths
/// of a second, the bucket's expiry); `l` pushes onto a recent list (the event id): not
/// when it is there already, nor, from a backfill, when the list is full of newer ids.
/// Counters, scores and lists are summed over the operations and written once per key, as
/// in the single-Redis script.
///
/// Everything is read before anything is written: each slot's checkpoint and, for a node's
/// slots, every key (`EXISTS`). A key this node does not serve (the slot map walcast holds
/// is stale, or the slot is migrating and the key is gone from here or not made yet) then
/// fails the script before it changed anything. That matters: a share applied in part
/// could have set an event's guard bit without adding its count, which is summed and
/// written at the end. Returns each slot's checkpoint before ('' for none); a slot holding
/// less than this process last wrote there lost writes, and the script writes nothing
/// there, so the slot still shows it.
const APPLY_SLOT: &str = r#"
local stream = ARGV[1] == 'stream'
local mark = ARGV[2]
local node = ARGV[3] == 'node'
local sections = {}
local p = 4
while p <= #ARGV do
  local s = {cp = ARGV[p], expected = ARGV[p + 1], keys = {}}
  local nkeys = tonumber(ARGV[p + 2])
  for i = 1, nkeys do
    s.keys[i] = ARGV[p + 2 + i]
  end
  p = p + 3 + nkeys
  s.nops = tonumber(ARGV[p])
  s.ops = p + 1
  p = s.ops + s.nops * @ARGS_PER_OP@
  s.nevents = tonumber(ARGV[p])
  s.events = p + 1
  p = s.events + 2 * s.nevents
  sections[#sections + 1] = s
end
for _, s in ipairs(sections) do
  s.found = false
  if stream then
    s.found = redis.call('GET', s.cp)
  end
  s.lost = stream and s.expected ~= '' and (s.found == false or s.found < s.expected)
  if node then
    redis.call('EXISTS', s.cp)
    if #s.keys > 0 then
      redis.call('EXISTS', unpack(s.keys))
    end
    for i = 0, s.nevents - 1 do
      redis.call('EXISTS', ARGV[s.events + 2 * i])
    end
  end
end
local function apply(s)
  local found = s.found
  local counts, count_fields, stats = {}, {}, nil
  local scores, score_keys, expiries, guard_expiries = {}, {}, {}, {}
  local lists, list_keys = {}, {}
  local function count(field)
    if counts[field] == nil then
      counts[field] = 0
      count_fields[#count_fields + 1] = field
    end
    counts[field] = counts[field] + 1
  end
  for i = 0, s.nops - 1 do
    local a = s.ops + i * @ARGS_PER_OP@
    local kind = ARGV[a]
    local key = s.keys[tonumber(ARGV[a + 1])]
    local guard = s.keys[tonumber(ARGV[a + 2])]
    -- The stream's writes reach a slot in position order: one at or below the slot's
    -- checkpoint was applied there.
    local fresh = not stream or found == false or ARGV[a + 4] > found
    if fresh and guard then
      fresh = redis.call('SETBIT', guard, ARGV[a + 3], 1) == 0
    end
    if fresh then
      if kind == 's' then
        stats = key
        count('@TOTAL_FIELD@')
        count(ARGV[a + 5])
        count(ARGV[a + 6])
      elseif kind == 'x' then
        redis.call('XADD', key, 'MAXLEN', '~', @STREAM_MAXLEN@, '*', 'event', ARGV[a + 5])
      elseif kind == 't' then
        if scores[key] == nil then
          scores[key] = {}
          score_keys[#score_keys + 1] = key
        end
        expiries[key] = ARGV[a + 7]
        guard_expiries[guard] = ARGV[a + 7]
        local by_content = scores[key]
        by_content[ARGV[a + 5]] = (by_content[ARGV[a + 5]] or 0) + tonumber(ARGV[a + 6])
      elseif kind == 'l' then
        local push = redis.call('LPOS', key, ARGV[a + 5]) == false
        if push and not stream and redis.call('LLEN', key) >= @LIST_LENGTH@ then
          push = tonumber(ARGV[a + 5]) > tonumber(redis.call('LINDEX', key, -1))
        end
        if push then
          if lists[key] == nil then
            lists[key] = {}
            list_keys[#list_keys + 1] = key
          end
          local ids = lists[key]
          ids[#ids + 1] = ARGV[a + 5]
        end
      end
    end
  end
  for _, field in ipairs(count_fields) do
    redis.call('HINCRBY', stats, field, counts[field])
  end
  for _, top in ipairs(score_keys) do
    for content_id, hundredths in pairs(scores[top]) do
      redis.call('ZINCRBY', top, string.format('%.2f', hundredths / 100), content_id)
    end
    redis.call('EXPIREAT', top, expiries[top])
  end
  for guard, at in pairs(guard_expiries) do
    redis.call('EXPIREAT', guard, at)
  end
  for _, list in ipairs(list_keys) do
    redis.call('LPUSH', list, unpack(lists[list]))
    redis.call('LTRIM', list, 0, @LIST_LAST@)
  end
  for i = 0, s.nevents - 1 do
    local e = s.events + 2 * i
    redis.call('SET', ARGV[e], ARGV[e + 1], 'EX', @EVENT_TTL_SECONDS@)
  end
  if stream and (found == false or mark > found) then
    redis.call('SET', s.cp, mark)
  end
end
local result = {}
for j, s in ipairs(sections) do
  if not s.lost then
    apply(s)
  end
  result[j] = s.found or ''
end
return result
"#;

/// KEYS[1] = the checkpoint, KEYS[2] = its slots hash; ARGV[1] = the new checkpoint;
/// ARGV[2] = the one this process last wrote ('' for none); then slot, position pairs.
/// Returns the checkpoint it found ('' for none), and writes nothing when that is below
/// ARGV[2].
const RECORD: &str = r#"
local found = redis.call('GET', KEYS[1])
if ARGV[2] ~= '' and (found == false or found < ARGV[2]) then
  return found or ''
end
if #ARGV > 2 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 3))
end
if found == false or ARGV[1] > found then
  redis.call('SET', KEYS[1], ARGV[1])
end
return found or ''
"#;

fn apply_slot_script() -> String {
    APPLY_SLOT
        .replace("@ARGS_PER_OP@", &ARGS_PER_OP.to_string())
        .replace("@EVENT_TTL_SECONDS@", &EVENT_TTL_SECONDS.to_string())
        .replace("@TOTAL_FIELD@", keys::TOTAL_FIELD)
        .replace("@STREAM_MAXLEN@", &STREAM_MAXLEN.to_string())
        .replace("@LIST_LENGTH@", &LIST_LENGTH.to_string())
        .replace("@LIST_LAST@", &(LIST_LENGTH - 1).to_string())
}

/// One slot's share of a chunk: its keys and operations (see [`APPLY_SLOT`]).
struct SlotWrite {
    checkpoint: String,
    keys: Vec<String>,
    index: HashMap<String, usize>,
    args: Vec<String>,
    ops: usize,
    /// `event:{id}` keys and their JSON: idempotent, so written without a guard, in a
    /// section of their own that takes two values each instead of an operation's eight.
    events: Vec<(String, String)>,
}

impl SlotWrite {
    fn new(checkpoint_key: &str, slot: u16) -> Self {
        SlotWrite {
            checkpoint: slot_checkpoint_key(checkpoint_key, slot),
            keys: Vec::new(),
            index: HashMap::new(),
            args: Vec::new(),
            ops: 0,
            events: Vec::new(),
        }
    }

    fn event(&mut self, key: String, json: String) {
        self.events.push((key, json));
    }

    /// Index (1-based) of `key` among the slot's keys.
    fn key(&mut self, key: String) -> usize {
        if let Some(at) = self.index.get(&key) {
            return *at;
        }
        self.keys.push(key.clone());
        self.index.insert(key, self.keys.len());
        self.keys.len()
    }

    fn op(
        &mut self,
        kind: &str,
        key: String,
        guard: Option<String>,
        event: Event,
        values: [&str; 3],
    ) {
        let Event { id, position } = event;
        let key = self.key(key);
        let guard = guard.map_or(0, |g| self.key(g));
        self.args.push(kind.to_owned());
        self.args.push(key.to_string());
        self.args.push(guard.to_string());
        self.args.push(id.rem_euclid(IDS_PER_GUARD).to_string());
        self.args.push(position.to_owned());
        self.args.extend(values.iter().map(|v| (*v).to_owned()));
        self.ops += 1;
    }

    /// Every key the share touches, its checkpoint first: what a one-slot script declares.
    fn declared(&self) -> Vec<String> {
        let mut keys = Vec::with_capacity(1 + self.keys.len() + self.events.len());
        keys.push(self.checkpoint.clone());
        keys.extend(self.keys.iter().cloned());
        keys.extend(self.events.iter().map(|(key, _)| key.clone()));
        keys
    }

    /// The share as the script's arguments, after `expected` (see [`APPLY_SLOT`]).
    fn section(self, expected: String, out: &mut Vec<String>) {
        out.push(self.checkpoint);
        out.push(expected);
        out.push(self.keys.len().to_string());
        out.extend(self.keys);
        out.push(self.ops.to_string());
        out.extend(self.args);
        out.push(self.events.len().to_string());
        for (key, json) in self.events {
            out.push(key);
            out.push(json);
        }
    }
}

/// The writes of `fresh` events, by slot.
fn slot_writes(planned: &[&Planned<'_>], checkpoint_key: &str) -> BTreeMap<u16, SlotWrite> {
    let mut writes: BTreeMap<u16, SlotWrite> = BTreeMap::new();
    let write = |writes: &mut BTreeMap<u16, SlotWrite>,
                 key: String,
                 kind: &str,
                 guarded: bool,
                 event: Event,
                 values: [&str; 3]| {
        let key_slot = slot(key.as_bytes());
        let guard = guarded.then(|| guard_key(&key, key_slot, event.id));
        writes
            .entry(key_slot)
            .or_insert_with(|| SlotWrite::new(checkpoint_key, key_slot))
            .op(kind, key, guard, event, values);
    };
    // Only the newest LIST_LENGTH events of a content survive the trim: push those alone,
    // so a replay finds every one of them in the list.
    let mut per_list: HashMap<&str, usize> = HashMap::new();
    for p in planned.iter().rev() {
        if p.recent
            && let Some(content_id) = p.event.content_id.as_deref()
        {
            *per_list.entry(content_id).or_default() += 1;
        }
    }
    let mut pushed: HashMap<&str, usize> = HashMap::new();
    for p in planned {
        let event = p.event;
        let id = event.id;
        let id_text = id.to_string();
        let position = event.position.to_sortable();
        let at = Event {
            id,
            position: &position,
        };
        let json = event.to_json();
        let event_key = keys::event(id);
        let event_slot = slot(event_key.as_bytes());
        writes
            .entry(event_slot)
            .or_insert_with(|| SlotWrite::new(checkpoint_key, event_slot))
            .event(event_key, json.clone());
        let type_field = format!("{}{}", keys::TYPE_FIELD_PREFIX, p.event_type());
        let device_field = format!("{}{}", keys::DEVICE_FIELD_PREFIX, p.device());
        write(
            &mut writes,
            keys::STATS.to_owned(),
            "s",
            true,
            at,
            [&type_field, &device_field, ""],
        );
        if p.recent {
            write(
                &mut writes,
                keys::stream(p.event_type()),
                "x",
                true,
                at,
                [&json, "", ""],
            );
        }
        if let Some(content_id) = event.content_id.as_deref() {
            if let Some(minute) = p.minute.as_deref() {
                let hundredths = event.score().0.to_string();
                let expires = p.expires_at.to_string();
                write(
                    &mut writes,
                    keys::top_minute(minute),
                    "t",
                    true,
                    at,
                    [content_id, &hundredths, &expires],
                );
            }
            if p.recent {
                let seen = pushed.entry(content_id).or_default();
                *seen += 1;
                if per_list[content_id] - *seen < LIST_LENGTH {
                    write(
                        &mut writes,
                        keys::content_events(content_id),
                        "l",
                        false,
                        at,
                        [&id_text, "", ""],
                    );
                }
            }
        }
    }
    writes
}

/// The event an operation belongs to: its id (for the guards) and sortable position.
#[derive(Clone, Copy)]
struct Event<'a> {
    id: i64,
    position: &'a str,
}

pub struct RedisClusterSink {
    client: ClusterClient,
    conn: Option<ClusterConnection>,
    /// The script for one node's slots (it touches keys it does not declare), and for one
    /// slot (every key declared, no flags: the cluster then answers `ASK` and `TRYAGAIN`
    /// for it as for any command while the slot migrates).
    node_script: redis::Script,
    script: redis::Script,
    record: redis::Script,
    /// Where this partition's checkpoint is kept ([`super::redis::checkpoint_key`]).
    checkpoint_key: String,
    /// `|<system id>/<timeline>` of the source, appended to the checkpoint.
    source_suffix: String,
    /// The last position this process wrote to each slot, and to the checkpoint: finding
    /// a lower one later means the slot lost confirmed writes while walcast ran.
    written: HashMap<u16, Position>,
    written_checkpoint: Option<Position>,
    /// Slots found behind their record at start ([`RedisClusterSink::checkpoint`]), and the
    /// checkpoint then: a backfill (the rebuild) writes to these slots alone.
    lost: Option<(BTreeSet<u16>, Option<Position>)>,
    /// Which node serves each slot (an index per slot), as `CLUSTER SLOTS` said; `None`
    /// until read, and after a node refused a write.
    slot_map: Option<Vec<usize>>,
}

impl RedisClusterSink {
    /// The sink, not yet connected (see [`Sink::open`]).
    pub fn new(client: ClusterClient) -> Self {
        RedisClusterSink {
            client,
            conn: None,
            node_script: redis::Script::new(&format!(
                "#!lua flags=allow-cross-slot-keys\n{}",
                apply_slot_script()
            )),
            script: redis::Script::new(&apply_slot_script()),
            record: redis::Script::new(RECORD),
            checkpoint_key: super::redis::CHECKPOINT_KEY.to_owned(),
            source_suffix: String::new(),
            written: HashMap::new(),
            written_checkpoint: None,
            lost: None,
            slot_map: None,
        }
    }

    /// The sink of one partition of the source: its own checkpoints.
    pub fn for_partition(mut self, partition: crate::config::Partition) -> Self {
        self.checkpoint_key = super::redis::checkpoint_key(partition);
        self
    }

    async fn conn(&mut self) -> Result<ClusterConnection, redis::RedisError> {
        if self.conn.is_none() {
            self.conn = Some(self.client.get_async_connection().await?);
        }
        Ok(self.conn.clone().expect("connected above"))
    }

    async fn apply(&mut self, batches: &[&Batch]) -> Result<(), SinkError> {
        let now = Utc::now().timestamp();
        let progress = Progress::of(batches);
        if progress == Progress::Nothing {
            return Ok(());
        }
        let mut seen = HashSet::new();
        let planned: Vec<Planned> = super::events(batches)
            .filter(|event| seen.insert(event.id))
            .map(|event| Planned::new(event, now, progress.is_backfill()))
            .collect();
        if planned.is_empty() {
            return self.record_progress(&BTreeMap::new(), progress).await;
        }
        let mut chunks = planned.chunks(CHUNK_EVENTS).peekable();
        while let Some(chunk) = chunks.next() {
            let upto = match chunks.peek() {
                None => progress,
                Some(_) => progress.at(chunk.last().expect("not empty").event),
            };
            let refs: Vec<&Planned> = chunk.iter().collect();
            let applied = self.apply_slots(&refs, upto).await?;
            self.record_progress(&applied, upto).await?;
        }
        Ok(())
    }

    /// Applies every slot's share of `planned`, then checks what each slot held; returns
    /// the slots written (stream).
    ///
    /// With a slot map, one script per node applies the shares of all the slots it serves:
    /// a few requests per write instead of one per slot. When a node refuses (the map is
    /// stale, a slot is moving), the shares are applied again one slot at a time, each
    /// script declaring its keys so that the cluster client follows `MOVED`, `ASK` and
    /// `TRYAGAIN`, and the map is read again for the next write. What a node's script did
    /// apply, its slots' checkpoints and guards skip.
    async fn apply_slots(
        &mut self,
        planned: &[&Planned<'_>],
        progress: Progress<'_>,
    ) -> Result<BTreeMap<u16, Position>, SinkError> {
        let position = match progress {
            Progress::Stream(position) => Some(position),
            _ => None,
        };
        let conn = self.conn().await?;
        if self.slot_map.is_none() {
            self.slot_map = read_slot_map(&mut conn.clone()).await.ok();
        }
        let found = match self.slot_map.take() {
            Some(map) => match self.apply_by_node(planned, progress, &map, &conn).await {
                Ok(found) => {
                    self.slot_map = Some(map);
                    found
                }
                Err(error) => {
                    tracing::debug!(error = %error, "a node refused its slots (resharded or failed over); writing slot by slot");
                    // On a connection of its own: this one may be refreshing its slots.
                    self.conn = None;
                    let conn = self.conn().await?;
                    self.apply_by_slot(planned, progress, &conn).await?
                }
            },
            None => self.apply_by_slot(planned, progress, &conn).await?,
        };
        let mut applied = BTreeMap::new();
        let Some(position) = position else {
            return Ok(applied);
        };
        for (slot, found) in found {
            let found = (!found.is_empty())
                .then(|| Position::from_sortable(&found).ok_or(SinkError::BadCheckpoint(found)))
                .transpose()?;
            if let Some(wrote) = self.written.get(&slot).copied()
                && found.is_none_or(|f| f < wrote)
            {
                tracing::error!(slot, wrote = %wrote, found = ?found.map(|f| f.to_string()), "a Redis Cluster slot lost writes walcast had confirmed");
                return Err(SinkError::LostState { wrote, found });
            }
            self.written.insert(slot, position);
            applied.insert(slot, position);
        }
        Ok(applied)
    }

    /// The shares of `planned` by slot, less those a rebuild leaves alone.
    fn writes(&self, planned: &[&Planned<'_>], progress: Progress<'_>) -> BTreeMap<u16, SlotWrite> {
        let mut writes = slot_writes(planned, &self.checkpoint_key);
        if progress.is_backfill()
            && let Some((lost, _)) = &self.lost
        {
            writes.retain(|slot, _| lost.contains(slot));
        }
        writes
    }

    /// What this process last wrote to `slot`, as the script's `expected`.
    fn expected(&self, slot: u16, progress: Progress<'_>) -> String {
        match (progress, self.written.get(&slot)) {
            (Progress::Stream(_), Some(wrote)) => wrote.to_sortable(),
            _ => String::new(),
        }
    }

    /// One script per node of `map`; each slot's checkpoint before, by slot.
    async fn apply_by_node(
        &self,
        planned: &[&Planned<'_>],
        progress: Progress<'_>,
        map: &[usize],
        conn: &ClusterConnection,
    ) -> Result<Vec<(u16, String)>, redis::RedisError> {
        let mut by_node: BTreeMap<usize, Vec<(u16, SlotWrite)>> = BTreeMap::new();
        for (slot, write) in self.writes(planned, progress) {
            by_node
                .entry(map[usize::from(slot)])
                .or_default()
                .push((slot, write));
        }
        let calls = by_node.into_values().map(|shares| {
            let mut conn = conn.clone();
            let mut invocation = self.node_script.prepare_invoke();
            invocation.key(shares[0].1.checkpoint.clone());
            let mut args = script_head(progress, "node");
            let slots: Vec<u16> = shares.iter().map(|(slot, _)| *slot).collect();
            for (slot, write) in shares {
                write.section(self.expected(slot, progress), &mut args);
            }
            invocation.arg(args);
            async move {
                let found: Vec<String> = invocation.invoke_async(&mut conn).await?;
                Ok::<_, redis::RedisError>(slots.into_iter().zip(found))
            }
        });
        Ok(try_join_all(calls).await?.into_iter().flatten().collect())
    }

    /// One script per slot, declaring its keys; each slot's checkpoint before, by slot.
    async fn apply_by_slot(
        &self,
        planned: &[&Planned<'_>],
        progress: Progress<'_>,
        conn: &ClusterConnection,
    ) -> Result<Vec<(u16, String)>, SinkError> {
        let calls = self
            .writes(planned, progress)
            .into_iter()
            .map(|(slot, write)| {
                let mut conn = conn.clone();
                let mut invocation = self.script.prepare_invoke();
                for key in write.declared() {
                    invocation.key(key);
                }
                let mut args = script_head(progress, "slot");
                write.section(self.expected(slot, progress), &mut args);
                invocation.arg(args);
                async move {
                    let found: Vec<String> = invocation.invoke_async(&mut conn).await?;
                    let found = found.into_iter().next().unwrap_or_default();
                    Ok::<_, SinkError>((slot, found))
                }
            });
        try_join_all(calls).await
    }

    /// Moves the checkpoint (with the slots written) or the backfill's cursor, once every
    /// slot applied what it covers.
    async fn record_progress(
        &mut self,
        applied: &BTreeMap<u16, Position>,
        progress: Progress<'_>,
    ) -> Result<(), SinkError> {
        let mut conn = self.conn().await?;
        match progress {
            Progress::Nothing => {}
            Progress::Stream(upto) => {
                let mut invocation = self.record.key(&self.checkpoint_key);
                // The stored checkpoint carries the source after its position: compared as
                // strings, the position alone is the prefix to compare.
                invocation
                    .key(slots_key(&self.checkpoint_key))
                    .arg(format!("{}{}", upto.to_sortable(), self.source_suffix))
                    .arg(
                        self.written_checkpoint
                            .map_or(String::new(), |p| p.to_sortable()),
                    );
                for (slot, position) in applied {
                    invocation.arg(slot).arg(position.to_sortable());
                }
                let found: String = invocation.invoke_async(&mut conn).await?;
                let found = (!found.is_empty())
                    .then(|| parse_checkpoint(&found).map(|(p, _)| p))
                    .transpose()?;
                if let Some(wrote) = self.written_checkpoint
                    && found.is_none_or(|f| f < wrote)
                {
                    return Err(SinkError::LostState { wrote, found });
                }
                self.written_checkpoint = self.written_checkpoint.max(Some(upto));
            }
            Progress::Backfill { job, cursor } => {
                let cmd = match cursor {
                    Some(id) => redis::cmd("SET").arg(backfill_key(job)).arg(id).to_owned(),
                    None => redis::cmd("DEL").arg(backfill_key(job)).to_owned(),
                };
                cmd.query_async::<()>(&mut conn).await?;
            }
        }
        Ok(())
    }

    /// Slots whose own checkpoint is below the one the slots hash holds for them.
    async fn behind_slots(
        conn: &mut ClusterConnection,
        checkpoint_key: &str,
    ) -> Result<BTreeMap<u16, Position>, SinkError> {
        let recorded: HashMap<u16, String> = redis::cmd("HGETALL")
            .arg(slots_key(checkpoint_key))
            .query_async(conn)
            .await?;
        let reads = recorded.into_iter().map(|(slot, position)| {
            let mut conn = conn.clone();
            async move {
                let held: Option<String> = redis::cmd("GET")
                    .arg(slot_checkpoint_key(checkpoint_key, slot))
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, SinkError>((slot, position, held))
            }
        });
        let mut behind = BTreeMap::new();
        for (slot, recorded, held) in try_join_all(reads).await? {
            if held.is_none_or(|held| held < recorded) {
                let position = Position::from_sortable(&recorded)
                    .ok_or_else(|| SinkError::BadCheckpoint(recorded.clone()))?;
                behind.insert(slot, position);
            }
        }
        Ok(behind)
    }

    async fn get(&mut self, key: &str) -> Result<Option<String>, SinkError> {
        let mut conn = self.conn().await?;
        let result = redis::cmd("GET").arg(key).query_async(&mut conn).await;
        if result.is_err() {
            self.conn = None;
        }
        Ok(result?)
    }
}

/// The script's first arguments: the mode, the position slots' checkpoints move to, and
/// how its keys are given (see [`APPLY_SLOT`]).
fn script_head(progress: Progress<'_>, keys: &str) -> Vec<String> {
    match progress {
        Progress::Stream(position) => {
            vec!["stream".to_owned(), position.to_sortable(), keys.to_owned()]
        }
        _ => vec!["backfill".to_owned(), String::new(), keys.to_owned()],
    }
}

/// `CLUSTER SLOTS` as the index of the primary serving each slot (indices are only
/// compared with each other).
async fn read_slot_map(conn: &mut ClusterConnection) -> Result<Vec<usize>, redis::RedisError> {
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    let mut nodes: Vec<String> = Vec::new();
    let mut map = vec![usize::MAX; usize::from(SLOTS)];
    let bad =
        || redis::RedisError::from((redis::ErrorKind::Parse, "unexpected CLUSTER SLOTS reply"));
    for range in ranges {
        let redis::Value::Array(fields) = range else {
            return Err(bad());
        };
        let (
            Some(redis::Value::Int(start)),
            Some(redis::Value::Int(end)),
            Some(redis::Value::Array(primary)),
        ) = (fields.first(), fields.get(1), fields.get(2))
        else {
            return Err(bad());
        };
        let address = format!("{:?}:{:?}", primary.first(), primary.get(1));
        let node = match nodes.iter().position(|n| *n == address) {
            Some(at) => at,
            None => {
                nodes.push(address);
                nodes.len() - 1
            }
        };
        for slot in *start..=*end {
            if let Some(entry) = usize::try_from(slot).ok().and_then(|s| map.get_mut(s)) {
                *entry = node;
            }
        }
    }
    if map.contains(&usize::MAX) {
        // A slot no node serves: the cluster is down there; write slot by slot.
        return Err(bad());
    }
    Ok(map)
}

/// After a rebuild brought the cluster up to `position`: every slot that was behind gets
/// back the checkpoint its record holds, and the checkpoint rises to `position`.
pub async fn raise_checkpoint(
    client: ClusterClient,
    key: &str,
    position: Position,
    source: SourceId,
) -> Result<(), SinkError> {
    let mut conn = client.get_async_connection().await?;
    for (slot, recorded) in RedisClusterSink::behind_slots(&mut conn, key).await? {
        redis::cmd("SET")
            .arg(slot_checkpoint_key(key, slot))
            .arg(recorded.to_sortable())
            .query_async::<()>(&mut conn)
            .await?;
    }
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

/// The seeds, for messages: never a password.
pub fn endpoint(seeds: &str) -> String {
    seeds
        .split(',')
        .map(|url| match url.rsplit_once('@') {
            Some((scheme_and_user, host)) => {
                let scheme = scheme_and_user.split("://").next().unwrap_or("redis");
                format!("{scheme}://{host}")
            }
            None => url.trim().to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl Sink for RedisClusterSink {
    async fn open(&mut self) -> Result<(), SinkError> {
        let mut conn = self.conn().await.map_err(|error| {
            self.conn = None;
            SinkError::RedisConnect {
                endpoint: "WALCAST_REDIS_CLUSTER".to_owned(),
                error,
            }
        })?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|error| {
                self.conn = None;
                SinkError::RedisConnect {
                    endpoint: "WALCAST_REDIS_CLUSTER".to_owned(),
                    error,
                }
            })?;
        Ok(())
    }

    fn healthcheck(&self) -> Probe {
        Probe::redis_cluster(self.client.clone())
    }

    fn reset(&mut self) {
        self.conn = None;
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn linger(&self) -> std::time::Duration {
        std::time::Duration::from_millis(2)
    }

    /// The checkpoint; also finds the slots that are behind it ([`Sink::lost_writes`]).
    async fn checkpoint(&mut self) -> Result<Option<Position>, SinkError> {
        let key = self.checkpoint_key.clone();
        let checkpoint = self
            .get(&key)
            .await?
            .map(|s| parse_checkpoint(&s))
            .transpose()?
            .map(|(p, _)| p);
        let mut conn = self.conn().await?;
        let behind = Self::behind_slots(&mut conn, &key).await?;
        if !behind.is_empty() {
            let slots: Vec<u16> = behind.keys().copied().collect();
            tracing::warn!(
                slots = ?&slots[..slots.len().min(20)], count = slots.len(),
                "Redis Cluster slots hold less than walcast confirmed (a primary failed over \
                 to a replica that was behind, or restarted empty)"
            );
            self.lost = Some((behind.into_keys().collect(), checkpoint));
        }
        Ok(checkpoint)
    }

    fn lost_writes(&self) -> Option<Position> {
        self.lost.as_ref().and_then(|(_, checkpoint)| *checkpoint)
    }

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
    fn slots_are_those_redis_computes() {
        // From the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        // An empty tag does not count: the whole key is hashed.
        let whole = crc16::State::<crc16::XMODEM>::calculate(b"foo{}{bar}") % SLOTS;
        assert_eq!(slot(b"foo{}{bar}"), whole);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn every_slot_has_a_tag_that_lands_in_it() {
        for s in 0..SLOTS {
            let key = format!("walcast:applied:{{{}}}:content:x{{y}}:events:0", tag(s));
            assert_eq!(slot(key.as_bytes()), s);
        }
    }

    #[test]
    fn the_script_takes_every_constant_from_the_code() {
        let script = apply_slot_script();
        assert!(!script.contains('@'), "a placeholder left: {script}");
    }
}
