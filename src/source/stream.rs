//! Connections to the source: ordinary ones (tokio-postgres) and the replication one
//! (pgwire-replication).
//!
//! The replication session pins `DateStyle=ISO` and `TimeZone=UTC`, so the text values
//! pgoutput sends (rendered by the walsender with its session settings) always have the
//! form the decoder parses, whatever the server's defaults are.

use std::time::Duration;

use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig, TlsConfig};
use tokio_postgres::config::Host;

use crate::config::{ConfigError, SourceArgs};
use crate::lsn::{Lsn, SourceId};

/// Messages the replication client may buffer ahead of the source loop (its default is
/// 8,192). It counts messages, not bytes, and a row is one message: with rows of a
/// megabyte this is what the buffer can hold, 32 MB; with rows of a few hundred bytes
/// it is well under a batch, and the socket's buffers hold the rest.
pub(crate) const REPLICATION_BUFFER_MESSAGES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error(
        "replication slot {slot} is in use by another process; another walcast is probably \
         running: stop it, or give this one its own WALCAST_SLOT ({message})"
    )]
    SlotInUse { slot: String, message: String },
    #[error(
        "replication slot {slot} does not exist (it may have been dropped while walcast was \
         stopped); run walcast setup, then walcast backfill to re-copy what was missed"
    )]
    SlotMissing { slot: String },
    #[error(
        "replication slot {slot} was invalidated: {}. To recover: walcast teardown, then \
         walcast backfill (it creates a new slot and copies engagement_events again; every sink \
         skips what it already has), then walcast run. {}",
        invalidation_cause(reason.as_deref()),
        invalidation_prevention(reason.as_deref())
    )]
    SlotInvalidated {
        slot: String,
        /// `pg_replication_slots.invalidation_reason` (PostgreSQL 17 and later).
        reason: Option<String>,
    },
    #[error(
        "public.engagement_events was dropped (and maybe created again, its ids starting over) \
         while walcast streamed it: the new table is not in publication {publication}, and \
         the sinks hold the old table's events under ids the new one may reuse. To start over \
         from the table as it is now: walcast teardown; remove the sinks' state (DROP SCHEMA \
         analytics CASCADE on the analytics database, and on Redis the event:*, content:*, \
         events:*, top:minute:*, stats:events and walcast:* keys, or FLUSHDB on a database \
         walcast has to itself); then walcast backfill and walcast run"
    )]
    EventsTableReplaced { publication: String },
    #[error("slot monitor: {0}")]
    Monitor(String),
    #[error("replication connection")]
    Protocol(#[from] PgWireError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Why PostgreSQL invalidated a slot, from `invalidation_reason`.
fn invalidation_cause(reason: Option<&str>) -> String {
    match reason {
        Some("idle_timeout") => "no walcast was connected to it for longer than \
             idle_replication_slot_timeout (invalidation_reason = idle_timeout), so PostgreSQL \
             gave up on it and removed the WAL it held"
            .to_owned(),
        Some("rows_removed") => "rows it still needed were vacuumed away on the primary \
             (invalidation_reason = rows_removed)"
            .to_owned(),
        Some("wal_level_insufficient") => "wal_level was lowered below logical \
             (invalidation_reason = wal_level_insufficient)"
            .to_owned(),
        Some("wal_removed") | None => "PostgreSQL removed WAL it still needed because it held \
             back more than max_slot_wal_keep_size (wal_status = lost), so the changes in that \
             WAL can no longer be streamed"
            .to_owned(),
        Some(other) => format!("invalidation_reason = {other}"),
    }
}

/// What keeps the same invalidation from happening again.
fn invalidation_prevention(reason: Option<&str>) -> &'static str {
    match reason {
        Some("idle_timeout") => {
            "To keep it from happening again, keep walcast running (an orchestrator restarting \
             it), raise idle_replication_slot_timeout, and alert well before it runs out while \
             walcast is down (the suggested alert WalcastSlotIdleTimeoutNear)"
        }
        Some("wal_level_insufficient") => "Keep wal_level = logical.",
        _ => {
            "To keep it from happening again, raise max_slot_wal_keep_size and alert on \
             walcast_slot_retained_wal_bytes"
        }
    }
}

