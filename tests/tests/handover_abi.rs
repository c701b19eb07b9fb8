//! The `luo-v5` handover bytes (spec §7), decoded by hand from `Memory::to_bytes()`: the
//! backend's header page, then every page at its address (an address is a byte offset).

use std::collections::BTreeSet;
use std::os::fd::AsFd;

use backend_user::{HandlerRef, LiveUpdate};
use luo_handlers::testing::{Event, Journal, Store, TestFlb, TestHandler, TEST_FLB_DATA};
use luo_tests::*;

const T: u64 = 0x0123_4567_89AB_CDEF;
/// The first data word a fresh `Store` hands out.
const D: u64 = 0x1000;

fn field<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut f = [0u8; N];
    f[..s.len()].copy_from_slice(s);
    f
}

fn page_of(bytes: &[u8], at: u64) -> &[u8] {
    &bytes[at as usize..at as usize + PAGE]
}

/// Writes native-endian words and byte strings into a zeroed page.
struct PageBuilder(Vec<u8>);

impl PageBuilder {
    fn new() -> Self {
        PageBuilder(vec![0u8; PAGE])
    }
    fn u64(mut self, off: usize, v: u64) -> Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn bytes(mut self, off: usize, b: &[u8]) -> Self {
        self.0[off..off + b.len()].copy_from_slice(b);
        self
    }
}

/// The fixture: session "a" with one file of handler "test-x" (data D, token T), an empty
/// session "b", and FLB "test-flb" linked to "test-x". Returns the image after reboot.
fn fixture(j: &Journal, store: &Store) -> LiveUpdate {
    let lu = LiveUpdate::new().unwrap();
    let h: HandlerRef = TestHandler::new("test-x", j, store);
    lu.register_handler(h.clone()).unwrap();
    lu.register_flb(&h, TestFlb::new("test-flb", 0, j)).unwrap();
    let dev = lu.open().unwrap();
    let a = dev.create_session("a").unwrap();
    let _b = dev.create_session("b").unwrap();
    a.preserve_fd(memfd_with(b"x").as_fd(), T).unwrap();
    drop(dev);
    lu.luo().reboot().unwrap();
    std::mem::forget((a, _b));
    lu
}

#[test]
fn fixture_bytes_are_exactly_luo_v5() {
    let j = Journal::new();
    let store = Store::new();
    let lu = fixture(&j, &store);
    assert!(j.take().contains(&Event::Preserve("test-x".into(), D)));
    let b = lu.memory().to_bytes();
    assert_eq!(b.len() % PAGE, 0);

    // The backend's header page: magic, page size, root, root size, page count.
    let root = root_of(&b);
    let header = PageBuilder::new()
        .bytes(0, b"LUOUSER1")
        .bytes(8, &4096u32.to_ne_bytes())
        .u64(16, root)
        .u64(24, 32)
        .u64(32, (b.len() / PAGE) as u64);
    assert_eq!(&b[..PAGE], &header.0[..]);

    // struct luo_ser: "luo-v5\0\0", liveupdate_num 1, sessions_pa, flbs_pa.
    let sessions_at = sessions_pa(&b);
    let flbs_at = flbs_pa(&b);
    let luo_ser = PageBuilder::new()
        .bytes(0, b"luo-v5\0\0")
        .u64(8, 1)
        .u64(16, sessions_at)
        .u64(24, flbs_at);
    assert_eq!(page_of(&b, root), &luo_ser.0[..]);

    // The session block: {next 0, count 2}, two 80-byte luo_session_ser.
    let files_at = u64_at(&b, sessions_at + 16 + 64);
    let session_block = PageBuilder::new()
        .u64(0, 0)
        .u64(8, 2)
        .bytes(16, &field::<64>(b"a"))
        .u64(16 + 64, files_at)
        .u64(16 + 72, 1)
        .bytes(16 + 80, &field::<64>(b"b"))
        .u64(16 + 80 + 64, 0)
        .u64(16 + 80 + 72, 0);
    assert_eq!(page_of(&b, sessions_at), &session_block.0[..]);

    // The file block of "a": {next 0, count 1}, one 64-byte luo_file_ser.
    let file_block = PageBuilder::new()
        .u64(0, 0)
        .u64(8, 1)
        .bytes(16, &field::<48>(b"test-x"))
        .u64(16 + 48, D)
        .u64(16 + 56, T);
    assert_eq!(page_of(&b, files_at), &file_block.0[..]);

    // The FLB page: {pgcnt 1, count 1}, one 64-byte luo_flb_ser.
    let flb_page = PageBuilder::new()
        .u64(0, 1)
        .u64(8, 1)
        .bytes(16, &field::<48>(b"test-flb"))
        .u64(16 + 48, TEST_FLB_DATA)
        .u64(16 + 56, 1);
    assert_eq!(page_of(&b, flbs_at), &flb_page.0[..]);

    // Nothing else: every other page is zero, and the four pages are distinct and aligned.
    let used: BTreeSet<u64> = [root, sessions_at, files_at, flbs_at].into();
    assert_eq!(used.len(), 4);
    for at in (PAGE as u64..b.len() as u64).step_by(PAGE) {
        if !used.contains(&at) {
            assert!(
                page_of(&b, at).iter().all(|&x| x == 0),
                "stray page {at:#x}"
            );
        }
    }
    assert!(used.iter().all(|a| a % PAGE as u64 == 0 && *a != 0));
}

