//! The syscalls luo-client and luod make: LUO's six ioctls, fd passing over Unix sockets
//! (`SCM_RIGHTS`), `SO_PEERCRED`, `poll`, `kexec_file_load` and `reboot`. Every `unsafe` block of
//! both crates but one (luod adopting the fds it inherits across exec) is here, each with its
//! argument; the functions themselves are safe.
//!
//! The LUO ioctl wrappers take and return plain Rust values and build the uAPI structs of
//! [`luo_core::uapi`] themselves, always with `size` equal to the struct's own size: the kernel
//! then reads and writes exactly that struct and nothing past it.

use std::ffi::CStr;
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use luo_core::abi::SESSION_NAME_LEN;
use luo_core::uapi::{
    CreateSession, Finish, GetName, PreserveFd, LIVEUPDATE_IOCTL_CREATE_SESSION,
    LIVEUPDATE_IOCTL_RETRIEVE_SESSION, LIVEUPDATE_SESSION_FINISH, LIVEUPDATE_SESSION_GET_NAME,
    LIVEUPDATE_SESSION_PRESERVE_FD, LIVEUPDATE_SESSION_RETRIEVE_FD,
};

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret.unsigned_abs())
    }
}

/// The uAPI structs this module passes to `ioctl`. Sealed: only the four LUO argument structs,
/// whose `size` field is at offset 0 and which the kernel accesses within `size_of::<Self>()`.
trait LuoArg: zerocopy::IntoBytes + zerocopy::FromBytes {}
impl LuoArg for CreateSession {}
impl LuoArg for PreserveFd {}
impl LuoArg for Finish {}
impl LuoArg for GetName {}

/// `ioctl(fd, cmd, arg)` on a LUO fd. `arg.size` must be `size_of::<T>()` (every caller below
/// builds it so), so the kernel touches only `*arg`.
fn luo_ioctl<T: LuoArg>(fd: BorrowedFd<'_>, cmd: u32, arg: &mut T) -> io::Result<()> {
    // `Ioctl` is c_ulong on glibc and c_int on musl; the LUO commands fit both.
    #[allow(clippy::cast_lossless, clippy::cast_possible_wrap)]
    let request = cmd as libc::Ioctl;
    // SAFETY: `arg` is a valid, exclusive pointer to a `T` for the duration of the call; its
    // `size` field equals `size_of::<T>()`, so the kernel reads and writes at most that many
    // bytes (spec §2.4 steps 6 and 9), all inside `*arg`. Every bit pattern is a valid `T`
    // (`FromBytes`), so whatever the kernel writes back is sound to read.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(arg)) })?;
    Ok(())
}

