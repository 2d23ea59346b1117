//! Ordinary PostgreSQL connections (source and analytics) and how their errors read.
//!
//! tokio-postgres prints a server's refusal as a bare "db error" and a failed connect as
//! "error connecting to server", keeping the words that matter in its `source()`. An
//! operator reading a log line needs those words, the setting that named the server and
//! the host:port that was tried — never the password — so every PostgreSQL error walcast
//! shows goes through [`detail`], and every connection through [`connect`].

use std::fmt;

use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

/// A connection that could not be opened: which setting, which server, and why.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {setting} ({endpoint}): {}", detail(source))]
pub struct ConnectError {
    pub setting: &'static str,
    pub endpoint: Endpoint,
    #[source]
    pub source: tokio_postgres::Error,
}

impl ConnectError {
    /// Whether trying again later may succeed (refused, unreachable, timed out, the server
    /// starting or shutting down) rather than needing a change (authentication, no such
    /// database).
    pub fn is_transient(&self) -> bool {
        self.source
            .code()
            .is_none_or(|code| matches!(&code.code()[..2], "08" | "53" | "57"))
    }
}

/// `user@host:port/dbname` of a connection's settings: what was tried, without secrets.
#[derive(Debug, Clone)]
pub struct Endpoint(String);

impl Endpoint {
    pub fn of(config: &Config) -> Endpoint {
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or("?");
        let db = config.get_dbname().unwrap_or(user);
        Endpoint(format!("{user}@{host}:{port}/{db}"))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Bounds on waiting for a server that stopped answering, where the URL sets none
/// (libpq's `connect_timeout`, `keepalives_idle`, `keepalives_interval`,
/// `keepalives_count`, `tcp_user_timeout` set them): a connect gives up after 10 s, and a
/// connection whose peer went silent (a network partition, a black-holed route) is
/// declared dead after about a minute instead of the kernel's two hours.
fn with_bounds(config: &Config) -> Config {
    use std::time::Duration;
    let mut config = config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    // tokio-postgres's own default, i.e. not set in the URL.
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(Duration::from_secs(30));
        config.keepalives_interval(Duration::from_secs(10));
        config.keepalives_retries(3);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(60));
    }
    config
}

/// Connects and drives the connection on a task of its own. `setting` names where the
/// settings came from (`WALCAST_SOURCE_URL`, `WALCAST_ANALYTICS_URL`), for the error.
pub async fn connect(setting: &'static str, config: &Config) -> Result<Client, ConnectError> {
    let bounded = with_bounds(config);
    let (client, connection) = bounded
        .connect(NoTls)
        .await
        .map_err(|source| ConnectError {
            setting,
            endpoint: Endpoint::of(config),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(setting, error = %detail(&error), "postgres connection closed");
        }
    });
    Ok(client)
}

/// The server's own words (`ERROR 42501: permission denied for schema analytics`, with
/// its detail and hint) for a server error; the error and each of its causes otherwise
/// (`error connecting to server: Connection refused (os error 111)`).
pub fn detail(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" ({detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!("; hint: {hint}"));
        }
        return text;
    }
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Whether the error is the server saying a relation or schema does not exist.
pub fn is_undefined_object(err: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    err.code()
        .is_some_and(|c| *c == SqlState::UNDEFINED_TABLE || *c == SqlState::INVALID_SCHEMA_NAME)
}
