#!/usr/bin/env python3
"""Runs `luo demo` several times per RAM size and prints the median (min, max) of the blackout
and of each blackout step. Usage: blackout.py [--runs N] [--luo PATH] SIZE...
(default: 10 runs of target/release/luo at 64M and 1G)."""

import argparse
import os
import re
import statistics
import subprocess
import sys

UNITS = {"ns": 1, "µs": 1e3, "ms": 1e6, "s": 1e9}
STEPS = ["save state", "freeze+serialize", "exec", "restore (boot)", "retrieve", "verify"]
ROW = re.compile(r"^  (\S.*?)\s+[+-][\d.]+ (?:ns|µs|ms|s)\s+([\d.]+) (ns|µs|ms|s)\s")


def run(luo, size):
    out = subprocess.run([luo, "demo", "--ram", size], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        sys.exit(f"luo demo --ram {size} failed ({out.returncode}): {out.stderr.strip()}")
    r = {}
    for line in out.stdout.splitlines():
        m = ROW.match(line)
        if m:
            r[m.group(1)] = float(m.group(2)) * UNITS[m.group(3)]
        m = re.search(r"^blackout: .* = (\d+) ns", line)
        if m:
            r["blackout"] = float(m.group(1))
    return r


def fmt(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.0f} ns"


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--luo", default=os.path.join(here, "..", "..", "target", "release", "luo"))
    ap.add_argument("sizes", nargs="*", default=["64M", "1G"])
    a = ap.parse_args()
    medians = {}
    # Interleaved, so that a burst of load on the machine hits every size alike.
    results = {size: [] for size in a.sizes}
    for _ in range(a.runs):
        for size in a.sizes:
            results[size].append(run(a.luo, size))
    for size in a.sizes:
        runs = results[size]
        print(f"--ram {size}: {a.runs} runs, median (min .. max)")
        for key in ["blackout"] + STEPS:
            v = [r[key] for r in runs if key in r]
            if v:
                print(f"  {key:<18}{fmt(statistics.median(v)):>10}  ({fmt(min(v))} .. {fmt(max(v))})")
        medians[size] = statistics.median(r["blackout"] for r in runs)
    if len(a.sizes) == 2:
        s0, s1 = a.sizes
        print(f"blackout ratio {s1}/{s0}: {medians[s1] / medians[s0]:.2f}")


main()
