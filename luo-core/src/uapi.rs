//! The userspace ABI of `include/uapi/linux/liveupdate.h` and its ioctl decoder.
//!
//! The decoder follows upstream's validation order exactly (spec §2.4): command-number range
//! (`EINVAL`), read `size` (`EFAULT`), exact command word (`ENOTTY`), session direction
//! (`EINVAL`), minimum size (`EINVAL`), then `copy_struct_from_user` (trailing bytes must be
//! zero: `E2BIG`). User memory is reached only through [`UserArg`], which the kernel backend
//! implements with `UserSlice` and tests implement with a buffer that can fault anywhere.

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::abi::SESSION_NAME_LEN;
use crate::errno::{Error, Result};

/// `LIVEUPDATE_IOCTL_TYPE`.
pub const LIVEUPDATE_IOCTL_TYPE: u32 = 0xBA;
/// `LIVEUPDATE_CMD_BASE`.
pub const LIVEUPDATE_CMD_BASE: u32 = 0x00;
/// `LIVEUPDATE_CMD_SESSION_BASE`.
pub const LIVEUPDATE_CMD_SESSION_BASE: u32 = 0x40;

/// `_IO(type, nr)`: no direction, no size.
pub const fn io(ty: u32, nr: u32) -> u32 {
    (ty << 8) | nr
}

/// `_IOC_NR(cmd)`.
pub const fn ioc_nr(cmd: u32) -> u32 {
    cmd & 0xff
}

/// `LIVEUPDATE_CMD_CREATE_SESSION`.
pub const LIVEUPDATE_CMD_CREATE_SESSION: u32 = LIVEUPDATE_CMD_BASE;
/// `LIVEUPDATE_CMD_RETRIEVE_SESSION`.
pub const LIVEUPDATE_CMD_RETRIEVE_SESSION: u32 = 0x01;
/// `LIVEUPDATE_CMD_SESSION_PRESERVE_FD`.
pub const LIVEUPDATE_CMD_SESSION_PRESERVE_FD: u32 = LIVEUPDATE_CMD_SESSION_BASE;
/// `LIVEUPDATE_CMD_SESSION_RETRIEVE_FD`.
pub const LIVEUPDATE_CMD_SESSION_RETRIEVE_FD: u32 = 0x41;
/// `LIVEUPDATE_CMD_SESSION_FINISH`.
pub const LIVEUPDATE_CMD_SESSION_FINISH: u32 = 0x42;
/// `LIVEUPDATE_CMD_SESSION_GET_NAME`.
pub const LIVEUPDATE_CMD_SESSION_GET_NAME: u32 = 0x43;

/// `LIVEUPDATE_IOCTL_CREATE_SESSION` (0xBA00).
pub const LIVEUPDATE_IOCTL_CREATE_SESSION: u32 =
    io(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_CREATE_SESSION);
/// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION` (0xBA01).
pub const LIVEUPDATE_IOCTL_RETRIEVE_SESSION: u32 =
    io(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_RETRIEVE_SESSION);
/// `LIVEUPDATE_SESSION_PRESERVE_FD` (0xBA40).
pub const LIVEUPDATE_SESSION_PRESERVE_FD: u32 =
    io(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_PRESERVE_FD);
/// `LIVEUPDATE_SESSION_RETRIEVE_FD` (0xBA41).
pub const LIVEUPDATE_SESSION_RETRIEVE_FD: u32 =
    io(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_RETRIEVE_FD);
/// `LIVEUPDATE_SESSION_FINISH` (0xBA42).
pub const LIVEUPDATE_SESSION_FINISH: u32 = io(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_FINISH);
/// `LIVEUPDATE_SESSION_GET_NAME` (0xBA43).
pub const LIVEUPDATE_SESSION_GET_NAME: u32 =
    io(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_GET_NAME);

const _: () = assert!(LIVEUPDATE_IOCTL_CREATE_SESSION == 0xBA00);
const _: () = assert!(LIVEUPDATE_IOCTL_RETRIEVE_SESSION == 0xBA01);
const _: () = assert!(LIVEUPDATE_SESSION_PRESERVE_FD == 0xBA40);
const _: () = assert!(LIVEUPDATE_SESSION_RETRIEVE_FD == 0xBA41);
const _: () = assert!(LIVEUPDATE_SESSION_FINISH == 0xBA42);
const _: () = assert!(LIVEUPDATE_SESSION_GET_NAME == 0xBA43);

