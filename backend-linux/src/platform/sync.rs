// SPDX-License-Identifier: GPL-2.0

//! Locks: `struct mutex` and `struct rw_semaphore` for luo-core, with one lockdep class per
//! protected type.
//!
//! The kernel crate of 7.3 has a `Mutex` but no reader/writer semaphore, and its locks take a
//! static lock class at the construction site, which luo-core's generic constructors cannot
//! give. So both locks are written here on one pattern: a pinned C lock beside its data, a
//! [`HoldMode`] that says what a hold allows and how it ends, and one guard type, [`Held`],
//! for every mode.
//!
//! And [`PublishOnce`], what the orchestrator lives in from the early initcall on.

use core::{
    cell::UnsafeCell,
    marker::{
        PhantomData,
        PhantomPinned, //
    },
    ops::{
        Deref,
        DerefMut, //
    },
    ptr,
    sync::atomic::{
        AtomicPtr,
        Ordering, //
    },
};

use kernel::{
    bindings,
    prelude::*,
    sync::{
        LockClassKey,
        SetOnce, //
    },
    types::{
        NotThreadSafe,
        Opaque, //
    },
};

use luo_core::{
    errno::AllocError,
    PMutex,
    PRwLock, //
};

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
pub(super) fn lock_class<T>() -> Option<(&'static CStr, Pin<&'static LockClassKey>)> {
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
    pub(super) fn new(value: T, name: &'static CStr, key: Pin<&'static LockClassKey>) -> impl PinInit<Self> {
        // INVARIANT: `mutex` is initialized in place before the lock can be reached, and `data`
        // is reachable only through `lock`'s guard.
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
    pub(super) fn lock(&self) -> KMutexGuard<'_, T> {
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
        // INVARIANT: `sem` is initialized in place before the lock can be reached, and `data` is
        // reachable only through the read and write guards.
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

/// A value set once and then only read, for the life of the kernel, at the cost of one load
/// per read.
///
/// Every session ioctl and every call of the C API needs the orchestrator. The kernel crate's
/// `SetOnce::as_ref` makes two out-of-line calls per read (the `Atomic` accessor and its C
/// acquire helper), so the value's address is kept beside it in a `core` atomic: a
/// publish-once pointer needs nothing from the kernel memory model that `core`'s
/// acquire/release pair does not give.
///
/// # Invariants
///
/// `ptr` is null or the address of `cell`'s value; it is set once, after `cell` was populated,
/// and a populated `SetOnce` never changes or drops its value while it lives.
pub(crate) struct PublishOnce<T> {
    cell: SetOnce<T>,
    ptr: AtomicPtr<T>,
}

impl<T> PublishOnce<T> {
    /// An empty cell, for a `static`.
    pub(crate) const fn new() -> Self {
        // INVARIANT: `ptr` is null.
        PublishOnce {
            cell: SetOnce::new(),
            ptr: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Publishes `value`; false (and `value` dropped) if a value was published before.
    pub(crate) fn publish(&self, value: T) -> bool {
        if !self.cell.populate(value) {
            return false;
        }
        if let Some(v) = self.cell.as_ref() {
            // INVARIANT: `v` is the populated cell's value; `populate` succeeded only here, once.
            self.ptr.store(ptr::from_ref(v).cast_mut(), Ordering::Release);
        }
        true
    }

    /// The value, once published.
    #[inline]
    pub(crate) fn get(&self) -> Option<&T> {
        let p = self.ptr.load(Ordering::Acquire);
        // SAFETY: By the type invariant `p` is null or the address of `cell`'s value, which
        // lives as long as `self` and is only ever shared; the acquire load pairs with the
        // release store in `publish`, so the value is fully written.
        unsafe { p.cast_const().as_ref() }
    }
}

