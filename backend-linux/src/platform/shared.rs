// SPDX-License-Identifier: GPL-2.0

//! A session's allocation ([`KernelShared`]) and the session tables ([`KernelIndex`]).
//!
//! The C core's `struct luo_session` embeds its `struct mutex` and the `list_head` of its
//! table, so creating a session is one allocation and closing one is a `list_del` and a
//! `kfree`. A session here is one allocation too: its head, its files behind a
//! `struct mutex`, and the links of the table it was born in: its place in a hash bucket's
//! chain, its neighbours in creation order, and the table's reference to it. Inserting
//! allocates nothing else (but the bucket array when it doubles); removing a session the
//! caller holds is two unlinks, with no name lookup and no node to free. Lookups hash the name
//! with the table's secret key and compare within one bucket, where the C core scans its whole
//! list (2000 sessions: 202 M instructions to create them there).
//!
//! An earlier version kept a red-black tree of names: closing a session then cost an
//! `rb_erase`, 230 instructions on average in a table of 2000 (its rebalancing), which made
//! a close 1.12 times the C core's. A hash table whose key nobody outside knows keeps lookups
//! short for any names a client can choose, and a close O(1) as the C core's.
//!
//! The links are only ever touched by the one table an object was born in (its `owner`, a
//! number no other table has), so a session handed to the wrong table is refused, not
//! unlinked from chains it is not in.
//!
//! The object counts its references itself, inline (`Arc`'s algorithm on a `core` atomic),
//! where `kernel::sync::Arc` calls out to the C `refcount_t` helpers: creating and closing a
//! session take and drop references four times, and those calls were a tenth of what a close
//! cost over the C core, which frees its session with a bare `kfree`.

use core::{
    cell::UnsafeCell,
    marker::PhantomData,
    mem::ManuallyDrop,
    ops::Deref,
    ptr::{
        self,
        NonNull, //
    },
    sync::atomic::{
        fence,
        AtomicUsize,
        Ordering as MemOrder, //
    },
};

use kernel::{
    bindings,
    prelude::*,
    sync::{
        atomic::{
            ordering::Relaxed,
            Atomic, //
        },
        LockClassKey, //
    },
};

use luo_core::{
    errno::AllocError,
    IndexKey,
    InsertError,
    SharedIndex,
    SharedLocked, //
};

use super::sync::{
    lock_class,
    KMutex,
    KMutexGuard, //
};

/// A head, a `struct mutex`-protected body and the links of a [`KernelIndex`], in one
/// allocation, initialized in place.
#[pin_data]
pub(crate) struct SharedInner<H, T> {
    links: Links<H, T>,
    /// The references: one per [`KernelShared`], the index's `member` among them.
    refs: AtomicUsize,
    head: H,
    #[pin]
    body: KMutex<T>,
}

/// A count past which references are never given back (`refcount_t` saturates the same way):
/// the object then leaks instead of being freed while a reference may remain. 2^63 references
/// do not happen; the check is what makes the increment safe without that argument.
const SATURATED: usize = usize::MAX / 2;

/// Where an object stands in the index it was born in.
struct LinkState<H, T> {
    /// The next member in the same hash bucket (null at the end).
    hnext: *const SharedInner<H, T>,
    /// What points at this member in its bucket's chain: the bucket's slot or the previous
    /// member's `hnext` (`struct hlist_node`'s `pprev`).
    hpprev: *mut *const SharedInner<H, T>,
    /// Neighbours in creation order (null at the ends).
    prev: *const SharedInner<H, T>,
    next: *const SharedInner<H, T>,
    /// The key's hash under the index's key, kept for rehashing and to skip most compares.
    hash: u32,
    /// The index's reference to the object: `Some` exactly while it is a member, so `None`
    /// whenever the object is freed (a member is never freed: the index holds it), which
    /// is why it needs no drop (and the free no test of it).
    member: ManuallyDrop<Option<KernelShared<H, T>>>,
}

/// The links of an object.
///
/// # Invariants
///
/// `owner` is the `id` of the [`KernelIndex`] the object was born in (0: none), fixed at
/// creation. `state` is read only through a shared borrow of that index and written only
/// through an exclusive one: no other code touches it.
struct Links<H, T> {
    state: UnsafeCell<LinkState<H, T>>,
    owner: usize,
}

