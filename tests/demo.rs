//! `walcast demo --duration`: servers, generator and pipeline together, then a summary.

use std::process::Command;

#[test]
fn a_timed_demo_delivers_events_and_shows_a_top_10() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_walcast"));
    for (name, _) in std::env::vars() {
        if name.starts_with("WALCAST_") {
            cmd.env_remove(name);
        }
    }
    let out = cmd
        .args(["demo", "--duration", "20s", "--rate", "500"])
        .output()
        .expect("run walcast demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "walcast demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let number = |label: &str| -> i64 {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(label)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{stdout}"))
    };
    let generated = number("events generated");
    let in_redis = number("in redis");
    let in_analytics = number("in analytics");
    assert!(generated >= 5_000, "{generated} generated in 20 s at 500/s");
    assert!(in_redis > 0 && in_redis == in_analytics, "{stdout}");
    assert!(stdout.contains("  1. "), "a top 10 entry:\n{stdout}");
    assert!(stdout.contains("commit → redis   p50"), "{stdout}");
}
