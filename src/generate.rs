//! `walcast generate`: realistic load for the source database.
//!
//! A content catalogue (podcasts, newsletters, videos with plausible lengths, some
//! newsletters without one), then events at a steady rate: content chosen by a Zipf
//! distribution over the catalogue (a few titles get most of the traffic), a realistic mix
//! of event types and devices, `duration_ms` consistent with the type (NULL for clicks, at
//! most the content's length otherwise) and a small `raw_payload`. Rows go in as multi-row
//! inserts, one statement per tick of 100 ms.
//!
//! `--bad-share F` makes that share of rows awkward: half with no `content_id`
//! (`content_missing`; an unknown id instead where the table has no foreign key), half
//! with a NULL `event_ts` (a dead letter) where the column allows it; where it does not,
//! those become `content_missing` rows too.

use std::time::{Duration, Instant};

use rand::Rng;
use rand::seq::IndexedRandom;
use rand_distr::{Distribution, Zipf};
use tokio_postgres::Client;

use crate::config::SourceUrl;

/// Rows per tick are spread over this period.
const TICK: Duration = Duration::from_millis(100);
/// How often progress is printed.
const REPORT_EVERY: Duration = Duration::from_secs(5);
const DEVICES: [&str; 6] = [
    "ios",
    "android",
    "web-safari",
    "web-chrome",
    "web-firefox",
    "smart-tv",
];
/// Event types and their weights: most sessions start with a play.
const EVENT_TYPES: [(&str, u32); 4] = [("play", 45), ("pause", 20), ("finish", 12), ("click", 23)];

/// Settings of `walcast generate`.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub source: SourceUrl,

    /// Events per second.
    #[arg(long, env = "WALCAST_GENERATE_RATE", default_value_t = 1000)]
    pub rate: u32,

    /// Stop after this long (e.g. `30s`), having inserted exactly rate × duration events;
    /// runs until Ctrl-C without it.
    #[arg(long, env = "WALCAST_GENERATE_DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,

    /// Share of awkward rows, 0 to 1: content missing, and dead letters where the
    /// schema allows a NULL event_ts.
    #[arg(long, env = "WALCAST_GENERATE_BAD_SHARE", default_value_t = 0.0)]
    pub bad_share: f64,

    /// Content rows to have in the catalogue (created when fewer exist).
    #[arg(long, env = "WALCAST_GENERATE_CONTENT", default_value_t = 200)]
    pub content: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {}", crate::pg::detail(source))]
    Postgres {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Connect(#[from] crate::pg::ConnectError),
}

fn pg(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> GenerateError {
    move |source| GenerateError::Postgres { context, source }
}

/// What was generated.
#[derive(Debug, Default, Clone, Copy)]
pub struct Generated {
    pub events: u64,
    pub content_missing: u64,
    pub null_event_ts: u64,
    pub elapsed: Duration,
}

impl Generated {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }
}

/// What the table allows, so awkward rows are ones it accepts.
struct Schema {
    has_foreign_key: bool,
    event_ts_nullable: bool,
}

/// Generates until `duration` is over or `stop` completes.
pub async fn run(
    args: &GenerateArgs,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Generated, GenerateError> {
    if args.rate == 0 {
        return Err(GenerateError::Invalid("--rate must be at least 1".into()));
    }
    if !(0.0..=1.0).contains(&args.bad_share) {
        return Err(GenerateError::Invalid(
            "--bad-share must be between 0 and 1".into(),
        ));
    }
    if args.content == 0 {
        return Err(GenerateError::Invalid(
            "--content must be at least 1".into(),
        ));
    }
    let client = crate::pg::connect("WALCAST_SOURCE_URL", &args.source.pg_config()?).await?;
    let catalogue = ensure_catalogue(&client, args.content).await?;
    let schema = schema(&client).await?;
    let statement = client
        .prepare(
            "INSERT INTO engagement_events
                 (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
             SELECT content_id::uuid, user_id::uuid, event_type,
                    CASE WHEN null_ts THEN NULL ELSE now() END, duration_ms, device,
                    raw_payload::jsonb
             FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::int4[],
                         $6::text[], $7::text[])
                 AS r(content_id, user_id, event_type, null_ts, duration_ms, device, raw_payload)",
        )
        .await
        .map_err(pg("preparing the insert"))?;
    let zipf = Zipf::new(catalogue.len() as f64, 1.1).expect("a catalogue is not empty");
    let users: Vec<String> = (0..5_000).map(|_| uuid(&mut rand::rng())).collect();
    let target = args
        .duration
        .map(|d| (f64::from(args.rate) * d.as_secs_f64()).round() as u64);
    let started = Instant::now();
    let mut generated = Generated::default();
    let mut last_report = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            biased;
            () = &mut stop => break,
            _ = tick.tick() => {}
        }
        // Rows due by now, so the rate holds even when a tick runs late.
        let due = (f64::from(args.rate) * started.elapsed().as_secs_f64()).ceil() as u64;
        let due = target.map_or(due, |t| due.min(t));
        let n = due.saturating_sub(generated.events) as usize;
        if n > 0 {
            let rows = Rows::random(n, &catalogue, &zipf, &users, args.bad_share, &schema);
            client
                .execute(
                    &statement,
                    &[
                        &rows.content_id,
                        &rows.user_id,
                        &rows.event_type,
                        &rows.null_ts,
                        &rows.duration_ms,
                        &rows.device,
                        &rows.raw_payload,
                    ],
                )
                .await
                .map_err(pg("inserting events"))?;
            generated.events += n as u64;
            generated.content_missing += rows.content_missing;
            generated.null_event_ts += rows.null_ts.iter().filter(|b| **b).count() as u64;
        }
        generated.elapsed = started.elapsed();
        if last_report.elapsed() >= REPORT_EVERY {
            last_report = Instant::now();
            tracing::info!(
                events = generated.events,
                rate = generated.rate().round() as u64,
                "generating"
            );
        }
        if target.is_some_and(|t| generated.events >= t) {
            break;
        }
    }
    generated.elapsed = started.elapsed();
    Ok(generated)
}