/// `struct liveupdate_ioctl_create_session`.
#[derive(
    Clone,
    Copy,
    Debug,
    zerocopy_derive::FromBytes,
    zerocopy_derive::IntoBytes,
    zerocopy_derive::KnownLayout,
    zerocopy_derive::Immutable,
)]
#[repr(C)]
pub struct CreateSession {
    /// Size of the struct as the caller knows it.
    pub size: u32,
    /// Out: the new session fd.
    pub fd: i32,
    /// In: the name, NUL-terminated.
    pub name: [u8; SESSION_NAME_LEN],
}

/// `struct liveupdate_ioctl_retrieve_session` (same layout as create).
pub type RetrieveSession = CreateSession;

/// `struct liveupdate_session_preserve_fd`.
#[derive(
    Clone,
    Copy,
    Debug,
    zerocopy_derive::FromBytes,
    zerocopy_derive::IntoBytes,
    zerocopy_derive::KnownLayout,
    zerocopy_derive::Immutable,
)]
#[repr(C)]
pub struct PreserveFd {
    /// Size of the struct.
    pub size: u32,
    /// In: the fd to preserve.
    pub fd: i32,
    /// In: the token.
    pub token: u64,
}

/// `struct liveupdate_session_retrieve_fd` (same layout; `fd` is an output).
pub type RetrieveFd = PreserveFd;

/// `struct liveupdate_session_finish`.
#[derive(
    Clone,
    Copy,
    Debug,
    zerocopy_derive::FromBytes,
    zerocopy_derive::IntoBytes,
    zerocopy_derive::KnownLayout,
    zerocopy_derive::Immutable,
)]
#[repr(C)]
pub struct Finish {
    /// Size of the struct.
    pub size: u32,
    /// Must be zero.
    pub reserved: u32,
}

/// `struct liveupdate_session_get_name`.
#[derive(
    Clone,
    Copy,
    Debug,
    zerocopy_derive::FromBytes,
    zerocopy_derive::IntoBytes,
    zerocopy_derive::KnownLayout,
    zerocopy_derive::Immutable,
)]
#[repr(C)]
pub struct GetName {
    /// Size of the struct.
    pub size: u32,
    /// Must be zero.
    pub reserved: u32,
    /// Out: the name, NUL-terminated.
    pub name: [u8; SESSION_NAME_LEN],
}

/// What GET_NAME takes in: the header of `struct liveupdate_session_get_name` (its name is
/// output only), which is `struct liveupdate_session_finish`'s layout. The decoder still copies
/// the whole struct in, as upstream does, so faults and trailing bytes are judged the same
/// way; only the header is kept.
pub type GetNameIn = Finish;

const _: () = assert!(size_of::<CreateSession>() == 72);
const _: () = assert!(core::mem::align_of::<CreateSession>() == 4);
const _: () = assert!(offset_of!(CreateSession, size) == 0);
const _: () = assert!(offset_of!(CreateSession, fd) == 4);
const _: () = assert!(offset_of!(CreateSession, name) == 8);
const _: () = assert!(size_of::<PreserveFd>() == 16);
const _: () = assert!(core::mem::align_of::<PreserveFd>() == 8);
const _: () = assert!(offset_of!(PreserveFd, size) == 0);
const _: () = assert!(offset_of!(PreserveFd, fd) == 4);
const _: () = assert!(offset_of!(PreserveFd, token) == 8);
const _: () = assert!(size_of::<Finish>() == 8);
const _: () = assert!(offset_of!(Finish, reserved) == 4);
const _: () = assert!(size_of::<GetName>() == 72);
const _: () = assert!(offset_of!(GetName, reserved) == 4);
const _: () = assert!(offset_of!(GetName, name) == 8);
const _: () = assert!(size_of::<GetNameIn>() == offset_of!(GetName, name));

