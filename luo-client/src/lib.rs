//! luo-client: the Live Update Orchestrator from a program's side.
//!
//! A VMM (or any program whose memory must outlive a kernel update) needs four things: a
//! session to put files in, a way to preserve a file under a token, a way to get it back in the
//! next kernel, and FINISH. This crate gives them one safe API over three ways of reaching LUO:
//!
//! - [`Device::open`]: the kernel's `/dev/liveupdate` and its session fds, through the ioctls of
//!   [`luo_core::uapi`]. Only one process may hold the device open, so on a real host this is
//!   what the agent (luod) uses.
//! - [`Device::in_process`]: `backend-user`, the same orchestrator running inside the calling
//!   process, where a "reboot" is an `exec`. A VMM can test its live-update path with it
//!   without a LUO kernel.
//! - [`Luod::connect`]: luod, the agent that owns the device, over its Unix socket. It hands
//!   each client a [`Session`] by name, keeps its own copy so the client may crash and come
//!   back, and runs the update barrier. This is what a VMM uses in production:
//!
//! ```no_run
//! # fn main() -> Result<(), luo_client::Error> {
//! # let guest_ram = std::fs::File::open("/dev/null").unwrap();
//! let luod = luo_client::Luod::connect(luo_client::Luod::DEFAULT_SOCKET)?;
//! luod.create_session("vm0")?.preserve_fd(&guest_ram, 0)?;             // before the update
//! let s = luod.retrieve_session("vm0")?; let ram = s.retrieve_fd(0)?; s.finish()?; // after it
//! # Ok(()) }
//! ```
//!
//! Errors are errnos, exactly as LUO returns them (spec §2.6): [`Error::errno`] gives the
//! [`Errno`] whichever backend produced it.

#![deny(unsafe_code)]

mod luod;
#[allow(unsafe_code)]
pub mod sys;
pub mod wire;

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

pub use luo_core::abi::SESSION_NAME_LEN;
pub use luo_core::Errno;

pub use luod::{Luod, UpdateEvent, UpdateListener};
pub use wire::{BackendKind, Dir, Hello, SessionInfo, Status};

/// What went wrong.
#[derive(Debug)]
pub enum Error {
    /// LUO refused: the errno the kernel, the in-process backend, or luod relaying either of
    /// them returned, unchanged (spec §2.6).
    Luo(Errno),
    /// luod refused a request of its own (access control, a bad name, a failed update), with
    /// its explanation.
    Luod {
        /// The errno.
        errno: Errno,
        /// luod's explanation.
        message: String,
    },
    /// Talking to luod failed: it is not running, went away (an update restarts it), or a
    /// deadline passed.
    Io(io::Error),
    /// luod answered something this client does not understand.
    Protocol(String),
}

impl Error {
    /// The errno of this error: LUO's or luod's own; the socket error's for I/O failures;
    /// `EPROTO` for protocol violations.
    pub fn errno(&self) -> Errno {
        match self {
            Error::Luo(e) | Error::Luod { errno: e, .. } => *e,
            Error::Io(e) => Errno::new(e.raw_os_error().unwrap_or(libc::EIO)),
            Error::Protocol(_) => Errno::new(libc::EPROTO),
        }
    }

    fn from_io(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(n) => Error::Luo(Errno::new(n)),
            None => Error::Io(e),
        }
    }
}

