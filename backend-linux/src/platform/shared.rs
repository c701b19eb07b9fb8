// SPDX-License-Identifier: GPL-2.0

//! A session's allocation ([`KernelShared`]) and the session tables ([`KernelIndex`]).
//!
//! The C core's `struct luo_session` embeds its `struct mutex` and the `list_head` of its
//! table, so creating a session is one allocation and closing one is a `list_del` and a
//! `kfree`. A session here is one allocation too: its head, its files behind a
//! `struct mutex`, and the links of the table it was born in: an `rb_node` in the table's
//! name tree, its neighbours in creation order, and the table's reference to it. Inserting
//! allocates nothing else; removing a session the caller holds is an `rb_erase` and a list
//! unlink, with no name lookup and no node to free. The tree keeps lookups logarithmic where
//! the C core scans its list (2000 sessions: 202 M instructions to create them there).
//!
//! The links are only ever touched by the one table an object was born in (its `owner`, a
//! number no other table has), so a session handed to the wrong table is refused, not
//! unlinked from a tree it is not in.
//!
//! The object counts its references itself, inline (`Arc`'s algorithm on a `core` atomic),
//! where `kernel::sync::Arc` calls out to the C `refcount_t` helpers: creating and closing a
//! session take and drop references four times, and those calls were a tenth of what a close
//! cost over the C core, which frees its session with a bare `kfree`.

