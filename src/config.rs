//! Every setting, with its default, its environment variable and its validation.
//!
//! Flags and `WALCAST_*` variables are the same settings (clap reads both); the names are
//! what operators and their tooling rely on (the README's "Configuration" lists them all).
//! [`RunConfig::validate`] names the setting and the constraint for anything it rejects.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};

use clap::{Args, ValueEnum};

/// `WALCAST_BATCH_MAX_BYTES`'s default: 8 MiB.
pub const DEFAULT_BATCH_MAX_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{setting}: {problem}")]
    Invalid {
        setting: &'static str,
        problem: String,
    },
}

fn invalid(setting: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        problem: problem.into(),
    }
}

/// Where the source database is.
#[derive(Debug, Clone, Args)]
pub struct SourceUrl {
    /// Source PostgreSQL, as a URL (postgres://user:pass@host:5432/db) or key=value string.
    /// The role needs the REPLICATION attribute.
    #[arg(long, env = "WALCAST_SOURCE_URL", hide_env_values = true)]
    pub source_url: String,

    /// A file holding the source role's password (a mounted secret); the URL then has
    /// none, and needs no percent-encoding of it.
    #[arg(long, env = "WALCAST_SOURCE_PASSWORD_FILE")]
    pub source_password_file: Option<PathBuf>,
}

impl SourceUrl {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.pg_config().map(drop)
    }

    /// The source's connection settings.
    pub fn pg_config(&self) -> Result<crate::pg::Target, ConfigError> {
        let file = self
            .source_password_file
            .as_deref()
            .map(|path| ("WALCAST_SOURCE_PASSWORD_FILE", path));
        parse_pg_url("WALCAST_SOURCE_URL", &self.source_url, file)
    }
}

/// Where the source database is and which slot and publication walcast owns there.
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    #[command(flatten)]
    pub url: SourceUrl,

    /// Logical replication slot walcast reads from (pgoutput). With WALCAST_PARTITIONS
    /// above 1, partition i reads `<this>_<i>`.
    #[arg(
        id = "slot",
        long = "slot",
        env = "WALCAST_SLOT",
        default_value = "walcast"
    )]
    slot_base: String,

    /// Publication covering `content` and `engagement_events`. With WALCAST_PARTITIONS
    /// above 1, partition i reads `<this>_<i>`, which publishes its share of the events.
    #[arg(
        id = "publication",
        long = "publication",
        env = "WALCAST_PUBLICATION",
        default_value = "walcast_pub"
    )]
    publication_base: String,

    /// How many walcast instances share the source's events, each with its own slot,
    /// publication and checkpoints (WALCAST_PARTITION says which one this is). Every
    /// instance's walsender decodes the whole WAL: the source's CPU grows with this.
    #[arg(long, env = "WALCAST_PARTITIONS", default_value_t = 1)]
    pub partitions: u32,

    /// Which of the WALCAST_PARTITIONS instances this is, 0-based: it streams the events
    /// with `id % WALCAST_PARTITIONS = WALCAST_PARTITION`. Needed when there is more than
    /// one.
    #[arg(long, env = "WALCAST_PARTITION")]
    pub partition: Option<u32>,
}

/// Most instances one source can be partitioned over: each holds a slot and a walsender.
pub const MAX_PARTITIONS: u32 = 64;

