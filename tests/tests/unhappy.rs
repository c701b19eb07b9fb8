//! Unhappy and edge paths of the session and file lifecycle (spec §3, §4, §13): close
//! semantics in both directions, sticky retrieve failures, shared retrieved files, carrying a
//! file forward, allocation failures without leaks, the serialized state, and the B1, B6, B7,
//! B8 and B10 fixes.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use backend_user::{sys, FlbRef, HandlerRef, LiveUpdate};
use luo_core::errno::{EBADF, EBUSY, EEXIST, EINVAL, EIO, ENOENT, ENOMEM, ESHUTDOWN};
use luo_core::{Errno, Error};
use luo_handlers::testing::{Event, Journal, Op, Store, TestFlb, TestHandler};
use luo_handlers::MemfdHandler;
use luo_tests::*;

const H: &str = "test-h";

fn setup() -> (LiveUpdate, Arc<TestHandler>, Journal, Store) {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let h = TestHandler::new(H, &j, &store);
    lu.register_handler(h.clone()).unwrap();
    (lu, h, j, store)
}

/// Reboots an image whose handler is the test handler into a new one (the handler is
/// re-registered under the same name and store).
fn reboot_test(lu: LiveUpdate, j: &Journal, store: &Store) -> (LiveUpdate, Arc<TestHandler>) {
    let fd = kexec(lu);
    j.take();
    let lu = LiveUpdate::boot(&fd).unwrap();
    let h = TestHandler::new(H, j, store);
    lu.register_handler(h.clone()).unwrap();
    (lu, h)
}

fn data_of(ev: &[Event]) -> Vec<u64> {
    ev.iter()
        .filter_map(|e| match e {
            Event::Preserve(_, d) => Some(*d),
            _ => None,
        })
        .collect()
}

#[test]
fn outgoing_close_unpreserves_every_file_and_frees_its_pages() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let base = lu.memory().outgoing_pages();
    let s = dev.create_session("s").unwrap();
    let mut a = memfd_with(b"alpha");
    let b = memfd_with(b"beta");
    s.preserve_fd(a.as_fd(), 1).unwrap();
    s.preserve_fd(b.as_fd(), 2).unwrap();
    // Session block, file block, one handler page per memfd.
    assert_eq!(lu.memory().outgoing_pages(), base + 4);
    drop(s);
    assert_eq!(lu.memory().outgoing_pages(), base);
    assert_eq!(lu.luo().outgoing_count(), 0);
    // The user's fds are untouched, and the files are free to be preserved again.
    assert_eq!(read_all(&mut a), b"alpha");
    let s2 = dev.create_session("s").unwrap();
    s2.preserve_fd(a.as_fd(), 1).unwrap();
    s2.preserve_fd(b.as_fd(), 2).unwrap();
    // A memfd stays writable and resizable after unpreserve.
    drop(s2);
    a.write_all(b" and more").unwrap();
    a.set_len(100).unwrap();
}

#[test]
fn incoming_close_is_an_implicit_finish_with_status_0_for_unretrieved_files() {
    let (lu, _h, j, store) = setup();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    for t in 1..=3 {
        s.preserve_fd(memfd_with(b"x").as_fd(), t).unwrap();
    }
    let d = data_of(&j.take());
    drop(dev);
    let (lu, _h) = reboot_test(lu, &j, &store);
    drop(s);
    let dev = lu.open().unwrap();
    let s = dev.retrieve_session("s").unwrap();
    drop(s.retrieve_fd(2).unwrap());
    j.take();
    assert_eq!(lu.luo().incoming_count(), 1);
    drop(s);
    let finishes: Vec<Event> = j
        .take()
        .into_iter()
        .filter(|e| matches!(e, Event::Finish(..)))
        .collect();
    assert_eq!(
        finishes,
        vec![
            Event::Finish(H.into(), d[2], 0),
            Event::Finish(H.into(), d[1], 1),
            Event::Finish(H.into(), d[0], 0),
        ]
    );
    assert_eq!(store.len(), 0, "every preserved object released");
    assert_eq!(lu.luo().incoming_count(), 0);
    assert_eq!(errno(dev.retrieve_session("s")), ENOENT);
}

