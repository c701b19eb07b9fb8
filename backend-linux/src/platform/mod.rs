// SPDX-License-Identifier: GPL-2.0

//! The luo-core [`Platform`] for the kernel.
//!
//! Containers are the kernel's fallible ones (`KVec`, `RBTree`, `Arc`, all with
//! `GFP_KERNEL`), locks are `struct mutex` and `struct rw_semaphore`, open files are
//! `ARef<File>`, file handlers and FLBs are the C `struct liveupdate_file_handler` and
//! `struct liveupdate_flb` objects their owners registered, called through their ops tables,
//! and handover memory is KHO: pages from `kho_alloc_preserve()`, named by their physical
//! address.
//!
//! luo-core's traits and the kernel's types both live in other crates, so every container is
//! a thin newtype here (the orphan rule).
//!
//! One file per part: [`containers`], [`sync`] (locks and lock classes), [`handlers`] (the C
//! handler and FLB objects), [`kho`] (handover memory), [`uaccess`] (user copies, with the
//! fast path every ioctl takes); here, the platform itself.

mod containers;
mod handlers;
mod kho;
mod sync;
mod uaccess;

use core::ptr;

use kernel::{
    bindings,
    error::from_err_ptr,
    fs::File,
    page::PAGE_SIZE,
    prelude::*,
    sync::aref::ARef, //
};

use luo_core::{
    errno::EINVAL,
    Errno,
    Error as LuoError,
    HandoverError,
    HandoverMemory,
    Level,
    Platform,
    Runtime, //
};

pub(crate) use containers::{
    KernelMap,
    KernelShared,
    KernelVec,
    SharedInner, //
};
pub(crate) use handlers::{
    CFlb,
    CHandler, //
};
pub(crate) use sync::{
    init_lock_classes,
    KernelMutex,
    KernelRwLock,
    PublishOnce, //
};
pub(crate) use uaccess::UserPtrArg;

use kho::{
    in_one_page,
    incoming_page, //
};

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
    type Mutex<T> = KernelMutex<T>;
    type RwLock<T> = KernelRwLock<T>;
}

impl HandoverMemory for KernelPlatform {
    const PAGE_SIZE: usize = PAGE_SIZE;

    fn alloc_page(&self) -> luo_core::Result<u64> {
        // SAFETY: Any size may be asked for; the result is a valid pointer or an `ERR_PTR`.
        let ptr = unsafe { bindings::kho_alloc_preserve(PAGE_SIZE) };
        let ptr = from_err_ptr(ptr).map_err(|e| LuoError::Platform(errno_of(e)))?;
        // SAFETY: `ptr` is the direct-map address of the page just allocated.
        let pa = unsafe { bindings::luo_glue_virt_to_phys(ptr) };
        if pa == 0 {
            // Address 0 means "none" in the handover ABI; a page there cannot be used.
            // SAFETY: `ptr` came from `kho_alloc_preserve` and is not used again.
            unsafe { bindings::kho_unpreserve_free(ptr) };
            return Err(LuoError::NoMemory);
        }
        Ok(pa)
    }

    fn free_page(&self, addr: u64) {
        // SAFETY: luo-core frees only addresses `alloc_page` returned, once; their direct-map
        // address is what `kho_alloc_preserve` returned.
        unsafe { bindings::kho_unpreserve_free(bindings::luo_glue_phys_to_virt(addr)) };
    }

    fn release_incoming_page(&self, addr: u64) {
        // `kho_restore_free` WARNs on memory that is not a preserved page; luo-core releases
        // only pages it could read, but check again rather than trust the handover.
        if !incoming_page(addr) {
            pr_warn!("not releasing {:#x}: not a preserved page\n", addr);
            return;
        }
        // SAFETY: `addr` is a page the previous kernel preserved with `kho_alloc_preserve` and
        // nobody restored (checked above); its direct-map address is what the function takes.
        unsafe { bindings::kho_restore_free(bindings::luo_glue_phys_to_virt(addr)) };
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), HandoverError> {
        let page = addr - addr % PAGE_SIZE as u64;
        let src = in_one_page(addr, buf.len()).ok_or(HandoverError::BadAddress { at: addr })?;
        // Only pages KHO preserved for this kernel are read: an address from a corrupt
        // handover may name anything, including memory that is not RAM.
        if !incoming_page(page) {
            return Err(HandoverError::BadAddress { at: addr });
        }
        // SAFETY: `src..src + buf.len()` lies in one page of RAM (`pfn_to_online_page`
        // succeeded) that KHO reserved for us, mapped in the direct map; nothing writes it.
        unsafe { ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write(&self, addr: u64, data: &[u8]) -> luo_core::Result {
        let dst = in_one_page(addr, data.len()).ok_or(LuoError::Platform(EINVAL))?;
        // SAFETY: luo-core writes only into pages `alloc_page` gave it and it still owns; the
        // range lies in one of them (checked), in the direct map.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    fn incoming_root(&self) -> Result<Option<(u64, u64)>, HandoverError> {
        // SAFETY: No preconditions.
        if !unsafe { bindings::kho_is_enabled() } {
            return Ok(None);
        }
        let mut phys: bindings::phys_addr_t = 0;
        let mut size: usize = 0;
        // SAFETY: The name is a NUL-terminated string; `phys` and `size` are valid for writes.
        let ret = unsafe { bindings::kho_retrieve_subtree(c"LUO".as_char_ptr(), &mut phys, &mut size) };
        match ret {
            0 => Ok(Some((phys, size as u64))),
            r if r == -(bindings::ENOENT as c_int) => Ok(None),
            r => {
                pr_err!("failed to retrieve LUO state 'LUO' from KHO: {}\n", r);
                Err(HandoverError::BadAddress { at: 0 })
            }
        }
    }

    fn publish_root(&self, addr: u64, size: u64) -> luo_core::Result {
        let blob = in_one_page(addr, size as usize).ok_or(LuoError::Platform(EINVAL))?;
        // SAFETY: `blob` is the direct-map address of the preserved root page; KHO records
        // its physical address and size under the name.
        let ret = unsafe {
            bindings::kho_add_subtree(c"LUO".as_char_ptr(), blob.cast::<c_void>(), size as usize)
        };
        match Errno::from_kernel_ret(ret) {
            None => Ok(()),
            Some(e) => Err(LuoError::Platform(e)),
        }
    }
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
