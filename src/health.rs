//! What the process knows about its own health, and the HTTP endpoint that tells it:
//! `/metrics` (Prometheus), `/healthz` (the process is alive) and `/readyz` (replicating,
//! and every sink reachable and writing).
//!
//! The pipeline writes the state (`Health`), the endpoint, the probes and the slot monitor
//! read it. Every field is an atomic: readers never wait on the pipeline.
//!
//! A sink counts as reachable from its own probe, a separate connection checked every
//! second, so an outage shows on `/readyz` even when no event is flowing; and as failing
//! while its writes are being retried, so a sink that answers a ping but rejects writes
//! (a full disk, a lost privilege) is not reported ready.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::lsn::Lsn;

/// How often the probes check each sink.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long one probe may take before the sink counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the exporter's histograms are compacted.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Shared health and progress of one `walcast run`.
#[derive(Debug)]
pub struct Health {
    replicating: AtomicBool,
    /// The position every sink confirmed (what walcast reports as flushed).
    acked: AtomicU64,
    /// Commit time, in microseconds since the Unix epoch, of the oldest transaction read
    /// from the stream that not every sink has confirmed yet; 0 when there is none.
    oldest_unapplied: AtomicI64,
    /// Something wrong on the source that keeps events from being streamed (the
    /// publication lost the table), with what to do; `None` when all is well.
    source_problem: std::sync::Mutex<Option<String>>,
    sinks: Vec<SinkHealth>,
}

#[derive(Debug)]
pub struct SinkHealth {
    pub name: &'static str,
    /// A sink that follows a durable log rather than the stream (the webhook behind the
    /// analytics facts): it holds back neither the slot nor readiness, its failures are
    /// reported as a note.
    pub follows: bool,
    reachable: AtomicBool,
    failing: AtomicBool,
    /// The newest WAL position this sink has applied everything up to.
    confirmed: AtomicU64,
}

impl Health {
    /// One entry per sink (by name), in the order the fan-out numbers them.
    pub fn new(sinks: &[&'static str]) -> Arc<Self> {
        Self::with_followers(sinks, &[])
    }

    /// The fan-out's sinks, then `followers` (see [`SinkHealth::follows`]), numbered on.
    pub fn with_followers(sinks: &[&'static str], followers: &[&'static str]) -> Arc<Self> {
        let entry = |name: &&'static str, follows: bool| SinkHealth {
            name,
            follows,
            // Unknown until the first probe; readiness waits for it.
            reachable: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            confirmed: AtomicU64::new(0),
        };
        Arc::new(Health {
            replicating: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            oldest_unapplied: AtomicI64::new(0),
            source_problem: std::sync::Mutex::new(None),
            sinks: sinks
                .iter()
                .map(|name| entry(name, false))
                .chain(followers.iter().map(|name| entry(name, true)))
                .collect(),
        })
    }

    /// Where the slot stood when streaming began: every sink has applied up to there.
    pub fn start_at(&self, acked: Lsn) {
        self.set_acked(acked);
        for sink in self.sinks.iter().filter(|s| !s.follows) {
            sink.set_confirmed(acked);
        }
    }

    pub fn set_replicating(&self, on: bool) {
        self.replicating.store(on, Ordering::Relaxed);
    }

    pub fn set_acked(&self, lsn: Lsn) {
        self.acked.store(lsn.0, Ordering::Relaxed);
    }

    pub fn acked(&self) -> Lsn {
        Lsn(self.acked.load(Ordering::Relaxed))
    }

    pub fn set_oldest_unapplied(&self, commit_ts: Option<DateTime<Utc>>) {
        let micros = commit_ts.map_or(0, |ts| ts.timestamp_micros().max(1));
        self.oldest_unapplied.store(micros, Ordering::Relaxed);
    }

    /// How long the oldest transaction not yet confirmed by every sink has waited since it
    /// committed; zero when every transaction read has been confirmed.
    pub fn lag(&self, now: DateTime<Utc>) -> Duration {
        match self.oldest_unapplied.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            micros => {
                Duration::from_micros((now.timestamp_micros() - micros).max(0).unsigned_abs())
            }
        }
    }

    /// Records what is wrong on the source (`None`: nothing); returns the new state when
    /// it changed.
    pub fn set_source_problem(&self, problem: Option<String>) -> Option<Option<String>> {
        let mut current = self
            .source_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *current == problem {
            return None;
        }
        *current = problem.clone();
        Some(problem)
    }

    pub fn sinks(&self) -> &[SinkHealth] {
        &self.sinks
    }

    pub fn sink(&self, index: usize) -> &SinkHealth {
        &self.sinks[index]
    }

    /// Why the process is not ready; empty when it is.
    pub fn not_ready(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.replicating.load(Ordering::Relaxed) {
            why.push("replication is not streaming".to_owned());
        }
        let problem = self
            .source_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        why.extend(problem.clone());
        for sink in self.sinks.iter().filter(|s| !s.follows) {
            if !sink.reachable.load(Ordering::Relaxed) {
                why.push(format!("sink {} is unreachable", sink.name));
            } else if sink.failing.load(Ordering::Relaxed) {
                why.push(format!(
                    "sink {} writes are failing and being retried",
                    sink.name
                ));
            }
        }
        why
    }

    /// What is wrong that does not make the process unready: a following sink failing.
    pub fn notes(&self) -> Vec<String> {
        self.sinks
            .iter()
            .filter(|s| s.follows && s.failing.load(Ordering::Relaxed))
            .map(|s| {
                format!(
                    "sink {} deliveries are failing and being retried; it catches up from \
                     the analytics facts, holding back nothing else",
                    s.name
                )
            })
            .collect()
    }
}

