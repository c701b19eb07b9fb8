//! Shared helpers for the integration tests: memfds with data, `RLIMIT_NOFILE`, in-process
//! reboots, raw uAPI request bytes, a forked child for process-wide limits, a reader for
//! handover bytes, and an fd table plus a user argument that can fault on the reply.

use std::cell::Cell;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;

use backend_user::{LiveUpdate, Memory, UserPlatform};
use luo_core::dispatch::FdTable;
use luo_core::uapi::UserArg;
use luo_core::{Errno, Error, Level, SessionRef};
use luo_handlers::MemfdHandler;

/// The errno of a failed result; panics (with the value) if it succeeded.
pub fn errno<T>(r: Result<T, Error>) -> Errno {
    match r {
        Ok(_) => panic!("expected an error, got success"),
        Err(e) => e.errno(),
    }
}

/// A memfd (close-on-exec, like `memfd_create(name, MFD_CLOEXEC)`) holding `data`, with the
/// file position at the end of the data.
pub fn memfd_with(data: &[u8]) -> std::fs::File {
    let fd = backend_user::sys::memfd_create(c"luo_test", libc::MFD_CLOEXEC).expect("memfd");
    let mut f = std::fs::File::from(fd);
    f.write_all(data).expect("write memfd");
    f
}

/// Upstream's `create_and_preserve_memfd` file: `memfd_create("test_mfd", 0)`, `ftruncate` to
/// one page, the string written at offset 0 (through the mapping upstream, so the position stays
/// 0), NUL padding after it.
pub fn page_memfd(data: &str) -> std::fs::File {
    let fd = backend_user::sys::memfd_create(c"test_mfd", 0).expect("memfd");
    let mut f = std::fs::File::from(fd);
    f.set_len(4096).expect("ftruncate");
    f.write_all(data.as_bytes()).expect("write");
    f.seek(SeekFrom::Start(0)).expect("seek");
    f
}

/// An empty memfd.
pub fn empty_memfd() -> std::fs::File {
    memfd_with(b"")
}

/// Reads the whole file from offset 0 (leaves the position at the end).
pub fn read_all(f: &mut std::fs::File) -> Vec<u8> {
    f.seek(SeekFrom::Start(0)).expect("seek");
    let mut v = Vec::new();
    f.read_to_end(&mut v).expect("read");
    v
}

/// Upstream's `restore_and_verify_memfd` check: the bytes up to the first NUL.
pub fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Raises the soft `RLIMIT_NOFILE` to at least `n` (up to the hard limit). Returns false if
/// the hard limit is below `n` (upstream SKIPs then).
pub fn raise_nofile(n: u64) -> bool {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return false;
    }
    if rl.rlim_cur >= n {
        return true;
    }
    if rl.rlim_max < n {
        return false;
    }
    rl.rlim_cur = n;
    // SAFETY: `rl` is a valid rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) == 0 }
}

/// A cold boot with the memfd handler registered (as `memfd_luo_init` does at late_initcall).
pub fn cold_memfd() -> LiveUpdate {
    let lu = LiveUpdate::new().expect("cold boot");
    lu.register_handler(MemfdHandler::new(lu.memory().clone()))
        .expect("register memfd");
    lu
}

/// Boots the next image from a handover memfd, with the memfd handler registered.
pub fn boot_memfd(handover: &OwnedFd) -> LiveUpdate {
    let lu = LiveUpdate::boot(handover).expect("boot");
    lu.register_handler(MemfdHandler::new(lu.memory().clone()))
        .expect("register memfd");
    lu
}

/// The kexec: freeze and serialize, then abandon this image like `exec` does (no destructors
/// run, so the files the memfd handler left open stay open for the next image). Session fds the
/// caller still holds may be dropped afterwards: every LUO call then gets `ESHUTDOWN`.
pub fn kexec(lu: LiveUpdate) -> OwnedFd {
    lu.reboot_and_abandon().expect("reboot")
}

/// True if a log line of this image contains `needle`.
pub fn logged(mem: &Memory, needle: &str) -> bool {
    mem.log_lines().iter().any(|(_, l)| l.contains(needle))
}

/// Log lines at `level` containing `needle`.
pub fn count_logged(mem: &Memory, level: Level, needle: &str) -> usize {
    mem.log_lines()
        .iter()
        .filter(|(l, s)| *l == level && s.contains(needle))
        .count()
}

/// The identity the userspace platform gives an open file (for `TestHandler::accept_only`).
pub fn identity(fd: BorrowedFd<'_>) -> u64 {
    let owned = fd.try_clone_to_owned().expect("dup");
    <UserPlatform as luo_core::Platform>::file_identity(&owned)
}