/// Access to the user's ioctl argument.
pub trait UserArg {
    /// Copies `buf.len()` bytes from `offset`; `Err(Error::Fault)` if any byte is unreadable.
    fn read(&mut self, offset: usize, buf: &mut [u8]) -> Result;
    /// Copies `data` to `offset`; `Err(Error::Fault)` if any byte is unwritable.
    fn write(&mut self, offset: usize, data: &[u8]) -> Result;
    /// `copy_struct_from_user`: fills `dst` (zeroed by the caller) with the first
    /// `min(dst.len(), usize)` bytes of the argument and insists that the caller's bytes past
    /// `dst.len()` (up to `usize`) are zero: `Error::TrailingNonZero` (`E2BIG`) if not,
    /// `Error::Fault` if a byte it needs is unreadable. The kernel backend calls the kernel's
    /// own `copy_struct_from_user`.
    fn copy_struct(&mut self, dst: &mut [u8], usize: usize) -> Result {
        let ksize = dst.len();
        let n = core::cmp::min(ksize, usize);
        self.read(0, &mut dst[..n])?;
        if usize > ksize && !self.is_zeroed(ksize, usize)? {
            return Err(Error::TrailingNonZero);
        }
        Ok(())
    }
    /// Reads the native-endian `u32` at offset 0 (the `size` word), as `get_user` does.
    /// Backends with a cheaper single-word path than [`UserArg::read`] override it.
    fn read_u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read(0, &mut b)?;
        Ok(u32::from_ne_bytes(b))
    }
    /// True if `[from, to)` is all zero (`check_zeroed_user`). Reads in small chunks so that a
    /// huge `size` does not need a huge buffer.
    ///
    /// Like `check_zeroed_user`, which scans word by word, a non-zero byte *before* the first
    /// unreadable one gives `Ok(false)` (`E2BIG`), not a fault: when a chunk faults, it is
    /// re-read byte by byte up to the fault.
    fn is_zeroed(&mut self, from: usize, to: usize) -> Result<bool> {
        let mut chunk = [0u8; 64];
        let mut at = from;
        while at < to {
            let n = core::cmp::min(chunk.len(), to - at);
            if self.read(at, &mut chunk[..n]).is_err() {
                for i in 0..n {
                    let mut b = [0u8; 1];
                    self.read(at + i, &mut b)?;
                    if b[0] != 0 {
                        return Ok(false);
                    }
                }
            } else if chunk[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            at += n;
        }
        Ok(true)
    }
}

/// The direction of a session, which decides which session ioctls are valid on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Created in this kernel, for the next one.
    Outgoing,
    /// Handed over by the previous kernel (retrieved).
    Incoming,
}

/// A decoded request on `/dev/liveupdate`.
#[derive(Clone, Copy, Debug)]
pub enum DeviceRequest {
    /// CREATE_SESSION.
    Create(CreateSession),
    /// RETRIEVE_SESSION.
    Retrieve(RetrieveSession),
}

/// A decoded request on a session fd.
#[derive(Clone, Copy, Debug)]
pub enum SessionRequest {
    /// PRESERVE_FD.
    PreserveFd(PreserveFd),
    /// RETRIEVE_FD.
    RetrieveFd(RetrieveFd),
    /// FINISH.
    Finish(Finish),
    /// GET_NAME.
    GetName(GetNameIn),
}

// The helpers below are `#[inline(always)]`: decoded requests are moved around by value, and
// only inlining lets the compiler (at the kernel's -Os) build them in place instead of
// copying each struct two or three times per ioctl (measured: docs/performance.md).

/// Reads the `size` word (step 2 of spec §2.4).
#[inline(always)]
fn read_size(arg: &mut impl UserArg) -> Result<u32> {
    arg.read_u32()
}

/// `copy_struct_from_user` after the minimum-size check: copies `min(size, sizeof T)` bytes and
/// insists that anything the caller sent past `sizeof T` is zero. The `size` field of the copy
/// is the caller's value (re-read as part of the struct, as upstream does).
#[inline(always)]
fn copy_struct<T: FromBytes + IntoBytes>(arg: &mut impl UserArg, size: u32) -> Result<T> {
    let mut value = T::new_zeroed();
    arg.copy_struct(value.as_mut_bytes(), size as usize)?;
    Ok(value)
}