/// One content row as the generator needs it: id and length in seconds.
#[derive(Debug, Clone)]
struct Item {
    id: String,
    length_seconds: Option<i32>,
}

/// An insert of `missing` content rows, numbered after `have`.
fn catalogue_sql(have: i64, missing: i64) -> String {
    let mut rng = rand::rng();
    let mut sql = String::from(
        "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES ",
    );
    for i in 0..missing {
        let (kind, length) = match rng.random_range(0..10) {
            0..=4 => ("podcast", Some(rng.random_range(600..5_400))),
            5..=7 => ("video", Some(rng.random_range(60..1_800))),
            // Newsletters: a reading time, or none known.
            _ => (
                "newsletter",
                rng.random_bool(0.5).then(|| rng.random_range(120..900)),
            ),
        };
        let id = uuid(&mut rng);
        let n = have + i + 1;
        if i > 0 {
            sql.push(',');
        }
        sql.push_str(&format!(
            "('{id}', '{kind}-{n}-{}', 'The {kind} number {n}', '{kind}', {}, now() - interval '{} days')",
            &id[..8],
            length.map_or("NULL".to_owned(), |l: i32| l.to_string()),
            rng.random_range(0..365)
        ));
    }
    sql
}

/// Makes sure `wanted` content rows exist; returns the catalogue, most popular first.
async fn ensure_catalogue(client: &Client, wanted: u32) -> Result<Vec<Item>, GenerateError> {
    let have: i64 = client
        .query_one("SELECT count(*) FROM content", &[])
        .await
        .map_err(pg("counting content"))?
        .get(0);
    let missing = i64::from(wanted).saturating_sub(have).max(0);
    if missing > 0 {
        let sql = catalogue_sql(have, missing);
        client
            .batch_execute(&sql)
            .await
            .map_err(pg("creating the content catalogue"))?;
        tracing::info!(created = missing, "content catalogue created");
    }
    let rows = client
        .query(
            "SELECT id::text, length_seconds FROM content ORDER BY id LIMIT $1",
            &[&i64::from(wanted)],
        )
        .await
        .map_err(pg("reading the content catalogue"))?;
    Ok(rows
        .iter()
        .map(|row| Item {
            id: row.get(0),
            length_seconds: row.get(1),
        })
        .collect())
}

async fn schema(client: &Client) -> Result<Schema, GenerateError> {
    let row = client
        .query_one(
            "SELECT
                 EXISTS (SELECT FROM pg_constraint
                         WHERE conrelid = 'public.engagement_events'::regclass AND contype = 'f'),
                 (SELECT NOT attnotnull FROM pg_attribute
                  WHERE attrelid = 'public.engagement_events'::regclass AND attname = 'event_ts')",
            &[],
        )
        .await
        .map_err(pg("reading the engagement_events definition"))?;
    Ok(Schema {
        has_foreign_key: row.get(0),
        event_ts_nullable: row.get::<_, Option<bool>>(1).unwrap_or(false),
    })
}

