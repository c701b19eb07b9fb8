// SPDX-License-Identifier: GPL-2.0

//! The luo-core [`Platform`] for the kernel.
//!
//! Containers are the kernel's fallible ones (`KVec`, `RBTree`, `Arc`, all with
//! `GFP_KERNEL`), locks are `struct mutex` and `struct rw_semaphore`, open files are
//! `ARef<File>`, file handlers and FLBs are the C `struct liveupdate_file_handler` and
//! `struct liveupdate_flb` objects their owners registered, called through their ops tables,
//! and handover memory is KHO: pages from `kho_alloc_preserve()`, named by their physical
//! address.
//!
//! luo-core's traits and the kernel's types both live in other crates, so every container is
//! a thin newtype here (the orphan rule).

use core::{
    cell::UnsafeCell,
    marker::{
        PhantomData,
        PhantomPinned, //
    },
    mem::ManuallyDrop,
    ops::{
        Deref,
        DerefMut, //
    },
    ptr::{
        self,
        NonNull, //
    },
};

use kernel::{
    bindings,
    error::from_err_ptr,
    prelude::*,
    fs::File,
    page::PAGE_SIZE,
    rbtree::{
        Entry,
        RBTree,
        RBTreeNodeReservation, //
    },
    sync::{
        aref::ARef,
        Arc,
        LockClassKey, //
    },
    types::{
        NotThreadSafe,
        Opaque, //
    },
};

use luo_core::{
    errno::{
        AllocError,
        EINVAL, //
    },
    Errno,
    Error as LuoError,
    FileHandler,
    FlbOps,
    HandoverError,
    Level,
    OrdMap,
    PMutex,
    PRwLock,
    PVec,
    Platform,
    Preserved,
    RetrieveStatus,
    SharedLocked,
};


/// The kernel as a luo-core platform. It has no state of its own: KHO and the allocators are
/// global.
pub(crate) struct KernelPlatform;

/// The errno of a kernel error, as luo-core carries it.
pub(crate) fn errno_of(e: kernel::error::Error) -> Errno {
    Errno::new(-e.to_errno())
}

// -------------------------------------------------------------------------------------------
// Containers
// -------------------------------------------------------------------------------------------

/// `KVVec` as a luo-core vector: `kvmalloc`, so a session with thousands of files (or an
/// incoming image with thousands of sessions) never needs a high-order contiguous allocation.
///
/// Most of luo-core's vectors stay empty (the files of a session without files, its block
/// pages), and `KVVec`'s drop calls into the allocator even with nothing allocated, so an
/// empty vector is dropped without that call.
pub(crate) struct KernelVec<T>(ManuallyDrop<KVVec<T>>);

impl<T> Default for KernelVec<T> {
    fn default() -> Self {
        KernelVec(ManuallyDrop::new(KVVec::new()))
    }
}

impl<T> Drop for KernelVec<T> {
    fn drop(&mut self) {
        if self.0.capacity() != 0 {
            // SAFETY: The vector is dropped once, here, and not used afterwards.
            unsafe { ManuallyDrop::drop(&mut self.0) };
        }
        // With no capacity there is no allocation and no element to drop.
    }
}

impl<T> PVec<T> for KernelVec<T> {
    fn try_push(&mut self, value: T) -> Result<(), AllocError> {
        self.0.push(value, GFP_KERNEL).map_err(|_| AllocError)
    }

    fn try_reserve(&mut self, additional: usize) -> Result<(), AllocError> {
        self.0.reserve(additional, GFP_KERNEL).map_err(|_| AllocError)
    }

    fn pop(&mut self) -> Option<T> {
        self.0.pop()
    }

    fn as_slice(&self) -> &[T] {
        self.0.as_slice()
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        self.0.as_mut_slice()
    }
}

/// `RBTree` as a luo-core ordered map.
///
/// The tree does not count its nodes, so the map does. `try_reserve` keeps one preallocated
/// node, which the next insert of a new key consumes, so an insert after a successful
/// reservation cannot fail.
pub(crate) struct KernelMap<K, V> {
    tree: RBTree<K, V>,
    len: usize,
    spare: Option<RBTreeNodeReservation<K, V>>,
}

impl<K, V> Default for KernelMap<K, V> {
    fn default() -> Self {
        KernelMap {
            tree: RBTree::new(),
            len: 0,
            spare: None,
        }
    }
}

impl<K: Ord + Copy, V> OrdMap<K, V> for KernelMap<K, V> {
    type Iter<'a>
        = kernel::rbtree::Iter<'a, K, V>
    where
        K: 'a,
        V: 'a;
    type IterMut<'a>
        = kernel::rbtree::IterMut<'a, K, V>
    where
        K: 'a,
        V: 'a;