impl ReplicationError {
    /// Whether a new session may work after this error ended the attempt to open one,
    /// when a session already worked with the same settings: a connection cut while it
    /// started (the server restarting, its walsender ended, the network) is, as is the
    /// slot still held by the lost session; what needs an operator (the slot gone or
    /// invalidated, credentials or certificates refused, a server error of another
    /// class) is not.
    pub fn may_reconnect(&self) -> bool {
        match self {
            ReplicationError::Protocol(PgWireError::Auth(_) | PgWireError::Tls(_)) => false,
            ReplicationError::Protocol(PgWireError::Server(_)) => self.is_transient(),
            // I/O, the worker ending before replication started, a message cut short.
            ReplicationError::Protocol(_) => true,
            _ => self.is_transient(),
        }
    }

    /// Whether reconnecting may help (the connection dropped, the server restarted) rather
    /// than needing an operator (the slot is gone, the configuration is wrong).
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Protocol(e) => is_reconnectable(e),
            // Right after a dropped connection the old walsender may still hold the slot
            // for a moment.
            ReplicationError::SlotInUse { .. } => true,
            _ => false,
        }
    }
}

/// Whether the replication connection may work again after reconnecting: I/O errors, and
/// server errors of SQLSTATE class 08 (connection exception), 53 (insufficient resources)
/// or 57 (operator intervention: shutdown, restart, crash recovery).
pub fn is_reconnectable(err: &PgWireError) -> bool {
    match err {
        PgWireError::Io(_) | PgWireError::Task(_) => true,
        PgWireError::Server(message) => message.split("SQLSTATE ").nth(1).is_some_and(|code| {
            ["08", "53", "57"]
                .iter()
                .any(|class| code.starts_with(class))
        }),
        _ => false,
    }
}

/// Opens the replication stream on the slot, resuming where the slot's
/// `confirmed_flush_lsn` stands, and waits until the server accepted it.
///
/// `durable` is what walcast reports as flushed until the first acknowledgement: the
/// slot's own confirmed position, so a fresh session never moves the slot by itself.
pub async fn start_replication(
    source: &SourceArgs,
    durable: Lsn,
    status_interval: Duration,
) -> Result<ReplicationClient, ReplicationError> {
    let config = replication_config(source)?
        .with_ack_lsn(durable.into())
        .with_status_interval(status_interval)
        .with_wakeup_interval(Duration::from_secs(1))
        .with_buffer_size(REPLICATION_BUFFER_MESSAGES);
    let mut client = ReplicationClient::connect(config).await?;
    match tokio::time::timeout(START_WAIT, client.wait_started()).await {
        Ok(started) => started.map_err(|e| classify(e, &source.slot()))?,
        Err(_) => {
            let hung = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the server did not start replication within {} s",
                    START_WAIT.as_secs()
                ),
            );
            return Err(ReplicationError::Protocol(PgWireError::Io(
                std::sync::Arc::new(hung),
            )));
        }
    }
    Ok(client)
}

/// How long connecting, authenticating and `START_REPLICATION` may take together: a
/// server that accepts the connection and then says nothing must not hold walcast.
const START_WAIT: Duration = Duration::from_secs(30);

/// How long the bookkeeping queries around a replication session may take: they run on a
/// fresh ordinary connection while the network may be what failed.
const HOLDER_QUERY_WAIT: Duration = Duration::from_secs(5);

/// The process id of the walsender holding the slot (`pg_replication_slots.active_pid`):
/// right after a session started, that session's own. `None` when it cannot be read in
/// time; only an optimisation depends on it.
pub async fn slot_holder(source: &SourceArgs) -> Option<i32> {
    let sql = "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1";
    one_value::<Option<i32>>(source, sql, &[&source.slot()])
        .await
        .flatten()
}