impl SourceArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_partitions()?;
        if self.partitions > 1 && self.partition.is_none() {
            return Err(invalid(
                "WALCAST_PARTITION",
                format!(
                    "must be set (0 to {}) when WALCAST_PARTITIONS is {}: each instance streams \
                     its own share",
                    self.partitions - 1,
                    self.partitions
                ),
            ));
        }
        self.url.validate()
    }

    /// [`Self::validate`], but with WALCAST_PARTITION optional: commands that read every
    /// partition when it is not given (`status`).
    pub fn validate_any_partition(&self) -> Result<(), ConfigError> {
        self.validate_partitions()?;
        self.url.validate()
    }

    fn validate_partitions(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_PARTITIONS).contains(&self.partitions) {
            return Err(invalid(
                "WALCAST_PARTITIONS",
                format!("must be 1 to {MAX_PARTITIONS}"),
            ));
        }
        if let Some(partition) = self.partition
            && partition >= self.partitions
        {
            return Err(invalid(
                "WALCAST_PARTITION",
                format!(
                    "is {partition}, but partitions are numbered 0 to {} (WALCAST_PARTITIONS is {})",
                    self.partitions - 1,
                    self.partitions
                ),
            ));
        }
        // Slot and publication names go into replication commands unquoted: keep them to
        // what PostgreSQL accepts as slot names (lower-case letters, digits, underscore).
        let suffix = self.partition().suffix();
        for (setting, base) in [
            ("WALCAST_SLOT", &self.slot_base),
            ("WALCAST_PUBLICATION", &self.publication_base),
        ] {
            let ok = !base.is_empty()
                && base.len() + suffix.len() <= 63
                && base
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return Err(invalid(
                    setting,
                    format!(
                        "{base:?} must be 1-{} characters of a-z, 0-9 and _",
                        63 - suffix.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Which share of the events this instance streams.
    pub fn partition(&self) -> Partition {
        Partition {
            index: self.partition.unwrap_or(0),
            count: self.partitions.max(1),
        }
    }

    /// The replication slot this instance reads: `WALCAST_SLOT`, with `_<partition>`
    /// when the source is partitioned.
    pub fn slot(&self) -> String {
        format!("{}{}", self.slot_base, self.partition().suffix())
    }

    /// The publication this instance's slot decodes with.
    pub fn publication(&self) -> String {
        format!("{}{}", self.publication_base, self.partition().suffix())
    }

    /// These settings for each partition in turn (one when the source is not partitioned,
    /// or WALCAST_PARTITION names one).
    pub fn each_partition(&self) -> Vec<SourceArgs> {
        let indexes = match self.partition {
            Some(index) => vec![index],
            None => (0..self.partitions.max(1)).collect(),
        };
        indexes
            .into_iter()
            .map(|index| SourceArgs {
                partition: (self.partitions > 1).then_some(index),
                ..self.clone()
            })
            .collect()
    }

    /// The source's connection settings.
    pub fn pg_config(&self) -> Result<crate::pg::Target, ConfigError> {
        self.url.pg_config()
    }
}

/// A filter expression without its casts (`::bigint`), parentheses and spaces.
fn bare(expression: &str) -> String {
    let mut out = String::with_capacity(expression.len());
    let mut rest = expression;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("::") {
            rest = after.trim_start_matches(|c: char| c.is_ascii_alphanumeric() || c == '_');
            continue;
        }
        if !c.is_whitespace() && c != '(' && c != ')' {
            out.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// One instance's share of the source's events: those with `id % count = index`. The
/// whole stream is `Partition::WHOLE`, under the unsuffixed names of a single walcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
}

impl Partition {
    pub const WHOLE: Partition = Partition { index: 0, count: 1 };

    pub fn is_whole(self) -> bool {
        self.count <= 1
    }

    /// `_<index>` for the slot's and publication's names; empty for the whole stream.
    pub fn suffix(self) -> String {
        if self.is_whole() {
            String::new()
        } else {
            format!("_{}", self.index)
        }
    }

    /// Where a sink keeps this partition's checkpoint: the sink's name, then `:<index>`
    /// when partitioned (`postgres:1`, `walcast:checkpoint:redis:1`).
    pub fn state_name(self, name: &str) -> String {
        if self.is_whole() {
            name.to_owned()
        } else {
            format!("{name}:{}", self.index)
        }
    }

    /// Whether `found`, a publication's row filter on `engagement_events` as PostgreSQL
    /// stores it (`pg_publication_tables.rowfilter`), is this partition's: none for the
    /// whole stream, [`Self::condition`] otherwise. PostgreSQL stores the filter rewritten
    /// (`((id % (2)::bigint) = 0)` for `id % 2 = 0` on a bigint id; without the cast on an
    /// integer one), so both are compared without casts, parentheses and spaces.
    pub fn matches_row_filter(self, found: Option<&str>) -> bool {
        match found {
            None => self.is_whole(),
            Some(found) => !self.is_whole() && bare(found) == bare(&self.condition()),
        }
    }

    /// The SQL condition selecting this partition's events; `true` for the whole stream.
    pub fn condition(self) -> String {
        if self.is_whole() {
            "true".to_owned()
        } else {
            format!("id % {} = {}", self.count, self.index)
        }
    }

    /// The seq of the `local`-th change this partition decodes in a transaction:
    /// `local * count + index`, so the partitions' positions never coincide (each decodes
    /// only its own rows of a transaction, numbered from 0) and stay in order within each.
    /// `None` past `i32::MAX`, the largest seq the analytics tables store (`INTEGER`).
    pub fn seq(self, local: u32) -> Option<u32> {
        local
            .checked_mul(self.count)?
            .checked_add(self.index)
            .filter(|seq| i32::try_from(*seq).is_ok())
    }
}

/// What to say when a URL does not parse, or parses into something odd: the usual cause is
/// a password with a character that has a meaning in URLs.
const PERCENT_ENCODING_HINT: &str = "if the user name or password contains @, /, :, ?, # or %, \
     percent-encode it (@ is %40, / is %2F, : is %3A, ? is %3F, # is %23, % is %25)";

/// A URL whose authority (between `://` and the path) holds more than one `@`: the
/// password has an unencoded `@`, and the part after it would be taken for the host.
fn has_unencoded_at(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    authority.matches('@').count() > 1
}

/// A PostgreSQL URL or key=value string: its TLS parameters as libpq reads them, the rest
/// as tokio-postgres does; with the password from `password_file` when one is given.
fn parse_pg_url(
    setting: &'static str,
    url: &str,
    password_file: Option<(&'static str, &Path)>,
) -> Result<crate::pg::Target, ConfigError> {
    if has_unencoded_at(url) {
        return Err(invalid(
            setting,
            format!("the URL has more than one @ before its host; {PERCENT_ENCODING_HINT}"),
        ));
    }
    let mut target = crate::pg::Target::parse(url).map_err(|bad| match bad {
        crate::pg::BadTarget::Syntax(problem) => {
            invalid(setting, format!("{problem}; {PERCENT_ENCODING_HINT}"))
        }
        crate::pg::BadTarget::Tls(problem) => invalid(setting, problem),
    })?;
    if target.get_hosts().is_empty() {
        return Err(invalid(setting, "names no host"));
    }
    if let Some((file_setting, path)) = password_file {
        if target.get_password().is_some() {
            return Err(invalid(
                file_setting,
                format!("{setting} has a password too: keep it in one place (the file)"),
            ));
        }
        target.password(read_secret(file_setting, path)?);
    }
    Ok(target)
}

/// A secret from a file (a mounted secret), without the line ending editors add.
pub fn read_secret(setting: &'static str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(setting, format!("cannot read {}: {e}", path.display())))?;
    let secret = text.strip_suffix('\n').unwrap_or(&text);
    let secret = secret.strip_suffix('\r').unwrap_or(secret);
    if secret.is_empty() {
        return Err(invalid(setting, format!("{} is empty", path.display())));
    }
    Ok(secret.to_owned())
}

/// The analytics database of the postgres sink.
#[derive(Debug, Clone, Args)]
pub struct AnalyticsArgs {
    /// Analytics PostgreSQL for the postgres sink (schema `analytics`, created by walcast).
    /// Defaults to the source database.
    #[arg(long, env = "WALCAST_ANALYTICS_URL", hide_env_values = true)]
    pub analytics_url: Option<String>,

    /// A file holding the analytics role's password (with WALCAST_ANALYTICS_URL).
    #[arg(long, env = "WALCAST_ANALYTICS_PASSWORD_FILE")]
    pub analytics_password_file: Option<PathBuf>,
}

impl AnalyticsArgs {
    /// The analytics connection settings: WALCAST_ANALYTICS_URL, or else the source's.
    pub fn pg_config(&self, source: &SourceUrl) -> Result<crate::pg::Target, ConfigError> {
        let file = self
            .analytics_password_file
            .as_deref()
            .map(|path| ("WALCAST_ANALYTICS_PASSWORD_FILE", path));
        match &self.analytics_url {
            Some(url) => parse_pg_url("WALCAST_ANALYTICS_URL", url, file),
            None if file.is_some() => Err(invalid(
                "WALCAST_ANALYTICS_PASSWORD_FILE",
                "is set without WALCAST_ANALYTICS_URL: the analytics sink then uses the source's \
                 settings (WALCAST_SOURCE_PASSWORD_FILE)",
            )),
            None => source.pg_config(),
        }
    }
}

impl RedisArgs {
    /// The URL parses (nothing is connected yet).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if has_unencoded_at(&self.redis_url) {
            return Err(invalid(
                "WALCAST_REDIS_URL",
                format!("the URL has more than one @ before its host; {PERCENT_ENCODING_HINT}"),
            ));
        }
        self.target().map(drop)
    }

    /// The configured Redis: a single server (`WALCAST_REDIS_URL`), or a Redis Cluster
    /// (`WALCAST_REDIS_CLUSTER`, whose seeds take the same password and TLS settings). The
    /// URLs, the password file, and for `rediss://` the CA and client certificate files, are
    /// read now (nothing is connected yet).
    pub fn target(&self) -> Result<RedisTarget, ConfigError> {
        const SEEDS: &str = "WALCAST_REDIS_CLUSTER";
        let Some(seeds) = self.redis_cluster.as_deref() else {
            return self.client().map(RedisTarget::Single);
        };
        let urls: Vec<&str> = seeds
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(invalid(
                SEEDS,
                "is empty: give the cluster's seed nodes, comma-separated \
                 (redis://node-1:6379,redis://node-2:6379)",
            ));
        }
        let mut infos = Vec::with_capacity(urls.len());
        for url in &urls {
            if has_unencoded_at(url) {
                return Err(invalid(
                    SEEDS,
                    format!("{url}: more than one @ before its host; {PERCENT_ENCODING_HINT}"),
                ));
            }
            infos.push(self.connection_info(SEEDS, url)?);
        }
        let tls: Vec<bool> = infos.iter().map(is_tls).collect();
        if tls.iter().any(|t| *t != tls[0]) {
            return Err(invalid(
                SEEDS,
                "mixes redis:// and rediss:// seeds: a cluster's nodes all speak TLS or none do",
            ));
        }
        let certificates = self.certificates(SEEDS, tls[0])?;
        crate::tls::provider();
        let mut builder = redis::cluster::ClusterClientBuilder::new(infos)
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(Duration::from_secs(30));
        if let Some(certificates) = certificates {
            builder = builder.certs(certificates);
        }
        builder
            .build()
            .map(RedisTarget::Cluster)
            .map_err(|e| invalid(SEEDS, e.to_string()))
    }

    /// A client for the single Redis of `WALCAST_REDIS_URL` (see [`RedisArgs::target`]).
    pub fn client(&self) -> Result<redis::Client, ConfigError> {
        const URL: &str = "WALCAST_REDIS_URL";
        let info = self.connection_info(URL, &self.redis_url)?;
        let tls = is_tls(&info);
        let certificates = self.certificates(URL, tls)?;
        crate::tls::provider();
        let built = match certificates {
            Some(certificates) => redis::Client::build_with_tls(info, certificates),
            None if tls => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: None,
                },
            ),
            None => redis::Client::open(info),
        };
        built.map_err(|e| invalid(URL, e.to_string()))
    }

    /// `url` (of `setting`) parsed, with the password of `WALCAST_REDIS_PASSWORD_FILE`.
    fn connection_info(
        &self,
        setting: &'static str,
        url: &str,
    ) -> Result<redis::ConnectionInfo, ConfigError> {
        use redis::IntoConnectionInfo as _;
        let mut info = url.into_connection_info().map_err(|e| {
            invalid(
                setting,
                format!(
                    "{e}; expected redis://[user:password@]host[:port][/db] or rediss://…; \
                     {PERCENT_ENCODING_HINT}"
                ),
            )
        })?;
        if let Some(path) = &self.redis_password_file {
            const FILE: &str = "WALCAST_REDIS_PASSWORD_FILE";
            if info.redis_settings().password().is_some() {
                return Err(invalid(
                    FILE,
                    format!("{setting} has a password too: keep it in one place (the file)"),
                ));
            }
            let password = read_secret(FILE, path)?;
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        Ok(info)
    }

    /// The CA and client certificates for TLS connections (`None`: none configured), read
    /// now; refused for a server that `setting` does not reach over TLS.
    fn certificates(
        &self,
        setting: &'static str,
        tls: bool,
    ) -> Result<Option<redis::TlsCertificates>, ConfigError> {
        let read = |setting: &'static str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| invalid(setting, format!("cannot read {}: {e}", path.display())))
        };
        let root_cert = self
            .redis_ca_file
            .as_deref()
            .map(|path| read("WALCAST_REDIS_CA_FILE", path))
            .transpose()?;
        let client_tls = match (&self.redis_cert_file, &self.redis_key_file) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read("WALCAST_REDIS_CERT_FILE", cert)?,
                client_key: read("WALCAST_REDIS_KEY_FILE", key)?,
            }),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "WALCAST_REDIS_CERT_FILE",
                    "and WALCAST_REDIS_KEY_FILE go together: set both or neither",
                ));
            }
        };
        if !tls && (root_cert.is_some() || client_tls.is_some()) {
            return Err(invalid(
                setting,
                "is not a rediss:// URL, but WALCAST_REDIS_CA_FILE or WALCAST_REDIS_CERT_FILE is \
                 set: use rediss:// to connect with TLS",
            ));
        }
        Ok(
            (root_cert.is_some() || client_tls.is_some()).then_some(redis::TlsCertificates {
                client_tls,
                root_cert,
            }),
        )
    }
}