    fn iter(&self) -> Self::Iter<'_> {
        self.tree.iter()
    }

    fn iter_mut(&mut self) -> Self::IterMut<'_> {
        self.tree.iter_mut()
    }

    fn try_insert(&mut self, key: K, value: V) -> Result<Option<V>, AllocError> {
        // One lookup; a node is allocated only for a new key (counters are updated by
        // re-inserting, which must not cost an allocation and a free each time).
        match self.tree.entry(key) {
            Entry::Occupied(mut entry) => Ok(Some(core::mem::replace(entry.get_mut(), value))),
            Entry::Vacant(entry) => {
                let reservation = match self.spare.take() {
                    Some(reservation) => reservation,
                    None => RBTreeNodeReservation::new(GFP_KERNEL).map_err(|_| AllocError)?,
                };
                entry.insert(value, reservation);
                self.len += 1;
                Ok(None)
            }
        }
    }

    fn try_reserve(&mut self) -> Result<(), AllocError> {
        if self.spare.is_none() {
            self.spare = Some(RBTreeNodeReservation::new(GFP_KERNEL).map_err(|_| AllocError)?);
        }
        Ok(())
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.tree.get(key)
    }

    fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.tree.get_mut(key)
    }

    fn remove(&mut self, key: &K) -> Option<V> {
        let value = self.tree.remove(key)?;
        self.len -= 1;
        Some(value)
    }

    fn remove_if(&mut self, key: &K, keep_out: impl FnOnce(&V) -> bool) -> Option<V> {
        let cursor = self.tree.cursor_lower_bound_mut(key)?;
        let (k, v) = cursor.current();
        if k != key || !keep_out(v) {
            return None;
        }
        let (_, node) = cursor.remove_current();
        self.len -= 1;
        Some(node.to_key_value().1)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn next_key(&self, after: Option<&K>) -> Option<K> {
        match after {
            None => self.tree.cursor_front().map(|c| *c.current().0),
            Some(k) => {
                // The first key >= k; if it is k itself, the one after it.
                let c = self.tree.cursor_lower_bound(k)?;
                let (ck, _) = c.current();
                if ck == k {
                    c.peek_next().map(|(nk, _)| *nk)
                } else {
                    Some(*ck)
                }
            }
        }
    }

    fn prev_key(&self, before: Option<&K>) -> Option<K> {
        match before {
            None => self.tree.cursor_back().map(|c| *c.current().0),
            // The key before the first key >= k; if every key is < k, the last one.
            Some(k) => match self.tree.cursor_lower_bound(k) {
                Some(c) => c.peek_prev().map(|(pk, _)| *pk),
                None => self.tree.cursor_back().map(|c| *c.current().0),
            },
        }
    }
}

/// A head and a `struct mutex`-protected body in one `Arc` (a session), initialized in
/// place: one allocation, as the C core embeds the mutex in `struct luo_session`.
#[pin_data]
pub(crate) struct SharedInner<H, T> {
    head: H,
    #[pin]
    body: KMutex<T>,
}

/// [`SharedInner`] as a luo-core [`SharedLocked`].
pub(crate) struct KernelShared<H, T>(pub(crate) Arc<SharedInner<H, T>>);

impl<H, T> Clone for KernelShared<H, T> {
    fn clone(&self) -> Self {
        KernelShared(self.0.clone())
    }
}

impl<H, T> Deref for KernelShared<H, T> {
    type Target = H;

    fn deref(&self) -> &H {
        &self.0.head
    }
}

impl<H, T> SharedLocked<H, T> for KernelShared<H, T> {
    type Guard<'a>
        = KMutexGuard<'a, T>
    where
        Self: 'a;

    fn try_new(head: H, value: T) -> Result<Self, AllocError> {
        let (name, key) = lock_class::<T>().ok_or(AllocError)?;
        Arc::pin_init(
            pin_init!(SharedInner {
                head,
                body <- KMutex::new(value, name, key),
            }),
            GFP_KERNEL,
        )
        .map(KernelShared)
        .map_err(|_| AllocError)
    }

    fn lock(&self) -> KMutexGuard<'_, T> {
        self.0.body.lock()
    }

    fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

// -------------------------------------------------------------------------------------------
// Locks
// -------------------------------------------------------------------------------------------

/// One lockdep class per protected type.
struct LockClass {
    /// `core::any::type_name` of the protected type.
    ty: &'static str,
    /// The class name lockdep prints (the type name, NUL-terminated, leaked).
    name: &'static CStr,
    /// The class key (registered with lockdep, leaked).
    key: Pin<&'static LockClassKey>,
}

kernel::sync::global_lock! {
    // SAFETY: `init` is called by `init_lock_classes`, from the early initcall, before the first
    // lock of the core is created.
    unsafe(uninit) static LOCK_CLASSES: Mutex<KVec<LockClass>> = KVec::new();
}

/// Initializes the lock-class table; called once, from the early initcall.
pub(crate) fn init_lock_classes() {
    // SAFETY: Called exactly once (the early initcall runs once), before any other use.
    unsafe { LOCK_CLASSES.init() };
}

/// The lock class for locks protecting a `T`.
///
/// luo-core creates its locks through generic constructors (`PMutex::try_new`), so one
/// `static_lock_class!()` would put every lock of the core in one lockdep class, and lockdep
/// would report its documented nesting (device, phase, session tables, session, registry,
/// refs, ids) as recursive locking. Keying the class on the protected type gives one class
/// per role, exactly as the C core's distinct static locks do (all sessions share one class,
/// like the C core's `session->mutex`). Classes are created on first use and never freed.
fn lock_class<T>() -> Option<(&'static CStr, Pin<&'static LockClassKey>)> {
    let ty = core::any::type_name::<T>();
    let mut classes = LOCK_CLASSES.lock();
    if let Some(c) = classes.iter().find(|c| c.ty == ty) {
        return Some((c.name, c.key));
    }
    let bytes = ty.as_bytes();
    let n = bytes.len().min(120);
    let mut name = KVec::<u8>::with_capacity(n + 1, GFP_KERNEL).ok()?;
    name.extend_from_slice(&bytes[..n], GFP_KERNEL).ok()?;
    name.push(0, GFP_KERNEL).ok()?;
    let key = KBox::pin_init(LockClassKey::new_dynamic(), GFP_KERNEL).ok()?;
    classes.reserve(1, GFP_KERNEL).ok()?;
    let (ptr, len, _cap) = name.into_raw_parts();
    // SAFETY: `ptr` and `len` describe the initialized part of the vector just taken apart,
    // which is never freed, so the slice is valid for `'static`.
    let name: &'static [u8] = unsafe { core::slice::from_raw_parts(ptr, len) };
    let name = CStr::from_bytes_with_nul(name).ok()?;
    // SAFETY: The key was pinned by `pin_init` and is leaked here: it is never moved or freed
    // (lockdep keeps a pointer to it), so a pinned `'static` reference to it is sound.
    let key: Pin<&'static LockClassKey> =
        unsafe { Pin::new_unchecked(&*KBox::into_raw(Pin::into_inner_unchecked(key))) };
    classes.push(LockClass { ty, name, key }, GFP_KERNEL).ok()?;
    Some((name, key))
}

