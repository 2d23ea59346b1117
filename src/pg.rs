//! Ordinary PostgreSQL connections (source and analytics) and how their errors read.
//!
//! tokio-postgres prints a server's refusal as a bare "db error" and a failed connect as
//! "error connecting to server", keeping the words that matter in its `source()`. An
//! operator reading a log line needs those words, the setting that named the server and
//! the host:port that was tried — never the password — so every PostgreSQL error walcast
//! shows goes through [`detail`], and every connection through [`connect`].

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use crate::tls::{PgTls, SslMode};

/// One PostgreSQL server's settings: what tokio-postgres takes, and TLS the way libpq
/// takes it (tokio-postgres knows `sslmode` up to `require` only, and no certificates).
#[derive(Debug, Clone)]
pub struct Target {
    pub config: Config,
    pub tls: PgTls,
    /// Built from `tls` when the settings were read, so that a bad file fails at start.
    rustls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    /// `url` (a URL or key=value string) with its TLS parameters taken out and the rest
    /// parsed by tokio-postgres.
    pub fn parse(url: &str) -> Result<Target, BadTarget> {
        let (rest, tls) = take_tls_params(url).map_err(BadTarget::Tls)?;
        let mut config: Config = rest.parse().map_err(|e: tokio_postgres::Error| {
            let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(" ({c})"));
            BadTarget::Syntax(format!("{e}{cause}"))
        })?;
        config.ssl_mode(match tls.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        let rustls = tls.client_config().map_err(BadTarget::Tls)?;
        Ok(Target {
            config,
            tls,
            rustls,
        })
    }
}

/// Why connection settings were refused.
#[derive(Debug)]
pub enum BadTarget {
    /// The string does not parse.
    Syntax(String),
    /// A TLS parameter is wrong or names a file that cannot be used.
    Tls(String),
}

impl Deref for Target {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.config
    }
}

impl DerefMut for Target {
    fn deref_mut(&mut self) -> &mut Config {
        &mut self.config
    }
}

/// The TLS parameters libpq takes and tokio-postgres does not (`sslmode` beyond
/// `require`, `sslrootcert`, `sslcert`, `sslkey`), taken out of a URL's query or a
/// key=value string; returns the rest and them.
fn take_tls_params(url: &str) -> Result<(String, PgTls), String> {
    let mut tls = PgTls::default();
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        let path = || (value != "system").then(|| std::path::PathBuf::from(value));
        match key {
            "sslmode" => {
                tls.mode = SslMode::parse(value).ok_or_else(|| {
                    format!(
                        "sslmode={value} is not one of disable, prefer, require, verify-ca, \
                         verify-full"
                    )
                })?;
            }
            "sslrootcert" => tls.root_cert = path(),
            "sslcert" => tls.cert = Some(value.into()),
            "sslkey" => tls.key = Some(value.into()),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.contains("://") {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    let value = percent_encoding::percent_decode_str(value)
                        .decode_utf8()
                        .map_err(|_| format!("{key} is not UTF-8 once percent-decoded"))?;
                    if !take(key, &value)? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        // key=value pairs separated by spaces; a value may be quoted ('a b', with \' and
        // \\ escapes), which the rest keeps as it was.
        let mut kept = Vec::new();
        for (raw, key, value) in key_value_pairs(url) {
            if !take(&key, &value)? {
                kept.push(raw);
            }
        }
        kept.join(" ")
    };
    Ok((rest, tls))
}

/// The pairs of a key=value connection string: each one's text as written, its key, and
/// its value unquoted.
fn key_value_pairs(text: &str) -> Vec<(String, String, String)> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return pairs;
        }
        let mut raw = String::new();
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            raw.push(c);
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'=').is_some() {
            raw.push('=');
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            if chars.next_if_eq(&'\'').is_some() {
                raw.push('\'');
                while let Some(c) = chars.next() {
                    raw.push(c);
                    match c {
                        '\'' => break,
                        '\\' => {
                            if let Some(escaped) = chars.next() {
                                raw.push(escaped);
                                value.push(escaped);
                            }
                        }
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                    raw.push(c);
                    value.push(c);
                }
            }
        }
        pairs.push((raw, key, value));
    }
}

/// A connection that could not be opened: which setting, which server, and why.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot connect to {setting} ({endpoint}): {}{}",
    detail(source),
    crate::tls::hint(&detail(source), crate::tls::Peer::Postgres(setting))
)]
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
        match self.source.code() {
            Some(code) => matches!(&code.code()[..2], "08" | "53" | "57"),
            None => !crate::tls::is_certificate_failure(&detail(&self.source)),
        }
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
pub async fn connect(setting: &'static str, target: &Target) -> Result<Client, ConnectError> {
    let bounded = with_bounds(&target.config);
    let failed = |source| ConnectError {
        setting,
        endpoint: Endpoint::of(&target.config),
        source,
    };
    let closed = move |error: tokio_postgres::Error| {
        tracing::debug!(setting, error = %detail(&error), "postgres connection closed");
    };
    match &target.rustls {
        None => {
            let (client, connection) = bounded.connect(NoTls).await.map_err(failed)?;
            tokio::spawn(async move { connection.await.unwrap_or_else(closed) });
            Ok(client)
        }
        Some(rustls) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((**rustls).clone());
            let (client, connection) = bounded.connect(tls).await.map_err(failed)?;
            tokio::spawn(async move { connection.await.unwrap_or_else(closed) });
            Ok(client)
        }
    }
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