#[test]
fn fixture_round_trips_into_the_next_image() {
    let j = Journal::new();
    let store = Store::new();
    let lu = fixture(&j, &store);
    let bytes = lu.memory().to_bytes();
    j.take();
    let lu2 = boot_bytes(bytes);
    // Metadata pages (root, FLB page, session block, file block) are released once read.
    assert_eq!(lu2.memory().released_incoming(), 4);
    let h: HandlerRef = TestHandler::new("test-x", &j, &store);
    lu2.register_handler(h.clone()).unwrap();
    lu2.register_flb(&h, TestFlb::new("test-flb", 0, &j))
        .unwrap();
    let dev = lu2.open().unwrap();
    assert_eq!(lu2.luo().incoming_count(), 2);
    let a = dev.retrieve_session("a").unwrap();
    let b = dev.retrieve_session("b").unwrap();
    let mut tokens = Vec::new();
    a.session().tokens(|t| tokens.push(t));
    assert_eq!(tokens, [T]);
    assert_eq!(b.session().file_count(), 0);
    drop(a.retrieve_fd(T).unwrap());
    assert_eq!(j.take(), vec![Event::Retrieve("test-x".into(), D)]);
    a.finish().unwrap();
    assert!(j
        .take()
        .contains(&Event::FlbFinish("test-flb".into(), TEST_FLB_DATA)));
    // The next image hands over liveupdate_num 2.
    assert_eq!(lu2.luo().liveupdate_num(), 2);
    drop(dev);
    lu2.luo().reboot().unwrap();
    assert_eq!(liveupdate_num(&lu2.memory().to_bytes()), 2);
}

#[test]
fn liveupdate_num_increments_across_reboots() {
    let mut lu = cold_memfd();
    for n in 1..=4u64 {
        assert_eq!(lu.luo().liveupdate_num(), n);
        lu.luo().reboot().unwrap();
        let bytes = lu.memory().to_bytes();
        assert_eq!(liveupdate_num(&bytes), n);
        // No sessions: sessions_pa 0; the FLB page exists with no entries.
        assert_eq!(sessions_pa(&bytes), 0);
        assert_ne!(flbs_pa(&bytes), 0);
        assert_eq!(u64_at(&bytes, flbs_pa(&bytes)), 1, "pgcnt");
        assert_eq!(u64_at(&bytes, flbs_pa(&bytes) + 8), 0, "count");
        let fd = kexec(lu);
        lu = boot_memfd(&fd);
        assert!(logged(
            lu.memory(),
            &format!("Retrieved live update data, liveupdate number: {n}")
        ));
    }
}

