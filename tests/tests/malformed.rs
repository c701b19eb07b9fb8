//! Corrupted handover state (spec §7.3 validation, §13 B2, B5, B15): start from a valid image,
//! break one rule, boot from the bytes. Never a panic; the first open fails with EIO and a log
//! line names the rule; the next open works with no incoming sessions, and the device can
//! prepare (and hand over) the next update.

use std::os::fd::AsFd;

use backend_user::{HandlerRef, LiveUpdate, Memory};
use luo_core::errno::{EIO, ENOENT};
use luo_handlers::testing::{Journal, Store, TestFlb, TestHandler};
use luo_tests::*;

struct Base {
    bytes: Vec<u8>,
    j: Journal,
    store: Store,
}

/// Session "a" (tokens 1, 2), empty session "b", session "c" (token 3), handler "test-x",
/// FLB "test-flb".
fn base() -> Base {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let h: HandlerRef = TestHandler::new("test-x", &j, &store);
    lu.register_handler(h.clone()).unwrap();
    lu.register_flb(&h, TestFlb::new("test-flb", 0, &j))
        .unwrap();
    let dev = lu.open().unwrap();
    let a = dev.create_session("a").unwrap();
    let b = dev.create_session("b").unwrap();
    let c = dev.create_session("c").unwrap();
    a.preserve_fd(memfd_with(b"1").as_fd(), 1).unwrap();
    a.preserve_fd(memfd_with(b"2").as_fd(), 2).unwrap();
    c.preserve_fd(memfd_with(b"3").as_fd(), 3).unwrap();
    drop(dev);
    lu.luo().reboot().unwrap();
    let bytes = lu.memory().to_bytes();
    std::mem::forget((a, b, c));
    Base { bytes, j, store }
}

/// Boots the bytes and registers the handler and FLB of the base image.
fn boot(b: &Base, bytes: Vec<u8>) -> LiveUpdate {
    let lu = boot_bytes(bytes);
    let h: HandlerRef = TestHandler::new("test-x", &b.j, &b.store);
    lu.register_handler(h.clone()).unwrap();
    lu.register_flb(&h, TestFlb::new("test-flb", 0, &b.j))
        .unwrap();
    lu
}

/// The valid base image boots and restores its three sessions (the control).
#[test]
fn the_unmodified_base_image_is_accepted() {
    let b = base();
    let lu = boot(&b, b.bytes.clone());
    let dev = lu.open().expect("valid image");
    assert_eq!(lu.luo().incoming_count(), 3);
    let a = dev.retrieve_session("a").unwrap();
    drop(a.retrieve_fd(2).unwrap());
}

/// Boots `bytes`, expects the incoming state refused with a log line containing `rule`, then
/// checks the device works and hands over a new update that the following image accepts.
fn assert_refused(b: &Base, bytes: Vec<u8>, rule: &str) {
    let lu = boot(b, bytes);
    assert_eq!(errno(lu.open()), EIO, "first open ({rule})");
    assert!(
        logged(lu.memory(), rule),
        "no log line naming {rule:?}: {:?}",
        lu.memory().log_lines()
    );
    let dev = lu.open().expect("second open works");
    assert_eq!(lu.luo().incoming_count(), 0);
    assert_eq!(errno(dev.retrieve_session("a")), ENOENT);
    // The device prepares the next update.
    let s = dev.create_session("next").unwrap();
    s.preserve_fd(memfd_with(b"n").as_fd(), 42).unwrap();
    drop(dev);
    let fd = kexec(lu);
    drop(s);
    let lu2 = LiveUpdate::boot(&fd).unwrap();
    lu2.register_handler(TestHandler::new("test-x", &b.j, &b.store))
        .unwrap();
    let dev2 = lu2.open().expect("the following image accepts it");
    let s2 = dev2.retrieve_session("next").unwrap();
    drop(s2.retrieve_fd(42).unwrap());
    s2.finish().unwrap();
}

fn set_bytes(b: &mut [u8], at: u64, v: &[u8]) {
    b[at as usize..at as usize + v.len()].copy_from_slice(v);
}

#[test]
fn bad_luo_ser_compatible() {
    let b = base();
    for bad in [
        &b"luo-v6\0\0"[..],
        b"luo-v5xx",
        b"\0\0\0\0\0\0\0\0",
        b"LUO-V5\0\0",
    ] {
        let mut bytes = b.bytes.clone();
        let root = root_of(&bytes);
        set_bytes(&mut bytes, root, bad);
        assert_refused(&b, bytes, "luo_ser.compatible is not \"luo-v5\"");
    }
}

