//! The loom model bodies on real threads, many times (no `--cfg loom`): a smoke test that the
//! models and their invariants hold on the interleavings the OS happens to produce, and that
//! they keep compiling in the ordinary workspace build.

#![cfg(not(loom))]

use loom_models::models;

const RUNS: usize = 200;

fn stress(f: fn()) {
    for _ in 0..RUNS {
        f();
    }
}

#[test]
fn same_file_two_sessions() {
    stress(models::same_file_two_sessions);
}

#[test]
fn preserve_races_close() {
    stress(models::preserve_races_close);
}

#[test]
fn duplicate_create() {
    stress(models::duplicate_create);
}

#[test]
fn create_reply_fault_races_reboot() {
    stress(models::create_reply_fault_races_reboot);
}

#[test]
fn reboot_cut() {
    stress(models::reboot_cut);
}

#[test]
fn flb_refcount() {
    stress(models::flb_refcount);
    stress(models::flb_refcount_failing_preserve);
}

#[test]
fn incoming_finish() {
    stress(models::finish_races_retrieve);
    stress(models::finish_retrieve_close);
    stress(models::refused_finish_races_retrieve);
}

#[test]
fn incoming_retrieve_session() {
    stress(models::retrieve_session_twice);
    stress(models::refused_close_races_retrieve_session);
}

#[test]
fn handover_builder_roundtrips() {
    let img = models::incoming_image();
    let c = loom_models::handover::decode(&img).unwrap();
    assert_eq!(c.sessions.len(), 1);
    assert_eq!(c.sessions[0].files.len(), 2);
    assert_eq!(c.flbs.len(), 1);
}
