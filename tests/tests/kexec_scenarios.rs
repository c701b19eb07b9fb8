//! The kexec selftests of spec §11.2 (`luo_kexec_simple`, `luo_multi_session`,
//! `luo_stress_files`, `luo_stress_sessions`), with an in-process userspace reboot between the
//! stages. As upstream's `luo_test()`: the stage is found by RETRIEVE_SESSION of the state
//! session (ENOENT: stage 1), stage 1 creates the state session holding a memfd whose content
//! is the next stage number, runs the test, closes `/dev/liveupdate` and keeps every session fd
//! open across the reboot (the daemon); stage 2 restores the state memfd, requires "2", runs the
//! checks, then finishes and closes the state session last.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use backend_user::{Device, LiveUpdate, SessionFd};
use luo_core::errno::{EINVAL, ENOENT};
use luo_tests::{boot_memfd, c_string, cold_memfd, errno, kexec, page_memfd, raise_nofile};

/// `create_state_file`: a session holding a page memfd with the next stage number.
fn create_state_file(dev: &Device, name: &str, token: u64, next_stage: u32) -> SessionFd {
    let s = dev.create_session(name).expect("state session");
    let m = page_memfd(&next_stage.to_string());
    s.preserve_fd(m.as_fd(), token).expect("state memfd");
    // Upstream closes the memfd after preserving it.
    drop(m);
    s
}

/// `create_and_preserve_memfd`: a page memfd holding `data`, preserved, then closed.
fn create_and_preserve_memfd(s: &SessionFd, token: u64, data: &str) {
    let m = page_memfd(data);
    s.preserve_fd(m.as_fd(), token)
        .unwrap_or_else(|e| panic!("preserve {token:#x}: {e}"));
}

/// `restore_and_verify_memfd`: RETRIEVE_FD, then the page compared as a C string.
fn restore_and_verify_memfd(s: &SessionFd, token: u64, expected: &str) {
    let f = std::fs::File::from(
        s.retrieve_fd(token)
            .unwrap_or_else(|e| panic!("retrieve {token:#x}: {e}")),
    );
    let mut page = vec![0u8; 4096];
    let n = f.read_at(&mut page, 0).expect("read");
    assert_eq!(n, 4096, "the page-sized memfd kept its size");
    assert_eq!(c_string(&page), expected, "token {token:#x}");
}

/// `restore_and_read_stage`: retrieve, `read()` from the current position (which must be the
/// preserved 0), `atoi`.
fn restore_and_read_stage(state: &SessionFd, token: u64) -> u32 {
    use std::io::Read;
    let mut f = std::fs::File::from(state.retrieve_fd(token).expect("state memfd"));
    let mut buf = [0u8; 32];
    let n = f.read(&mut buf).expect("read");
    assert!(n > 0);
    c_string(&buf[..n]).parse().expect("stage number")
}

/// `luo_test()` across one reboot. `stage1` returns the session fds it keeps open (the daemon
/// holds them until the kexec); `stage2` runs in the new image.
fn luo_test(
    state_name: &str,
    state_token: u64,
    stage1: impl FnOnce(&Device) -> Vec<SessionFd>,
    stage2: impl FnOnce(&LiveUpdate, &Device),
) {
    // Stage 1: a cold boot.
    let lu = cold_memfd();
    let dev = lu.open().expect("open");
    assert_eq!(
        errno(dev.retrieve_session(state_name)),
        ENOENT,
        "no state session: stage 1"
    );
    let state = create_state_file(&dev, state_name, state_token, 2);
    let held = stage1(&dev);
    drop(dev);
    let handover = kexec(lu);
    // The daemon's fds go away only after the kexec: nothing is unpreserved.
    drop(held);
    drop(state);

    // Stage 2.
    let lu2 = boot_memfd(&handover);
    let dev2 = lu2.open().expect("open in stage 2");
    let state = dev2
        .retrieve_session(state_name)
        .expect("state session exists: stage 2");
    assert_eq!(restore_and_read_stage(&state, state_token), 2);
    stage2(&lu2, &dev2);
    state.finish().expect("finish state session");
    drop(state);
    assert_eq!(
        errno(dev2.retrieve_session(state_name)),
        ENOENT,
        "closed after finish"
    );
    assert_eq!(
        lu2.luo().incoming_count(),
        0,
        "every incoming session closed"
    );
}

/// `luo_kexec_simple`.
#[test]
fn luo_kexec_simple() {
    luo_test(
        "kexec_simple_state",
        999,
        |dev| {
            let s = dev.create_session("test-session").unwrap();
            create_and_preserve_memfd(&s, 0x1A, "hello kexec world");
            vec![s]
        },
        |_, dev| {
            let s = dev.retrieve_session("test-session").expect("retrieve");
            restore_and_verify_memfd(&s, 0x1A, "hello kexec world");
            s.finish().expect("finish");
            drop(s);
        },
    );
}