/// Parallel columns for one multi-row insert.
#[derive(Default)]
struct Rows {
    content_id: Vec<Option<String>>,
    user_id: Vec<Option<String>>,
    event_type: Vec<String>,
    null_ts: Vec<bool>,
    duration_ms: Vec<Option<i32>>,
    device: Vec<String>,
    raw_payload: Vec<String>,
    content_missing: u64,
}

impl Rows {
    fn random(
        n: usize,
        catalogue: &[Item],
        zipf: &Zipf<f64>,
        users: &[String],
        bad_share: f64,
        schema: &Schema,
    ) -> Rows {
        let mut rng = rand::rng();
        let mut rows = Rows::default();
        let weights: u32 = EVENT_TYPES.iter().map(|(_, w)| w).sum();
        for _ in 0..n {
            let item = &catalogue[(zipf.sample(&mut rng) as usize - 1).min(catalogue.len() - 1)];
            let mut pick = rng.random_range(0..weights);
            let event_type = EVENT_TYPES
                .iter()
                .find(|(_, w)| {
                    let hit = pick < *w;
                    pick = pick.saturating_sub(*w);
                    hit
                })
                .map_or("play", |(t, _)| t);
            let length_ms = item.length_seconds.map_or(600_000, |s| s.max(1) * 1000);
            let duration_ms = match event_type {
                "click" => None,
                "finish" => Some(length_ms),
                _ => Some(rng.random_range(0..=length_ms)),
            };
            let bad = rng.random_bool(bad_share);
            let null_ts = bad && schema.event_ts_nullable && rng.random_bool(0.5);
            let content_id = if bad && !null_ts {
                rows.content_missing += 1;
                // Without the foreign key an unknown id is accepted; with it, only NULL.
                (!schema.has_foreign_key && rng.random_bool(0.5)).then(|| uuid(&mut rng))
            } else {
                Some(item.id.clone())
            };
            rows.content_id.push(content_id);
            rows.user_id.push(
                rng.random_bool(0.98)
                    .then(|| users.choose(&mut rng).cloned())
                    .flatten(),
            );
            rows.event_type.push(event_type.to_owned());
            rows.null_ts.push(null_ts);
            rows.duration_ms.push(duration_ms);
            rows.device
                .push((*DEVICES.choose(&mut rng).expect("devices")).to_owned());
            rows.raw_payload.push(format!(
                r#"{{"app_version":"4.{}.{}","session":"{:08x}"}}"#,
                rng.random_range(0..9),
                rng.random_range(0..20),
                rng.random::<u32>()
            ));
        }
        rows
    }
}

/// A random (version 4) UUID in text form.
fn uuid(rng: &mut impl Rng) -> String {
    let b: [u8; 16] = rng.random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_version_4_text() {
        let id = uuid(&mut rand::rng());
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn rows_follow_the_type_rules_and_the_bad_share() {
        let catalogue: Vec<Item> = (0..50)
            .map(|i| Item {
                id: format!("00000000-0000-4000-8000-{i:012}"),
                length_seconds: (i % 5 != 0).then_some(300),
            })
            .collect();
        let zipf = Zipf::new(50.0, 1.1).unwrap();
        let users = vec!["10000000-0000-4000-8000-000000000001".to_owned()];
        let schema = Schema {
            has_foreign_key: true,
            event_ts_nullable: true,
        };
        let rows = Rows::random(20_000, &catalogue, &zipf, &users, 0.1, &schema);
        for (t, d) in rows.event_type.iter().zip(&rows.duration_ms) {
            assert_eq!(t == "click", d.is_none(), "{t} {d:?}");
        }
        let null_ts = rows.null_ts.iter().filter(|b| **b).count() as f64 / 20_000.0;
        let missing = rows.content_id.iter().filter(|c| c.is_none()).count() as f64 / 20_000.0;
        assert!((0.04..0.06).contains(&null_ts), "{null_ts}");
        assert!((0.04..0.06).contains(&missing), "{missing}");
        // Zipf: the most popular title gets far more than an even share (2%).
        let top = rows
            .content_id
            .iter()
            .filter(|c| c.as_deref() == Some(catalogue[0].id.as_str()))
            .count() as f64
            / 20_000.0;
        assert!(top > 0.1, "{top}");
    }
}
