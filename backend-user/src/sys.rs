//! Thin, checked wrappers over the few syscalls the backend needs. All `unsafe` of the crate is
//! here, each call with its SAFETY argument.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `memfd_create(name, flags)`.
pub fn memfd_create(name: &CStr, flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let fd = cvt(unsafe { libc::memfd_create(name.as_ptr(), flags) })?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fcntl(fd, F_DUPFD_CLOEXEC, 0)`: a new fd for the same open file.
pub fn dup_cloexec(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC takes an int argument and does not touch memory.
    let new = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: fresh fd from the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// `dup3(src, dst, O_CLOEXEC)`, taking ownership of `dst`'s number.
pub fn dup_onto(src: BorrowedFd<'_>, dst: OwnedFd) -> io::Result<OwnedFd> {
    let n = dst.as_raw_fd();
    // Keep `dst` open until dup3 replaces it atomically, so its number cannot be reused.
    // SAFETY: both are valid fds; dup3 does not touch memory.
    cvt(unsafe { libc::dup3(src.as_raw_fd(), n, libc::O_CLOEXEC) })?;
    // dup3 closed the old file behind `n` and put the new one there: forget the old owner.
    std::mem::forget(dst);
    // SAFETY: `n` now refers to the duplicate we created and own.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// File status flags (`F_GETFL`).
pub fn get_fl(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFL takes no argument.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })
}

/// Sets or clears `FD_CLOEXEC`.
pub fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD take int arguments.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) })?;
    let flags = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags) })?;
    Ok(())
}

/// True if `FD_CLOEXEC` is set.
pub fn get_cloexec(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: F_GETFD takes no argument.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) })?;
    Ok(flags & libc::FD_CLOEXEC != 0)
}

/// Memfd seals (`F_GET_SEALS`).
pub fn get_seals(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: F_GET_SEALS takes no argument.
    let s = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })?;
    Ok(s as u32)
}

/// Adds memfd seals (`F_ADD_SEALS`).
pub fn add_seals(fd: BorrowedFd<'_>, seals: u32) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int argument.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals as libc::c_int) })?;
    Ok(())
}

/// `fstat`.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` points to writable memory of the right size.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded and filled the struct.
    Ok(unsafe { st.assume_init() })
}