/// Block counts of the session chain after creating `n` empty sessions.
fn session_blocks(n: usize) -> Vec<u64> {
    assert!(raise_nofile(n as u64 + 64));
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let held: Vec<_> = (0..n)
        .map(|i| dev.create_session(&format!("s{i:03}")).unwrap())
        .collect();
    drop(dev);
    lu.luo().reboot().unwrap();
    let b = lu.memory().to_bytes();
    let blocks = chain(&b, sessions_pa(&b));
    let names: Vec<String> = sessions(&b).into_iter().map(|s| s.name).collect();
    let expected: Vec<String> = (0..n).map(|i| format!("s{i:03}")).collect();
    assert_eq!(names, expected);
    // Every block is page-aligned, the last one ends the chain.
    assert!(blocks.iter().all(|&a| a % PAGE as u64 == 0));
    if let Some(&last) = blocks.last() {
        assert_eq!(u64_at(&b, last), 0);
    }
    drop(held);
    blocks.iter().map(|&a| u64_at(&b, a + 8)).collect()
}

#[test]
fn fifty_one_sessions_per_block() {
    assert_eq!(session_blocks(1), [1]);
    assert_eq!(session_blocks(51), [51]);
    assert_eq!(session_blocks(52), [51, 1]);
    assert_eq!(session_blocks(102), [51, 51]);
    assert_eq!(session_blocks(103), [51, 51, 1]);
}

/// Block counts of one session's file chain after preserving `n` memfds (test handler).
fn file_blocks(n: u64) -> Vec<u64> {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    lu.register_handler(TestHandler::new("test-x", &j, &store))
        .unwrap();
    let dev = lu.open().unwrap();
    let s = dev.create_session("files").unwrap();
    for t in 0..n {
        s.preserve_fd(memfd_with(b"").as_fd(), 1000 + t).unwrap();
    }
    drop(dev);
    lu.luo().reboot().unwrap();
    let b = lu.memory().to_bytes();
    let ss = sessions(&b);
    assert_eq!(ss.len(), 1);
    assert_eq!(ss[0].count, n);
    let fs = files(&b, ss[0].files);
    let tokens: Vec<u64> = fs.iter().map(|f| f.token).collect();
    assert_eq!(tokens, (0..n).map(|t| 1000 + t).collect::<Vec<_>>());
    let data: Vec<u64> = fs.iter().map(|f| f.data).collect();
    assert_eq!(data, (0..n).map(|t| D + t).collect::<Vec<_>>());
    assert!(fs.iter().all(|f| f.compat == "test-x"));
    std::mem::forget(s);
    chain(&b, ss[0].files)
        .iter()
        .map(|&a| u64_at(&b, a + 8))
        .collect()
}

#[test]
fn sixty_three_files_per_block() {
    assert_eq!(file_blocks(1), [1]);
    assert_eq!(file_blocks(63), [63]);
    assert_eq!(file_blocks(64), [63, 1]);
    assert_eq!(file_blocks(127), [63, 63, 1]);
}

#[test]
fn names_are_nul_padded_whatever_the_caller_sent_after_the_nul() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let mut raw = [0xEEu8; 64];
    raw[..5].copy_from_slice(b"dirty");
    raw[5] = 0;
    let mut req = session_req(&raw, 72, 72);
    let _s = dev.ioctl(CREATE, &mut req).unwrap();
    let long = "L".repeat(63);
    let _l = dev.create_session(&long).unwrap();
    drop(dev);
    lu.luo().reboot().unwrap();
    let b = lu.memory().to_bytes();
    let ss = sessions(&b);
    let first = &b[ss[0].at as usize..ss[0].at as usize + 64];
    assert_eq!(first, &field::<64>(b"dirty"));
    let second = &b[ss[1].at as usize..ss[1].at as usize + 64];
    assert_eq!(&second[..63], long.as_bytes());
    assert_eq!(second[63], 0);
}