use core::{
    cell::UnsafeCell,
    cmp::Ordering,
    marker::PhantomData,
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
///
/// `links` comes first (`repr(C)`), and its `rb_node` first in it, so the tree's node pointer
/// is the object's address: the C core's `container_of` with an offset of 0.
#[pin_data]
#[repr(C)]
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
#[repr(C)]
struct LinkState<H, T> {
    /// In the index's name tree while `member` is `Some`.
    node: bindings::rb_node,
    /// Neighbours in creation order (null at the ends).
    prev: *const SharedInner<H, T>,
    next: *const SharedInner<H, T>,
    /// The index's reference to the object: `Some` exactly while it is a member.
    member: Option<KernelShared<H, T>>,
}

/// The links of an object.
///
/// # Invariants
///
/// `owner` is the `id` of the [`KernelIndex`] the object was born in (0: none), fixed at
/// creation. `state` is read only through a shared borrow of that index and written only
/// through an exclusive one: no other code touches it.
#[repr(C)]
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
                node: bindings::rb_node {
                    __rb_parent_color: 0,
                    rb_right: ptr::null_mut(),
                    rb_left: ptr::null_mut(),
                },
                prev: ptr::null(),
                next: ptr::null(),
                member: None,
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
        if self.inner().refs.fetch_sub(1, MemOrder::Release) != 1 {
            return;
        }
        fence(MemOrder::Acquire);
        // SAFETY: That was the last reference, so nothing else can reach the object; it was
        // allocated as a `KBox` by `new_object` (type invariant) and is freed once, in place.
        drop(unsafe { KBox::from_raw(self.ptr.as_ptr()) });
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

/// A session table: an intrusive red-black tree by key and an intrusive list in insertion
/// order, over objects born in it.
///
/// The root is a bare `struct rb_root` and the list has no sentinel, so nothing points at the
/// index itself and it may move (luo-core swaps a freshly built table in).
///
/// # Invariants
///
/// `id` is unique among indexes and never 0. The objects whose `member` is `Some` are exactly
/// those with `owner == id` that are in `root`'s tree and in the list from `first` to `last`
/// (`len` of them); the index owns the reference each `member` holds, and every link points at
/// such an object.
pub(crate) struct KernelIndex<H, T> {
    id: usize,
    root: bindings::rb_root,
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
        // INVARIANT: a number never handed out before (a `usize` does not wrap in the life of
        // a kernel); no members.
        KernelIndex {
            id: NEXT_INDEX.fetch_add(1, Relaxed),
            root: bindings::rb_root {
                rb_node: ptr::null_mut(),
            },
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
}

impl<H: IndexKey, T> KernelIndex<H, T> {
    /// The member with this key, walking the tree.
    #[inline]
    fn find(&self, key: &H::Key) -> Option<*const SharedInner<H, T>> {
        let mut node = self.root.rb_node;
        while !node.is_null() {
            // The node is the first field of a member (`SharedInner` layout).
            let obj = node.cast::<SharedInner<H, T>>().cast_const();
            // SAFETY: Every node in the tree is a member, alive while the index holds its
            // reference (type invariant); its head is immutable.
            let here = unsafe { (*obj).head.index_key() };
            // SAFETY: As above; the links are read under `&self`.
            node = match key.cmp(here) {
                Ordering::Less => unsafe { (*node).rb_left },
                Ordering::Greater => unsafe { (*node).rb_right },
                Ordering::Equal => return Some(obj),
            };
        }
        None
    }
}

impl<H: IndexKey, T> SharedIndex<H, T> for KernelIndex<H, T> {
    type Shared = KernelShared<H, T>;
    type Iter<'a>
        = KernelIndexIter<'a, H, T>
    where
        Self: 'a,
        KernelShared<H, T>: 'a;

    fn try_insert_new(&mut self, head: H, body: T) -> Result<&KernelShared<H, T>, InsertError> {
        // Where the new node goes: found before allocating, so a taken key costs no
        // allocation; the tree cannot change before the link below (`&mut self`).
        let root = ptr::addr_of_mut!(self.root.rb_node);
        let mut link = root;
        let mut parent: *mut bindings::rb_node = ptr::null_mut();
        // SAFETY: `link` points at the root's pointer or at a child pointer of a member node
        // (type invariant), read under `&mut self`.
        while let Some(node) = ptr::NonNull::new(unsafe { *link }) {
            parent = node.as_ptr();
            let obj = parent.cast::<SharedInner<H, T>>().cast_const();
            // SAFETY: `parent` is a member node (type invariant); heads are immutable.
            let here = unsafe { (*obj).head.index_key() };
            // SAFETY: As above; the child pointers of a member node are the index's to read.
            link = match head.index_key().cmp(here) {
                Ordering::Less => unsafe { ptr::addr_of_mut!((*parent).rb_left) },
                Ordering::Greater => unsafe { ptr::addr_of_mut!((*parent).rb_right) },
                Ordering::Equal => return Err(InsertError::Exists),
            };
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
        // SAFETY: `state` is valid and ours to write (above). `rb_link_node` (include/linux/
        // rbtree.h), inline: the new node is a red leaf under `parent`, stored in `*link`,
        // which is still the null child pointer the walk ended at (`&mut self` kept the tree
        // unchanged). `rb_insert_color` then rebalances the tree `root` heads.
        unsafe {
            let node = ptr::addr_of_mut!((*state).node);
            (*node).__rb_parent_color = parent as c_ulong;
            *link = node;
            bindings::rb_insert_color(node, ptr::addr_of_mut!(self.root));
            (*state).prev = self.last;
            if let Some(last) = self.last.as_ref() {
                (*last.links.state.get()).next = obj;
            } else {
                self.first = obj;
            }
        }
        self.last = obj;
        self.len += 1;
        // INVARIANT: the object is in the tree and at the end of the list, and its `member`
        // holds the index's reference.
        // SAFETY: As above.
        let member = unsafe { &mut (*state).member };
        Ok(member.insert(object))
    }

    #[inline]
    fn get(&self, key: &H::Key) -> Option<&KernelShared<H, T>> {
        let obj = self.find(key)?;
        // SAFETY: `obj` is a member (found in the tree), read under `&self`; its `member` is
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
        // SAFETY: The object is a member, so its node is in this tree and its neighbours are
        // members whose links are ours to write.
        unsafe {
            bindings::rb_erase(ptr::addr_of_mut!((*state).node), ptr::addr_of_mut!(self.root));
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
        // INVARIANT: unlinked from the tree and the list, `member` is `None`, one member less.
        self.len -= 1;
        // The index's reference goes; `s` keeps the object alive.
        drop(reference);
        true
    }

    fn len(&self) -> usize {
        self.len
    }

    fn iter(&self) -> KernelIndexIter<'_, H, T> {
        KernelIndexIter {
            front: self.first,
            back: self.last,
            left: self.len,
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

/// The members of a [`KernelIndex`], oldest first.
pub(crate) struct KernelIndexIter<'a, H, T> {
    front: *const SharedInner<H, T>,
    back: *const SharedInner<H, T>,
    left: usize,
    _index: PhantomData<&'a KernelIndex<H, T>>,
}

impl<'a, H: 'a, T: 'a> Iterator for KernelIndexIter<'a, H, T> {
    type Item = &'a KernelShared<H, T>;

    #[inline]
    fn next(&mut self) -> Option<&'a KernelShared<H, T>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // SAFETY: `left > 0`, so `front` is a member of the index borrowed for `'a` (the list
        // holds `len` members and `front` walks it from `first`).
        let state = unsafe { &*(*self.front).links.state.get() };
        self.front = state.next;
        state.member.as_ref()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<'a, H: 'a, T: 'a> DoubleEndedIterator for KernelIndexIter<'a, H, T> {
    #[inline]
    fn next_back(&mut self) -> Option<&'a KernelShared<H, T>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // SAFETY: As in `next`, from the other end.
        let state = unsafe { &*(*self.back).links.state.get() };
        self.back = state.prev;
        state.member.as_ref()
    }
}

/// Test only (`CONFIG_LIVEUPDATE_TEST`), run at boot: a [`KernelIndex`] against what luo-core
/// relies on, and against what luo-core never does but the index must refuse (a member handed
/// to another index, a member removed twice). A failure is a `WARNING:` splat, which fails
/// every VM suite; under KASAN, a link or count gone wrong is a report.
#[cfg(CONFIG_LIVEUPDATE_TEST)]
pub(crate) fn self_test() -> Result<(), &'static str> {
    /// A head keyed by a number.
    struct Key(u32);

    impl IndexKey for Key {
        type Key = u32;

        fn index_key(&self) -> &u32 {
            &self.0
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

    /// The keys in insertion order, both ways, and each found by its key.
    fn same(index: &Index, keys: &[u32]) -> Result<(), &'static str> {
        check(index.len() == keys.len(), "len")?;
        check(index.iter().map(|s| s.0).eq(keys.iter().copied()), "forward order")?;
        check(index.iter().rev().map(|s| s.0).eq(keys.iter().rev().copied()), "backward order")?;
        for &k in keys {
            let found = index.get(&k).ok_or("lookup")?;
            check(found.0 == k && *found.lock() == k, "lookup finds its own")?;
        }
        Ok(())
    }

    const N: u32 = 64;
    let mut a = Index::default();
    let mut b = Index::default();
    let mut keys = KVec::with_capacity(N as usize, GFP_KERNEL).map_err(|_| "memory")?;
    // A scrambled insertion order, so that the tree rebalances.
    for i in 0..N {
        let k = (i * 37) % N;
        a.try_insert_new(Key(k), k).map_err(|_| "insert")?;
        keys.push(k, GFP_KERNEL).map_err(|_| "memory")?;
    }
    same(&a, &keys)?;
    check(a.get(&N).is_none(), "a missing key")?;
    check(
        matches!(a.try_insert_new(Key(5), 0), Err(InsertError::Exists)),
        "a taken key",
    )?;

    // Another index does not touch a's member, even under the same key.
    let five = a.get(&5).ok_or("lookup")?.clone();
    check(!b.remove(&five), "removed from the wrong index")?;
    b.try_insert_new(Key(5), 50).map_err(|_| "insert in b")?;
    check(!b.remove(&five), "removed from the wrong index by key")?;
    check(b.get(&5).is_some_and(|s| *s.lock() == 50), "b's own member")?;

    // Removing: once; the handle outlives its membership; the others stay in order.
    check(a.remove(&five), "remove")?;
    check(!a.remove(&five), "removed twice")?;
    check(*five.lock() == 5, "the removed object is still alive")?;
    keys.retain(|k| *k != 5);
    same(&a, &keys)?;
    let mut i = 0;
    while i < keys.len() {
        let member = a.get(&keys[i]).ok_or("lookup")?.clone();
        check(a.remove(&member), "remove")?;
        keys.remove(i).map_err(|_| "index")?;
        i += 1;
    }
    same(&a, &keys)?;

    // Dropping an index with members gives their references back and leaves the handles
    // still held valid, and of no index.
    let kept = a.get(&keys[0]).ok_or("lookup")?.clone();
    drop(a);
    check(*kept.lock() == kept.0, "a handle outlives its index")?;
    check(!b.remove(&kept), "removed from the wrong index after its own went")?;
    Ok(())
}
