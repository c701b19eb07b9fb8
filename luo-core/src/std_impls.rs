//! The platform container and lock traits for std types, for userspace backends and tests.
//!
//! Poisoned std locks are recovered rather than propagated: a panic in a callback on another
//! thread must not turn every later LUO call into a panic.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::vec::Vec;

use crate::errno::AllocError;
use crate::platform::{OrdMap, PMutex, PRwLock, PVec, SharedPtr};

impl<T> PVec<T> for Vec<T> {
    fn try_push(&mut self, value: T) -> Result<(), AllocError> {
        self.try_reserve(1).map_err(|_| AllocError)?;
        self.push(value);
        Ok(())
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
    fn len(&self) -> usize {
        BTreeMap::len(self)
    }
    fn next_key(&self, after: Option<&K>) -> Option<K> {
        use core::ops::Bound::{Excluded, Unbounded};
        match after {
            None => self.keys().next().copied(),
            Some(k) => self.range((Excluded(*k), Unbounded)).next().map(|(k, _)| *k),
        }
    }
    fn prev_key(&self, before: Option<&K>) -> Option<K> {
        match before {
            None => self.keys().next_back().copied(),
            Some(k) => self.range(..*k).next_back().map(|(k, _)| *k),
        }
    }
}

impl<T> SharedPtr<T> for Arc<T> {
    fn try_new(value: T) -> Result<Self, AllocError> {
        Ok(Arc::new(value))
    }
    fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(a, b)
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
