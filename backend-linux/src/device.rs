// SPDX-License-Identifier: GPL-2.0

//! `/dev/liveupdate` and the session files: the uAPI of spec §2 on top of luo-core's
//! dispatcher ([`Luo::device_ioctl`], [`Luo::session_ioctl`]).
//!
//! The device is a misc device with `file_operations` of its own (as upstream's `luo_fops`;
//! see [`DEVICE_FOPS`] for why not `kernel::miscdevice`'s). Session fds are anon-inode files
//! named `"[luo_session] <name>"`, opened `O_RDWR` and installed `O_CLOEXEC`; the kernel
//! crate of 7.3 has no anon-inode abstraction, so their `file_operations` are built here too,
//! on the model of `MiscdeviceVTable`: a reference to the session is the file's `private_data`,
//! borrowed by `ioctl` and taken back by `release`.
//!
//! After `liveupdate_reboot()` has serialized the state, luo-core fails every operation with
//! [`LuoError::Serialized`]; like the C core, whose serialize rwsem stays write-held until
//! the kexec, the caller then sleeps forever instead of getting an errno.

use core::ptr;

use kernel::{
    bindings,
    fs::{
        file::{
            flags,
            FileDescriptorReservation,
            LocalFile, //
        },
        File,
    },
    prelude::*,
    sync::aref::ARef,
};

use luo_core::{
    dispatch::FdTable,
    errno::EINVAL,
    Error as LuoError,
    FileSet,
    Session,
    SessionHead,
    SessionRef,
};

use crate::{
    luo,
    platform::{
        errno_of,
        UserPtrArg,
        KernelShared,
        KernelPlatform, //
    },
};

/// Sleeps forever: the state is serialized for the next kernel (see the module docs).
fn block_forever() -> ! {
    // SAFETY: No preconditions; the task sleeps until the machine kexecs.
    unsafe { bindings::luo_glue_block_forever() }
}

/// The negative errno a file operation returns for a luo-core error; `Serialized` blocks
/// instead.
#[inline]
fn errno_ret(e: LuoError) -> c_long {
    if e == LuoError::Serialized {
        block_forever();
    }
    -(e.errno().get() as c_long)
}

/// A session's reference, as a session file's `private_data` holds it.
type SessionShared = KernelShared<SessionHead, FileSet<KernelPlatform>>;

/// The calling task's fd table.
struct Fds;

impl FdTable<KernelPlatform> for Fds {
    type Slot = FileDescriptorReservation;
    type SessionFile = ARef<File>;

    fn reserve(&mut self) -> luo_core::Result<FileDescriptorReservation> {
        FileDescriptorReservation::get_unused_fd_flags(flags::O_CLOEXEC)
            .map_err(|e| LuoError::Platform(errno_of(e)))
    }

    fn slot_fd(&self, slot: &FileDescriptorReservation) -> i32 {
        // fd numbers are below `INT_MAX` (`sysctl_nr_open`), so this never wraps.
        slot.reserved_fd() as i32
    }

    fn session_file(&mut self, session: &SessionRef<KernelPlatform>) -> luo_core::Result<ARef<File>> {
        new_session_file(session)
    }

    fn discard_session_file(&mut self, file: ARef<File>) {
        let raw = file.as_ptr();
        // SAFETY: The file was made by `new_session_file` and never installed in an fd table,
        // so this task holds the only reference and nothing else reads `private_data`.
        let private = unsafe { core::mem::take(&mut (*raw).private_data) };
        if !private.is_null() {
            // SAFETY: `private` came from `into_raw` in `new_session_file` and was just
            // detached from the file, so it is taken back exactly once.
            drop(unsafe { SessionShared::from_raw(private) });
        }
        // The last reference goes: `session_release` sees no session and does nothing, so
        // luo-core undoes the session operation itself.
        drop(file);
    }

    fn install_session(&mut self, slot: FileDescriptorReservation, file: ARef<File>) {
        slot.fd_install(file);
    }

    fn install_file(&mut self, slot: FileDescriptorReservation, file: ARef<File>) {
        slot.fd_install(file);
    }

