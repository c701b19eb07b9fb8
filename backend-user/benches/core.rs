//! Scaling of the core operations, through the core `Luo` API (no per-session fds):
//!
//! - `create_sessions/N`: N `create_session` calls on a fresh orchestrator;
//! - `serialize/N_sessions_x1`, `serialize/1_session_xM`: `Luo::reboot` (freeze every file and
//!   write the luo-v5 handover) for N sessions of one file and one session of M files;
//! - `to_bytes/...`: materializing the handover image of that state (what the userspace
//!   backend writes into the handover memfd);
//! - `deserialize/...`: the next image's boot from those bytes: `Memory::from_bytes`,
//!   `Luo::new` (validates the whole image), `start`, register the handler, `open` (builds
//!   the incoming sessions);
//! - `memcpy/...`: copying as many bytes as the image has, the physical floor.
//!
//! N = 2,000 and 20,000; M = 500 and 5,000. N sessions of one file each would need N open
//! fds with the userspace platform, and the hard RLIMIT_NOFILE here is 20,000, so the
//! `N_sessions_x1` state is built over `NoFdPlatform`: backend-user's `Memory` and the same
//! std containers and locks as `UserPlatform`, with files as plain integers. The `1_session_xM`
//! state and `create_sessions` use `UserPlatform` itself (M dups of one regular file), and
//! `serialize_userplatform/2000_sessions_x1` shows the platform does not matter to serialize.
//! Deserialization never opens a file, so it always runs on `UserPlatform`.
//!
//! Run `cargo bench -p backend-user`, then `python3 backend-user/benches/report.py` for per-
//! element times and the 10x/1x ratios.

#![allow(missing_docs)]

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use backend_user::{Memory, UserPlatform};
use common::{boot, create, image, name, nofd, shared_file, user};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use luo_core::Luo;

/// (label, sessions, files, elements)
const SHAPES: [(&str, usize, usize, u64); 4] = [
    ("2000_sessions_x1", 2_000, 1, 2_000),
    ("20000_sessions_x1", 20_000, 1, 20_000),
    ("1_session_x500", 1, 500, 500),
    ("1_session_x5000", 1, 5_000, 5_000),
];

fn configure<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sampling_mode(SamplingMode::Flat);
    g
}

fn create_sessions(c: &mut Criterion) {
    let mut g = configure(c, "create_sessions");
    for n in [2_000usize, 20_000] {
        g.throughput(Throughput::Elements(n as u64));
        let names: Vec<[u8; 64]> = (0..n).map(name).collect();
        g.bench_function(n.to_string(), |b| {
            b.iter_batched(
                || {
                    let luo =
                        Luo::new(UserPlatform::new(Arc::new(Memory::new())), true).expect("luo");
                    luo.start().expect("start");
                    luo
                },
                |luo| {
                    for nm in &names {
                        black_box(create(&luo, nm));
                    }
                    luo
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn serialize(c: &mut Criterion) {
    let shared = shared_file();
    let mut g = configure(c, "serialize");
    for (label, sessions, files, elems) in SHAPES {
        g.throughput(Throughput::Elements(elems));
        if sessions > 1 {
            g.bench_function(label, |b| {
                b.iter_batched(
                    || nofd(sessions, files),
                    |(luo, mem)| {
                        luo.reboot().expect("reboot");
                        (luo, mem)
                    },
                    BatchSize::PerIteration,
                )
            });
        } else {
            g.bench_function(label, |b| {
                b.iter_batched(
                    || user(&shared, sessions, files),
                    |(luo, mem)| {
                        luo.reboot().expect("reboot");
                        (luo, mem)
                    },
                    BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();

    let mut g = configure(c, "serialize_userplatform");
    g.throughput(Throughput::Elements(2_000));
    g.bench_function("2000_sessions_x1", |b| {
        b.iter_batched(
            || user(&shared, 2_000, 1),
            |(luo, mem)| {
                luo.reboot().expect("reboot");
                (luo, mem)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();

    let mut g = configure(c, "to_bytes");
    for (label, sessions, files, elems) in SHAPES {
        g.throughput(Throughput::Elements(elems));
        let (luo, mem) = nofd(sessions, files);
        luo.reboot().expect("reboot");
        g.bench_function(label, |b| b.iter(|| black_box(mem.to_bytes())));
    }
    g.finish();
}

fn deserialize(c: &mut Criterion) {
    let shared = shared_file();
    let mut g = configure(c, "deserialize");
    let mut copy = Vec::new();
    for (label, sessions, files, elems) in SHAPES {
        let bytes = image(&shared, sessions, files);
        g.throughput(Throughput::Elements(elems));
        g.bench_function(label, |b| {
            b.iter_batched(|| bytes.clone(), boot, BatchSize::PerIteration)
        });
        copy.push((label, bytes));
    }
    g.finish();

    let mut g = configure(c, "memcpy");
    for (label, bytes) in copy {
        let mut dst = vec![0u8; bytes.len()];
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(label, |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&bytes));
                black_box(&dst);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, create_sessions, serialize, deserialize);
criterion_main!(benches);