impl From<luo_core::Error> for Error {
    fn from(e: luo_core::Error) -> Self {
        Error::Luo(e.errno())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Luo(e) => write!(f, "{}", describe_errno(*e)),
            Error::Luod { errno, message } if message.is_empty() => {
                write!(f, "luod: {}", describe_errno(*errno))
            }
            Error::Luod { errno, message } => {
                write!(f, "luod: {message} ({})", errno_name(errno.get()))
            }
            Error::Io(e) => write!(f, "luod connection: {e}"),
            Error::Protocol(m) => write!(f, "luod protocol: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The symbolic name of an errno (`"EBUSY"`), covering LUO's and luod's.
pub fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::ENOEXEC => "ENOEXEC",
        libc::ENOSYS => "ENOSYS",
        libc::EPIPE => "EPIPE",
        libc::EBADRQC => "EBADRQC",
        libc::EPROTO => "EPROTO",
        libc::EBADMSG => "EBADMSG",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECANCELED => "ECANCELED",
        libc::EKEYREJECTED => "EKEYREJECTED",
        _ => Errno::new(e).name(),
    }
}

/// `"EBUSY (Device or resource busy)"`.
pub fn describe_errno(e: Errno) -> String {
    let text = io::Error::from_raw_os_error(e.get()).to_string();
    // std appends " (os error N)"; the name already identifies it.
    let text = text.split(" (os error").next().unwrap_or("").to_string();
    format!("{} ({text})", errno_name(e.get()))
}

/// A LUO session name as the 64-byte uAPI field. Names with a NUL inside, or of 64 bytes or
/// more, are refused here with `EINVAL`: the kernel would cut the first at the NUL (a session
/// with a different name) and refuse the second with `EINVAL` anyway.
fn name_field(name: &str) -> Result<[u8; SESSION_NAME_LEN]> {
    let b = name.as_bytes();
    if b.len() >= SESSION_NAME_LEN || b.contains(&0) {
        return Err(Error::Luo(luo_core::errno::EINVAL));
    }
    let mut f = [0u8; SESSION_NAME_LEN];
    f[..b.len()].copy_from_slice(b);
    Ok(f)
}

fn name_from_field(f: &[u8; SESSION_NAME_LEN]) -> String {
    let n = f.iter().position(|&b| b == 0).unwrap_or(f.len());
    String::from_utf8_lossy(&f[..n]).into_owned()
}

/// An open LUO device: the kernel's `/dev/liveupdate` or the in-process backend. Exclusive:
/// while one is open, opening another fails with `EBUSY`. Dropping it does not touch sessions.
pub struct Device(DeviceImpl);

enum DeviceImpl {
    Kernel(OwnedFd),
    User(backend_user::Device),
}

impl Device {
    /// The kernel device.
    pub const PATH: &'static str = "/dev/liveupdate";

    /// Opens `/dev/liveupdate`: `EBUSY` if another process has it (usually luod), `EIO` if the
    /// kernel refused the state the previous kernel handed over, `ENOENT` without LUO.
    pub fn open() -> Result<Self> {
        Self::open_path(Self::PATH)
    }

    /// Opens a LUO device node at `path`.
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(Error::from_io)?;
        Ok(Device(DeviceImpl::Kernel(OwnedFd::from(f))))
    }

    /// Opens the in-process backend's device (`EBUSY` if already open, like the kernel's).
    pub fn in_process(lu: &backend_user::LiveUpdate) -> Result<Self> {
        Ok(Device(DeviceImpl::User(lu.open()?)))
    }

    /// Which backend this is.
    pub fn backend(&self) -> BackendKind {
        match self.0 {
            DeviceImpl::Kernel(_) => BackendKind::Kernel,
            DeviceImpl::User(_) => BackendKind::User,
        }
    }

    /// CREATE_SESSION: a new outgoing session. `EEXIST` if an outgoing session has the name,
    /// `EINVAL` for an empty name, one of 64 bytes or more, or one with a NUL inside.
    pub fn create_session(&self, name: &str) -> Result<Session> {
        let field = name_field(name)?;
        match &self.0 {
            DeviceImpl::Kernel(fd) => Ok(Session::from_kernel_fd(
                sys::luo_create_session(fd.as_fd(), &field).map_err(Error::from_io)?,
            )),
            DeviceImpl::User(d) => Ok(Session::from_user(d.create_session(name)?)),
        }
    }