/// Whether `info` connects with TLS (`rediss://`).
fn is_tls(info: &redis::ConnectionInfo) -> bool {
    matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. })
}

/// Where the Redis sink writes: one server, or a Redis Cluster. Made once per command, so
/// its size does not matter.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
pub enum RedisTarget {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// Which sinks receive events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SinkKind {
    Redis,
    Postgres,
    Webhook,
}

impl SinkKind {
    /// The sink's name everywhere: `WALCAST_SINKS`, metric labels, logs, and its rows in
    /// `analytics.walcast_checkpoint`. The sinks' `NAME` constants are these.
    pub const fn name(self) -> &'static str {
        match self {
            SinkKind::Redis => "redis",
            SinkKind::Postgres => "postgres",
            SinkKind::Webhook => "webhook",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Logging, shared by every command.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log filter in tracing's syntax, e.g. `info` or `walcast=debug,info`.
    #[arg(long, env = "WALCAST_LOG", default_value = "info", global = true)]
    pub log: String,

    /// Log format: human-readable lines, or one JSON object per line for containers.
    #[arg(
        long,
        env = "WALCAST_LOG_FORMAT",
        value_enum,
        default_value = "pretty",
        global = true
    )]
    pub log_format: LogFormat,
}

/// The Redis connection.
#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Redis for real-time reads (redis://host:6379/0).
    #[arg(
        long,
        env = "WALCAST_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,

    /// A file holding the Redis password (`AUTH`; with a user name in the URL, the ACL
    /// user's); the URL then has none.
    #[arg(long, env = "WALCAST_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,

    /// With a `rediss://` URL: the CA certificate (PEM) that signed the server's
    /// certificate, instead of the system's roots.
    #[arg(long, env = "WALCAST_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// With a `rediss://` URL: a client certificate (PEM), with WALCAST_REDIS_KEY_FILE.
    #[arg(long, env = "WALCAST_REDIS_CERT_FILE")]
    pub redis_cert_file: Option<PathBuf>,

    /// The client certificate's private key (PEM).
    #[arg(long, env = "WALCAST_REDIS_KEY_FILE")]
    pub redis_key_file: Option<PathBuf>,

    /// Seed nodes of a Redis Cluster, comma-separated (redis://node-1:6379,redis://node-2:6379):
    /// the Redis sink then writes to the cluster, and WALCAST_REDIS_URL is not used. The
    /// password file and the TLS settings apply to every node.
    #[arg(long, env = "WALCAST_REDIS_CLUSTER", hide_env_values = true)]
    pub redis_cluster: Option<String>,
}