/// Takes ownership of an fd number the kernel just returned in an ioctl reply.
fn owned_from_reply(fd: i32) -> io::Result<OwnedFd> {
    if fd < 0 {
        // A successful ioctl always installs an fd; anything else is a kernel bug, not ours to
        // wrap in an OwnedFd.
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    // SAFETY: the ioctl succeeded, so the kernel installed this fd for us and nothing else in
    // this process knows its number yet.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn session_request(
    dev: BorrowedFd<'_>,
    cmd: u32,
    name: &[u8; SESSION_NAME_LEN],
) -> io::Result<OwnedFd> {
    let mut req = CreateSession {
        size: size_of::<CreateSession>() as u32,
        fd: -1,
        name: *name,
    };
    luo_ioctl(dev, cmd, &mut req)?;
    owned_from_reply(req.fd)
}

/// `LIVEUPDATE_IOCTL_CREATE_SESSION` on `/dev/liveupdate`: the new session fd (close-on-exec).
pub fn luo_create_session(
    dev: BorrowedFd<'_>,
    name: &[u8; SESSION_NAME_LEN],
) -> io::Result<OwnedFd> {
    session_request(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, name)
}

/// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION` on `/dev/liveupdate`.
pub fn luo_retrieve_session(
    dev: BorrowedFd<'_>,
    name: &[u8; SESSION_NAME_LEN],
) -> io::Result<OwnedFd> {
    session_request(dev, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, name)
}

/// `LIVEUPDATE_SESSION_PRESERVE_FD` on an outgoing session fd.
pub fn luo_preserve_fd(session: BorrowedFd<'_>, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
    let mut req = PreserveFd {
        size: size_of::<PreserveFd>() as u32,
        fd: fd.as_raw_fd(),
        token,
    };
    luo_ioctl(session, LIVEUPDATE_SESSION_PRESERVE_FD, &mut req)
}

/// `LIVEUPDATE_SESSION_RETRIEVE_FD` on an incoming session fd: a new close-on-exec fd.
pub fn luo_retrieve_fd(session: BorrowedFd<'_>, token: u64) -> io::Result<OwnedFd> {
    let mut req = PreserveFd {
        size: size_of::<PreserveFd>() as u32,
        fd: -1,
        token,
    };
    luo_ioctl(session, LIVEUPDATE_SESSION_RETRIEVE_FD, &mut req)?;
    owned_from_reply(req.fd)
}

/// `LIVEUPDATE_SESSION_FINISH` on an incoming session fd.
pub fn luo_finish(session: BorrowedFd<'_>) -> io::Result<()> {
    let mut req = Finish {
        size: size_of::<Finish>() as u32,
        reserved: 0,
    };
    luo_ioctl(session, LIVEUPDATE_SESSION_FINISH, &mut req)
}

/// `LIVEUPDATE_SESSION_GET_NAME`: the 64-byte name field (NUL-terminated).
pub fn luo_get_name(session: BorrowedFd<'_>) -> io::Result<[u8; SESSION_NAME_LEN]> {
    let mut req = GetName {
        size: size_of::<GetName>() as u32,
        reserved: 0,
        name: [0; SESSION_NAME_LEN],
    };
    luo_ioctl(session, LIVEUPDATE_SESSION_GET_NAME, &mut req)?;
    Ok(req.name)
}

/// Most fds one received message keeps; the kernel closes the rest (`MSG_CTRUNC`). luod's
/// largest request (UPDATE) carries two.
pub const MAX_FDS: usize = 4;

/// Most fds [`send_with_fds`] attaches (more than [`MAX_FDS`], so tests can send too many).
pub const MAX_SEND_FDS: usize = 16;

/// A control buffer for [`MAX_SEND_FDS`] fds, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 128]);

// CMSG_SPACE for MAX_SEND_FDS ints must fit the buffer.
const _: () = assert!(16 + MAX_SEND_FDS * 4 <= 128);

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as libc::c_uint) as usize }
}

fn cmsg_len(fds: usize) -> usize {
    // SAFETY: CMSG_LEN only computes a size from its argument.
    unsafe { libc::CMSG_LEN((fds * size_of::<RawFd>()) as libc::c_uint) as usize }
}

