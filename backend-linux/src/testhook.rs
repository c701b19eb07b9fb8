// SPDX-License-Identifier: GPL-2.0

//! Test only: damage the outgoing handover after `liveupdate_reboot()` serialized it.
//!
//! With `luo_test_corrupt=<what>` on the command line of a kernel built with
//! `CONFIG_LIVEUPDATE_TEST`, a successful reboot serialization is followed by one deliberate
//! corruption of what the next kernel will read, so that its handling of bad incoming state
//! can be tested across a real kexec (backend-linux/vm-extra.sh, mode `corrupt`):
//!
//! - `compat`: the root's compatible string becomes `"luo-v0"`;
//! - `count`: the first session block claims one entry more than a block holds;
//! - `chain`: the first session block links to a page that is not preserved;
//! - `cycle`: the first session block links to itself;
//! - `files`: the first session claims one file more than its file chain holds.

use core::ptr;

use kernel::{
    bindings,
    page::PAGE_SIZE,
    prelude::*,
};

use luo_core::{
    abi::{
        entries_per_block,
        KhoBlockHeaderSer,
        LuoSer,
        LuoSessionSer,
        BLOCK_HEADER_SIZE, //
    },
    Luo,
};

use crate::platform::KernelPlatform;

/// Copies a `T` out of this kernel's own handover page at `pa`.
fn read<T: FromBytes + IntoBytes>(pa: u64) -> T {
    let mut value = T::new_zeroed();
    let bytes = value.as_mut_bytes();
    // SAFETY: `pa` is an address luo-core wrote (the outgoing root or a block it allocated),
    // in this kernel's direct map; the range stays inside the page (`T` is a header or entry
    // placed by luo-core).
    unsafe {
        ptr::copy_nonoverlapping(
            bindings::luo_glue_phys_to_virt(pa).cast::<u8>(),
            bytes.as_mut_ptr(),
            bytes.len(),
        )
    };
    value
}

/// Writes a `T` into this kernel's own handover page at `pa`.
fn write<T: IntoBytes + zerocopy::Immutable>(pa: u64, value: &T) {
    let bytes = value.as_bytes();
    // SAFETY: As for `read`; the state is serialized, so luo-core no longer writes it.
    unsafe {
        ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            bindings::luo_glue_phys_to_virt(pa).cast::<u8>(),
            bytes.len(),
        )
    };
}

/// Applies the corruption asked for on the command line, if any.
pub(crate) fn corrupt_after_reboot(luo: &Luo<KernelPlatform>) {
    // SAFETY: No preconditions.
    let mode = unsafe { bindings::luo_glue_test_corrupt_mode() };
    if mode == bindings::luo_test_corrupt_LUO_TEST_CORRUPT_NONE {
        return;
    }
    let Some(root) = luo.root_addr() else {
        return;
    };
    let mut ser: LuoSer = read(root);
    let head = ser.sessions_pa;
    let what = match mode {
        bindings::luo_test_corrupt_LUO_TEST_CORRUPT_COMPAT => {
            ser.compatible = *b"luo-v0\0\0";
            write(root, &ser);
            "compatible \"luo-v0\""
        }
        _ if head == 0 => {
            pr_warn!("test: no session block to corrupt\n");
            return;
        }
        bindings::luo_test_corrupt_LUO_TEST_CORRUPT_COUNT => {
            let mut h: KhoBlockHeaderSer = read(head);
            let per = entries_per_block(PAGE_SIZE, core::mem::size_of::<LuoSessionSer>());
            h.count = per as u64 + 1;
            write(head, &h);
            "session block count past the block"
        }
        bindings::luo_test_corrupt_LUO_TEST_CORRUPT_CHAIN => {
            let mut h: KhoBlockHeaderSer = read(head);
            // SAFETY: No preconditions.
            h.next = unsafe { bindings::luo_glue_test_unpreserved_page() };
            write(head, &h);
            "session block linked to a page that is not preserved"
        }
        bindings::luo_test_corrupt_LUO_TEST_CORRUPT_CYCLE => {
            let mut h: KhoBlockHeaderSer = read(head);
            h.next = head;
            write(head, &h);
            "session block linked to itself"
        }
        bindings::luo_test_corrupt_LUO_TEST_CORRUPT_FILES => {
            let at = head + BLOCK_HEADER_SIZE as u64;
            let mut s: LuoSessionSer = read(at);
            let count = s.file_set_ser.count;
            s.file_set_ser.count = count + 1;
            write(at, &s);
            "first session claims one file more than its chain holds"
        }
        _ => return,
    };
    pr_info!("test: corrupted the outgoing state: {}\n", what);
}