/// Ends the walsender `pid` if it still holds the slot: the server side of a session
/// walcast has given up on (a black-holed connection) keeps the slot until
/// `wal_sender_timeout` (60 s by default), refusing the new session meanwhile. Only that
/// exact process is ended, never another holder. Returns whether it was.
pub async fn end_stale_walsender(source: &SourceArgs, pid: i32) -> bool {
    let sql = "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
               WHERE slot_name = $1 AND active_pid = $2";
    one_value::<bool>(source, sql, &[&source.slot(), &pid])
        .await
        .unwrap_or(false)
}

/// The first column of the one row `sql` returns, on a fresh ordinary session, within
/// [`HOLDER_QUERY_WAIT`]; `None` on no row, an error or no answer in time.
async fn one_value<T: for<'a> tokio_postgres::types::FromSql<'a>>(
    source: &SourceArgs,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Option<T> {
    let query = async {
        let config = source.pg_config().ok()?;
        let client = crate::pg::connect("WALCAST_SOURCE_URL", &config)
            .await
            .ok()?;
        let row = client.query_opt(sql, params).await.ok()??;
        row.try_get::<_, T>(0).ok()
    };
    tokio::time::timeout(HOLDER_QUERY_WAIT, query)
        .await
        .ok()
        .flatten()
}

/// The replication client's TLS settings for the source's: the same `sslmode` and files,
/// which pgwire-replication applies with libpq's meaning as walcast's other sessions do.
fn replication_tls(tls: &crate::tls::PgTls) -> TlsConfig {
    use crate::tls::SslMode;
    let mut config = match tls.mode {
        SslMode::Disable => return TlsConfig::disabled(),
        SslMode::Prefer => TlsConfig {
            mode: pgwire_replication::config::SslMode::Prefer,
            ..TlsConfig::default()
        },
        SslMode::Require => TlsConfig::require(),
        SslMode::VerifyCa => TlsConfig::verify_ca(tls.root_cert.clone()),
        SslMode::VerifyFull => TlsConfig::verify_full(tls.root_cert.clone()),
    };
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        config = config.with_client_cert(cert, key);
    }
    config
}

/// A replication session's settings from the source URL.
fn replication_config(source: &SourceArgs) -> Result<ReplicationConfig, ConfigError> {
    let pg = source.pg_config()?;
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        Some(Host::Unix(path)) => path.to_string_lossy().into_owned(),
        None => String::from("localhost"),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let user = pg.get_user().unwrap_or("postgres").to_owned();
    let database = pg.get_dbname().unwrap_or(&user).to_owned();
    let tls = replication_tls(&pg.tls);
    Ok(ReplicationConfig::new(
        host,
        user,
        password,
        database,
        source.slot(),
        source.publication().as_str(),
    )
    .with_port(port)
    .with_tls(tls)
    .with_options("-c DateStyle=ISO,MDY -c TimeZone=UTC -c extra_float_digits=3")
    .with_application_name("walcast"))
}

/// The source's WAL history: `IDENTIFY_SYSTEM` on a replication session (what walcast's
/// REPLICATION attribute allows; `pg_control_system()` may be closed to it).
pub async fn identify(source: &SourceArgs) -> Result<SourceId, ReplicationError> {
    let mut session = ReplicationClient::connect_gated(replication_config(source)?).await?;
    let rows = session
        .simple_query("IDENTIFY_SYSTEM")
        .await
        .map_err(|e| classify(e, &source.slot()))?;
    let text = |i: usize| -> Option<String> {
        let value = rows.first()?.get(i)?.as_ref()?;
        Some(String::from_utf8_lossy(value).into_owned())
    };
    let id = (|| {
        Some(SourceId {
            system_id: text(0)?.parse().ok()?,
            timeline: text(1)?.parse().ok()?,
        })
    })();
    drop(session);
    id.ok_or_else(|| {
        ReplicationError::Protocol(PgWireError::Protocol(
            "IDENTIFY_SYSTEM returned no system identifier or timeline".into(),
        ))
    })
}

/// A slot just created together with a snapshot of the database at its consistent point.
pub struct SnapshotSlot {
    /// Holds the exported snapshot: it stays importable while this session is open and
    /// idle. Drop it once a transaction has imported the snapshot.
    pub session: ReplicationClient,
    /// Where streaming from the new slot begins: every transaction that committed before
    /// it is in the snapshot, every later one will be streamed.
    pub consistent_point: Lsn,
    /// For `SET TRANSACTION SNAPSHOT`.
    pub snapshot_name: String,
}