fn zeroed_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain old data (pointers and integers, plus private padding on some
    // libcs, which is why it is not built as a literal); all-zero is a valid empty header.
    unsafe { MaybeUninit::<libc::msghdr>::zeroed().assume_init() }
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Converts a control-message length to the libc field's type (`size_t` on glibc, `socklen_t`
/// on musl).
fn ctl_len<T: TryFrom<usize>>(n: usize) -> io::Result<T> {
    T::try_from(n).map_err(|_| invalid("control length"))
}

/// `sendmsg` of `data` with `fds` attached as `SCM_RIGHTS` (at most [`MAX_SEND_FDS`]), with
/// `MSG_NOSIGNAL`: a peer that went away gives `EPIPE`, never a signal. Returns the bytes sent,
/// which may be fewer than `data.len()`; the fds go with the first byte.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_SEND_FDS {
        return Err(invalid("too many fds for one message"));
    }
    if fds.is_empty() && data.is_empty() {
        return Ok(0);
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut cbuf = CmsgBuf([0; 128]);
    let mut msg = zeroed_msghdr();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = ctl_len(cmsg_space(fds.len()))?;
        // SAFETY: msg_control points at `cbuf`, which is aligned for cmsghdr and at least
        // msg_controllen bytes long, so CMSG_FIRSTHDR returns a pointer into it (never null:
        // msg_controllen >= CMSG_SPACE(4) > sizeof(cmsghdr)).
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        if cmsg.is_null() {
            return Err(invalid("control buffer"));
        }
        // SAFETY: `cmsg` points at a properly aligned cmsghdr inside `cbuf` (see above); the
        // data area that CMSG_DATA returns has room for `fds.len()` ints (CMSG_SPACE above), and
        // `write_unaligned` needs no alignment.
        unsafe {
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = ctl_len(cmsg_len(fds.len()))?;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` (which points into `data`, valid for reads) and at
        // `cbuf`, all alive for the call; sendmsg only reads them.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// What one [`recv_with_fds`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes read into the buffer; 0 means end of stream.
    pub len: usize,
    /// The sender attached more fds than fit ([`MAX_FDS`]); the kernel closed the excess.
    pub fds_truncated: bool,
}

/// `recvmsg` into `buf`, collecting any `SCM_RIGHTS` fds (close-on-exec) into `fds`. Fds are
/// owned as soon as they arrive, so a hostile sender's fds are closed whatever happens next.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf([0; 128]);
    let mut msg = zeroed_msghdr();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = ctl_len(cmsg_space(MAX_FDS))?;
    let len = loop {
        // SAFETY: `msg` points at `iov` (into `buf`, valid for writes of buf.len() bytes) and
        // at `cbuf` (valid for msg_controllen bytes), all alive for the call.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        match cvt_size(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other?,
        }
    };
    // SAFETY: recvmsg filled `msg` and its control area; CMSG_FIRSTHDR/CMSG_NXTHDR walk only
    // within msg_controllen as the kernel set it.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null pointer from CMSG_FIRSTHDR/NXTHDR is an aligned cmsghdr inside
        // `cbuf`; its data area holds `cmsg_len - CMSG_LEN(0)` bytes the kernel wrote.
        unsafe {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                #[allow(clippy::unnecessary_cast)] // cmsg_len is size_t on glibc, u32 on musl.
                let bytes = ((*cmsg).cmsg_len as usize).saturating_sub(cmsg_len(0));
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..bytes / size_of::<RawFd>() {
                    let fd = data.add(i).read_unaligned();
                    if fd >= 0 {
                        // The kernel installed this fd for us just now; nothing else owns it.
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        len,
        fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// The credentials of the process at the other end of a Unix socket (`SO_PEERCRED`), as the
/// kernel recorded them at `connect`: they cannot be forged by the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// `getsockopt(SO_PEERCRED)`.
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` holds the size of `cred`.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut cred).cast(),
            &mut len,
        )
    })?;
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Waits up to `timeout_ms` (-1: forever) for `fd` to become readable (or hung up).
pub fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is one valid pollfd, and we pass a count of 1.
        match cvt(unsafe { libc::poll(&mut p, 1, timeout_ms) }) {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `kexec_file_load(kernel, initrd, cmdline, flags)`: loads the next kernel. Without an initrd
/// the call gets `KEXEC_FILE_NO_INITRAMFS`. The kernel adds the KHO (and so LUO) state to
/// images loaded this way only (spec §2.10).
pub fn kexec_file_load(
    kernel: BorrowedFd<'_>,
    initrd: Option<BorrowedFd<'_>>,
    cmdline: &CStr,
) -> io::Result<()> {
    let (initrd_fd, flags) = match initrd {
        Some(fd) => (fd.as_raw_fd(), 0),
        None => (-1, libc::KEXEC_FILE_NO_INITRAMFS),
    };
    let bytes = cmdline.to_bytes_with_nul();
    // SAFETY: the fds are open for the call; `bytes` is a NUL-terminated buffer of exactly
    // `bytes.len()` bytes, which the kernel only reads.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            libc::c_long::from(kernel.as_raw_fd()),
            libc::c_long::from(initrd_fd),
            bytes.len(),
            bytes.as_ptr(),
            libc::c_ulong::from(flags.unsigned_abs()),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `kexec_file_load(..., KEXEC_FILE_UNLOAD)`: drops a loaded image, so that an aborted update
/// does not leave a kernel armed for the next reboot.
pub fn kexec_unload() -> io::Result<()> {
    // SAFETY: with KEXEC_FILE_UNLOAD the kernel ignores the fds and reads no memory (the
    // command line pointer is null with length 0).
    let r = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            -1 as libc::c_long,
            -1 as libc::c_long,
            0usize,
            std::ptr::null::<u8>(),
            libc::c_ulong::from(libc::KEXEC_FILE_UNLOAD.unsigned_abs()),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `sync(); reboot(LINUX_REBOOT_CMD_KEXEC)`. Returns only if the kernel refused: no image
/// loaded (`EINVAL`), a file that could not be frozen (LUO's errno), `EPERM` without
/// `CAP_SYS_BOOT`. On success the machine is in the next kernel.
pub fn reboot_kexec() -> io::Error {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot with a command constant touches no memory of ours.
    let r = unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC) };
    if r < 0 {
        io::Error::last_os_error()
    } else {
        // reboot(KEXEC) does not return on success; be explicit rather than invent success.
        io::Error::from_raw_os_error(libc::EIO)
    }
}

/// Takes ownership of an fd number inherited across exec (luod's listening socket and handover
/// memfd after a userspace update).
///
/// # Safety
/// `fd` must be open and owned by nothing else in this process, and must not be adopted twice.
pub unsafe fn adopt_inherited(fd: RawFd) -> OwnedFd {
    // SAFETY: guaranteed by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Sets SIGPIPE's disposition to ignored: a write to a closed pipe or socket then fails with
/// `EPIPE` instead of killing the process.
pub fn ignore_sigpipe() {
    // SAFETY: installing SIG_IGN for SIGPIPE runs no handler code and touches no memory of
    // ours; it only changes the process's signal disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Waits up to `timeout_ms` (-1: forever) for any of `fds` to become readable (or hung up);
/// returns which ones are. One implementation with backend-user's (`sys::poll_in`).
pub fn poll_readable_any(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> io::Result<Vec<bool>> {
    backend_user::sys::poll_in(fds, timeout_ms)
}

/// Blocks SIGTERM and SIGINT in the calling thread (threads it starts later inherit the mask)
/// and returns a signalfd that becomes readable when one is pending: a daemon's clean stop
/// without an asynchronous signal handler. Call it before starting any thread.
pub fn term_signalfd() -> io::Result<OwnedFd> {
    let mut set = MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: sigemptyset initializes the set it is given; sigaddset adds valid signal
    // numbers to that initialized set; pthread_sigmask reads it and changes this thread's
    // mask only; signalfd reads the set and returns a new fd or -1.
    let fd = unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGTERM);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGINT);
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut());
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        cvt(libc::signalfd(
            -1,
            set.as_ptr(),
            libc::SFD_CLOEXEC | libc::SFD_NONBLOCK,
        ))?
    };
    // SAFETY: signalfd just returned this new fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one pending signal from a [`term_signalfd`]: its number, or `None` if none is pending.
pub fn read_signal(fd: BorrowedFd<'_>) -> io::Result<Option<u32>> {
    let mut info = MaybeUninit::<libc::signalfd_siginfo>::zeroed();
    let want = size_of::<libc::signalfd_siginfo>();
    // SAFETY: `info` is valid for writes of `want` bytes; read writes at most that many.
    let r = unsafe { libc::read(fd.as_raw_fd(), info.as_mut_ptr().cast(), want) };
    match cvt_size(r) {
        Ok(n) if n == want => {
            // SAFETY: the kernel filled the whole struct (n == its size); every bit pattern
            // of its integer fields is valid.
            Ok(Some(unsafe { info.assume_init() }.ssi_signo))
        }
        Ok(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Raises `RLIMIT_NOFILE`'s soft limit to its hard limit; returns the limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit for getrlimit to fill.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) })?;
    if r.rlim_cur < r.rlim_max {
        let want = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: `want` is a valid rlimit that setrlimit only reads.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) })?;
        r.rlim_cur = r.rlim_max;
    }
    Ok(r.rlim_cur)
}

