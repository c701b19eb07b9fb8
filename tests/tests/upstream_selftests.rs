//! The 15 cases of `tools/testing/selftests/liveupdate/liveupdate.c` (spec §11.1), with the
//! memfd handler. Each upstream test runs in a forked child with a fresh `/dev/liveupdate`
//! open; here each test boots its own `LiveUpdate` (a fresh "kernel"), which gives the same
//! isolation. Upstream wrappers return `-errno`; here results carry the errno.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;

use luo_core::errno::{EBUSY, EEXIST, EINVAL, ENOENT};
use luo_tests::{
    cold_memfd, errno, memfd_with, raise_nofile, read_all, reply_fd, session_req, CREATE, GET_NAME,
};

/// Upstream test 1, `basic_open_close`: open ≥ 0, close == 0; the device can be opened again after
/// close.
#[test]
fn basic_open_close() {
    let lu = cold_memfd();
    let dev = lu.open().expect("open");
    drop(dev);
    // Close released the exclusive-open token.
    let again = lu.open().expect("reopen after close");
    drop(again);
}

/// Upstream test 2, `exclusive_open`: a second open while the first is held fails with EBUSY.
#[test]
fn exclusive_open() {
    let lu = cold_memfd();
    let _dev = lu.open().expect("open");
    assert_eq!(errno(lu.open()), EBUSY);
}

/// Upstream test 3, `create_duplicate_session`: the second create of the same name gives EEXIST.
#[test]
fn create_duplicate_session() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("duplicate-session-test").expect("first");
    assert!(s.raw_fd() >= 0);
    assert_eq!(errno(dev.create_session("duplicate-session-test")), EEXIST);
}

/// Upstream test 4, `create_distinct_sessions`: both creates succeed, both closes succeed.
#[test]
fn create_distinct_sessions() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s1 = dev.create_session("distinct-session-1").expect("s1");
    let s2 = dev.create_session("distinct-session-2").expect("s2");
    assert!(s1.raw_fd() >= 0 && s2.raw_fd() >= 0);
    assert_ne!(s1.raw_fd(), s2.raw_fd());
    assert_eq!(lu.luo().outgoing_count(), 2);
    drop(s1);
    drop(s2);
    assert_eq!(lu.luo().outgoing_count(), 0);
}

/// Upstream test 5, `preserve_memfd`: preserve, close the session (unpreserve), the content is
/// intact.
#[test]
fn preserve_memfd() {
    let test_str = "hello liveupdate";
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let session = dev.create_session("preserve-memfd-test").unwrap();
    let mut mem = memfd_with(b"");
    assert_eq!(mem.write(test_str.as_bytes()).unwrap(), test_str.len());
    session.preserve_fd(mem.as_fd(), 0x1234).expect("preserve");
    assert_eq!(session.session().file_count(), 1);
    drop(session);
    mem.seek(SeekFrom::Start(0)).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(mem.read(&mut buf).unwrap(), test_str.len());
    assert_eq!(&buf[..test_str.len()], test_str.as_bytes());
    // Unpreserve released the file: it can be preserved again.
    let s2 = dev.create_session("preserve-memfd-test").unwrap();
    s2.preserve_fd(mem.as_fd(), 0x1234).expect("preserve again");
}

/// Upstream test 6, `preserve_multiple_memfds`: two memfds in one session, both readable while
/// preserved.
#[test]
fn preserve_multiple_memfds() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let session = dev.create_session("preserve-multi-memfd-test").unwrap();
    let mut m1 = memfd_with(b"data for memfd one");
    let mut m2 = memfd_with(b"data for memfd two");
    session.preserve_fd(m1.as_fd(), 0xAAAA).expect("m1");
    session.preserve_fd(m2.as_fd(), 0xBBBB).expect("m2");
    let mut tokens = Vec::new();
    session.session().tokens(|t| tokens.push(t));
    assert_eq!(tokens, vec![0xAAAA, 0xBBBB]);
    assert_eq!(read_all(&mut m1), b"data for memfd one");
    assert_eq!(read_all(&mut m2), b"data for memfd two");
}

/// Upstream test 7, `preserve_complex_scenario`: two sessions, each with a data memfd and an empty
/// one.
#[test]
fn preserve_complex_scenario() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s1 = dev.create_session("complex-session-1").unwrap();
    let s2 = dev.create_session("complex-session-2").unwrap();
    let mut d1 = memfd_with(b"complex data 1");
    let mut e1 = memfd_with(b"");
    let mut d2 = memfd_with(b"complex data 2");
    let mut e2 = memfd_with(b"");
    s1.preserve_fd(d1.as_fd(), 0x1111).expect("d1");
    s1.preserve_fd(e1.as_fd(), 0x2222).expect("e1");
    s2.preserve_fd(d2.as_fd(), 0x3333).expect("d2");
    s2.preserve_fd(e2.as_fd(), 0x4444).expect("e2");
    assert_eq!(read_all(&mut d1), b"complex data 1");
    assert_eq!(read_all(&mut d2), b"complex data 2");
    assert!(read_all(&mut e1).is_empty());
    assert!(read_all(&mut e2).is_empty());
    assert_eq!(s1.session().file_count(), 2);
    assert_eq!(s2.session().file_count(), 2);
}