#[test]
fn root_blob_smaller_than_luo_ser() {
    let b = base();
    let mut bytes = b.bytes.clone();
    put_u64(&mut bytes, 24, 31);
    assert_refused(&b, bytes, "smaller than luo_ser");
}

#[test]
fn zero_count_session_block() {
    let b = base();
    let mut bytes = b.bytes.clone();
    let blk = sessions_pa(&bytes);
    put_u64(&mut bytes, blk + 8, 0);
    assert_refused(&b, bytes, "invalid entry count 0");
}

#[test]
fn session_block_count_above_capacity() {
    let b = base();
    let mut bytes = b.bytes.clone();
    let blk = sessions_pa(&bytes);
    put_u64(&mut bytes, blk + 8, 52);
    assert_refused(&b, bytes, "invalid entry count 52");
    let mut bytes = b.bytes.clone();
    put_u64(&mut bytes, blk + 8, u64::MAX);
    assert_refused(&b, bytes, "invalid entry count");
}

#[test]
fn zero_or_oversized_count_file_block() {
    let b = base();
    let files_at = sessions(&b.bytes)[0].files;
    for count in [0u64, 64] {
        let mut bytes = b.bytes.clone();
        put_u64(&mut bytes, files_at + 8, count);
        assert_refused(&b, bytes, &format!("invalid entry count {count}"));
    }
}

#[test]
fn block_chain_cycle() {
    let b = base();
    // A block pointing at itself.
    let mut bytes = b.bytes.clone();
    let blk = sessions_pa(&bytes);
    put_u64(&mut bytes, blk, blk);
    assert_refused(&b, bytes, "block chain has a cycle");
    // A file chain looping back.
    let mut bytes = b.bytes.clone();
    let files_at = sessions(&bytes)[0].files;
    put_u64(&mut bytes, files_at, files_at);
    assert_refused(&b, bytes, "block chain has a cycle");
}

#[test]
fn blocks_shared_between_chains() {
    let b = base();
    let ss = sessions(&b.bytes);
    // Session "c"'s file chain points at session "a"'s file block.
    let mut bytes = b.bytes.clone();
    put_u64(&mut bytes, ss[2].at + 64, ss[0].files);
    put_u64(&mut bytes, ss[2].at + 72, 2);
    assert_refused(&b, bytes, "block chain has a cycle");
    // A file chain pointing at the session block.
    let mut bytes = b.bytes.clone();
    put_u64(&mut bytes, ss[0].files, sessions_pa(&b.bytes));
    assert_refused(&b, bytes, "block chain has a cycle");
    // The session chain pointing at the root page.
    let mut bytes = b.bytes.clone();
    let root = root_of(&bytes);
    put_u64(&mut bytes, root + 16, root);
    assert_refused(&b, bytes, "block chain has a cycle");
}

#[test]
fn next_pointing_outside_handover_memory() {
    let b = base();
    let blk = sessions_pa(&b.bytes);
    let len = b.bytes.len() as u64;
    for next in [len, len + 4096 * 1000, u64::MAX - 4095, blk + 8, 4095] {
        let mut bytes = b.bytes.clone();
        put_u64(&mut bytes, blk, next);
        assert_refused(&b, bytes, "address is not readable handover memory");
    }
    // sessions_pa and a file chain head outside too.
    let mut bytes = b.bytes.clone();
    let root = root_of(&bytes);
    put_u64(&mut bytes, root + 16, len + 4096);
    assert_refused(&b, bytes, "address is not readable handover memory");
    let mut bytes = b.bytes.clone();
    let at = sessions(&bytes)[2].at;
    put_u64(&mut bytes, at + 64, 12345);
    assert_refused(&b, bytes, "address is not readable handover memory");
}

#[test]
fn flbs_pa_pointing_outside_or_misaligned() {
    let b = base();
    for bad in [b.bytes.len() as u64 * 2, flbs_pa(&b.bytes) + 16] {
        let mut bytes = b.bytes.clone();
        let root = root_of(&bytes);
        put_u64(&mut bytes, root + 24, bad);
        assert_refused(&b, bytes, "address is not readable handover memory");
    }
}

#[test]
fn unterminated_or_empty_session_name() {
    let b = base();
    let at = sessions(&b.bytes)[1].at;
    let mut bytes = b.bytes.clone();
    set_bytes(&mut bytes, at, &[b'N'; 64]);
    assert_refused(&b, bytes, "session name is empty or not NUL-terminated");
    let mut bytes = b.bytes.clone();
    set_bytes(&mut bytes, at, &[0u8; 64]);
    assert_refused(&b, bytes, "session name is empty or not NUL-terminated");
}

