//! The source database: the checks and objects walcast needs there (publication, slot),
//! ordinary connections, and the replication connection.

mod setup;
mod stream;

pub use setup::{
    SetupError, SlotInfo, create_schema, ensure, preflight, slot_info, teardown, wal_lsn,
};
pub use stream::{ReplicationError, connect, is_reconnectable, start_replication};
