//! What the benchmarks measure the same way: CPU seconds of processes from /proc (by
//! PostgreSQL role), resident memory, and the backlog they drain.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// The one content row the backlogs' events are of.
pub const CONTENT: &str = "00000000-0000-0000-0000-000000000001";

/// The number in environment variable `name`, or `default`.
pub fn env_number(name: &str, default: i64) -> i64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A PostgreSQL sized for backlogs of millions of rows, with the source database `app` and
/// its one content row.
pub async fn source() -> (crate::support::Postgres, tokio_postgres::Client) {
    let pg = crate::support::Postgres::start_with(&[
        ("max_wal_size", "4GB"),
        ("shared_buffers", "256MB"),
    ])
    .await;
    let db = pg.create_source_db("app").await;
    db.batch_execute(&format!(
        "INSERT INTO content VALUES ('{CONTENT}', 'ep', 'An episode', 'podcast', 300, now())"
    ))
    .await
    .unwrap();
    (pg, db)
}

/// `events` events as transactions of 100 rows, `user` the SQL of each one's user_id;
/// returns the WAL end after them.
pub async fn load_backlog(db: &tokio_postgres::Client, events: i64, user: &str) -> String {
    eprintln!("loading {events} events as transactions of 100 rows");
    let load = Instant::now();
    let per_statement = 100;
    let mut loaded = 0;
    while loaded < events {
        // 50 transactions of 100 rows per round trip (explicit BEGIN/COMMIT: a multi-statement
        // simple query would otherwise be one transaction).
        let mut sql = String::new();
        for _ in 0..50 {
            if loaded >= events {
                break;
            }
            sql.push_str(&format!(
                "BEGIN; INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
                 SELECT '{CONTENT}', {user}, (ARRAY['play','pause','finish','click'])[1 + i % 4],
                        now(), i * 37 % 600000, 'ios', '{{\"v\": 1}}'
                 FROM generate_series(1, {per_statement}) i; COMMIT;"
            ));
            loaded += per_statement;
        }
        db.batch_execute(&sql).await.unwrap();
    }
    let end_lsn: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "loaded in {:.1}s; WAL end {end_lsn}",
        load.elapsed().as_secs_f64()
    );
    end_lsn
}

/// A user among 100,000 drawn by Zipf's law (s = 1): `100000 ^ random()` is log-uniform
/// on [1, 100000), whose density falls as 1/x.
pub const ZIPF_USER: &str =
    "('20000000-0000-0000-0000-' || lpad(floor(100000 ^ random())::int::text, 12, '0'))::uuid";

pub fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:")
}

/// A kB field of /proc/{pid}/status (`VmRSS:`, `VmHWM:`); 0 when it cannot be read.
pub fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user + system) spent during a drain: by walcast, by the redis-server it
/// writes to, and by PostgreSQL's processes (the walsender decoding for walcast, and the
/// analytics sink's backend when there is one).
pub struct DrainCpu {
    pub walcast: f64,
    pub redis: f64,
    pub postgres: f64,
    /// `postgres` by what each process is: its walsenders, the backends of the analytics
    /// databases, and everything else (autovacuum, checkpointer, WAL writer).
    pub postgres_by_role: BTreeMap<&'static str, f64>,
}

/// What a PostgreSQL process is, from the title it sets (`postgres: walsender …`,
/// `postgres: <user> <database> <client> <state>`).
pub fn role(pid: u32) -> &'static str {
    let title = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut words = title.trim_start_matches("postgres: ").split_whitespace();
    match (words.next(), words.next()) {
        (Some("walsender"), _) => "walsender",
        (_, Some(db)) if db.starts_with("analytics") => "analytics",
        _ => "other",
    }
}

/// The parent pid and the CPU seconds (user + system) used so far of a process, from
/// /proc/{pid}/stat; `None` when it is gone.
pub fn stat(pid: u32) -> Option<(u32, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some((fields[1].parse().ok()?, ticks as f64 / per_second as f64))
}

pub fn cpu_seconds(pid: u32) -> f64 {
    stat(pid).expect("the process is running").1
}

/// CPU seconds of each child of `parent` (PostgreSQL's backends), by pid.
pub fn children_cpu(parent: u32) -> HashMap<u32, f64> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let (ppid, cpu) = stat(pid)?;
            (ppid == parent).then_some((pid, cpu))
        })
        .collect()
}

/// CPU seconds `parent`'s children used since `before` was taken (children that started
/// since count whole; ones that ended since are missed).
pub fn cpu_since(parent: u32, before: &HashMap<u32, f64>) -> f64 {
    cpu_by_role_since(parent, before).values().sum()
}

/// [`cpu_since`] by [`role`].
pub fn cpu_by_role_since(parent: u32, before: &HashMap<u32, f64>) -> BTreeMap<&'static str, f64> {
    let mut by_role = BTreeMap::from([("analytics", 0.0), ("other", 0.0), ("walsender", 0.0)]);
    for (pid, cpu) in children_cpu(parent) {
        *by_role.entry(role(pid)).or_default() += cpu - before.get(&pid).copied().unwrap_or(0.0);
    }
    by_role
}