impl SinkHealth {
    /// Records a probe's result; returns whether it changed.
    pub fn set_reachable(&self, on: bool) -> bool {
        self.reachable.swap(on, Ordering::Relaxed) != on
    }

    pub fn set_failing(&self, on: bool) {
        self.failing.store(on, Ordering::Relaxed);
    }

    pub fn set_confirmed(&self, lsn: Lsn) {
        self.confirmed.fetch_max(lsn.0, Ordering::Relaxed);
    }

    pub fn confirmed(&self) -> Lsn {
        Lsn(self.confirmed.load(Ordering::Relaxed))
    }
}

/// Binds `addr` now (so a taken port fails at start) and serves the endpoints from tasks
/// in `tasks` (they stop when the set is dropped).
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let upkeep = metrics.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = Router::new()
        .route(
            "/metrics",
            get(|State((metrics, _)): State<Endpoint>| async move { metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state((metrics, health));
    tasks.spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}

type Endpoint = (PrometheusHandle, Arc<Health>);

async fn readyz(State((_, health)): State<Endpoint>) -> (StatusCode, String) {
    let why = health.not_ready();
    if why.is_empty() {
        let notes: String = health
            .notes()
            .iter()
            .map(|note| format!("note: {note}\n"))
            .collect();
        (StatusCode::OK, format!("ready\n{notes}"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", why.join("; ")),
        )
    }
}

/// `PING`, and why it failed.
async fn ping(conn: &mut (impl redis::aio::ConnectionLike + Send)) -> Result<(), String> {
    redis::cmd("PING")
        .query_async::<String>(conn)
        .await
        .map(drop)
        .map_err(|e| crate::error::Chain(&e).to_string())
}

/// A connection of its own to one sink's server, to check that it answers.
pub enum Probe {
    Redis {
        client: redis::Client,
        conn: Option<redis::aio::MultiplexedConnection>,
    },
    /// A Redis Cluster: answered when the node of a random slot answers `PING`.
    RedisCluster {
        client: redis::cluster::ClusterClient,
        conn: Option<redis::cluster_async::ClusterConnection>,
    },
    Postgres {
        config: Box<crate::pg::Target>,
        client: Option<tokio_postgres::Client>,
    },
    /// Not probed: the sink counts as reachable, and as failing while its writes fail.
    Deliveries,
}

impl Probe {
    pub fn redis(client: redis::Client) -> Self {
        Probe::Redis { client, conn: None }
    }

    pub fn redis_cluster(client: redis::cluster::ClusterClient) -> Self {
        Probe::RedisCluster { client, conn: None }
    }

    pub fn postgres(config: crate::pg::Target) -> Self {
        Probe::Postgres {
            config: Box::new(config),
            client: None,
        }
    }

    /// Checks the server once, reconnecting when needed; `Err` says why it failed.
    async fn check(&mut self) -> Result<(), String> {
        let checked = tokio::time::timeout(PROBE_TIMEOUT, self.check_now()).await;
        let result = checked.unwrap_or_else(|_| Err("no answer within 2 s".to_owned()));
        if result.is_err() {
            // Start over with a fresh connection next time.
            match self {
                Probe::Redis { conn, .. } => *conn = None,
                Probe::RedisCluster { conn, .. } => *conn = None,
                Probe::Postgres { client, .. } => *client = None,
                Probe::Deliveries => {}
            }
        }
        result
    }

    async fn check_now(&mut self) -> Result<(), String> {
        match self {
            Probe::Redis { client, conn } => {
                if conn.is_none() {
                    *conn = Some(
                        client
                            .get_multiplexed_async_connection()
                            .await
                            .map_err(|e| crate::error::Chain(&e).to_string())?,
                    );
                }
                ping(conn.as_mut().expect("connected above")).await
            }
            Probe::RedisCluster { client, conn } => {
                if conn.is_none() {
                    *conn = Some(
                        client
                            .get_async_connection()
                            .await
                            .map_err(|e| crate::error::Chain(&e).to_string())?,
                    );
                }
                ping(conn.as_mut().expect("connected above")).await
            }
            Probe::Postgres { config, client } => {
                if client
                    .as_ref()
                    .is_none_or(tokio_postgres::Client::is_closed)
                {
                    *client = Some(
                        crate::pg::connect("WALCAST_ANALYTICS_URL", config)
                            .await
                            .map_err(|e| crate::error::Chain(&e).to_string())?,
                    );
                }
                let client = client.as_ref().expect("connected above");
                client
                    .simple_query("SELECT 1")
                    .await
                    .map(drop)
                    .map_err(|e| crate::error::Chain(&e).to_string())
            }
            Probe::Deliveries => Ok(()),
        }
    }
}

/// Checks sink `index` every second until the process ends, logging each change.
pub async fn probe_forever(mut probe: Probe, health: Arc<Health>, index: usize) {
    let sink = health.sink(index);
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match probe.check().await {
            Ok(()) => {
                if sink.set_reachable(true) {
                    tracing::info!(sink = sink.name, "sink reachable");
                }
            }
            Err(error) => {
                if sink.set_reachable(false) {
                    tracing::warn!(sink = sink.name, %error, "sink unreachable");
                }
            }
        }
    }
}
