// SPDX-License-Identifier: GPL-2.0

//! Live Update Orchestrator: the Rust core (`CONFIG_LIVEUPDATE_RUST`).
//!
//! Replaces `kernel/liveupdate/luo_{core,session,file,flb}.c`. The state machine is the
//! luo-core crate (`rust/luo_core`, the same sources the userspace backend and its tests
//! build); this crate is its kernel platform ([`platform`]), the uAPI ([`device`]), the boot
//! sequence, and the in-kernel C API of `include/linux/liveupdate.h`, exported with the
//! exact C signatures so that `kernel/kexec_core.c`, `mm/memfd_luo.c` and
//! `lib/tests/liveupdate.c` build and run unchanged.
//!
//! Boot sequence, as the C core's (spec §1.3):
//! - `early_initcall`: [`luo_rust_early_init`] reads and validates the incoming `"LUO"` KHO
//!   subtree ([`Luo::new`]). Bad incoming state is refused with one log line and reported
//!   by the first open of `/dev/liveupdate` with `EIO`; the C core panics (spec B2).
//! - `late_initcall`, before `mm/`'s: [`luo_rust_late_init`] publishes the outgoing state
//!   ([`Luo::start`]) and registers `/dev/liveupdate`.
//!
//! Built in only: `kernel_kexec()` calls [`liveupdate_reboot`] directly, `mm/memfd_luo.c`
//! (built in) registers its handler from a `late_initcall`, and nothing here is exported to
//! modules (the C core exports nothing either).

use kernel::{
    bindings,
    prelude::*,
    sync::{
        atomic::{
            ordering::{
                Acquire,
                Release, //
            },
            AtomicFlag,
        },
    },
};

use luo_core::{
    Error as LuoError,
    Luo, //
};

mod device;
mod platform;
#[cfg(CONFIG_LIVEUPDATE_TEST)]
mod testhook;

use platform::{
    CFlb,
    CHandler,
    KernelPlatform,
    PublishOnce, //
};

/// Log prefix of the printing macros: `"luo: "`, as the C core's `KBUILD_MODNAME`.
const __LOG_PREFIX: &[u8] = b"luo\0";

/// What the core keeps for the life of the kernel.
struct Orchestrator {
    luo: Luo<KernelPlatform>,
    /// `liveupdate_enabled()`: set by the late initcall once the outgoing state is published.
    enabled: AtomicFlag,
}

/// The orchestrator, published by the early initcall.
static ORCHESTRATOR: PublishOnce<Orchestrator> = PublishOnce::new();

/// The orchestrator, once the early initcall created it.
#[inline]
pub(crate) fn luo() -> Option<&'static Luo<KernelPlatform>> {
    ORCHESTRATOR.get().map(|o| &o.luo)
}

/// A negative errno for the C API.
fn neg(e: LuoError) -> c_int {
    -e.errno().get()
}

/// `early_initcall`: reads the incoming state. `requested` is the `liveupdate=` parameter.
///
/// # Safety
///
/// None: `unsafe` only because `#[export]` matches bindgen's declaration, which is unsafe.
#[export]
pub unsafe extern "C" fn luo_rust_early_init(requested: bool) -> c_int {
    platform::init_lock_classes();
    #[cfg(CONFIG_LIVEUPDATE_TEST)]
    match platform::index_self_test() {
        Ok(()) => pr_info!("session index self-test passed\n"),
        Err(what) => {
            pr_err!("session index self-test failed: {}\n", what);
            kernel::warn_on!(true);
        }
    }
    // SAFETY: No preconditions.
    let kho = unsafe { bindings::kho_is_enabled() };
    if requested && !kho {
        pr_warn!("Disabling liveupdate because KHO is disabled\n");
    }
    // With KHO off there is no incoming state and nothing can be handed over; the object
    // still exists so that the C API answers (EOPNOTSUPP) instead of crashing.
    match Luo::new(KernelPlatform, requested && kho) {
        Ok(luo) => {
            let orchestrator = Orchestrator {
                luo,
                enabled: AtomicFlag::new(false),
            };
            if !ORCHESTRATOR.publish(orchestrator) {
                pr_err!("initialized twice\n");
                return -(bindings::EBUSY as c_int);
            }
            0
        }
        Err(e) => {
            pr_err!("cannot initialize: {}\n", format_args!("{e}"));
            neg(e)
        }
    }
}