/// Runs `f` in a forked child (for process-wide state like `RLIMIT_NOFILE`) and returns its exit
/// status: 0 when `f` returned true, 1 when false, 2 when it panicked. Keep `f` free of locks
/// other threads may hold (no printing); objects built before the fork are fine to use.
pub fn in_child(f: impl FnOnce() -> bool) -> i32 {
    // SAFETY: fork has no memory-safety preconditions; the child only runs `f` (which the caller
    // keeps away from locks held by other threads) and then `_exit`s without unwinding.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let code = match r {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(_) => 2,
        };
        // SAFETY: terminating the child without running the parent's atexit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: `status` is writable; `pid` is our child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid");
    assert!(libc::WIFEXITED(status), "child did not exit normally");
    libc::WEXITSTATUS(status)
}

/// In a child: sets `RLIMIT_NOFILE` so that no new fd can be opened (every fd below the limit
/// is in use). Returns false if that could not be arranged.
pub fn fill_fd_table() -> bool {
    // The lowest free fd is the one open() returns; every fd below it is in use.
    let Ok(probe) = std::fs::File::open("/dev/null") else {
        return false;
    };
    let n = probe.as_raw_fd() as u64;
    std::mem::forget(probe);
    let rl = libc::rlimit {
        rlim_cur: n + 1,
        rlim_max: n + 1,
    };
    // SAFETY: `rl` is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } != 0 {
        return false;
    }
    std::fs::File::open("/dev/null").is_err()
}

/// In a child: sets `RLIMIT_NOFILE` so that exactly one more fd can be opened. Returns false if
/// that could not be arranged.
pub fn leave_one_fd() -> bool {
    let Ok(low) = std::fs::File::open("/dev/null") else {
        return false;
    };
    let Ok(next) = std::fs::File::open("/dev/null") else {
        return false;
    };
    // Every fd below `next` is in use once `low` stays open.
    let m = next.as_raw_fd() as u64;
    drop(next);
    std::mem::forget(low);
    set_nofile(m + 1)
}

/// Sets both `RLIMIT_NOFILE` limits (a child may lower and raise its soft limit up to the hard
/// one, so only the soft limit is changed).
pub fn set_nofile(soft: u64) -> bool {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 || soft > rl.rlim_max {
        return false;
    }
    rl.rlim_cur = soft;
    // SAFETY: `rl` is a valid rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) == 0 }
}

// -------------------------------------------------------------------------------------------
// Raw uAPI requests
// -------------------------------------------------------------------------------------------

/// ioctl numbers.
pub use luo_core::uapi::{
    LIVEUPDATE_IOCTL_CREATE_SESSION as CREATE, LIVEUPDATE_IOCTL_RETRIEVE_SESSION as RETRIEVE,
    LIVEUPDATE_SESSION_FINISH as FINISH, LIVEUPDATE_SESSION_GET_NAME as GET_NAME,
    LIVEUPDATE_SESSION_PRESERVE_FD as PRESERVE, LIVEUPDATE_SESSION_RETRIEVE_FD as RETRIEVE_FD,
};

/// `_IOC(dir, type, nr, size)` as on x86 and arm64.
pub const fn ioc(dir: u32, ty: u32, nr: u32, size: u32) -> u32 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}

/// A 64-byte name field holding `name` (truncated to 64 bytes, NUL-padded).
pub fn name_field(name: &[u8]) -> [u8; 64] {
    let mut f = [0u8; 64];
    let n = name.len().min(64);
    f[..n].copy_from_slice(&name[..n]);
    f
}

/// `struct liveupdate_ioctl_create_session` (also retrieve) bytes with `size` = `size`, padded
/// with zeros to `len` bytes (at least 72).
pub fn session_req(name: &[u8], size: u32, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len.max(72)];
    v[0..4].copy_from_slice(&size.to_ne_bytes());
    v[4..8].copy_from_slice(&(-1i32).to_ne_bytes());
    v[8..72].copy_from_slice(&name_field(name));
    v.truncate(len);
    v
}

/// `struct liveupdate_session_preserve_fd` (also retrieve_fd) bytes.
pub fn fd_req(fd: i32, token: u64, size: u32, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len.max(16)];
    v[0..4].copy_from_slice(&size.to_ne_bytes());
    v[4..8].copy_from_slice(&fd.to_ne_bytes());
    v[8..16].copy_from_slice(&token.to_ne_bytes());
    v.truncate(len);
    v
}

