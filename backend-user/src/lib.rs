//! backend-user: luo-core as a library for a process, with `/dev/liveupdate`'s semantics.
//!
//! [`LiveUpdate`] plays the kernel: it owns the orchestrator and the handover memory. Its API
//! mirrors the device one-to-one: [`LiveUpdate::open`] is `open("/dev/liveupdate")` (exclusive),
//! [`Device::create_session`]/[`Device::retrieve_session`] are the two device ioctls,
//! [`SessionFd`] is a session fd (closing the last clone is `release`), and the raw
//! [`Device::ioctl`]/[`SessionFd::ioctl`] take the exact uAPI structs as bytes. What the kernel
//! does at kexec is [`LiveUpdate::reboot`] (freeze and serialize into a sealed memfd that survives
//! exec) and at boot [`LiveUpdate::boot`] (restore from that memfd).
//!
//! Differences from the kernel, on purpose: after a successful reboot the kernel blocks every
//! later LUO call until the kexec; a process cannot wait for a kexec that never comes, so calls
//! fail with `ESHUTDOWN` instead. Session fds hold a real fd number (a `/dev/null` placeholder)
//! so `RLIMIT_NOFILE` gives `EMFILE` exactly where the kernel would.

pub mod memory;
pub mod next_image;
mod platform;
pub mod sys;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use luo_core::dispatch::FdTable;
use luo_core::uapi::{SliceArg, LIVEUPDATE_IOCTL_CREATE_SESSION};
use luo_core::{Error, Result, SessionRef};

pub use memory::{HandoverFileError, Memory};
pub use platform::{FlbRef, HandlerRef, UserPlatform};

/// The orchestrator of this process.
pub type UserLuo = luo_core::Luo<UserPlatform>;

/// A process's live-update state: the "kernel" side.
#[derive(Clone)]
pub struct LiveUpdate {
    luo: Arc<UserLuo>,
    mem: Arc<Memory>,
}

impl LiveUpdate {
    /// A cold boot: no incoming state.
    pub fn new() -> Result<Self> {
        Self::with_memory(Arc::new(Memory::new()))
    }

    /// Boots from a handover memfd written by [`LiveUpdate::reboot`] in the previous image.
    ///
    /// A file that is not a handover image at all is an error here; a handover image whose LUO
    /// state is malformed boots fine and is refused by the first [`LiveUpdate::open`] (`EIO`),
    /// exactly as the kernel does.
    pub fn boot(handover: &OwnedFd) -> std::result::Result<Self, HandoverFileError> {
        let mem = Memory::from_fd(handover)?;
        Self::with_memory(Arc::new(mem))
            .map_err(|e| HandoverFileError::Io(io::Error::from_raw_os_error(e.errno().get())))
    }

    /// Boots over the given memory (tests, fuzzing).
    pub fn with_memory(mem: Arc<Memory>) -> Result<Self> {
        let luo = luo_core::Luo::new(UserPlatform::new(mem.clone()), true)?;
        luo.start()?;
        Ok(LiveUpdate {
            luo: Arc::new(luo),
            mem,
        })
    }

    /// The orchestrator (for handler registration, FLB calls, inspection).
    pub fn luo(&self) -> &Arc<UserLuo> {
        &self.luo
    }

    /// `liveupdate_register_file_handler`.
    pub fn register_handler(&self, handler: HandlerRef) -> Result {
        self.luo.register_handler(&handler)
    }

    /// `liveupdate_register_flb`.
    pub fn register_flb(&self, handler: &HandlerRef, flb: FlbRef) -> Result {
        self.luo.register_flb(handler, &flb)
    }

    /// The handover memory (handlers allocate their own handover pages from it).
    pub fn memory(&self) -> &Arc<Memory> {
        &self.mem
    }

    /// `open("/dev/liveupdate")`: exclusive; the first open restores incoming sessions.
    pub fn open(&self) -> Result<Device> {
        self.luo.open()?;
        Ok(Device { lu: self.clone() })
    }

    /// What `reboot(LINUX_REBOOT_CMD_KEXEC)` does to LUO: freeze every preserved file and
    /// serialize, then hand the state over as a sealed memfd that stays open across exec.
    /// On a freeze failure nothing changes and the error is returned; the caller may retry.
    ///
    /// An image larger than the next image accepts ([`memory::MAX_HANDOVER_BYTES`]) is refused
    /// with `EFBIG` before anything is frozen: reboot allocates no page, so its size is known
    /// beforehand, and handing it over would lose every session at the next image's boot.
    pub fn reboot(&self) -> Result<OwnedFd> {
        let (len, max) = (self.mem.image_len(), self.mem.max_image());
        if len > max {
            self.mem.log(
                luo_core::Level::Error,
                format_args!(
                    "reboot refused: the handover image would be {len} bytes, more than the {max} \
                     the next image accepts; nothing was frozen"
                ),
            );
            return Err(Error::Platform(luo_core::errno::EFBIG));
        }
        self.luo.reboot()?;
        let fd = self
            .mem
            .to_memfd()
            .map_err(|e| Error::Platform(errno_of(&e)))?;
        sys::set_cloexec(fd.as_fd(), false).map_err(|e| Error::Platform(errno_of(&e)))?;
        Ok(fd)
    }
}

