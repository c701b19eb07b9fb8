//! Fuzz target bodies: each `run(data)` must never panic on any input; a panic is a finding.
//!
//! - [`blob`]: arbitrary bytes as the handover memory, and a variant with a valid root.
//! - [`lifecycle`]: operation sequences against backend-user and a reference model.
//! - [`ioctl`]: arbitrary ioctl words, sizes and argument bytes against a reference decoder.

pub mod blob;
pub mod common;
pub mod ioctl;
pub mod lifecycle;