#[test]
fn incoming_close_releases_unretrieved_memfds() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    s.preserve_fd(memfd_with(b"dropped").as_fd(), 1).unwrap();
    drop(dev);
    lu.luo().reboot().unwrap();
    let bytes = lu.memory().to_bytes();
    let fd = kexec(lu);
    drop(s);
    let ser = files(&bytes, sessions(&bytes)[0].files)[0].data;
    let inherited = u64_at(&bytes, ser + 48) as i32;
    let ino = u64_at(&bytes, ser + 64);
    assert!(sys::fd_is_open(inherited));
    let lu = boot_memfd(&fd);
    let released = lu.memory().released_incoming();
    let dev = lu.open().unwrap();
    drop(dev.retrieve_session("s").unwrap());
    // memfd's finish for a never-retrieved file frees it: the inherited fd is closed (its
    // number may since name another file) and its handover page released.
    let still_there = sys::fget(inherited)
        .ok()
        .and_then(|f| sys::fstat(f.as_fd()).ok())
        .is_some_and(|st| st.st_ino == ino);
    assert!(!still_there, "the inherited memfd was closed");
    assert_eq!(lu.memory().released_incoming(), released + 1);
}

#[test]
fn failed_retrieve_is_sticky_and_finish_sees_its_errno() {
    let (lu, _h, j, store) = setup();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    s.preserve_fd(memfd_with(b"x").as_fd(), 1).unwrap();
    let d = data_of(&j.take())[0];
    drop(dev);
    let (lu, h) = reboot_test(lu, &j, &store);
    drop(s);
    let dev = lu.open().unwrap();
    let s = dev.retrieve_session("s").unwrap();
    h.fail(Op::Retrieve, Some(d), EIO);
    assert_eq!(errno(s.retrieve_fd(1)), EIO);
    h.heal(Op::Retrieve);
    for _ in 0..3 {
        assert_eq!(errno(s.retrieve_fd(1)), EIO);
    }
    assert_eq!(j.take(), vec![Event::Retrieve(H.into(), d)], "called once");
    s.finish().unwrap();
    assert_eq!(
        j.take(),
        vec![
            Event::CanFinish(H.into(), d, false),
            Event::Finish(H.into(), d, -EIO.get())
        ]
    );
}

#[test]
fn retrieving_a_token_twice_returns_the_same_file_with_a_shared_offset() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    s.preserve_fd(memfd_with(b"0123456789").as_fd(), 7).unwrap();
    drop(dev);
    let fd = kexec(lu);
    drop(s);
    let lu = boot_memfd(&fd);
    let dev = lu.open().unwrap();
    let s = dev.retrieve_session("s").unwrap();
    let mut f1 = std::fs::File::from(s.retrieve_fd(7).unwrap());
    let mut f2 = std::fs::File::from(s.retrieve_fd(7).unwrap());
    assert_ne!(f1.as_raw_fd(), f2.as_raw_fd());
    assert_eq!(identity(f1.as_fd()), identity(f2.as_fd()));
    // The preserved position (end of the data) came back, and it is shared.
    assert_eq!(f1.stream_position().unwrap(), 10);
    f1.seek(SeekFrom::Start(3)).unwrap();
    assert_eq!(f2.stream_position().unwrap(), 3);
    let mut buf = [0u8; 2];
    f2.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"34");
    assert_eq!(f1.stream_position().unwrap(), 5);
    // Retrieved fds are close-on-exec.
    assert!(sys::get_cloexec(f1.as_fd()).unwrap());
    assert!(sys::get_cloexec(f2.as_fd()).unwrap());
}

#[test]
fn a_retrieved_file_is_carried_forward_after_finish() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("gen1").unwrap();
    s.preserve_fd(memfd_with(b"payload").as_fd(), 1).unwrap();
    drop(dev);
    let fd = kexec(lu);
    drop(s);

    let lu = boot_memfd(&fd);
    let dev = lu.open().unwrap();
    let old = dev.retrieve_session("gen1").unwrap();
    let mut f = std::fs::File::from(old.retrieve_fd(1).unwrap());
    f.write_all(b"+gen2").unwrap();
    let new = dev.create_session("gen2").unwrap();
    assert_eq!(
        errno(new.preserve_fd(f.as_fd(), 1)),
        EBUSY,
        "retrieved, not finished"
    );
    old.finish().unwrap();
    new.preserve_fd(f.as_fd(), 1).expect("after FINISH");
    drop(f);
    drop(old);
    drop(dev);
    let fd = kexec(lu);
    drop(new);

    let lu = boot_memfd(&fd);
    let dev = lu.open().unwrap();
    assert_eq!(errno(dev.retrieve_session("gen1")), ENOENT);
    let s = dev.retrieve_session("gen2").unwrap();
    let mut f = std::fs::File::from(s.retrieve_fd(1).unwrap());
    assert_eq!(read_all(&mut f), b"payload+gen2");
    s.finish().unwrap();
}