/// What a kernel lock held in one mode allows, and how the hold ends: the only difference
/// between the guards of a mutex and of a semaphore held for read or for write.
///
/// # Safety
///
/// While a task holds a `Lock` in this mode, it may read `data(lock)`, and write it too if the
/// mode is [`Exclusive`]; `unlock` ends exactly that hold.
pub(crate) unsafe trait HoldMode {
    /// The lock.
    type Lock;
    /// What the lock protects.
    type Data;

    /// The protected data.
    fn data(lock: &Self::Lock) -> *mut Self::Data;

    /// Ends the hold.
    ///
    /// # Safety
    ///
    /// The calling task holds `lock` in this mode.
    unsafe fn unlock(lock: &Self::Lock);
}

/// A mode that excludes every other holder, so its guard hands out `&mut`.
///
/// # Safety
///
/// Holding the lock in this mode excludes every other access to the data.
pub(crate) unsafe trait Exclusive: HoldMode {}

/// A kernel lock held in mode `M`, released on drop.
///
/// # Invariants
///
/// This task holds `lock` in mode `M` for the guard's lifetime.
pub(crate) struct Held<'a, M: HoldMode> {
    lock: &'a M::Lock,
    /// The lock must be released by the task that took it.
    _not_send: NotThreadSafe,
}

impl<'a, M: HoldMode> Held<'a, M> {
    /// Takes over a hold.
    ///
    /// # Safety
    ///
    /// The calling task holds `lock` in mode `M`, and nothing else will release it.
    unsafe fn new(lock: &'a M::Lock) -> Self {
        // INVARIANT: The caller holds the lock and hands the hold over.
        Self {
            lock,
            _not_send: NotThreadSafe,
        }
    }
}

impl<M: HoldMode> Deref for Held<'_, M> {
    type Target = M::Data;

    fn deref(&self) -> &M::Data {
        // SAFETY: The lock is held in mode `M` (type invariant), which allows reading, and no
        // `&mut` to the data outlives its guard.
        unsafe { &*M::data(self.lock) }
    }
}

impl<M: Exclusive> DerefMut for Held<'_, M> {
    fn deref_mut(&mut self) -> &mut M::Data {
        // SAFETY: The lock is held in an exclusive mode (type invariant): no other reference
        // to the data exists.
        unsafe { &mut *M::data(self.lock) }
    }
}

impl<M: HoldMode> Drop for Held<'_, M> {
    fn drop(&mut self) {
        // SAFETY: This task holds the lock in mode `M` (type invariant).
        unsafe { M::unlock(self.lock) };
    }
}

/// A `struct mutex` protecting a `T`.
///
/// `kernel::sync::Mutex` treats its data as structurally pinned, so its guard hands out
/// `&mut T` only for `T: Unpin`; luo-core's lock trait is generic over any `T` and never pins
/// the data (it moves values in and out of its tables), so this lock keeps only the mutex
/// itself pinned.
///
/// # Invariants
///
/// `mutex` is initialized (`__mutex_init`) and `data` is only accessed while it is held.
#[pin_data]
pub(crate) struct KMutex<T> {
    #[pin]
    mutex: Opaque<bindings::mutex>,
    /// The mutex is self-referential (its wait list).
    #[pin]
    _pin: PhantomPinned,
    data: UnsafeCell<T>,
}

// SAFETY: The mutex can be moved between threads with the data it protects.
unsafe impl<T: Send> Send for KMutex<T> {}
// SAFETY: The mutex serializes all access to the data, so sharing it only needs `T: Send`.
unsafe impl<T: Send> Sync for KMutex<T> {}

impl<T> KMutex<T> {
    /// An initializer for a mutex protecting `value`, in lockdep class `key`.
    fn new(value: T, name: &'static CStr, key: Pin<&'static LockClassKey>) -> impl PinInit<Self> {
        pin_init!(Self {
            data: UnsafeCell::new(value),
            _pin: PhantomPinned,
            // SAFETY: `slot` is valid for writes while the closure runs; `name` and `key` are
            // `'static`, as `__mutex_init` requires (lockdep keeps pointers to both).
            mutex <- Opaque::ffi_init(|slot: *mut bindings::mutex| unsafe {
                bindings::__mutex_init(slot, name.as_char_ptr(), key.as_ptr())
            }),
        })
    }

    /// Locks, sleeping if needed.
    fn lock(&self) -> KMutexGuard<'_, T> {
        // SAFETY: `mutex` is initialized (type invariant).
        unsafe { bindings::mutex_lock(self.mutex.get()) };
        // SAFETY: This task now holds the mutex; the guard releases it.
        unsafe { Held::new(self) }
    }
}