// SAFETY: `state` holds pointers to objects of its index and the index's reference; they move
// between threads with the index, which owns them (type invariant).
unsafe impl<H: Send + Sync, T: Send> Send for Links<H, T> {}
// SAFETY: Every access to `state` goes through a borrow of the owning index (type invariant),
// so Rust's rules on the index serialize them: reads under `&index`, writes under
// `&mut index`.
unsafe impl<H: Send + Sync, T: Send> Sync for Links<H, T> {}

impl<H, T> Links<H, T> {
    fn new(owner: usize) -> Self {
        Links {
            state: UnsafeCell::new(LinkState {
                hnext: ptr::null(),
                hpprev: ptr::null_mut(),
                prev: ptr::null(),
                next: ptr::null(),
                hash: 0,
                member: ManuallyDrop::new(None),
            }),
            owner,
        }
    }
}

/// A counted reference to a [`SharedInner`]: luo-core's [`SharedLocked`].
///
/// # Invariants
///
/// `ptr` points at a live `SharedInner` allocated by [`new_object`] as a `KBox`, and this
/// handle owns one of its `refs`; the object is freed when the last one goes.
#[repr(transparent)]
pub(crate) struct KernelShared<H, T> {
    ptr: NonNull<SharedInner<H, T>>,
    _owns: PhantomData<SharedInner<H, T>>,
}

// SAFETY: A handle gives `&H` and the locked body, and may drop the object on any thread: the
// same bounds as `Arc<SharedInner>` (`SharedInner` is `Send + Sync` under them).
unsafe impl<H: Send + Sync, T: Send> Send for KernelShared<H, T> {}
// SAFETY: As above.
unsafe impl<H: Send + Sync, T: Send> Sync for KernelShared<H, T> {}

impl<H, T> KernelShared<H, T> {
    #[inline]
    fn inner(&self) -> &SharedInner<H, T> {
        // SAFETY: The object lives while this handle's reference does (type invariant).
        unsafe { self.ptr.as_ref() }
    }

    /// Drops this reference while the caller holds another to the same object, so that it
    /// cannot be the last: the count only goes down (inline; `drop` keeps the free out of
    /// line). Were it the last after all, the object would leak, never be freed early.
    #[inline]
    fn release_held(self) {
        // Release, as in `drop`: what this handle did happens before a later free. The other
        // reference keeps the count above zero, so there is nothing to free.
        self.inner().refs.fetch_sub(1, MemOrder::Release);
        core::mem::forget(self);
    }

    /// Frees the object (out of line: `drop` is the decrement and its test).
    ///
    /// # Safety
    ///
    /// Called once, by the drop of the last reference.
    #[inline(never)]
    unsafe fn free(&mut self) {
        fence(MemOrder::Acquire);
        let obj = self.ptr.as_ptr();
        // SAFETY: That was the last reference (caller), so nothing else can reach the
        // object; it is dropped in place once. It was allocated as a `KBox` by `new_object`
        // (type invariant), that is by `kmalloc`, and is freed once with `kfree`: what
        // `KBox`'s drop would do through `Kmalloc::free` (`krealloc(p, 0)`), a call less.
        unsafe {
            ptr::drop_in_place(obj);
            bindings::kfree(obj.cast());
        }
    }

    /// Gives the reference up as a raw pointer (a session file's `private_data`), to be taken
    /// back once by [`KernelShared::from_raw`].
    pub(crate) fn into_raw(self) -> *mut c_void {
        let ptr = self.ptr.as_ptr().cast();
        core::mem::forget(self);
        ptr
    }

    /// Takes back a reference given up by [`KernelShared::into_raw`].
    ///
    /// # Safety
    ///
    /// `ptr` came from `into_raw` on a handle of this type, and its reference is taken back
    /// once (or the handle borrowed, and never dropped, e.g. in a `ManuallyDrop`).
    pub(crate) unsafe fn from_raw(ptr: *mut c_void) -> Self {
        // INVARIANT: the reference `into_raw` gave up comes back with the pointer.
        KernelShared {
            // SAFETY: `into_raw` gave a non-null pointer (caller).
            ptr: unsafe { NonNull::new_unchecked(ptr.cast()) },
            _owns: PhantomData,
        }
    }
}