    fn fget(&mut self, fd: i32) -> luo_core::Result<ARef<File>> {
        let fd = u32::try_from(fd).map_err(|_| LuoError::BadFd)?;
        let file = LocalFile::fget(fd).map_err(|_| LuoError::BadFd)?;
        // SAFETY: This runs inside an ioctl, which never holds an `fdget_pos` region on this
        // task, so the file can be treated as shared (as Binder does in its ioctl path).
        Ok(unsafe { LocalFile::assume_no_fdget_pos(file) })
    }
}

/// `"[luo_session] "`: the prefix of every session file's name (upstream's naming).
const SESSION_PREFIX: &[u8] = b"[luo_session] ";

/// Creates the anon-inode file of a session (`anon_inode_getfile`), owning a reference to it.
fn new_session_file(session: &SessionRef<KernelPlatform>) -> luo_core::Result<ARef<File>> {
    // 14 bytes of prefix, at most 63 of name, a NUL: upstream's 128-byte buffer always fits.
    let mut name = [0u8; 128];
    let sname = session.name();
    let sname = sname.as_bytes();
    let len = SESSION_PREFIX.len() + sname.len();
    if len >= name.len() {
        return Err(LuoError::Platform(EINVAL));
    }
    name[..SESSION_PREFIX.len()].copy_from_slice(SESSION_PREFIX);
    name[SESSION_PREFIX.len()..len].copy_from_slice(sname);
    let private = session.clone().into_shared().into_raw();
    // SAFETY: `name` is NUL-terminated and only read during the call; the fops table is
    // `'static`; `private` stays valid until `session_release` or `discard_session_file` takes
    // it back.
    let file = unsafe {
        bindings::anon_inode_getfile(
            name.as_ptr(),
            session_fops(),
            private,
            bindings::O_RDWR as c_int,
        )
    };
    match kernel::error::from_err_ptr(file) {
        Ok(file) => {
            // SAFETY: `anon_inode_getfile` returned a new file with one reference, which we
            // take over; `File` is a transparent wrapper of `struct file`.
            Ok(unsafe { ARef::from_raw(ptr::NonNull::new_unchecked(file.cast::<File>())) })
        }
        Err(e) => {
            // SAFETY: The file was not created, so `private` was not consumed.
            drop(unsafe { SessionShared::from_raw(private) });
            Err(LuoError::Platform(errno_of(e)))
        }
    }
}

/// The `file_operations` of session files (upstream `luo_session_fops`: release and ioctl).
///
/// `compat_ioctl` is `compat_ptr_ioctl`, as the misc device gets from `kernel::miscdevice`:
/// the structures have one layout for 32- and 64-bit callers, so 32-bit processes work
/// (upstream has none and returns `ENOTTY` to them: spec B12).
const SESSION_FOPS: bindings::file_operations = bindings::file_operations {
    release: Some(session_release),
    unlocked_ioctl: Some(session_ioctl),
    compat_ioctl: bindings::compat_ptr_ioctl,
    ..pin_init::zeroed()
};

fn session_fops() -> &'static bindings::file_operations {
    &SESSION_FOPS
}

/// `release` of a session file: the last reference is gone.
///
/// # Safety
///
/// `file` is a session file being released.
unsafe extern "C" fn session_release(_inode: *mut bindings::inode, file: *mut bindings::file) -> c_int {
    // SAFETY: The release call owns the file's private data.
    let private = unsafe { (*file).private_data };
    if private.is_null() {
        // Discarded before it was installed (`discard_session_file`).
        return 0;
    }
    // SAFETY: `private` came from `into_raw` in `new_session_file`; release runs once.
    let session = Session::from_shared(unsafe { SessionShared::from_raw(private) });
    if let Some(luo) = luo() {
        if let Err(LuoError::Serialized) = luo.begin().and_then(|live| live.release_session(&session)) {
            block_forever();
        }
    }
    0
}

