// SPDX-License-Identifier: GPL-2.0

//! Handover memory: KHO pages named by their physical address, read only where KHO preserved
//! them for this kernel.

use kernel::{
    bindings,
    page::PAGE_SIZE, //
};

/// The virtual address of `len` bytes at `addr`, if they lie inside one page.
#[inline]
pub(super) fn in_one_page(addr: u64, len: usize) -> Option<*mut u8> {
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
pub(super) fn phys_to_virt(addr: u64) -> *mut u8 {
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
pub(super) fn incoming_page(page: u64) -> bool {
    // SAFETY: The helper only inspects the `struct page` of `page`, if it is online memory.
    unsafe { bindings::luo_glue_incoming_page(page) }
}