/// `fstat` of an fd number this process may not own (an inherited one), without taking a new
/// fd for it: works with a full fd table.
pub fn fstat_raw(fd: RawFd) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` points to writable memory of the right size; the kernel validates `fd`.
    cvt(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded and filled the struct.
    Ok(unsafe { st.assume_init() })
}

/// The filesystem magic of the file's filesystem (`fstatfs().f_type`).
pub fn fs_type(fd: BorrowedFd<'_>) -> io::Result<i64> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `st` points to writable memory of the right size.
    cvt(unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatfs succeeded and filled the struct.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs across libcs.
    Ok(st.f_type as i64)
}

/// `lseek`.
pub fn lseek(fd: BorrowedFd<'_>, off: i64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek does not touch memory.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// `pread` the whole buffer or fail.
pub fn pread_exact(fd: BorrowedFd<'_>, buf: &mut [u8], mut off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                rest.as_mut_ptr().cast(),
                rest.len(),
                off as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        done += n as usize;
        off += n as u64;
    }
    Ok(())
}

/// `pwrite` the whole buffer or fail.
pub fn pwrite_all(fd: BorrowedFd<'_>, buf: &[u8], mut off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: `rest` is a valid readable buffer of `rest.len()` bytes.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                off as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
        off += n as u64;
    }
    Ok(())
}

/// `ftruncate`.
pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    // SAFETY: ftruncate does not touch memory.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })?;
    Ok(())
}

/// A close-on-exec placeholder that holds an fd number: a dup of one `/dev/null` fd the
/// process opens once (a dup takes no path walk and, like the kernel's
/// `get_unused_fd_flags`, fails only with `EMFILE`).
pub fn placeholder_fd() -> io::Result<OwnedFd> {
    static NULL: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
    let null = match NULL.get() {
        Some(fd) => fd,
        None => {
            // SAFETY: the path is a valid C string.
            let fd = cvt(unsafe {
                libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC)
            })?;
            // SAFETY: fresh fd from the kernel.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // Another thread may have won the race: its fd is kept, this one closes.
            NULL.get_or_init(|| fd)
        }
    };
    dup_cloexec(null.as_fd())
}

/// Takes ownership of an fd number inherited across exec.
///
/// # Safety
/// The caller must know `fd` is open and owned by nobody else in this process.
pub unsafe fn adopt(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller guarantees `fd` is open and unowned.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// True if the fd number is open in this process.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD on any number is harmless; it fails with EBADF if not open.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// `fget(fd)` for a process: a new close-on-exec reference to the open file behind the fd
/// number, refusing negative, closed and `O_PATH` fds (the kernel's `fget` does too).
pub fn fget(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: F_GETFL on any number is harmless; it fails with EBADF if the fd is not open.
    let fl = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    if fl & libc::O_PATH != 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: F_DUPFD_CLOEXEC takes an int argument and does not touch memory.
    let new = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: fresh fd from the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// `clock_gettime(CLOCK_MONOTONIC)` in nanoseconds. The clock is system-wide and keeps running
/// across `exec`, so readings taken before and after an exec (or in two processes) compare.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if r != 0 {
        // CLOCK_MONOTONIC cannot fail on Linux; never report a time before the epoch.
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Sets `FD_CLOEXEC` on an fd number this process may not own (an fd inherited across exec
/// that nobody has adopted yet); fails with EBADF if the number is not open.
pub fn set_cloexec_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD take int arguments and do not touch memory; the kernel
    // validates `fd`.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) })?;
    Ok(())
}

/// An `execve` prepared in advance: the path, argv and envp as C strings with their
/// NULL-terminated pointer arrays, so that [`ExecCall::exec`] allocates nothing and may run
/// between `fork` and `exec`. The path is used as given: no `PATH` search, and a file the
/// kernel cannot execute fails with `ENOEXEC` instead of being handed to `/bin/sh` (which
/// glibc's `execvp`, behind `std::process::Command`, does).
pub struct ExecCall {
    path: CString,
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

// SAFETY: the pointers in `argv` and `envp` point into the heap buffers of `path` and
// `_strings`, which this struct owns and never changes after construction (moving a `CString`
// does not move its buffer); other threads can only read those bytes.
unsafe impl Send for ExecCall {}
// SAFETY: as above: shared access is read-only.
unsafe impl Sync for ExecCall {}

fn c_string(s: &std::ffi::OsStr) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} contains a NUL byte", s.to_string_lossy()),
        )
    })
}

impl ExecCall {
    /// `execve(path, argv, <this process's environment>)`; `argv[0]` is given by the caller.
    pub fn new(path: &std::path::Path, argv: &[&std::ffi::OsStr]) -> io::Result<ExecCall> {
        use std::os::unix::ffi::OsStrExt;
        let path_c = c_string(path.as_os_str())?;
        let mut strings = Vec::with_capacity(argv.len() + 16);
        for a in argv {
            strings.push(c_string(a)?);
        }
        let nargs = strings.len();
        for (k, v) in std::env::vars_os() {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            // The environment cannot hold a NUL byte; skip rather than fail if it somehow does.
            if let Ok(c) = CString::new(kv) {
                strings.push(c);
            }
        }
        let ptrs = |s: &[CString]| {
            s.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        let argv = ptrs(&strings[..nargs]);
        let envp = ptrs(&strings[nargs..]);
        Ok(ExecCall {
            path: path_c,
            _strings: strings,
            argv,
            envp,
        })
    }

    /// Replaces this process's image; returns only on failure. Async-signal-safe: makes one
    /// system call and reads `errno`.
    pub fn exec(&self) -> io::Error {
        // SAFETY: `path` is NUL-terminated, `argv` and `envp` are NULL-terminated arrays of
        // pointers to NUL-terminated strings, all owned by `self` and alive for the call.
        unsafe { libc::execve(self.path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr()) };
        io::Error::last_os_error()
    }
}

/// The soft `RLIMIT_NOFILE` (an upper bound on fd numbers), capped at 2^20.
fn nofile_limit() -> u32 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 1 << 20;
    }
    rl.rlim_cur.min(1 << 20) as u32
}

/// Spawns `call` as a child process with stdin on `/dev/null`, stdout and stderr piped, and
/// every other fd closed at its exec: the child inherits nothing of this process's open files.
/// The exec is `call`'s own `execve` (no `PATH` search, no shell fallback).
pub fn spawn_isolated(call: std::sync::Arc<ExecCall>) -> io::Result<std::process::Child> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let max_fd = nofile_limit();
    let mut cmd = Command::new(std::ffi::OsStr::from_bytes(call.path.as_bytes()));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child_side = move || -> io::Result<()> {
        // Mark every fd above stdio close-on-exec (close_range, Linux 5.11+; else one by one).
        // SAFETY: close_range takes three integers and touches no memory.
        let r = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        if r != 0 {
            for fd in 3..max_fd as libc::c_int {
                // SAFETY: F_SETFD on any number is harmless (EBADF if it is not open).
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
        }
        Err(call.exec())
    };
    // SAFETY: the closure runs in the child between fork and exec. It only makes system calls
    // (close_range or fcntl, then execve) and builds an `io::Error` from `errno`: it neither
    // allocates nor takes a lock, so it is async-signal-safe.
    unsafe { cmd.pre_exec(child_side) };
    cmd.spawn()
}

/// Waits until one of `fds` is readable or hung up, at most `timeout_ms`; returns which are.
pub fn poll_in(fds: &[BorrowedFd<'_>], timeout_ms: libc::c_int) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `p` is a valid array of `p.len()` pollfds for the duration of the call.
        let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
        if r >= 0 {
            return Ok(p.iter().map(|x| x.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