impl LiveUpdate {
    /// [`LiveUpdate::reboot`], then abandons this image's state without running destructors,
    /// as `exec` does: the fds preserved files keep (now without `FD_CLOEXEC`) stay open and
    /// owned by nobody, ready for the next image to adopt. For in-process tests of a reboot.
    pub fn reboot_and_abandon(self) -> Result<OwnedFd> {
        let fd = self.reboot()?;
        std::mem::forget(self);
        Ok(fd)
    }
}

/// The errno of an io::Error (EIO when it has none).
pub fn errno_of(e: &io::Error) -> luo_core::Errno {
    luo_core::Errno::new(e.raw_os_error().unwrap_or(libc::EIO))
}

/// An open `/dev/liveupdate`. Dropping it is the last `close()`: sessions are unaffected.
pub struct Device {
    lu: LiveUpdate,
}

impl Device {
    /// CREATE_SESSION.
    pub fn create_session(&self, name: &str) -> Result<SessionFd> {
        let mut req = luo_core::uapi::CreateSession {
            size: 72,
            fd: -1,
            name: [0; 64],
        };
        let n = name.len().min(64);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        self.session_request(LIVEUPDATE_IOCTL_CREATE_SESSION, req)
    }

    /// RETRIEVE_SESSION.
    pub fn retrieve_session(&self, name: &str) -> Result<SessionFd> {
        let mut req = luo_core::uapi::RetrieveSession {
            size: 72,
            fd: -1,
            name: [0; 64],
        };
        let n = name.len().min(64);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        self.session_request(luo_core::uapi::LIVEUPDATE_IOCTL_RETRIEVE_SESSION, req)
    }

    fn session_request(&self, cmd: u32, req: luo_core::uapi::CreateSession) -> Result<SessionFd> {
        let mut bytes = zerocopy::IntoBytes::as_bytes(&req).to_vec();
        match self.ioctl(cmd, &mut bytes)? {
            Installed::Session(s) => Ok(s),
            _ => Err(Error::Fault),
        }
    }

    /// A raw ioctl on the device, with the argument as the bytes of the uAPI struct (bytes past
    /// the end of `arg` fault, like unmapped memory).
    pub fn ioctl(&self, cmd: u32, arg: &mut [u8]) -> Result<Installed> {
        let mut fds = Fds::new(&self.lu);
        self.lu
            .luo
            .device_ioctl(cmd, &mut SliceArg(arg), &mut fds)?;
        Ok(fds.installed)
    }

    /// The process-wide state this device belongs to.
    pub fn live_update(&self) -> &LiveUpdate {
        &self.lu
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.lu.luo.close();
    }
}

/// What an ioctl created.
pub enum Installed {
    /// Nothing (PRESERVE_FD, FINISH, GET_NAME).
    Nothing,
    /// A session fd (CREATE_SESSION, RETRIEVE_SESSION).
    Session(SessionFd),
    /// A retrieved file (RETRIEVE_FD), installed at the fd number the reply carried.
    File(OwnedFd),
}

struct SessionFile {
    lu: LiveUpdate,
    session: SessionRef<UserPlatform>,
    /// Holds the session's fd number once installed.
    placeholder: std::sync::Mutex<Option<OwnedFd>>,
    /// Cleared when the file is discarded without release (a failed reply).
    live: std::sync::atomic::AtomicBool,
}

impl Drop for SessionFile {
    fn drop(&mut self) {
        if self.live.load(std::sync::atomic::Ordering::Acquire) {
            // The kernel ignores release errors too (a refused finish is logged by the core).
            let _ = self
                .lu
                .luo
                .begin()
                .and_then(|live| live.release_session(&self.session));
        }
    }
}

/// A session fd. Clones share one open file: the session is released when the last goes.
#[derive(Clone)]
pub struct SessionFd(Arc<SessionFile>);

impl SessionFd {
    /// The fd number this session occupies.
    pub fn raw_fd(&self) -> RawFd {
        self.0
            .placeholder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(-1, |fd| fd.as_raw_fd())
    }

    /// The session.
    pub fn session(&self) -> &SessionRef<UserPlatform> {
        &self.0.session
    }