/// `late_initcall`: publishes the outgoing state and registers `/dev/liveupdate`.
///
/// # Safety
///
/// None: `unsafe` only because `#[export]` matches bindgen's declaration, which is unsafe.
#[export]
pub unsafe extern "C" fn luo_rust_late_init() -> c_int {
    let Some(orchestrator) = ORCHESTRATOR.get() else {
        return 0;
    };
    let luo = &orchestrator.luo;
    match luo.start() {
        Ok(()) => {}
        Err(LuoError::Disabled) => return 0,
        Err(e) => {
            pr_err!("failed to prepare LUO state: {}\n", format_args!("{e}"));
            return neg(e);
        }
    }
    orchestrator.enabled.store(true, Release);
    pr_info!(
        "Rust core: live update number {} is next\n",
        luo.liveupdate_num()
    );
    match device::register_device() {
        Ok(()) => 0,
        Err(e) => {
            pr_err!("cannot register /dev/liveupdate: {:?}\n", e);
            e.to_errno()
        }
    }
}

/// Is the live update orchestrator enabled (`liveupdate=on`, KHO on, outgoing state ready)?
///
/// # Safety
///
/// None: `unsafe` only because `#[export]` matches bindgen's declaration, which is unsafe.
#[export]
pub unsafe extern "C" fn liveupdate_enabled() -> bool {
    ORCHESTRATOR
        .get()
        .is_some_and(|o| o.enabled.load(Acquire))
}

/// Called by `kernel_kexec()`: freezes every preserved file and writes the handover.
///
/// On failure everything is unfrozen and the errno returned, which aborts the reboot. On
/// success every later LUO operation sleeps until the kexec.
///
/// # Safety
///
/// None: `unsafe` only because `#[export]` matches bindgen's declaration, which is unsafe.
#[export]
pub unsafe extern "C" fn liveupdate_reboot() -> c_int {
    let Some(luo) = luo() else {
        return 0;
    };
    match luo.reboot() {
        Ok(()) => {
            #[cfg(CONFIG_LIVEUPDATE_TEST)]
            testhook::corrupt_after_reboot(luo);
            0
        }
        Err(e) => neg(e),
    }
}

/// Registers a file handler (`mm/memfd_luo.c` registers `"memfd-v2"`).
///
/// # Safety
///
/// `fh` is NULL or a handler that stays valid while registered (the C API's contract).
#[export]
pub unsafe extern "C" fn liveupdate_register_file_handler(
    fh: *mut bindings::liveupdate_file_handler,
) -> c_int {
    let Some(luo) = luo() else {
        return -(bindings::EOPNOTSUPP as c_int);
    };
    // SAFETY: The caller's contract is the wrapper's invariant.
    let Some(h) = (unsafe { CHandler::from_raw(fh) }) else {
        return -(bindings::EINVAL as c_int);
    };
    match luo.register_handler(&h) {
        Ok(()) => {
            // Without any LUO lock held: the test registers FLBs with this handler.
            // SAFETY: `fh` is a registered handler.
            unsafe { bindings::luo_glue_test_register(fh) };
            0
        }
        Err(e) => neg(e),
    }
}

/// Unregisters a file handler; refused (and logged) while it has live files.
///
/// # Safety
///
/// `fh` is NULL or a handler passed to [`liveupdate_register_file_handler`].
#[export]
pub unsafe extern "C" fn liveupdate_unregister_file_handler(
    fh: *mut bindings::liveupdate_file_handler,
) {
    // SAFETY: The caller's contract is the wrapper's invariant.
    if let (Some(luo), Some(h)) = (luo(), unsafe { CHandler::from_raw(fh) }) {
        let _ = luo.unregister_handler(&h);
    }
}

/// Links an FLB to a file handler.
///
/// # Safety
///
/// `fh` and `flb` are NULL or valid for as long as they stay registered.
#[export]
pub unsafe extern "C" fn liveupdate_register_flb(
    fh: *mut bindings::liveupdate_file_handler,
    flb: *mut bindings::liveupdate_flb,
) -> c_int {
    let Some(luo) = luo() else {
        return -(bindings::EOPNOTSUPP as c_int);
    };
    // SAFETY: The caller's contract is the wrappers' invariant.
    let (Some(h), Some(f)) = (unsafe { CHandler::from_raw(fh) }, unsafe { CFlb::from_raw(flb) })
    else {
        return -(bindings::EINVAL as c_int);
    };
    match luo.register_flb(&h, &f) {
        Ok(()) => 0,
        Err(e) => neg(e),
    }
}

