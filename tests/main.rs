//! The integration tests, in one binary: every module starts its own throwaway servers
//! (see [`support`]) and runs the real `walcast` binary, or the library in process, against
//! them.
//!
//! The end-to-end modules run twice: as themselves on the machine's PostgreSQL, and as
//! `*_pg18` on PostgreSQL 18 (support picks the server by the running test's module path).

mod support;

mod analytics;
mod backfill;
mod cluster;
mod demo;
mod deployment;
mod generate;
mod operations;
mod partitions;
mod pipeline;
mod setup;
mod slot_timeout_pg18;
mod state;
mod streaming;
mod tls;
mod webhook;

// On purpose: the same tests on another server (support reads the module path).
#[allow(clippy::duplicate_mod)]
#[path = "backfill.rs"]
mod backfill_pg18;
#[allow(clippy::duplicate_mod)]
#[path = "setup.rs"]
mod setup_pg18;
#[allow(clippy::duplicate_mod)]
#[path = "streaming.rs"]
mod streaming_pg18;
