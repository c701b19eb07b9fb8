//! The `Platform` trait and its parts: the only way the core touches locks, memory, files and
//! callbacks.
//!
//! luo-core has no `alloc` (the kernel builds Rust with `core` only), so every container it
//! needs is an associated type of the platform with a fallible constructor and fallible growth:
//! `Vec`/`BTreeMap`/`Arc` from std in userspace, `KVec`/`RBTree`/`Arc` with GFP flags in the
//! kernel. Locks follow the kernel's shapes (mutex, reader/writer semaphore); nothing in the
//! core spins or uses atomics of its own, so the kernel backend can map everything onto
//! `kernel::sync` and the userspace backend onto std or loom.
//!
//! Handover memory is modelled on KHO: preserved pages named by a `u64` address (a physical
//! address in the kernel, an offset into the handover memfd in userspace), read and written
//! only through [`HandoverMemory::read`] and [`HandoverMemory::write`], which validate the
//! address. The core never forms a pointer from an address it read out of handover memory.
//!
//! A platform is three traits on one type, split by what platforms share. [`Runtime`] is the
//! containers and locks: luo-core's `std` feature implements it once with std's types for any
//! type that implements the empty `StdRuntime` marker, the kernel with its own wrappers, the
//! loom models with loom locks. [`HandoverMemory`] is the pages and the root; [`DelegateMemory`]
//! forwards it to an object, so backend-user's two platforms share its `Memory`. [`Platform`]
//! requires both and adds what is each platform's own: the file type with its identity and
//! `dup`, the handler and FLB types (defined over that file type, which is why files are not a
//! part of their own: no two platforms could share one), and the log. A std platform thus
//! writes one line for its runtime, a few for its memory, and only its files, handlers and log
//! in full. It is all static (supertraits and blanket impls, no `dyn`), and generic code keeps
//! writing `P::Vec<T>` and `p.read(..)` under `P: Platform`; only a fully qualified path names
//! the part (`<P as Runtime>::Shared<..>`). `Runtime` is not split further into containers
//! and locks: only the loom models would use that split (std containers, loom locks), and it
//! would save that test platform two lines at the cost of two more traits and a second marker,
//! so loom implements `Runtime` in full.

use core::ops::{Deref, DerefMut};

use crate::errno::{AllocError, Errno, HandoverError, Result};

