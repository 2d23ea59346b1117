//! Plain data that flows between stages: enriched events, dead letters, batches. No I/O.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::ser::{SerializeMap, Serializer};
use serde_json::value::RawValue;

use crate::lsn::{Lsn, Position};

/// The columns of a `content` row that events carry (the enrichment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    pub id: String,
    pub slug: Option<String>,
    pub title: Option<String>,
    pub content_type: Option<String>,
    pub length_seconds: Option<i32>,
}

/// A decimal with two places, held exactly as hundredths (`7.00` is `Hundredths(700)`), so
/// values equal what PostgreSQL's `round(numeric, 2)` gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hundredths(pub i64);

impl Hundredths {
    /// The text form of a `numeric` with at most two places (`"7.00"`, `"-1.5"`, `"3"`).
    pub fn parse(text: &str) -> Option<Self> {
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || fraction.len() > 2 || !all_digits(whole) || !all_digits(fraction) {
            return None;
        }
        let whole: i64 = whole.parse().ok()?;
        let fraction: i64 = format!("{fraction:0<2}").parse().ok()?;
        let value = whole.checked_mul(100)?.checked_add(fraction)?;
        Some(Hundredths(if negative { -value } else { value }))
    }

    pub fn as_f64(self) -> f64 {
        // Division of an exact integer by 100 yields the double nearest the decimal, which
        // prints back as the same decimal.
        self.0 as f64 / 100.0
    }
}

impl fmt::Display for Hundredths {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

/// An insert on `engagement_events`, decoded and joined with its content.
#[derive(Debug, Clone)]
pub struct EnrichedEvent {
    pub position: Position,
    pub commit_ts: DateTime<Utc>,
    pub id: i64,
    pub content_id: Option<String>,
    pub user_id: Option<String>,
    pub event_type: Option<String>,
    pub event_ts: DateTime<Utc>,
    pub duration_ms: Option<i32>,
    pub device: Option<String>,
    pub raw_payload: Option<Box<RawValue>>,
    /// Columns the table has beyond the contract's (added by `ALTER TABLE` later), by name,
    /// in their text form.
    pub extra: Vec<(String, Option<String>)>,
    /// The content row as the stream knew it when this event committed; `None` when
    /// `content_id` is NULL or unknown (`content_missing`).
    pub content: Option<Arc<Content>>,
    pub engagement_seconds: Option<Hundredths>,
    pub engagement_pct: Option<Hundredths>,
}

impl EnrichedEvent {
    pub fn content_missing(&self) -> bool {
        self.content.is_none()
    }

    /// Engagement as the leaderboards score it, in hundredths of a second: 1 s when the
    /// duration is unknown.
    pub fn score(&self) -> Hundredths {
        self.engagement_seconds.unwrap_or(Hundredths(100))
    }

    /// The event as the JSON document every sink delivers.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an event always serializes")
    }
}

/// Most characters of a free-text value (`device`, `content_type`, `event_type`) where it
/// becomes a key: an index entry of an aggregate, a Redis key or hash field. A longer
/// value is cut there to its first this many characters (the event itself keeps it whole);
/// PostgreSQL's B-tree entries are limited to about 2,700 bytes, and 200 characters of
/// UTF-8 take at most 800.
pub const KEY_CHARS: usize = 200;

/// `value` bounded to [`KEY_CHARS`] characters for use in a key.
pub fn key_part(value: &str) -> &str {
    match value.char_indices().nth(KEY_CHARS) {
        Some((end, _)) => &value[..end],
        None => value,
    }
}

/// RFC 3339 in UTC with microseconds, the resolution of PostgreSQL timestamps.
pub fn rfc3339(ts: &DateTime<Utc>) -> String {
    ts.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The keys walcast itself puts in the event JSON beside the source's own columns, and
/// `extra`, where an added source column that would take one of these names goes instead
/// (`{"title": "<the content's title>", "extra": {"title": "<the column's value>"}}`), so
/// every key appears once.
pub const ENRICHMENT_KEYS: [&str; 10] = [
    "content_type",
    "length_seconds",
    "title",
    "slug",
    "engagement_seconds",
    "engagement_pct",
    "content_missing",
    "commit_lsn",
    "commit_ts",
    "extra",
];

/// Added columns whose names walcast's own keys already take, as one JSON object.
struct Colliding<'a>(&'a [(String, Option<String>)]);