#[test]
fn duplicate_session_names() {
    let b = base();
    let at = sessions(&b.bytes)[2].at;
    let mut bytes = b.bytes.clone();
    set_bytes(&mut bytes, at, b"a\0");
    assert_refused(&b, bytes, "duplicate session name");
}

#[test]
fn duplicate_tokens_in_a_session() {
    let b = base();
    let fs = files(&b.bytes, sessions(&b.bytes)[0].files);
    let mut bytes = b.bytes.clone();
    put_u64(&mut bytes, fs[1].at + 56, fs[0].token);
    assert_refused(&b, bytes, "duplicate file token 0x1");
}

#[test]
fn unterminated_or_empty_file_compatible() {
    let b = base();
    let fs = files(&b.bytes, sessions(&b.bytes)[0].files);
    let mut bytes = b.bytes.clone();
    set_bytes(&mut bytes, fs[0].at, &[b'c'; 48]);
    assert_refused(
        &b,
        bytes,
        "compatible string is empty or not NUL-terminated",
    );
    let mut bytes = b.bytes.clone();
    set_bytes(&mut bytes, fs[1].at, &[0u8; 48]);
    assert_refused(
        &b,
        bytes,
        "compatible string is empty or not NUL-terminated",
    );
}

#[test]
fn file_count_disagrees_with_the_chain() {
    let b = base();
    let ss = sessions(&b.bytes);
    // files == 0 with count != 0 (upstream only WARNs).
    let mut bytes = b.bytes.clone();
    put_u64(&mut bytes, ss[1].at + 72, 1);
    assert_refused(&b, bytes, "claims 1 files but its chain holds 0");
    // A chain with two files, a count of three; and a count of zero.
    let mut bytes = b.bytes.clone();
    put_u64(&mut bytes, ss[0].at + 72, 3);
    assert_refused(&b, bytes, "claims 3 files but its chain holds 2");
    let mut bytes = b.bytes.clone();
    put_u64(&mut bytes, ss[0].at + 72, 0);
    assert_refused(&b, bytes, "claims 0 files but its chain holds 2");
}

#[test]
fn bad_flb_header() {
    let b = base();
    let page = flbs_pa(&b.bytes);
    for (off, v) in [(0u64, 0u64), (0, 2), (8, 64), (8, u64::MAX)] {
        let mut bytes = b.bytes.clone();
        put_u64(&mut bytes, page + off, v);
        assert_refused(&b, bytes, "FLB header has pgcnt != 1 or too many entries");
    }
}

#[test]
fn bad_flb_entries() {
    let b = base();
    let page = flbs_pa(&b.bytes);
    // Unterminated name.
    let mut bytes = b.bytes.clone();
    set_bytes(&mut bytes, page + 16, &[b'f'; 48]);
    assert_refused(
        &b,
        bytes,
        "compatible string is empty or not NUL-terminated",
    );
    // Two entries with the same name.
    let mut bytes = b.bytes.clone();
    let entry = bytes[page as usize + 16..page as usize + 80].to_vec();
    set_bytes(&mut bytes, page + 80, &entry);
    put_u64(&mut bytes, page + 8, 2);
    assert_refused(&b, bytes, "duplicate FLB name");
}

#[test]
fn more_than_10000_blocks() {
    let b = base();
    let mut bytes = b.bytes.clone();
    let first = bytes.len() as u64;
    let n = 10_001u64;
    bytes.resize(bytes.len() + n as usize * PAGE, 0);
    for i in 0..n {
        let at = first + i * PAGE as u64;
        let next = if i + 1 < n { at + PAGE as u64 } else { 0 };
        put_u64(&mut bytes, at, next);
        put_u64(&mut bytes, at + 8, 1);
        set_bytes(&mut bytes, at + 16, format!("s{i}\0").as_bytes());
    }
    let pages = (bytes.len() / PAGE) as u64;
    put_u64(&mut bytes, 32, pages);
    let root = root_of(&bytes);
    put_u64(&mut bytes, root + 16, first);
    assert_refused(&b, bytes, "block chain longer than 10000 blocks");
}