/// Access to the data of a [`KMutex`].
pub(crate) type KMutexGuard<'a, T> = Held<'a, MutexHeld<T>>;

/// [`KMutex`] held.
pub(crate) struct MutexHeld<T>(PhantomData<T>);

// SAFETY: The mutex serializes every access to `data` (`KMutex` invariant), and
// `mutex_unlock` releases it.
unsafe impl<T> HoldMode for MutexHeld<T> {
    type Lock = KMutex<T>;
    type Data = T;

    fn data(lock: &KMutex<T>) -> *mut T {
        lock.data.get()
    }

    unsafe fn unlock(lock: &KMutex<T>) {
        // SAFETY: The caller holds the mutex.
        unsafe { bindings::mutex_unlock(lock.mutex.get()) };
    }
}

// SAFETY: A held mutex excludes every other access to `data`.
unsafe impl<T> Exclusive for MutexHeld<T> {}

/// A `struct mutex` as a luo-core mutex (pinned in a `KBox`, as kernel locks must not move).
pub(crate) struct KernelMutex<T>(Pin<KBox<KMutex<T>>>);

impl<T> PMutex<T> for KernelMutex<T> {
    type Guard<'a>
        = KMutexGuard<'a, T>
    where
        Self: 'a;

    fn try_new(value: T) -> Result<Self, AllocError> {
        let (name, key) = lock_class::<T>().ok_or(AllocError)?;
        KBox::pin_init(KMutex::new(value, name, key), GFP_KERNEL)
            .map(KernelMutex)
            .map_err(|_| AllocError)
    }

    fn lock(&self) -> KMutexGuard<'_, T> {
        self.0.lock()
    }
}

/// A reader/writer semaphore (`struct rw_semaphore`) protecting a `T`.
///
/// The kernel crate of 7.3 has no rwsem abstraction. This is the minimum luo-core needs:
/// sleeping shared and exclusive acquisition with guards.
///
/// # Invariants
///
/// `sem` is initialized (`__init_rwsem`) and `data` is only accessed shared while `sem` is
/// held for read or write, and mutably only while it is held for write.
#[pin_data]
pub(crate) struct RwSem<T> {
    #[pin]
    sem: Opaque<bindings::rw_semaphore>,
    /// The semaphore is self-referential (its wait list).
    #[pin]
    _pin: PhantomPinned,
    data: UnsafeCell<T>,
}

// SAFETY: The semaphore can be moved between threads with the data it protects.
unsafe impl<T: Send> Send for RwSem<T> {}
// SAFETY: Shared access hands out `&T` to several threads at once (so `T: Sync`) and `&mut T`
// to one thread at a time (so `T: Send`), each only while the semaphore is held accordingly.
unsafe impl<T: Send + Sync> Sync for RwSem<T> {}

impl<T> RwSem<T> {
    /// An initializer for a semaphore protecting `value`, in lockdep class `key`.
    fn new(value: T, name: &'static CStr, key: Pin<&'static LockClassKey>) -> impl PinInit<Self> {
        pin_init!(Self {
            data: UnsafeCell::new(value),
            _pin: PhantomPinned,
            // SAFETY: `slot` is valid for writes while the closure runs; `name` and `key` are
            // `'static`, as `__init_rwsem` requires (lockdep keeps pointers to both).
            sem <- Opaque::ffi_init(|slot: *mut bindings::rw_semaphore| unsafe {
                bindings::__init_rwsem(slot, name.as_char_ptr(), key.as_ptr())
            }),
        })
    }

    /// Takes the semaphore shared, sleeping if needed.
    fn read(&self) -> RwSemReadGuard<'_, T> {
        // SAFETY: `sem` is initialized (type invariant).
        unsafe { bindings::down_read(self.sem.get()) };
        // SAFETY: This task now holds the semaphore for read; the guard releases it.
        unsafe { Held::new(self) }
    }

    /// Takes the semaphore exclusively, sleeping if needed.
    fn write(&self) -> RwSemWriteGuard<'_, T> {
        // SAFETY: `sem` is initialized (type invariant).
        unsafe { bindings::down_write(self.sem.get()) };
        // SAFETY: This task now holds the semaphore for write; the guard releases it.
        unsafe { Held::new(self) }
    }
}

/// Shared access to the data of an [`RwSem`].
pub(crate) type RwSemReadGuard<'a, T> = Held<'a, ReadHeld<T>>;

/// Exclusive access to the data of an [`RwSem`].
pub(crate) type RwSemWriteGuard<'a, T> = Held<'a, WriteHeld<T>>;

/// [`RwSem`] held for read.
pub(crate) struct ReadHeld<T>(PhantomData<T>);

/// [`RwSem`] held for write.
pub(crate) struct WriteHeld<T>(PhantomData<T>);

// SAFETY: Readers only read `data`, and writers exclude them (`RwSem` invariant); `up_read`
// releases a read hold.
unsafe impl<T> HoldMode for ReadHeld<T> {
    type Lock = RwSem<T>;
    type Data = T;

    fn data(lock: &RwSem<T>) -> *mut T {
        lock.data.get()
    }

    unsafe fn unlock(lock: &RwSem<T>) {
        // SAFETY: The caller holds the semaphore for read.
        unsafe { bindings::up_read(lock.sem.get()) };
    }
}

// SAFETY: A write hold excludes every other access to `data` (`RwSem` invariant); `up_write`
// releases it.
unsafe impl<T> HoldMode for WriteHeld<T> {
    type Lock = RwSem<T>;
    type Data = T;

