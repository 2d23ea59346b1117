#!/usr/bin/env python3
"""Compares the CPU per event of an e2e report with the committed baseline.

    E2E_EVENTS=100000 E2E_STEADY_SECS=10 E2E_MAX_PRODUCER_SECS=10 cargo bench --bench e2e
    python3 benches/guard.py [target/e2e-report.json [benches/e2e-baseline.json]]

CPU per event, not wall time: it is steadier on a shared machine. Prints every figure
beside its baseline and a WARNING line for each that grew by more than 20 %; exits 0
either way (a guard to read, not a gate).
"""

import json
import sys

LIMIT = 1.20


def figures(report):
    """(name, µs per event) of every CPU figure in a report."""
    out = [("pg_recvlogical: postgres", report.get("pg_recvlogical_us_per_event"))]
    out.append(("redis floor: redis-server", report.get("redis_floor_us_per_event")))
    for drain in report.get("drains", []):
        for process, value in (drain.get("cpu_us_per_event") or {}).items():
            if isinstance(value, dict):
                # postgres_by_role: the analytics backend, the walsender, the rest.
                for role, part in value.items():
                    out.append((f"drain ({drain['sinks']}): postgres {role}", part))
            else:
                out.append((f"drain ({drain['sinks']}): {process}", value))
    return [(name, value) for name, value in out if value is not None]


def main():
    report_path = sys.argv[1] if len(sys.argv) > 1 else "target/e2e-report.json"
    baseline_path = sys.argv[2] if len(sys.argv) > 2 else "benches/e2e-baseline.json"
    with open(report_path) as f:
        report = dict(figures(json.load(f)))
    with open(baseline_path) as f:
        baseline = figures(json.load(f))
    warnings = 0
    print(f"{'figure':<62} {'baseline':>9} {'now':>9}  µs/event")
    for name, before in baseline:
        now = report.get(name)
        if now is None:
            print(f"{name:<62} {before:>9.2f} {'missing':>9}")
            continue
        print(f"{name:<62} {before:>9.2f} {now:>9.2f}")
        if before > 0 and now > before * LIMIT:
            warnings += 1
            print(f"WARNING: {name} grew by {100 * (now / before - 1):.0f} % "
                  f"({before:.2f} -> {now:.2f} µs per event)")
    print(f"{warnings} figure(s) grew by more than {100 * (LIMIT - 1):.0f} %")


if __name__ == "__main__":
    main()
