//! Recording file handlers and FLBs for the models.
//!
//! Every callback appends an [`Event`] to one shared [`Journal`] under a mutex, so the journal
//! order is a linearization of the callbacks consistent with happens-before; the models check
//! their invariants on that order.

use luo_core::errno::{Errno, EINVAL};
use luo_core::{FileHandler, FlbOps, PMutex, Preserved, RetrieveStatus};

use crate::platform::{FakeFile, LArc, LMutex, LoomPlatform};

/// A handler's `serialized_data` for file `id`.
pub const fn data_of(id: u64) -> u64 {
    0xDA7A_0000 + id
}

/// One callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// File `preserve` succeeded.
    Preserve(u64),
    /// File `unpreserve`.
    Unpreserve(u64),
    /// File `freeze`.
    Freeze(u64),
    /// File `unfreeze`.
    Unfreeze(u64),
    /// File `retrieve` (recorded whether or not it fails).
    Retrieve(u64),
    /// `can_finish`, with whether a file was passed.
    CanFinish(u64, bool),
    /// `finish`, with whether a file was passed and upstream's `retrieve_status`.
    Finish(u64, bool, i32),
    /// FLB `preserve`.
    FlbPreserve,
    /// FLB `unpreserve`.
    FlbUnpreserve,
    /// FLB `retrieve` with the handed-over data.
    FlbRetrieve(u64),
    /// FLB `finish`.
    FlbFinish,
}

/// The shared, ordered record of callbacks.
#[derive(Clone)]
pub struct Journal(LArc<LMutex<Vec<Event>>>);

impl Journal {
    /// An empty journal.
    pub fn new() -> Self {
        Journal(LArc::new(LMutex::new(Vec::new())))
    }

    fn push(&self, e: Event) {
        self.0.lock().push(e);
    }

    /// Everything recorded so far.
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().clone()
    }

    /// How many recorded events satisfy `f`.
    pub fn count(&self, f: impl Fn(&Event) -> bool) -> usize {
        self.0.lock().iter().filter(|e| f(e)).count()
    }
}

impl Default for Journal {
    fn default() -> Self {
        Self::new()
    }
}

/// The recording handler's state.
pub struct RecHandler {
    compat: &'static str,
    journal: Journal,
    /// `preserve` of this file id fails with EIO.
    fail_preserve: Option<u64>,
    /// `can_finish` refuses every file.
    refuse_finish: bool,
}

/// A recording file handler; clones are the same handler (same key).
#[derive(Clone)]
pub struct Handler(LArc<RecHandler>);

impl Handler {
    /// A handler named `compat` that accepts every file.
    pub fn new(compat: &'static str, journal: &Journal) -> Self {
        Self::build(compat, journal, None, false)
    }

    /// Like [`Handler::new`], but `preserve` of file `id` fails with `EIO`.
    pub fn failing_preserve(compat: &'static str, journal: &Journal, id: u64) -> Self {
        Self::build(compat, journal, Some(id), false)
    }

    /// Like [`Handler::new`], but `can_finish` refuses every file.
    pub fn refusing_finish(compat: &'static str, journal: &Journal) -> Self {
        Self::build(compat, journal, None, true)
    }

    fn build(
        compat: &'static str,
        journal: &Journal,
        fail_preserve: Option<u64>,
        refuse_finish: bool,
    ) -> Self {
        Handler(LArc::new(RecHandler {
            compat,
            journal: journal.clone(),
            fail_preserve,
            refuse_finish,
        }))
    }
}

impl FileHandler<LoomPlatform> for Handler {
    fn key(&self) -> usize {
        core::ptr::from_ref::<RecHandler>(&self.0) as usize
    }
    fn compatible(&self) -> &[u8] {
        self.0.compat.as_bytes()
    }
    fn can_preserve(&self, _file: &FakeFile) -> bool {
        true
    }
    fn preserve(&self, file: &FakeFile) -> Result<Preserved, Errno> {
        if self.0.fail_preserve == Some(file.id) {
            return Err(luo_core::errno::EIO);
        }
        self.0.journal.push(Event::Preserve(file.id));
        Ok(Preserved {
            data: data_of(file.id),
            private: 0,
        })
    }
    fn unpreserve(&self, file: &FakeFile, _state: Preserved) {
        self.0.journal.push(Event::Unpreserve(file.id));
    }
    fn freeze(&self, file: &FakeFile, _state: &mut Preserved) -> Result<(), Errno> {
        self.0.journal.push(Event::Freeze(file.id));
        Ok(())
    }
    fn unfreeze(&self, file: &FakeFile, _state: Preserved) {
        self.0.journal.push(Event::Unfreeze(file.id));
    }
    fn retrieve(&self, data: u64) -> Result<FakeFile, Errno> {
        let id = data.checked_sub(data_of(0)).ok_or(EINVAL)?;
        self.0.journal.push(Event::Retrieve(id));
        Ok(FakeFile::new(id))
    }
    fn can_finish(&self, file: Option<&FakeFile>, data: u64, _status: RetrieveStatus) -> bool {
        let id = data.wrapping_sub(data_of(0));
        self.0.journal.push(Event::CanFinish(id, file.is_some()));
        !self.0.refuse_finish
    }
    fn finish(&self, file: Option<&FakeFile>, data: u64, status: RetrieveStatus) {
        let id = data.wrapping_sub(data_of(0));
        self.0
            .journal
            .push(Event::Finish(id, file.is_some(), status.as_raw()));
    }
}

/// The recording FLB's state.
pub struct RecFlb {
    compat: &'static str,
    data: u64,
    journal: Journal,
}

/// A recording FLB: `preserve` hands over `data` (and makes it the object), `retrieve`
/// checks it, every callback is journaled.
#[derive(Clone)]
pub struct Flb(LArc<RecFlb>);

impl Flb {
    /// An FLB named `compat` handing over `data`.
    pub fn new(compat: &'static str, data: u64, journal: &Journal) -> Self {
        Flb(LArc::new(RecFlb {
            compat,
            data,
            journal: journal.clone(),
        }))
    }

    /// The data word it hands over.
    pub fn data(&self) -> u64 {
        self.0.data
    }
}

impl FlbOps for Flb {
    fn key(&self) -> usize {
        core::ptr::from_ref::<RecFlb>(&self.0) as usize
    }
    fn compatible(&self) -> &[u8] {
        self.0.compat.as_bytes()
    }
    fn preserve(&self) -> Result<(u64, usize), Errno> {
        self.0.journal.push(Event::FlbPreserve);
        Ok((self.0.data, self.0.data as usize))
    }
    fn unpreserve(&self, _data: u64, _obj: usize) {
        self.0.journal.push(Event::FlbUnpreserve);
    }
    fn retrieve(&self, data: u64) -> Result<usize, Errno> {
        self.0.journal.push(Event::FlbRetrieve(data));
        if data != self.0.data {
            return Err(EINVAL);
        }
        Ok(data as usize)
    }
    fn finish(&self, _data: u64, _obj: usize) {
        self.0.journal.push(Event::FlbFinish);
    }
}
