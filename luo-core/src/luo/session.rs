//! The data model: sessions, their file sets, and the two session tables.
//!
//! A session is one allocation (its head, and its files behind its mutex) shared by the tables
//! and the fds that refer to it. Nothing here takes the phase or a table lock: the callers hold
//! them, in the lock order `luo/mod.rs` documents.

use super::serialize::padded_span;
use crate::abi::{LuoFileSer, LuoSessionSer, SessionName, SESSION_NAME_LEN};
use crate::block::BlockSet;
use crate::errno::{Error, Result};
use crate::platform::{OrdMap, PVec, Platform, Preserved, RetrieveStatus, Runtime, SharedLocked};
use crate::uapi::Direction;

/// A session handle, shared between the LUO tables and the fds that refer to it.
pub type SessionRef<P> = Session<P>;

/// One preserved (outgoing) or handed-over (incoming) file.
pub(super) struct FileEntry<P: Platform> {
    pub(super) hkey: usize,
    pub(super) handler: P::Handler,
    /// LUO's own reference: the preserved file, or the retrieved one.
    pub(super) file: Option<P::File>,
    pub(super) state: Preserved,
    pub(super) token: u64,
    pub(super) status: RetrieveStatus,
    /// Identity inserted into the global "preserved" set while it is held.
    pub(super) id: Option<u64>,
}

/// The files of one session (opaque outside luo-core; public only because backends name the
/// type of a session's allocation).
///
/// Files are only ever appended (preserve, deserialize) and removed from the end (close,
/// finish, rollback: newest first), so preservation order is a vector: no allocation per file
/// beyond the token index, and walks are slice walks.
pub struct FileSet<P: Platform> {
    /// Preservation (FIFO) order.
    pub(super) files: P::Vec<FileEntry<P>>,
    /// Token to index in `files`.
    pub(super) by_token: P::Map<u64, usize>,
    /// Pages reserved for this session's file chain (outgoing only).
    pub(super) blocks: BlockSet<P, LuoFileSer>,
    /// Set by release: the session is gone from the tables and takes no more files.
    pub(super) closed: bool,
    /// Outgoing: the session's slot in the creation order (`Outgoing::order`), kept here so
    /// that closing and compacting need no name lookup. Written under the outgoing lock.
    pub(super) slot: usize,
}

impl<P: Platform> FileSet<P> {
    pub(super) fn new() -> Self {
        FileSet {
            files: Default::default(),
            by_token: Default::default(),
            blocks: BlockSet::new(),
            closed: false,
            slot: 0,
        }
    }

    /// Appends; cannot fail after [`FileSet::reserve_one`] succeeded.
    pub(super) fn insert(&mut self, entry: FileEntry<P>) -> Result {
        let token = entry.token;
        self.by_token.try_insert(token, self.files.len())?;
        if self.files.try_push(entry).is_err() {
            self.by_token.remove(&token);
            return Err(Error::NoMemory);
        }
        Ok(())
    }

    /// Makes room for one more file.
    pub(super) fn reserve_one(&mut self) -> Result {
        self.by_token.try_reserve()?;
        self.files.try_reserve(1)?;
        Ok(())
    }

    pub(super) fn pop_last(&mut self) -> Option<FileEntry<P>> {
        let entry = self.files.pop()?;
        self.by_token.remove(&entry.token);
        Some(entry)
    }
}

/// What a session is besides its files: its name and direction, fixed at creation.
pub struct SessionHead {
    pub(crate) name: SessionName,
    /// The name's field up to and including its NUL, rounded up to 8 bytes: what
    /// serialization has to write into a zeroed entry.
    pub(super) name_span: usize,
    pub(crate) dir: Direction,
}

/// The guard of a session's files.
pub(super) type FilesGuard<'a, P> = <<P as Runtime>::Shared<SessionHead, FileSet<P>> as SharedLocked<
    SessionHead,
    FileSet<P>,
>>::Guard<'a>;

/// A session: a name and a set of files, in one direction. A cheap handle (a reference
/// count); the head and the files behind the session's mutex are one allocation.
pub struct Session<P: Platform>(P::Shared<SessionHead, FileSet<P>>);

impl<P: Platform> Clone for Session<P> {
    fn clone(&self) -> Self {
        Session(self.0.clone())
    }
}

