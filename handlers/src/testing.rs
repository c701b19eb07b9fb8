//! A test file handler and test FLBs whose every callback is recorded and can be told to fail.
//!
//! Events go to one shared [`Journal`] so a test can assert the global order of callbacks across
//! handlers and FLBs. "Preserved objects" live in a [`Store`] that outlives one `LiveUpdate`, so a
//! test can reboot into a new `LiveUpdate` in the same process and retrieve them.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use backend_user::{sys, UserPlatform};
use luo_core::errno::{self, Errno};
use luo_core::{FileHandler, FlbOps, Preserved, RetrieveStatus};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One callback, with the handler or FLB name and the file's data word.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `preserve` of the file that got `data`.
    Preserve(String, u64),
    /// `unpreserve`.
    Unpreserve(String, u64),
    /// `freeze`.
    Freeze(String, u64),
    /// `unfreeze`.
    Unfreeze(String, u64),
    /// `retrieve`.
    Retrieve(String, u64),
    /// `can_finish`, with whether a file was passed.
    CanFinish(String, u64, bool),
    /// `finish`, with the retrieve status as upstream's int.
    Finish(String, u64, i32),
    /// FLB `preserve`.
    FlbPreserve(String),
    /// FLB `unpreserve`.
    FlbUnpreserve(String),
    /// FLB `retrieve`.
    FlbRetrieve(String, u64),
    /// FLB `finish`.
    FlbFinish(String, u64),
}

/// The shared, ordered record of callbacks.
#[derive(Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<Event>>>);

impl Journal {
    /// A new, empty journal.
    pub fn new() -> Self {
        Self::default()
    }
    fn push(&self, e: Event) {
        lock(&self.0).push(e);
    }
    /// Everything recorded so far.
    pub fn events(&self) -> Vec<Event> {
        lock(&self.0).clone()
    }
    /// Everything recorded so far, and clears it.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *lock(&self.0))
    }
}

/// Which callback to make fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// `preserve`.
    Preserve,
    /// `freeze`.
    Freeze,
    /// `retrieve`.
    Retrieve,
    /// `can_finish` (returns false).
    CanFinish,
}

/// Files "preserved" by test handlers, surviving a simulated reboot within one process.
#[derive(Clone, Default)]
pub struct Store {
    next: Arc<AtomicU64>,
    files: Arc<Mutex<BTreeMap<u64, OwnedFd>>>,
}

impl Store {
    /// A new store.
    pub fn new() -> Self {
        Store {
            next: Arc::new(AtomicU64::new(0x1000)),
            files: Default::default(),
        }
    }
    /// Number of objects held.
    pub fn len(&self) -> usize {
        lock(&self.files).len()
    }
    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A file handler for tests: accepts regular files (or only those it is told to), records every
/// callback, fails the ones it is told to.
pub struct TestHandler {
    name: String,
    journal: Journal,
    store: Store,
    /// Ops that fail, with the data word they fail for (None: every file) and the errno.
    failures: Mutex<BTreeMap<Op, (Option<u64>, Errno)>>,
    /// Only files with these inodes are accepted when set.
    accept: Mutex<Option<BTreeSet<u64>>>,
    owner_gone: AtomicBool,
}

impl TestHandler {
    /// A handler with compatible string `name`.
    pub fn new(name: &str, journal: &Journal, store: &Store) -> Arc<Self> {
        Arc::new(TestHandler {
            name: name.to_owned(),
            journal: journal.clone(),
            store: store.clone(),
            failures: Mutex::new(BTreeMap::new()),
            accept: Mutex::new(None),
            owner_gone: AtomicBool::new(false),
        })
    }

    /// Makes `op` fail with `errno` for the file with `data` (None: for every file).
    pub fn fail(&self, op: Op, data: Option<u64>, errno: Errno) {
        lock(&self.failures).insert(op, (data, errno));
    }

    /// Stops failing `op`.
    pub fn heal(&self, op: Op) {
        lock(&self.failures).remove(&op);
    }

    /// Accepts only files with these inode identities (see `UserPlatform::file_identity`).
    pub fn accept_only(&self, ids: &[u64]) {
        *lock(&self.accept) = Some(ids.iter().copied().collect());
    }

    /// Simulates the owner module going away (`try_module_get` fails).
    pub fn set_owner_gone(&self, gone: bool) {
        self.owner_gone.store(gone, Ordering::SeqCst);
    }