#[test]
fn allocation_failure_during_create_leaves_nothing_behind() {
    let (lu, _h, _j, _store) = setup();
    let dev = lu.open().unwrap();
    let base = lu.memory().outgoing_pages();
    let mut held = Vec::new();
    for i in 0..103 {
        let name = format!("s{i}");
        // Sessions 0, 51 and 102 need a new block; make every create try a failure first.
        lu.memory().fail_alloc_after(Some(0));
        let r = dev.create_session(&name);
        lu.memory().fail_alloc_after(None);
        if i % 51 == 0 {
            assert_eq!(errno(r), ENOMEM, "session {i} needs a page");
            assert_eq!(lu.luo().outgoing_count(), i);
            assert_eq!(lu.memory().outgoing_pages(), base + i / 51);
            held.push(dev.create_session(&name).unwrap());
        } else {
            held.push(r.unwrap());
        }
    }
    assert_eq!(lu.memory().outgoing_pages(), base + 3);
    held.clear();
    assert_eq!(lu.memory().outgoing_pages(), base);
}

#[test]
fn allocation_failure_during_preserve_leaves_nothing_behind() {
    let j = Journal::new();
    let lu = LiveUpdate::new().unwrap();
    let h: HandlerRef = MemfdHandler::new(lu.memory().clone());
    lu.register_handler(h.clone()).unwrap();
    let flb: FlbRef = TestFlb::new("flb", 0, &j);
    lu.register_flb(&h, flb).unwrap();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    let base = lu.memory().outgoing_pages();
    let m = memfd_with(b"m");
    // The first file needs a file block and the handler's page.
    let mut failures = 0;
    for n in 0.. {
        lu.memory().fail_alloc_after(Some(n));
        let r = s.preserve_fd(m.as_fd(), 1);
        lu.memory().fail_alloc_after(None);
        match r {
            Err(e) => {
                assert_eq!(e.errno(), ENOMEM);
                failures += 1;
                assert_eq!(lu.memory().outgoing_pages(), base, "after {n} allocations");
                assert_eq!(s.session().file_count(), 0);
                // FLB preserved and put back, or never reached.
                let ev = j.take();
                assert!(
                    ev.is_empty()
                        || ev
                            == vec![
                                Event::FlbPreserve("flb".into()),
                                Event::FlbUnpreserve("flb".into())
                            ],
                    "{ev:?}"
                );
            }
            Ok(()) => break,
        }
    }
    assert_eq!(failures, 2, "file block, then the handler's page");
    assert_eq!(lu.memory().outgoing_pages(), base + 2);
    assert_eq!(j.take(), vec![Event::FlbPreserve("flb".into())]);
    // The 64th file needs a second file block.
    let mut more = Vec::new();
    for t in 2..=63 {
        let f = memfd_with(b"");
        s.preserve_fd(f.as_fd(), t).unwrap();
        more.push(f);
    }
    let pages = lu.memory().outgoing_pages();
    lu.memory().fail_alloc_after(Some(0));
    let last = memfd_with(b"");
    assert_eq!(errno(s.preserve_fd(last.as_fd(), 64)), ENOMEM);
    lu.memory().fail_alloc_after(None);
    assert_eq!(lu.memory().outgoing_pages(), pages);
    s.preserve_fd(last.as_fd(), 64).unwrap();
    assert_eq!(lu.memory().outgoing_pages(), pages + 2);
    drop(s);
    assert_eq!(lu.memory().outgoing_pages(), base - 1, "session block too");
}

#[test]
fn after_reboot_everything_is_eshutdown_and_nothing_is_undone() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    let m = memfd_with(b"kept");
    s.preserve_fd(m.as_fd(), 1).unwrap();
    let fd = lu.reboot().unwrap();
    drop(fd);
    let bytes = lu.memory().to_bytes();
    assert_eq!(errno(dev.create_session("t")), ESHUTDOWN);
    assert_eq!(errno(s.preserve_fd(memfd_with(b"").as_fd(), 2)), ESHUTDOWN);
    assert_eq!(errno(s.get_name()), ESHUTDOWN);
    // Closing the session after the reboot does not unpreserve: the handover is unchanged.
    drop(s);
    drop(dev);
    assert_eq!(lu.memory().to_bytes(), bytes);
    let fd = kexec(lu);
    let lu2 = boot_memfd(&fd);
    let dev2 = lu2.open().unwrap();
    let s2 = dev2.retrieve_session("s").unwrap();
    let mut f = std::fs::File::from(s2.retrieve_fd(1).unwrap());
    assert_eq!(read_all(&mut f), b"kept");
}

