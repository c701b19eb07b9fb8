//! The session and file operations: what CREATE_SESSION, PRESERVE_FD, RETRIEVE_FD and FINISH
//! do, and what the last close of a session fd undoes.
//!
//! The operations are methods of [`Live`]: the serialize lock is taken once, by whoever begins
//! the operation ([`Luo::begin`]; for an ioctl, [`dispatch`](crate::dispatch) after decoding),
//! and held while it runs. The file-set walks they share (`unpreserve_all`, `finish_files`) are
//! on [`Luo`], which owns the tables and locks.

use super::session::{FileEntry, FileSet, Session, SessionRef};
use super::{Live, Luo};
use crate::abi::SessionName;
use crate::errno::{Error, Result};
use crate::platform::{
    FileHandler, OrdMap, PMutex, PRwLock, PVec, Platform, RetrieveStatus, SharedIndex,
};
use crate::uapi::Direction;

/// CREATE_SESSION's name rules (spec §2.5): 1 to 63 bytes and a NUL. Checked before the
/// serialize lock is taken, as upstream does.
#[inline]
pub fn create_name(field: &[u8; 64]) -> Result<SessionName> {
    SessionName::from_field(field).map_err(|e| match e {
        crate::abi::NameError::Empty => Error::NameEmpty,
        crate::abi::NameError::Unterminated => Error::NameUnterminated,
    })
}