    fn failing(&self, op: Op, data: u64) -> Option<Errno> {
        match lock(&self.failures).get(&op) {
            Some(&(None, e)) => Some(e),
            Some(&(Some(d), e)) if d == data => Some(e),
            _ => None,
        }
    }
}

impl FileHandler<UserPlatform> for TestHandler {
    fn key(&self) -> usize {
        core::ptr::from_ref(self) as usize
    }
    fn compatible(&self) -> &[u8] {
        self.name.as_bytes()
    }
    fn get_owner(&self) -> bool {
        !self.owner_gone.load(Ordering::SeqCst)
    }
    fn can_preserve(&self, file: &OwnedFd) -> bool {
        if let Some(ids) = lock(&self.accept).as_ref() {
            return ids.contains(&<UserPlatform as luo_core::Platform>::file_identity(file));
        }
        sys::fstat(file.as_fd()).is_ok_and(|st| (st.st_mode & libc::S_IFMT) == libc::S_IFREG)
    }
    fn preserve(&self, file: &OwnedFd) -> Result<Preserved, Errno> {
        let data = self.store.next.fetch_add(1, Ordering::SeqCst);
        if let Some(e) = self.failing(Op::Preserve, data) {
            return Err(e);
        }
        let copy = sys::dup_cloexec(file.as_fd()).map_err(|e| backend_user::errno_of(&e))?;
        lock(&self.store.files).insert(data, copy);
        self.journal.push(Event::Preserve(self.name.clone(), data));
        Ok(Preserved {
            data,
            private: data as usize,
        })
    }
    fn unpreserve(&self, _file: &OwnedFd, state: Preserved) {
        lock(&self.store.files).remove(&state.data);
        self.journal
            .push(Event::Unpreserve(self.name.clone(), state.data));
    }
    fn freeze(&self, _file: &OwnedFd, state: &mut Preserved) -> Result<(), Errno> {
        if let Some(e) = self.failing(Op::Freeze, state.data) {
            return Err(e);
        }
        self.journal
            .push(Event::Freeze(self.name.clone(), state.data));
        Ok(())
    }
    fn unfreeze(&self, _file: &OwnedFd, state: Preserved) {
        self.journal
            .push(Event::Unfreeze(self.name.clone(), state.data));
    }
    fn retrieve(&self, data: u64) -> Result<OwnedFd, Errno> {
        self.journal.push(Event::Retrieve(self.name.clone(), data));
        if let Some(e) = self.failing(Op::Retrieve, data) {
            return Err(e);
        }
        let files = lock(&self.store.files);
        let f = files.get(&data).ok_or(errno::ENOENT)?;
        sys::dup_cloexec(f.as_fd()).map_err(|e| backend_user::errno_of(&e))
    }
    fn can_finish(&self, file: Option<&OwnedFd>, data: u64, _status: RetrieveStatus) -> bool {
        self.journal
            .push(Event::CanFinish(self.name.clone(), data, file.is_some()));
        self.failing(Op::CanFinish, data).is_none()
    }
    fn finish(&self, _file: Option<&OwnedFd>, data: u64, status: RetrieveStatus) {
        lock(&self.store.files).remove(&data);
        self.journal
            .push(Event::Finish(self.name.clone(), data, status.as_raw()));
    }
}

/// `LIVEUPDATE_TEST_FLB_COMPATIBLE(i)`'s data word: `0xFEEDF00DCAFEBEE0 + i`.
pub const TEST_FLB_DATA: u64 = 0xFEED_F00D_CAFE_BEE0;

/// A test FLB modelled on `lib/tests/liveupdate.c`: `preserve` sets `data = base + index` and
/// no object; `retrieve` checks the data and makes it the object; every callback is recorded.
pub struct TestFlb {
    name: String,
    index: u64,
    journal: Journal,
    fail_preserve: Mutex<Option<Errno>>,
    fail_retrieve: Mutex<Option<Errno>>,
    with_obj: bool,
}

impl TestFlb {
    /// `liveupdate-test-flb-v<index>`-style FLB named `name`.
    pub fn new(name: &str, index: u64, journal: &Journal) -> Arc<Self> {
        Arc::new(TestFlb {
            name: name.to_owned(),
            index,
            journal: journal.clone(),
            fail_preserve: Mutex::new(None),
            fail_retrieve: Mutex::new(None),
            with_obj: false,
        })
    }

    /// Like [`TestFlb::new`] but `preserve` also returns an outgoing object (for
    /// `liveupdate_flb_get_outgoing`).
    pub fn with_object(name: &str, index: u64, journal: &Journal) -> Arc<Self> {
        Arc::new(TestFlb {
            name: name.to_owned(),
            index,
            journal: journal.clone(),
            fail_preserve: Mutex::new(None),
            fail_retrieve: Mutex::new(None),
            with_obj: true,
        })
    }

    /// Makes `preserve` fail.
    pub fn fail_preserve(&self, e: Option<Errno>) {
        *lock(&self.fail_preserve) = e;
    }

    /// Makes `retrieve` fail.
    pub fn fail_retrieve(&self, e: Option<Errno>) {
        *lock(&self.fail_retrieve) = e;
    }

    /// The data word this FLB hands over.
    pub fn data(&self) -> u64 {
        TEST_FLB_DATA + self.index
    }
}

impl FlbOps for TestFlb {
    fn key(&self) -> usize {
        core::ptr::from_ref(self) as usize
    }
    fn compatible(&self) -> &[u8] {
        self.name.as_bytes()
    }
    fn preserve(&self) -> Result<(u64, usize), Errno> {
        if let Some(e) = *lock(&self.fail_preserve) {
            return Err(e);
        }
        self.journal.push(Event::FlbPreserve(self.name.clone()));
        let obj = if self.with_obj {
            self.data() as usize
        } else {
            0
        };
        Ok((self.data(), obj))
    }
    fn unpreserve(&self, _data: u64, _obj: usize) {
        self.journal.push(Event::FlbUnpreserve(self.name.clone()));
    }
    fn retrieve(&self, data: u64) -> Result<usize, Errno> {
        self.journal
            .push(Event::FlbRetrieve(self.name.clone(), data));
        if let Some(e) = *lock(&self.fail_retrieve) {
            return Err(e);
        }
        if data != self.data() {
            return Err(errno::EINVAL);
        }
        Ok(data as usize)
    }
    fn finish(&self, _data: u64, obj: usize) {
        self.journal
            .push(Event::FlbFinish(self.name.clone(), obj as u64));
    }
}