#[test]
fn exactly_10000_blocks_is_accepted() {
    let b = base();
    let mut bytes = b.bytes.clone();
    let first = bytes.len() as u64;
    let n = 10_000u64;
    bytes.resize(bytes.len() + n as usize * PAGE, 0);
    for i in 0..n {
        let at = first + i * PAGE as u64;
        let next = if i + 1 < n { at + PAGE as u64 } else { 0 };
        put_u64(&mut bytes, at, next);
        put_u64(&mut bytes, at + 8, 1);
        set_bytes(&mut bytes, at + 16, format!("s{i}\0").as_bytes());
    }
    let pages = (bytes.len() / PAGE) as u64;
    put_u64(&mut bytes, 32, pages);
    let root = root_of(&bytes);
    put_u64(&mut bytes, root + 16, first);
    let lu = boot(&b, bytes);
    lu.open().expect("10000 blocks are within KHO_MAX_BLOCKS");
    assert_eq!(lu.luo().incoming_count(), 10_000);
}

#[test]
fn unknown_handler_is_refused_until_it_registers() {
    let b = base();
    let fs = files(&b.bytes, sessions(&b.bytes)[2].files);
    let mut bytes = b.bytes.clone();
    set_bytes(&mut bytes, fs[0].at, b"test-z\0");
    let lu = boot(&b, bytes);
    assert_eq!(errno(lu.open()), EIO);
    assert!(logged(
        lu.memory(),
        "no registered handler for this compatible"
    ));
    assert_eq!(errno(lu.open()), EIO, "nothing consumed, still missing");
    lu.register_handler(TestHandler::new("test-z", &b.j, &b.store))
        .unwrap();
    let dev = lu.open().unwrap();
    assert_eq!(lu.luo().incoming_count(), 3);
    let c = dev.retrieve_session("c").unwrap();
    drop(c.retrieve_fd(3).unwrap());
}

#[test]
fn broken_handover_file_headers_are_refused_before_luo_reads_them() {
    let b = base();
    let mut bad_magic = b.bytes.clone();
    bad_magic[0] = b'X';
    assert!(Memory::from_bytes(bad_magic).is_err());
    let mut bad_page = b.bytes.clone();
    bad_page[8..12].copy_from_slice(&8192u32.to_ne_bytes());
    assert!(Memory::from_bytes(bad_page).is_err());
    let mut bad_count = b.bytes.clone();
    put_u64(&mut bad_count, 32, 3);
    assert!(Memory::from_bytes(bad_count).is_err());
    let mut short = b.bytes.clone();
    short.truncate(short.len() - 1);
    assert!(Memory::from_bytes(short).is_err());
    assert!(Memory::from_bytes(Vec::new()).is_err());
    // No root recorded: a cold boot.
    let mut no_root = b.bytes.clone();
    put_u64(&mut no_root, 16, 0);
    let lu = boot(&b, no_root);
    lu.open().expect("cold boot");
    assert_eq!(lu.luo().incoming_count(), 0);
    assert_eq!(lu.luo().liveupdate_num(), 1);
}

/// A tiny deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Random corruption of the LUO metadata pages: never a panic, and the device is always usable
/// after at most one refused open (or, if a compatible was garbled into another valid string,
/// refused until that handler registers, with a log line saying so).
#[test]
fn random_corruption_never_panics_and_leaves_a_usable_device() {
    let b = base();
    let ss = sessions(&b.bytes);
    let pages = [
        root_of(&b.bytes),
        sessions_pa(&b.bytes),
        ss[0].files,
        ss[2].files,
        flbs_pa(&b.bytes),
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut refused, mut accepted) = (0, 0);
    for _ in 0..400 {
        let mut bytes = b.bytes.clone();
        for _ in 0..1 + rng.next() % 4 {
            let page = pages[(rng.next() % pages.len() as u64) as usize];
            // Mostly the interesting first bytes of each page.
            let off = rng.next() % if rng.next() % 4 == 0 { 4096 } else { 256 };
            let v = match rng.next() % 4 {
                0 => 0,
                1 => 0xff,
                2 => (rng.next() & 0xff) as u8,
                _ => bytes[(page + off) as usize] ^ (1 << (rng.next() % 8)),
            };
            bytes[(page + off) as usize] = v;
        }
        let lu = boot(&b, bytes);
        match lu.open() {
            Ok(dev) => {
                accepted += 1;
                drop(dev);
            }
            Err(e) => {
                assert_eq!(e.errno(), EIO);
                refused += 1;
                if let Err(e2) = lu.open() {
                    assert_eq!(e2.errno(), EIO);
                    assert!(logged(lu.memory(), "no registered handler"));
                    continue;
                }
            }
        }
        let dev = lu.open().unwrap_or_else(|e| panic!("device unusable: {e}"));
        dev.create_session("after-corruption").unwrap();
    }
    assert!(
        refused > 30 && accepted > 30,
        "{refused} refused, {accepted} accepted"
    );
}
