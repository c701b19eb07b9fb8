//! The previous boot's state: the device's first open builds the incoming sessions from the
//! image validated at boot, and RETRIEVE_SESSION hands them out.
//!
//! Sessions are built at the first open rather than at boot because handlers register in
//! between; building is all or nothing, so a failed open leaves nothing half-restored.

use super::session::{FileEntry, Session, SessionObj, SessionRef, Sessions};
use super::{Live, Luo};
use crate::abi::{Compat, SessionName};
use crate::errno::{Error, HandoverError, Result};
use crate::image::Image;
use crate::platform::{
    FileHandler, PMutex, PRwLock, PVec, Platform, Preserved, RetrieveStatus, SharedIndex,
    SharedLocked,
};
use crate::uapi::Direction;

/// What the first open does with the incoming image.
pub(super) enum Incoming<P: Platform> {
    /// Cold boot or already consumed.
    None,
    /// Validated at boot; sessions are built at the first open (handlers register in between).
    Pending(Image<P>),
    /// Refused at boot; the first open reports it with `EIO`, later opens proceed without it.
    Refused(HandoverError),
}

/// The exclusive-open token and the one-time incoming work.
pub(super) struct Device<P: Platform> {
    pub(super) in_use: bool,
    pub(super) incoming: Incoming<P>,
}

impl<P: Platform> Luo<P> {
    /// Opens the device: exclusive (`EBUSY`), and the first open builds the incoming sessions.
    ///
    /// If the incoming state was refused at boot, this open fails with `EIO` once and later
    /// opens proceed with no incoming sessions, so the next update can still be prepared
    /// (upstream fails every open forever, spec §13 B5). If a preserved file's handler is not
    /// registered yet, the open fails with `EIO` and nothing is consumed: a later open, after
    /// the handler registers, builds the sessions.
    pub fn open(&self) -> Result {
        let mut dev = self.device.lock();
        if dev.in_use {
            return Err(Error::DeviceBusy);
        }
        match core::mem::replace(&mut dev.incoming, Incoming::None) {
            Incoming::None => {}
            Incoming::Refused(e) => {
                log!(
                    self.platform,
                    Error,
                    "incoming state was refused at boot: {e}"
                );
                return Err(Error::IncomingRefused);
            }
            Incoming::Pending(img) => {
                if let Err(e) = self.deserialize(&img) {
                    log!(
                        self.platform,
                        Error,
                        "cannot restore incoming sessions: {e}"
                    );
                    let keep = matches!(
                        e,
                        HandoverError::UnknownHandler { .. } | HandoverError::NoMemory
                    );
                    if keep {
                        dev.incoming = Incoming::Pending(img);
                    }
                    return Err(Error::IncomingRefused);
                }
            }
        }
        dev.in_use = true;
        Ok(())
    }

    /// Releases the device (the last reference to its file closed). Sessions are unaffected.
    pub fn close(&self) {
        self.device.lock().in_use = false;
    }

    /// Builds incoming sessions from the image; all or nothing.
    fn deserialize(&self, img: &Image<P>) -> Result<(), HandoverError> {
        let mut built = Sessions::<P>::default();
        let result = self.build_incoming(img, &mut built);
        if result.is_err() {
            // Undo owner pins and live counts taken for the partial result.
            for session in built.iter() {
                self.drop_incoming_files(session);
            }
            return result;
        }
        let mut table = self.incoming.write();
        core::mem::swap(&mut *table, &mut built);
        Ok(())
    }

    fn build_incoming(&self, img: &Image<P>, built: &mut Sessions<P>) -> Result<(), HandoverError> {
        for s in img.sessions.as_slice() {
            let failed = |e| restore_error(s.at, e);
            let session =
                Session::<P>::insert_new(built, s.name, Direction::Incoming).map_err(failed)?;
            // The documented order is session, then registry (as in `finish_files`), even
            // though nobody else can see this session yet: lockdep checks classes, not
            // instances.
            let mut set = session.lock();
            let reg = self.registry.read();
            for f in s.files.as_slice() {
                let (hkey, handler) = reg
                    .handler_by_compat(&f.compat)
                    .ok_or(HandoverError::UnknownHandler { at: f.at })?;
                if !handler.get_owner() {
                    return Err(HandoverError::UnknownHandler { at: f.at });
                }
                let entry = FileEntry::<P> {
                    hkey,
                    handler,
                    file: None,
                    state: Preserved {
                        data: f.data,
                        private: 0,
                    },
                    token: f.token,
                    status: RetrieveStatus::NotAttempted,
                    id: None,
                };
                let handler: P::Handler = entry.handler.clone();
                if let Err(e) = set.insert(entry) {
                    handler.put_owner();
                    return Err(failed(e));
                }
                if let Err(e) = self.refs.lock().live_inc(hkey) {
                    if let Some(entry) = set.pop_last() {
                        entry.handler.put_owner();
                    }
                    return Err(failed(e));
                }
            }
        }
        Ok(())
    }

    /// Drops the files of a session that never reached userspace (failed deserialization).
    fn drop_incoming_files(&self, s: &SessionObj<P>) {
        let mut set = s.lock();
        let mut refs = self.refs.lock();
        while let Some(e) = set.pop_last() {
            refs.live_dec(e.hkey);
            e.handler.put_owner();
        }
    }

    /// Calls `f(compatible, data)` for every file of the incoming image that awaits the first
    /// open, in handover order. Lets a backend protect what the previous image handed over
    /// before anyone retrieves it (the userspace memfd handler marks inherited fds
    /// close-on-exec, so files that are never retrieved do not leak into the next image).
    pub fn for_each_pending_incoming_file(&self, mut f: impl FnMut(&Compat, u64)) {
        let dev = self.device.lock();
        if let Incoming::Pending(img) = &dev.incoming {
            for s in img.sessions.as_slice() {
                for file in s.files.as_slice() {
                    f(&file.compat, file.data);
                }
            }
        }
    }
}

/// What a failure to build the incoming sessions says about the session entry at `at`.
/// Building meets only two errors: memory, and a name taken twice (which the parser refuses
/// before, so it cannot happen).
fn restore_error(at: u64, e: Error) -> HandoverError {
    match e {
        Error::NameExists => HandoverError::DuplicateSessionName { at },
        _ => HandoverError::NoMemory,
    }
}

/// RETRIEVE_SESSION's lookup key. An empty or unterminated name matches nothing (upstream does
/// not validate it): `NoSuchSession`, before the serialize lock, as every other miss.
#[inline]
pub fn retrieve_name(field: &[u8; 64]) -> Result<SessionName> {
    SessionName::from_field(field).map_err(|_| Error::NoSuchSession)
}

impl<P: Platform> Live<'_, P> {
    /// RETRIEVE_SESSION after the fd is reserved: exact name match among incoming sessions.
    pub fn retrieve_session(&self, name: &SessionName) -> Result<SessionRef<P>> {
        let table = self.luo.incoming.read();
        let session = table.get(name).ok_or(Error::NoSuchSession)?;
        let mut set = session.lock();
        if set.retrieved {
            return Err(Error::AlreadyRetrieved);
        }
        set.retrieved = true;
        Ok(Session::of(session))
    }

    /// Undoes a RETRIEVE_SESSION whose reply could not be written: the session goes back to
    /// the unretrieved state with nothing finished (upstream finishes and frees it: bug B6).
    pub fn unretrieve_session(&self, s: &SessionRef<P>) {
        s.files().retrieved = false;
    }
}
