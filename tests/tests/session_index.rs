//! The session-table contract (`SharedIndex`) on the std implementation: what luo-core relies
//! on (unique keys, insertion order both ways, removal of a member it holds) and what it never
//! does but an index must refuse (a member handed to another index, a member removed twice).
//! The kernel's intrusive index runs the same checks at boot (backend-linux
//! `platform/shared.rs`, `self_test`).

use luo_core::std_impls::StdShared;
use luo_core::{IndexKey, InsertError, SharedIndex, SharedLocked, StdIndex};

/// A head keyed by the big-endian bytes of a number (the order of the numbers).
struct Key([u8; 4]);

impl Key {
    fn of(k: u32) -> Key {
        Key(k.to_be_bytes())
    }

    fn num(&self) -> u32 {
        u32::from_be_bytes(self.0)
    }
}

impl IndexKey for Key {
    type Key = [u8; 4];

    fn index_key(&self) -> &[u8; 4] {
        &self.0
    }

    fn key_bytes(key: &[u8; 4]) -> &[u8] {
        key
    }
}

type Index = StdIndex<[u8; 4], StdShared<Key, u32>>;

/// The member with the number `k` as its key.
fn get(index: &Index, k: u32) -> Option<&StdShared<Key, u32>> {
    index.get(&k.to_be_bytes())
}

/// The keys in insertion order, both ways, and each found by its key with its own body.
fn assert_holds(index: &Index, keys: &[u32]) {
    assert_eq!(index.len(), keys.len());
    assert_eq!(index.is_empty(), keys.is_empty());
    assert!(index.iter().map(|s| s.num()).eq(keys.iter().copied()));
    assert!(index
        .iter_rev()
        .map(|s| s.num())
        .eq(keys.iter().rev().copied()));
    for &k in keys {
        let found = get(index, k).expect("every member is found by its key");
        assert_eq!(found.num(), k);
        assert_eq!(*found.lock(), k);
    }
}

fn scrambled(n: u32) -> (Index, Vec<u32>) {
    let mut index = Index::default();
    let mut keys = Vec::new();
    for i in 0..n {
        let k = (i * 37) % n;
        let member = index.try_insert_new(Key::of(k), k).expect("a new key");
        assert_eq!(member.num(), k);
        keys.push(k);
    }
    (index, keys)
}

#[test]
fn members_are_unique_by_key_and_kept_in_insertion_order() {
    let (mut index, keys) = scrambled(64);
    assert_holds(&index, &keys);
    assert!(get(&index, 64).is_none());
    assert_eq!(
        index.try_insert_new(Key::of(5), 0).err(),
        Some(InsertError::Exists)
    );
    // The refused insert changed nothing.
    assert_eq!(*get(&index, 5).unwrap().lock(), 5);
    assert_holds(&index, &keys);
}

#[test]
fn a_member_leaves_once_and_its_handle_outlives_it() {
    let (mut index, mut keys) = scrambled(64);
    let five = get(&index, 5).unwrap().clone();
    assert!(index.remove(&five));
    assert!(!index.remove(&five), "removed twice");
    assert_eq!(*five.lock(), 5);
    keys.retain(|&k| k != 5);
    assert_holds(&index, &keys);
    // The key is free again; the new member is another object.
    let again = index.try_insert_new(Key::of(5), 5).unwrap().clone();
    assert!(!StdShared::ptr_eq(&again, &five));
    assert!(
        !index.remove(&five),
        "the old object is not the member of its key"
    );
    keys.push(5);
    assert_holds(&index, &keys);
    // Every other member out: order and lookups of the rest hold.
    let mut i = 0;
    while i < keys.len() {
        let member = get(&index, keys[i]).unwrap().clone();
        assert!(index.remove(&member));
        keys.remove(i);
        i += 1;
    }
    assert_eq!(index.len(), keys.len());
    assert!(index.iter().map(|s| s.num()).eq(keys.iter().copied()));
}

#[test]
fn another_index_never_removes_a_member_it_does_not_hold() {
    let (a, keys) = scrambled(16);
    let mut b = Index::default();
    let five = get(&a, 5).unwrap().clone();
    assert!(!b.remove(&five));
    b.try_insert_new(Key::of(5), 50).unwrap();
    assert!(!b.remove(&five), "same key, another object");
    assert_eq!(*get(&b, 5).unwrap().lock(), 50);
    assert_holds(&a, &keys);
    // Dropping an index leaves the handles held elsewhere valid, and of no index.
    drop(a);
    assert_eq!(*five.lock(), 5);
    assert!(!b.remove(&five));
}
