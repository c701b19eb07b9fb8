//! The platform container and lock traits for std types, for userspace backends and tests,
//! and the std [`Runtime`]: a platform that implements the [`StdRuntime`] marker has it.
//!
//! Poisoned std locks are recovered rather than propagated: a panic in a callback on another
//! thread must not turn every later LUO call into a panic.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::vec::Vec;

use crate::errno::AllocError;
use crate::errno::Errno;
use crate::platform::{
    FileHandler, FlbOps, IndexKey, InsertError, OrdMap, PMutex, PRwLock, PVec, Platform, Preserved,
    RetrieveStatus, Runtime, SharedIndex, SharedLocked,
};

/// Opts a platform into std's containers and locks: `impl StdRuntime for MyPlatform {}` gives
/// it the [`Runtime`] below (`Vec`, `BTreeMap`, [`StdShared`], [`StdIndex`], `Mutex`,
/// `RwLock`).
///
/// A platform with other containers or locks does not implement this marker and implements
/// [`Runtime`] itself, as the loom models do: coherence allows that for any type of its own
/// crate, because only that crate could make the type a `StdRuntime`.
pub trait StdRuntime {}

impl<P: StdRuntime> Runtime for P {
    type Vec<T> = Vec<T>;
    type Map<K: Ord + Copy, V> = BTreeMap<K, V>;
    type Shared<H: 'static, T: 'static> = StdShared<H, T>;
    type Index<H: IndexKey + 'static, T: 'static> = StdIndex<H::Key, StdShared<H, T>>;
    type Mutex<T> = Mutex<T>;
    type RwLock<T> = RwLock<T>;
}

impl<T> PVec<T> for Vec<T> {
    fn try_push(&mut self, value: T) -> Result<(), AllocError> {
        self.try_reserve(1).map_err(|_| AllocError)?;
        self.push(value);
        Ok(())
    }
    fn try_reserve(&mut self, additional: usize) -> Result<(), AllocError> {
        Vec::try_reserve(self, additional).map_err(|_| AllocError)
    }
    fn pop(&mut self) -> Option<T> {
        Vec::pop(self)
    }
    fn as_slice(&self) -> &[T] {
        self
    }
    fn as_mut_slice(&mut self) -> &mut [T] {
        self
    }
}

impl<K: Ord + Copy, V> OrdMap<K, V> for BTreeMap<K, V> {
    type Iter<'a>
        = std::collections::btree_map::Iter<'a, K, V>
    where
        K: 'a,
        V: 'a;
    type IterMut<'a>
        = std::collections::btree_map::IterMut<'a, K, V>
    where
        K: 'a,
        V: 'a;
    fn iter(&self) -> Self::Iter<'_> {
        BTreeMap::iter(self)
    }
    fn iter_mut(&mut self) -> Self::IterMut<'_> {
        BTreeMap::iter_mut(self)
    }
    fn try_insert(&mut self, key: K, value: V) -> Result<Option<V>, AllocError> {
        Ok(self.insert(key, value))
    }
    fn try_reserve(&mut self) -> Result<(), AllocError> {
        Ok(())
    }
    fn get(&self, key: &K) -> Option<&V> {
        BTreeMap::get(self, key)
    }
    fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        BTreeMap::get_mut(self, key)
    }
    fn remove(&mut self, key: &K) -> Option<V> {
        BTreeMap::remove(self, key)
    }
    fn remove_if(&mut self, key: &K, keep_out: impl FnOnce(&V) -> bool) -> Option<V> {
        match self.entry(*key) {
            std::collections::btree_map::Entry::Occupied(e) if keep_out(e.get()) => {
                Some(e.remove())
            }
            _ => None,
        }
    }
    fn len(&self) -> usize {
        BTreeMap::len(self)
    }
    fn next_key(&self, after: Option<&K>) -> Option<K> {
        use core::ops::Bound::{Excluded, Unbounded};
        match after {
            None => self.keys().next().copied(),
            Some(k) => self
                .range((Excluded(*k), Unbounded))
                .next()
                .map(|(k, _)| *k),
        }
    }
    fn prev_key(&self, before: Option<&K>) -> Option<K> {
        match before {
            None => self.keys().next_back().copied(),
            Some(k) => self.range(..*k).next_back().map(|(k, _)| *k),
        }
    }
}

