// SPDX-License-Identifier: GPL-2.0

//! Handover memory: KHO pages named by their physical address, read only where KHO preserved
//! them for this kernel.

use core::ptr;

use kernel::{
    bindings,
    error::from_err_ptr,
    page::PAGE_SIZE,
    prelude::*, //
};

use luo_core::{
    errno::EINVAL,
    Errno,
    Error as LuoError,
    HandoverError,
    HandoverMemory, //
};

use super::{
    errno_of,
    KernelPlatform, //
};

/// The virtual address of `len` bytes at `addr`, if they lie inside one page.
#[inline]
fn in_one_page(addr: u64, len: usize) -> Option<*mut u8> {
    let off = (addr % PAGE_SIZE as u64) as usize;
    if addr == 0 || off + len > PAGE_SIZE {
        return None;
    }
    Some(phys_to_virt(addr))
}

/// `__va()`: the direct-map address of a physical address. Serialization writes every entry
/// through it, so on x86-64, where `__va()` is an addition of `page_offset_base`
/// (`__PAGE_OFFSET`), it is computed here instead of through the C glue's function call.
#[inline]
fn phys_to_virt(addr: u64) -> *mut u8 {
    #[cfg(CONFIG_X86_64)]
    {
        // SAFETY: `page_offset_base` is set once during early boot (before any initcall) and
        // only read afterwards; reading it by value creates no reference to the static.
        let base = unsafe { bindings::page_offset_base };
        (addr as usize).wrapping_add(base as usize) as *mut u8
    }
    #[cfg(not(CONFIG_X86_64))]
    {
        // SAFETY: `phys_to_virt` only computes an address in the direct map.
        unsafe { bindings::luo_glue_phys_to_virt(addr) }.cast::<u8>()
    }
}

/// Is `page` (page-aligned) a page the previous kernel preserved and nobody restored yet?
fn incoming_page(page: u64) -> bool {
    // SAFETY: The helper only inspects the `struct page` of `page`, if it is online memory.
    unsafe { bindings::luo_glue_incoming_page(page) }
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
