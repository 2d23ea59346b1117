//! The source database: the checks and objects walcast needs there (publication, slot),
//! ordinary connections, and the replication connection.

mod monitor;
pub mod privileges;
mod setup;
mod stream;

pub use monitor::{HEARTBEAT_PREFIX, Monitor};
pub use setup::{
    SetupError, SlotInfo, confirm_slot, create_schema, ensure, ensure_publication,
    ensure_slot_for_run, preflight, published_tables, slot_info, teardown, wal_lsn,
};
pub use stream::{
    ReplicationError, SnapshotSlot, classify, create_slot_with_snapshot, end_stale_walsender,
    identify, is_reconnectable, slot_holder, start_replication,
};
