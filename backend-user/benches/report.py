#!/usr/bin/env python3
"""Summarizes `cargo bench -p backend-user --bench core`: per-element medians, the 10x/1x
ratios and the ratios to a memcpy of the handover image. Reads target/criterion/."""

import json
import os
import sys

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "target", "criterion")

PAIRS = {
    "create_sessions": [("2000", "20000", 2000, 20000)],
    "serialize": [("2000_sessions_x1", "20000_sessions_x1", 2000, 20000),
                  ("1_session_x500", "1_session_x5000", 500, 5000)],
    "to_bytes": [("2000_sessions_x1", "20000_sessions_x1", 2000, 20000),
                 ("1_session_x500", "1_session_x5000", 500, 5000)],
    "deserialize": [("2000_sessions_x1", "20000_sessions_x1", 2000, 20000),
                    ("1_session_x500", "1_session_x5000", 500, 5000)],
    "memcpy": [("2000_sessions_x1", "20000_sessions_x1", 2000, 20000),
               ("1_session_x500", "1_session_x5000", 500, 5000)],
}


def median(group, bench):
    p = os.path.join(ROOT, group, bench, "new", "estimates.json")
    try:
        with open(p) as f:
            return json.load(f)["median"]["point_estimate"]
    except (OSError, KeyError, ValueError):
        return None


def fmt(ns):
    if ns is None:
        return "-"
    if ns < 1e3:
        return f"{ns:.0f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.1f} µs"
    return f"{ns / 1e6:.2f} ms"


print(f"{'operation':<16}{'shape (1x / 10x)':<40}{'1x':>10}{'10x':>10}"
      f"{'per elem 1x':>13}{'per elem 10x':>14}{'10x/1x':>8}")
for group, pairs in PAIRS.items():
    for a, b, na, nb in pairs:
        ta, tb = median(group, a), median(group, b)
        ratio = f"{tb / ta:.1f}" if ta and tb else "-"
        pa = fmt(ta / na) if ta else "-"
        pb = fmt(tb / nb) if tb else "-"
        print(f"{group:<16}{a + ' / ' + b:<40}{fmt(ta):>10}{fmt(tb):>10}{pa:>13}{pb:>14}{ratio:>8}")

print()
print("against a memcpy of the same handover image (the physical floor):")
for group in ("serialize", "to_bytes", "deserialize"):
    for a, b, _, _ in PAIRS[group]:
        for shape in (a, b):
            t, m = median(group, shape), median("memcpy", shape)
            if t and m:
                print(f"  {group:<12}{shape:<20}{fmt(t):>10} vs memcpy {fmt(m):>10}: {t / m:6.1f}x")
u, n = median("serialize_userplatform", "2000_sessions_x1"), median("serialize", "2000_sessions_x1")
if u and n:
    print(f"\nserialize 2000_sessions_x1: UserPlatform {fmt(u)}, NoFdPlatform {fmt(n)} ({u / n:.2f}x)")
