//! The ioctl layer: decode (spec §2.4), execute, respond, with upstream's fd handling.
//!
//! New fds are made in two phases as upstream does: an fd number is reserved first (so a full
//! fd table gives `EMFILE` before anything else is looked at), the operation runs, the reply is
//! written, and only then is the file installed. A reservation that is not installed gives its
//! number back when it drops, so an error path only undoes the LUO operation: everything is
//! undone without side effects where upstream has them (B6), or kept where the spec keeps them
//! (a PRESERVE_FD reply fault leaves the file preserved).
//!
//! Every command runs as a method of [`Live`], the guard of the serialize lock, taken once per
//! ioctl after decoding (spec §2.4 step 7) and held until the reply is written, so an undo runs
//! under the same hold as the operation it undoes.

use crate::abi::SessionName;
use crate::errno::{Error, Result};
use crate::luo::{create_name, retrieve_name, Live, Luo, SessionRef};
use crate::platform::Platform;
use crate::uapi::{
    decode_device, decode_session, respond, CreateSession, DeviceRequest, GetName, SessionRequest,
    UserArg,
};

/// The caller's fd table, as the backend sees it.
pub trait FdTable<P: Platform> {
    /// A reserved fd number (`get_unused_fd_flags(O_CLOEXEC)`). Dropping it gives the number
    /// back (`put_unused_fd`, as Rust Binder's `FileDescriptorReservation` does); the
    /// `install_*` methods consume it.
    type Slot;
    /// A session file not yet installed.
    type SessionFile;
    /// Reserves an fd: `Error::TooManyFds` when the table is full.
    fn reserve(&mut self) -> Result<Self::Slot>;
    /// The number of a reserved fd.
    fn slot_fd(&self, slot: &Self::Slot) -> i32;
    /// Creates the file for a session (`anon_inode_getfile("[luo_session] <name>")`).
    fn session_file(&mut self, session: &SessionRef<P>) -> Result<Self::SessionFile>;
    /// Drops a session file that was never installed, *without* running its release: the
    /// caller undoes the session operation itself.
    fn discard_session_file(&mut self, file: Self::SessionFile);
    /// Installs a session file in a reserved slot (`fd_install`).
    fn install_session(&mut self, slot: Self::Slot, file: Self::SessionFile);
    /// Installs a retrieved file in a reserved slot.
    fn install_file(&mut self, slot: Self::Slot, file: P::File);
    /// Resolves a caller's fd (`fget`): `Error::BadFd` for closed, negative or `O_PATH` fds.
    fn fget(&mut self, fd: i32) -> Result<P::File>;
}

impl<P: Platform> Luo<P> {
    /// An ioctl on `/dev/liveupdate`. (Inline, as [`Luo::session_ioctl`].)
    #[inline]
    pub fn device_ioctl<F: FdTable<P>>(
        &self,
        cmd: u32,
        arg: &mut impl UserArg,
        fds: &mut F,
    ) -> Result {
        match decode_device(cmd, arg)? {
            // Nothing was preserved in a new session yet: closing it is the exact undo.
            DeviceRequest::Create(req) => self.new_session_fd(
                req,
                arg,
                fds,
                create_name,
                |live, name| live.create_session(name),
                |live, s| {
                    let _ = live.release_session(s);
                },
            ),
            DeviceRequest::Retrieve(req) => self.new_session_fd(
                req,
                arg,
                fds,
                retrieve_name,
                |live, name| live.retrieve_session(name),
                |live, s| live.unretrieve_session(s),
            ),
        }
    }

    /// CREATE and RETRIEVE share their fd handling: reserve, check the name, run `op`, make
    /// the file, reply, install; `undo` reverts `op` if a later step fails.
    fn new_session_fd<F: FdTable<P>>(
        &self,
        mut req: CreateSession,
        arg: &mut impl UserArg,
        fds: &mut F,
        name: impl FnOnce(&[u8; 64]) -> Result<SessionName>,
        op: impl FnOnce(&Live<'_, P>, &SessionName) -> Result<SessionRef<P>>,
        undo: impl FnOnce(&Live<'_, P>, &SessionRef<P>),
    ) -> Result {
        let slot = fds.reserve()?;
        let name = name(&req.name)?;
        let live = self.begin()?;
        let session = op(&live, &name)?;
        let file = match fds.session_file(&session) {
            Ok(f) => f,
            Err(e) => {
                undo(&live, &session);
                return Err(e);
            }
        };
        req.fd = fds.slot_fd(&slot);
        if let Err(e) = respond(arg, req.size, &req) {
            fds.discard_session_file(file);
            undo(&live, &session);
            return Err(e);
        }
        fds.install_session(slot, file);
        Ok(())
    }

    /// An ioctl on a session fd. (Inline: each backend calls it from one place, its file
    /// operation, which saves a call layer on every session ioctl.)
    #[inline]
    pub fn session_ioctl<F: FdTable<P>>(
        &self,
        session: &SessionRef<P>,
        cmd: u32,
        arg: &mut impl UserArg,
        fds: &mut F,
    ) -> Result {
        let request = decode_session(cmd, session.direction(), arg)?;
        // Upstream takes the serialize rwsem here, after decoding and before executing any
        // command (spec §2.4 step 7), and holds it while the command runs: once the state is
        // serialized every session command stops here, before its own checks (`reserved`,
        // fd reservation) and including GET_NAME.
        let live = self.begin()?;
        match request {
            SessionRequest::PreserveFd(req) => {
                live.preserve_fd(session, req.token, || fds.fget(req.fd))?;
                // A fault here leaves the file preserved, as upstream does (spec §2.5).
                respond(arg, req.size, &req)
            }
            SessionRequest::RetrieveFd(mut req) => {
                let slot = fds.reserve()?;
                let file = live.retrieve_fd(session, req.token)?;
                req.fd = fds.slot_fd(&slot);
                // On a fault the file stays retrieved in LUO; only the user's reference (and
                // the reservation) go.
                respond(arg, req.size, &req)?;
                fds.install_file(slot, file);
                Ok(())
            }
            SessionRequest::Finish(req) => {
                if req.reserved != 0 {
                    return Err(Error::ReservedNotZero);
                }
                live.finish(session)?;
                respond(arg, req.size, &req)
            }
            SessionRequest::GetName(req) => {
                if req.reserved != 0 {
                    return Err(Error::ReservedNotZero);
                }
                // strscpy: the name and its NUL. Upstream leaves the caller's bytes after the
                // NUL in place (B18); they are zeroed here so no stale bytes look like a name.
                let reply = GetName {
                    size: req.size,
                    reserved: 0,
                    name: *session.name().as_field(),
                };
                respond(arg, req.size, &reply)
            }
        }
    }
}