/// Unlinks an FLB from a file handler.
///
/// # Safety
///
/// As for [`liveupdate_register_flb`].
#[export]
pub unsafe extern "C" fn liveupdate_unregister_flb(
    fh: *mut bindings::liveupdate_file_handler,
    flb: *mut bindings::liveupdate_flb,
) {
    // SAFETY: The caller's contract is the wrappers' invariant.
    if let (Some(luo), Some(h), Some(f)) = (luo(), unsafe { CHandler::from_raw(fh) }, unsafe {
        CFlb::from_raw(flb)
    }) {
        let _ = luo.unregister_flb(&h, &f);
    }
}

/// The two `liveupdate_flb_get_*` calls: `get` takes the reference; the object goes to `*objp`
/// unless `objp` is NULL.
///
/// # Safety
///
/// `flb` is NULL or a valid FLB; `objp` is NULL or valid for a pointer-sized write.
unsafe fn flb_get(
    flb: *mut bindings::liveupdate_flb,
    objp: *mut *mut c_void,
    get: impl FnOnce(&Luo<KernelPlatform>, &CFlb) -> luo_core::Result<usize>,
) -> c_int {
    let Some(luo) = luo() else {
        return -(bindings::EOPNOTSUPP as c_int);
    };
    // SAFETY: The caller's contract is the wrapper's invariant.
    let Some(f) = (unsafe { CFlb::from_raw(flb) }) else {
        return -(bindings::EINVAL as c_int);
    };
    match get(luo, &f) {
        Ok(obj) => {
            if !objp.is_null() {
                // SAFETY: `objp` is valid for writes (caller's contract).
                unsafe { *objp = obj as *mut c_void };
            }
            0
        }
        Err(e) => neg(e),
    }
}

/// Takes a reference to an FLB's incoming object, retrieving it on first use.
///
/// # Safety
///
/// `flb` is NULL or a valid FLB; `objp` is NULL or valid for a pointer-sized write.
#[export]
pub unsafe extern "C" fn liveupdate_flb_get_incoming(
    flb: *mut bindings::liveupdate_flb,
    objp: *mut *mut c_void,
) -> c_int {
    // SAFETY: The caller's contract is `flb_get`'s.
    unsafe { flb_get(flb, objp, Luo::flb_get_incoming) }
}

/// Drops a reference taken by [`liveupdate_flb_get_incoming`].
///
/// # Safety
///
/// `flb` is NULL or a valid FLB.
#[export]
pub unsafe extern "C" fn liveupdate_flb_put_incoming(flb: *mut bindings::liveupdate_flb) {
    // SAFETY: The caller's contract is the wrapper's invariant.
    if let (Some(luo), Some(f)) = (luo(), unsafe { CFlb::from_raw(flb) }) {
        luo.flb_put_incoming(&f);
    }
}

/// Takes a reference to an FLB's outgoing object.
///
/// # Safety
///
/// `flb` is NULL or a valid FLB; `objp` is NULL or valid for a pointer-sized write.
#[export]
pub unsafe extern "C" fn liveupdate_flb_get_outgoing(
    flb: *mut bindings::liveupdate_flb,
    objp: *mut *mut c_void,
) -> c_int {
    // SAFETY: The caller's contract is `flb_get`'s.
    unsafe { flb_get(flb, objp, Luo::flb_get_outgoing) }
}

/// Drops a reference taken by [`liveupdate_flb_get_outgoing`].
///
/// # Safety
///
/// `flb` is NULL or a valid FLB.
#[export]
pub unsafe extern "C" fn liveupdate_flb_put_outgoing(flb: *mut bindings::liveupdate_flb) {
    // SAFETY: The caller's contract is the wrapper's invariant.
    if let (Some(luo), Some(f)) = (luo(), unsafe { CFlb::from_raw(flb) }) {
        luo.flb_put_outgoing(&f);
    }
}
