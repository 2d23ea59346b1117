//! The content cache: `content.id` → the columns events are enriched with.
//!
//! Loaded once at start with a plain SELECT, then changed only by `content` changes from the
//! replication stream, in commit order. Entries are `Arc`s: an event keeps the version it
//! was enriched with even if a later change replaces the entry.
//!
//! One limit follows from loading at start: when walcast restarts behind a backlog, the
//! replayed events are enriched with the content as it is at start-up, not as it was when
//! they committed (content changes inside the backlog still apply in order). Only a
//! snapshot exported with the slot could do better, and only at slot creation.

use std::collections::HashMap;
use std::sync::Arc;

use crate::decode::{Relation, Tuple, Value};
use crate::event::Content;

#[derive(Debug, Default)]
pub struct ContentCache {
    rows: HashMap<String, Arc<Content>>,
}

impl ContentCache {
    /// Reads the whole `content` table.
    pub async fn load(client: &tokio_postgres::Client) -> Result<Self, tokio_postgres::Error> {
        let rows = client
            .query(
                "SELECT id::text, slug, title, content_type, length_seconds FROM public.content",
                &[],
            )
            .await?;
        let mut cache = ContentCache::default();
        for row in rows {
            let content = Content {
                id: row.get(0),
                slug: row.get(1),
                title: row.get(2),
                content_type: row.get(3),
                length_seconds: row.get(4),
            };
            cache.rows.insert(content.id.clone(), Arc::new(content));
        }
        Ok(cache)
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Content>> {
        self.rows.get(id)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Applies an insert or update. A column the update left unchanged (an unchanged
    /// TOASTed value, which pgoutput does not resend) keeps its cached value. When the
    /// primary key itself changed, `old` holds the old key and that entry goes.
    pub fn upsert(
        &mut self,
        rel: &Relation,
        old: Option<&Tuple>,
        new: &Tuple,
    ) -> Result<(), String> {
        let id = match column(rel, new, "id") {
            Some(Value::Text(_)) => text(rel, new, "id").unwrap_or_default(),
            _ => return Err("content row without an id".to_owned()),
        };
        if let Some(old_id) = old.and_then(|old| text(rel, old, "id"))
            && old_id != id
        {
            self.rows.remove(&old_id);
        }
        let previous = self.rows.get(&id).cloned();
        let keep = |name: &str, pick: fn(&Content) -> Option<String>| -> Option<String> {
            match column(rel, new, name) {
                Some(Value::Unchanged) => previous.as_deref().and_then(pick),
                _ => text(rel, new, name),
            }
        };
        let length_seconds = match column(rel, new, "length_seconds") {
            Some(Value::Unchanged) => previous.as_ref().and_then(|c| c.length_seconds),
            _ => match text(rel, new, "length_seconds") {
                None => None,
                Some(s) => Some(
                    s.parse::<i32>()
                        .map_err(|_| "length_seconds is not an integer".to_owned())?,
                ),
            },
        };
        let content = Content {
            slug: keep("slug", |c| c.slug.clone()),
            title: keep("title", |c| c.title.clone()),
            content_type: keep("content_type", |c| c.content_type.clone()),
            length_seconds,
            id: id.clone(),
        };
        self.rows.insert(id, Arc::new(content));
        Ok(())
    }

    /// Applies a delete; `old` carries at least the key columns.
    pub fn delete(&mut self, rel: &Relation, old: &Tuple) {
        if let Some(id) = text(rel, old, "id") {
            self.rows.remove(&id);
        }
    }

    /// Applies a TRUNCATE of `content`.
    pub fn clear(&mut self) {
        self.rows.clear();
    }
}

fn column<'t>(rel: &Relation, tuple: &'t Tuple, name: &str) -> Option<&'t Value> {
    rel.column_index(name).and_then(|i| tuple.get(i))
}

fn text(rel: &Relation, tuple: &Tuple, name: &str) -> Option<String> {
    column(rel, tuple, name)
        .and_then(Value::as_str)
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::decode::Column;

    fn relation(names: &[&str]) -> Relation {
        Relation {
            id: 1,
            namespace: "public".into(),
            name: "content".into(),
            replica_identity: b'd',
            columns: names
                .iter()
                .map(|n| Column {
                    name: (*n).into(),
                    type_oid: 25,
                    is_key: *n == "id",
                })
                .collect(),
        }
    }

    fn t(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn unchanged_toast_keeps_cached_value_and_columns_map_by_name() {
        // Columns in an unusual order: mapping is by name.
        let rel = relation(&["title", "length_seconds", "id", "slug", "content_type"]);
        let mut cache = ContentCache::default();
        cache
            .upsert(
                &rel,
                None,
                &vec![t("long title"), t("300"), t("a"), t("s"), t("podcast")],
            )
            .unwrap();
        cache
            .upsert(
                &rel,
                None,
                &vec![Value::Unchanged, t("301"), t("a"), t("s"), t("podcast")],
            )
            .unwrap();
        let c = cache.get("a").unwrap();
        assert_eq!(c.title.as_deref(), Some("long title"));
        assert_eq!(c.length_seconds, Some(301));
    }

    #[test]
    fn key_change_moves_the_entry_and_delete_removes_it() {
        let rel = relation(&["id", "slug", "title", "content_type", "length_seconds"]);
        let mut cache = ContentCache::default();
        let row = |id: &str| vec![t(id), t("s"), t("x"), Value::Null, Value::Null];
        cache.upsert(&rel, None, &row("a")).unwrap();
        let old_key = vec![t("a"), Value::Null, Value::Null, Value::Null, Value::Null];
        cache.upsert(&rel, Some(&old_key), &row("b")).unwrap();
        assert!(cache.get("a").is_none());
        assert!(cache.get("b").is_some());
        cache.delete(&rel, &row("b"));
        assert!(cache.is_empty());
    }

    #[test]
    fn bad_length_is_an_error_not_a_panic() {
        let rel = relation(&["id", "length_seconds"]);
        let mut cache = ContentCache::default();
        assert!(cache.upsert(&rel, None, &vec![t("a"), t("long")]).is_err());
    }
}
