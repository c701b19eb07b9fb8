// SPDX-License-Identifier: GPL-2.0

//! File handlers and FLBs: the C objects their owners registered
//! (`struct liveupdate_file_handler`, `struct liveupdate_flb`), called through their ops
//! tables with upstream's argument structs.

use core::ptr::{
    self,
    NonNull, //
};

use kernel::{
    bindings,
    fs::File,
    prelude::*,
    sync::aref::ARef, //
};

use luo_core::{
    errno::EINVAL,
    Errno,
    FileHandler,
    FlbOps,
    Platform,
    Preserved,
    RetrieveStatus, //
};

use super::KernelPlatform;

/// The bytes of a fixed-size C string field up to its first NUL (all of it if there is none;
/// luo-core then refuses the name).
fn c_field(field: &[u8]) -> &[u8] {
    let n = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..n]
}

/// Maps a handler or FLB callback's return value: 0 is success, `-errno` an error, and any
/// positive value, which the C API does not define, `EINVAL` (the C core lets it through:
/// spec B8).
///
/// `compat` is only called for the warning: finding the end of the C string costs a byte loop,
/// and `freeze` runs for every preserved file at reboot.
fn op_result<'a>(what: &str, compat: impl FnOnce() -> &'a [u8], ret: c_int) -> Result<(), Errno> {
    match ret {
        0 => Ok(()),
        r if r < 0 => Err(Errno::from_kernel_ret(r).unwrap_or(EINVAL)),
        r => {
            pr_warn!(
                "{:?}: {} returned {}, treated as -EINVAL\n",
                BStrDisplay(compat()),
                what,
                r
            );
            Err(EINVAL)
        }
    }
}

/// Displays bytes as text (for log lines with compatible strings).
struct BStrDisplay<'a>(&'a [u8]);