/// A fallible growable array (`Vec` in userspace, `KVec` in the kernel).
pub trait PVec<T>: Default {
    /// Appends, failing instead of aborting when memory is short.
    fn try_push(&mut self, value: T) -> core::result::Result<(), AllocError>;
    /// Makes room for `additional` more elements, so that as many `try_push`es cannot fail.
    fn try_reserve(&mut self, additional: usize) -> core::result::Result<(), AllocError>;
    /// Removes and returns the last element.
    fn pop(&mut self) -> Option<T>;
    /// The elements as a slice.
    fn as_slice(&self) -> &[T];
    /// The elements as a mutable slice.
    fn as_mut_slice(&mut self) -> &mut [T];
    /// Number of elements.
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A fallible ordered map (`BTreeMap` in userspace, `RBTree` in the kernel).
///
/// Keys are small `Copy` values (sequence numbers, tokens, names, identities). Walks that do
/// not change the map use [`OrdMap::iter`]/[`OrdMap::iter_mut`] (one step = one tree
/// successor); walks that remove entries as they go use cursors expressed as "the next key
/// after this one", which every ordered map answers in logarithmic time and which leaves the
/// caller free to mutate between steps.
pub trait OrdMap<K: Ord + Copy, V>: Default {
    /// Iterator over the entries in key order.
    type Iter<'a>: Iterator<Item = (&'a K, &'a V)>
    where
        Self: 'a,
        K: 'a,
        V: 'a;
    /// Iterator over the entries in key order, values mutable.
    type IterMut<'a>: Iterator<Item = (&'a K, &'a mut V)>
    where
        Self: 'a,
        K: 'a,
        V: 'a;
    /// The entries in key order.
    fn iter(&self) -> Self::Iter<'_>;
    /// The entries in key order, values mutable.
    fn iter_mut(&mut self) -> Self::IterMut<'_>;
    /// Inserts or replaces, returning the old value.
    fn try_insert(&mut self, key: K, value: V) -> core::result::Result<Option<V>, AllocError>;
    /// Makes sure the next `try_insert` of a new key cannot fail for lack of memory (the
    /// kernel map keeps one node reserved); a no-op where inserts never fail.
    fn try_reserve(&mut self) -> core::result::Result<(), AllocError>;
    /// Looks a key up.
    fn get(&self, key: &K) -> Option<&V>;
    /// Looks a key up for mutation.
    fn get_mut(&mut self, key: &K) -> Option<&mut V>;
    /// Removes a key.
    fn remove(&mut self, key: &K) -> Option<V>;
    /// Removes a key if `keep_out(value)` says so, in one lookup.
    fn remove_if(&mut self, key: &K, keep_out: impl FnOnce(&V) -> bool) -> Option<V>;
    /// Number of entries.
    fn len(&self) -> usize;
    /// True when empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The smallest key strictly greater than `after`, or the smallest key when `after` is None.
    fn next_key(&self, after: Option<&K>) -> Option<K>;
    /// The largest key strictly smaller than `before`, or the largest key when `before` is None.
    fn prev_key(&self, before: Option<&K>) -> Option<K>;
    /// True when the key is present.
    fn contains(&self, key: &K) -> bool {
        self.get(key).is_some()
    }
}

/// A shared, reference-counted object: an immutable head `H` and a body `T` behind a mutex,
/// in one allocation. A session is one (its name and direction; its files): the C core
/// embeds the session's `struct mutex` in `struct luo_session`, and the kernel platform does
/// the same (an `Arc` initialized in place); userspace uses `Arc<(H, Mutex<T>)>`.
pub trait SharedLocked<H, T>: Deref<Target = H> + Clone {
    /// The guard of the body.
    type Guard<'a>: DerefMut<Target = T>
    where
        Self: 'a;
    /// Allocates.
    fn try_new(head: H, body: T) -> core::result::Result<Self, AllocError>;
    /// Locks the body, sleeping if needed.
    fn lock(&self) -> Self::Guard<'_>;
    /// True when both point at the same allocation.
    fn ptr_eq(a: &Self, b: &Self) -> bool;
}

/// What a [`SharedIndex`] keys its objects by: a field of their head, fixed at creation.
pub trait IndexKey {
    /// The key (a session's name).
    type Key: Ord + Copy;
    /// The object's key.
    fn index_key(&self) -> &Self::Key;
    /// The bytes a hashing index hashes: equal keys give equal bytes.
    fn key_bytes(key: &Self::Key) -> &[u8];
}

/// Why [`SharedIndex::try_insert_new`] made no object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertError {
    /// An object with the same key is in the index.
    Exists,
    /// The object could not be allocated.
    NoMemory,
}

impl From<AllocError> for InsertError {
    fn from(_: AllocError) -> Self {
        InsertError::NoMemory
    }
}