impl<P: Platform> Live<'_, P> {
    /// CREATE_SESSION after the fd is reserved (spec §2.5): a unique insert.
    pub fn create_session(&self, name: &SessionName) -> Result<SessionRef<P>> {
        self.outgoing_ready()?;
        let luo = self.luo;
        let mut out = luo.outgoing.write();
        let count = out.sessions.len();
        // The name is checked before the block set grows (upstream grows first and leaks an
        // empty block on EEXIST, which panics the next kernel: bug B1).
        let session = Session::of(Session::<P>::insert_new(
            &mut out.sessions,
            *name,
            Direction::Outgoing,
        )?);
        if let Err(e) = out.blocks.grow(&luo.platform, count + 1) {
            out.sessions.remove(session.obj());
            return Err(e);
        }
        Ok(session)
    }

    /// The last fd of a session closed.
    ///
    /// Outgoing: every file is unpreserved, newest first, and the session is gone. Incoming:
    /// an implicit FINISH; if a `can_finish` refuses, the session goes back to the unretrieved
    /// state so it can be retrieved and finished later (upstream leaks it forever: bug B7).
    ///
    /// (Always inline: a backend's release of a session file is its one caller on the hot
    /// path, and a close is short enough that a call layer is a tenth of it.)
    #[inline(always)]
    pub fn release_session(&self, s: &SessionRef<P>) -> Result {
        match s.dir {
            Direction::Outgoing => self.release_outgoing(s),
            Direction::Incoming => self.release_incoming(s),
        }
    }

    /// Inline, with the unpreserving out of line: most sessions closed hold no file, and the
    /// close of an empty one is then a short path in the backend's release.
    #[inline(always)]
    fn release_outgoing(&self, s: &SessionRef<P>) -> Result {
        let luo = self.luo;
        // Nobody else holds this session (its last fd closed, and reboot excludes us through
        // the phase lock), so callbacks run without the table lock.
        {
            let mut set = s.files();
            if set.closed {
                return Err(Error::BadFd);
            }
            set.closed = true;
            if !set.files.is_empty() || !set.blocks.is_empty() {
                luo.unpreserve_all(&mut set);
            }
        }
        let mut out = luo.outgoing.write();
        if out.sessions.remove(s.obj()) {
            let count = out.sessions.len();
            out.blocks.shrink(&luo.platform, count);
        }
        Ok(())
    }

    /// Inline, with the finishing out of line, as [`Live::release_outgoing`].
    #[inline(always)]
    fn release_incoming(&self, s: &SessionRef<P>) -> Result {
        let luo = self.luo;
        {
            let mut set = s.files();
            if set.closed {
                return Err(Error::BadFd);
            }
            // Most incoming sessions closed hold no file (FINISHed before, or empty).
            if !set.files.is_empty() {
                if let Err(e) = luo.finish_files(&mut set) {
                    // A refused finish puts the session back for a later retrieve (B7).
                    set.retrieved = false;
                    drop(set);
                    log!(
                        luo.platform,
                        Warn,
                        "Unable to finish session [{}] on release",
                        s.name
                    );
                    return Err(e);
                }
            }
            set.closed = true;
        }
        luo.incoming.write().remove(s.obj());
        Ok(())
    }

    /// PRESERVE_FD (spec §4.2), with upstream's check order. `fget` resolves the fd; it runs
    /// after the token check and the block reservation, as upstream's `fget` does.
    pub fn preserve_fd(
        &self,
        s: &SessionRef<P>,
        token: u64,
        fget: impl FnOnce() -> Result<P::File>,
    ) -> Result {
        if s.dir != Direction::Outgoing {
            return Err(Error::WrongDirection);
        }
        self.outgoing_ready()?;
        let luo = self.luo;
        let mut set = s.files();
        if set.closed {
            return Err(Error::BadFd);
        }
        if set.by_token.contains(&token) {
            return Err(Error::TokenInUse);
        }
        let count = set.files.len();
        set.blocks.grow(&luo.platform, count + 1)?;
        let r = luo.preserve_locked(&mut set, token, fget);
        if r.is_err() {
            set.blocks.shrink(&luo.platform, count);
        }
        r
    }

    /// RETRIEVE_FD (spec §4.4): returns a new reference to the file for a new fd.
    pub fn retrieve_fd(&self, s: &SessionRef<P>, token: u64) -> Result<P::File> {
        if s.dir != Direction::Incoming {
            return Err(Error::WrongDirection);
        }
        let luo = self.luo;
        let mut set = s.files();
        if set.closed {
            return Err(Error::BadFd);
        }
        let index = *set.by_token.get(&token).ok_or(Error::NoSuchToken)?;
        let entry = set
            .files
            .as_mut_slice()
            .get_mut(index)
            .ok_or(Error::NoSuchToken)?;
        match entry.status {
            RetrieveStatus::Failed(e) => return Err(Error::Handler(e)),
            RetrieveStatus::Retrieved => {
                let file = entry.file.as_ref().ok_or(Error::NoSuchToken)?;
                return P::dup_file(file);
            }
            RetrieveStatus::NotAttempted => {}
        }
        let file = match entry.handler.retrieve(entry.state.data) {
            Ok(file) => file,
            Err(e) => {
                entry.status = RetrieveStatus::Failed(e);
                return Err(Error::Handler(e));
            }
        };
        let id = entry.handler.get_id(&file);
        match luo.ids.lock().try_insert(id, ()) {
            Ok(None) => entry.id = Some(id),
            Ok(Some(())) => log!(
                luo.platform,
                Warn,
                "retrieved file identity {id:#x} is already in use"
            ),
            Err(_) => log!(luo.platform, Warn, "cannot track retrieved file {id:#x}"),
        }
        // Record the file before making the caller's reference: the handler has consumed its
        // handover state, so if that reference cannot be made (no fd left) the file must stay
        // retrieved, for the next RETRIEVE_FD to hand out (upstream's `get_file` cannot fail).
        let file = entry.file.insert(file);
        entry.status = RetrieveStatus::Retrieved;
        P::dup_file(file)
    }

    /// FINISH (spec §4.5): `can_finish` on every file (FIFO), then `finish` (LIFO).
    #[inline]
    pub fn finish(&self, s: &SessionRef<P>) -> Result {
        if s.dir != Direction::Incoming {
            return Err(Error::WrongDirection);
        }
        let mut set = s.files();
        if set.closed {
            return Err(Error::BadFd);
        }
        if set.files.is_empty() {
            return Ok(());
        }
        self.luo.finish_files(&mut set)
    }
}