    fn data(lock: &RwSem<T>) -> *mut T {
        lock.data.get()
    }

    unsafe fn unlock(lock: &RwSem<T>) {
        // SAFETY: The caller holds the semaphore for write.
        unsafe { bindings::up_write(lock.sem.get()) };
    }
}

// SAFETY: As above: a write hold is exclusive.
unsafe impl<T> Exclusive for WriteHeld<T> {}

/// A `struct rw_semaphore` as a luo-core reader/writer lock.
pub(crate) struct KernelRwLock<T>(Pin<KBox<RwSem<T>>>);

impl<T> PRwLock<T> for KernelRwLock<T> {
    type Read<'a>
        = RwSemReadGuard<'a, T>
    where
        Self: 'a;
    type Write<'a>
        = RwSemWriteGuard<'a, T>
    where
        Self: 'a;

    fn try_new(value: T) -> Result<Self, AllocError> {
        let (name, key) = lock_class::<T>().ok_or(AllocError)?;
        KBox::pin_init(RwSem::new(value, name, key), GFP_KERNEL)
            .map(KernelRwLock)
            .map_err(|_| AllocError)
    }

    fn read(&self) -> RwSemReadGuard<'_, T> {
        self.0.read()
    }

    fn write(&self) -> RwSemWriteGuard<'_, T> {
        self.0.write()
    }
}

// -------------------------------------------------------------------------------------------
// File handlers and FLBs: the C objects, called through their ops tables
// -------------------------------------------------------------------------------------------

/// The bytes of a fixed-size C string field up to its first NUL (all of it if there is none;
/// luo-core then refuses the name).
fn c_field(field: &[u8]) -> &[u8] {
    let n = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..n]
}

/// Maps a handler or FLB callback's return value: 0 is success, `-errno` an error, and any
/// positive value, which the C API does not define, `EINVAL` (the C core lets it through:
/// spec B8).
///
/// `compat` is only called for the warning: finding the end of the C string costs a byte loop,
/// and `freeze` runs for every preserved file at reboot.
fn op_result<'a>(what: &str, compat: impl FnOnce() -> &'a [u8], ret: c_int) -> Result<(), Errno> {
    match ret {
        0 => Ok(()),
        r if r < 0 => Err(Errno::from_kernel_ret(r).unwrap_or(EINVAL)),
        r => {
            pr_warn!(
                "{:?}: {} returned {}, treated as -EINVAL\n",
                BStrDisplay(compat()),
                what,
                r
            );
            Err(EINVAL)
        }
    }
}

/// Displays bytes as text (for log lines with compatible strings).
struct BStrDisplay<'a>(&'a [u8]);