/// Creates the slot with `CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')` on a replication
/// session, which ordinary connections cannot run.
pub async fn create_slot_with_snapshot(
    source: &SourceArgs,
) -> Result<SnapshotSlot, ReplicationError> {
    let mut session = ReplicationClient::connect_gated(replication_config(source)?).await?;
    // The slot name was validated as [a-z0-9_]+ (config.rs), so it needs no quoting.
    let rows = session
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')",
            source.slot()
        ))
        .await
        .map_err(|e| classify(e, &source.slot()))?;
    // slot_name, consistent_point, snapshot_name, output_plugin
    let text = |i: usize| -> Option<String> {
        let value = rows.first()?.get(i)?.as_ref()?;
        Some(String::from_utf8_lossy(value).into_owned())
    };
    let (Some(point), Some(snapshot_name)) = (text(1), text(2)) else {
        return Err(ReplicationError::Protocol(PgWireError::Protocol(
            "CREATE_REPLICATION_SLOT returned no consistent point or snapshot".into(),
        )));
    };
    let consistent_point = point.parse().map_err(|_| {
        ReplicationError::Protocol(PgWireError::Protocol(format!(
            "CREATE_REPLICATION_SLOT returned consistent point {point:?}"
        )))
    })?;
    Ok(SnapshotSlot {
        session,
        consistent_point,
        snapshot_name,
    })
}

/// Turns the server's refusals to start into errors that say what to do.
pub fn classify(err: PgWireError, slot: &str) -> ReplicationError {
    if let PgWireError::Server(message) = &err {
        // SQLSTATE 55006 object_in_use: "replication slot ... is active for PID ..."
        if message.contains("55006") {
            return ReplicationError::SlotInUse {
                slot: slot.to_owned(),
                message: message.clone(),
            };
        }
        // SQLSTATE 42704 undefined_object: "replication slot ... does not exist"
        if message.contains("42704") && message.contains("slot") {
            return ReplicationError::SlotMissing {
                slot: slot.to_owned(),
            };
        }
        // SQLSTATE 55000 object_not_in_prerequisite_state: "cannot read from logical
        // replication slot ..." (PostgreSQL 15; later versions say "can no longer get
        // changes from replication slot ..."), whose detail, which does not reach us, says
        // "This slot has been invalidated because it exceeded the maximum reserved size."
        if message.contains("55000")
            && (message.contains("cannot read from logical replication slot")
                || message.contains("can no longer get changes"))
        {
            return ReplicationError::SlotInvalidated {
                slot: slot.to_owned(),
                reason: None,
            };
        }
    }
    ReplicationError::Protocol(err)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn reconnects_after_io_errors_and_server_restarts_only() {
        let io = PgWireError::Io(Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(is_reconnectable(&io));
        let shutdown = PgWireError::Server(
            "FATAL: terminating connection due to administrator command (SQLSTATE 57P01)".into(),
        );
        assert!(is_reconnectable(&shutdown));
        let starting = PgWireError::Server(
            "FATAL: the database system is starting up (SQLSTATE 57P03)".into(),
        );
        assert!(is_reconnectable(&starting));
        let auth = PgWireError::Server(
            "FATAL: password authentication failed for user \"x\" (SQLSTATE 28P01)".into(),
        );
        assert!(!is_reconnectable(&auth));
        assert!(!is_reconnectable(&PgWireError::Auth("bad".into())));
    }

    #[test]
    fn an_invalidated_slot_is_named_with_the_way_out() {
        for message in [
            "cannot read from logical replication slot \"walcast\" (SQLSTATE 55000)",
            "can no longer get changes from replication slot \"walcast\" (SQLSTATE 55000)",
        ] {
            let err = classify(PgWireError::Server(message.into()), "walcast");
            assert!(matches!(err, ReplicationError::SlotInvalidated { .. }));
            assert!(err.to_string().contains("walcast backfill"));
        }
    }
}
