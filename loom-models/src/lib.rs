//! loom models of luo-core's concurrency.
//!
//! luo-core takes every lock, shared pointer and container from its `Platform`, so the same
//! core code runs on std (backend-user), on the kernel's locks (backend-linux) and, here, on
//! [loom](https://docs.rs/loom)'s model-checked primitives: [`LoomPlatform`] implements the
//! platform with newtypes over the [`sync`] facade (loom under `--cfg loom`, std otherwise),
//! fake files, in-memory handover pages and recording handlers and FLBs.
//!
//! The models live in [`models`]; each states its invariant. Run them with
//!
//! ```text
//! RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 CARGO_TARGET_DIR=target/loom \
//!     cargo test -p loom-models --release --test loom
//! ```
//!
//! Without `--cfg loom` the crate builds on std and `tests/std_stress.rs` runs the same bodies
//! on real threads (a smoke test, not a proof).

pub mod handover;
pub mod models;
pub mod platform;
pub mod recorder;
pub mod sync;

pub use platform::{FakeFile, Handover, LoomPlatform, PAGE_SIZE};
pub use recorder::{Event, Flb, Handler, Journal};
