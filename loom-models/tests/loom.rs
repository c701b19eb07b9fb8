//! The loom models (run with `RUSTFLAGS="--cfg loom"`; see the crate docs and
//! docs/verification.md). Each test explores every interleaving of one model's lock
//! operations up to `LOOM_MAX_PREEMPTIONS` preemptions.

#![cfg(loom)]

use loom_models::models;

fn check(f: fn()) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let mut b = loom::model::Builder::new();
    // A model thread takes a few hundred lock operations; loom's default cap is 1000 branches.
    b.max_branches = b.max_branches.max(20_000);
    let start = std::time::Instant::now();
    b.check(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        f()
    });
    println!(
        "explored {} interleavings in {:.1} s",
        runs.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn m1_same_file_two_sessions() {
    check(models::same_file_two_sessions);
}

#[test]
fn m2_preserve_races_close() {
    check(models::preserve_races_close);
}

#[test]
fn m3_duplicate_create() {
    check(models::duplicate_create);
}

#[test]
fn m4_reboot_cut() {
    check(models::reboot_cut);
}

#[test]
fn m4_create_reply_fault_races_reboot() {
    check(models::create_reply_fault_races_reboot);
}

#[test]
fn m5_flb_refcount() {
    check(models::flb_refcount);
}

#[test]
fn m5_flb_refcount_failing_preserve() {
    check(models::flb_refcount_failing_preserve);
}

#[test]
fn m6_finish_races_retrieve() {
    check(models::finish_races_retrieve);
}

#[test]
fn m6_finish_retrieve_close() {
    check(models::finish_retrieve_close);
}

#[test]
fn m6_refused_finish_races_retrieve() {
    check(models::refused_finish_races_retrieve);
}

#[test]
fn m7_retrieve_session_twice() {
    check(models::retrieve_session_twice);
}

#[test]
fn m7_refused_close_races_retrieve_session() {
    check(models::refused_close_races_retrieve_session);
}
