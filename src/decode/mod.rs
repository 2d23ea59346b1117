//! pgoutput messages → typed changes.
//!
//! `pgwire-replication` owns the socket and decodes the transaction frame itself (Begin,
//! Commit, logical Message, keepalives); every other pgoutput message reaches us as the raw
//! bytes of an `XLogData` payload. No maintained crate on crates.io decodes those into rows
//! without also owning the connection (the `postgres-replication` decoder lives only in git
//! forks of rust-postgres), so this module is written by hand. pgoutput protocol version 1
//! is small and stable; the formats are in the PostgreSQL docs, "Logical Replication Message
//! Formats": <https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>.
//!
//! Values stay in PostgreSQL's text output form ([`Value::Text`], a zero-copy slice of the
//! message); turning them into typed fields is the enrich stage's job, which looks columns
//! up by name through the [`Relation`] that describes the table. Relation messages arrive
//! before a table's first change in each session and again after its DDL, so the
//! [`RelationCache`] always holds the shape that matches the tuples that follow.
//!
//! Decoding never panics on bad input: a truncated or unknown message is a [`DecodeError`].

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Buf, Bytes};

/// A column value as pgoutput sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL (`n`).
    Null,
    /// An unchanged TOASTed value (`u`): the update did not touch it and the server did not
    /// send it. The receiver keeps the value it already has.
    Unchanged,
    /// The value in the type's text output format (`t`).
    Text(Bytes),
}

impl Value {
    /// The text of the value; `None` for NULL or unchanged.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(bytes) => std::str::from_utf8(bytes).ok(),
            Value::Null | Value::Unchanged => None,
        }
    }
}

/// One row's column values, in the relation's column order.
pub type Tuple = Vec<Value>;

/// The shape of a published table, from a Relation (`R`) message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

impl Relation {
    /// The index of the column called `name`, if the table has one.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    /// Part of the replica identity (flag bit 1).
    pub is_key: bool,
}

