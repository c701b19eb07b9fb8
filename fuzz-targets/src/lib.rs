//! Fuzz target bodies: each `run(data)` must never panic on any input; a panic is a finding.
//!
//! - [`blob`]: arbitrary bytes as the handover memory, and a variant with a valid root.
//! - [`lifecycle`]: operation sequences against backend-user and a reference model.
//! - [`ioctl`]: arbitrary ioctl words, sizes and argument bytes against a reference decoder.
//!
//! A crate of its own so that the cargo-fuzz binaries (`fuzz/`) and the replay tests
//! (`tests/tests/fuzz_regressions.rs`) run the very same bodies: every saved finding and seed is
//! replayed on every `cargo test`, without libFuzzer or nightly. Nothing here knows libFuzzer,
//! and the malloc limit and the leak check stay with the fuzz binaries (`fuzz/src/lib.rs`): a
//! global allocator here would become the tests' allocator too.

pub mod blob;
pub mod common;
pub mod ioctl;
pub mod lifecycle;
