// SPDX-License-Identifier: GPL-2.0

//! User copies: an ioctl's argument as luo-core's [`UserArg`].
//!
//! Two paths. The general one, [`UserArg::read`] (used only for rare reads), goes through the
//! kernel crate's `UserSlice`. The fast path, what every ioctl runs (`read_u32` for `size`,
//! `copy_struct` for the struct, `write` for the reply), calls the primitives C's inline
//! helpers expand to (`get_user`, `check_zeroed_user` + `_copy_from_user`,
//! `_copy_to_user`) directly: the same checks (`access_ok` and the exception table are
//! inside them), two or three call layers fewer than `UserSlice`, measured in
//! docs/performance.md.

use kernel::{
    bindings,
    prelude::*,
    uaccess::UserSlice, //
};

use luo_core::{
    uapi::UserArg,
    Error as LuoError, //
};

/// An ioctl's argument: the user pointer it came with.
pub(crate) struct UserPtrArg(pub(crate) usize);

impl UserArg for UserPtrArg {
    fn read(&mut self, offset: usize, buf: &mut [u8]) -> luo_core::Result {
        let at = UserPtr::from_addr(self.0.wrapping_add(offset));
        UserSlice::new(at, buf.len())
            .reader()
            .read_slice(buf)
            .map_err(|_| LuoError::Fault)
    }

    fn write(&mut self, offset: usize, data: &[u8]) -> luo_core::Result {
        let to = self.0.wrapping_add(offset) as *mut c_void;
        // SAFETY: `data` is valid for `data.len()` bytes of reads; `_copy_to_user` checks the
        // user range itself. It is what C's inline `copy_to_user` calls on x86, and what
        // `UserSliceWriter` calls through two more layers.
        let left = unsafe { bindings::_copy_to_user(to, data.as_ptr().cast(), data.len() as _) };
        if left != 0 {
            return Err(LuoError::Fault);
        }
        Ok(())
    }

    /// C's inline `copy_struct_from_user`, step for step: zero-fill a short struct, refuse a
    /// long one whose extra bytes are not zero, copy the common part.
    #[inline(always)]
    fn copy_struct(&mut self, dst: &mut [u8], usize: usize) -> luo_core::Result {
        let src = self.0 as *const c_void;
        let size = dst.len().min(usize);
        let (common, rest) = dst.split_at_mut(size);
        if !rest.is_empty() {
            // Not unconditional: an empty `fill` still calls `memset`.
            rest.fill(0);
        } else if usize > size {
            // SAFETY: `check_zeroed_user` checks the user range itself and reads it only.
            match unsafe { bindings::check_zeroed_user(src.wrapping_byte_add(size), usize - size) } {
                1 => {}
                0 => return Err(LuoError::TrailingNonZero),
                _ => return Err(LuoError::Fault),
            }
        }
        // SAFETY: `common` is valid for `size` bytes of writes; `_copy_from_user` checks the
        // user range itself (and zeroes what it could not copy).
        let left = unsafe { bindings::_copy_from_user(common.as_mut_ptr().cast(), src, size as _) };
        if left != 0 {
            return Err(LuoError::Fault);
        }
        Ok(())
    }

    fn read_u32(&mut self) -> luo_core::Result<u32> {
        let mut value = 0u32;
        // SAFETY: `get_user` checks the user address itself (`access_ok` + exception table)
        // and writes `value` only.
        let ret = unsafe { bindings::luo_glue_get_user_u32(&mut value, self.0 as *const c_void) };
        if ret != 0 {
            return Err(LuoError::Fault);
        }
        Ok(value)
    }
}