/// `Arc<(H, Mutex<T>)>` as a [`SharedLocked`]: one allocation, as std's mutex is inline.
pub struct StdShared<H, T>(Arc<(H, Mutex<T>)>);

impl<H, T> Clone for StdShared<H, T> {
    fn clone(&self) -> Self {
        StdShared(self.0.clone())
    }
}

impl<H, T> std::ops::Deref for StdShared<H, T> {
    type Target = H;
    fn deref(&self) -> &H {
        &self.0 .0
    }
}

impl<H, T> SharedLocked<H, T> for StdShared<H, T> {
    type Guard<'a>
        = MutexGuard<'a, T>
    where
        Self: 'a;
    fn try_new(head: H, body: T) -> Result<Self, AllocError> {
        Ok(StdShared(Arc::new((head, Mutex::new(body)))))
    }
    fn lock(&self) -> MutexGuard<'_, T> {
        PMutex::lock(&self.0 .1)
    }
    fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

/// A [`SharedIndex`] of std containers, for any [`SharedLocked`] object type (the loom models
/// use it with theirs): the objects in a vector of slots in insertion order, and a map from
/// key to slot. A removal empties its slot; the slots are compacted in place when more than
/// half are empty, so walks stay proportional to the members (a serialization walks them
/// all, and a vector walks faster than a tree).
pub struct StdIndex<K, S> {
    by_key: BTreeMap<K, usize>,
    slots: Vec<Option<S>>,
}

impl<K, S> Default for StdIndex<K, S> {
    fn default() -> Self {
        StdIndex {
            by_key: BTreeMap::new(),
            slots: Vec::new(),
        }
    }
}

impl<K: Ord + Copy, S> StdIndex<K, S> {
    /// Moves the members to the front of the slots, in order, and renumbers them.
    fn compact<H: IndexKey<Key = K>>(&mut self)
    where
        S: core::ops::Deref<Target = H>,
    {
        self.slots.retain(Option::is_some);
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(slot) = s.as_ref().and_then(|s| self.by_key.get_mut(s.index_key())) {
                *slot = i;
            }
        }
    }
}

impl<H: IndexKey, T, S: SharedLocked<H, T>> SharedIndex<H, T> for StdIndex<H::Key, S> {
    type Shared = S;
    type Iter<'a>
        = std::iter::Flatten<std::slice::Iter<'a, Option<S>>>
    where
        Self: 'a,
        S: 'a;
    type IterRev<'a>
        = std::iter::Flatten<std::iter::Rev<std::slice::Iter<'a, Option<S>>>>
    where
        Self: 'a,
        S: 'a;

    fn try_insert_new(&mut self, head: H, body: T) -> Result<&S, InsertError> {
        use std::collections::btree_map::Entry;
        let Entry::Vacant(slot) = self.by_key.entry(*head.index_key()) else {
            return Err(InsertError::Exists);
        };
        let object = S::try_new(head, body)?;
        self.slots
            .try_reserve(1)
            .map_err(|_| InsertError::NoMemory)?;
        slot.insert(self.slots.len());
        self.slots.push(Some(object));
        self.slots
            .last()
            .and_then(Option::as_ref)
            .ok_or(InsertError::NoMemory)
    }

    fn get(&self, key: &H::Key) -> Option<&S> {
        self.slots.get(*self.by_key.get(key)?)?.as_ref()
    }

    fn remove(&mut self, s: &S) -> bool {
        let key = (**s).index_key();
        let Some(&i) = self.by_key.get(key) else {
            return false;
        };
        match self.slots.get_mut(i) {
            Some(slot) if slot.as_ref().is_some_and(|m| S::ptr_eq(m, s)) => *slot = None,
            _ => return false,
        }
        self.by_key.remove(key);
        if self.slots.len() > 16 && self.slots.len() > 2 * self.by_key.len() {
            self.compact();
        }
        true
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }

