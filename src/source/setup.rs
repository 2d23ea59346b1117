//! `walcast setup` / `teardown`: preflight checks, publication and slot.
//!
//! Every check that can fail because of how the database is configured fails with a
//! [`SetupError`] whose message says what to do. `ensure` is idempotent: it creates what
//! is missing and leaves what is right alone, so `walcast run` calls it on every start.

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use crate::config::{Partition, SourceArgs};
use crate::event::{CONTENT_TABLE, EVENTS_TABLE};
use crate::lsn::Lsn;

/// The source schema, as shipped in sql/001_source_schema.sql.
const SOURCE_SCHEMA: &str = include_str!("../../sql/001_source_schema.sql");

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "wal_level is {0}; logical replication needs wal_level=logical: run \
         ALTER SYSTEM SET wal_level = logical (or set it in postgresql.conf) and restart PostgreSQL"
    )]
    WalLevel(String),
    #[error(
        "role {0} lacks the REPLICATION attribute; as a superuser run: ALTER ROLE {0} REPLICATION"
    )]
    NoReplicationPrivilege(String),
    #[error(
        "table public.{0} does not exist; apply the migrations in sql/ \
         (or run walcast setup --create-schema)"
    )]
    MissingTable(&'static str),
    #[error(
        "role {role} cannot read public.{table}; as its owner run: GRANT SELECT ON public.{table} \
         TO {role} (walcast setup --print-sql prints every statement walcast's role needs)"
    )]
    NoSelect { role: String, table: &'static str },
    #[error(
        "publication {publication} does not exist, and role {role} may not create it (that takes \
         owning the tables); as their owner run: CREATE PUBLICATION {publication} FOR TABLE \
         public.content, public.engagement_events WITH (publish_via_partition_root = true) \
         (walcast setup --print-sql prints every statement walcast's role needs)"
    )]
    PublicationNeedsOwner { publication: String, role: String },
    #[error(
        "table public.{0} has no usable replica identity, so PostgreSQL would reject its UPDATEs \
         and DELETEs once published; give it a primary key or run \
         ALTER TABLE public.{0} REPLICA IDENTITY FULL"
    )]
    NoReplicaIdentity(&'static str),
    #[error(
        "replication slot {slot} is in use by another process (pid {pid}); another walcast is \
         probably running: stop it, or give this one its own WALCAST_SLOT"
    )]
    SlotInUse { slot: String, pid: i32 },
    #[error(
        "all {max} replication slots are taken (max_replication_slots); drop an unused one with \
         SELECT pg_drop_replication_slot('<name>') or raise max_replication_slots and restart \
         PostgreSQL"
    )]
    SlotsExhausted { max: i64 },
    #[error(
        "replication slot {slot} exists but uses the {plugin} plugin; walcast needs pgoutput: \
         drop it (walcast teardown) or choose another WALCAST_SLOT"
    )]
    WrongPlugin { slot: String, plugin: String },
    #[error(
        "replication slot {slot} belongs to database {database}, not to the one in \
         WALCAST_SOURCE_URL; choose another WALCAST_SLOT"
    )]
    OtherDatabase { slot: String, database: String },
    /// The slot was invalidated: why, and what to do.
    #[error(transparent)]
    SlotLost(Box<super::ReplicationError>),
    #[error(
        "publication {publication} publishes the partitions of public.{table} under their own \
         names (publish_via_partition_root is off), which walcast cannot map to \
         engagement_events. Run ALTER PUBLICATION {publication} SET \
         (publish_via_partition_root = true); if a slot already read changes of the \
         partitions, run walcast backfill afterwards to re-copy them"
    )]
    PublicationNotViaRoot {
        publication: String,
        table: &'static str,
    },
    #[error(
        "replication slot {slot} does not exist, but the sinks hold events ({held}): a new slot \
         would start at the current WAL position and every row committed since they stopped \
         would be lost without a word, so walcast does not create one. It was dropped while \
         walcast was stopped (walcast teardown, an operator, or a failover that did not carry \
         the slot). To recover: walcast backfill (it creates the slot together with a snapshot \
         and copies engagement_events; every sink skips the events it already has), then \
         walcast run"
    )]
    SlotMissingOverSinks { slot: String, held: String },
    #[error(
        "publication {publication} filters public.{table} by {found}, but this walcast \
         expects {expected}: rows outside the filter would never reach the sinks. {fix}"
    )]
    PublicationFilter {
        publication: String,
        table: &'static str,
        found: String,
        expected: String,
        fix: String,
    },
    #[error("{context}: {}", crate::pg::detail(source))]
    Postgres {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The server answered with a WAL position walcast cannot read: rather than take it
    /// for 0/0, walcast stops.
    #[error("{what}: the server answered {text:?}, which is not a WAL position")]
    BadLsn { what: &'static str, text: String },
}

/// A WAL position as the server printed it (`pg_lsn::text`).
pub(crate) fn server_lsn(what: &'static str, text: String) -> Result<Lsn, SetupError> {
    text.parse().map_err(|_| SetupError::BadLsn { what, text })
}

trait Context<T> {
    fn context(self, context: &'static str) -> Result<T, SetupError>;
}

impl<T> Context<T> for Result<T, tokio_postgres::Error> {
    fn context(self, context: &'static str) -> Result<T, SetupError> {
        self.map_err(|source| SetupError::Postgres { context, source })
    }
}

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<Lsn>,
    /// The oldest WAL the slot may still need; everything from here on is kept.
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost` (the slot was invalidated).
    pub wal_status: Option<String>,
    /// Bytes that can still be written before the slot risks invalidation; `None` when
    /// `max_slot_wal_keep_size` is unlimited.
    pub safe_wal_size: Option<i64>,
    /// The server's WAL write position when the row was read.
    pub current_wal_lsn: Lsn,
    /// Why PostgreSQL invalidated the slot (`wal_removed`, `idle_timeout`, …; PostgreSQL 17
    /// and later), `None` while it is valid or on older servers.
    pub invalidation_reason: Option<String>,
    /// Since when no connection has used the slot (PostgreSQL 17 and later), as the
    /// server prints it; `None` while it is in use.
    pub inactive_since: Option<String>,
    /// The same, in seconds before the row was read.
    pub inactive_seconds: Option<f64>,
    /// `idle_replication_slot_timeout` in seconds (PostgreSQL 18; 0 disables it): how long
    /// the slot may stay unused before PostgreSQL invalidates it.
    pub idle_timeout_seconds: Option<i64>,
}

impl SlotInfo {
    /// WAL the slot holds back: the server's position minus `restart_lsn`.
    pub fn retained_wal_bytes(&self) -> u64 {
        self.restart_lsn
            .map_or(0, |restart| self.current_wal_lsn.bytes_since(restart))
    }

    /// The server's position minus `confirmed_flush_lsn`.
    pub fn lag_bytes(&self) -> u64 {
        self.current_wal_lsn
            .bytes_since(self.confirmed_flush_lsn.unwrap_or_default())
    }

    /// Whether PostgreSQL invalidated the slot (it removed WAL the slot still needed).
    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost") || self.invalidation_reason.is_some()
    }
}

/// Checks everything that does not depend on walcast's own objects.
pub async fn preflight(client: &Client) -> Result<(), SetupError> {
    let wal_level: String = client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .context("reading wal_level")?
        .get(0);
    if wal_level != "logical" {
        return Err(SetupError::WalLevel(wal_level));
    }

    let row = client
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles \
             WHERE rolname = current_user",
            &[],
        )
        .await
        .context("reading the role's attributes")?;
    if !row.get::<_, bool>(1) {
        return Err(SetupError::NoReplicationPrivilege(row.get(0)));
    }

    let role: String = row.get(0);
    for table in [CONTENT_TABLE, EVENTS_TABLE] {
        let readable: Option<bool> = client
            .query_one(
                "SELECT has_table_privilege(c.oid, 'SELECT') FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'public' AND c.relname = $1 \
                 UNION ALL SELECT NULL LIMIT 1",
                &[&table],
            )
            .await
            .context("checking the privileges on the source tables")?
            .get(0);
        if readable == Some(false) {
            return Err(SetupError::NoSelect {
                role: role.clone(),
                table,
            });
        }
        let row = client
            .query_one(
                "SELECT c.relreplident::text, \
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'public' AND c.relname = $1 \
                 UNION ALL SELECT NULL, NULL LIMIT 1",
                &[&table],
            )
            .await
            .context("looking up the source tables")?;
        let identity: Option<String> = row.get(0);
        let has_pk: Option<bool> = row.get(1);
        match (identity.as_deref(), has_pk) {
            (None, _) => return Err(SetupError::MissingTable(table)),
            (Some("n"), _) | (Some("d"), Some(false)) => {
                return Err(SetupError::NoReplicaIdentity(table));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Runs the checks, then creates the publication and the slot if they are missing.
/// Returns what it did, one line per action, for `walcast setup` to print.
pub async fn ensure(client: &Client, source: &SourceArgs) -> Result<Vec<String>, SetupError> {
    preflight(client).await?;
    let mut done = Vec::new();
    publish_tables(client, &source.publication(), source.partition(), &mut done).await?;
    ensure_slot(client, &source.slot(), &mut done).await?;
    Ok(done)
}

/// The slot for `walcast run`: checked when it exists; created only when no sink holds an
/// event yet (`held` names each sink's checkpoint), since a slot created over sinks that
/// hold events would skip, silently, every row committed while there was none.
pub async fn ensure_slot_for_run(
    client: &Client,
    slot: &str,
    held: &[(&'static str, crate::lsn::Position)],
) -> Result<Vec<String>, SetupError> {
    if slot_info(client, slot).await?.is_none() && !held.is_empty() {
        let held = held
            .iter()
            .map(|(sink, position)| format!("{sink} up to {position}"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(SetupError::SlotMissingOverSinks {
            slot: slot.to_owned(),
            held,
        });
    }
    let mut done = Vec::new();
    ensure_slot(client, slot, &mut done).await?;
    Ok(done)
}

/// The checks and the publication, without the slot (which a backfill creates itself,
/// together with its snapshot).
pub async fn ensure_publication(
    client: &Client,
    source: &SourceArgs,
) -> Result<Vec<String>, SetupError> {
    preflight(client).await?;
    let mut done = Vec::new();
    publish_tables(client, &source.publication(), source.partition(), &mut done).await?;
    Ok(done)
}

/// The publication's tables as walcast creates them: `content` whole (every partition's
/// cache must be complete), `engagement_events` with the partition's row filter.
pub fn published_tables(partition: Partition) -> String {
    if partition.is_whole() {
        format!("public.{CONTENT_TABLE}, public.{EVENTS_TABLE}")
    } else {
        format!(
            "public.{CONTENT_TABLE}, public.{EVENTS_TABLE} WHERE ({})",
            partition.condition()
        )
    }
}

async fn publish_tables(
    client: &Client,
    publication: &str,
    partition: Partition,
    done: &mut Vec<String>,
) -> Result<(), SetupError> {
    // Names were validated as [a-z0-9_]+ (config.rs), so they need no quoting.
    let exists = client
        .query_opt(
            "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate, pubviaroot \
             FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .context("looking up the publication")?;
    if let Some(row) = &exists
        && !row.get::<_, bool>(1)
    {
        publish_via_root(client, publication, done).await?;
    }
    match exists {
        None => {
            let owns: bool = client
                .query_one(
                    "SELECT bool_and(pg_has_role(c.relowner, 'USAGE')) FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = 'public' AND c.relname IN ($1, $2)",
                    &[&CONTENT_TABLE, &EVENTS_TABLE],
                )
                .await
                .context("checking who owns the source tables")?
                .get::<_, Option<bool>>(0)
                .unwrap_or(false);
            if !owns {
                let role: String = client
                    .query_one("SELECT current_user::text", &[])
                    .await
                    .context("reading the role")?
                    .get(0);
                return Err(SetupError::PublicationNeedsOwner {
                    publication: publication.to_owned(),
                    role,
                });
            }
            // Via the partition root: a partitioned table's changes arrive under the
            // table's own name, not its partitions'.
            let sql = format!(
                "CREATE PUBLICATION {publication} FOR TABLE {} \
                 WITH (publish_via_partition_root = true)",
                published_tables(partition)
            );
            match client.batch_execute(&sql).await {
                Ok(()) => done.push(format!("created publication {publication}")),
                // Another walcast created it between our look and our create.
                Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {}
                Err(e) => return Err(e).context("creating the publication"),
            }
            return Ok(());
        }
        Some(row) if !row.get::<_, bool>(0) => {
            let sql = format!(
                "ALTER PUBLICATION {publication} SET (publish = 'insert, update, delete, truncate')"
            );
            client
                .batch_execute(&sql)
                .await
                .context("widening the publication")?;
            done.push(format!(
                "publication {publication} now publishes insert, update, delete, truncate"
            ));
        }
        Some(_) => {}
    }
    for table in [CONTENT_TABLE, EVENTS_TABLE] {
        // `content` is published whole to every partition.
        let filtered = table == EVENTS_TABLE && !partition.is_whole();
        let published = client
            .query_opt(
                "SELECT rowfilter FROM pg_publication_tables \
                 WHERE pubname = $1 AND schemaname = 'public' AND tablename = $2",
                &[&publication, &table],
            )
            .await
            .context("looking up the publication's tables")?;
        match published {
            None => {
                let filter = if filtered {
                    format!(" WHERE ({})", partition.condition())
                } else {
                    String::new()
                };
                let sql =
                    format!("ALTER PUBLICATION {publication} ADD TABLE public.{table}{filter}");
                client
                    .batch_execute(&sql)
                    .await
                    .context("adding a table to the publication")?;
                done.push(format!(
                    "added public.{table}{filter} to publication {publication}"
                ));
            }
            Some(row) => {
                let found: Option<String> = row.get(0);
                let expected = if filtered {
                    partition
                } else {
                    Partition::WHOLE
                };
                if !expected.matches_row_filter(found.as_deref()) {
                    return Err(filter_mismatch(publication, table, partition, found));
                }
            }
        }
    }
    Ok(())
}

/// A publication whose row filter is not the one this walcast's partition needs: changing
/// it under a slot would skip or repeat rows, so walcast says what to do instead.
fn filter_mismatch(
    publication: &str,
    table: &'static str,
    partition: Partition,
    found: Option<String>,
) -> SetupError {
    let filtered = table == EVENTS_TABLE && !partition.is_whole();
    let fix = if filtered {
        format!(
            "Publication names are per partition (WALCAST_PUBLICATION with _<i>); if it is \
             walcast's, drop it (walcast teardown with the same WALCAST_PARTITIONS and \
             WALCAST_PARTITION) and start again, or run as its owner: ALTER PUBLICATION \
             {publication} SET TABLE {}",
            published_tables(partition)
        )
    } else {
        format!(
            "Remove the filter as the tables' owner: ALTER PUBLICATION {publication} SET TABLE {}",
            published_tables(partition)
        )
    };
    SetupError::PublicationFilter {
        publication: publication.to_owned(),
        table,
        found: found.unwrap_or_else(|| "nothing".to_owned()),
        expected: if filtered {
            partition.condition()
        } else {
            "no filter".to_owned()
        },
        fix,
    }
}

/// An existing publication without `publish_via_partition_root`: a partitioned table's
/// changes would arrive under its partitions' names, which walcast would count as another
/// table and skip. Where neither table is partitioned the setting changes nothing already
/// in the WAL, so walcast sets it; where one is, changes already decoded that way cannot
/// be recovered by the stream, so walcast refuses with the fix.
async fn publish_via_root(
    client: &Client,
    publication: &str,
    done: &mut Vec<String>,
) -> Result<(), SetupError> {
    for table in [CONTENT_TABLE, EVENTS_TABLE] {
        let partitioned = client
            .query_opt(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'public' AND c.relname = $1 AND c.relkind = 'p'",
                &[&table],
            )
            .await
            .context("looking up the source tables")?
            .is_some();
        if partitioned {
            return Err(SetupError::PublicationNotViaRoot {
                publication: publication.to_owned(),
                table,
            });
        }
    }
    client
        .batch_execute(&format!(
            "ALTER PUBLICATION {publication} SET (publish_via_partition_root = true)"
        ))
        .await
        .context("setting publish_via_partition_root")?;
    done.push(format!(
        "publication {publication} now publishes via the partition root"
    ));
    Ok(())
}

async fn ensure_slot(
    client: &Client,
    slot: &str,
    done: &mut Vec<String>,
) -> Result<(), SetupError> {
    if let Some(info) = slot_info(client, slot).await? {
        check_slot(client, slot, &info).await?;
        return Ok(());
    }
    let row = client
        .query_one(
            "SELECT count(*), current_setting('max_replication_slots')::bigint \
             FROM pg_replication_slots",
            &[],
        )
        .await
        .context("counting replication slots")?;
    let (used, max): (i64, i64) = (row.get(0), row.get(1));
    if used >= max {
        return Err(SetupError::SlotsExhausted { max });
    }
    match client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
    {
        Ok(row) => {
            let lsn: String = row.get(0);
            done.push(format!("created replication slot {slot} at {lsn}"));
            Ok(())
        }
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => Ok(()),
        Err(e) if e.code() == Some(&SqlState::CONFIGURATION_LIMIT_EXCEEDED) => {
            Err(SetupError::SlotsExhausted { max })
        }
        Err(e) => Err(e).context("creating the replication slot"),
    }
}

/// Checks that an existing slot is walcast's kind of slot and free to use.
async fn check_slot(client: &Client, slot: &str, info: &SlotInfo) -> Result<(), SetupError> {
    if info.plugin.as_deref() != Some("pgoutput") {
        return Err(SetupError::WrongPlugin {
            slot: slot.to_owned(),
            plugin: info.plugin.clone().unwrap_or_else(|| "physical".to_owned()),
        });
    }
    let database: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .context("reading the database name")?
        .get(0);
    if let Some(slot_db) = &info.database
        && *slot_db != database
    {
        return Err(SetupError::OtherDatabase {
            slot: slot.to_owned(),
            database: slot_db.clone(),
        });
    }
    if info.is_lost() {
        return Err(SetupError::SlotLost(Box::new(
            super::ReplicationError::SlotInvalidated {
                slot: slot.to_owned(),
                reason: info.invalidation_reason.clone(),
            },
        )));
    }
    if let Some(pid) = info.active_pid {
        return Err(SetupError::SlotInUse {
            slot: slot.to_owned(),
            pid,
        });
    }
    Ok(())
}

/// The slot's row in `pg_replication_slots`, if it exists.
pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, SetupError> {
    let row = client
        .query_opt(
            // The columns of later versions through to_jsonb, so one query reads them
            // where they exist and NULL on PostgreSQL 15 and 16.
            "SELECT plugin::text, database::text, active_pid, confirmed_flush_lsn::text, \
                    restart_lsn::text, wal_status, safe_wal_size, pg_current_wal_lsn()::text, \
                    to_jsonb(s) ->> 'invalidation_reason', to_jsonb(s) ->> 'inactive_since', \
                    extract(epoch FROM now() - (to_jsonb(s) ->> 'inactive_since')::timestamptz)::float8, \
                    (SELECT setting::int8 FROM pg_settings \
                     WHERE name = 'idle_replication_slot_timeout') \
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .context("looking up the replication slot")?;
    let Some(row) = row else { return Ok(None) };
    let lsn = |i: usize, what: &'static str| {
        row.get::<_, Option<String>>(i)
            .map(|text| server_lsn(what, text))
            .transpose()
    };
    Ok(Some(SlotInfo {
        plugin: row.get(0),
        database: row.get(1),
        active_pid: row.get(2),
        confirmed_flush_lsn: lsn(3, "the slot's confirmed_flush_lsn")?,
        restart_lsn: lsn(4, "the slot's restart_lsn")?,
        wal_status: row.get(5),
        safe_wal_size: row.get(6),
        current_wal_lsn: server_lsn("the current WAL position", row.get(7))?,
        invalidation_reason: row.get(8),
        inactive_since: row.get(9),
        inactive_seconds: row.get(10),
        idle_timeout_seconds: row.get(11),
    }))
}

/// Makes sure the slot's confirmed position reached `acked` once a replication session
/// ended, waiting up to `wait` for its walsender to let go of the slot.
///
/// walcast sends its final standby status update just before it closes the session, but
/// the walsender reads it only when it next gets to run: a check right after walcast
/// exits could still find the slot behind, and a walsender that ends before reading it
/// leaves the slot there. So this watches `pg_replication_slots` until the slot shows the
/// position, and once the slot is released and still behind, moves it there itself with
/// `pg_replication_slot_advance` (every sink has applied everything up to `acked`).
/// Returns where the slot stands.
pub async fn confirm_slot(
    client: &Client,
    slot: &str,
    acked: Lsn,
    wait: std::time::Duration,
) -> Result<Lsn, SetupError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let Some(info) = slot_info(client, slot).await? else {
            return Ok(Lsn::default());
        };
        let confirmed = info.confirmed_flush_lsn.unwrap_or_default();
        if confirmed >= acked {
            return Ok(confirmed);
        }
        if info.active_pid.is_none() {
            client
                .execute(
                    "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                    &[&slot, &acked.to_string()],
                )
                .await
                .context("advancing the slot to the final confirmed position")?;
            return Ok(acked);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(confirmed);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The server's current WAL write position.
pub async fn wal_lsn(client: &Client) -> Result<Lsn, SetupError> {
    let text: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .context("reading the current WAL position")?
        .get(0);
    server_lsn("the current WAL position", text)
}

/// Drops the slot and the publication. Returns what it did.
pub async fn teardown(client: &Client, source: &SourceArgs) -> Result<Vec<String>, SetupError> {
    let mut done = Vec::new();
    if let Some(info) = slot_info(client, &source.slot()).await? {
        if let Some(pid) = info.active_pid {
            return Err(SetupError::SlotInUse {
                slot: source.slot(),
                pid,
            });
        }
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&source.slot()])
            .await
            .context("dropping the replication slot")?;
        done.push(format!("dropped replication slot {}", source.slot()));
    }
    let dropped = client
        .execute(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&source.publication()],
        )
        .await
        .context("looking up the publication")?;
    if dropped > 0 {
        let sql = format!("DROP PUBLICATION IF EXISTS {}", source.publication());
        client
            .batch_execute(&sql)
            .await
            .context("dropping the publication")?;
        done.push(format!("dropped publication {}", source.publication()));
    }
    Ok(done)
}

/// Creates the source tables where they are missing (sql/001_source_schema.sql).
pub async fn create_schema(client: &Client) -> Result<(), SetupError> {
    client
        .batch_execute(SOURCE_SCHEMA)
        .await
        .context("creating the source schema")
}
