//! The setup tests once more, on PostgreSQL 18: tests/support takes the server binaries
//! of PostgreSQL 18 for every test binary whose name ends in `_pg18`.

#[path = "setup.rs"]
mod setup;