impl<H, T> Clone for KernelShared<H, T> {
    #[inline]
    fn clone(&self) -> Self {
        // Relaxed, as `Arc`: the new reference is made from one the caller holds, so the
        // object cannot go meanwhile, and nothing is published by taking a reference.
        let old = self.inner().refs.fetch_add(1, MemOrder::Relaxed);
        if old >= SATURATED {
            self.inner().refs.store(SATURATED, MemOrder::Relaxed);
        }
        // INVARIANT: one more reference, owned by the new handle.
        KernelShared {
            ptr: self.ptr,
            _owns: PhantomData,
        }
    }
}

impl<H, T> Drop for KernelShared<H, T> {
    #[inline]
    fn drop(&mut self) {
        // Release, then Acquire before freeing, as `Arc`: every use of the object through
        // another handle happens before the free.
        if self.inner().refs.fetch_sub(1, MemOrder::Release) == 1 {
            // SAFETY: That was the last reference; this is its drop.
            unsafe { self.free() };
        }
    }
}

impl<H, T> Deref for KernelShared<H, T> {
    type Target = H;

    #[inline]
    fn deref(&self) -> &H {
        &self.inner().head
    }
}

/// Allocates an object born in the index `owner` (0: none), with one reference.
fn new_object<H, T>(
    owner: usize,
    head: H,
    body: T,
    class: (&'static CStr, Pin<&'static LockClassKey>),
) -> Result<KernelShared<H, T>, AllocError> {
    let (name, key) = class;
    let object = KBox::pin_init(
        pin_init!(SharedInner {
            links: Links::new(owner),
            refs: AtomicUsize::new(1),
            head,
            body <- KMutex::new(body, name, key),
        }),
        GFP_KERNEL,
    )
    .map_err(|_| AllocError)?;
    // SAFETY: The object stays where it is (it is only ever reached through the pointer and
    // freed in place by `KernelShared::drop`), so taking it out of the `Pin` is sound.
    let raw = KBox::into_raw(unsafe { Pin::into_inner_unchecked(object) });
    // INVARIANT: a live `KBox` allocation whose one reference the new handle owns.
    Ok(KernelShared {
        // SAFETY: `KBox::into_raw` never returns null.
        ptr: unsafe { NonNull::new_unchecked(raw) },
        _owns: PhantomData,
    })
}

impl<H, T> SharedLocked<H, T> for KernelShared<H, T> {
    type Guard<'a>
        = KMutexGuard<'a, T>
    where
        Self: 'a;

    fn try_new(head: H, value: T) -> Result<Self, AllocError> {
        let class = lock_class::<T>().ok_or(AllocError)?;
        new_object(0, head, value, class)
    }

    #[inline]
    fn lock(&self) -> KMutexGuard<'_, T> {
        self.inner().body.lock()
    }

    #[inline]
    fn ptr_eq(a: &Self, b: &Self) -> bool {
        a.ptr == b.ptr
    }
}

/// Numbers of indexes: each index gets one no other index has had (0 is "none").
static NEXT_INDEX: Atomic<usize> = Atomic::new(1);

/// Buckets of a table that has members: at least this many, a power of two.
const MIN_BUCKETS: usize = 16;

/// A session table: a hash table of chains through its members, keyed by their heads with a
/// secret per-table key, and a list in insertion order, over objects born in it.
///
/// A lookup hashes the key (`hsiphash`, the kernel's hash for tables fed by untrusted input:
/// luod lets unprivileged clients choose most of a session name, and without the table's
/// random key nobody can aim names at one bucket) and compares within one bucket. Removing a
/// member unlinks it from its chain and the list (`hlist_del`, `list_del`), with no lookup.
/// The buckets double when the members outnumber them, and go back to the smallest array
/// when the last member goes (not halved on the way: the array is at most what the table once
/// needed, eight bytes a session, and luod caps sessions per client); if memory for a bigger
/// array is short, the chains just grow longer. The bucket
/// array is the only other allocation, and the list has no sentinel, so nothing points at the
/// index itself and it may move (luo-core swaps a freshly built table in).
///
/// # Invariants
///
/// `id` is unique among indexes and never 0. The objects whose `member` is `Some` are exactly
/// those with `owner == id`, each in the chain of bucket `hash & (buckets.len() - 1)` (with
/// `hpprev` pointing at what points at it) and in the list from `first` to `last`, `len` of
/// them; `buckets` is empty only when there are none, and otherwise a power of two long. The
/// index owns the reference each `member` holds, and every link points at such an object.
pub(crate) struct KernelIndex<H, T> {
    id: usize,
    key: bindings::hsiphash_key_t,
    buckets: KVVec<*const SharedInner<H, T>>,
    /// `len` at which the buckets double (their number, 0 without buckets): set with them,
    /// so that an insert tests one number.
    grow_at: usize,
    first: *const SharedInner<H, T>,
    last: *const SharedInner<H, T>,
    len: usize,
    /// The lockdep class of the members' mutexes, looked up on the first insert.
    class: Option<(&'static CStr, Pin<&'static LockClassKey>)>,
}

