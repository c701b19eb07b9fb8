// SPDX-License-Identifier: GPL-2.0

//! The luo-core [`Platform`] for the kernel.
//!
//! Containers are the kernel's fallible ones (`KVec`, `RBTree`, `Arc`, all with
//! `GFP_KERNEL`) and an intrusive session table, locks are `struct mutex` and `struct rw_semaphore`, open files are
//! `ARef<File>`, file handlers and FLBs are the C `struct liveupdate_file_handler` and
//! `struct liveupdate_flb` objects their owners registered, called through their ops tables,
//! and handover memory is KHO: pages from `kho_alloc_preserve()`, named by their physical
//! address.
//!
//! luo-core's traits and the kernel's types both live in other crates, so every container is
//! a thin newtype here (the orphan rule).
//!
//! One file per part: [`containers`], [`shared`] (a session's allocation and the session
//! tables, intrusive as the C core's), [`sync`] (locks and lock classes), [`handlers`] (the C
//! handler and FLB objects), [`kho`] (handover memory: `HandoverMemory`), [`uaccess`] (user
//! copies, with the fast path every ioctl takes); here, the platform's `Runtime` and its files
//! and log (`Platform`).

mod containers;
mod handlers;
mod kho;
mod shared;
mod sync;
mod uaccess;

use kernel::{
    fs::File,
    prelude::*,
    sync::aref::ARef, //
};

use luo_core::{
    Errno,
    IndexKey,
    Level,
    Platform,
    Runtime, //
};

pub(crate) use containers::{
    KernelMap,
    KernelVec, //
};
pub(crate) use handlers::{
    CFlb,
    CHandler, //
};
#[cfg(CONFIG_LIVEUPDATE_TEST)]
pub(crate) use shared::self_test as index_self_test;
pub(crate) use shared::{
    KernelIndex,
    KernelShared, //
};
pub(crate) use sync::{
    init_lock_classes,
    KernelMutex,
    KernelRwLock,
    PublishOnce, //
};
pub(crate) use uaccess::UserPtrArg;

/// The kernel as a luo-core platform. It has no state of its own: KHO and the allocators are
/// global.
pub(crate) struct KernelPlatform;

/// The errno of a kernel error, as luo-core carries it.
pub(crate) fn errno_of(e: kernel::error::Error) -> Errno {
    Errno::new(-e.to_errno())
}

impl Runtime for KernelPlatform {
    type Vec<T> = KernelVec<T>;
    type Map<K: Ord + Copy, V> = KernelMap<K, V>;
    type Shared<H: 'static, T: 'static> = KernelShared<H, T>;
    type Index<H: IndexKey + 'static, T: 'static> = KernelIndex<H, T>;
    type Mutex<T> = KernelMutex<T>;
    type RwLock<T> = KernelRwLock<T>;
}

impl Platform for KernelPlatform {
    type File = ARef<File>;
    type Handler = CHandler;
    type Flb = CFlb;

    fn file_identity(file: &ARef<File>) -> u64 {
        file.as_ptr() as usize as u64
    }

    fn dup_file(file: &ARef<File>) -> luo_core::Result<ARef<File>> {
        Ok(file.clone())
    }

    fn log(&self, level: Level, args: core::fmt::Arguments<'_>) {
        match level {
            Level::Error => pr_err!("{}\n", args),
            Level::Warn => pr_warn!("{}\n", args),
            Level::Info => pr_info!("{}\n", args),
        }
    }
}
