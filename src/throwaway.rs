//! Throwaway PostgreSQL and Redis servers: what `walcast demo` and the integration tests
//! both need to start them. Binaries are found on PATH or under /usr/lib/postgresql; a
//! cluster is made by initdb with walcast's settings; PostgreSQL refuses to run as root,
//! so as root the server runs as the `postgres` user (or `nobody`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// initdb's options for a throwaway cluster: superuser postgres, no passwords on a
/// loopback-only server, no fsync of the new files.
pub const INITDB_ARGS: [&str; 7] = [
    "-U",
    "postgres",
    "--auth=trust",
    "-E",
    "UTF8",
    "--no-sync",
    "--locale=C",
];

/// The settings every throwaway server starts with: logical decoding, room for slots,
/// loopback only.
pub const POSTGRES_SETTINGS: [(&str, &str); 4] = [
    ("wal_level", "logical"),
    ("max_wal_senders", "10"),
    ("max_replication_slots", "10"),
    ("listen_addresses", "127.0.0.1"),
];

#[derive(Debug, thiserror::Error)]
pub enum ThrowawayError {
    #[error(
        "`{name}` not found on PATH or under /usr/lib/postgresql/*/bin; install it \
         (Debian/Ubuntu: apt-get install {package})"
    )]
    Missing {
        name: &'static str,
        package: &'static str,
    },
    #[error(
        "running as root, and neither a postgres nor a nobody user exists to run PostgreSQL as"
    )]
    NoServerUser,
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Where a server binary is: on PATH, or (PostgreSQL's) under /usr/lib/postgresql, the
/// newest version first.
pub fn find_binary(name: &'static str, package: &'static str) -> Result<PathBuf, ThrowawayError> {
    let on_path = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .collect();
    versioned.sort();
    on_path
        .into_iter()
        .chain(versioned.into_iter().rev())
        .find(|p| p.is_file())
        .ok_or(ThrowawayError::Missing { name, package })
}

/// A free TCP port on 127.0.0.1 for a server about to be started on it.
///
/// It is taken below the kernel's ephemeral range (`ip_local_port_range`), not from it:
/// every outgoing connection draws its local port from that range, so a port found free
/// there can be taken by any connection between this probe and the server's bind (seen as
/// "Address already in use" under load). Below it, ports are handed out in turn from a
/// per-process starting point, so two callers in one process never get the same one and two
/// processes rarely start at the same place; each is checked free by binding it.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low
        .saturating_sub(LOWEST)
        .min(u32::from(u16::MAX) - LOWEST);
    if span >= 1_000 {
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            let port = u16::try_from(LOWEST + offset).expect("below u16::MAX");
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    // No room below the ephemeral range: let the OS pick.
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The user a server runs as when we are root.
#[derive(Debug, Clone)]
pub struct ServerUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// `None` when we are not root (the server runs as we do).
pub fn server_user() -> Result<Option<&'static ServerUser>, ThrowawayError> {
    static USER: OnceLock<Option<ServerUser>> = OnceLock::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let user = USER.get_or_init(|| {
        let id = |flag: &str, user: &str| -> Option<u32> {
            let out = Command::new("id").arg(flag).arg(user).output().ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        ["postgres", "nobody"].iter().find_map(|name| {
            Some(ServerUser {
                name: (*name).to_owned(),
                uid: id("-u", name)?,
                gid: id("-g", name)?,
            })
        })
    });
    user.as_ref().map(Some).ok_or(ThrowawayError::NoServerUser)
}

/// A command for a server binary, as the server user when we are root. The uid is set in
/// the child itself (no runuser in between), so signals reach the server.
pub fn server_command(binary: &Path) -> Result<Command, ThrowawayError> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(binary);
    if let Some(user) = server_user()? {
        cmd.uid(user.uid).gid(user.gid);
    }
    Ok(cmd)
}

/// Gives `path` and everything under it to the server user (when we are root).
pub fn give_to_server_user(path: &Path) -> Result<(), ThrowawayError> {
    let Some(user) = server_user()? else {
        return Ok(());
    };
    let status = Command::new("chown")
        .arg("-R")
        .arg(&user.name)
        .arg(path)
        .status()?;
    if !status.success() {
        return Err(ThrowawayError::Failed(format!("chown {path:?} failed")));
    }
    Ok(())
}

/// Makes a cluster in `data` with `initdb`, as the server user.
pub fn initdb(initdb: &Path, data: &Path) -> Result<(), ThrowawayError> {
    let out = server_command(initdb)?
        .arg("-D")
        .arg(data)
        .args(INITDB_ARGS)
        .output()?;
    if !out.status.success() {
        return Err(ThrowawayError::Failed(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// `postgres` serving `data` on `port`, its socket in `socket_dir`, with `settings` as
/// `-c name=value` (later ones win); the caller adds output and spawns it.
pub fn postgres_command(
    postgres: &Path,
    data: &Path,
    port: u16,
    socket_dir: &Path,
    settings: &[(String, String)],
) -> Result<Command, ThrowawayError> {
    let mut cmd = server_command(postgres)?;
    cmd.arg("-D")
        .arg(data)
        .args(["-p", &port.to_string(), "-k"])
        .arg(socket_dir);
    for (name, value) in settings {
        cmd.arg("-c").arg(format!("{name}={value}"));
    }
    Ok(cmd)
}

/// [`POSTGRES_SETTINGS`] with `extra` on top.
pub fn postgres_settings(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = POSTGRES_SETTINGS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in extra {
        all.retain(|(name, _)| name != k);
        all.push((k.to_string(), v.to_string()));
    }
    all
}

/// `redis-server` on `port` (loopback), keeping nothing on disk.
pub fn redis_command(redis: &Path, port: u16) -> Command {
    let mut cmd = Command::new(redis);
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"]);
    cmd
}