/// `luo_multi_session`.
#[test]
fn luo_multi_session() {
    luo_test(
        "kexec_multi_state",
        998,
        |dev| {
            let e1 = dev.create_session("multi-test-empty-1").unwrap();
            let e2 = dev.create_session("multi-test-empty-2").unwrap();
            let f1 = dev.create_session("multi-test-files-1").unwrap();
            create_and_preserve_memfd(&f1, 0x1001, "Data for session files 1");
            let f2 = dev.create_session("multi-test-files-2").unwrap();
            create_and_preserve_memfd(&f2, 0x2002, "First file for session files 2");
            create_and_preserve_memfd(&f2, 0x3003, "Second file for session files 2");
            vec![e1, e2, f1, f2]
        },
        |lu, dev| {
            assert_eq!(lu.luo().incoming_count(), 5);
            let e1 = dev.retrieve_session("multi-test-empty-1").expect("empty 1");
            let e2 = dev.retrieve_session("multi-test-empty-2").expect("empty 2");
            let f1 = dev.retrieve_session("multi-test-files-1").expect("files 1");
            let f2 = dev.retrieve_session("multi-test-files-2").expect("files 2");
            assert_eq!(e1.session().file_count(), 0);
            assert_eq!(f2.session().file_count(), 2);
            restore_and_verify_memfd(&f1, 0x1001, "Data for session files 1");
            restore_and_verify_memfd(&f2, 0x2002, "First file for session files 2");
            restore_and_verify_memfd(&f2, 0x3003, "Second file for session files 2");
            for s in [&e1, &e2, &f1, &f2] {
                s.finish().expect("finish (0 for empty sessions)");
            }
            // A finished session stays retrieved until closed.
            assert_eq!(errno(dev.retrieve_session("multi-test-files-1")), EINVAL);
            drop((e1, e2, f1, f2));
            assert_eq!(errno(dev.retrieve_session("multi-test-files-1")), ENOENT);
        },
    );
}

/// `luo_stress_files`: 500 page-sized memfds (8 file blocks) in one session.
#[test]
fn luo_stress_files() {
    const N: u64 = 500;
    assert!(raise_nofile(4 * N + 64), "RLIMIT_NOFILE");
    luo_test(
        "kexec_many_files_state",
        9999,
        |dev| {
            let s = dev.create_session("many_files_session").unwrap();
            for i in 0..N {
                create_and_preserve_memfd(&s, i, &format!("file-data-{i}"));
            }
            vec![s]
        },
        |_, dev| {
            let s = dev
                .retrieve_session("many_files_session")
                .expect("retrieve");
            assert_eq!(s.session().file_count(), N as usize);
            for i in 0..N {
                restore_and_verify_memfd(&s, i, &format!("file-data-{i}"));
            }
            s.finish().expect("finish");
            assert_eq!(s.session().file_count(), 0);
        },
    );
}

/// `luo_stress_sessions`: 2000 empty sessions, 2001 with the state session (40 blocks).
#[test]
fn luo_stress_sessions() {
    const N: usize = 2000;
    if !raise_nofile(2 * N as u64 + 64) {
        eprintln!("SKIP: cannot raise RLIMIT_NOFILE");
        return;
    }
    luo_test(
        "kexec_many_state",
        999,
        |dev| {
            (0..N)
                .map(|i| {
                    dev.create_session(&format!("many-test-{i}"))
                        .unwrap_or_else(|e| panic!("session {i}: {e}"))
                })
                .collect()
        },
        |lu, dev| {
            assert_eq!(lu.luo().incoming_count(), N + 1);
            for i in 0..N {
                let s = dev
                    .retrieve_session(&format!("many-test-{i}"))
                    .unwrap_or_else(|e| panic!("retrieve {i}: {e}"));
                s.finish().expect("finish");
                drop(s);
            }
            assert_eq!(lu.luo().incoming_count(), 1, "only the state session left");
        },
    );
}

/// The handover the stress-sessions stage 1 writes: 2001 sessions in 40 blocks, in creation
/// order, the state session first.
#[test]
fn luo_stress_sessions_handover_layout() {
    const N: usize = 2000;
    assert!(raise_nofile(2 * N as u64 + 64), "RLIMIT_NOFILE");
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let state = create_state_file(&dev, "kexec_many_state", 999, 2);
    let held: Vec<_> = (0..N)
        .map(|i| dev.create_session(&format!("many-test-{i}")).unwrap())
        .collect();
    drop(dev);
    lu.luo().reboot().expect("reboot");
    let bytes = lu.memory().to_bytes();
    let blocks = luo_tests::chain(&bytes, luo_tests::sessions_pa(&bytes));
    assert_eq!(blocks.len(), 40);
    let counts: Vec<u64> = blocks
        .iter()
        .map(|&b| luo_tests::u64_at(&bytes, b + 8))
        .collect();
    assert!(counts[..39].iter().all(|&c| c == 51));
    assert_eq!(counts[39], 2001 - 39 * 51);
    let names: Vec<String> = luo_tests::sessions(&bytes)
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names[0], "kexec_many_state");
    for (i, n) in names[1..].iter().enumerate() {
        assert_eq!(n, &format!("many-test-{i}"));
    }
    drop(held);
    drop(state);
}