impl serde::Serialize for Colliding<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (name, value) in self.0.iter().filter(|(n, _)| collides(n)) {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

fn collides(name: &str) -> bool {
    ENRICHMENT_KEYS.contains(&name)
}

impl serde::Serialize for EnrichedEvent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let content = self.content.as_deref();
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("content_id", &self.content_id)?;
        map.serialize_entry("user_id", &self.user_id)?;
        map.serialize_entry("event_type", &self.event_type)?;
        map.serialize_entry("event_ts", &rfc3339(&self.event_ts))?;
        map.serialize_entry("duration_ms", &self.duration_ms)?;
        map.serialize_entry("device", &self.device)?;
        map.serialize_entry("raw_payload", &self.raw_payload)?;
        for (name, value) in self.extra.iter().filter(|(n, _)| !collides(n)) {
            map.serialize_entry(name, value)?;
        }
        map.serialize_entry(
            "content_type",
            &content.and_then(|c| c.content_type.as_deref()),
        )?;
        map.serialize_entry("length_seconds", &content.and_then(|c| c.length_seconds))?;
        map.serialize_entry("title", &content.and_then(|c| c.title.as_deref()))?;
        map.serialize_entry("slug", &content.and_then(|c| c.slug.as_deref()))?;
        map.serialize_entry(
            "engagement_seconds",
            &self.engagement_seconds.map(Hundredths::as_f64),
        )?;
        map.serialize_entry(
            "engagement_pct",
            &self.engagement_pct.map(Hundredths::as_f64),
        )?;
        map.serialize_entry("content_missing", &self.content_missing())?;
        map.serialize_entry("commit_lsn", &self.position.commit_lsn.to_string())?;
        map.serialize_entry("commit_ts", &rfc3339(&self.commit_ts))?;
        if self.extra.iter().any(|(n, _)| collides(n)) {
            map.serialize_entry("extra", &Colliding(&self.extra))?;
        }
        map.end()
    }
}

/// The tables walcast reads (schema `public`).
pub const CONTENT_TABLE: &str = "content";
pub const EVENTS_TABLE: &str = "engagement_events";

/// Why a row or a batch became a dead letter: `analytics.dead_letters.reason`, and the
/// `reason` label of `walcast_dead_letters_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// A column's value does not parse as its type.
    InvalidValue,
    /// The table has no column the event needs (dropped or renamed).
    MissingColumn,
    /// `event_ts` is NULL.
    NullEventTs,
    /// The analytics database refused the event (a value it cannot store, a constraint).
    AnalyticsRejected,
    /// The webhook answered a 4xx other than 408 and 429.
    WebhookRejected,
    /// The webhook did not accept the batch within its retry budget.
    WebhookExhausted,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 6] = [
        DeadLetterReason::InvalidValue,
        DeadLetterReason::MissingColumn,
        DeadLetterReason::NullEventTs,
        DeadLetterReason::AnalyticsRejected,
        DeadLetterReason::WebhookRejected,
        DeadLetterReason::WebhookExhausted,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::InvalidValue => "invalid_value",
            DeadLetterReason::MissingColumn => "missing_column",
            DeadLetterReason::NullEventTs => "null_event_ts",
            DeadLetterReason::AnalyticsRejected => "analytics_rejected",
            DeadLetterReason::WebhookRejected => "webhook_rejected",
            DeadLetterReason::WebhookExhausted => "webhook_exhausted",
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who wrote a dead letter: `analytics.dead_letters.origin`. `verify` tells them apart: a
/// row of origin `source` or `backfill` never became an event; one of origin `postgres` is
/// an event the analytics tables do not have, and only they.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The stream: a row that could not become an event.
    Source,
    /// A backfill: the same, for a row read from the table.
    Backfill,
    /// The analytics sink: an event its database refused.
    Postgres,
    /// The webhook: a batch it did not accept.
    Webhook,
}

impl Origin {
    pub const fn as_str(self) -> &'static str {
        match self {
            Origin::Source => "source",
            Origin::Backfill => "backfill",
            Origin::Postgres => "postgres",
            Origin::Webhook => "webhook",
        }
    }
}

/// A row that cannot become an event: kept with why, where and what it held.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub position: Position,
    pub table: String,
    pub reason: DeadLetterReason,
    /// What exactly was wrong, for the operator.
    pub detail: String,
    /// The row's column values in text form, by name.
    pub raw: Vec<(String, Option<String>)>,
}

impl DeadLetter {
    /// The row's column values as a JSON object (`null` for SQL NULL).
    pub fn raw_json(&self) -> String {
        raw_json(&self.raw)
    }