// SAFETY: The index owns counted references to its members (type invariant), which may move
// between threads when `H` and `T` may.
unsafe impl<H: Send + Sync, T: Send> Send for KernelIndex<H, T> {}
// SAFETY: A shared borrow of the index only reads links and hands out `&KernelShared`, which
// is `Sync` under the same bounds.
unsafe impl<H: Send + Sync, T: Send> Sync for KernelIndex<H, T> {}

impl<H, T> Default for KernelIndex<H, T> {
    fn default() -> Self {
        let mut key: bindings::hsiphash_key_t = pin_init::zeroed();
        // SAFETY: `key` is valid for writes of its size.
        unsafe {
            bindings::get_random_bytes(
                ptr::addr_of_mut!(key).cast(),
                core::mem::size_of_val(&key),
            )
        };
        // INVARIANT: a number never handed out before (a `usize` does not wrap in the life of
        // a kernel); no members and no buckets.
        KernelIndex {
            id: NEXT_INDEX.fetch_add(1, Relaxed),
            key,
            buckets: KVVec::new(),
            grow_at: 0,
            first: ptr::null(),
            last: ptr::null(),
            len: 0,
            class: None,
        }
    }
}

impl<H, T> KernelIndex<H, T> {
    /// The link state of `obj`.
    ///
    /// # Safety
    ///
    /// `obj` is a live object with `owner == self.id`; the caller reads the result only while
    /// it borrows `self`, and writes it only while it borrows `self` exclusively.
    #[inline]
    unsafe fn state(&self, obj: *const SharedInner<H, T>) -> *mut LinkState<H, T> {
        // SAFETY: `obj` is live (caller).
        unsafe { (*obj).links.state.get() }
    }

    /// The slot of the bucket for `hash`; the table has buckets.
    #[inline]
    fn slot(&mut self, hash: u32) -> *mut *const SharedInner<H, T> {
        let mask = self.buckets.len() - 1;
        let buckets = self.buckets.as_mut_ptr();
        // SAFETY: `hash & mask` is below the length, a power of two (type invariant).
        unsafe { buckets.add(hash as usize & mask) }
    }

    /// Moves every member into a new array of `n` buckets (a power of two, at least
    /// `MIN_BUCKETS`); keeps the old array if there is no memory for the new one.
    fn rehash(&mut self, n: usize) {
        let Ok(buckets) = KVVec::from_elem(ptr::null(), n, GFP_KERNEL) else {
            return;
        };
        self.buckets = buckets;
        self.grow_at = n;
        let mut obj = self.first;
        while !obj.is_null() {
            // SAFETY: `obj` is a member (type invariant); its links are ours (`&mut self`).
            let state = unsafe { self.state(obj) };
            // SAFETY: As above.
            let (next, hash) = unsafe { ((*state).next, (*state).hash) };
            let slot = self.slot(hash);
            // SAFETY: `state` and the chain's head (a member or null) are ours to write.
            // INVARIANT: the member moves to the head of its new bucket's chain.
            unsafe { link_head(slot, obj, state) };
            obj = next;
        }
    }
}

/// Puts `obj` (whose state is `state`) at the head of the chain that `slot` starts.
///
/// # Safety
///
/// `slot` is a bucket slot of the caller's index; `obj` and every object in the chain are
/// members (or about to be) whose links the caller may write.
#[inline]
unsafe fn link_head<H, T>(
    slot: *mut *const SharedInner<H, T>,
    obj: *const SharedInner<H, T>,
    state: *mut LinkState<H, T>,
) {
    // SAFETY: As the caller promises.
    unsafe {
        let head = *slot;
        (*state).hnext = head;
        (*state).hpprev = slot;
        if let Some(head) = head.as_ref() {
            (*head.links.state.get()).hpprev = ptr::addr_of_mut!((*state).hnext);
        }
        *slot = obj;
    }
}