    /// RETRIEVE_SESSION: the incoming session of that name. `ENOENT` if there is none (or it
    /// was closed), `EINVAL` if it was already retrieved.
    pub fn retrieve_session(&self, name: &str) -> Result<Session> {
        let field = name_field(name)?;
        match &self.0 {
            DeviceImpl::Kernel(fd) => Ok(Session::from_kernel_fd(
                sys::luo_retrieve_session(fd.as_fd(), &field).map_err(Error::from_io)?,
            )),
            DeviceImpl::User(d) => Ok(Session::from_user(d.retrieve_session(name)?)),
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({})", self.backend().as_str())
    }
}

/// A LUO session. Closing the last handle of an outgoing session unpreserves its files;
/// closing the last handle of an incoming one finishes it (files never retrieved are lost).
/// With luod, luod holds a handle of its own, so a client's handle may go at any time.
pub struct Session(SessionImpl);

enum SessionImpl {
    Kernel(OwnedFd),
    User(backend_user::SessionFd),
    Channel(Arc<luod::Channel>),
}

impl Session {
    /// Wraps a LUO session fd obtained elsewhere (luod, systemd's fd store, a parent process).
    pub fn from_kernel_fd(fd: OwnedFd) -> Self {
        Session(SessionImpl::Kernel(fd))
    }

    /// Wraps an in-process backend session.
    pub fn from_user(s: backend_user::SessionFd) -> Self {
        Session(SessionImpl::User(s))
    }

    pub(crate) fn from_channel(c: luod::Channel) -> Self {
        Session(SessionImpl::Channel(Arc::new(c)))
    }

    /// The kernel session fd, if this is one (to poll, or to pass on).
    pub fn kernel_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.0 {
            SessionImpl::Kernel(fd) => Some(fd.as_fd()),
            _ => None,
        }
    }

    /// The in-process backend session, if this is one.
    pub fn user_session(&self) -> Option<&backend_user::SessionFd> {
        match &self.0 {
            SessionImpl::User(s) => Some(s),
            _ => None,
        }
    }

    /// Files currently in the session, where it can be known without the kernel's help (the
    /// in-process backend); `None` otherwise.
    pub fn file_count(&self) -> Option<usize> {
        match &self.0 {
            SessionImpl::User(s) => Some(s.session().file_count()),
            _ => None,
        }
    }

    /// Another handle to the same session (`dup` for a kernel fd).
    pub fn try_clone(&self) -> Result<Session> {
        Ok(Session(match &self.0 {
            SessionImpl::Kernel(fd) => SessionImpl::Kernel(fd.try_clone().map_err(Error::from_io)?),
            SessionImpl::User(s) => SessionImpl::User(s.clone()),
            SessionImpl::Channel(c) => SessionImpl::Channel(c.clone()),
        }))
    }

    /// PRESERVE_FD (outgoing sessions): `fd`'s file will be in the next kernel under `token`.
    /// `EEXIST` for a token in use, `EBUSY` for a file already preserved, `ENOENT` for a file no
    /// handler takes (LUO preserves memfds), `EINVAL` on an incoming session.
    pub fn preserve_fd(&self, fd: impl AsFd, token: u64) -> Result<()> {
        match &self.0 {
            SessionImpl::Kernel(s) => {
                sys::luo_preserve_fd(s.as_fd(), fd.as_fd(), token).map_err(Error::from_io)
            }
            SessionImpl::User(s) => Ok(s.preserve_fd(fd.as_fd(), token)?),
            SessionImpl::Channel(c) => c.preserve_fd(fd.as_fd(), token),
        }
    }

    /// RETRIEVE_FD (incoming sessions): the file preserved under `token`, as a new
    /// close-on-exec fd. `ENOENT` for an unknown token, `EINVAL` on an outgoing session.
    pub fn retrieve_fd(&self, token: u64) -> Result<OwnedFd> {
        match &self.0 {
            SessionImpl::Kernel(s) => {
                sys::luo_retrieve_fd(s.as_fd(), token).map_err(Error::from_io)
            }
            SessionImpl::User(s) => Ok(s.retrieve_fd(token)?),
            SessionImpl::Channel(c) => c.retrieve_fd(token),
        }
    }

