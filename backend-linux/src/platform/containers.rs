// SPDX-License-Identifier: GPL-2.0

//! The containers luo-core allocates: `KVVec` and `RBTree` (a session and its tables are in
//! [`shared`](super::shared)). Each is a thin newtype (luo-core's traits and the kernel's
//! types both live in other crates: the orphan rule).

use core::mem::ManuallyDrop;

use kernel::{
    prelude::*,
    rbtree::{
        Entry,
        RBTree,
        RBTreeNodeReservation, //
    },
};

use luo_core::{
    errno::AllocError,
    OrdMap,
    PVec, //
};

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
    #[inline]
    fn drop(&mut self) {
        // With no capacity there is no allocation and no element to drop: one test, inline
        // in whatever drops the vector.
        if self.0.capacity() != 0 {
            // SAFETY: This is the drop.
            unsafe { self.drop_allocated() };
        }
    }
}

impl<T> KernelVec<T> {
    /// # Safety
    ///
    /// Called once, by `drop`.
    #[inline(never)]
    unsafe fn drop_allocated(&mut self) {
        // SAFETY: The vector is dropped once (caller) and not used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.0) };
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
///
/// Most maps of the core are empty when they drop (the token index of a session without
/// files, closed by the thousand), and `RBTree`'s drop walks the tree even then, so an empty
/// map drops without it, as [`KernelVec`] does.
///
/// # Invariants
///
/// `len` is the number of nodes in `tree`.
pub(crate) struct KernelMap<K, V> {
    tree: ManuallyDrop<RBTree<K, V>>,
    len: usize,
    /// Dropped by hand too, so that the map's whole drop is the inline `Drop::drop`: an empty
    /// map is two tests, where the drop glue of an `Option` field was a call.
    spare: ManuallyDrop<Option<RBTreeNodeReservation<K, V>>>,
}

impl<K, V> Default for KernelMap<K, V> {
    fn default() -> Self {
        // INVARIANT: a new tree has no nodes.
        KernelMap {
            tree: ManuallyDrop::new(RBTree::new()),
            len: 0,
            spare: ManuallyDrop::new(None),
        }
    }
}

impl<K, V> Drop for KernelMap<K, V> {
    #[inline]
    fn drop(&mut self) {
        // An empty map without a spare node holds nothing: two tests, inline in whatever
        // drops the map.
        if self.len != 0 || self.spare.is_some() {
            // SAFETY: This is the drop.
            unsafe { self.drop_held() };
        }
    }
}

impl<K, V> KernelMap<K, V> {
    /// # Safety
    ///
    /// Called once, by `drop`.
    #[inline(never)]
    unsafe fn drop_held(&mut self) {
        if self.len != 0 {
            // SAFETY: `tree` is dropped once (caller) and not used afterwards. When `len` is
            // 0 the tree has no nodes (type invariant), so not dropping it leaks nothing.
            unsafe { ManuallyDrop::drop(&mut self.tree) };
        }
        // SAFETY: As above, for `spare`.
        unsafe { ManuallyDrop::drop(&mut self.spare) };
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
                // INVARIANT: one node more.
                self.len += 1;
                Ok(None)
            }
        }
    }

    fn try_reserve(&mut self) -> Result<(), AllocError> {
        if self.spare.is_none() {
            *self.spare = Some(RBTreeNodeReservation::new(GFP_KERNEL).map_err(|_| AllocError)?);
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
        // INVARIANT: one node less.
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
        // INVARIANT: one node less.
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
