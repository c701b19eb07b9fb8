//! The synchronization facade (tokio's `loom` module, concurrent-queue's `sync.rs`): loom's
//! primitives under `--cfg loom`, std's otherwise, behind one set of names.
//!
//! Only primitives with a kernel counterpart are used: `Mutex` (`struct mutex`), `RwLock`
//! (`struct rw_semaphore`), `Arc` (`refcount_t` + `kfree`), threads for the callers. No
//! relaxed or sequentially consistent atomics: the core has none, and the recorders here use
//! mutexes.

#[cfg(loom)]
pub use loom::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
#[cfg(loom)]
pub use loom::thread;

#[cfg(not(loom))]
pub use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
#[cfg(not(loom))]
pub use std::thread;

/// Locks a facade mutex; a poisoned lock (a model thread panicked) is recovered so the panic
/// that caused it is the one reported.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