impl<P: Platform> Luo<P> {
    /// Unpreserves every file, newest first, and frees the session's block pages.
    #[inline(never)]
    fn unpreserve_all(&self, set: &mut FileSet<P>) {
        while let Some(e) = set.pop_last() {
            if let Some(file) = e.file.as_ref() {
                e.handler.unpreserve(file, e.state);
            }
            {
                let reg = self.registry.read();
                let mut refs = self.refs.lock();
                refs.file_unpreserve(&reg, e.hkey);
                refs.live_dec(e.hkey);
            }
            if let Some(id) = e.id {
                self.ids.lock().remove(&id);
            }
            e.handler.put_owner();
            let n = set.files.len();
            set.blocks.shrink(&self.platform, n);
            // `e.file` (LUO's reference) drops here.
        }
        set.blocks.destroy(&self.platform);
    }

    fn preserve_locked(
        &self,
        set: &mut FileSet<P>,
        token: u64,
        fget: impl FnOnce() -> Result<P::File>,
    ) -> Result {
        let file = fget()?;
        let reg = self.registry.read();
        let (hkey, handler) = reg.find_handler(&file).ok_or(Error::NoHandler)?;
        if !handler.get_owner() {
            return Err(Error::NoHandler);
        }
        let id = handler.get_id(&file);
        let undo_owner = |e: Error| {
            handler.put_owner();
            Err(e)
        };
        match self.ids.lock().try_insert(id, ()) {
            Ok(None) => {}
            Ok(Some(())) => return undo_owner(Error::AlreadyPreserved),
            Err(_) => return undo_owner(Error::NoMemory),
        }
        let undo_id = |e: Error| {
            self.ids.lock().remove(&id);
            undo_owner(e)
        };
        {
            let mut refs = self.refs.lock();
            if let Err(e) = refs.file_preserve(&reg, hkey) {
                drop(refs);
                return undo_id(e);
            }
            if let Err(e) = refs.live_inc(hkey) {
                refs.file_unpreserve(&reg, hkey);
                drop(refs);
                return undo_id(e);
            }
        }
        let undo_flb = |e: Error| {
            let mut refs = self.refs.lock();
            refs.live_dec(hkey);
            refs.file_unpreserve(&reg, hkey);
            drop(refs);
            undo_id(e)
        };
        // Reserve the map slots first: once `preserve` ran, recording the file cannot fail.
        if set.reserve_one().is_err() {
            return undo_flb(Error::NoMemory);
        }
        let state = match handler.preserve(&file) {
            Ok(state) => state,
            Err(e) => return undo_flb(Error::Handler(e)),
        };
        let entry = FileEntry::<P> {
            hkey,
            handler: handler.clone(),
            file: Some(file),
            state,
            token,
            status: RetrieveStatus::NotAttempted,
            id: Some(id),
        };
        set.insert(entry)
    }

    fn finish_files(&self, set: &mut FileSet<P>) -> Result {
        for e in set.files.as_slice() {
            let file = if e.status == RetrieveStatus::Retrieved {
                e.file.as_ref()
            } else {
                None
            };
            if !e.handler.can_finish(file, e.state.data, e.status) {
                return Err(Error::FinishRefused);
            }
        }
        while let Some(e) = set.pop_last() {
            let file = if e.status == RetrieveStatus::Retrieved {
                e.file.as_ref()
            } else {
                None
            };
            e.handler.finish(file, e.state.data, e.status);
            {
                let reg = self.registry.read();
                let mut refs = self.refs.lock();
                refs.file_finish(&self.platform, &reg, e.hkey);
                refs.live_dec(e.hkey);
            }
            if let Some(id) = e.id {
                self.ids.lock().remove(&id);
            }
            e.handler.put_owner();
        }
        Ok(())
    }
}
