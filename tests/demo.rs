//! `walcast demo`: servers, generator and pipeline together, then a summary; and Ctrl-C as a
//! terminal sends it.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// `walcast demo` with none of the caller's WALCAST_* settings.
fn demo() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walcast"));
    for (name, _) in std::env::vars() {
        if name.starts_with("WALCAST_") {
            cmd.env_remove(name);
        }
    }
    cmd.arg("demo");
    cmd
}

#[test]
fn a_timed_demo_delivers_events_and_shows_a_top_10() {
    let out = demo()
        .args(["--duration", "20s", "--rate", "500"])
        .output()
        .expect("run walcast demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "walcast demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let number = |label: &str| -> f64 {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(label)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{stdout}"))
    };
    let generated = number("events generated");
    let in_redis = number("in redis");
    let in_analytics = number("in analytics");
    let dead_letters = number("dead letters");
    assert!(
        generated >= 5_000.0,
        "{generated} generated in 20 s at 500/s"
    );
    // The slot exists before the first insert: every row is accounted for.
    assert_eq!(generated, in_redis + dead_letters, "{stdout}");
    assert_eq!(in_redis, in_analytics, "{stdout}");
    assert!(stdout.contains("  1. "), "a top 10 entry:\n{stdout}");
    assert!(stdout.contains("commit → redis   p50"), "{stdout}");
}

/// A demo started the way a terminal runs it: in a process group of its own (the
/// terminal's foreground group), with its temp files under `tmp`.
struct Interactive {
    child: Child,
    log: tempfile::NamedTempFile,
    tmp: tempfile::TempDir,
    /// The servers the demo started (its child processes): pid and command name.
    servers: Vec<(u32, String)>,
}

impl Interactive {
    fn start() -> Interactive {
        let tmp = tempfile::tempdir().unwrap();
        // PostgreSQL runs as an unprivileged user when the test runs as root.
        std::fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o1777),
        )
        .unwrap();
        let log = tempfile::NamedTempFile::new().unwrap();
        let file = log.reopen().unwrap();
        let child = demo()
            .args(["--rate", "200"])
            .env("TMPDIR", tmp.path())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start walcast demo");
        let mut demo = Interactive {
            child,
            log,
            tmp,
            servers: Vec::new(),
        };
        // Without a terminal the demo reports progress every 5 s.
        demo.wait_log("generated ", Duration::from_secs(90));
        demo.servers = children_of(demo.child.id());
        let names: Vec<&str> = demo.servers.iter().map(|(_, n)| n.as_str()).collect();
        assert!(
            names.contains(&"postgres") && names.contains(&"redis-server"),
            "the demo's servers: {names:?}"
        );
        demo
    }

    fn server(&self, name: &str) -> u32 {
        self.servers
            .iter()
            .find(|(_, n)| n == name)
            .expect("started")
            .0
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn wait_log(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ctrl-C: SIGINT to the whole foreground process group.
    fn ctrl_c(&self) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGINT) };
    }

    fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            if started.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("the demo did not exit within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Nothing is left: no file under the temp dir, and no process that inherited it
    /// (PostgreSQL, its backends, redis-server).
    fn assert_all_gone(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let files: Vec<_> = std::fs::read_dir(self.tmp.path())
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            let mut processes =
                processes_with_env(&format!("TMPDIR={}", self.tmp.path().display()));
            processes.extend(
                self.servers
                    .iter()
                    .filter(|(pid, _)| alive(*pid))
                    .map(|(pid, _)| *pid),
            );
            if files.is_empty() && processes.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: files {files:?}, processes {processes:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Child processes of `parent`: pid and command name.
fn children_of(parent: u32) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // pid (comm) state ppid …; comm may hold spaces, so split after the last ')'.
            let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            let ppid: u32 = rest.split(' ').nth(1)?.parse().ok()?;
            (ppid == parent).then(|| (pid, comm.to_owned()))
        })
        .collect()
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Pids of the processes whose environment holds `entry`.
fn processes_with_env(entry: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(Path::new("/proc").join(pid.to_string()).join("environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == entry.as_bytes()))
        })
        .collect()
}

#[test]
fn ctrl_c_drains_stops_the_servers_and_exits_0() {
    let mut demo = Interactive::start();
    demo.ctrl_c();
    let (status, took) = demo.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "exit {status} after {took:?}:\n{}",
        demo.log()
    );
    let log = demo.log();
    assert!(log.contains("events generated"), "a summary:\n{log}");
    demo.assert_all_gone();
}

#[test]
fn a_second_ctrl_c_ends_at_once_and_still_removes_the_servers() {
    let mut demo = Interactive::start();
    // A frozen Redis keeps the drain from finishing, so the second Ctrl-C finds the demo
    // still draining.
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(demo.server("redis-server") as i32, libc::SIGSTOP) };
    demo.ctrl_c();
    demo.wait_log("Ctrl-C again", Duration::from_secs(10));
    demo.ctrl_c();
    let (status, took) = demo.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "after {took:?}:\n{}", demo.log());
    demo.assert_all_gone();
}