/// A row change or schema message from inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Relation(Relation),
    Insert {
        relation: u32,
        new: Tuple,
    },
    Update {
        relation: u32,
        /// The old key (`K`, when a key column changed) or old row (`O`, REPLICA IDENTITY
        /// FULL); `None` under REPLICA IDENTITY DEFAULT when the key did not change.
        old: Option<Tuple>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        /// The key columns (`K`) or the whole old row (`O`).
        old: Tuple,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Type (`Y`) and Origin (`O`) messages: walcast needs neither.
    Ignored(u8),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput message truncated while reading {0}")]
    Truncated(&'static str),
    #[error("unknown pgoutput message type {0:?}")]
    UnknownMessage(char),
    #[error("unknown tuple column kind {0:?}")]
    UnknownColumnKind(char),
    #[error("unexpected tuple marker {0:?} in {1} message")]
    UnexpectedMarker(char, &'static str),
    #[error("binary column values are not requested by walcast and not supported")]
    BinaryValue,
    #[error("string in pgoutput message is not valid UTF-8")]
    InvalidUtf8,
    #[error("change for relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
}

/// What kind of pgoutput message `data` is, by its first byte, for messages about it:
/// `Insert ('I')`.
pub fn message_kind(data: &[u8]) -> String {
    let name = match data.first() {
        Some(b'R') => "Relation",
        Some(b'I') => "Insert",
        Some(b'U') => "Update",
        Some(b'D') => "Delete",
        Some(b'T') => "Truncate",
        Some(b'Y') => "Type",
        Some(b'O') => "Origin",
        Some(b'B') => "Begin",
        Some(b'C') => "Commit",
        Some(b'M') => "Message",
        None => return "empty".to_owned(),
        Some(_) => "unknown",
    };
    format!("{name} ({:?})", char::from(data[0]))
}

/// Decodes one pgoutput message (the payload of an `XLogData`).
pub fn decode(data: &Bytes) -> Result<Change, DecodeError> {
    let mut r = Reader { buf: data.clone() };
    let tag = r.u8("message type")?;
    match tag {
        b'R' => {
            let id = r.u32("relation id")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let ncols = r.u16("column count")?;
            let mut columns = Vec::with_capacity(usize::from(ncols));
            for _ in 0..ncols {
                let flags = r.u8("column flags")?;
                let name = r.cstr("column name")?;
                let type_oid = r.u32("column type")?;
                let _type_modifier = r.u32("column type modifier")?;
                columns.push(Column {
                    name,
                    type_oid,
                    is_key: flags & 1 == 1,
                });
            }
            Ok(Change::Relation(Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            }))
        }
        b'I' => {
            let relation = r.u32("relation id")?;
            match r.u8("tuple marker")? {
                b'N' => Ok(Change::Insert {
                    relation,
                    new: r.tuple()?,
                }),
                other => Err(DecodeError::UnexpectedMarker(char::from(other), "Insert")),
            }
        }
        b'U' => {
            let relation = r.u32("relation id")?;
            let mut old = None;
            let mut marker = r.u8("tuple marker")?;
            if marker == b'K' || marker == b'O' {
                old = Some(r.tuple()?);
                marker = r.u8("tuple marker")?;
            }
            if marker != b'N' {
                return Err(DecodeError::UnexpectedMarker(char::from(marker), "Update"));
            }
            Ok(Change::Update {
                relation,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let relation = r.u32("relation id")?;
            match r.u8("tuple marker")? {
                b'K' | b'O' => Ok(Change::Delete {
                    relation,
                    old: r.tuple()?,
                }),
                other => Err(DecodeError::UnexpectedMarker(char::from(other), "Delete")),
            }
        }
        b'T' => {
            let count = r.u32("relation count")?;
            let _options = r.u8("truncate options")?;
            let mut relations = Vec::with_capacity(count.min(1024) as usize);
            for _ in 0..count {
                relations.push(r.u32("relation id")?);
            }
            Ok(Change::Truncate { relations })
        }
        b'Y' | b'O' => Ok(Change::Ignored(tag)),
        other => Err(DecodeError::UnknownMessage(char::from(other))),
    }
}

/// Relations seen on this replication session, by id. Reset it on reconnect: the server
/// sends every Relation again on a new session.
#[derive(Debug, Default)]
pub struct RelationCache {
    relations: HashMap<u32, Arc<Relation>>,
}

impl RelationCache {
    pub fn insert(&mut self, relation: Relation) -> Arc<Relation> {
        let relation = Arc::new(relation);
        self.relations.insert(relation.id, Arc::clone(&relation));
        relation
    }

    pub fn get(&self, id: u32) -> Result<&Arc<Relation>, DecodeError> {
        self.relations
            .get(&id)
            .ok_or(DecodeError::UnknownRelation(id))
    }
}

/// A cursor over a message. Every read checks the length first, so a short message is an
/// error, never a panic.
struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(DecodeError::Truncated(what))
        } else {
            Ok(())
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }

    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated(what))?;
        let s = std::str::from_utf8(&self.buf[..end])
            .map_err(|_| DecodeError::InvalidUtf8)?
            .to_owned();
        self.buf.advance(end + 1);
        Ok(s)
    }

    /// TupleData: Int16 column count, then per column a kind byte and, for `t`/`b`, an
    /// Int32 length and that many bytes.
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let ncols = self.u16("tuple column count")?;
        let mut values = Vec::with_capacity(usize::from(ncols));
        for _ in 0..ncols {
            match self.u8("tuple column kind")? {
                b'n' => values.push(Value::Null),
                b'u' => values.push(Value::Unchanged),
                b't' => {
                    let len = self.u32("value length")? as usize;
                    self.need(len, "value")?;
                    values.push(Value::Text(self.buf.split_to(len)));
                }
                b'b' => return Err(DecodeError::BinaryValue),
                other => return Err(DecodeError::UnknownColumnKind(char::from(other))),
            }
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests;