/// Which sinks are in use.
#[derive(Debug, Clone, Args)]
pub struct SinkArgs {
    /// Sinks in use, comma-separated: redis, postgres, webhook.
    #[arg(
        long = "sinks",
        value_name = "SINKS",
        env = "WALCAST_SINKS",
        value_enum,
        value_delimiter = ',',
        default_value = "redis,postgres"
    )]
    pub kinds: Vec<SinkKind>,
}

impl SinkArgs {
    pub fn contains(&self, kind: SinkKind) -> bool {
        self.kinds.contains(&kind)
    }
}

/// What the webhook sink does with a batch it could not deliver within its retry budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnFailure {
    /// Store it in analytics.dead_letters and go on with the next batch.
    DeadLetter,
    /// Keep retrying: the pipeline holds and the acknowledgement waits.
    Block,
}

/// The webhook sink (`WALCAST_SINKS=...,webhook`).
#[derive(Debug, Clone, Args)]
pub struct WebhookArgs {
    #[command(flatten)]
    pub endpoint: WebhookEndpoint,

    /// Most events in one POST.
    #[arg(long, env = "WALCAST_WEBHOOK_BATCH_MAX_EVENTS", default_value_t = 500)]
    pub webhook_batch_max_events: usize,

    /// After a 4xx or an exhausted budget: `dead-letter` the batch and go on, or `block`.
    #[arg(
        long,
        env = "WALCAST_WEBHOOK_ON_FAILURE",
        value_enum,
        default_value = "dead-letter"
    )]
    pub webhook_on_failure: OnFailure,
}

