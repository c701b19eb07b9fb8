//! The scaling curve behind the criterion numbers: per-element cost of creating sessions,
//! serializing (`Luo::reboot`), and deserializing (boot + open) as the load doubles, best of
//! five runs each (robust against a busy machine). A per-element cost that keeps growing with
//! N would be a superlinear path; a step up once the state outgrows the CPU caches is not.
//!
//! Runs over the fd-less platform of `common` so that N can go past RLIMIT_NOFILE.

#![allow(missing_docs)]

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use backend_user::{Memory, UserPlatform};
use common::{boot, create, name, nofd};
use luo_core::Luo;

const RUNS: usize = 5;

/// Best time in ns of `RUNS` runs of `f` on fresh input from `setup`.
fn best<S, R>(mut setup: impl FnMut() -> S, mut f: impl FnMut(S) -> R) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..RUNS {
        let input = setup();
        let t = Instant::now();
        let out = f(input);
        let ns = t.elapsed().as_nanos() as f64;
        drop(black_box(out));
        best = best.min(ns);
    }
    best
}

fn row(shape: &str, n: usize, sessions: usize, files: usize) {
    let create = if files == 1 {
        let names: Vec<[u8; 64]> = (0..n).map(name).collect();
        best(
            || {
                let luo = Luo::new(UserPlatform::new(Arc::new(Memory::new())), true).expect("luo");
                luo.start().expect("start");
                luo
            },
            |luo| {
                for nm in &names {
                    black_box(create(&luo, nm));
                }
                luo
            },
        ) / n as f64
    } else {
        f64::NAN
    };
    let serialize = best(
        || nofd(sessions, files),
        |(luo, mem)| {
            luo.reboot().expect("reboot");
            (luo, mem)
        },
    ) / n as f64;
    let (luo, mem) = nofd(sessions, files);
    luo.reboot().expect("reboot");
    let bytes = mem.to_bytes();
    let deserialize = best(|| bytes.clone(), boot) / n as f64;
    let mut dst = vec![0u8; bytes.len()];
    let memcpy = best(
        || (),
        |()| {
            dst.copy_from_slice(black_box(&bytes));
            black_box(dst.len())
        },
    ) / n as f64;
    println!(
        "{shape:<14}{n:>8}{:>10}{create:>12.0}{serialize:>12.0}{deserialize:>14.0}{memcpy:>10.0}",
        bytes.len() / 4096
    );
}

/// `SCALING_PROBE=op:sessions:files` (op = create, serialize, to_bytes or deserialize) runs
/// only that operation, RUNS times, for `valgrind --tool=callgrind` (instructions per element;
/// see docs/performance.md).
fn probe(spec: &str) {
    let mut parts = spec.split(':');
    let op = parts.next().unwrap_or_default();
    let mut num = || -> usize { parts.next().and_then(|n| n.parse().ok()).unwrap_or(1) };
    let (sessions, files) = (num(), num());
    let n = sessions * files;
    let ns = match op {
        "create" => best(
            || {
                let luo = Luo::new(UserPlatform::new(Arc::new(Memory::new())), true).expect("luo");
                luo.start().expect("start");
                (luo, (0..sessions).map(name).collect::<Vec<_>>())
            },
            |(luo, names)| {
                for nm in &names {
                    black_box(create(&luo, nm));
                }
                luo
            },
        ),
        "serialize" => best(
            || nofd(sessions, files),
            |(luo, mem)| {
                luo.reboot().expect("reboot");
                (luo, mem)
            },
        ),
        "deserialize" => {
            let (luo, mem) = nofd(sessions, files);
            luo.reboot().expect("reboot");
            let bytes = mem.to_bytes();
            best(|| bytes.clone(), boot)
        }
        "to_bytes" => {
            let (luo, mem) = nofd(sessions, files);
            luo.reboot().expect("reboot");
            best(|| (), |()| mem.to_bytes())
        }
        _ => panic!("unknown op {op}"),
    };
    println!(
        "{op} {sessions}x{files}: {:.0} ns per element (best of {RUNS})",
        ns / n as f64
    );
}

fn main() {
    if let Ok(spec) = std::env::var("SCALING_PROBE") {
        probe(&spec);
        return;
    }
    // `cargo bench` passes `--bench`; honor a filter like criterion does (skip if given and
    // not "scaling").
    if std::env::args()
        .skip(1)
        .any(|a| !a.starts_with('-') && !"scaling".contains(a.as_str()))
    {
        return;
    }
    println!("ns per element, best of {RUNS} runs");
    println!(
        "{:<14}{:>8}{:>10}{:>12}{:>12}{:>14}{:>10}",
        "shape", "n", "pages", "create", "serialize", "deserialize", "memcpy"
    );
    for n in [1_000, 2_000, 5_000, 10_000, 20_000, 40_000] {
        row("N_sessions_x1", n, n, 1);
    }
    for m in [500, 1_000, 2_000, 5_000, 10_000, 50_000] {
        row("1_session_xM", m, 1, m);
    }
}