/// A table of shared objects (a session table): unique keys taken from their heads, and the
/// order in which they were inserted. The index holds one reference to each member.
///
/// An object is born in its index ([`SharedIndex::try_insert_new`]) and leaves it once
/// ([`SharedIndex::remove`]); it never joins another. That is what lets the kernel keep the
/// links *inside* the object's allocation, as `struct luo_session` embeds its `list_head`:
/// inserting allocates nothing beyond the object (but a bucket array, now and then), and
/// removing a known member is two list unlinks with no lookup, instead of a search and a node
/// to free. A std index keeps ordinary maps.
pub trait SharedIndex<H: IndexKey, T>: Default {
    /// The objects.
    type Shared: SharedLocked<H, T>;
    /// Members, oldest first.
    type Iter<'a>: Iterator<Item = &'a Self::Shared>
    where
        Self: 'a,
        Self::Shared: 'a;
    /// Members, newest first.
    type IterRev<'a>: Iterator<Item = &'a Self::Shared>
    where
        Self: 'a,
        Self::Shared: 'a;
    /// Allocates an object and makes it a member, unless a member has its key (nothing is
    /// allocated then). Returns the index's own handle; clone it to keep one.
    fn try_insert_new(&mut self, head: H, body: T) -> Result<&Self::Shared, InsertError>;
    /// The member with this key.
    fn get(&self, key: &H::Key) -> Option<&Self::Shared>;
    /// Takes `s` out if it is a member of this index (and not of another); true if it was.
    fn remove(&mut self, s: &Self::Shared) -> bool;
    /// Number of members.
    fn len(&self) -> usize;
    /// True when there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The members, oldest first.
    fn iter(&self) -> Self::Iter<'_>;
    /// The members, newest first.
    fn iter_rev(&self) -> Self::IterRev<'_>;
}

/// A mutual-exclusion lock.
pub trait PMutex<T> {
    /// The guard.
    type Guard<'a>: DerefMut<Target = T>
    where
        Self: 'a;
    /// Creates the lock (fallible: the kernel allocates pinned locks).
    fn try_new(value: T) -> core::result::Result<Self, AllocError>
    where
        Self: Sized;
    /// Locks, sleeping if needed.
    fn lock(&self) -> Self::Guard<'_>;
}

/// A reader/writer lock (an rwsem in the kernel).
pub trait PRwLock<T> {
    /// Shared guard.
    type Read<'a>: Deref<Target = T>
    where
        Self: 'a;
    /// Exclusive guard.
    type Write<'a>: DerefMut<Target = T>
    where
        Self: 'a;
    /// Creates the lock.
    fn try_new(value: T) -> core::result::Result<Self, AllocError>
    where
        Self: Sized;
    /// Takes the lock shared.
    fn read(&self) -> Self::Read<'_>;
    /// Takes the lock exclusively.
    fn write(&self) -> Self::Write<'_>;
}

/// Log severity for [`Platform::log`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Something was refused or lost.
    Error,
    /// Something unexpected that LUO recovered from.
    Warn,
    /// Progress worth a line in the kernel log.
    Info,
}

/// The state a file handler sees for one file (upstream `liveupdate_file_op_args`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetrieveStatus {
    /// No retrieve was attempted (`retrieve_status == 0`).
    NotAttempted,
    /// Retrieve succeeded (`retrieve_status == 1`).
    Retrieved,
    /// Retrieve failed with this errno; it is never retried (`retrieve_status < 0`).
    Failed(Errno),
}

impl RetrieveStatus {
    /// The value upstream stores in `retrieve_status`.
    pub const fn as_raw(self) -> i32 {
        match self {
            RetrieveStatus::NotAttempted => 0,
            RetrieveStatus::Retrieved => 1,
            RetrieveStatus::Failed(e) => -e.get(),
        }
    }
}

/// What `preserve` hands back: the opaque word serialized for the next kernel and a private
/// word that lives only in this kernel (upstream `serialized_data` and `private_data`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Preserved {
    /// Stored verbatim as `luo_file_ser.data`.
    pub data: u64,
    /// Given back to `unpreserve`, `freeze` and `unfreeze` in this kernel only.
    pub private: usize,
}

