//! Faults injected into real sinks, for the in-process tests of the pipeline's failure
//! paths: while a sink's [`FaultPlan`] says so, its writes fail as a lost connection
//! would, before they reach the server. The tests then read the slot and the sinks to
//! check what walcast promises (nothing acknowledged past an unconfirmed write, nothing
//! lost or doubled after it heals) instead of reading walcast's logs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{Sink, SinkError};
use crate::event::Batch;
use crate::health::Probe;
use crate::lsn::{Position, SourceId};

/// What to do to one sink's writes, changed while the pipeline runs.
#[derive(Debug, Default)]
pub struct FaultPlan {
    failing: AtomicBool,
    refused: AtomicU64,
    written: AtomicU64,
}

impl FaultPlan {
    /// From now on every write fails (transiently: the pipeline retries it), or no more.
    pub fn fail_writes(&self, on: bool) {
        self.failing.store(on, Ordering::SeqCst);
    }

    /// Writes refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    /// Writes that reached the sink and succeeded so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }
}

/// Fault plans by sink name.
#[derive(Debug, Default, Clone)]
pub struct Faults(HashMap<&'static str, Arc<FaultPlan>>);

impl Faults {
    /// The plan for sink `name`, made on first use.
    pub fn for_sink(&mut self, name: &'static str) -> Arc<FaultPlan> {
        Arc::clone(self.0.entry(name).or_default())
    }

    pub fn plan(&self, name: &str) -> Option<Arc<FaultPlan>> {
        self.0.get(name).cloned()
    }
}

/// `inner` with its writes subject to `plan`.
pub struct Faulty<S> {
    inner: S,
    plan: Arc<FaultPlan>,
}

impl<S: Sink> Faulty<S> {
    pub fn new(inner: S, plan: Arc<FaultPlan>) -> Self {
        Faulty { inner, plan }
    }
}

impl<S: Sink> Sink for Faulty<S> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn open(&mut self) -> Result<(), SinkError> {
        self.inner.open().await
    }

    fn healthcheck(&self) -> Probe {
        self.inner.healthcheck()
    }

    fn linger(&self) -> std::time::Duration {
        self.inner.linger()
    }

    fn has_write_deadline(&self) -> bool {
        self.inner.has_write_deadline()
    }

    fn reset(&mut self) {
        self.inner.reset();
    }

    async fn claim_history(&mut self, current: SourceId) -> Result<(), SinkError> {
        self.inner.claim_history(current).await
    }

    async fn checkpoint(&mut self) -> Result<Option<Position>, SinkError> {
        self.inner.checkpoint().await
    }

    async fn write(&mut self, batches: &[&Batch]) -> Result<(), SinkError> {
        if self.plan.failing.load(Ordering::SeqCst) {
            self.plan.refused.fetch_add(1, Ordering::SeqCst);
            return Err(SinkError::Injected);
        }
        self.inner.write(batches).await?;
        self.plan.written.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn backfill_cursor(&mut self, job: &str) -> Result<Option<i64>, SinkError> {
        self.inner.backfill_cursor(job).await
    }
}