impl WebhookArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.endpoint.validate()?;
        if self.webhook_batch_max_events == 0 {
            return Err(invalid(
                "WALCAST_WEBHOOK_BATCH_MAX_EVENTS",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Where and how the webhook's batches are POSTed (also what a dead-letter replay uses).
#[derive(Debug, Clone, Args)]
pub struct WebhookEndpoint {
    /// Where batches are POSTed (http or https).
    #[arg(long, env = "WALCAST_WEBHOOK_URL", hide_env_values = true)]
    pub webhook_url: Option<String>,

    /// HMAC-SHA256 key for the `Walcast-Signature` header; none: unsigned.
    #[arg(long, env = "WALCAST_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// A file holding the secret (e.g. a mounted Docker or Kubernetes secret), instead of
    /// WALCAST_WEBHOOK_SECRET.
    #[arg(
        long,
        env = "WALCAST_WEBHOOK_SECRET_FILE",
        conflicts_with = "webhook_secret"
    )]
    pub webhook_secret_file: Option<std::path::PathBuf>,

    /// How long one POST may take, e.g. `10s`.
    #[arg(long, env = "WALCAST_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub webhook_timeout: Duration,

    /// How long one batch is retried (5xx, 429, timeouts, connection errors) before the
    /// failure policy applies, e.g. `5m`.
    #[arg(long, env = "WALCAST_WEBHOOK_RETRY_BUDGET", default_value = "5m", value_parser = humantime::parse_duration)]
    pub webhook_retry_budget: Duration,
}

impl WebhookEndpoint {
    /// The URL, required once the webhook sink is in use.
    pub fn url(&self) -> Result<reqwest::Url, ConfigError> {
        let url = self.webhook_url.as_deref().ok_or_else(|| {
            invalid(
                "WALCAST_WEBHOOK_URL",
                "the webhook sink is in WALCAST_SINKS but no URL is set",
            )
        })?;
        let parsed =
            reqwest::Url::parse(url).map_err(|e| invalid("WALCAST_WEBHOOK_URL", format!("{e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(invalid(
                "WALCAST_WEBHOOK_URL",
                "must be an http or https URL",
            ));
        }
        Ok(parsed)
    }

    /// The signing secret, from the variable or the file.
    pub fn secret(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        if let Some(secret) = &self.webhook_secret {
            return Ok(Some(secret.clone().into_bytes()));
        }
        let Some(path) = &self.webhook_secret_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            invalid(
                "WALCAST_WEBHOOK_SECRET_FILE",
                format!("{}: {e}", path.display()),
            )
        })?;
        let secret = text.trim_end_matches(['\r', '\n']);
        if secret.is_empty() {
            return Err(invalid("WALCAST_WEBHOOK_SECRET_FILE", "the file is empty"));
        }
        Ok(Some(secret.as_bytes().to_vec()))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.url()?;
        self.secret()?;
        if self.webhook_timeout.is_zero() {
            return Err(invalid("WALCAST_WEBHOOK_TIMEOUT", "must be more than 0"));
        }
        Ok(())
    }
}