    /// FINISH (incoming sessions): the previous kernel's state for these files is released;
    /// retrieved files stay usable. `EBUSY` if a handler is not ready; may be repeated.
    pub fn finish(&self) -> Result<()> {
        match &self.0 {
            SessionImpl::Kernel(s) => sys::luo_finish(s.as_fd()).map_err(Error::from_io),
            SessionImpl::User(s) => Ok(s.finish()?),
            SessionImpl::Channel(c) => c.finish(),
        }
    }

    /// GET_NAME: the kernel-visible name (through luod, `"<uid>/<name>"`).
    pub fn name(&self) -> Result<String> {
        match &self.0 {
            SessionImpl::Kernel(s) => Ok(name_from_field(
                &sys::luo_get_name(s.as_fd()).map_err(Error::from_io)?,
            )),
            SessionImpl::User(s) => Ok(s.get_name()?),
            SessionImpl::Channel(c) => c.name(),
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.0 {
            SessionImpl::Kernel(_) => "kernel",
            SessionImpl::User(_) => "in-process",
            SessionImpl::Channel(_) => "luod channel",
        };
        write!(f, "Session({kind}, {:?})", self.name().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    fn memfd(data: &[u8]) -> std::fs::File {
        let fd = backend_user::sys::memfd_create(c"t", libc::MFD_CLOEXEC).unwrap();
        let mut f = std::fs::File::from(fd);
        f.write_all(data).unwrap();
        f
    }

    #[test]
    fn in_process_backend_through_the_client_api() {
        let lu = backend_user::LiveUpdate::new().unwrap();
        luo_handlers::MemfdHandler::register(&lu).unwrap();
        let dev = Device::in_process(&lu).unwrap();
        assert_eq!(
            Device::in_process(&lu).unwrap_err().errno(),
            luo_core::errno::EBUSY
        );
        let s = dev.create_session("vm").unwrap();
        assert_eq!(s.name().unwrap(), "vm");
        assert_eq!(
            dev.create_session("vm").unwrap_err().errno(),
            luo_core::errno::EEXIST
        );
        for bad in ["", "a\0b", &"x".repeat(64)] {
            assert_eq!(
                dev.create_session(bad).unwrap_err().errno(),
                luo_core::errno::EINVAL,
                "{bad:?}"
            );
        }
        let f = memfd(b"guest ram");
        s.preserve_fd(&f, 3).unwrap();
        assert_eq!(
            s.preserve_fd(&f, 3).unwrap_err().errno(),
            luo_core::errno::EEXIST
        );
        assert_eq!(s.file_count(), Some(1));
        assert_eq!(
            s.retrieve_fd(3).unwrap_err().errno(),
            luo_core::errno::EINVAL
        );
        let null = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(
            s.preserve_fd(&null, 4).unwrap_err().errno(),
            luo_core::errno::ENOENT
        );
        drop((f, dev));
        let handover = lu.reboot_and_abandon().unwrap();

        let lu2 = backend_user::LiveUpdate::boot(&handover).unwrap();
        luo_handlers::MemfdHandler::register(&lu2).unwrap();
        let dev2 = Device::in_process(&lu2).unwrap();
        let s2 = dev2.retrieve_session("vm").unwrap();
        assert_eq!(
            dev2.retrieve_session("vm").unwrap_err().errno(),
            luo_core::errno::EINVAL
        );
        let mut f2 = std::fs::File::from(s2.retrieve_fd(3).unwrap());
        let mut buf = String::new();
        f2.seek(SeekFrom::Start(0)).unwrap();
        f2.read_to_string(&mut buf).unwrap();
        assert_eq!(buf, "guest ram");
        assert_eq!(
            s2.retrieve_fd(9).unwrap_err().errno(),
            luo_core::errno::ENOENT
        );
        s2.finish().unwrap();
        s2.finish().unwrap();
        let e = s2.preserve_fd(&f2, 1).unwrap_err();
        assert_eq!(e.errno(), luo_core::errno::EINVAL);
        assert!(e.to_string().starts_with("EINVAL"), "{e}");
    }

    #[test]
    fn kernel_device_absent_is_enoent() {
        let e = Device::open_path("/nonexistent/liveupdate").unwrap_err();
        assert_eq!(e.errno(), luo_core::errno::ENOENT);
    }
}