/// Decodes an ioctl sent to `/dev/liveupdate` (spec §2.4 steps 1-6).
#[inline]
pub fn decode_device(cmd: u32, arg: &mut impl UserArg) -> Result<DeviceRequest> {
    let nr = ioc_nr(cmd);
    if nr.wrapping_sub(LIVEUPDATE_CMD_BASE) >= 2 {
        return Err(Error::BadCommand);
    }
    let size = read_size(arg)?;
    let (expected, min) = match nr {
        LIVEUPDATE_CMD_CREATE_SESSION => {
            (LIVEUPDATE_IOCTL_CREATE_SESSION, size_of::<CreateSession>())
        }
        _ => (
            LIVEUPDATE_IOCTL_RETRIEVE_SESSION,
            size_of::<RetrieveSession>(),
        ),
    };
    if cmd != expected {
        return Err(Error::UnknownCommand);
    }
    if (size as usize) < min {
        return Err(Error::StructTooSmall);
    }
    let s: CreateSession = copy_struct(arg, size)?;
    Ok(if nr == LIVEUPDATE_CMD_CREATE_SESSION {
        DeviceRequest::Create(s)
    } else {
        DeviceRequest::Retrieve(s)
    })
}

/// Decodes an ioctl sent to a session fd of direction `dir` (spec §2.4 steps 1-6).
#[inline]
pub fn decode_session(cmd: u32, dir: Direction, arg: &mut impl UserArg) -> Result<SessionRequest> {
    let nr = ioc_nr(cmd);
    if nr < LIVEUPDATE_CMD_SESSION_BASE || nr - LIVEUPDATE_CMD_SESSION_BASE >= 4 {
        return Err(Error::BadCommand);
    }
    let size = read_size(arg)?;
    let (expected, min, valid_for) = match nr {
        LIVEUPDATE_CMD_SESSION_PRESERVE_FD => (
            LIVEUPDATE_SESSION_PRESERVE_FD,
            size_of::<PreserveFd>(),
            Some(Direction::Outgoing),
        ),
        LIVEUPDATE_CMD_SESSION_RETRIEVE_FD => (
            LIVEUPDATE_SESSION_RETRIEVE_FD,
            size_of::<RetrieveFd>(),
            Some(Direction::Incoming),
        ),
        LIVEUPDATE_CMD_SESSION_FINISH => (
            LIVEUPDATE_SESSION_FINISH,
            size_of::<Finish>(),
            Some(Direction::Incoming),
        ),
        _ => (LIVEUPDATE_SESSION_GET_NAME, size_of::<GetName>(), None),
    };
    if cmd != expected {
        return Err(Error::UnknownCommand);
    }
    if valid_for.is_some_and(|d| d != dir) {
        return Err(Error::WrongDirection);
    }
    if (size as usize) < min {
        return Err(Error::StructTooSmall);
    }
    Ok(match nr {
        LIVEUPDATE_CMD_SESSION_PRESERVE_FD => SessionRequest::PreserveFd(copy_struct(arg, size)?),
        LIVEUPDATE_CMD_SESSION_RETRIEVE_FD => SessionRequest::RetrieveFd(copy_struct(arg, size)?),
        LIVEUPDATE_CMD_SESSION_FINISH => SessionRequest::Finish(copy_struct(arg, size)?),
        _ => {
            let full: GetName = copy_struct(arg, size)?;
            SessionRequest::GetName(GetNameIn {
                size: full.size,
                reserved: full.reserved,
            })
        }
    })
}

/// `luo_ucmd_respond`: copies `min(size, sizeof T)` bytes of the kernel copy back to the user.
#[inline(always)]
pub fn respond<T: IntoBytes + Immutable>(arg: &mut impl UserArg, size: u32, value: &T) -> Result {
    let bytes = value.as_bytes();
    let n = core::cmp::min(bytes.len(), size as usize);
    arg.write(0, &bytes[..n])
}

/// A [`UserArg`] over a byte slice: bytes past the end fault, like an unmapped page.
pub struct SliceArg<'a>(pub &'a mut [u8]);

impl UserArg for SliceArg<'_> {
    fn read(&mut self, offset: usize, buf: &mut [u8]) -> Result {
        let end = offset.checked_add(buf.len()).ok_or(Error::Fault)?;
        let src = self.0.get(offset..end).ok_or(Error::Fault)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&mut self, offset: usize, data: &[u8]) -> Result {
        let end = offset.checked_add(data.len()).ok_or(Error::Fault)?;
        let dst = self.0.get_mut(offset..end).ok_or(Error::Fault)?;
        dst.copy_from_slice(data);
        Ok(())
    }
}