/// Where events go: the sinks in use, and how to reach each.
#[derive(Debug, Clone, Args)]
pub struct Destinations {
    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub analytics: AnalyticsArgs,

    #[command(flatten)]
    pub sinks: SinkArgs,

    #[command(flatten)]
    pub webhook: WebhookArgs,

    /// Longest a write to Redis or the analytics database may take, e.g. `30s`. A write
    /// past it counts as failed: its connection is dropped, the write is retried, and
    /// /readyz names the sink, so a hung server or a black-holed connection is noticed.
    /// (The webhook has WALCAST_WEBHOOK_TIMEOUT per POST instead.)
    #[arg(long, env = "WALCAST_SINK_WRITE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub sink_write_timeout: Duration,
}

impl Destinations {
    pub fn validate(&self, source: &SourceArgs) -> Result<(), ConfigError> {
        let kinds = &self.sinks.kinds;
        if kinds.is_empty() {
            return Err(invalid("WALCAST_SINKS", "name at least one sink"));
        }
        if self.sink_write_timeout < Duration::from_millis(100) {
            return Err(invalid(
                "WALCAST_SINK_WRITE_TIMEOUT",
                "must be at least 100ms",
            ));
        }
        let mut seen = kinds.clone();
        seen.sort_by_key(|s| s.name());
        seen.dedup();
        if seen.len() != kinds.len() {
            return Err(invalid("WALCAST_SINKS", "a sink is named twice"));
        }
        // The webhook keeps its checkpoint, outbox and dead letters there too.
        if self.sinks.contains(SinkKind::Postgres) || self.sinks.contains(SinkKind::Webhook) {
            self.analytics.pg_config(&source.url)?;
        }
        if self.sinks.contains(SinkKind::Redis) {
            self.redis.validate()?;
        }
        if self.sinks.contains(SinkKind::Webhook) {
            self.webhook.validate()?;
        }
        Ok(())
    }
}

/// Settings of `walcast backfill`.
#[derive(Debug, Clone, Args)]
pub struct BackfillConfig {
    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub destinations: Destinations,

    /// Only events with `event_ts` at or after this time (RFC 3339, e.g.
    /// `2026-11-21T09:00:00Z`).
    #[arg(long, env = "WALCAST_BACKFILL_SINCE", value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,

    /// Only events with `event_ts` before this time (RFC 3339).
    #[arg(long, env = "WALCAST_BACKFILL_UNTIL", value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,

    /// Only events with `id` at or above this.
    #[arg(long, env = "WALCAST_BACKFILL_FROM_ID")]
    pub from_id: Option<i64>,

    /// Only events with `id` at or below this.
    #[arg(long, env = "WALCAST_BACKFILL_TO_ID")]
    pub to_id: Option<i64>,

    /// Rows read per page and written per batch.
    #[arg(long, env = "WALCAST_BATCH_MAX_EVENTS", default_value_t = 5000)]
    pub batch_max_events: usize,
}