impl core::fmt::Debug for BStrDisplay<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("\"")?;
        for &b in self.0 {
            if b.is_ascii_graphic() || b == b' ' {
                core::fmt::Write::write_char(f, b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        f.write_str("\"")
    }
}

/// A file handler registered by C code (`struct liveupdate_file_handler`).
///
/// # Invariants
///
/// The handler and its ops table stay valid and unchanged while LUO can reach the handler:
/// from `liveupdate_register_file_handler()` until `liveupdate_unregister_file_handler()`
/// succeeded and the last file using it was finished or unpreserved (luo-core refuses to
/// unregister a handler with live files, and pins its owner module while it has files).
#[derive(Clone, Copy)]
pub(crate) struct CHandler(NonNull<bindings::liveupdate_file_handler>);

// SAFETY: A handler is an immutable C object whose callbacks may be called from any task, as
// the C core does.
unsafe impl Send for CHandler {}
// SAFETY: As for `Send`: the object is only read.
unsafe impl Sync for CHandler {}

impl CHandler {
    /// Wraps a handler pointer passed to the exported C API; `None` for NULL.
    ///
    /// # Safety
    ///
    /// A non-NULL `fh` must satisfy the type invariant (the C API's contract for handlers).
    pub(crate) unsafe fn from_raw(fh: *mut bindings::liveupdate_file_handler) -> Option<Self> {
        NonNull::new(fh).map(CHandler)
    }

    fn raw(&self) -> *mut bindings::liveupdate_file_handler {
        self.0.as_ptr()
    }

    fn ops(&self) -> Option<&bindings::liveupdate_file_ops> {
        // SAFETY: The handler is valid (type invariant); `ops` is NULL or points to its ops
        // table, which is valid as long as the handler is.
        unsafe { (*self.raw()).ops.as_ref() }
    }

    /// Arguments for an op, as the C core fills them.
    fn args(
        &self,
        file: Option<&File>,
        data: u64,
        private: usize,
        status: RetrieveStatus,
    ) -> bindings::liveupdate_file_op_args {
        bindings::liveupdate_file_op_args {
            handler: self.raw(),
            retrieve_status: status.as_raw(),
            file: file.map_or(ptr::null_mut(), |f| f.as_ptr()),
            serialized_data: data,
            private_data: private as *mut c_void,
        }
    }
}

impl FileHandler<KernelPlatform> for CHandler {
    fn key(&self) -> usize {
        self.raw() as usize
    }

    fn compatible(&self) -> &[u8] {
        // SAFETY: The handler is valid for at least as long as `self` (type invariant), and
        // `compatible` is a `const` array, never written after the object was defined.
        c_field(unsafe { &(*self.raw()).compatible })
    }

    fn has_required_ops(&self) -> bool {
        self.ops().is_some_and(|o| {
            o.can_preserve.is_some()
                && o.preserve.is_some()
                && o.unpreserve.is_some()
                && o.retrieve.is_some()
                && o.finish.is_some()
        })
    }

    fn get_owner(&self) -> bool {
        let owner = self.ops().map_or(ptr::null_mut(), |o| o.owner);
        // SAFETY: `owner` is NULL (built in) or the module that defined the handler, which is
        // alive: it cannot unload while its handler is registered.
        unsafe { bindings::luo_glue_try_module_get(owner) }
    }

    fn put_owner(&self) {
        let owner = self.ops().map_or(ptr::null_mut(), |o| o.owner);
        // SAFETY: Paired with a successful `get_owner`.
        unsafe { bindings::luo_glue_module_put(owner) }
    }

    fn can_preserve(&self, file: &ARef<File>) -> bool {
        match self.ops().and_then(|o| o.can_preserve) {
            // SAFETY: The op belongs to this handler (type invariant) and gets the handler and
            // an open file we hold a reference to, as the C core calls it.
            Some(f) => unsafe { f(self.raw(), file.as_ptr()) },
            None => false,
        }
    }

    fn preserve(&self, file: &ARef<File>) -> Result<Preserved, Errno> {
        let f = self.ops().and_then(|o| o.preserve).ok_or(EINVAL)?;
        let mut args = self.args(Some(file), 0, 0, RetrieveStatus::NotAttempted);
        // SAFETY: `args` is a valid `liveupdate_file_op_args` for this handler and a file we
        // hold a reference to, filled as the C core fills it for `preserve`.
        let ret = unsafe { f(&mut args) };
        op_result("preserve", || self.compatible(), ret)?;
        Ok(Preserved {
            data: args.serialized_data,
            private: args.private_data as usize,
        })
    }

    fn unpreserve(&self, file: &ARef<File>, state: Preserved) {
        if let Some(f) = self.ops().and_then(|o| o.unpreserve) {
            let mut args = self.args(
                Some(file),
                state.data,
                state.private,
                RetrieveStatus::NotAttempted,
            );
            // SAFETY: As for `preserve`, with the state `preserve` returned.
            unsafe { f(&mut args) };
        }
    }

    fn freeze(&self, file: &ARef<File>, state: &mut Preserved) -> Result<(), Errno> {
        let Some(f) = self.ops().and_then(|o| o.freeze) else {
            return Ok(());
        };
        let mut args = self.args(
            Some(file),
            state.data,
            state.private,
            RetrieveStatus::NotAttempted,
        );
        // SAFETY: As for `preserve`, with the current state.
        let ret = unsafe { f(&mut args) };
        op_result("freeze", || self.compatible(), ret)?;
        state.data = args.serialized_data;
        Ok(())
    }

    fn unfreeze(&self, file: &ARef<File>, state: Preserved) {
        if let Some(f) = self.ops().and_then(|o| o.unfreeze) {
            let mut args = self.args(
                Some(file),
                state.data,
                state.private,
                RetrieveStatus::NotAttempted,
            );
            // SAFETY: As for `preserve`, with the frozen state.
            unsafe { f(&mut args) };
        }
    }

    fn retrieve(&self, data: u64) -> Result<ARef<File>, Errno> {
        let f = self.ops().and_then(|o| o.retrieve).ok_or(EINVAL)?;
        let mut args = self.args(None, data, 0, RetrieveStatus::NotAttempted);
        // SAFETY: `args` is filled as the C core fills it for `retrieve`: the handler and the
        // data its `preserve`/`freeze` produced in the previous kernel.
        let ret = unsafe { f(&mut args) };
        // A handler that did not fail hands one reference to `args.file` to its caller
        // (upstream installs it even for a positive return); after a failure `file` is not
        // set, and is not touched.
        let file = if ret >= 0 {
            NonNull::new(args.file.cast::<File>()).map(|p| {
                // SAFETY: A non-NULL `file` set by a `retrieve` that did not fail is an open
                // file whose reference the handler hands to its caller; `File` is a
                // transparent wrapper of `struct file`.
                unsafe { ARef::from_raw(p) }
            })
        } else {
            None
        };
        // A positive return is refused: the reference taken over above is dropped.
        op_result("retrieve", || self.compatible(), ret)?;
        match file {
            Some(file) => Ok(file),
            None => {
                pr_warn!(
                    "{:?}: retrieve returned 0 without a file\n",
                    BStrDisplay(self.compatible())
                );
                Err(EINVAL)
            }
        }
    }

    fn can_finish(&self, file: Option<&ARef<File>>, data: u64, status: RetrieveStatus) -> bool {
        let Some(f) = self.ops().and_then(|o| o.can_finish) else {
            return true;
        };
        let mut args = self.args(file.map(|f| &**f), data, 0, status);
        // SAFETY: `args` is filled as the C core fills it for `can_finish`; `file` is NULL or a
        // file LUO holds a reference to.
        unsafe { f(&mut args) }
    }

    fn finish(&self, file: Option<&ARef<File>>, data: u64, status: RetrieveStatus) {
        if let Some(f) = self.ops().and_then(|o| o.finish) {
            let mut args = self.args(file.map(|f| &**f), data, 0, status);
            // SAFETY: As for `can_finish`.
            unsafe { f(&mut args) };
        }
    }

    fn get_id(&self, file: &ARef<File>) -> u64 {
        match self.ops().and_then(|o| o.get_id) {
            // SAFETY: The op gets an open file we hold a reference to.
            Some(f) => (unsafe { f(file.as_ptr()) }) as u64,
            None => KernelPlatform::file_identity(file),
        }
    }
}

/// An FLB defined by C code (`struct liveupdate_flb`).
///
/// LUO keeps its own state for the FLB (luo-core's registry); the `private` area of the C
/// object, whose layout the header fixes, is left untouched.
///
/// # Invariants
///
/// The FLB and its ops table stay valid and unchanged while LUO can reach it (the C API's
/// contract: FLBs are static objects of their owner, unregistered before it goes away).
#[derive(Clone, Copy)]
pub(crate) struct CFlb(NonNull<bindings::liveupdate_flb>);

// SAFETY: An FLB is a C object LUO only reads; its callbacks may run on any task, as in C.
unsafe impl Send for CFlb {}
// SAFETY: As for `Send`.
unsafe impl Sync for CFlb {}

impl CFlb {
    /// Wraps an FLB pointer passed to the exported C API; `None` for NULL.
    ///
    /// # Safety
    ///
    /// A non-NULL `flb` must satisfy the type invariant.
    pub(crate) unsafe fn from_raw(flb: *mut bindings::liveupdate_flb) -> Option<Self> {
        NonNull::new(flb).map(CFlb)
    }

    fn raw(&self) -> *mut bindings::liveupdate_flb {
        self.0.as_ptr()
    }

    fn ops(&self) -> Option<&bindings::liveupdate_flb_ops> {
        // SAFETY: The FLB is valid (type invariant); `ops` is NULL or its ops table.
        unsafe { (*self.raw()).ops.as_ref() }
    }

    fn args(&self, data: u64, obj: usize) -> bindings::liveupdate_flb_op_args {
        bindings::liveupdate_flb_op_args {
            flb: self.raw(),
            data,
            obj: obj as *mut c_void,
        }
    }
}

impl FlbOps for CFlb {
    fn key(&self) -> usize {
        self.raw() as usize
    }

    fn compatible(&self) -> &[u8] {
        // SAFETY: The FLB is valid (type invariant) and `compatible` is a `const` array.
        c_field(unsafe { &(*self.raw()).compatible })
    }

    fn has_required_ops(&self) -> bool {
        self.ops().is_some_and(|o| {
            o.preserve.is_some() && o.unpreserve.is_some() && o.retrieve.is_some() && o.finish.is_some()
        })
    }

    fn get_owner(&self) -> bool {
        let owner = self.ops().map_or(ptr::null_mut(), |o| o.owner);
        // SAFETY: `owner` is NULL (built in) or the live module that defined the FLB.
        unsafe { bindings::luo_glue_try_module_get(owner) }
    }

    fn put_owner(&self) {
        let owner = self.ops().map_or(ptr::null_mut(), |o| o.owner);
        // SAFETY: Paired with a successful `get_owner`.
        unsafe { bindings::luo_glue_module_put(owner) }
    }

    fn preserve(&self) -> Result<(u64, usize), Errno> {
        let f = self.ops().and_then(|o| o.preserve).ok_or(EINVAL)?;
        let mut args = self.args(0, 0);
        // SAFETY: `args` names this FLB, as the C core passes it to `preserve`.
        let ret = unsafe { f(&mut args) };
        op_result("FLB preserve", || self.compatible(), ret)?;
        Ok((args.data, args.obj as usize))
    }

    fn unpreserve(&self, data: u64, obj: usize) {
        if let Some(f) = self.ops().and_then(|o| o.unpreserve) {
            let mut args = self.args(data, obj);
            // SAFETY: `args` carries what `preserve` returned, as in the C core.
            unsafe { f(&mut args) };
        }
    }

    fn retrieve(&self, data: u64) -> Result<usize, Errno> {
        let f = self.ops().and_then(|o| o.retrieve).ok_or(EINVAL)?;
        let mut args = self.args(data, 0);
        // SAFETY: `args` carries the data handed over by the previous kernel, as in the C core.
        let ret = unsafe { f(&mut args) };
        op_result("FLB retrieve", || self.compatible(), ret)?;
        Ok(args.obj as usize)
    }

    fn finish(&self, data: u64, obj: usize) {
        if let Some(f) = self.ops().and_then(|o| o.finish) {
            let mut args = self.args(data, obj);
            // SAFETY: `args` carries what `retrieve` returned, as in the C core.
            unsafe { f(&mut args) };
        }
    }
}

// -------------------------------------------------------------------------------------------
// The platform: files and KHO handover memory
// -------------------------------------------------------------------------------------------

/// The virtual address of `len` bytes at `addr`, if they lie inside one page.
#[inline]
fn in_one_page(addr: u64, len: usize) -> Option<*mut u8> {
    let off = (addr % PAGE_SIZE as u64) as usize;
    if addr == 0 || off + len > PAGE_SIZE {
        return None;
    }
    Some(phys_to_virt(addr))
}

/// `__va()`: the direct-map address of a physical address. Serialization writes every entry
/// through it, so on x86-64, where `__va()` is an addition of `page_offset_base`
/// (`__PAGE_OFFSET`), it is computed here instead of through the C glue's function call.
#[inline]
fn phys_to_virt(addr: u64) -> *mut u8 {
    #[cfg(CONFIG_X86_64)]
    {
        // SAFETY: `page_offset_base` is set once during early boot (before any initcall) and
        // only read afterwards; reading it by value creates no reference to the static.
        let base = unsafe { bindings::page_offset_base };
        (addr as usize).wrapping_add(base as usize) as *mut u8
    }
    #[cfg(not(CONFIG_X86_64))]
    {
        // SAFETY: `phys_to_virt` only computes an address in the direct map.
        unsafe { bindings::luo_glue_phys_to_virt(addr) }.cast::<u8>()
    }
}

/// Is `page` (page-aligned) a page the previous kernel preserved and nobody restored yet?
fn incoming_page(page: u64) -> bool {
    // SAFETY: The helper only inspects the `struct page` of `page`, if it is online memory.
    unsafe { bindings::luo_glue_incoming_page(page) }
}

impl Platform for KernelPlatform {
    const PAGE_SIZE: usize = PAGE_SIZE;

    type File = ARef<File>;
    type Handler = CHandler;
    type Flb = CFlb;
    type Vec<T> = KernelVec<T>;
    type Map<K: Ord + Copy, V> = KernelMap<K, V>;
    type Shared<H: 'static, T: 'static> = KernelShared<H, T>;
    type Mutex<T> = KernelMutex<T>;
    type RwLock<T> = KernelRwLock<T>;

    fn file_identity(file: &ARef<File>) -> u64 {
        file.as_ptr() as usize as u64
    }

    fn dup_file(file: &ARef<File>) -> luo_core::Result<ARef<File>> {
        Ok(file.clone())
    }

    fn alloc_page(&self) -> luo_core::Result<u64> {
        // SAFETY: Any size may be asked for; the result is a valid pointer or an `ERR_PTR`.
        let ptr = unsafe { bindings::kho_alloc_preserve(PAGE_SIZE) };
        let ptr = from_err_ptr(ptr).map_err(|e| LuoError::Platform(errno_of(e)))?;
        // SAFETY: `ptr` is the direct-map address of the page just allocated.
        let pa = unsafe { bindings::luo_glue_virt_to_phys(ptr) };
        if pa == 0 {
            // Address 0 means "none" in the handover ABI; a page there cannot be used.
            // SAFETY: `ptr` came from `kho_alloc_preserve` and is not used again.
            unsafe { bindings::kho_unpreserve_free(ptr) };
            return Err(LuoError::NoMemory);
        }
        Ok(pa)
    }

    fn free_page(&self, addr: u64) {
        // SAFETY: luo-core frees only addresses `alloc_page` returned, once; their direct-map
        // address is what `kho_alloc_preserve` returned.
        unsafe { bindings::kho_unpreserve_free(bindings::luo_glue_phys_to_virt(addr)) };
    }

    fn release_incoming_page(&self, addr: u64) {
        // `kho_restore_free` WARNs on memory that is not a preserved page; luo-core releases
        // only pages it could read, but check again rather than trust the handover.
        if !incoming_page(addr) {
            pr_warn!("not releasing {:#x}: not a preserved page\n", addr);
            return;
        }
        // SAFETY: `addr` is a page the previous kernel preserved with `kho_alloc_preserve` and
        // nobody restored (checked above); its direct-map address is what the function takes.
        unsafe { bindings::kho_restore_free(bindings::luo_glue_phys_to_virt(addr)) };
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), HandoverError> {
        let page = addr - addr % PAGE_SIZE as u64;
        let src = in_one_page(addr, buf.len()).ok_or(HandoverError::BadAddress { at: addr })?;
        // Only pages KHO preserved for this kernel are read: an address from a corrupt
        // handover may name anything, including memory that is not RAM.
        if !incoming_page(page) {
            return Err(HandoverError::BadAddress { at: addr });
        }
        // SAFETY: `src..src + buf.len()` lies in one page of RAM (`pfn_to_online_page`
        // succeeded) that KHO reserved for us, mapped in the direct map; nothing writes it.
        unsafe { ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write(&self, addr: u64, data: &[u8]) -> luo_core::Result {
        let dst = in_one_page(addr, data.len()).ok_or(LuoError::Platform(EINVAL))?;
        // SAFETY: luo-core writes only into pages `alloc_page` gave it and it still owns; the
        // range lies in one of them (checked), in the direct map.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    fn incoming_root(&self) -> Result<Option<(u64, u64)>, HandoverError> {
        // SAFETY: No preconditions.
        if !unsafe { bindings::kho_is_enabled() } {
            return Ok(None);
        }
        let mut phys: bindings::phys_addr_t = 0;
        let mut size: usize = 0;
        // SAFETY: The name is a NUL-terminated string; `phys` and `size` are valid for writes.
        let ret = unsafe { bindings::kho_retrieve_subtree(c"LUO".as_char_ptr(), &mut phys, &mut size) };
        match ret {
            0 => Ok(Some((phys, size as u64))),
            r if r == -(bindings::ENOENT as c_int) => Ok(None),
            r => {
                pr_err!("failed to retrieve LUO state 'LUO' from KHO: {}\n", r);
                Err(HandoverError::BadAddress { at: 0 })
            }
        }
    }

    fn publish_root(&self, addr: u64, size: u64) -> luo_core::Result {
        let blob = in_one_page(addr, size as usize).ok_or(LuoError::Platform(EINVAL))?;
        // SAFETY: `blob` is the direct-map address of the preserved root page; KHO records
        // its physical address and size under the name.
        let ret = unsafe {
            bindings::kho_add_subtree(c"LUO".as_char_ptr(), blob.cast::<c_void>(), size as usize)
        };
        match Errno::from_kernel_ret(ret) {
            None => Ok(()),
            Some(e) => Err(LuoError::Platform(e)),
        }
    }

    fn log(&self, level: Level, args: core::fmt::Arguments<'_>) {
        match level {
            Level::Error => pr_err!("{}\n", args),
            Level::Warn => pr_warn!("{}\n", args),
            Level::Info => pr_info!("{}\n", args),
        }
    }
}
