//! Decoder tests on pgoutput bytes captured from PostgreSQL 15 with
//! `pg_logical_slot_peek_binary_changes(slot, NULL, NULL, 'proto_version', '1', ...)`
//! against the schema in sql/001.

use super::*;

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

const RELATION_EVENTS: &str = "520000400b7075626c696300656e676167656d656e745f6576656e7473006400080169640000000014ffffffff00636f6e74656e745f69640000000b86ffffffff00757365725f69640000000b86ffffffff006576656e745f747970650000000019ffffffff006576656e745f747300000004a0ffffffff006475726174696f6e5f6d730000000017ffffffff006465766963650000000019ffffffff007261775f7061796c6f61640000000edaffffffff";
const INSERT_EVENT: &str = "490000400b4e0008740000000131740000002430303030303030302d303030302d303030302d303030302d3030303030303030303030316e7400000004706c6179740000001d323032362d31312d32312031393a35373a30302e3132333435362b30307400000004373030307400000003696f7374000000087b2261223a20317d";
/// UPDATE content SET length_seconds = 61 on a row whose title is TOASTed: `u` for title.
const UPDATE_UNCHANGED_TOAST: &str = "55000040004e0006740000002430303030303030302d303030302d303030302d303030302d3030303030303030303030337400000003626967757400000005766964656f740000000236317400000016323032362d31312d32312031393a35373a30302b3030";
/// UPDATE content SET id = …4: the old key (`K`) precedes the new row.
const UPDATE_KEY: &str = "55000040004b0006740000002430303030303030302d303030302d303030302d303030302d3030303030303030303030336e6e6e6e6e4e0006740000002430303030303030302d303030302d303030302d303030302d3030303030303030303030347400000003626967757400000005766964656f740000000236317400000016323032362d31312d32312031393a35373a30302b3030";
const DELETE_EVENT: &str = "440000400b4b00087400000001316e6e6e6e6e6e6e";
const TRUNCATE_EVENTS: &str = "5400000001000000400b";

#[test]
fn relation_maps_column_names_types_and_keys() {
    let Change::Relation(rel) = decode(&hex(RELATION_EVENTS)).unwrap() else {
        panic!("not a relation")
    };
    assert_eq!(rel.id, 0x400b);
    assert_eq!(
        (rel.namespace.as_str(), rel.name.as_str()),
        ("public", "engagement_events")
    );
    assert_eq!(rel.replica_identity, b'd');
    let names: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "id",
            "content_id",
            "user_id",
            "event_type",
            "event_ts",
            "duration_ms",
            "device",
            "raw_payload"
        ]
    );
    assert!(rel.columns[0].is_key && !rel.columns[1].is_key);
    assert_eq!(rel.columns[0].type_oid, 20); // int8
    assert_eq!(rel.columns[7].type_oid, 3802); // jsonb
    assert_eq!(rel.column_index("device"), Some(6));
}

#[test]
fn insert_carries_text_values_and_nulls() {
    let Change::Insert { relation, new } = decode(&hex(INSERT_EVENT)).unwrap() else {
        panic!("not an insert")
    };
    assert_eq!(relation, 0x400b);
    assert_eq!(new.len(), 8);
    assert_eq!(new[0], text("1"));
    assert_eq!(new[1], text("00000000-0000-0000-0000-000000000001"));
    assert_eq!(new[2], Value::Null);
    assert_eq!(new[4], text("2026-11-21 19:57:00.123456+00"));
    assert_eq!(new[7], text("{\"a\": 1}"));
}

#[test]
fn update_marks_unchanged_toast_and_old_keys() {
    let Change::Update { old, new, .. } = decode(&hex(UPDATE_UNCHANGED_TOAST)).unwrap() else {
        panic!("not an update")
    };
    assert_eq!(old, None);
    assert_eq!(new[2], Value::Unchanged, "the TOASTed title was not resent");
    assert_eq!(new[4], text("61"));

    let Change::Update { old, new, .. } = decode(&hex(UPDATE_KEY)).unwrap() else {
        panic!("not an update")
    };
    let old = old.expect("key change sends the old key");
    assert_eq!(old[0], text("00000000-0000-0000-0000-000000000003"));
    assert_eq!(old[1], Value::Null);
    assert_eq!(new[0], text("00000000-0000-0000-0000-000000000004"));
}

#[test]
fn delete_and_truncate() {
    assert_eq!(
        decode(&hex(DELETE_EVENT)).unwrap(),
        Change::Delete {
            relation: 0x400b,
            old: vec![
                text("1"),
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null,
                Value::Null
            ],
        }
    );
    assert_eq!(
        decode(&hex(TRUNCATE_EVENTS)).unwrap(),
        Change::Truncate {
            relations: vec![0x400b]
        }
    );
}

#[test]
fn every_truncation_of_a_message_is_an_error_not_a_panic() {
    for fixture in [
        RELATION_EVENTS,
        INSERT_EVENT,
        UPDATE_KEY,
        DELETE_EVENT,
        TRUNCATE_EVENTS,
    ] {
        let full = hex(fixture);
        for len in 0..full.len() {
            assert!(
                decode(&full.slice(..len)).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
    }
    assert_eq!(
        decode(&Bytes::from_static(b"Z")),
        Err(DecodeError::UnknownMessage('Z'))
    );
}

#[test]
fn relation_cache_reports_unknown_ids() {
    let mut cache = RelationCache::default();
    assert_eq!(cache.get(7).unwrap_err(), DecodeError::UnknownRelation(7));
    let Change::Relation(rel) = decode(&hex(RELATION_EVENTS)).unwrap() else {
        unreachable!()
    };
    cache.insert(rel);
    assert_eq!(cache.get(0x400b).unwrap().name, "engagement_events");
}

#[test]
fn message_kinds_are_named_for_errors() {
    assert_eq!(super::message_kind(b"I\0\0"), "Insert ('I')");
    assert_eq!(super::message_kind(b"Zxx"), "unknown ('Z')");
    assert_eq!(super::message_kind(b""), "empty");
}