    /// The row's `id`, when it has one that parses.
    pub fn row_id(&self) -> Option<i64> {
        self.raw
            .iter()
            .find(|(name, _)| name == "id")
            .and_then(|(_, value)| value.as_deref()?.parse().ok())
    }
}

/// Column values by name as a JSON object (`null` for SQL NULL).
pub fn raw_json(values: &[(String, Option<String>)]) -> String {
    let object: serde_json::Map<String, serde_json::Value> = values
        .iter()
        .map(|(name, value)| {
            let value = value
                .as_ref()
                .map_or(serde_json::Value::Null, |v| v.clone().into());
            (name.clone(), value)
        })
        .collect();
    serde_json::Value::Object(object).to_string()
}

/// What the pipeline hands every sink at once: events in commit order, and how far the
/// slot may be acknowledged once every sink has applied them.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<EnrichedEvent>,
    pub dead_letters: Vec<DeadLetter>,
    /// Where the rows come from, and what applying them lets walcast record.
    pub feed: Feed,
    /// Commit time of the newest transaction in the batch, for lag metrics.
    pub commit_ts: Option<DateTime<Utc>>,
    /// Approximate size in bytes of the rows, for the batch byte limit.
    pub bytes: usize,
}

/// Where a batch's rows come from: the stream or a backfill, never both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feed {
    /// Rows from the WAL. `ack_lsn` is the WAL position that is safe to acknowledge once
    /// this batch and all before it are applied everywhere: the end LSN of the last
    /// transaction this batch completes, or a keepalive's WAL end when no transaction was
    /// open; `None` for a batch that ends inside a transaction.
    Stream { ack_lsn: Option<Lsn> },
    /// Rows read from the table by `walcast backfill`. Sinks apply them idempotently by
    /// event id, leave their stream checkpoint alone, and store the backfill's resume
    /// cursor instead.
    Backfill(BackfillMark),
}

impl Default for Feed {
    fn default() -> Self {
        Feed::Stream { ack_lsn: None }
    }
}

/// Where a backfill stands after a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillMark {
    /// The backfill's name (its range), under which the cursor is stored.
    pub job: Arc<str>,
    /// The highest id read so far; `None` in the last batch, when the backfill finished
    /// and the cursor is removed.
    pub cursor: Option<i64>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.dead_letters.is_empty()
            && self.feed == Feed::Stream { ack_lsn: None }
    }

    /// Events plus dead letters.
    pub fn rows(&self) -> usize {
        self.events.len() + self.dead_letters.len()
    }

    /// Position of the last row in the batch, if it has rows.
    pub fn last_position(&self) -> Option<Position> {
        let e = self.events.last().map(|e| e.position);
        let d = self.dead_letters.last().map(|d| d.position);
        e.max(d)
    }

    /// What may be acknowledged once this batch is applied (streamed batches only).
    pub fn ack_lsn(&self) -> Option<Lsn> {
        match self.feed {
            Feed::Stream { ack_lsn } => ack_lsn,
            Feed::Backfill(_) => None,
        }
    }

    /// The backfill's state after this batch; `None` for streamed batches.
    pub fn backfill(&self) -> Option<&BackfillMark> {
        match &self.feed {
            Feed::Backfill(mark) => Some(mark),
            Feed::Stream { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_parts_are_cut_at_a_character_boundary() {
        assert_eq!(key_part("ios"), "ios");
        let long = "é".repeat(KEY_CHARS + 50);
        assert_eq!(key_part(&long).chars().count(), KEY_CHARS);
        assert_eq!(key_part(&long), "é".repeat(KEY_CHARS));
    }

    #[test]
    fn hundredths_print_like_numeric_2() {
        assert_eq!(Hundredths(700).to_string(), "7.00");
        assert_eq!(Hundredths(2).to_string(), "0.02");
        assert_eq!(Hundredths(-105).to_string(), "-1.05");
        assert_eq!(Hundredths(0).to_string(), "0.00");
        assert_eq!(Hundredths(2).as_f64().to_string(), "0.02");
    }

    #[test]
    fn hundredths_parse_what_they_print() {
        for value in [700, 2, -105, 0, 123_456_789] {
            let text = Hundredths(value).to_string();
            assert_eq!(Hundredths::parse(&text), Some(Hundredths(value)), "{text}");
        }
        assert_eq!(Hundredths::parse("3"), Some(Hundredths(300)));
        assert_eq!(Hundredths::parse("-1.5"), Some(Hundredths(-150)));
        for bad in ["", "-", "1.234", "1.x", "a.00", "+1", "1e3"] {
            assert_eq!(Hundredths::parse(bad), None, "{bad}");
        }
    }
}
