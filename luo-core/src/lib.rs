//! luo-core: the Live Update Orchestrator, kernel-agnostic.
//!
//! Named sessions of file descriptors that survive a kexec (or, in userspace, an exec), file
//! handlers called in upstream's order, File-Lifecycle-Bound global state, and the `luo-v5`
//! handover, byte-compatible with Linux 7.3. The crate is `#![no_std]` without `alloc` so the
//! same source builds inside the kernel; everything that allocates, locks or touches memory goes
//! through [`Platform`].
//!
//! Map of the crate:
//! - [`uapi`]: the ioctl ABI and its decoder; [`dispatch`]: decode, execute, respond.
//! - [`abi`]: the `luo-v5` handover structs; `block`: the block-chain writer and reader;
//!   [`image`]: validation of incoming state.
//! - [`Luo`] (`luo/`, one file per concern): boot and the lock order, the session data model,
//!   the incoming sessions, the session and file operations, the writer of the handover
//!   (`serialize`, the mirror of [`image`]) and the in-kernel handler and FLB API.
//! - `registry`: handlers and FLBs; `registry::refs`: their reference counts.
//! - [`errno`]: one error type, one errno table.

#![no_std]
#![forbid(unsafe_code)]

#[cfg(feature = "std")]
extern crate std;

pub mod abi;
mod block;
pub mod dispatch;
pub mod errno;
pub mod image;
mod luo;
pub mod platform;
mod registry;
#[cfg(feature = "std")]
pub mod std_impls;
pub mod uapi;

pub use errno::{Errno, Error, HandoverError, Result};
pub use luo::{create_name, retrieve_name, FileSet, Live, Luo, Session, SessionHead, SessionRef};
pub use platform::{
    DelegateMemory, FileHandler, FlbOps, HandoverMemory, IndexKey, InsertError, Level, OrdMap,
    PMutex, PRwLock, PVec, Platform, Preserved, RetrieveStatus, Runtime, SharedIndex, SharedLocked,
};
#[cfg(feature = "std")]
pub use std_impls::{StdIndex, StdRuntime};