impl<H: IndexKey, T> KernelIndex<H, T> {
    /// The key's hash under this table's key.
    #[inline]
    fn hash(&self, key: &H::Key) -> u32 {
        let bytes = H::key_bytes(key);
        // SAFETY: `bytes` is valid for reads of its length; the key is this table's.
        // (`hsiphash()` is a C inline that calls this on every architecture with efficient
        // unaligned access, and it is correct on all of them.)
        unsafe { bindings::__hsiphash_unaligned(bytes.as_ptr().cast(), bytes.len(), &self.key) }
    }

    /// The member with this key and hash, searching its bucket.
    #[inline]
    fn find(&self, key: &H::Key, hash: u32) -> Option<*const SharedInner<H, T>> {
        if self.buckets.is_empty() {
            return None;
        }
        let mask = self.buckets.len() - 1;
        let mut obj = *self.buckets.get(hash as usize & mask)?;
        while !obj.is_null() {
            // SAFETY: Every object in a chain is a member, alive while the index holds its
            // reference (type invariant); heads are immutable; links are read under `&self`.
            let (state, here) = unsafe { (&*self.state(obj), (*obj).head.index_key()) };
            if state.hash == hash && here == key {
                return Some(obj);
            }
            obj = state.hnext;
        }
        None
    }
}

impl<H: IndexKey, T> SharedIndex<H, T> for KernelIndex<H, T> {
    type Shared = KernelShared<H, T>;
    type Iter<'a>
        = KernelIndexIter<'a, H, T, false>
    where
        Self: 'a,
        KernelShared<H, T>: 'a;
    type IterRev<'a>
        = KernelIndexIter<'a, H, T, true>
    where
        Self: 'a,
        KernelShared<H, T>: 'a;

    fn try_insert_new(&mut self, head: H, body: T) -> Result<&KernelShared<H, T>, InsertError> {
        // A taken key costs no allocation.
        let hash = self.hash(head.index_key());
        if self.find(head.index_key(), hash).is_some() {
            return Err(InsertError::Exists);
        }
        if self.len >= self.grow_at {
            // `grow_at` is 0 before the first insert: the first array.
            self.rehash((self.buckets.len() * 2).max(MIN_BUCKETS));
            if self.buckets.is_empty() {
                return Err(InsertError::NoMemory);
            }
        }
        let class = match self.class {
            Some(class) => class,
            None => *self.class.insert(lock_class::<T>().ok_or(AllocError)?),
        };
        let object = new_object(self.id, head, body, class)?;
        let obj = object.ptr.as_ptr().cast_const();
        // SAFETY: `obj` was born in this index (`owner == self.id`) and is not linked yet; it
        // is reached only through `&mut self` from here on.
        let state = unsafe { self.state(obj) };
        let slot = self.slot(hash);
        // SAFETY: `state` is valid and ours to write (above); the chain's members and the
        // list's last member are ours to write (`&mut self`).
        unsafe {
            (*state).hash = hash;
            link_head(slot, obj, state);
            (*state).prev = self.last;
            if let Some(last) = self.last.as_ref() {
                (*last.links.state.get()).next = obj;
            } else {
                self.first = obj;
            }
        }
        self.last = obj;
        self.len += 1;
        // INVARIANT: the object is in its bucket's chain and at the end of the list, and its
        // `member` holds the index's reference.
        // SAFETY: As above.
        let member = unsafe { &mut (*state).member };
        Ok(member.insert(object))
    }

    #[inline]
    fn get(&self, key: &H::Key) -> Option<&KernelShared<H, T>> {
        let obj = self.find(key, self.hash(key))?;
        // SAFETY: `obj` is a member (found in its chain), read under `&self`; its `member` is
        // `Some` and stays so until an exclusive borrow of the index removes it.
        unsafe { (*self.state(obj)).member.as_ref() }
    }