impl BackfillConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.source.validate()?;
        self.destinations.validate(&self.source)?;
        if let (Some(since), Some(until)) = (self.since, self.until)
            && since >= until
        {
            return Err(invalid("--until", "must be later than --since"));
        }
        if let (Some(from), Some(to)) = (self.from_id, self.to_id)
            && from > to
        {
            return Err(invalid("--to-id", "must be at least --from-id"));
        }
        if self.batch_max_events == 0 {
            return Err(invalid("WALCAST_BATCH_MAX_EVENTS", "must be at least 1"));
        }
        Ok(())
    }

    /// Whether a range was given (otherwise: the whole table).
    pub fn is_range(&self) -> bool {
        self.since.is_some()
            || self.until.is_some()
            || self.from_id.is_some()
            || self.to_id.is_some()
    }

    /// A stable name for this backfill's range, under which each sink keeps its resume
    /// cursor: the same command run again after an interruption resumes.
    pub fn job(&self) -> String {
        let partition = self.source.partition();
        let job = self.range_job();
        if partition.is_whole() {
            job
        } else {
            format!("{job},partition:{}/{}", partition.index, partition.count)
        }
    }

    /// The range part of [`Self::job`].
    fn range_job(&self) -> String {
        if !self.is_range() {
            return "all".to_owned();
        }
        let time =
            |t: Option<DateTime<Utc>>| t.map_or(String::new(), |t| crate::event::rfc3339(&t));
        let id = |i: Option<i64>| i.map_or(String::new(), |i| i.to_string());
        format!(
            "ids:{}..{},time:{}..{}",
            id(self.from_id),
            id(self.to_id),
            time(self.since),
            time(self.until)
        )
    }
}

/// An RFC 3339 timestamp.
fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{e}; expected RFC 3339, e.g. 2026-11-21T09:00:00Z"))
}

/// Settings of `walcast run`.
#[derive(Debug, Clone, Args)]
pub struct RunConfig {
    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub destinations: Destinations,

    /// Address of the Prometheus endpoint (/metrics). Empty disables it.
    #[arg(long, env = "WALCAST_METRICS_ADDR", default_value = "0.0.0.0:9187")]
    pub metrics_addr: String,

    /// Most events in one batch. Batches close at transaction ends when the input is idle;
    /// under load they grow up to this size (a larger transaction is cut into several).
    #[arg(long, env = "WALCAST_BATCH_MAX_EVENTS", default_value_t = 5000)]
    pub batch_max_events: usize,

    /// Most bytes of row data in one batch.
    #[arg(long, env = "WALCAST_BATCH_MAX_BYTES", default_value_t = DEFAULT_BATCH_MAX_BYTES)]
    pub batch_max_bytes: usize,

    /// How often walcast tells PostgreSQL its confirmed position (standby status update),
    /// e.g. `1s`.
    #[arg(long, env = "WALCAST_STATUS_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub status_interval: Duration,

    /// How often to write a heartbeat (`pg_logical_emit_message`) into the WAL so a quiet
    /// database still moves the slot, e.g. `10s`; `0` disables it.
    #[arg(long, env = "WALCAST_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = parse_interval)]
    pub heartbeat_interval: Duration,

    /// Log a warning when the slot holds back more WAL than this, e.g. `1GiB`, `500MB`.
    #[arg(long, env = "WALCAST_RETAINED_WAL_WARN", default_value = "1GiB")]
    pub retained_wal_warn: bytesize::ByteSize,

    /// How long `walcast run` waits at start for a slot another connection still holds,
    /// e.g. `30s`; `0` refuses at once. After walcast was killed, the server keeps the slot
    /// active until its walsender notices the connection is gone, which under load takes
    /// seconds; a restart right away waits for that instead of failing.
    #[arg(long, env = "WALCAST_SLOT_RELEASE_WAIT", default_value = "30s", value_parser = parse_interval)]
    pub slot_release_wait: Duration,
}

/// A duration such as `10s` or `1m30s`, or a bare `0`.
fn parse_interval(s: &str) -> Result<Duration, humantime::DurationError> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
}