    /// PRESERVE_FD.
    pub fn preserve_fd(&self, fd: BorrowedFd<'_>, token: u64) -> Result<()> {
        let req = luo_core::uapi::PreserveFd {
            size: 16,
            fd: fd.as_raw_fd(),
            token,
        };
        let mut bytes = zerocopy::IntoBytes::as_bytes(&req).to_vec();
        self.ioctl(luo_core::uapi::LIVEUPDATE_SESSION_PRESERVE_FD, &mut bytes)
            .map(|_| ())
    }

    /// RETRIEVE_FD: a new close-on-exec fd for the preserved file.
    pub fn retrieve_fd(&self, token: u64) -> Result<OwnedFd> {
        let req = luo_core::uapi::RetrieveFd {
            size: 16,
            fd: -1,
            token,
        };
        let mut bytes = zerocopy::IntoBytes::as_bytes(&req).to_vec();
        match self.ioctl(luo_core::uapi::LIVEUPDATE_SESSION_RETRIEVE_FD, &mut bytes)? {
            Installed::File(f) => Ok(f),
            _ => Err(Error::Fault),
        }
    }

    /// FINISH.
    pub fn finish(&self) -> Result<()> {
        let req = luo_core::uapi::Finish {
            size: 8,
            reserved: 0,
        };
        let mut bytes = zerocopy::IntoBytes::as_bytes(&req).to_vec();
        self.ioctl(luo_core::uapi::LIVEUPDATE_SESSION_FINISH, &mut bytes)
            .map(|_| ())
    }

    /// GET_NAME.
    pub fn get_name(&self) -> Result<String> {
        let req = luo_core::uapi::GetName {
            size: 72,
            reserved: 0,
            name: [0; 64],
        };
        let mut bytes = zerocopy::IntoBytes::as_bytes(&req).to_vec();
        self.ioctl(luo_core::uapi::LIVEUPDATE_SESSION_GET_NAME, &mut bytes)?;
        let name = &bytes[8..72];
        let len = name.iter().position(|&b| b == 0).unwrap_or(64);
        Ok(String::from_utf8_lossy(&name[..len]).into_owned())
    }

    /// A raw ioctl on the session fd.
    pub fn ioctl(&self, cmd: u32, arg: &mut [u8]) -> Result<Installed> {
        let mut fds = Fds::new(&self.0.lu);
        self.0
            .lu
            .luo
            .session_ioctl(&self.0.session, cmd, &mut SliceArg(arg), &mut fds)?;
        Ok(fds.installed)
    }
}

impl std::fmt::Debug for SessionFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SessionFd({}, {:?})",
            self.raw_fd(),
            self.0.session.name()
        )
    }
}

/// The process's fd table as the core sees it during one ioctl.
struct Fds<'a> {
    lu: &'a LiveUpdate,
    installed: Installed,
}

impl<'a> Fds<'a> {
    fn new(lu: &'a LiveUpdate) -> Self {
        Fds {
            lu,
            installed: Installed::Nothing,
        }
    }
}

impl FdTable<UserPlatform> for Fds<'_> {
    type Slot = OwnedFd;
    type SessionFile = SessionFd;

    fn reserve(&mut self) -> Result<OwnedFd> {
        sys::placeholder_fd().map_err(|e| match e.raw_os_error() {
            Some(libc::EMFILE) => Error::TooManyFds,
            Some(libc::ENFILE) => Error::FileTableFull,
            _ => Error::Platform(errno_of(&e)),
        })
    }

    fn slot_fd(&self, slot: &OwnedFd) -> i32 {
        slot.as_raw_fd()
    }

    fn session_file(&mut self, session: &SessionRef<UserPlatform>) -> Result<SessionFd> {
        Ok(SessionFd(Arc::new(SessionFile {
            lu: self.lu.clone(),
            session: session.clone(),
            placeholder: std::sync::Mutex::new(None),
            live: std::sync::atomic::AtomicBool::new(true),
        })))
    }

    fn discard_session_file(&mut self, file: SessionFd) {
        file.0
            .live
            .store(false, std::sync::atomic::Ordering::Release);
    }

    fn install_session(&mut self, slot: OwnedFd, file: SessionFd) {
        *file.0.placeholder.lock().unwrap_or_else(|e| e.into_inner()) = Some(slot);
        self.installed = Installed::Session(file);
    }

    fn install_file(&mut self, slot: OwnedFd, file: OwnedFd) {
        match sys::dup_onto(file.as_fd(), slot) {
            Ok(fd) => self.installed = Installed::File(fd),
            Err(_) => self.installed = Installed::File(file),
        }
    }

    fn fget(&mut self, fd: i32) -> Result<OwnedFd> {
        // LUO's reference to the file is an fd here (the kernel's `fget` needs none): a full fd
        // table is EMFILE, not a bad fd.
        sys::fget(fd).map_err(|e| match e.raw_os_error() {
            Some(libc::EMFILE) => Error::TooManyFds,
            Some(libc::ENFILE) => Error::FileTableFull,
            _ => Error::BadFd,
        })
    }
}
