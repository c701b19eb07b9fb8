//! Session names and compatible strings as table keys: `FixedStr` compares word by word and
//! stops at the NUL, and must order exactly as the byte strings do (`strcmp`), since the
//! incoming and outgoing tables, duplicate checks and lookups all go through that order.

use std::cmp::Ordering;

use luo_core::abi::{Compat, SessionName};

/// Names that differ in every interesting place: in each 8-byte word, right at and after a
/// word boundary, by length only (prefixes), in high bytes (unsigned order), at full length.
fn names() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = Vec::new();
    for len in [
        1usize, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 55, 56, 57, 62, 63,
    ] {
        v.push(vec![b'a'; len]);
        for at in [0, len / 2, len - 1] {
            for byte in [b'0', b'b', 0x7f, 0x80, 0xff, 0x01] {
                let mut n = vec![b'a'; len];
                n[at] = byte;
                v.push(n);
            }
        }
    }
    // A pseudo-random batch (LCG, fixed seed): lengths 1..=63, bytes 1..=255.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) as usize
    };
    for _ in 0..300 {
        let len = 1 + next() % 63;
        // Few distinct bytes, so that long common prefixes are frequent.
        v.push((0..len).map(|_| b"ab\x01\xff"[next() % 4]).collect());
    }
    v
}

#[test]
fn session_names_order_exactly_as_their_bytes() {
    let names = names();
    let keys: Vec<SessionName> = names.iter().map(|n| SessionName::new(n).unwrap()).collect();
    for (i, a) in names.iter().enumerate() {
        for (j, b) in names.iter().enumerate() {
            let want = a.as_slice().cmp(b.as_slice());
            assert_eq!(keys[i].cmp(&keys[j]), want, "{a:?} vs {b:?}");
            assert_eq!(
                keys[i] == keys[j],
                want == Ordering::Equal,
                "{a:?} vs {b:?}"
            );
        }
    }
}

#[test]
fn compatible_strings_order_exactly_as_their_bytes() {
    let names: Vec<Vec<u8>> = names().into_iter().filter(|n| n.len() <= 47).collect();
    let keys: Vec<Compat> = names.iter().map(|n| Compat::new(n).unwrap()).collect();
    for (i, a) in names.iter().enumerate() {
        for (j, b) in names.iter().enumerate() {
            assert_eq!(
                keys[i].cmp(&keys[j]),
                a.as_slice().cmp(b.as_slice()),
                "{a:?} vs {b:?}"
            );
        }
    }
}

#[test]
fn a_name_read_from_a_field_equals_the_same_name_given_directly() {
    // Garbage after the NUL of a field is dropped, so it cannot make two equal names differ.
    let mut field = [0xAAu8; 64];
    field[..5].copy_from_slice(b"vm-01");
    field[5] = 0;
    let read = SessionName::from_field(&field).unwrap();
    let given = SessionName::new(b"vm-01").unwrap();
    assert_eq!(read, given);
    assert_eq!(read.cmp(&given), Ordering::Equal);
    assert!(read < SessionName::new(b"vm-010").unwrap());
    assert!(read > SessionName::new(b"vm-0").unwrap());
}

#[test]
fn the_significant_prefix_is_the_name_and_its_nul_in_whole_words() {
    // What the kernel's session tables hash: equal names give equal prefixes, different names
    // different ones, and the prefix is the name, its NUL and zero padding to a word.
    let names = names();
    let keys: Vec<SessionName> = names.iter().map(|n| SessionName::new(n).unwrap()).collect();
    for (name, key) in names.iter().zip(&keys) {
        let p = key.significant();
        assert_eq!(p.len(), (name.len() / 8 + 1) * 8, "{name:?}");
        assert_eq!(&p[..name.len()], name.as_slice());
        assert!(p[name.len()..].iter().all(|&b| b == 0));
    }
    for (i, a) in keys.iter().enumerate() {
        for b in &keys[i + 1..] {
            assert_eq!(a.significant() == b.significant(), a == b);
        }
    }
    // Garbage after the NUL of a field is not part of it.
    let mut field = [0xAAu8; 64];
    field[..6].copy_from_slice(b"vm-01\0");
    let read = SessionName::from_field(&field).unwrap();
    assert_eq!(read.significant(), b"vm-01\0\0\0");
}