/// `struct liveupdate_session_finish` bytes.
pub fn finish_req(reserved: u32, size: u32, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len.max(8)];
    v[0..4].copy_from_slice(&size.to_ne_bytes());
    v[4..8].copy_from_slice(&reserved.to_ne_bytes());
    v.truncate(len);
    v
}

/// `struct liveupdate_session_get_name` bytes (name field filled with `fill`).
pub fn get_name_req(reserved: u32, size: u32, len: usize, fill: u8) -> Vec<u8> {
    let mut v = vec![0u8; len.max(72)];
    v[0..4].copy_from_slice(&size.to_ne_bytes());
    v[4..8].copy_from_slice(&reserved.to_ne_bytes());
    v[8..72].fill(fill);
    v.truncate(len);
    v
}

/// The `fd` field (offset 4) of a reply.
pub fn reply_fd(bytes: &[u8]) -> i32 {
    i32::from_ne_bytes(bytes[4..8].try_into().expect("4 bytes"))
}

/// The `size` field (offset 0).
pub fn reply_size(bytes: &[u8]) -> u32 {
    u32::from_ne_bytes(bytes[0..4].try_into().expect("4 bytes"))
}

// -------------------------------------------------------------------------------------------
// Handover bytes
// -------------------------------------------------------------------------------------------

/// Page size of the userspace backend.
pub const PAGE: usize = 4096;

/// A native-endian u64 at `off`.
pub fn u64_at(b: &[u8], off: u64) -> u64 {
    let o = off as usize;
    u64::from_ne_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Writes a native-endian u64 at `off`.
pub fn put_u64(b: &mut [u8], off: u64, v: u64) {
    let o = off as usize;
    b[o..o + 8].copy_from_slice(&v.to_ne_bytes());
}

/// The root (`luo_ser`) address recorded in the backend header page.
pub fn root_of(b: &[u8]) -> u64 {
    u64_at(b, 16)
}

/// `luo_ser.sessions_pa`.
pub fn sessions_pa(b: &[u8]) -> u64 {
    u64_at(b, root_of(b) + 16)
}

/// `luo_ser.flbs_pa`.
pub fn flbs_pa(b: &[u8]) -> u64 {
    u64_at(b, root_of(b) + 24)
}

/// `luo_ser.liveupdate_num`.
pub fn liveupdate_num(b: &[u8]) -> u64 {
    u64_at(b, root_of(b) + 8)
}

/// Block addresses of the chain starting at `head`, in order (bounded, for corrupted input).
pub fn chain(b: &[u8], head: u64) -> Vec<u64> {
    let mut v = Vec::new();
    let mut at = head;
    while at != 0 && v.len() < 20_000 {
        v.push(at);
        at = u64_at(b, at);
    }
    v
}

/// Address of entry `i` of the block at `block` for entries of `size` bytes.
pub fn entry_at(block: u64, i: u64, size: u64) -> u64 {
    block + 16 + i * size
}

/// A decoded session entry: name, files head, file count, entry address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionEntry {
    /// Name bytes up to the NUL.
    pub name: String,
    /// `file_set_ser.files`.
    pub files: u64,
    /// `file_set_ser.count`.
    pub count: u64,
    /// Where the entry lives.
    pub at: u64,
}

/// Every session entry in chain order.
pub fn sessions(b: &[u8]) -> Vec<SessionEntry> {
    let mut v = Vec::new();
    for blk in chain(b, sessions_pa(b)) {
        let n = u64_at(b, blk + 8);
        for i in 0..n {
            let at = entry_at(blk, i, 80);
            v.push(SessionEntry {
                name: c_string(&b[at as usize..at as usize + 64]),
                files: u64_at(b, at + 64),
                count: u64_at(b, at + 72),
                at,
            });
        }
    }
    v
}

/// A decoded file entry: compatible, data, token, entry address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// The handler's compatible string.
    pub compat: String,
    /// `data`.
    pub data: u64,
    /// `token`.
    pub token: u64,
    /// Where the entry lives.
    pub at: u64,
}

/// The file entries of the chain at `head`.
pub fn files(b: &[u8], head: u64) -> Vec<FileEntry> {
    let mut v = Vec::new();
    for blk in chain(b, head) {
        let n = u64_at(b, blk + 8);
        for i in 0..n {
            let at = entry_at(blk, i, 64);
            v.push(FileEntry {
                compat: c_string(&b[at as usize..at as usize + 48]),
                data: u64_at(b, at + 48),
                token: u64_at(b, at + 56),
                at,
            });
        }
    }
    v
}