#[test]
fn retrieve_session_reply_fault_puts_the_session_back_unretrieved() {
    // B6 fixed.
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("b6").unwrap();
    s.preserve_fd(memfd_with(b"not discarded").as_fd(), 1)
        .unwrap();
    drop(dev);
    let fd = kexec(lu);
    drop(s);
    let lu = boot_memfd(&fd);
    let dev = lu.open().unwrap();
    let released = lu.memory().released_incoming();
    for _ in 0..3 {
        let mut fds = TestFds::default();
        let mut arg = ReplyFault {
            buf: session_req(b"b6", 72, 72),
            fault_writes: true,
        };
        let r = lu.luo().device_ioctl(RETRIEVE, &mut arg, &mut fds);
        assert_eq!(r.err().map(Error::errno), Some(luo_core::errno::EFAULT));
        assert!(fds.sessions.is_empty());
        assert_eq!(fds.unreserved.get(), 1, "the fd number is given back");
    }
    assert_eq!(
        lu.memory().released_incoming(),
        released,
        "nothing finished"
    );
    let s = dev.retrieve_session("b6").unwrap();
    let mut f = std::fs::File::from(s.retrieve_fd(1).unwrap());
    assert_eq!(read_all(&mut f), b"not discarded");
}

#[test]
fn close_with_refused_finish_puts_the_session_back() {
    // B7 fixed: upstream leaks the session forever (retrieve gives EINVAL).
    let (lu, _h, j, store) = setup();
    let dev = lu.open().unwrap();
    let s = dev.create_session("b7").unwrap();
    s.preserve_fd(memfd_with(b"1").as_fd(), 1).unwrap();
    s.preserve_fd(memfd_with(b"2").as_fd(), 2).unwrap();
    let d = data_of(&j.take());
    drop(dev);
    let (lu, h) = reboot_test(lu, &j, &store);
    drop(s);
    let dev = lu.open().unwrap();
    let s = dev.retrieve_session("b7").unwrap();
    drop(s.retrieve_fd(1).unwrap());
    h.fail(Op::CanFinish, Some(d[1]), EBUSY);
    j.take();
    drop(s);
    assert!(!j.take().iter().any(|e| matches!(e, Event::Finish(..))));
    assert!(logged(
        lu.memory(),
        "Unable to finish session [b7] on release"
    ));
    assert_eq!(lu.luo().incoming_count(), 1);
    // Retrievable again, with its files in the state they were left in.
    let s = dev.retrieve_session("b7").unwrap();
    assert_eq!(s.session().file_count(), 2);
    drop(s.retrieve_fd(1).unwrap());
    assert!(
        !j.take().iter().any(|e| matches!(e, Event::Retrieve(..))),
        "token 1 stayed retrieved"
    );
    h.heal(Op::CanFinish);
    s.finish().unwrap();
    assert_eq!(
        j.take()
            .into_iter()
            .filter(|e| matches!(e, Event::Finish(..)))
            .collect::<Vec<_>>(),
        vec![
            Event::Finish(H.into(), d[1], 0),
            Event::Finish(H.into(), d[0], 1)
        ]
    );
    drop(s);
    assert_eq!(lu.luo().incoming_count(), 0);
}

#[test]
fn handler_errno_zero_or_negative_becomes_einval() {
    // B8: a handler cannot report success through an error.
    assert_eq!(Errno::new(0), EINVAL);
    assert_eq!(Errno::new(-5), EINVAL);
    assert_eq!(Errno::new(5), EIO);
    assert_eq!(Errno::from_kernel_ret(-12), Some(ENOMEM));
    assert_eq!(Errno::from_kernel_ret(i32::MIN), Some(EINVAL));
    assert_eq!(Errno::from_kernel_ret(0), None);
    assert_eq!(Errno::from_kernel_ret(1), None);
    let (lu, h, _j, store) = setup();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    h.fail(Op::Preserve, None, Errno::new(0));
    assert_eq!(errno(s.preserve_fd(memfd_with(b"").as_fd(), 1)), EINVAL);
    h.fail(Op::Preserve, None, Errno::new(-17));
    assert_eq!(errno(s.preserve_fd(memfd_with(b"").as_fd(), 1)), EINVAL);
    assert_eq!(s.session().file_count(), 0);
    assert_eq!(store.len(), 0);
}