/// Upstream test 8, `preserve_unsupported_fd`: `/dev/null` has no handler: ENOENT.
#[test]
fn preserve_unsupported_fd() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("unsupported-fd-test").unwrap();
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .unwrap();
    assert_eq!(errno(s.preserve_fd(null.as_fd(), 0xDEAD)), ENOENT);
    assert_eq!(s.session().file_count(), 0);
}

/// Upstream test 9, `prevent_double_preservation`: success, then EBUSY in another session, then
/// EBUSY in
/// the same session with another token.
#[test]
fn prevent_double_preservation() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s1 = dev.create_session("double-preserve-session-1").unwrap();
    let s2 = dev.create_session("double-preserve-session-2").unwrap();
    let m = memfd_with(b"");
    s1.preserve_fd(m.as_fd(), 0x1111).expect("first");
    assert_eq!(errno(s2.preserve_fd(m.as_fd(), 0x2222)), EBUSY);
    assert_eq!(errno(s1.preserve_fd(m.as_fd(), 0x3333)), EBUSY);
    assert_eq!(s1.session().file_count(), 1);
    assert_eq!(s2.session().file_count(), 0);
}

/// Upstream test 10, `create_session_no_null_termination`: raw CREATE with 64 × 'X' gives EINVAL.
#[test]
fn create_session_no_null_termination() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let mut req = session_req(&[b'X'; 64], 72, 72);
    assert_eq!(&req[8..72], &[b'X'; 64]);
    assert_eq!(errno(dev.ioctl(CREATE, &mut req)), EINVAL);
    assert_eq!(lu.luo().outgoing_count(), 0);
}

/// Upstream test 11, `create_session_empty_name`: EINVAL.
#[test]
fn create_session_empty_name() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    assert_eq!(errno(dev.create_session("")), EINVAL);
    assert_eq!(lu.luo().outgoing_count(), 0);
}

/// Upstream test 12, `get_session_name`: GET_NAME (reserved 0) returns the name.
#[test]
fn get_session_name() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("get-name-test-session").unwrap();
    assert_eq!(s.get_name().unwrap(), "get-name-test-session");
    // The raw reply: size echoed, reserved 0, the name NUL-terminated.
    let mut req = luo_tests::get_name_req(0, 72, 72, 0);
    s.ioctl(GET_NAME, &mut req).unwrap();
    assert_eq!(luo_tests::reply_size(&req), 72);
    assert_eq!(&req[8..8 + 21], b"get-name-test-session");
    assert_eq!(req[8 + 21], 0);
}

/// Upstream test 13, `get_session_name_max_length`: a 63-character name round-trips.
#[test]
fn get_session_name_max_length() {
    let name = "A".repeat(63);
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session(&name).expect("63 characters");
    assert_eq!(s.get_name().unwrap(), name);
    // 64 characters have no room for the NUL.
    assert_eq!(errno(dev.create_session(&"A".repeat(64))), EINVAL);
}

/// Upstream test 14, `preserve_many_sessions`: 2000 sessions (40 session blocks), all created, all
/// closed.
#[test]
fn preserve_many_sessions() {
    const N: usize = 2000;
    if !raise_nofile(N as u64 + 32) {
        eprintln!("SKIP: cannot raise RLIMIT_NOFILE");
        return;
    }
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let base = lu.memory().outgoing_pages();
    let mut sessions = Vec::with_capacity(N);
    for i in 0..N {
        let s = dev
            .create_session(&format!("many-session-{i}"))
            .unwrap_or_else(|e| panic!("session {i}: {e}"));
        assert!(s.raw_fd() >= 0);
        sessions.push(s);
    }
    assert_eq!(lu.luo().outgoing_count(), N);
    // ceil(2000 / 51) = 40 blocks reserved eagerly.
    assert_eq!(lu.memory().outgoing_pages() - base, 40);
    // Raw create also works at this scale and returns a fresh fd.
    let mut req = session_req(b"many-session-extra", 72, 72);
    let extra = match dev.ioctl(CREATE, &mut req).unwrap() {
        backend_user::Installed::Session(s) => s,
        _ => panic!("no session installed"),
    };
    assert_eq!(reply_fd(&req), extra.raw_fd());
    drop(extra);
    sessions.clear();
    assert_eq!(lu.luo().outgoing_count(), 0);
    assert_eq!(lu.memory().outgoing_pages(), base);
}

/// Upstream test 15, `preserve_many_files`: 500 empty memfds (8 file blocks) in one session.
#[test]
fn preserve_many_files() {
    const N: u64 = 500;
    if !raise_nofile(2 * N + 32) {
        eprintln!("SKIP: cannot raise RLIMIT_NOFILE");
        return;
    }
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let base = lu.memory().outgoing_pages();
    let s = dev.create_session("many-files-test").unwrap();
    let mut memfds = Vec::new();
    for i in 0..N {
        let m = memfd_with(b"");
        s.preserve_fd(m.as_fd(), i)
            .unwrap_or_else(|e| panic!("file {i}: {e}"));
        memfds.push(m);
    }
    assert_eq!(s.session().file_count(), N as usize);
    // 1 session block + ceil(500 / 63) = 8 file blocks + one handler page per memfd.
    assert_eq!(
        lu.memory().outgoing_pages() - base,
        1 + 8 + N as usize,
        "session block, file blocks and memfd pages"
    );
    memfds.clear();
    drop(s);
    assert_eq!(lu.luo().outgoing_count(), 0);
    assert_eq!(lu.memory().outgoing_pages(), base);
}