impl RunConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.source.validate()?;
        self.destinations.validate(&self.source)?;
        if self.batch_max_events == 0 {
            return Err(invalid("WALCAST_BATCH_MAX_EVENTS", "must be at least 1"));
        }
        if self.batch_max_bytes < 1024 {
            return Err(invalid("WALCAST_BATCH_MAX_BYTES", "must be at least 1024"));
        }
        if self.status_interval.is_zero() || self.status_interval > Duration::from_secs(60) {
            return Err(invalid(
                "WALCAST_STATUS_INTERVAL",
                "must be between 1ms and 60s (PostgreSQL's wal_sender_timeout defaults to 60s)",
            ));
        }
        if !self.heartbeat_interval.is_zero()
            && self.heartbeat_interval < Duration::from_millis(100)
        {
            return Err(invalid(
                "WALCAST_HEARTBEAT_INTERVAL",
                "must be 0 (off) or at least 100ms",
            ));
        }
        self.metrics_addr()?;
        Ok(())
    }

    /// The heartbeat period; `None` when disabled.
    pub fn heartbeat(&self) -> Option<Duration> {
        (!self.heartbeat_interval.is_zero()).then_some(self.heartbeat_interval)
    }

    /// The metrics listen address; `None` when disabled.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.metrics_addr.is_empty() {
            return Ok(None);
        }
        self.metrics_addr.parse().map(Some).map_err(|e| {
            invalid(
                "WALCAST_METRICS_ADDR",
                format!("{:?}: {e}", self.metrics_addr),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_name_their_slot_publication_and_checkpoints() {
        let whole = Partition::WHOLE;
        assert_eq!(whole.suffix(), "");
        assert_eq!(whole.state_name("postgres"), "postgres");
        assert!(whole.matches_row_filter(None));
        assert!(!whole.matches_row_filter(Some("(id > 100)")));
        assert_eq!(whole.seq(7), Some(7));
        let third = Partition { index: 2, count: 3 };
        assert_eq!(third.suffix(), "_2");
        assert_eq!(third.state_name("postgres"), "postgres:2");
        // As PostgreSQL stores it for a bigint id, and for an integer one.
        assert!(third.matches_row_filter(Some("((id % (3)::bigint) = 2)")));
        assert!(third.matches_row_filter(Some("((id % 3) = 2)")));
        assert!(!third.matches_row_filter(Some("((id % (3)::bigint) = 1)")));
        assert!(!third.matches_row_filter(None));
        assert_eq!(third.condition(), "id % 3 = 2");
    }

    #[test]
    fn partition_seqs_never_coincide_and_keep_their_order() {
        let parts = [0, 1, 2].map(|index| Partition { index, count: 3 });
        let mut all: Vec<u32> = parts
            .iter()
            .flat_map(|p| (0..100).map(|local| p.seq(local).unwrap()))
            .collect();
        for p in parts {
            let own: Vec<u32> = (0..100).map(|local| p.seq(local).unwrap()).collect();
            assert!(own.windows(2).all(|w| w[0] < w[1]));
        }
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
        assert_eq!(parts[1].seq(u32::MAX / 2), None, "past u32 is refused");
        let last = (i32::MAX as u32 - 1) / 3;
        assert_eq!(parts[1].seq(last), Some(last * 3 + 1));
        assert_eq!(
            parts[1].seq(last + 1),
            None,
            "past what INTEGER holds is refused"
        );
    }

    #[test]
    fn intervals_accept_a_bare_zero_and_humantime() {
        assert_eq!(parse_interval("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_interval("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_interval("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_interval("ten").is_err());
    }

    #[test]
    fn urls_that_do_not_parse_suggest_percent_encoding() {
        let pg = |url: &str| {
            parse_pg_url("WALCAST_SOURCE_URL", url, None)
                .unwrap_err()
                .to_string()
        };
        let message = pg("postgres://walcast:p@ss@db.internal:5432/app");
        assert!(message.contains("percent-encode"), "{message}");
        assert!(!message.contains("p@ss"), "no secret in {message}");
        let message = pg("postgres://walcast:secret@db.internal:port/app");
        assert!(message.contains("percent-encode"), "{message}");
        assert!(!message.contains("secret"), "no secret in {message}");
        assert!(
            parse_pg_url(
                "WALCAST_SOURCE_URL",
                "postgres://walcast:p%40ss@db:5432/app",
                None
            )
            .is_ok()
        );
        let redis = |url: &str| RedisArgs {
            redis_url: url.to_owned(),
            redis_password_file: None,
            redis_ca_file: None,
            redis_cert_file: None,
            redis_key_file: None,
            redis_cluster: None,
        };
        let cluster = RedisArgs {
            redis_cluster: Some("redis://node-1:6379,redis://node-2:6379".to_owned()),
            ..redis("redis://cache:6379")
        };
        assert!(matches!(cluster.target(), Ok(RedisTarget::Cluster(_))));
        for (seeds, says) in [
            (" , ", "is empty"),
            ("redis://node-1:6379,rediss://node-2:6379", "mixes"),
            ("redis://:p@ss@node-1:6379", "percent-encode"),
        ] {
            let bad = RedisArgs {
                redis_cluster: Some(seeds.to_owned()),
                ..redis("redis://cache:6379")
            };
            let message = bad.validate().unwrap_err().to_string();
            assert!(
                message.contains("WALCAST_REDIS_CLUSTER") && message.contains(says),
                "{seeds}: {message}"
            );
        }
        let message = redis("redis://:p@ss@cache:6379")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(message.contains("WALCAST_REDIS_URL") && message.contains("percent-encode"));
        assert!(redis("http://cache:6379").validate().is_err());
        let message = redis("redis://:pa/ss@cache:6379")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(message.contains("percent-encode"), "{message}");
        assert!(redis("redis://:p%40ss@cache:6379").validate().is_ok());
    }

    #[test]
    fn sizes_accept_binary_and_decimal_units() {
        let bytes = |s: &str| s.parse::<bytesize::ByteSize>().unwrap().as_u64();
        assert_eq!(bytes("1GiB"), 1 << 30);
        assert_eq!(bytes("500MB"), 500_000_000);
        assert_eq!(bytes("4096"), 4096);
    }
}