#[test]
fn only_flbs_with_references_are_written_in_registration_order() {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let x = TestHandler::new("test-x", &j, &store);
    let y = TestHandler::new("test-y", &j, &store);
    let (mx, my) = (memfd_with(b"x"), memfd_with(b"y"));
    x.accept_only(&[identity(mx.as_fd())]);
    y.accept_only(&[identity(my.as_fd())]);
    let (x, y): (HandlerRef, HandlerRef) = (x, y);
    lu.register_handler(x.clone()).unwrap();
    lu.register_handler(y.clone()).unwrap();
    // Registration order: late, idle, early; "idle" is linked to a handler with no files.
    let idle_handler: HandlerRef = TestHandler::new("test-idle", &j, &store);
    lu.register_handler(idle_handler.clone()).unwrap();
    lu.register_flb(&y, TestFlb::new("late", 2, &j)).unwrap();
    lu.register_flb(&idle_handler, TestFlb::new("idle", 5, &j))
        .unwrap();
    lu.register_flb(&x, TestFlb::new("early", 1, &j)).unwrap();
    let both = TestFlb::new("both", 3, &j);
    lu.register_flb(&y, both.clone()).unwrap();
    lu.register_flb(&x, both).unwrap();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    s.preserve_fd(mx.as_fd(), 1).unwrap();
    s.preserve_fd(my.as_fd(), 2).unwrap();
    drop(dev);
    lu.luo().reboot().unwrap();
    assert_eq!(
        flb_entries(&lu.memory().to_bytes()),
        vec![
            ("late".to_string(), TEST_FLB_DATA + 2, 1),
            ("early".to_string(), TEST_FLB_DATA + 1, 1),
            ("both".to_string(), TEST_FLB_DATA + 3, 2),
        ]
    );
    std::mem::forget(s);
}

#[test]
fn handover_without_sessions_boots_with_none() {
    let lu = cold_memfd();
    drop(lu.open().unwrap());
    let fd = kexec(lu);
    let lu2 = boot_memfd(&fd);
    let dev = lu2.open().unwrap();
    assert_eq!(lu2.luo().incoming_count(), 0);
    assert_eq!(
        errno(dev.retrieve_session("anything")),
        luo_core::errno::ENOENT
    );
    // The root was released; the FLB page too.
    assert_eq!(lu2.memory().released_incoming(), 2);
}

#[test]
fn any_name_bytes_and_any_token_round_trip() {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    lu.register_handler(TestHandler::new("test-x", &j, &store))
        .unwrap();
    let dev = lu.open().unwrap();
    // Any byte but NUL: slashes, spaces, newlines, non-UTF-8.
    let names: [&[u8]; 4] = [b"a/b c", b"line\nbreak", &[0xff, 0xfe, 0x01], &[b'z'; 63]];
    let mut held = Vec::new();
    for n in names {
        let mut req = session_req(n, 72, 72);
        match dev.ioctl(CREATE, &mut req).unwrap() {
            backend_user::Installed::Session(s) => held.push(s),
            _ => panic!("no session"),
        }
    }
    let tokens = [0u64, u64::MAX, 1 << 63];
    for &t in &tokens {
        held[0].preserve_fd(memfd_with(b"").as_fd(), t).unwrap();
    }
    drop(dev);
    let fd = kexec(lu);
    drop(held);
    let lu2 = LiveUpdate::boot(&fd).unwrap();
    lu2.register_handler(TestHandler::new("test-x", &j, &store))
        .unwrap();
    let dev2 = lu2.open().unwrap();
    for n in names {
        let mut req = session_req(n, 72, 72);
        let s = match dev2.ioctl(RETRIEVE, &mut req).unwrap() {
            backend_user::Installed::Session(s) => s,
            _ => panic!("no session"),
        };
        let mut g = get_name_req(0, 72, 72, 0x55);
        s.ioctl(GET_NAME, &mut g).unwrap();
        assert_eq!(&g[8..8 + n.len()], n);
        // GET_NAME writes the NUL and zeroes the rest (B18 fixed).
        assert!(g[8 + n.len()..72].iter().all(|&b| b == 0));
        if n == b"a/b c" {
            for &t in &tokens {
                drop(s.retrieve_fd(t).unwrap());
            }
        }
    }
}
