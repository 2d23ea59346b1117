//! Micro-benchmarks of the CPU hot paths, per event (`cargo bench --bench hot_paths`):
//! pgoutput decode, tuple → event, decode + enrich as the source loop runs them, and the
//! event JSON every sink sends (the bulk of a Redis script call and of a webhook body).
//! Inputs are pgoutput bytes captured from PostgreSQL 15 (as in src/decode/tests.rs).

use std::hint::black_box;

use bytes::Bytes;
use chrono::Utc;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use walcast::decode::{self, Change, Column, Relation, Value};
use walcast::enrich::{ContentCache, Enricher, Outcome, row_event};
use walcast::lsn::{Lsn, Position};

const RELATION_EVENTS: &str = "520000400b7075626c696300656e676167656d656e745f6576656e7473006400080169640000000014ffffffff00636f6e74656e745f69640000000b86ffffffff00757365725f69640000000b86ffffffff006576656e745f747970650000000019ffffffff006576656e745f747300000004a0ffffffff006475726174696f6e5f6d730000000017ffffffff006465766963650000000019ffffffff007261775f7061796c6f61640000000edaffffffff";
const INSERT_EVENT: &str = "490000400b4e0008740000000131740000002430303030303030302d303030302d303030302d303030302d3030303030303030303030316e7400000004706c6179740000001d323032362d31312d32312031393a35373a30302e3132333435362b30307400000004373030307400000003696f7374000000087b2261223a20317d";
const EPISODE: &str = "00000000-0000-0000-0000-000000000001";
/// Events per iteration.
const N: u64 = 1_000;

fn hex(s: &str) -> Bytes {
    Bytes::from(
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect::<Vec<u8>>(),
    )
}

fn text(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

/// A cache holding the content the captured insert refers to (a 300 s podcast).
fn cache() -> ContentCache {
    let rel = Relation {
        id: 1,
        namespace: "public".into(),
        name: "content".into(),
        replica_identity: b'd',
        columns: [
            "id",
            "slug",
            "title",
            "content_type",
            "length_seconds",
            "publish_ts",
        ]
        .iter()
        .map(|name| Column {
            name: (*name).into(),
            type_oid: 25,
            is_key: *name == "id",
        })
        .collect(),
    };
    let row = vec![
        text(EPISODE),
        text("episode"),
        text("An episode"),
        text("podcast"),
        text("300"),
        text("2026-11-21 19:57:00+00"),
    ];
    let mut cache = ContentCache::default();
    cache.upsert(&rel, None, &row).unwrap();
    cache
}

fn benches(c: &mut Criterion) {
    let relation_bytes = hex(RELATION_EVENTS);
    let insert_bytes = hex(INSERT_EVENT);
    let Change::Relation(relation) = decode::decode(&relation_bytes).unwrap() else {
        panic!("not a relation");
    };
    let Change::Insert { new: tuple, .. } = decode::decode(&insert_bytes).unwrap() else {
        panic!("not an insert");
    };
    let cache = cache();
    let commit_ts = Utc::now();
    let position = Position::new(Lsn(0x16B_3748), 0);

    let mut group = c.benchmark_group("per_event");
    group.throughput(Throughput::Elements(N));
    group.bench_function("pgoutput_decode_insert", |b| {
        b.iter(|| {
            for _ in 0..N {
                black_box(decode::decode(black_box(&insert_bytes)).unwrap());
            }
        })
    });
    group.bench_function("tuple_to_event", |b| {
        b.iter(|| {
            for _ in 0..N {
                black_box(
                    row_event(&relation, black_box(&tuple), position, commit_ts, &cache).unwrap(),
                );
            }
        })
    });
    group.bench_function("decode_and_enrich", |b| {
        let mut enricher = Enricher::new(self::cache());
        let relation_change = decode::decode(&relation_bytes).unwrap();
        enricher
            .apply(relation_change, position, commit_ts)
            .unwrap();
        b.iter(|| {
            for _ in 0..N {
                let change = decode::decode(black_box(&insert_bytes)).unwrap();
                let Outcome::Event(event) = enricher.apply(change, position, commit_ts).unwrap()
                else {
                    panic!("not an event");
                };
                black_box(event);
            }
        })
    });
    let event = row_event(&relation, &tuple, position, commit_ts, &cache).unwrap();
    group.bench_function("event_json", |b| {
        b.iter(|| {
            for _ in 0..N {
                black_box(black_box(&event).to_json());
            }
        })
    });
    // The MULTI/EXEC of a streamed Redis write of N events, encoded: keys, JSON (once per
    // event, sent twice), summed counters, leaderboard scores and recent lists.
    let events: Vec<_> = (0..N as i64)
        .map(|i| {
            let mut event = event.clone();
            event.id = i;
            event.position = Position::new(Lsn(0x16B_3748), i as u32);
            event
        })
        .collect();
    let now = Utc::now().timestamp();
    group.bench_function("redis_command_encoding", |b| {
        b.iter(|| {
            black_box(walcast::sink::redis::encode_transaction(
                black_box(&events),
                now,
            ))
        })
    });
    group.finish();
}

criterion_group!(hot_paths, benches);
criterion_main!(hot_paths);