#[test]
fn unregistering_a_handler_with_live_files_is_refused() {
    // B10 fixed.
    let (lu, h, j, store) = setup();
    let hr: HandlerRef = h.clone();
    let flb: FlbRef = TestFlb::new("flb", 0, &j);
    lu.register_flb(&hr, flb.clone()).unwrap();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    s.preserve_fd(memfd_with(b"").as_fd(), 1).unwrap();
    assert_eq!(errno(lu.luo().unregister_handler(&hr)), EBUSY);
    assert_eq!(errno(lu.luo().unregister_flb(&hr, &flb)), EBUSY);
    assert!(logged(
        lu.memory(),
        "not unregistering handler with live files"
    ));
    // The handler is still there and still works.
    let s2 = dev.create_session("s2").unwrap();
    s2.preserve_fd(memfd_with(b"").as_fd(), 1).unwrap();
    drop(dev);
    let (lu, h2) = reboot_test(lu, &j, &store);
    drop((s, s2));
    let hr2: HandlerRef = h2;
    let dev = lu.open().unwrap();
    // Incoming files not finished yet are live too.
    assert_eq!(errno(lu.luo().unregister_handler(&hr2)), EBUSY);
    let a = dev.retrieve_session("s").unwrap();
    a.finish().unwrap();
    assert_eq!(errno(lu.luo().unregister_handler(&hr2)), EBUSY);
    drop(dev.retrieve_session("s2").unwrap());
    lu.luo()
        .unregister_handler(&hr2)
        .expect("no live files left");
    // Gone: its files are no longer accepted, and it can register again.
    let out = dev.create_session("after").unwrap();
    assert_eq!(errno(out.preserve_fd(memfd_with(b"").as_fd(), 1)), ENOENT);
    lu.register_handler(hr2).unwrap();
    out.preserve_fd(memfd_with(b"").as_fd(), 1).unwrap();
    drop(a);
}

#[test]
fn duplicate_create_at_a_multiple_of_51_sessions_leaves_no_empty_block() {
    // B1 fixed: the next boot must succeed.
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let mut held: Vec<_> = (0..51)
        .map(|i| dev.create_session(&format!("s{i}")).unwrap())
        .collect();
    let pages = lu.memory().outgoing_pages();
    assert_eq!(errno(dev.create_session("s7")), EEXIST);
    assert_eq!(
        lu.memory().outgoing_pages(),
        pages,
        "no block for a refused name"
    );
    for i in 51..102 {
        held.push(dev.create_session(&format!("s{i}")).unwrap());
    }
    assert_eq!(errno(dev.create_session("s0")), EEXIST);
    drop(dev);
    lu.luo().reboot().unwrap();
    let bytes = lu.memory().to_bytes();
    let blocks = chain(&bytes, sessions_pa(&bytes));
    assert_eq!(blocks.len(), 2);
    assert!(blocks.iter().all(|&b| u64_at(&bytes, b + 8) == 51));
    let fd = kexec(lu);
    drop(held);
    let lu2 = boot_memfd(&fd);
    let dev2 = lu2.open().expect("the next boot accepts the handover");
    assert_eq!(lu2.luo().incoming_count(), 102);
    drop(dev2.retrieve_session("s101").unwrap());
}

#[test]
fn missing_handler_at_first_open_gives_eio_and_consumes_nothing() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    s.preserve_fd(memfd_with(b"late").as_fd(), 1).unwrap();
    let e = dev.create_session("empty").unwrap();
    drop(dev);
    let fd = kexec(lu);
    drop((s, e));
    let lu = LiveUpdate::boot(&fd).unwrap();
    assert_eq!(errno(lu.open()), EIO);
    assert_eq!(errno(lu.open()), EIO, "still missing");
    assert!(logged(lu.memory(), "no registered handler"));
    assert_eq!(lu.luo().incoming_count(), 0);
    lu.register_handler(MemfdHandler::new(lu.memory().clone()))
        .unwrap();
    let dev = lu.open().expect("handler registered now");
    assert_eq!(lu.luo().incoming_count(), 2);
    let s = dev.retrieve_session("s").unwrap();
    let mut f = std::fs::File::from(s.retrieve_fd(1).unwrap());
    assert_eq!(read_all(&mut f), b"late");
}

#[test]
fn unretrieved_incoming_sessions_are_not_handed_over_again() {
    let (lu, _h, j, store) = setup();
    let dev = lu.open().unwrap();
    let a = dev.create_session("ignored").unwrap();
    a.preserve_fd(memfd_with(b"").as_fd(), 1).unwrap();
    drop(dev);
    let (lu, _h) = reboot_test(lu, &j, &store);
    drop(a);
    let dev = lu.open().unwrap();
    // An outgoing session may reuse an incoming name.
    let b = dev.create_session("ignored").unwrap();
    b.preserve_fd(memfd_with(b"").as_fd(), 2).unwrap();
    drop(dev);
    assert!(
        !j.take().iter().any(|e| matches!(e, Event::Finish(..))),
        "never retrieved: never finished"
    );
    lu.luo().reboot().unwrap();
    let bytes = lu.memory().to_bytes();
    let ss = sessions(&bytes);
    assert_eq!(ss.len(), 1);
    assert_eq!(files(&bytes, ss[0].files)[0].token, 2, "the outgoing one");
}