/// A file handler: the full upstream `liveupdate_file_ops` set.
///
/// The trait is object-safe: the platform's handler type is a cheap `Clone` handle, a pointer
/// to a C `struct liveupdate_file_handler` in the kernel, an `Arc<dyn FileHandler<_>>` in
/// userspace.
pub trait FileHandler<P: Platform> {
    /// Identity of the handler (the C struct's address in the kernel).
    fn key(&self) -> usize;
    /// The compatible string (1..=47 bytes, no NUL).
    fn compatible(&self) -> &[u8];
    /// True when every required op (`can_preserve`, `preserve`, `unpreserve`, `retrieve`,
    /// `finish`) is present; checked at registration (`EINVAL` otherwise). Always true for
    /// Rust handlers; the kernel backend checks the C ops table.
    fn has_required_ops(&self) -> bool {
        true
    }
    /// Pins the handler's owner (`try_module_get`); false if it is going away.
    fn get_owner(&self) -> bool {
        true
    }
    /// Drops the pin taken by [`FileHandler::get_owner`].
    fn put_owner(&self) {}
    /// May this handler preserve `file`?
    fn can_preserve(&self, file: &P::File) -> bool;
    /// Preserves `file` for the next kernel.
    fn preserve(&self, file: &P::File) -> core::result::Result<Preserved, Errno>;
    /// Undoes `preserve` (outgoing session closed).
    fn unpreserve(&self, file: &P::File, state: Preserved);
    /// Last chance before the kexec; may replace `state.data`.
    fn freeze(&self, _file: &P::File, _state: &mut Preserved) -> core::result::Result<(), Errno> {
        Ok(())
    }
    /// Undoes `freeze` when the reboot is rolled back.
    fn unfreeze(&self, _file: &P::File, _state: Preserved) {}
    /// Recreates the file in the new kernel from `data`.
    fn retrieve(&self, data: u64) -> core::result::Result<P::File, Errno>;
    /// May the file be finished? `file` is None if it was never retrieved (or retrieve failed).
    fn can_finish(&self, _file: Option<&P::File>, _data: u64, _status: RetrieveStatus) -> bool {
        true
    }
    /// Releases what the old kernel preserved for this file.
    fn finish(&self, file: Option<&P::File>, data: u64, status: RetrieveStatus);
    /// The identity used to refuse preserving one file twice (`get_id`); defaults to the
    /// platform's notion of the open file's identity.
    fn get_id(&self, file: &P::File) -> u64 {
        P::file_identity(file)
    }
}

/// A File-Lifecycle-Bound object: global state shared by all files of the handlers it is
/// linked to (upstream `liveupdate_flb_ops`).
pub trait FlbOps {
    /// Identity (the C struct's address in the kernel).
    fn key(&self) -> usize;
    /// The compatible string (1..=47 bytes).
    fn compatible(&self) -> &[u8];
    /// Checked at registration: all four callbacks present.
    fn has_required_ops(&self) -> bool {
        true
    }
    /// Pins the owner module.
    fn get_owner(&self) -> bool {
        true
    }
    /// Drops the owner pin.
    fn put_owner(&self) {}
    /// First dependent file preserved: returns `(data, obj)`; `obj == 0` means "no object".
    fn preserve(&self) -> core::result::Result<(u64, usize), Errno>;
    /// Last dependent file unpreserved.
    fn unpreserve(&self, data: u64, obj: usize);
    /// New kernel: rebuild the object from `data`.
    fn retrieve(&self, data: u64) -> core::result::Result<usize, Errno>;
    /// New kernel: last dependent file finished.
    fn finish(&self, data: u64, obj: usize);
}

/// The containers and locks: everything the core allocates or synchronizes with.
pub trait Runtime {
    /// Growable array.
    type Vec<T>: PVec<T>;
    /// Ordered map.
    type Map<K: Ord + Copy, V>: OrdMap<K, V>;
    /// Shared head and locked body, one allocation.
    type Shared<H: 'static, T: 'static>: SharedLocked<H, T>;
    /// A table of such objects, keyed by their heads, in insertion order.
    type Index<H: IndexKey + 'static, T: 'static>: SharedIndex<H, T, Shared = Self::Shared<H, T>>;
    /// Mutex.
    type Mutex<T>: PMutex<T>;
    /// Reader/writer lock.
    type RwLock<T>: PRwLock<T>;
}

