//! What one execution of each fuzz target's body costs without libFuzzer around it: every input
//! of the checked-in corpus (`fuzz/corpus/<target>/`) run once, in a loop, as the replay test
//! does. `time / inputs` is the body's mean cost per input, the part of a fuzzing execution
//! the targets own (docs/verification.md compares it with libFuzzer's rate).
//!
//! `cargo bench -p luo-fuzz-targets` (a few seconds per target).

#![allow(missing_docs)]

use std::fs;
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use luo_fuzz_targets::{blob, ioctl, lifecycle};

/// The corpus of `target`, sorted by file name (the same order on every run).
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut paths: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect()
}

/// A target's name and body.
type Target = (&'static str, fn(&[u8]));

fn bodies(c: &mut Criterion) {
    let targets: [Target; 4] = [
        ("handover_blob", blob::run),
        ("handover_blob_valid_root", blob::run_valid_root),
        ("lifecycle", lifecycle::run),
        ("ioctl_args", ioctl::run),
    ];
    let mut g = c.benchmark_group("corpus_once");
    g.measurement_time(Duration::from_secs(5));
    g.sample_size(20);
    for (name, run) in targets {
        let inputs = corpus(name);
        let bytes: usize = inputs.iter().map(Vec::len).sum();
        println!(
            "{name}: {} inputs, {bytes} bytes, mean input {} bytes",
            inputs.len(),
            bytes / inputs.len().max(1)
        );
        g.throughput(Throughput::Elements(inputs.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                for input in &inputs {
                    run(black_box(input));
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bodies);
criterion_main!(benches);