#[test]
fn a_released_session_takes_no_more_operations() {
    let (lu, _h, j, _store) = setup();
    let mut fds = TestFds::default();
    let mut arg = ReplyFault {
        buf: session_req(b"r", 72, 72),
        fault_writes: false,
    };
    lu.luo().device_ioctl(CREATE, &mut arg, &mut fds).unwrap();
    let (_slot, s) = fds.sessions.pop().unwrap();
    let m = memfd_with(b"");
    let luo = lu.luo();
    luo.begin()
        .and_then(|l| l.preserve_fd(&s, 1, || sys::fget(m.as_raw_fd()).map_err(|_| Error::BadFd)))
        .unwrap();
    luo.begin().and_then(|l| l.release_session(&s)).unwrap();
    assert_eq!(j.take().len(), 2, "preserve and unpreserve");
    assert_eq!(
        errno(luo.begin().and_then(|l| l.release_session(&s))),
        EBADF
    );
    let r = luo.begin().and_then(|l| {
        l.preserve_fd(&s, 2, || -> luo_core::Result<OwnedFd> {
            sys::fget(m.as_raw_fd()).map_err(|_| Error::BadFd)
        })
    });
    assert_eq!(errno(r), EBADF);
    assert!(j.take().is_empty());
    assert_eq!(lu.luo().outgoing_count(), 0);
}

#[test]
fn memfd_unfreeze_restores_close_on_exec_after_a_failed_reboot() {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    // The test handler is probed first but takes only `other`; every other memfd goes to the
    // memfd handler.
    let failing = TestHandler::new(H, &j, &store);
    let other = memfd_with(b"other");
    failing.accept_only(&[identity(other.as_fd())]);
    lu.register_handler(failing.clone()).unwrap();
    let memfd_h: HandlerRef = MemfdHandler::new(lu.memory().clone());
    lu.register_handler(memfd_h).unwrap();
    let dev = lu.open().unwrap();
    let first = dev.create_session("memfd").unwrap();
    first.preserve_fd(memfd_with(b"m").as_fd(), 1).unwrap();
    let second = dev.create_session("failing").unwrap();
    second.preserve_fd(other.as_fd(), 1).unwrap();
    failing.fail(Op::Freeze, None, EIO);
    assert_eq!(errno(lu.luo().reboot()), EIO);
    // Find the memfd handler's page: the one whose fd field names an open memfd.
    let mut kept = None;
    for at in (4096u64..).step_by(4096).take(64) {
        let mut w = [0u8; 8];
        if lu.memory().read_outgoing(at + 48, &mut w).is_ok() {
            let fd = i64::from_ne_bytes(w);
            if fd > 2 && fd < i64::from(i32::MAX) && sys::fd_is_open(fd as i32) {
                let mut ino = [0u8; 8];
                lu.memory().read_outgoing(at + 64, &mut ino).unwrap();
                let same = sys::fget(fd as i32)
                    .ok()
                    .and_then(|f| sys::fstat(f.as_fd()).ok())
                    .is_some_and(|st| st.st_ino == u64::from_ne_bytes(ino));
                if same {
                    kept = Some(fd as i32);
                }
            }
        }
    }
    let kept = kept.expect("the memfd was frozen before the failure");
    // SAFETY: the fd is open (checked above) and only borrowed for the duration of the call.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(kept) };
    assert!(
        sys::get_cloexec(borrowed).unwrap(),
        "unfreeze made LUO's reference close-on-exec again"
    );
    failing.heal(Op::Freeze);
    lu.luo().reboot().unwrap();
    assert!(
        !sys::get_cloexec(borrowed).unwrap(),
        "frozen: survives exec"
    );
    std::mem::forget((first, second));
}

#[test]
fn memfd_size_position_and_seals_survive_a_reboot() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    let fd = sys::memfd_create(c"sealed", libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC).unwrap();
    let mut f = std::fs::File::from(fd);
    f.write_all(&[7u8; 5000]).unwrap();
    f.seek(SeekFrom::Start(1234)).unwrap();
    let seals = (libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_WRITE) as u32;
    sys::add_seals(f.as_fd(), seals).unwrap();
    s.preserve_fd(f.as_fd(), u64::MAX).unwrap();
    let e = memfd_with(b"");
    s.preserve_fd(e.as_fd(), 0).unwrap();
    drop(dev);
    let handover = kexec(lu);
    drop((s, f, e));
    let lu = boot_memfd(&handover);
    let dev = lu.open().unwrap();
    let s = dev.retrieve_session("s").unwrap();
    let mut g = std::fs::File::from(s.retrieve_fd(u64::MAX).unwrap());
    assert_eq!(g.stream_position().unwrap(), 1234);
    assert_eq!(g.metadata().unwrap().len(), 5000);
    assert_eq!(sys::get_seals(g.as_fd()).unwrap() & seals, seals);
    assert!(g.write_all(b"x").is_err(), "F_SEAL_WRITE kept");
    assert_eq!(read_all(&mut g), vec![7u8; 5000]);
    let mut empty = std::fs::File::from(s.retrieve_fd(0).unwrap());
    assert!(read_all(&mut empty).is_empty());
}