    #[inline]
    fn remove(&mut self, s: &KernelShared<H, T>) -> bool {
        let obj = s.ptr.as_ptr().cast_const();
        // `owner` is immutable, so reading it is fine whichever index the object is in.
        if s.inner().links.owner != self.id {
            return false;
        }
        // SAFETY: The object was born in this index; we hold `&mut self`.
        let state = unsafe { self.state(obj) };
        // SAFETY: As above; `member` tells whether it is still linked.
        let Some(reference) = (unsafe { (*state).member.take() }) else {
            return false;
        };
        // SAFETY: The object is a member, so it is in a chain (`hpprev` points at what points
        // at it) and in the list; its neighbours there are members whose links are ours.
        unsafe {
            let (hnext, hpprev) = ((*state).hnext, (*state).hpprev);
            *hpprev = hnext;
            if let Some(n) = hnext.as_ref() {
                (*n.links.state.get()).hpprev = hpprev;
            }
            let (prev, next) = ((*state).prev, (*state).next);
            match prev.as_ref() {
                Some(p) => (*p.links.state.get()).next = next,
                None => self.first = next,
            }
            match next.as_ref() {
                Some(n) => (*n.links.state.get()).prev = prev,
                None => self.last = prev,
            }
        }
        // INVARIANT: unlinked from its chain and the list, `member` is `None`, one member less.
        self.len -= 1;
        if self.len == 0 && self.buckets.len() > MIN_BUCKETS {
            // The last member went: a grown array goes back to the smallest one. It does not
            // shrink before that: a table that emptied by halves would rehash what is left
            // at every halving, a cost every close shares. The smallest one stays (128
            // bytes), so that creating and closing one session allocates only the session.
            self.rehash(MIN_BUCKETS);
        }
        // `s` is another reference (a borrow of the index's own could not coexist with
        // `&mut self`), so the index's is not the last.
        reference.release_held();
        true
    }

    fn len(&self) -> usize {
        self.len
    }

    fn iter(&self) -> KernelIndexIter<'_, H, T, false> {
        KernelIndexIter {
            next: self.first,
            _index: PhantomData,
        }
    }

    fn iter_rev(&self) -> KernelIndexIter<'_, H, T, true> {
        KernelIndexIter {
            next: self.last,
            _index: PhantomData,
        }
    }
}

impl<H, T> Drop for KernelIndex<H, T> {
    fn drop(&mut self) {
        let mut obj = self.first;
        while !obj.is_null() {
            // SAFETY: `obj` is a member (type invariant) and the index is going away: its
            // links are ours. Read `next` before the reference goes (it may be the last).
            let reference = unsafe {
                let state = self.state(obj);
                obj = (*state).next;
                (*state).member.take()
            };
            drop(reference);
        }
    }
}

/// The members of a [`KernelIndex`], oldest first (or newest first: `BACK`). One pointer: a
/// serialization walks every session with it, and keeps it in memory.
pub(crate) struct KernelIndexIter<'a, H, T, const BACK: bool> {
    next: *const SharedInner<H, T>,
    _index: PhantomData<&'a KernelIndex<H, T>>,
}

impl<'a, H: 'a, T: 'a, const BACK: bool> Iterator for KernelIndexIter<'a, H, T, BACK> {
    type Item = &'a KernelShared<H, T>;

    #[inline]
    fn next(&mut self) -> Option<&'a KernelShared<H, T>> {
        // SAFETY: A non-null `next` is a member of the index borrowed for `'a`: the list's
        // ends and links point only at members (type invariant), read under that borrow.
        let state = unsafe { &*(*self.next.as_ref()?).links.state.get() };
        self.next = if BACK { state.prev } else { state.next };
        state.member.as_ref()
    }
}