impl<P: Platform> core::ops::Deref for Session<P> {
    type Target = SessionHead;

    fn deref(&self) -> &SessionHead {
        &self.0
    }
}

impl<P: Platform> Session<P> {
    pub(super) fn try_new(name: SessionName, dir: Direction) -> Result<Self> {
        let name_span = padded_span(name.as_bytes().len(), SESSION_NAME_LEN);
        let head = SessionHead {
            name,
            name_span,
            dir,
        };
        let shared = P::Shared::try_new(head, FileSet::new())?;
        Ok(Session(shared))
    }

    /// Locks the session's files.
    pub(super) fn files(&self) -> FilesGuard<'_, P> {
        self.0.lock()
    }

    /// True when both handles refer to the same session.
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        <P::Shared<SessionHead, FileSet<P>> as SharedLocked<_, _>>::ptr_eq(&a.0, &b.0)
    }

    /// The platform's shared object, for a backend that stores it as a raw pointer (a file's
    /// private data).
    pub fn into_shared(self) -> P::Shared<SessionHead, FileSet<P>> {
        self.0
    }

    /// The handle back from [`Session::into_shared`].
    pub fn from_shared(shared: P::Shared<SessionHead, FileSet<P>>) -> Self {
        Session(shared)
    }

    /// The session's name.
    pub fn name(&self) -> &SessionName {
        &self.0.name
    }

    /// Outgoing (created here) or incoming (retrieved from the previous kernel).
    pub fn direction(&self) -> Direction {
        self.0.dir
    }

    /// Number of files currently in the session.
    pub fn file_count(&self) -> usize {
        self.files().files.len()
    }

    /// Tokens of the files in preservation order.
    pub fn tokens(&self, mut f: impl FnMut(u64)) {
        let set = self.files();
        for e in set.files.as_slice() {
            f(e.token);
        }
    }
}

/// Outgoing sessions: unique names, creation order, and their serialization blocks.
///
/// One map node per session (its name), as the C core has one list node: creation order is a
/// vector of slots, each session's slot index kept in its file set. A closed session leaves an
/// empty slot; the slots are compacted in place when more than half are empty, so walks stay
/// proportional to the live sessions and closing never allocates. Lock order: the outgoing
/// lock, then a session's files.
pub(super) struct Outgoing<P: Platform> {
    pub(super) by_name: P::Map<SessionName, ()>,
    pub(super) order: P::Vec<Option<SessionRef<P>>>,
    pub(super) blocks: BlockSet<P, LuoSessionSer>,
}

impl<P: Platform> Outgoing<P> {
    /// Live sessions.
    pub(super) fn len(&self) -> usize {
        self.by_name.len()
    }

    /// The shortest prefix of the slots that holds the first `n` live sessions.
    pub(super) fn first_live(&self, n: usize) -> &[Option<SessionRef<P>>] {
        let slots = self.order.as_slice();
        let mut seen = 0;
        for (i, slot) in slots.iter().enumerate() {
            if seen == n {
                return &slots[..i];
            }
            if slot.is_some() {
                seen += 1;
            }
        }
        slots
    }

    /// Removes `s` if it is the session of its name here; true if it was.
    pub(super) fn remove(&mut self, s: &SessionRef<P>) -> bool {
        let index = s.files().slot;
        match self.order.as_mut_slice().get_mut(index) {
            Some(slot) if slot.as_ref().is_some_and(|o| Session::ptr_eq(o, s)) => *slot = None,
            _ => return false,
        }
        self.by_name.remove(&s.name);
        if self.order.len() > 16 && self.order.len() > 2 * self.by_name.len() {
            self.compact();
        }
        true
    }

    /// Moves the live slots to the front, in order, and renumbers them.
    fn compact(&mut self) {
        let slots = self.order.as_mut_slice();
        let mut live = 0;
        for i in 0..slots.len() {
            if slots[i].is_some() {
                if i != live {
                    slots.swap(live, i);
                    if let Some(s) = &slots[live] {
                        s.files().slot = live;
                    }
                }
                live += 1;
            }
        }
        while self.order.len() > live {
            self.order.pop();
        }
    }
}

/// An incoming session and whether an fd for it exists.
pub(super) struct IncomingSlot<P: Platform> {
    pub(super) session: SessionRef<P>,
    pub(super) retrieved: bool,
}
