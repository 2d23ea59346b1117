//! `engagement_events` row → [`EnrichedEvent`], and the arithmetic of the derived fields.
//!
//! The rules (the README's "What it does"): `engagement_seconds = round(duration_ms / 1000, 2)`
//! and `engagement_pct = round(duration_ms / 1000 / length_seconds, 2)` from the unrounded
//! seconds, NULL when an input is NULL or the length is 0, rounding half away from zero as
//! PostgreSQL's `round(numeric, 2)` does. Both are computed exactly in integers: the
//! result in hundredths is a ratio of two integers rounded once, so there is no floating
//! point step that could land on the other side of a .xx5 boundary.

use std::sync::Arc;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::value::RawValue;

use super::ContentCache;
use crate::decode::{Relation, Tuple, Value};
use crate::event::{DeadLetter, DeadLetterReason, EnrichedEvent, Hundredths};
use crate::lsn::Position;

/// The contract's columns; any other column of the table is carried as text in `extra`.
const KNOWN: [&str; 8] = [
    "id",
    "content_id",
    "user_id",
    "event_type",
    "event_ts",
    "duration_ms",
    "device",
    "raw_payload",
];

/// `num / den` rounded to the nearest integer, halves away from zero. `den` must not be 0.
fn div_round_half_away(num: i128, den: i128) -> i128 {
    let q = (2 * num.abs() + den.abs()) / (2 * den.abs());
    if (num < 0) != (den < 0) { -q } else { q }
}

/// `round(duration_ms / 1000, 2)`.
pub fn engagement_seconds(duration_ms: Option<i32>) -> Option<Hundredths> {
    let ms = i128::from(duration_ms?);
    Some(Hundredths(div_round_half_away(ms, 10) as i64))
}

/// `round(duration_ms / 1000 / length_seconds, 2)`; NULL when either is NULL or the length
/// is 0.
pub fn engagement_pct(duration_ms: Option<i32>, length_seconds: Option<i32>) -> Option<Hundredths> {
    let ms = i128::from(duration_ms?);
    let len = i128::from(length_seconds?);
    if len == 0 {
        return None;
    }
    // hundredths = ms / 1000 / len * 100 = ms / (10 * len)
    Some(Hundredths(div_round_half_away(ms, 10 * len) as i64))
}

/// Parses `timestamptz` text output with DateStyle ISO (`2026-11-21 19:57:00.123456+00`,
/// offsets with or without minutes). The replication session pins `DateStyle=ISO` and
/// `TimeZone=UTC`, but any offset is accepted.
pub fn parse_timestamptz(s: &str) -> Option<DateTime<Utc>> {
    if let Some(ts) = parse_iso(s.as_bytes()) {
        return Some(ts);
    }
    if let Ok(ts) = DateTime::parse_from_str(s, TIMESTAMPTZ_FORMAT) {
        return Some(ts.with_timezone(&Utc));
    }
    // A plain `timestamp` column in a user's schema: read it as UTC.
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|naive| naive.and_utc())
}

/// `timestamptz` text as chrono's general parser reads it.
const TIMESTAMPTZ_FORMAT: &str = "%Y-%m-%d %H:%M:%S%.f%#z";

/// The form PostgreSQL prints with `DateStyle=ISO`, `YYYY-MM-DD HH:MM:SS[.f{1,6}]` and an
/// offset `±HH[:MM[:SS]]`, read by position. chrono's format-string parser re-reads its
/// format for every value; by position, `tuple_to_event` in the hot-path benchmark takes
/// 0.24 µs per event instead of 0.46. `None` for anything else (years beyond 9999, BC, a
/// plain `timestamp`), which the general parser then reads.
fn parse_iso(s: &[u8]) -> Option<DateTime<Utc>> {
    fn digits(s: &[u8]) -> Option<u32> {
        s.iter().try_fold(0u32, |n, b| {
            b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
        })
    }
    if s.len() < 22
        || s[4] != b'-'
        || s[7] != b'-'
        || s[10] != b' '
        || s[13] != b':'
        || s[16] != b':'
    {
        return None;
    }
    let date = chrono::NaiveDate::from_ymd_opt(
        digits(&s[0..4])? as i32,
        digits(&s[5..7])?,
        digits(&s[8..10])?,
    )?;
    let mut rest = &s[19..];
    let mut micros = 0;
    if let Some(fraction) = rest.strip_prefix(b".") {
        let len = fraction.iter().take_while(|b| b.is_ascii_digit()).count();
        if len == 0 || len > 6 {
            return None;
        }
        micros = digits(&fraction[..len])? * 10u32.pow(6 - len as u32);
        rest = &fraction[len..];
    }
    let time = chrono::NaiveTime::from_hms_micro_opt(
        digits(&s[11..13])?,
        digits(&s[14..16])?,
        digits(&s[17..19])?,
        micros,
    )?;
    let (sign, offset) = match rest.split_first()? {
        (b'+', offset) => (1, offset),
        (b'-', offset) => (-1, offset),
        _ => return None,
    };
    let seconds = match offset {
        [h1, h2] => digits(&[*h1, *h2])? * 3600,
        [h1, h2, b':', m1, m2] => digits(&[*h1, *h2])? * 3600 + digits(&[*m1, *m2])? * 60,
        [h1, h2, b':', m1, m2, b':', s1, s2] => {
            digits(&[*h1, *h2])? * 3600 + digits(&[*m1, *m2])? * 60 + digits(&[*s1, *s2])?
        }
        _ => return None,
    };
    let local = date.and_time(time).and_utc();
    Some(local - chrono::TimeDelta::seconds(sign * i64::from(seconds)))
}