/// Test only (`CONFIG_LIVEUPDATE_TEST`), run at boot: a [`KernelIndex`] against what luo-core
/// relies on, and against what luo-core never does but the index must refuse (a member handed
/// to another index, a member removed twice); the buckets grow on the way and go with the last
/// member. A
/// failure is a `WARNING:` splat, which fails every VM suite; under KASAN, a link or count
/// gone wrong is a report.
#[cfg(CONFIG_LIVEUPDATE_TEST)]
pub(crate) fn self_test() -> Result<(), &'static str> {
    /// A head keyed by the bytes of a number.
    struct Key([u8; 4]);

    impl IndexKey for Key {
        type Key = [u8; 4];

        fn index_key(&self) -> &[u8; 4] {
            &self.0
        }

        fn key_bytes(key: &[u8; 4]) -> &[u8] {
            key
        }
    }

    type Index = KernelIndex<Key, u32>;

    fn check(ok: bool, what: &'static str) -> Result<(), &'static str> {
        if ok {
            Ok(())
        } else {
            Err(what)
        }
    }

    fn key(k: u32) -> [u8; 4] {
        k.to_le_bytes()
    }

    fn get(index: &Index, k: u32) -> Option<&KernelShared<Key, u32>> {
        index.get(&key(k))
    }

    /// The keys in insertion order, both ways, and each found by its key with its own body.
    fn same(index: &Index, keys: &[u32]) -> Result<(), &'static str> {
        check(index.len() == keys.len(), "len")?;
        let of = |s: &KernelShared<Key, u32>| u32::from_le_bytes(s.0);
        check(index.iter().map(of).eq(keys.iter().copied()), "forward order")?;
        check(index.iter_rev().map(of).eq(keys.iter().rev().copied()), "backward order")?;
        for &k in keys {
            let found = get(index, k).ok_or("lookup")?;
            check(of(found) == k && *found.lock() == k, "lookup finds its own")?;
        }
        Ok(())
    }

    const N: u32 = 200;
    let mut a = Index::default();
    let mut b = Index::default();
    let mut keys = KVec::with_capacity(N as usize, GFP_KERNEL).map_err(|_| "memory")?;
    // A scrambled insertion order; the buckets double from 16 to 256 on the way.
    for i in 0..N {
        let k = (i * 37) % N;
        a.try_insert_new(Key(key(k)), k).map_err(|_| "insert")?;
        keys.push(k, GFP_KERNEL).map_err(|_| "memory")?;
    }
    check(a.buckets.len() == 256, "buckets grow with the members")?;
    same(&a, &keys)?;
    check(get(&a, N).is_none(), "a missing key")?;
    check(
        matches!(a.try_insert_new(Key(key(5)), 0), Err(InsertError::Exists)),
        "a taken key",
    )?;

    // Another index does not touch a's member, even under the same key.
    let five = get(&a, 5).ok_or("lookup")?.clone();
    check(!b.remove(&five), "removed from the wrong index")?;
    b.try_insert_new(Key(key(5)), 50).map_err(|_| "insert in b")?;
    check(!b.remove(&five), "removed from the wrong index by key")?;
    check(get(&b, 5).is_some_and(|s| *s.lock() == 50), "b's own member")?;

    // Removing: once; the handle outlives its membership; the others stay in order.
    check(a.remove(&five), "remove")?;
    check(!a.remove(&five), "removed twice")?;
    check(*five.lock() == 5, "the removed object is still alive")?;
    keys.retain(|k| *k != 5);
    same(&a, &keys)?;
    // All but seven go, every other one first; the buckets stay.
    let mut i = 0;
    while i < keys.len() {
        let member = get(&a, keys[i]).ok_or("lookup")?.clone();
        check(a.remove(&member), "remove")?;
        keys.remove(i).map_err(|_| "index")?;
        i += 1;
    }
    same(&a, &keys)?;
    while keys.len() > 7 {
        let last = keys.pop().ok_or("keys")?;
        let member = get(&a, last).ok_or("lookup")?.clone();
        check(a.remove(&member), "remove")?;
    }
    check(a.buckets.len() == 256, "buckets stay while members remain")?;
    same(&a, &keys)?;
    // The last member takes a grown array back to the smallest one.
    while let Some(k) = keys.pop() {
        let member = get(&a, k).ok_or("lookup")?.clone();
        check(a.remove(&member), "remove")?;
    }
    check(a.is_empty() && a.buckets.len() == MIN_BUCKETS, "an emptied table shrinks")?;
    same(&a, &[])?;
    for k in [3, 1, 2] {
        a.try_insert_new(Key(key(k)), k).map_err(|_| "insert")?;
        keys.push(k, GFP_KERNEL).map_err(|_| "memory")?;
    }
    same(&a, &keys)?;

    // Dropping an index with members gives their references back and leaves the handles
    // still held valid, and of no index.
    let kept = get(&a, keys[0]).ok_or("lookup")?.clone();
    drop(a);
    check(*kept.lock() == u32::from_le_bytes(kept.0), "a handle outlives its index")?;
    check(!b.remove(&kept), "removed from the wrong index after its own went")?;
    Ok(())
}