/// The FLB entries of the FLB page: (name, data, count).
pub fn flb_entries(b: &[u8]) -> Vec<(String, u64, u64)> {
    let page = flbs_pa(b);
    let n = u64_at(b, page + 8);
    (0..n)
        .map(|i| {
            let at = page + 16 + i * 64;
            (
                c_string(&b[at as usize..at as usize + 48]),
                u64_at(b, at + 48),
                u64_at(b, at + 56),
            )
        })
        .collect()
}

/// Boots a new image from raw handover bytes.
pub fn boot_bytes(bytes: Vec<u8>) -> LiveUpdate {
    let mem = Memory::from_bytes(bytes).expect("handover header");
    LiveUpdate::with_memory(Arc::new(mem)).expect("boot")
}

// -------------------------------------------------------------------------------------------
// A user argument and fd table for reply-fault tests
// -------------------------------------------------------------------------------------------

/// A user argument whose reads succeed (within the buffer) and whose writes fault when
/// `fault_writes` is set: the reply of an ioctl cannot be copied out.
pub struct ReplyFault {
    /// The bytes.
    pub buf: Vec<u8>,
    /// Make every write fault.
    pub fault_writes: bool,
}

impl UserArg for ReplyFault {
    fn read(&mut self, offset: usize, buf: &mut [u8]) -> luo_core::Result {
        let src = self
            .buf
            .get(offset..offset + buf.len())
            .ok_or(Error::Fault)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write(&mut self, offset: usize, data: &[u8]) -> luo_core::Result {
        if self.fault_writes {
            return Err(Error::Fault);
        }
        let dst = self
            .buf
            .get_mut(offset..offset + data.len())
            .ok_or(Error::Fault)?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

/// A minimal fd table for driving `Luo::device_ioctl`/`session_ioctl` directly: fd numbers are
/// real placeholder fds, session files are the sessions themselves, installed objects are kept.
#[derive(Default)]
pub struct TestFds {
    /// Sessions installed, with the fds holding their numbers.
    pub sessions: Vec<(OwnedFd, SessionRef<UserPlatform>)>,
    /// Files installed.
    pub files: Vec<OwnedFd>,
    /// Session files discarded without release.
    pub discarded: usize,
    /// Reservations given back: dropped without being installed.
    pub unreserved: Rc<Cell<usize>>,
    /// Make session file creation fail with this error (`anon_inode_getfile` failing).
    pub fail_session_file: Option<Error>,
}

/// A reserved fd number of [`TestFds`]: a placeholder fd that counts itself in
/// [`TestFds::unreserved`] when it drops without being installed.
pub struct TestSlot {
    fd: Option<OwnedFd>,
    given_back: Rc<Cell<usize>>,
}

impl TestSlot {
    fn install(mut self) -> OwnedFd {
        match self.fd.take() {
            Some(fd) => fd,
            None => unreachable!("a slot is installed once: `install` consumes it"),
        }
    }
}

impl Drop for TestSlot {
    fn drop(&mut self) {
        if self.fd.is_some() {
            self.given_back.set(self.given_back.get() + 1);
        }
    }
}

impl FdTable<UserPlatform> for TestFds {
    type Slot = TestSlot;
    type SessionFile = SessionRef<UserPlatform>;
    fn reserve(&mut self) -> luo_core::Result<TestSlot> {
        let fd = backend_user::sys::placeholder_fd().map_err(|_| Error::TooManyFds)?;
        Ok(TestSlot {
            fd: Some(fd),
            given_back: self.unreserved.clone(),
        })
    }
    fn slot_fd(&self, slot: &TestSlot) -> i32 {
        slot.fd.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }
    fn session_file(
        &mut self,
        session: &SessionRef<UserPlatform>,
    ) -> luo_core::Result<SessionRef<UserPlatform>> {
        if let Some(e) = self.fail_session_file {
            return Err(e);
        }
        Ok(session.clone())
    }
    fn discard_session_file(&mut self, _file: SessionRef<UserPlatform>) {
        self.discarded += 1;
    }
    fn install_session(&mut self, slot: TestSlot, file: SessionRef<UserPlatform>) {
        self.sessions.push((slot.install(), file));
    }
    fn install_file(&mut self, slot: TestSlot, file: OwnedFd) {
        drop(slot.install());
        self.files.push(file);
    }
    fn fget(&mut self, fd: i32) -> luo_core::Result<OwnedFd> {
        backend_user::sys::fget(fd).map_err(|_| Error::BadFd)
    }
}

/// Holds a file open and hands out its fd for `preserve_fd`.
pub fn fd_of(f: &impl AsFd) -> BorrowedFd<'_> {
    f.as_fd()
}
