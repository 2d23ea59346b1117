//! `walcast demo`: a throwaway PostgreSQL and Redis in a temp dir, the generator and the
//! pipeline together, and a live view of what happens.
//!
//! The servers come from the local binaries (`initdb`, `postgres`, `redis-server` on PATH
//! or under /usr/lib/postgresql/*/bin), run on free ports, and are stopped and removed on
//! exit. The demo's `engagement_events` has no foreign key and a nullable `event_ts`, so the
//! generator's awkward rows show both content-missing events and dead letters.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::config::{RunConfig, SourceArgs};
use crate::generate::{GenerateArgs, Generated};
use crate::sink::redis as redis_sink;
use crate::throwaway::{self, ThrowawayError};

/// How often the view is redrawn.
const REFRESH: Duration = Duration::from_secs(1);
/// How long the demo waits at the end for the sinks to catch up.
const DRAIN_WAIT: Duration = Duration::from_secs(15);

/// Settings of `walcast demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Events per second from the generator.
    #[arg(long, env = "WALCAST_DEMO_RATE", default_value_t = 500)]
    pub rate: u32,

    /// Run this long (e.g. `20s`), then print a summary and exit; without it, until Ctrl-C.
    #[arg(long, env = "WALCAST_DEMO_DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,

    /// Share of awkward rows (content missing, dead letters).
    #[arg(long, env = "WALCAST_DEMO_BAD_SHARE", default_value_t = 0.02)]
    pub bad_share: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Servers(#[from] ThrowawayError),
    #[error("{0}")]
    Server(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Pipeline(#[from] crate::Error),
    #[error(transparent)]
    Generate(#[from] crate::generate::GenerateError),
    #[error("{context}: {}", crate::pg::detail(source))]
    Postgres {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Connect(#[from] crate::pg::ConnectError),
    #[error("redis")]
    Redis(#[from] redis::RedisError),
}

/// Makes the child receive `signal` when the demo dies, however it dies (even SIGKILL),
/// so no server outlives it, and puts it in a process group of its own: the terminal's
/// Ctrl-C goes to the demo's group only, so the servers keep serving while walcast
/// drains into them, and the demo stops them afterwards.
fn dies_with_parent(mut cmd: Command, signal: i32) -> Command {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
    // parent; it is the only thing done between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    cmd
}

/// What to remove if the demo must end at once (a second Ctrl-C): the servers' process
/// groups and their directory. Filled in as the servers start.
#[derive(Debug, Clone, Default)]
pub struct Cleanup(std::sync::Arc<std::sync::Mutex<CleanupState>>);

#[derive(Debug, Default)]
struct CleanupState {
    groups: Vec<i32>,
    dir: Option<PathBuf>,
}

impl Cleanup {
    fn lock(&self) -> std::sync::MutexGuard<'_, CleanupState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn dir(&self, dir: &Path) {
        self.lock().dir = Some(dir.to_owned());
    }

    fn group(&self, pid: u32) {
        self.lock().groups.push(pid as i32);
    }

    /// Kills every server's process group and removes their directory, now.
    pub fn now(&self) {
        let state = self.lock();
        for &group in &state.groups {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
        let Some(dir) = &state.dir else { return };
        // The killed servers may still be closing files for a moment.
        for _ in 0..50 {
            match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => return,
            }
        }
    }
}

/// PostgreSQL and Redis in a temp dir, stopped and removed on drop.
pub struct LocalServers {
    pub pg_port: u16,
    pub redis_port: u16,
    dir: tempfile::TempDir,
    postgres: Child,
    redis: Child,
}

impl LocalServers {
    pub async fn start(cleanup: &Cleanup) -> Result<LocalServers, DemoError> {
        let initdb = throwaway::find_binary("initdb", "postgresql")?;
        let postgres_bin = throwaway::find_binary("postgres", "postgresql")?;
        let redis_bin = throwaway::find_binary("redis-server", "redis-server")?;
        let dir = tempfile::Builder::new().prefix("walcast-demo-").tempdir()?;
        cleanup.dir(dir.path());
        let data = dir.path().join("pg");
        throwaway::give_to_server_user(dir.path())?;
        throwaway::initdb(&initdb, &data)?;
        let pg_port = throwaway::free_port()?;
        let log = std::fs::File::create(dir.path().join("postgres.log"))?;
        let settings = throwaway::postgres_settings(&[]);
        let postgres =
            throwaway::postgres_command(&postgres_bin, &data, pg_port, dir.path(), &settings)?;
        // SIGINT is PostgreSQL's fast shutdown.
        let postgres = dies_with_parent(postgres, libc::SIGINT)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        cleanup.group(postgres.id());
        let redis_port = throwaway::free_port()?;
        let redis = dies_with_parent(
            throwaway::redis_command(&redis_bin, redis_port),
            libc::SIGTERM,
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
        cleanup.group(redis.id());
        let servers = LocalServers {
            pg_port,
            redis_port,
            dir,
            postgres,
            redis,
        };
        servers.wait_ready().await?;
        Ok(servers)
    }

    async fn wait_ready(&self) -> Result<(), DemoError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pg = tokio_postgres::connect(&self.pg_url("postgres"), tokio_postgres::NoTls)
                .await
                .is_ok();
            let redis = match redis::Client::open(self.redis_url()) {
                Ok(client) => client.get_multiplexed_async_connection().await.is_ok(),
                Err(_) => false,
            };
            if pg && redis {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.path().join("postgres.log"))
                    .unwrap_or_default();
                return Err(DemoError::Server(format!(
                    "the servers did not start within 30 s (postgres ready: {pg}, redis ready: \
                     {redis}); postgres log:\n{log}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pg_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.pg_port)
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for LocalServers {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown.
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.postgres.id() as i32, libc::SIGINT) };
        let _ = self.postgres.wait();
        let _ = self.redis.kill();
        let _ = self.redis.wait();
    }
}

/// What the demo saw, at one moment.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub generated: i64,
    pub in_redis: u64,
    pub in_analytics: i64,
    pub dead_letters: f64,
    pub content_missing: f64,
    pub lag_bytes: f64,
    pub lag_seconds: f64,
    /// End-to-end seconds to Redis over the last interval: p50, p99.
    pub end_to_end: Option<(f64, f64)>,
    /// The same over the whole run.
    pub end_to_end_total: Option<(f64, f64)>,
    /// Title and engagement seconds, best first.
    pub top: Vec<(String, f64)>,
}

/// Runs the demo until `duration` is over or `stop` completes; returns the last view.
/// `cleanup` learns what to remove should the process have to end at once.
pub async fn run(
    args: DemoArgs,
    stop: impl std::future::Future<Output = ()>,
    cleanup: &Cleanup,
) -> Result<Snapshot, DemoError> {
    eprintln!("starting PostgreSQL and Redis in a temp dir…");
    let servers = LocalServers::start(cleanup).await?;
    let (admin, connection) =
        tokio_postgres::connect(&servers.pg_url("postgres"), tokio_postgres::NoTls)
            .await
            .map_err(|source| DemoError::Postgres {
                context: "connecting to the demo PostgreSQL",
                source,
            })?;
    tokio::spawn(connection);
    let pg = |context| move |source| DemoError::Postgres { context, source };
    admin
        .batch_execute("CREATE DATABASE demo")
        .await
        .map_err(pg("creating the demo database"))?;
    let db = crate::pg::connect(
        "the demo database",
        &crate::pg::Target::parse(&servers.pg_url("demo")).expect("a well-formed URL"),
    )
    .await?;
    crate::source::create_schema(&db)
        .await
        .map_err(|e| DemoError::Server(e.to_string()))?;
    db.batch_execute(
        "ALTER TABLE engagement_events DROP CONSTRAINT engagement_events_content_id_fkey;
         ALTER TABLE engagement_events ALTER COLUMN event_ts DROP NOT NULL;",
    )
    .await
    .map_err(pg("relaxing the demo schema"))?;

    let metrics_port = throwaway::free_port()?;
    let config = DemoRun::try_parse_from([
        "walcast",
        "--source-url",
        &servers.pg_url("demo"),
        "--redis-url",
        &servers.redis_url(),
        "--sinks",
        "redis,postgres",
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
        "--heartbeat-interval",
        "10s",
    ])
    .map_err(|e| DemoError::Server(e.to_string()))?
    .run;
    let source: SourceArgs = config.source.clone();
    // The slot before the generator's first row: every event is streamed, so the summary
    // adds up and the drain below ends as soon as everything arrived.
    crate::source::ensure(&db, &source)
        .await
        .map_err(|e| DemoError::Server(e.to_string()))?;
    let done = CancellationToken::new();
    let pipeline = tokio::spawn(crate::pipeline::run(config, done.clone().cancelled_owned()));
    let stop_generator = CancellationToken::new();
    let generator = {
        let args = GenerateArgs {
            source: source.url.clone(),
            rate: args.rate,
            duration: None,
            bad_share: args.bad_share,
            content: 200,
        };
        let stop = stop_generator.clone();
        tokio::spawn(async move { crate::generate::run(&args, stop.cancelled_owned()).await })
    };

    let mut view = View::new(&servers, metrics_port, db).await?;
    let interactive = std::io::stdout().is_terminal() && args.duration.is_none();
    let deadline = args.duration.map(|d| Instant::now() + d);
    let mut stop = std::pin::pin!(stop);
    let mut tick = tokio::time::interval(REFRESH);
    let mut last_line = Instant::now();
    loop {
        tokio::select! {
            () = &mut stop => {
                eprintln!(
                    "stopping: the generator stops, the pipeline drains, the servers are \
                     removed (Ctrl-C again to quit at once)"
                );
                break;
            }
            _ = tick.tick() => {}
        }
        if pipeline.is_finished() || generator.is_finished() {
            break;
        }
        let snapshot = view.snapshot().await;
        if interactive {
            draw(&snapshot, args.rate, servers.dir());
        } else if last_line.elapsed() >= Duration::from_secs(5) {
            last_line = Instant::now();
            eprintln!(
                "generated {} in redis {} in analytics {} lag {:.0} bytes",
                snapshot.generated, snapshot.in_redis, snapshot.in_analytics, snapshot.lag_bytes
            );
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }

    // Stop generating, let the pipeline catch up (bounded), then stop it.
    stop_generator.cancel();
    let generated: Option<Generated> = match generator.await {
        Ok(result) => Some(result?),
        Err(_) => None,
    };
    let caught_up = Instant::now() + DRAIN_WAIT;
    let mut last = view.snapshot().await;
    while Instant::now() < caught_up && !pipeline.is_finished() {
        let valid = view.valid_events().await;
        if last.in_redis as i64 >= valid && last.in_analytics >= valid {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        last = view.snapshot().await;
    }
    done.cancel();
    match pipeline.await {
        Ok(result) => result?,
        Err(err) => {
            return Err(DemoError::Server(format!(
                "the pipeline task failed: {err}"
            )));
        }
    }
    if let Some(generated) = generated {
        last.generated = generated.events as i64;
    }
    Ok(last)
}

/// `walcast run`'s settings, parsed from the demo's own arguments.
#[derive(Parser)]
struct DemoRun {
    #[command(flatten)]
    run: RunConfig,
}

/// Reads what the view shows, from the demo's servers and walcast's /metrics.
struct View {
    db: tokio_postgres::Client,
    redis: redis::aio::ConnectionManager,
    metrics: SocketAddr,
    titles: BTreeMap<String, String>,
    /// End-to-end histogram buckets at the previous snapshot (upper bound, count).
    previous_buckets: Vec<(f64, f64)>,
}

impl View {
    async fn new(
        servers: &LocalServers,
        metrics_port: u16,
        db: tokio_postgres::Client,
    ) -> Result<View, DemoError> {
        Ok(View {
            db,
            redis: redis::Client::open(servers.redis_url())
                .map_err(crate::sink::SinkError::from)
                .map(redis_sink::connect)
                .map_err(|e| DemoError::Server(e.to_string()))?
                .await
                .map_err(|e| DemoError::Server(e.to_string()))?,
            metrics: SocketAddr::from(([127, 0, 0, 1], metrics_port)),
            titles: BTreeMap::new(),
            previous_buckets: Vec::new(),
        })
    }

    /// Events the sinks should hold: every row but those that become dead letters.
    async fn valid_events(&self) -> i64 {
        count(
            &self.db,
            "SELECT count(*) FROM engagement_events WHERE event_ts IS NOT NULL",
        )
        .await
    }

    async fn snapshot(&mut self) -> Snapshot {
        let generated = count(&self.db, "SELECT count(*) FROM engagement_events").await;
        let in_analytics = count(&self.db, "SELECT count(*) FROM analytics.enriched_events").await;
        let in_redis = crate::query::total(&mut self.redis).await.unwrap_or(0);
        let exposition = scrape(self.metrics).await.unwrap_or_default();
        let value = |series: &str| -> f64 {
            exposition
                .lines()
                .filter(|l| l.starts_with(series))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let buckets = buckets(
            &exposition,
            "walcast_end_to_end_seconds_bucket{sink=\"redis\"",
        );
        let end_to_end = interval_quantiles(&self.previous_buckets, &buckets);
        let end_to_end_total = interval_quantiles(&[], &buckets);
        self.previous_buckets = buckets;
        let mut top = Vec::new();
        if let Ok(entries) = crate::query::top(&mut self.redis, 10, 10, chrono::Utc::now()).await {
            for entry in entries {
                let title = self.title(&entry.content_id).await;
                top.push((title, entry.engagement_seconds));
            }
        }
        Snapshot {
            generated,
            in_redis,
            in_analytics,
            dead_letters: value("walcast_dead_letters_total"),
            content_missing: value("walcast_content_missing_total"),
            lag_bytes: value("walcast_replication_lag_bytes"),
            lag_seconds: value("walcast_replication_lag_seconds"),
            end_to_end,
            end_to_end_total,
            top,
        }
    }

    async fn title(&mut self, content_id: &str) -> String {
        if let Some(title) = self.titles.get(content_id) {
            return title.clone();
        }
        let title = self
            .db
            .query_opt(
                "SELECT title FROM content WHERE id::text = $1",
                &[&content_id],
            )
            .await
            .ok()
            .flatten()
            .map_or_else(|| content_id.to_owned(), |row| row.get(0));
        self.titles.insert(content_id.to_owned(), title.clone());
        title
    }
}

/// A `count(*)`, 0 while the table does not exist yet.
async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.map_or(0, |row| row.get(0))
}

/// GET /metrics over a plain HTTP/1.0 request.
async fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

/// The cumulative buckets of one histogram series: (upper bound, count), ascending.
fn buckets(exposition: &str, prefix: &str) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = exposition
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// p50 and p99 of the observations between two readings of cumulative buckets, by
/// linear interpolation inside the bucket (as Prometheus's histogram_quantile does).
fn interval_quantiles(before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<(f64, f64)> {
    let deltas: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let was = before
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, n)| *n);
            (*le, n - was)
        })
        .collect();
    let total = deltas.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let quantile = |q: f64| {
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for &(le, n) in &deltas {
            if n >= rank {
                if le.is_infinite() {
                    return lower.0;
                }
                let share = if n > lower.1 {
                    (rank - lower.1) / (n - lower.1)
                } else {
                    1.0
                };
                return lower.0 + (le - lower.0) * share;
            }
            lower = (le, n);
        }
        lower.0
    };
    Some((quantile(0.5), quantile(0.99)))
}

fn draw(s: &Snapshot, rate: u32, dir: &Path) {
    let mut out = String::from("\x1b[H\x1b[2J");
    out.push_str(&format!(
        "walcast demo — generator at {rate}/s — servers in {} — Ctrl-C stops and removes everything\n\n",
        dir.display()
    ));
    out.push_str(&summary(s));
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

/// The view as text: counts, lag, latency, top 10.
pub fn summary(s: &Snapshot) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "events generated {:>10}\n  in redis       {:>10}\n  in analytics   {:>10}\n",
        s.generated, s.in_redis, s.in_analytics
    ));
    out.push_str(&format!(
        "dead letters     {:>10}\ncontent missing  {:>10}\n",
        s.dead_letters, s.content_missing
    ));
    out.push_str(&format!(
        "lag              {:>10} bytes, {:.3} s\n",
        s.lag_bytes, s.lag_seconds
    ));
    for (label, quantiles) in [
        ("last second", s.end_to_end),
        ("whole run", s.end_to_end_total),
    ] {
        match quantiles {
            Some((p50, p99)) => out.push_str(&format!(
                "commit → redis   p50 {:.1} ms, p99 {:.1} ms ({label})\n",
                p50 * 1000.0,
                p99 * 1000.0
            )),
            None => out.push_str(&format!("commit → redis   - ({label})\n")),
        }
    }
    out.push_str("\ntop content, last 10 minutes (engagement seconds)\n");
    if s.top.is_empty() {
        out.push_str("  (none yet)\n");
    }
    for (i, (title, seconds)) in s.top.iter().enumerate() {
        out.push_str(&format!("  {:>2}. {title:<40} {seconds:>12.2}\n", i + 1));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let before = [(0.001, 0.0), (0.005, 0.0), (f64::INFINITY, 0.0)];
        let after = [(0.001, 50.0), (0.005, 100.0), (f64::INFINITY, 100.0)];
        let (p50, p99) = interval_quantiles(&before, &after).unwrap();
        assert!((p50 - 0.001).abs() < 1e-9, "{p50}");
        assert!((p99 - 0.00492).abs() < 1e-9, "{p99}");
        assert_eq!(interval_quantiles(&after, &after), None);
    }
}
