//! File handlers for the userspace backend.
//!
//! - [`memfd::MemfdHandler`]: memfds (upstream `memfd-v2` semantics; the memory stays in place
//!   across exec, nothing is copied).
//! - [`testing`]: a handler and FLBs whose every callback is recorded and can be made to fail,
//!   for the ordering and unhappy-path tests.

pub mod memfd;
pub mod testing;

pub use memfd::{MemfdHandler, MEMFD_USER_COMPATIBLE};
