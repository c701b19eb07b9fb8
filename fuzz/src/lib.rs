//! The fuzz targets' logic, shared with the regression tests.
//!
//! Everything lives in [`targets`], which uses only luo-core, backend-user, luo-handlers and
//! libc, so `tests/tests/fuzz_regressions.rs` can compile the same file (`#[path]`) and replay
//! saved inputs without libFuzzer.

pub mod targets;