impl core::fmt::Debug for BStrDisplay<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("\"")?;
        for &b in self.0 {
            if b.is_ascii_graphic() || b == b' ' {
                core::fmt::Write::write_char(f, b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        f.write_str("\"")
    }
}

/// A file handler registered by C code (`struct liveupdate_file_handler`).
///
/// # Invariants
///
/// The handler and its ops table stay valid and unchanged while LUO can reach the handler:
/// from `liveupdate_register_file_handler()` until `liveupdate_unregister_file_handler()`
/// succeeded and the last file using it was finished or unpreserved (luo-core refuses to
/// unregister a handler with live files, and pins its owner module while it has files).
#[derive(Clone, Copy)]
pub(crate) struct CHandler(NonNull<bindings::liveupdate_file_handler>);

// SAFETY: A handler is an immutable C object whose callbacks may be called from any task, as
// the C core does.
unsafe impl Send for CHandler {}
// SAFETY: As for `Send`: the object is only read.
unsafe impl Sync for CHandler {}

impl CHandler {
    /// Wraps a handler pointer passed to the exported C API; `None` for NULL.
    ///
    /// # Safety
    ///
    /// A non-NULL `fh` must satisfy the type invariant (the C API's contract for handlers).
    pub(crate) unsafe fn from_raw(fh: *mut bindings::liveupdate_file_handler) -> Option<Self> {
        // INVARIANT: the caller guarantees it for a non-NULL `fh`.
        NonNull::new(fh).map(CHandler)
    }

    fn raw(&self) -> *mut bindings::liveupdate_file_handler {
        self.0.as_ptr()
    }

    fn ops(&self) -> Option<&bindings::liveupdate_file_ops> {
        // SAFETY: The handler is valid (type invariant); `ops` is NULL or points to its ops
        // table, which is valid as long as the handler is.
        unsafe { (*self.raw()).ops.as_ref() }
    }

    /// Arguments for an op, as the C core fills them.
    fn args(
        &self,
        file: Option<&File>,
        data: u64,
        private: usize,
        status: RetrieveStatus,
    ) -> bindings::liveupdate_file_op_args {
        bindings::liveupdate_file_op_args {
            handler: self.raw(),
            retrieve_status: status.as_raw(),
            file: file.map_or(ptr::null_mut(), |f| f.as_ptr()),
            serialized_data: data,
            private_data: private as *mut c_void,
        }
    }
}

impl FileHandler<KernelPlatform> for CHandler {
    fn key(&self) -> usize {
        self.raw() as usize
    }

    fn compatible(&self) -> &[u8] {
        // SAFETY: The handler is valid for at least as long as `self` (type invariant), and
        // `compatible` is a `const` array, never written after the object was defined.
        c_field(unsafe { &(*self.raw()).compatible })
    }

    fn has_required_ops(&self) -> bool {
        self.ops().is_some_and(|o| {
            o.can_preserve.is_some()
                && o.preserve.is_some()
                && o.unpreserve.is_some()
                && o.retrieve.is_some()
                && o.finish.is_some()
        })
    }

    fn get_owner(&self) -> bool {
        let owner = self.ops().map_or(ptr::null_mut(), |o| o.owner);
        // SAFETY: `owner` is NULL (built in) or the module that defined the handler, which is
        // alive: it cannot unload while its handler is registered.
        unsafe { bindings::luo_glue_try_module_get(owner) }
    }

    fn put_owner(&self) {
        let owner = self.ops().map_or(ptr::null_mut(), |o| o.owner);
        // SAFETY: Paired with a successful `get_owner`.
        unsafe { bindings::luo_glue_module_put(owner) }
    }

    fn can_preserve(&self, file: &ARef<File>) -> bool {
        match self.ops().and_then(|o| o.can_preserve) {
            // SAFETY: The op belongs to this handler (type invariant) and gets the handler and
            // an open file we hold a reference to, as the C core calls it.
            Some(f) => unsafe { f(self.raw(), file.as_ptr()) },
            None => false,
        }
    }

    fn preserve(&self, file: &ARef<File>) -> Result<Preserved, Errno> {
        let f = self.ops().and_then(|o| o.preserve).ok_or(EINVAL)?;
        let mut args = self.args(Some(file), 0, 0, RetrieveStatus::NotAttempted);
        // SAFETY: `args` is a valid `liveupdate_file_op_args` for this handler and a file we
        // hold a reference to, filled as the C core fills it for `preserve`.
        let ret = unsafe { f(&mut args) };
        op_result("preserve", || self.compatible(), ret)?;
        Ok(Preserved {
            data: args.serialized_data,
            private: args.private_data as usize,
        })
    }

    fn unpreserve(&self, file: &ARef<File>, state: Preserved) {
        if let Some(f) = self.ops().and_then(|o| o.unpreserve) {
            let mut args = self.args(
                Some(file),
                state.data,
                state.private,
                RetrieveStatus::NotAttempted,
            );
            // SAFETY: As for `preserve`, with the state `preserve` returned.
            unsafe { f(&mut args) };
        }
    }

    fn freeze(&self, file: &ARef<File>, state: &mut Preserved) -> Result<(), Errno> {
        let Some(f) = self.ops().and_then(|o| o.freeze) else {
            return Ok(());
        };
        let mut args = self.args(
            Some(file),
            state.data,
            state.private,
            RetrieveStatus::NotAttempted,
        );
        // SAFETY: As for `preserve`, with the current state.
        let ret = unsafe { f(&mut args) };
        op_result("freeze", || self.compatible(), ret)?;
        state.data = args.serialized_data;
        Ok(())
    }

    fn unfreeze(&self, file: &ARef<File>, state: Preserved) {
        if let Some(f) = self.ops().and_then(|o| o.unfreeze) {
            let mut args = self.args(
                Some(file),
                state.data,
                state.private,
                RetrieveStatus::NotAttempted,
            );
            // SAFETY: As for `preserve`, with the frozen state.
            unsafe { f(&mut args) };
        }
    }

    fn retrieve(&self, data: u64) -> Result<ARef<File>, Errno> {
        let f = self.ops().and_then(|o| o.retrieve).ok_or(EINVAL)?;
        let mut args = self.args(None, data, 0, RetrieveStatus::NotAttempted);
        // SAFETY: `args` is filled as the C core fills it for `retrieve`: the handler and the
        // data its `preserve`/`freeze` produced in the previous kernel.
        let ret = unsafe { f(&mut args) };
        // A handler that did not fail hands one reference to `args.file` to its caller
        // (upstream installs it even for a positive return); after a failure `file` is not
        // set, and is not touched.
        let file = if ret >= 0 {
            NonNull::new(args.file.cast::<File>()).map(|p| {
                // SAFETY: A non-NULL `file` set by a `retrieve` that did not fail is an open
                // file whose reference the handler hands to its caller; `File` is a
                // transparent wrapper of `struct file`.
                unsafe { ARef::from_raw(p) }
            })
        } else {
            None
        };
        // A positive return is refused: the reference taken over above is dropped.
        op_result("retrieve", || self.compatible(), ret)?;
        match file {
            Some(file) => Ok(file),
            None => {
                pr_warn!(
                    "{:?}: retrieve returned 0 without a file\n",
                    BStrDisplay(self.compatible())
                );
                Err(EINVAL)
            }
        }
    }

    fn can_finish(&self, file: Option<&ARef<File>>, data: u64, status: RetrieveStatus) -> bool {
        let Some(f) = self.ops().and_then(|o| o.can_finish) else {
            return true;
        };
        let mut args = self.args(file.map(|f| &**f), data, 0, status);
        // SAFETY: `args` is filled as the C core fills it for `can_finish`; `file` is NULL or a
        // file LUO holds a reference to.
        unsafe { f(&mut args) }
    }

    fn finish(&self, file: Option<&ARef<File>>, data: u64, status: RetrieveStatus) {
        if let Some(f) = self.ops().and_then(|o| o.finish) {
            let mut args = self.args(file.map(|f| &**f), data, 0, status);
            // SAFETY: As for `can_finish`.
            unsafe { f(&mut args) };
        }
    }

    fn get_id(&self, file: &ARef<File>) -> u64 {
        match self.ops().and_then(|o| o.get_id) {
            // SAFETY: The op gets an open file we hold a reference to.
            Some(f) => (unsafe { f(file.as_ptr()) }) as u64,
            None => KernelPlatform::file_identity(file),
        }
    }
}

/// An FLB defined by C code (`struct liveupdate_flb`).
///
/// LUO keeps its own state for the FLB (luo-core's registry); the `private` area of the C
/// object, whose layout the header fixes, is left untouched.
///
/// # Invariants
///
/// The FLB and its ops table stay valid and unchanged while LUO can reach it (the C API's
/// contract: FLBs are static objects of their owner, unregistered before it goes away).
#[derive(Clone, Copy)]
pub(crate) struct CFlb(NonNull<bindings::liveupdate_flb>);

// SAFETY: An FLB is a C object LUO only reads; its callbacks may run on any task, as in C.
unsafe impl Send for CFlb {}
// SAFETY: As for `Send`.
unsafe impl Sync for CFlb {}

impl CFlb {
    /// Wraps an FLB pointer passed to the exported C API; `None` for NULL.
    ///
    /// # Safety
    ///
    /// A non-NULL `flb` must satisfy the type invariant.
    pub(crate) unsafe fn from_raw(flb: *mut bindings::liveupdate_flb) -> Option<Self> {
        // INVARIANT: the caller guarantees it for a non-NULL `flb`.
        NonNull::new(flb).map(CFlb)
    }

    fn raw(&self) -> *mut bindings::liveupdate_flb {
        self.0.as_ptr()
    }

    fn ops(&self) -> Option<&bindings::liveupdate_flb_ops> {
        // SAFETY: The FLB is valid (type invariant); `ops` is NULL or its ops table.
        unsafe { (*self.raw()).ops.as_ref() }
    }

    fn args(&self, data: u64, obj: usize) -> bindings::liveupdate_flb_op_args {
        bindings::liveupdate_flb_op_args {
            flb: self.raw(),
            data,
            obj: obj as *mut c_void,
        }
    }
}

impl FlbOps for CFlb {
    fn key(&self) -> usize {
        self.raw() as usize
    }

    fn compatible(&self) -> &[u8] {
        // SAFETY: The FLB is valid (type invariant) and `compatible` is a `const` array.
        c_field(unsafe { &(*self.raw()).compatible })
    }

    fn has_required_ops(&self) -> bool {
        self.ops().is_some_and(|o| {
            o.preserve.is_some() && o.unpreserve.is_some() && o.retrieve.is_some() && o.finish.is_some()
        })
    }

    fn get_owner(&self) -> bool {
        let owner = self.ops().map_or(ptr::null_mut(), |o| o.owner);
        // SAFETY: `owner` is NULL (built in) or the live module that defined the FLB.
        unsafe { bindings::luo_glue_try_module_get(owner) }
    }

    fn put_owner(&self) {
        let owner = self.ops().map_or(ptr::null_mut(), |o| o.owner);
        // SAFETY: Paired with a successful `get_owner`.
        unsafe { bindings::luo_glue_module_put(owner) }
    }

    fn preserve(&self) -> Result<(u64, usize), Errno> {
        let f = self.ops().and_then(|o| o.preserve).ok_or(EINVAL)?;
        let mut args = self.args(0, 0);
        // SAFETY: `args` names this FLB, as the C core passes it to `preserve`.
        let ret = unsafe { f(&mut args) };
        op_result("FLB preserve", || self.compatible(), ret)?;
        Ok((args.data, args.obj as usize))
    }

    fn unpreserve(&self, data: u64, obj: usize) {
        if let Some(f) = self.ops().and_then(|o| o.unpreserve) {
            let mut args = self.args(data, obj);
            // SAFETY: `args` carries what `preserve` returned, as in the C core.
            unsafe { f(&mut args) };
        }
    }

    fn retrieve(&self, data: u64) -> Result<usize, Errno> {
        let f = self.ops().and_then(|o| o.retrieve).ok_or(EINVAL)?;
        let mut args = self.args(data, 0);
        // SAFETY: `args` carries the data handed over by the previous kernel, as in the C core.
        let ret = unsafe { f(&mut args) };
        op_result("FLB retrieve", || self.compatible(), ret)?;
        Ok(args.obj as usize)
    }

    fn finish(&self, data: u64, obj: usize) {
        if let Some(f) = self.ops().and_then(|o| o.finish) {
            let mut args = self.args(data, obj);
            // SAFETY: `args` carries what `retrieve` returned, as in the C core.
            unsafe { f(&mut args) };
        }
    }
}