    fn iter(&self) -> Self::Iter<'_> {
        self.slots.iter().flatten()
    }

    fn iter_rev(&self) -> Self::IterRev<'_> {
        self.slots.iter().rev().flatten()
    }
}

impl<T> PMutex<T> for Mutex<T> {
    type Guard<'a>
        = MutexGuard<'a, T>
    where
        Self: 'a;
    fn try_new(value: T) -> Result<Self, AllocError> {
        Ok(Mutex::new(value))
    }
    fn lock(&self) -> MutexGuard<'_, T> {
        Mutex::lock(self).unwrap_or_else(|e| e.into_inner())
    }
}

impl<T> PRwLock<T> for RwLock<T> {
    type Read<'a>
        = RwLockReadGuard<'a, T>
    where
        Self: 'a;
    type Write<'a>
        = RwLockWriteGuard<'a, T>
    where
        Self: 'a;
    fn try_new(value: T) -> Result<Self, AllocError> {
        Ok(RwLock::new(value))
    }
    fn read(&self) -> RwLockReadGuard<'_, T> {
        RwLock::read(self).unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, T> {
        RwLock::write(self).unwrap_or_else(|e| e.into_inner())
    }
}

/// Shared handlers: the handler's identity is the allocation, so one `Arc` registered twice is
/// recognized and two distinct handlers never collide.
impl<P: Platform, T: FileHandler<P> + ?Sized> FileHandler<P> for Arc<T> {
    fn key(&self) -> usize {
        Arc::as_ptr(self).cast::<()>() as usize
    }
    fn compatible(&self) -> &[u8] {
        (**self).compatible()
    }
    fn has_required_ops(&self) -> bool {
        (**self).has_required_ops()
    }
    fn get_owner(&self) -> bool {
        (**self).get_owner()
    }
    fn put_owner(&self) {
        (**self).put_owner()
    }
    fn can_preserve(&self, file: &P::File) -> bool {
        (**self).can_preserve(file)
    }
    fn preserve(&self, file: &P::File) -> Result<Preserved, Errno> {
        (**self).preserve(file)
    }
    fn unpreserve(&self, file: &P::File, state: Preserved) {
        (**self).unpreserve(file, state)
    }
    fn freeze(&self, file: &P::File, state: &mut Preserved) -> Result<(), Errno> {
        (**self).freeze(file, state)
    }
    fn unfreeze(&self, file: &P::File, state: Preserved) {
        (**self).unfreeze(file, state)
    }
    fn retrieve(&self, data: u64) -> Result<P::File, Errno> {
        (**self).retrieve(data)
    }
    fn can_finish(&self, file: Option<&P::File>, data: u64, status: RetrieveStatus) -> bool {
        (**self).can_finish(file, data, status)
    }
    fn finish(&self, file: Option<&P::File>, data: u64, status: RetrieveStatus) {
        (**self).finish(file, data, status)
    }
    fn get_id(&self, file: &P::File) -> u64 {
        (**self).get_id(file)
    }
}

/// Shared FLBs, identified by their allocation like handlers.
impl<T: FlbOps + ?Sized> FlbOps for Arc<T> {
    fn key(&self) -> usize {
        Arc::as_ptr(self).cast::<()>() as usize
    }
    fn compatible(&self) -> &[u8] {
        (**self).compatible()
    }
    fn has_required_ops(&self) -> bool {
        (**self).has_required_ops()
    }
    fn get_owner(&self) -> bool {
        (**self).get_owner()
    }
    fn put_owner(&self) {
        (**self).put_owner()
    }
    fn preserve(&self) -> Result<(u64, usize), Errno> {
        (**self).preserve()
    }
    fn unpreserve(&self, data: u64, obj: usize) {
        (**self).unpreserve(data, obj)
    }
    fn retrieve(&self, data: u64) -> Result<usize, Errno> {
        (**self).retrieve(data)
    }
    fn finish(&self, data: u64, obj: usize) {
        (**self).finish(data, obj)
    }
}