/// Handover memory: preserved pages named by a non-zero `u64` address (KHO in the kernel).
pub trait HandoverMemory {
    /// `PAGE_SIZE`, which is part of the handover ABI (`KHO_BLOCK_SIZE`).
    const PAGE_SIZE: usize;

    /// Allocates one zeroed, preserved page of handover memory; returns its address (never 0).
    fn alloc_page(&self) -> Result<u64>;
    /// Frees a page from [`HandoverMemory::alloc_page`] in this kernel (`kho_unpreserve_free`).
    fn free_page(&self, addr: u64);
    /// Releases a page the previous kernel preserved (`kho_restore_free`).
    fn release_incoming_page(&self, addr: u64);
    /// Reads `buf.len()` bytes at `addr`; the range must lie in one page the platform knows.
    fn read(&self, addr: u64, buf: &mut [u8]) -> core::result::Result<(), HandoverError>;
    /// Writes `data` at `addr` in a page allocated by [`HandoverMemory::alloc_page`].
    fn write(&self, addr: u64, data: &[u8]) -> Result;
    /// The incoming `"LUO"` subtree: address and size of `luo_ser`, or None on a cold boot.
    fn incoming_root(&self) -> core::result::Result<Option<(u64, u64)>, HandoverError>;
    /// Publishes the outgoing root (`kho_add_subtree("LUO", ...)`).
    fn publish_root(&self, addr: u64, size: u64) -> Result;
}

/// A platform whose handover memory is an object it holds: implementing this implements
/// [`HandoverMemory`] by forwarding every item to [`DelegateMemory::handover_memory`], so
/// platforms that share one implementation (backend-user's `Memory`) do not each restate it.
/// A platform that implements [`HandoverMemory`] itself does not implement this.
pub trait DelegateMemory {
    /// The object that implements the handover memory.
    type Memory: HandoverMemory;
    /// This platform's handover memory.
    fn handover_memory(&self) -> &Self::Memory;
}

impl<T: DelegateMemory> HandoverMemory for T {
    const PAGE_SIZE: usize = <T::Memory as HandoverMemory>::PAGE_SIZE;

    fn alloc_page(&self) -> Result<u64> {
        self.handover_memory().alloc_page()
    }
    fn free_page(&self, addr: u64) {
        self.handover_memory().free_page(addr)
    }
    fn release_incoming_page(&self, addr: u64) {
        self.handover_memory().release_incoming_page(addr)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> core::result::Result<(), HandoverError> {
        self.handover_memory().read(addr, buf)
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result {
        self.handover_memory().write(addr, data)
    }
    fn incoming_root(&self) -> core::result::Result<Option<(u64, u64)>, HandoverError> {
        self.handover_memory().incoming_root()
    }
    fn publish_root(&self, addr: u64, size: u64) -> Result {
        self.handover_memory().publish_root(addr, size)
    }
}

/// Everything the core needs from its environment: the [`Runtime`], the [`HandoverMemory`],
/// and what is the platform's own: its open files, the handler and FLB types that see them,
/// and its log.
pub trait Platform: Runtime + HandoverMemory + Sized + 'static {
    /// A counted reference to an open file (`struct file *` with a reference, `OwnedFd`).
    type File;
    /// A file handler.
    type Handler: FileHandler<Self> + Clone;
    /// An FLB.
    type Flb: FlbOps + Clone;

    /// Identity of an open file when the handler has no `get_id` (upstream: the file pointer).
    fn file_identity(file: &Self::File) -> u64;
    /// Takes another reference to an open file (`get_file`; `dup` in userspace).
    fn dup_file(file: &Self::File) -> Result<Self::File>;

    /// Writes one line to the log (`pr_err`/`pr_warn`/`pr_info` with the `luo: ` prefix).
    fn log(&self, level: Level, args: core::fmt::Arguments<'_>);
}
