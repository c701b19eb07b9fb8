//! The data model: sessions, their file sets, and the two session tables.
//!
//! A session is one allocation (its head, and its files behind its mutex) shared by the tables
//! and the fds that refer to it. Nothing here takes the phase or a table lock: the callers hold
//! them, in the lock order `luo/mod.rs` documents.

use super::serialize::padded_span;
use crate::abi::{LuoFileSer, LuoSessionSer, SessionName, SESSION_NAME_LEN};
use crate::block::BlockSet;
use crate::errno::{Error, Result};
use crate::platform::{
    IndexKey, InsertError, OrdMap, PVec, Platform, Preserved, RetrieveStatus, Runtime, SharedIndex,
    SharedLocked,
};
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
    /// Incoming: an fd for the session exists (RETRIEVE_SESSION succeeded and it was not
    /// released, or released with a refused finish, since).
    pub(super) retrieved: bool,
}

impl<P: Platform> FileSet<P> {
    pub(super) fn new() -> Self {
        FileSet {
            files: Default::default(),
            by_token: Default::default(),
            blocks: BlockSet::new(),
            closed: false,
            retrieved: false,
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

    #[inline]
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

impl IndexKey for SessionHead {
    type Key = SessionName;

    #[inline]
    fn index_key(&self) -> &SessionName {
        &self.name
    }

    #[inline]
    fn key_bytes(name: &SessionName) -> &[u8] {
        name.significant()
    }
}

/// A session's allocation, as the platform holds it.
pub(super) type SessionObj<P> = <P as Runtime>::Shared<SessionHead, FileSet<P>>;

/// A session table: sessions by name, in creation order.
pub(super) type Sessions<P> = <P as Runtime>::Index<SessionHead, FileSet<P>>;

/// The guard of a session's files.
pub(super) type FilesGuard<'a, P> =
    <SessionObj<P> as SharedLocked<SessionHead, FileSet<P>>>::Guard<'a>;

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
    /// Makes a session, a new member of `table`: `NameExists` if the name is taken there.
    pub(super) fn insert_new(
        table: &mut Sessions<P>,
        name: SessionName,
        dir: Direction,
    ) -> Result<&SessionObj<P>> {
        let name_span = padded_span(name.as_bytes().len(), SESSION_NAME_LEN);
        let head = SessionHead {
            name,
            name_span,
            dir,
        };
        table
            .try_insert_new(head, FileSet::new())
            .map_err(|e| match e {
                InsertError::Exists => Error::NameExists,
                InsertError::NoMemory => Error::NoMemory,
            })
    }

    /// A handle of a session a table holds.
    pub(super) fn of(member: &SessionObj<P>) -> Self {
        Session(member.clone())
    }

    /// The platform's object, as the tables hold it.
    pub(super) fn obj(&self) -> &SessionObj<P> {
        &self.0
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

/// The outgoing sessions: unique names in creation order (the index), and their
/// serialization blocks. Lock order: the outgoing lock, then a session's files.
pub(super) struct Outgoing<P: Platform> {
    pub(super) sessions: Sessions<P>,
    pub(super) blocks: BlockSet<P, LuoSessionSer>,
}