#[test]
fn memfd_handler_accepts_only_unlinked_tmpfs_files() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    if !std::path::Path::new("/dev/shm").is_dir() {
        eprintln!("SKIP: no /dev/shm");
        return;
    }
    // A linked tmpfs file: refused.
    let path = std::path::PathBuf::from(format!("/dev/shm/luo-test-{}", std::process::id()));
    let linked = std::fs::File::create(&path).unwrap();
    assert_eq!(errno(s.preserve_fd(linked.as_fd(), 1)), ENOENT);
    // Once unlinked (deleted but open): accepted.
    std::fs::remove_file(&path).unwrap();
    s.preserve_fd(linked.as_fd(), 1).unwrap();
    // O_TMPFILE on tmpfs: accepted.
    // SAFETY: open(2) with a static path; the result is checked and owned below.
    let raw = unsafe {
        libc::open(
            c"/dev/shm".as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o600,
        )
    };
    if raw >= 0 {
        // SAFETY: fresh fd we own.
        let tmp = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        s.preserve_fd(tmp.as_fd(), 2).unwrap();
    }
}

#[test]
fn session_fds_are_close_on_exec() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    // SAFETY: the session keeps its fd open while `s` lives; borrowed only here.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(s.raw_fd()) };
    assert!(sys::get_cloexec(fd).unwrap());
}