/// `unlocked_ioctl` of a session file.
///
/// # Safety
///
/// `file` is an open session file.
unsafe extern "C" fn session_ioctl(file: *mut bindings::file, cmd: c_uint, arg: c_ulong) -> c_long {
    // SAFETY: `private_data` is set by `new_session_file` and only taken back by release,
    // which cannot run while this ioctl holds the file.
    let private = unsafe { (*file).private_data };
    if private.is_null() {
        return -(bindings::EBADF as c_long);
    }
    // The file's reference is borrowed for the call, without touching the count:
    // `ManuallyDrop` never gives it back.
    // SAFETY: As above: `private` is the session's foreign pointer, and the file (so its
    // reference) outlives the call.
    let session = core::mem::ManuallyDrop::new(Session::from_shared(unsafe {
        SessionShared::from_raw(private)
    }));
    let Some(luo) = luo() else {
        return -(bindings::ENOTTY as c_long);
    };
    match luo.session_ioctl(&session, cmd, &mut UserPtrArg(arg), &mut Fds) {
        Ok(()) => 0,
        Err(e) => errno_ret(e),
    }
}

/// The `file_operations` of `/dev/liveupdate` (upstream `luo_fops`: open, release, ioctl).
///
/// Built here rather than by `kernel::miscdevice`'s vtable, as the session files' are: the
/// ioctl is then one load of the orchestrator and the dispatcher, and an error goes back as
/// its errno, where the vtable's trampoline and the round trip through `kernel::error::Error`
/// cost a rejected ioctl about 37 instructions more than the C core's. `compat_ioctl` is
/// `compat_ptr_ioctl`, as the vtable would set it.
const DEVICE_FOPS: bindings::file_operations = bindings::file_operations {
    open: Some(device_open),
    release: Some(device_release),
    unlocked_ioctl: Some(device_ioctl),
    compat_ioctl: bindings::compat_ptr_ioctl,
    ..pin_init::zeroed()
};

/// `open` of `/dev/liveupdate`: one opener at a time; the first open builds the incoming
/// sessions.
///
/// # Safety
///
/// Called by the VFS for a file being opened (nothing is read from either pointer).
unsafe extern "C" fn device_open(_inode: *mut bindings::inode, _file: *mut bindings::file) -> c_int {
    let Some(luo) = luo() else {
        return -(bindings::ENODEV as c_int);
    };
    match luo.open() {
        Ok(()) => 0,
        // Errnos are small positive numbers: the narrowing is exact.
        Err(e) => errno_ret(e) as c_int,
    }
}

/// `release` of `/dev/liveupdate`.
///
/// # Safety
///
/// Called by the VFS for a file being released (nothing is read from either pointer).
unsafe extern "C" fn device_release(_inode: *mut bindings::inode, _file: *mut bindings::file) -> c_int {
    if let Some(luo) = luo() {
        luo.close();
    }
    0
}

/// `unlocked_ioctl` of `/dev/liveupdate`.
///
/// # Safety
///
/// Called by the VFS for an open file of the device (nothing is read from it: the device has
/// no per-open state).
unsafe extern "C" fn device_ioctl(_file: *mut bindings::file, cmd: c_uint, arg: c_ulong) -> c_long {
    let Some(luo) = luo() else {
        return -(bindings::ENODEV as c_long);
    };
    match luo.device_ioctl(cmd, &mut UserPtrArg(arg), &mut Fds) {
        Ok(()) => 0,
        Err(e) => errno_ret(e),
    }
}

/// Registers `/dev/liveupdate`. Its `struct miscdevice` is never freed and the device never
/// unregistered: it lives as long as the kernel, as the C core's static `luo_dev` does.
pub(crate) fn register_device() -> Result {
    let mut misc: bindings::miscdevice = pin_init::zeroed();
    misc.minor = bindings::MISC_DYNAMIC_MINOR as c_int;
    misc.name = c"liveupdate".as_char_ptr();
    misc.fops = &DEVICE_FOPS;
    let misc = KBox::into_raw(KBox::new(misc, GFP_KERNEL)?);
    // SAFETY: `misc` is a valid, initialized `struct miscdevice` whose name and fops are
    // `'static`; it is never moved or freed once registered.
    let r = unsafe { bindings::misc_register(misc) };
    if r != 0 {
        // SAFETY: Registration failed, so nothing refers to `misc`; it came from
        // `KBox::into_raw` above and is freed once.
        drop(unsafe { KBox::from_raw(misc) });
        return Err(Error::from_errno(r));
    }
    Ok(())
}