/// Checks the canonical text form of a uuid (8-4-4-4-12 hex digits).
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// The row's values by column name, as text: what a dead letter keeps.
pub fn raw_values(rel: &Relation, tuple: &Tuple) -> Vec<(String, Option<String>)> {
    rel.columns
        .iter()
        .zip(tuple)
        .map(|(col, value)| {
            let text = match value {
                Value::Text(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
                Value::Null => None,
                Value::Unchanged => Some("(unchanged toast)".to_owned()),
            };
            (col.name.clone(), text)
        })
        .collect()
}

/// Builds the event for an inserted row, or says why the row cannot be one.
pub fn event(
    rel: &Relation,
    tuple: &Tuple,
    position: Position,
    commit_ts: DateTime<Utc>,
    cache: &ContentCache,
) -> Result<EnrichedEvent, DeadLetter> {
    let dead = |reason: DeadLetterReason, detail: String| DeadLetter {
        position,
        table: rel.name.clone(),
        reason,
        detail,
        raw: raw_values(rel, tuple),
    };
    // Looks a column up by name; a column the table no longer has is `Err(name)`.
    let get = |name: &'static str| -> Result<Option<&str>, &'static str> {
        let i = rel.column_index(name).ok_or(name)?;
        match tuple.get(i) {
            Some(Value::Text(bytes)) => std::str::from_utf8(bytes).map(Some).map_err(|_| name),
            _ => Ok(None),
        }
    };
    let optional = |name: &'static str| get(name).unwrap_or(None);
    let invalid = |name: &str, value: &str, what: &str| {
        dead(
            DeadLetterReason::InvalidValue,
            format!("column {name}: {value:?} is not {what}"),
        )
    };

    let missing = |name: &str| dead(DeadLetterReason::MissingColumn, format!("no column {name}"));
    let id = match get("id") {
        Err(name) => return Err(missing(name)),
        Ok(None) => return Err(dead(DeadLetterReason::InvalidValue, "id is NULL".into())),
        Ok(Some(s)) => s.parse::<i64>().map_err(|_| invalid("id", s, "a bigint"))?,
    };
    let event_ts = match get("event_ts") {
        Err(name) => return Err(missing(name)),
        Ok(None) => {
            return Err(dead(
                DeadLetterReason::NullEventTs,
                "event_ts is NULL".into(),
            ));
        }
        Ok(Some(s)) => parse_timestamptz(s).ok_or_else(|| invalid("event_ts", s, "a timestamp"))?,
    };
    let content_id = optional("content_id");
    if let Some(s) = content_id
        && !is_uuid(s)
    {
        return Err(invalid("content_id", s, "a uuid"));
    }
    let user_id = optional("user_id");
    if let Some(s) = user_id
        && !is_uuid(s)
    {
        return Err(invalid("user_id", s, "a uuid"));
    }
    let duration_ms = match optional("duration_ms") {
        None => None,
        Some(s) => Some(
            s.parse::<i32>()
                .map_err(|_| invalid("duration_ms", s, "an integer"))?,
        ),
    };
    let raw_payload = match optional("raw_payload") {
        None => None,
        Some(s) => Some(
            RawValue::from_string(s.to_owned()).map_err(|_| invalid("raw_payload", s, "JSON"))?,
        ),
    };
    let extra = rel
        .columns
        .iter()
        .zip(tuple)
        .filter(|(col, _)| !KNOWN.contains(&col.name.as_str()))
        .map(|(col, value)| (col.name.clone(), value.as_str().map(str::to_owned)))
        .collect();

    let content = content_id.and_then(|id| cache.get(id)).map(Arc::clone);
    let length_seconds = content.as_ref().and_then(|c| c.length_seconds);
    Ok(EnrichedEvent {
        position,
        commit_ts,
        id,
        content_id: content_id.map(str::to_owned),
        user_id: user_id.map(str::to_owned),
        event_type: optional("event_type").map(str::to_owned),
        event_ts,
        duration_ms,
        device: optional("device").map(str::to_owned),
        raw_payload,
        extra,
        content,
        engagement_seconds: engagement_seconds(duration_ms),
        engagement_pct: engagement_pct(duration_ms, length_seconds),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: i64) -> Option<Hundredths> {
        Some(Hundredths(v))
    }

    #[test]
    fn golden_case_from_the_task() {
        // 7000 ms of a 300 s episode.
        assert_eq!(engagement_seconds(Some(7000)), h(700));
        assert_eq!(engagement_pct(Some(7000), Some(300)), h(2));
    }

    #[test]
    fn null_and_zero_rules() {
        assert_eq!(engagement_seconds(None), None);
        assert_eq!(engagement_seconds(Some(0)), h(0));
        assert_eq!(engagement_pct(None, Some(300)), None);
        assert_eq!(engagement_pct(Some(7000), None), None);
        assert_eq!(engagement_pct(Some(7000), Some(0)), None);
        assert_eq!(engagement_pct(Some(0), Some(300)), h(0));
    }

    #[test]
    fn rounds_half_away_from_zero_like_postgres() {
        // round(1.005, 2) = 1.01; round(1.004, 2) = 1.00; round(-1.005, 2) = -1.01
        assert_eq!(engagement_seconds(Some(1005)), h(101));
        assert_eq!(engagement_seconds(Some(1004)), h(100));
        assert_eq!(engagement_seconds(Some(-1005)), h(-101));
        // 1500 ms / 200 s = 0.0075 -> 0.01; 1499 ms / 200 s = 0.007495 -> 0.01
        assert_eq!(engagement_pct(Some(1500), Some(200)), h(1));
        assert_eq!(engagement_pct(Some(999), Some(200)), h(0));
        // Exactly half: 25 ms / 1 s = 0.025 -> 0.03; from unrounded seconds, not 0.03/1.
        assert_eq!(engagement_pct(Some(25), Some(1)), h(3));
        assert_eq!(engagement_pct(Some(i32::MAX), Some(1)), h(214_748_365));
        assert_eq!(engagement_pct(Some(7000), Some(-300)), h(-2));
    }

    #[test]
    fn parses_timestamptz_text_forms() {
        let a = parse_timestamptz("2026-11-21 19:57:00.123456+00").unwrap();
        assert_eq!(a.to_rfc3339(), "2026-11-21T19:57:00.123456+00:00");
        let b = parse_timestamptz("2026-11-21 21:27:00+01:30").unwrap();
        assert_eq!(b.to_rfc3339(), "2026-11-21T19:57:00+00:00");
        let c = parse_timestamptz("2026-11-21 16:27:00.5-03:30").unwrap();
        assert_eq!(c.to_rfc3339(), "2026-11-21T19:57:00.500+00:00");
        let d = parse_timestamptz("1900-01-01 00:00:00+00:19:32").unwrap();
        assert_eq!(d.to_rfc3339(), "1899-12-31T23:40:28+00:00");
        // What the fast path leaves to the general parser, and what neither reads.
        let e = parse_timestamptz("2026-11-21 19:57:00.1234567+00").unwrap();
        assert_eq!(e.timestamp_subsec_nanos(), 123_456_700);
        assert_eq!(
            parse_timestamptz("2026-11-21 19:57:00")
                .unwrap()
                .to_rfc3339(),
            "2026-11-21T19:57:00+00:00"
        );
        assert!(parse_timestamptz("2026-11-21 25:57:00+00").is_none());
        assert!(parse_timestamptz("2026-02-30 19:57:00+00").is_none());
        assert!(parse_timestamptz("2026-11-21 19:57:00+0x").is_none());
        assert!(parse_timestamptz("infinity").is_none());
        assert!(parse_timestamptz("2026-13-01 00:00:00+00").is_none());
    }

    #[test]
    fn the_fast_path_reads_what_the_general_parser_reads() {
        for date in ["2026-11-21", "2024-02-29", "0001-01-01", "9999-12-31"] {
            for time in ["00:00:00", "23:59:59", "19:57:00.1", "19:57:00.000001"] {
                for offset in ["+00", "-00", "+05:30", "-11", "+14:00"] {
                    let text = format!("{date} {time}{offset}");
                    let general = DateTime::parse_from_str(&text, TIMESTAMPTZ_FORMAT)
                        .map(|ts| ts.with_timezone(&Utc))
                        .ok();
                    assert_eq!(parse_iso(text.as_bytes()), general, "{text}");
                }
            }
        }
    }

    #[test]
    fn uuid_shape() {
        assert!(is_uuid("0b7c4c4e-8f6a-4c59-9a57-2f1d1d3b7e11"));
        assert!(!is_uuid("0b7c4c4e8f6a4c599a572f1d1d3b7e11"));
        assert!(!is_uuid("0b7c4c4e-8f6a-4c59-9a57-2f1d1d3b7e1z"));
    }
}