#[test]
fn concurrent_creates_and_preserves_against_a_reboot_hand_over_exactly_what_succeeded() {
    // Each session holds 1 + 2 × 3 fds (session, LUO's and the store's file references).
    assert!(raise_nofile(4096));
    let (lu, _h, _j, _store) = setup();
    let dev = lu.open().unwrap();
    // Workers return their session fds instead of closing them: a worker that finishes before
    // the reboot would otherwise close (and so unpreserve) sessions it reports as done.
    type Done = (Vec<(String, Vec<u64>)>, Vec<backend_user::SessionFd>);
    let results: Vec<Done> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let dev = &dev;
                scope.spawn(move || {
                    let mut done = Vec::new();
                    let mut held = Vec::new();
                    for k in 0..100 {
                        let name = format!("t{t}-{k}");
                        let s = match dev.create_session(&name) {
                            Ok(s) => s,
                            Err(e) => {
                                assert_eq!(e.errno(), ESHUTDOWN, "{name}");
                                break;
                            }
                        };
                        let mut tokens = Vec::new();
                        for tok in 0..3 {
                            match s.preserve_fd(memfd_with(b"").as_fd(), tok) {
                                Ok(()) => tokens.push(tok),
                                Err(e) => assert_eq!(e.errno(), ESHUTDOWN),
                            }
                        }
                        done.push((name, tokens));
                        held.push(s);
                    }
                    (done, held)
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(30));
        lu.luo().reboot().expect("reboot");
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let (results, held): (Vec<_>, Vec<_>) = results.into_iter().unzip();
    // Closing after the reboot changes nothing.
    drop(held);
    let bytes = lu.memory().to_bytes();
    let mut handed: Vec<(String, Vec<u64>)> = sessions(&bytes)
        .into_iter()
        .map(|s| {
            let toks = files(&bytes, s.files)
                .into_iter()
                .map(|f| f.token)
                .collect();
            (s.name, toks)
        })
        .collect();
    let mut expected: Vec<(String, Vec<u64>)> = results.into_iter().flatten().collect();
    assert!(expected.len() >= 4, "every worker got some work done");
    handed.sort();
    expected.sort();
    assert_eq!(handed, expected);
}

#[test]
fn disabled_luo_refuses_registration_and_reboots_as_a_no_op() {
    use luo_core::errno::EOPNOTSUPP;
    let mem = Arc::new(backend_user::Memory::new());
    let luo =
        luo_core::Luo::new(backend_user::UserPlatform::new(mem.clone()), false).expect("boot");
    assert_eq!(errno(luo.start()), EOPNOTSUPP);
    assert!(!luo.enabled());
    let j = Journal::new();
    let store = Store::new();
    let h: HandlerRef = TestHandler::new(H, &j, &store);
    assert_eq!(errno(luo.register_handler(&h)), EOPNOTSUPP);
    let flb: FlbRef = TestFlb::new("flb", 0, &j);
    assert_eq!(errno(luo.register_flb(&h, &flb)), EOPNOTSUPP);
    assert_eq!(errno(luo.flb_get_incoming(&flb)), EOPNOTSUPP);
    assert_eq!(errno(luo.flb_get_outgoing(&flb)), EOPNOTSUPP);
    luo.unregister_handler(&h).expect("no-op");
    luo.unregister_flb(&h, &flb).expect("no-op");
    let create = luo
        .begin()
        .and_then(|l| l.create_session(&luo_core::create_name(&name_field(b"s"))?));
    assert_eq!(errno(create), EOPNOTSUPP);
    luo.reboot().expect("reboot with LUO off is a no-op");
    assert!(!luo.is_serialized());
    assert_eq!(mem.outgoing_pages(), 0, "no outgoing state at all");
}

#[test]
fn failed_outgoing_setup_leaves_no_pages_and_luo_off() {
    for n in 0..2 {
        let mem = Arc::new(backend_user::Memory::new());
        mem.fail_alloc_after(Some(n));
        assert_eq!(
            LiveUpdate::with_memory(mem.clone()).err().map(Error::errno),
            Some(ENOMEM),
            "allocation {n} fails"
        );
        assert_eq!(mem.outgoing_pages(), 0, "root and FLB page given back");
    }
}

#[test]
fn handler_registration_rules() {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let h: HandlerRef = TestHandler::new(H, &j, &store);
    lu.register_handler(h.clone()).unwrap();
    // The same handler twice, or another with the same compatible.
    assert_eq!(errno(lu.register_handler(h.clone())), EEXIST);
    assert_eq!(
        errno(lu.register_handler(TestHandler::new(H, &j, &store))),
        EEXIST
    );
    // Compatible strings must fit the 48-byte handover field with their NUL.
    let max = "c".repeat(47);
    lu.register_handler(TestHandler::new(&max, &j, &store))
        .expect("47 characters");
    assert_eq!(
        errno(lu.register_handler(TestHandler::new(&"c".repeat(48), &j, &store))),
        EINVAL
    );
    assert_eq!(
        errno(lu.register_handler(TestHandler::new("", &j, &store))),
        EINVAL
    );
    // An FLB compatible likewise.
    assert_eq!(
        errno(lu.register_flb(&h, TestFlb::new(&"f".repeat(48), 0, &j))),
        EINVAL
    );
    lu.register_flb(&h, TestFlb::new(&"f".repeat(47), 0, &j))
        .unwrap();
}

#[test]
fn a_finished_incoming_session_never_becomes_outgoing() {
    let (lu, _h, j, store) = setup();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    s.preserve_fd(memfd_with(b"").as_fd(), 1).unwrap();
    drop(dev);
    let (lu, _h) = reboot_test(lu, &j, &store);
    drop(s);
    let dev = lu.open().unwrap();
    let s = dev.retrieve_session("s").unwrap();
    s.finish().unwrap();
    assert_eq!(errno(s.preserve_fd(memfd_with(b"").as_fd(), 2)), EINVAL);
    assert_eq!(errno(s.retrieve_fd(1)), ENOENT);
    s.finish().expect("FINISH again: empty, 0");
    assert_eq!(s.get_name().unwrap(), "s");
    drop(dev);
    // Not handed over again.
    lu.luo().reboot().unwrap();
    assert_eq!(sessions_pa(&lu.memory().to_bytes()), 0);
    drop(s);
}

#[test]
fn retrieve_fd_short_of_fds_keeps_the_retrieved_file() {
    // The memfd handler's retrieve adopts an inherited fd and needs no new one; the reply needs
    // one fd (reserved first) and LUO's own reference another. With a single free fd, the
    // ioctl fails with EMFILE, but the retrieved file must not be lost: it stays retrieved.
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    s.preserve_fd(memfd_with(b"precious").as_fd(), 1).unwrap();
    drop(dev);
    let fd = kexec(lu);
    drop(s);
    let lu = boot_memfd(&fd);
    let dev = lu.open().unwrap();
    let s = dev.retrieve_session("s").unwrap();
    let status = in_child(|| {
        if !leave_one_fd() {
            return false;
        }
        let first = s.retrieve_fd(1);
        if !set_nofile(4096) {
            return false;
        }
        let failed_with_emfile = first
            .as_ref()
            .err()
            .is_some_and(|e| e.errno() == luo_core::errno::EMFILE);
        // Either it worked, or it failed for lack of fds; the file must be retrievable now.
        let ok = match s.retrieve_fd(1) {
            Ok(f) => read_all(&mut std::fs::File::from(f)) == b"precious",
            Err(_) => false,
        };
        (first.is_ok() || failed_with_emfile) && ok
    });
    assert_eq!(status, 0);
}