/// The effective uid of this process.
pub fn geteuid() -> u32 {
    // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

/// True if `fd` is an open fd number in this process.
pub fn fd_is_open(fd: RawFd) -> bool {
    backend_user::sys::fd_is_open(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn luo_ioctls_on_a_non_luo_fd_fail_cleanly() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let name = [0u8; 64];
        let e = luo_create_session(null.as_fd(), &name).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
        assert_eq!(
            luo_finish(null.as_fd()).unwrap_err().raw_os_error(),
            Some(libc::ENOTTY)
        );
    }

    #[test]
    fn fds_travel_and_excess_fds_are_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let n = send_with_fds(a.as_fd(), b"hi", &[f.as_fd(), f.as_fd()]).unwrap();
        assert_eq!(n, 2);
        let mut buf = [0u8; 8];
        let mut fds = Vec::new();
        let r = recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!((r.len, r.fds_truncated, fds.len()), (2, false, 2));
        assert!(backend_user::sys::get_cloexec(fds[0].as_fd()).unwrap());

        // More fds than the receiver keeps: the excess is closed by the kernel and reported.
        let many: Vec<_> = (0..MAX_FDS + 2).map(|_| f.as_fd()).collect();
        send_with_fds(a.as_fd(), b"x", &many).unwrap();
        send_with_fds(a.as_fd(), b"y", &[]).unwrap();
        fds.clear();
        let r = recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!((r.len, r.fds_truncated, fds.len()), (1, true, MAX_FDS));
        assert!(send_with_fds(a.as_fd(), b"z", &[f.as_fd(); MAX_SEND_FDS + 1]).is_err());
    }

    #[test]
    fn peer_cred_is_ours() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = peer_cred(a.as_fd()).unwrap();
        assert_eq!(c.pid, std::process::id() as i32);
        assert_eq!(c.uid, geteuid());
    }
}
