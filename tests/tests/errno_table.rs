//! One test per row of the errno table (spec §2.6) that a process can reach, named after the
//! row. Raw ioctls take the uAPI struct bytes; bytes past the end of the slice fault.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use backend_user::{Device, FlbRef, HandlerRef, Installed, LiveUpdate, SessionFd};
use luo_core::errno::{
    E2BIG, EBADF, EBUSY, EEXIST, EFAULT, EFBIG, EINVAL, EIO, EMFILE, ENFILE, ENODEV, ENOENT,
    ENOMEM, ENOSPC, ENOTTY, EOPNOTSUPP, ESHUTDOWN,
};
use luo_core::{Errno, Error, FlbOps};
use luo_handlers::testing::{Event, Journal, Op, Store, TestFlb, TestHandler};
use luo_handlers::MemfdHandler;
use luo_tests::*;

/// A cold image with the recording test handler.
fn cold_test() -> (LiveUpdate, Arc<TestHandler>, Journal, Store) {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let h = TestHandler::new("test-h", &j, &store);
    lu.register_handler(h.clone()).unwrap();
    (lu, h, j, store)
}

/// An image booted after a reboot in which session "in" held memfds at `tokens` (test
/// handler) and session "other" was empty; "in" is retrieved.
struct Incoming {
    lu: LiveUpdate,
    dev: Device,
    s: SessionFd,
    h: Arc<TestHandler>,
    j: Journal,
}

fn incoming(tokens: &[u64]) -> Incoming {
    let (lu, _h, j, store) = cold_test();
    let dev = lu.open().unwrap();
    let s = dev.create_session("in").unwrap();
    let other = dev.create_session("other").unwrap();
    for &t in tokens {
        s.preserve_fd(memfd_with(&t.to_ne_bytes()).as_fd(), t)
            .unwrap();
    }
    drop(dev);
    let fd = kexec(lu);
    drop((s, other));
    j.take();
    let lu = LiveUpdate::boot(&fd).unwrap();
    let h = TestHandler::new("test-h", &j, &store);
    lu.register_handler(h.clone()).unwrap();
    let dev = lu.open().unwrap();
    let s = dev.retrieve_session("in").unwrap();
    Incoming { lu, dev, s, h, j }
}

fn session_of(i: Installed) -> SessionFd {
    match i {
        Installed::Session(s) => s,
        _ => panic!("no session installed"),
    }
}

#[test]
fn device_ioctl_nr_2_or_more_is_einval() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    for cmd in [0xBA02, 0xBA03, 0xBA40, 0xBA43, 0xBAFF] {
        let mut req = session_req(b"x", 72, 72);
        assert_eq!(errno(dev.ioctl(cmd, &mut req)), EINVAL, "{cmd:#x}");
        // The range check comes before reading `size`: no EFAULT for a bad pointer.
        assert_eq!(errno(dev.ioctl(cmd, &mut [])), EINVAL, "{cmd:#x}");
    }
    assert_eq!(lu.luo().outgoing_count(), 0);
}

#[test]
fn session_ioctl_nr_below_0x40_or_above_0x43_is_einval() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    for cmd in [0xBA00, 0xBA01, 0xBA3F, 0xBA44, 0xBAFF] {
        let mut req = get_name_req(0, 72, 72, 0);
        assert_eq!(errno(s.ioctl(cmd, &mut req)), EINVAL, "{cmd:#x}");
        assert_eq!(errno(s.ioctl(cmd, &mut [])), EINVAL, "{cmd:#x}");
    }
}

#[test]
fn arg_not_readable_for_4_bytes_is_efault() {
    let inc = incoming(&[1]);
    let out = inc.dev.create_session("out").unwrap();
    for len in 0..4 {
        let mut short = vec![0u8; len];
        assert_eq!(errno(inc.dev.ioctl(CREATE, &mut short)), EFAULT);
        assert_eq!(errno(inc.dev.ioctl(RETRIEVE, &mut short)), EFAULT);
        assert_eq!(errno(out.ioctl(PRESERVE, &mut short)), EFAULT);
        assert_eq!(errno(inc.s.ioctl(RETRIEVE_FD, &mut short)), EFAULT);
        assert_eq!(errno(inc.s.ioctl(FINISH, &mut short)), EFAULT);
        assert_eq!(errno(out.ioctl(GET_NAME, &mut short)), EFAULT);
    }
    assert_eq!(inc.s.session().file_count(), 1, "nothing finished");
}

#[test]
fn nr_in_range_but_cmd_word_differs_is_enotty() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    // Direction and size bits, or another type byte, with a valid nr.
    for cmd in [
        ioc(3, 0xBA, 0, 72),
        ioc(1, 0xBA, 0, 72),
        ioc(2, 0xBA, 1, 72),
        ioc(0, 0xBA, 0, 72),
        0xBB00,
        0x0001,
    ] {
        let mut req = session_req(b"x", 72, 72);
        assert_eq!(errno(dev.ioctl(cmd, &mut req)), ENOTTY, "{cmd:#x}");
    }
    let s = dev.create_session("s").unwrap();
    for cmd in [
        ioc(1, 0xBA, 0x40, 16),
        ioc(2, 0xBA, 0x41, 16),
        ioc(3, 0xBA, 0x42, 8),
        ioc(0, 0xBA, 0x43, 72),
        0xBB43,
    ] {
        let mut req = get_name_req(0, 72, 72, 0);
        assert_eq!(errno(s.ioctl(cmd, &mut req)), ENOTTY, "{cmd:#x}");
    }
    // `size` is read before the command word is compared (B11): a bad pointer gives EFAULT.
    assert_eq!(errno(dev.ioctl(ioc(3, 0xBA, 0, 72), &mut [])), EFAULT);
    assert_eq!(errno(s.ioctl(0xBB43, &mut [0u8; 2])), EFAULT);
    assert_eq!(lu.luo().outgoing_count(), 1);
}

#[test]
fn session_direction_mismatch_is_einval() {
    let inc = incoming(&[1]);
    let out = inc.dev.create_session("out").unwrap();
    let m = memfd_with(b"m");
    assert_eq!(errno(inc.s.preserve_fd(m.as_fd(), 9)), EINVAL);
    assert_eq!(errno(out.retrieve_fd(1)), EINVAL);
    assert_eq!(errno(out.finish()), EINVAL);
    // GET_NAME is valid on both.
    assert_eq!(inc.s.get_name().unwrap(), "in");
    assert_eq!(out.get_name().unwrap(), "out");
    // The command word is checked before the direction.
    let mut req = fd_req(m.as_raw_fd(), 9, 16, 16);
    assert_eq!(errno(inc.s.ioctl(ioc(1, 0xBA, 0x40, 16), &mut req)), ENOTTY);
    assert_eq!(inc.s.session().file_count(), 1);
    assert_eq!(out.session().file_count(), 0);
}

#[test]
fn size_below_struct_size_is_einval() {
    let inc = incoming(&[1]);
    let out = inc.dev.create_session("out").unwrap();
    let m = memfd_with(b"m");
    for size in [0u32, 4, 71] {
        let mut c = session_req(b"new", size, 72);
        assert_eq!(
            errno(inc.dev.ioctl(CREATE, &mut c)),
            EINVAL,
            "create {size}"
        );
        let mut r = session_req(b"other", size, 72);
        assert_eq!(errno(inc.dev.ioctl(RETRIEVE, &mut r)), EINVAL);
        let mut g = get_name_req(0, size, 72, 0);
        assert_eq!(errno(out.ioctl(GET_NAME, &mut g)), EINVAL);
    }
    for size in [0u32, 8, 15] {
        let mut p = fd_req(m.as_raw_fd(), 2, size, 16);
        assert_eq!(errno(out.ioctl(PRESERVE, &mut p)), EINVAL);
        let mut r = fd_req(-1, 1, size, 16);
        assert_eq!(errno(inc.s.ioctl(RETRIEVE_FD, &mut r)), EINVAL);
    }
    for size in [0u32, 7] {
        let mut f = finish_req(0, size, 8);
        assert_eq!(errno(inc.s.ioctl(FINISH, &mut f)), EINVAL);
    }
    assert_eq!(inc.lu.luo().outgoing_count(), 1);
    assert_eq!(out.session().file_count(), 0);
    assert_eq!(inc.s.session().file_count(), 1);
    assert!(inc.j.take().is_empty(), "no handler call");
}

#[test]
fn size_above_struct_size_with_nonzero_trailing_byte_is_e2big() {
    let inc = incoming(&[1]);
    let out = inc.dev.create_session("out").unwrap();
    let m = memfd_with(b"m");
    let mut c = session_req(b"new", 80, 80);
    c[79] = 1;
    assert_eq!(errno(inc.dev.ioctl(CREATE, &mut c)), E2BIG);
    let mut r = session_req(b"other", 73, 73);
    r[72] = 0xff;
    assert_eq!(errno(inc.dev.ioctl(RETRIEVE, &mut r)), E2BIG);
    let mut p = fd_req(m.as_raw_fd(), 2, 4096, 4096);
    p[4095] = 1;
    assert_eq!(errno(out.ioctl(PRESERVE, &mut p)), E2BIG);
    let mut rf = fd_req(-1, 1, 24, 24);
    rf[16] = 1;
    assert_eq!(errno(inc.s.ioctl(RETRIEVE_FD, &mut rf)), E2BIG);
    let mut f = finish_req(0, 9, 9);
    f[8] = 1;
    assert_eq!(errno(inc.s.ioctl(FINISH, &mut f)), E2BIG);
    let mut g = get_name_req(0, 100, 100, 0);
    g[99] = 1;
    assert_eq!(errno(out.ioctl(GET_NAME, &mut g)), E2BIG);
    assert_eq!(inc.lu.luo().outgoing_count(), 1);
    assert_eq!(out.session().file_count(), 0);
    assert_eq!(inc.s.session().file_count(), 1);
    assert!(inc.j.take().is_empty());
}

#[test]
fn size_above_struct_size_zero_padded_is_accepted() {
    let inc = incoming(&[1]);
    // CREATE with a 4096-byte struct: accepted; the reply echoes size and writes 72 bytes.
    let mut c = session_req(b"big", 4096, 4096);
    let s = session_of(inc.dev.ioctl(CREATE, &mut c).unwrap());
    assert_eq!(reply_size(&c), 4096);
    assert_eq!(reply_fd(&c), s.raw_fd());
    assert!(c[72..].iter().all(|&b| b == 0));
    let mut r = session_req(b"other", 200, 200);
    let other = session_of(inc.dev.ioctl(RETRIEVE, &mut r).unwrap());
    assert_eq!(other.get_name().unwrap(), "other");
    let m = memfd_with(b"m");
    let mut p = fd_req(m.as_raw_fd(), 5, 24, 24);
    s.ioctl(PRESERVE, &mut p).unwrap();
    assert_eq!(s.session().file_count(), 1);
    let mut rf = fd_req(-1, 1, 64, 64);
    let f = match inc.s.ioctl(RETRIEVE_FD, &mut rf).unwrap() {
        Installed::File(f) => f,
        _ => panic!("no file"),
    };
    assert_eq!(reply_fd(&rf), f.as_raw_fd());
    let mut g = get_name_req(0, 128, 128, 0);
    s.ioctl(GET_NAME, &mut g).unwrap();
    assert_eq!(c_string(&g[8..72]), "big");
    let mut fin = finish_req(0, 16, 16);
    inc.s.ioctl(FINISH, &mut fin).unwrap();
    assert_eq!(inc.s.session().file_count(), 0);
}

#[test]
fn fault_copying_in_or_checking_trailing_bytes_is_efault() {
    let inc = incoming(&[1]);
    let out = inc.dev.create_session("out").unwrap();
    // size says 72 but only 40 bytes are mapped.
    let mut c = session_req(b"x", 72, 40);
    assert_eq!(errno(inc.dev.ioctl(CREATE, &mut c)), EFAULT);
    // size says 100: the struct is readable, the trailing check runs off the end.
    let mut c = session_req(b"x", 100, 72);
    assert_eq!(errno(inc.dev.ioctl(CREATE, &mut c)), EFAULT);
    let mut p = fd_req(0, 1, 16, 12);
    assert_eq!(errno(out.ioctl(PRESERVE, &mut p)), EFAULT);
    let mut f = finish_req(0, 4096, 8);
    assert_eq!(errno(inc.s.ioctl(FINISH, &mut f)), EFAULT);
    assert_eq!(inc.lu.luo().outgoing_count(), 1);
    assert_eq!(inc.s.session().file_count(), 1);
}

#[test]
fn fd_table_full_is_emfile() {
    let inc = incoming(&[1]);
    // CREATE, RETRIEVE and RETRIEVE_FD need a new fd; the fd is reserved before anything else
    // is looked at, so even an invalid name or unknown token gives EMFILE (B18).
    let status = in_child(|| {
        if !fill_fd_table() {
            return false;
        }
        let checks = [
            errno(inc.dev.create_session("new")) == EMFILE,
            errno(inc.dev.create_session("")) == EMFILE,
            errno(inc.dev.retrieve_session("other")) == EMFILE,
            errno(inc.dev.retrieve_session("no-such")) == EMFILE,
            errno(inc.s.retrieve_fd(1)) == EMFILE,
            errno(inc.s.retrieve_fd(404)) == EMFILE,
            inc.lu.luo().outgoing_count() == 0,
        ];
        checks.iter().all(|&c| c)
    });
    assert_eq!(status, 0);
    // PRESERVE_FD: the userspace backend holds LUO's reference to the file as an fd (the
    // kernel's fget needs none), so a full table is reported as EMFILE, never as a bad fd.
    let out = inc.dev.create_session("full").unwrap();
    let m = memfd_with(b"m");
    let status = in_child(|| {
        fill_fd_table()
            && errno(out.preserve_fd(m.as_fd(), 1)) == EMFILE
            && out.session().file_count() == 0
    });
    assert_eq!(status, 0);
    out.preserve_fd(m.as_fd(), 1).unwrap();
    // The same calls succeed with room in the table (the child's limit did not leak here).
    let n = inc.dev.create_session("new").unwrap();
    drop(n);
    drop(inc.s.retrieve_fd(1).unwrap());
}

#[test]
fn create_name_first_byte_nul_is_einval() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    assert_eq!(errno(dev.create_session("")), EINVAL);
    // Bytes after the leading NUL do not make a name.
    let mut req = session_req(b"\0hidden", 72, 72);
    assert_eq!(errno(dev.ioctl(CREATE, &mut req)), EINVAL);
    assert_eq!(lu.luo().outgoing_count(), 0);
}

#[test]
fn create_name_without_nul_in_64_bytes_is_einval() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let mut req = session_req(&[b'n'; 64], 72, 72);
    assert_eq!(errno(dev.ioctl(CREATE, &mut req)), EINVAL);
    // With a NUL, bytes after it are ignored and echoed back unchanged.
    let mut name = [b'n'; 64];
    name[10] = 0;
    let mut req = session_req(&name, 72, 72);
    let s = session_of(dev.ioctl(CREATE, &mut req).unwrap());
    assert_eq!(s.get_name().unwrap(), "nnnnnnnnnn");
    assert_eq!(&req[8..72], &name);
}

#[test]
fn create_name_of_an_existing_outgoing_session_is_eexist() {
    let inc = incoming(&[1]);
    let _a = inc.dev.create_session("a").unwrap();
    assert_eq!(errno(inc.dev.create_session("a")), EEXIST);
    // Names are compared up to the NUL: trailing bytes after it do not make a new name.
    let mut req = session_req(b"a\0junk", 72, 72);
    assert_eq!(errno(inc.dev.ioctl(CREATE, &mut req)), EEXIST);
    // Incoming names do not count: an outgoing "in" and "other" may exist beside them.
    let _in = inc.dev.create_session("in").unwrap();
    let _other = inc.dev.create_session("other").unwrap();
    assert_eq!(inc.lu.luo().outgoing_count(), 3);
}

#[test]
fn create_out_of_memory_is_enomem() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let base = lu.memory().outgoing_pages();
    lu.memory().fail_alloc_after(Some(0));
    assert_eq!(errno(dev.create_session("first")), ENOMEM);
    lu.memory().fail_alloc_after(None);
    assert_eq!(lu.memory().outgoing_pages(), base);
    assert_eq!(lu.luo().outgoing_count(), 0);
    let mut held: Vec<_> = (0..51)
        .map(|i| dev.create_session(&format!("s{i}")).unwrap())
        .collect();
    // The 52nd session needs a second block.
    let pages = lu.memory().outgoing_pages();
    lu.memory().fail_alloc_after(Some(0));
    assert_eq!(errno(dev.create_session("s51")), ENOMEM);
    assert_eq!(lu.memory().outgoing_pages(), pages);
    lu.memory().fail_alloc_after(None);
    held.push(dev.create_session("s51").expect("name still free"));
    assert_eq!(lu.memory().outgoing_pages(), pages + 1);
}

#[test]
fn create_past_10000_blocks_is_enospc() {
    // 510000 sessions fill 10000 blocks. Session fds would need 510000 fds, so this drives the
    // core's CREATE step directly (the fd reservation is the dispatcher's, tested above).
    let lu = cold_memfd();
    let base = lu.memory().outgoing_pages();
    let luo = lu.luo();
    let create = |name: &[u8]| {
        luo.begin()
            .and_then(|l| l.create_session(&luo_core::create_name(&name_field(name))?))
    };
    for i in 0..510_000u32 {
        create(format!("s{i}").as_bytes()).unwrap_or_else(|e| panic!("session {i}: {e}"));
    }
    assert_eq!(lu.memory().outgoing_pages() - base, 10_000);
    assert_eq!(
        create(b"one-too-many").err().map(Error::errno),
        Some(ENOSPC)
    );
    assert_eq!(lu.memory().outgoing_pages() - base, 10_000);
    assert_eq!(luo.outgoing_count(), 510_000);
    // Through the device the same condition is reported before the name is recorded.
    let dev = lu.open().unwrap();
    assert_eq!(errno(dev.create_session("via-device")), ENOSPC);
}

#[test]
fn create_or_retrieve_anon_file_creation_failure_is_its_errno() {
    let (lu, _h, _j, _store) = cold_test();
    for e in [Error::FileTableFull, Error::NoMemory] {
        let mut fds = TestFds {
            fail_session_file: Some(e),
            ..TestFds::default()
        };
        let mut arg = ReplyFault {
            buf: session_req(b"anon", 72, 72),
            fault_writes: false,
        };
        let r = lu.luo().device_ioctl(CREATE, &mut arg, &mut fds);
        assert_eq!(r.err().map(Error::errno), Some(e.errno()));
        assert_eq!(lu.luo().outgoing_count(), 0, "the session is removed again");
        assert_eq!(fds.unreserved.get(), 1);
    }
    assert_eq!(Error::FileTableFull.errno(), ENFILE);
    // RETRIEVE: the incoming session goes back unretrieved.
    let inc = incoming(&[1]);
    let mut fds = TestFds {
        fail_session_file: Some(Error::FileTableFull),
        ..TestFds::default()
    };
    let mut arg = ReplyFault {
        buf: session_req(b"other", 72, 72),
        fault_writes: false,
    };
    let r = inc.lu.luo().device_ioctl(RETRIEVE, &mut arg, &mut fds);
    assert_eq!(r.err().map(Error::errno), Some(ENFILE));
    inc.dev
        .retrieve_session("other")
        .expect("still retrievable");
    // The created session name is free again.
    lu.open().unwrap().create_session("anon").unwrap();
}

#[test]
fn retrieve_without_matching_incoming_session_is_enoent() {
    let inc = incoming(&[1]);
    assert_eq!(errno(inc.dev.retrieve_session("nope")), ENOENT);
    assert_eq!(errno(inc.dev.retrieve_session("")), ENOENT);
    let mut req = session_req(&[b'o'; 64], 72, 72);
    assert_eq!(errno(inc.dev.ioctl(RETRIEVE, &mut req)), ENOENT);
    // Outgoing sessions are not retrievable.
    let _out = inc.dev.create_session("outgoing").unwrap();
    assert_eq!(errno(inc.dev.retrieve_session("outgoing")), ENOENT);
    // A closed incoming session is gone.
    let other = inc.dev.retrieve_session("other").unwrap();
    drop(other);
    assert_eq!(errno(inc.dev.retrieve_session("other")), ENOENT);
}

#[test]
fn retrieve_of_an_already_retrieved_session_is_einval() {
    let inc = incoming(&[1]);
    assert_eq!(errno(inc.dev.retrieve_session("in")), EINVAL);
    // Finished but still open: still retrieved.
    inc.s.finish().unwrap();
    assert_eq!(errno(inc.dev.retrieve_session("in")), EINVAL);
    // A clone of the fd keeps it open.
    let clone = inc.s.clone();
    drop(inc.s);
    assert_eq!(errno(inc.dev.retrieve_session("in")), EINVAL);
    drop(clone);
    assert_eq!(errno(inc.dev.retrieve_session("in")), ENOENT);
}

#[test]
fn preserve_token_in_use_in_this_session_is_eexist() {
    let (lu, _h, j, _store) = cold_test();
    let dev = lu.open().unwrap();
    let s1 = dev.create_session("s1").unwrap();
    let s2 = dev.create_session("s2").unwrap();
    let (a, b) = (memfd_with(b"a"), memfd_with(b"b"));
    s1.preserve_fd(a.as_fd(), 0).unwrap();
    j.take();
    assert_eq!(errno(s1.preserve_fd(b.as_fd(), 0)), EEXIST);
    assert!(j.take().is_empty(), "refused before any callback");
    // The same token in another session is fine; 0 and !0 are valid tokens.
    s2.preserve_fd(b.as_fd(), 0).unwrap();
    let c = memfd_with(b"c");
    s2.preserve_fd(c.as_fd(), u64::MAX).unwrap();
}

#[test]
fn preserve_bad_closed_negative_or_o_path_fd_is_ebadf() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    for fd in [-1, i32::MIN, i32::MAX, 19_999] {
        let mut req = fd_req(fd, 1, 16, 16);
        assert_eq!(errno(s.ioctl(PRESERVE, &mut req)), EBADF, "fd {fd}");
    }
    // SAFETY: plain open(2) of a static path; the result is checked and owned below.
    let raw = unsafe { libc::open(c"/tmp".as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: `raw` is a fresh fd we own.
    let opath = unsafe { OwnedFd::from_raw_fd(raw) };
    assert_eq!(errno(s.preserve_fd(opath.as_fd(), 2)), EBADF);
    assert_eq!(s.session().file_count(), 0);
    // The token check runs before fget: a used token wins over a bad fd.
    s.preserve_fd(memfd_with(b"").as_fd(), 3).unwrap();
    let mut req = fd_req(-1, 3, 16, 16);
    assert_eq!(errno(s.ioctl(PRESERVE, &mut req)), EEXIST);
}

#[test]
fn preserve_with_no_accepting_handler_is_enoent() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    let other = dev.create_session("other").unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    assert_eq!(errno(s.preserve_fd(null.as_fd(), 1)), ENOENT);
    let dir = std::fs::File::open("/tmp").unwrap();
    assert_eq!(errno(s.preserve_fd(dir.as_fd(), 2)), ENOENT);
    // A session fd.
    let mut req = fd_req(other.raw_fd(), 3, 16, 16);
    assert_eq!(errno(s.ioctl(PRESERVE, &mut req)), ENOENT);
    // A regular file on disk is not an unlinked tmpfs file.
    let exe = std::fs::File::open(std::env::current_exe().unwrap()).unwrap();
    assert_eq!(errno(s.preserve_fd(exe.as_fd(), 4)), ENOENT);
    // No handler registered at all.
    let bare = LiveUpdate::new().unwrap();
    let bdev = bare.open().unwrap();
    let bs = bdev.create_session("s").unwrap();
    assert_eq!(errno(bs.preserve_fd(memfd_with(b"").as_fd(), 1)), ENOENT);
}

#[test]
fn preserve_first_matching_handler_whose_owner_is_gone_is_enoent() {
    // B21: the first handler whose can_preserve matches is used even if its owner is gone.
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let first = TestHandler::new("first", &j, &store);
    lu.register_handler(first.clone()).unwrap();
    lu.register_handler(MemfdHandler::new(lu.memory().clone()))
        .unwrap();
    first.set_owner_gone(true);
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    let m = memfd_with(b"");
    assert_eq!(errno(s.preserve_fd(m.as_fd(), 1)), ENOENT);
    first.set_owner_gone(false);
    s.preserve_fd(m.as_fd(), 1).unwrap();
    assert!(matches!(j.take()[..], [Event::Preserve(ref n, _)] if n == "first"));
}

#[test]
fn preserve_of_a_file_preserved_anywhere_or_retrieved_and_unfinished_is_ebusy() {
    let inc = incoming(&[1]);
    let s1 = inc.dev.create_session("s1").unwrap();
    let s2 = inc.dev.create_session("s2").unwrap();
    let m = memfd_with(b"m");
    s1.preserve_fd(m.as_fd(), 1).unwrap();
    assert_eq!(errno(s2.preserve_fd(m.as_fd(), 2)), EBUSY);
    // Another fd of the same memfd is the same file.
    let dup = m.as_fd().try_clone_to_owned().unwrap();
    assert_eq!(errno(s2.preserve_fd(dup.as_fd(), 3)), EBUSY);
    // Reopened through /proc/self/fd: same inode, same file.
    let reopened = std::fs::File::open(format!("/proc/self/fd/{}", m.as_raw_fd())).unwrap();
    assert_eq!(errno(s2.preserve_fd(reopened.as_fd(), 4)), EBUSY);
    // A retrieved incoming file that is not finished yet.
    let r = inc.s.retrieve_fd(1).unwrap();
    assert_eq!(errno(s2.preserve_fd(r.as_fd(), 5)), EBUSY);
    inc.s.finish().unwrap();
    s2.preserve_fd(r.as_fd(), 5).expect("after FINISH");
}

#[test]
fn preserve_same_fd_same_session_same_token_is_eexist() {
    let (lu, _h, _j, _s) = cold_test();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    let m = memfd_with(b"m");
    s.preserve_fd(m.as_fd(), 7).unwrap();
    assert_eq!(errno(s.preserve_fd(m.as_fd(), 7)), EEXIST);
}

#[test]
fn preserve_same_fd_same_session_other_token_is_ebusy() {
    let (lu, _h, _j, _s) = cold_test();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    let m = memfd_with(b"m");
    s.preserve_fd(m.as_fd(), 7).unwrap();
    assert_eq!(errno(s.preserve_fd(m.as_fd(), 8)), EBUSY);
    assert_eq!(s.session().file_count(), 1);
}

#[test]
fn preserve_memfd_larger_than_u32_max_pages_is_efbig() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    let m = memfd_with(b"");
    let pages = u64::from(u32::MAX) + 1;
    if m.set_len(pages * 4096).is_err() {
        eprintln!("SKIP: tmpfs refuses a sparse 16 TiB memfd");
        return;
    }
    assert_eq!(errno(s.preserve_fd(m.as_fd(), 1)), EFBIG);
    // Exactly u32::MAX pages is fine.
    m.set_len(u64::from(u32::MAX) * 4096).unwrap();
    s.preserve_fd(m.as_fd(), 1).unwrap();
}

/// An FLB whose owner module is gone (`try_module_get` fails).
struct GoneFlb;

impl FlbOps for GoneFlb {
    fn key(&self) -> usize {
        core::ptr::from_ref(self) as usize
    }
    fn compatible(&self) -> &[u8] {
        b"gone-flb"
    }
    fn get_owner(&self) -> bool {
        false
    }
    fn preserve(&self) -> Result<(u64, usize), Errno> {
        panic!("preserve without an owner")
    }
    fn unpreserve(&self, _: u64, _: usize) {}
    fn retrieve(&self, _: u64) -> Result<usize, Errno> {
        Err(EINVAL)
    }
    fn finish(&self, _: u64, _: usize) {}
}

#[test]
fn preserve_with_flb_owner_unavailable_is_enodev() {
    let (lu, h, j, store) = cold_test();
    let hr: HandlerRef = h;
    let ok = TestFlb::new("ok-flb", 0, &j);
    lu.register_flb(&hr, ok).unwrap();
    let gone: FlbRef = Arc::new(GoneFlb);
    lu.register_flb(&hr, gone).unwrap();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    assert_eq!(errno(s.preserve_fd(memfd_with(b"").as_fd(), 1)), ENODEV);
    assert_eq!(
        j.take(),
        vec![
            Event::FlbPreserve("ok-flb".into()),
            Event::FlbUnpreserve("ok-flb".into())
        ]
    );
    assert_eq!(store.len(), 0);
}

#[test]
fn retrieve_fd_with_no_files_or_unknown_token_is_enoent() {
    let inc = incoming(&[1, 2]);
    assert_eq!(errno(inc.s.retrieve_fd(3)), ENOENT);
    let other = inc.dev.retrieve_session("other").unwrap();
    assert_eq!(errno(other.retrieve_fd(1)), ENOENT, "session has no files");
    // After FINISH the session is empty.
    drop(inc.s.retrieve_fd(1).unwrap());
    inc.s.finish().unwrap();
    assert_eq!(errno(inc.s.retrieve_fd(1)), ENOENT);
    assert_eq!(errno(inc.s.retrieve_fd(2)), ENOENT);
}

#[test]
fn retrieve_fd_after_an_earlier_failure_returns_the_cached_errno() {
    let inc = incoming(&[1, 2]);
    inc.h.fail(Op::Retrieve, None, ENOMEM);
    assert_eq!(errno(inc.s.retrieve_fd(1)), ENOMEM);
    inc.h.heal(Op::Retrieve);
    assert_eq!(errno(inc.s.retrieve_fd(1)), ENOMEM, "cached, not retried");
    let retrieves = inc
        .j
        .take()
        .into_iter()
        .filter(|e| matches!(e, Event::Retrieve(..)))
        .count();
    assert_eq!(retrieves, 1);
    // The other token is unaffected.
    inc.s.retrieve_fd(2).unwrap();
}

#[test]
fn retrieve_fd_handler_failure_is_its_errno() {
    let inc = incoming(&[1, 2]);
    inc.h.fail(Op::Retrieve, None, EIO);
    assert_eq!(errno(inc.s.retrieve_fd(2)), EIO);

    // The memfd handler: seals outside 0x3f in the handed-over data give EOPNOTSUPP.
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("m").unwrap();
    s.preserve_fd(memfd_with(b"sealed").as_fd(), 1).unwrap();
    s.preserve_fd(memfd_with(b"other").as_fd(), 2).unwrap();
    drop(dev);
    lu.luo().reboot().unwrap();
    let mut bytes = lu.memory().to_bytes();
    let _fd = kexec(lu);
    drop(s);
    let sess = sessions(&bytes);
    let fs = files(&bytes, sess[0].files);
    let seals_at = fs[0].data + 16;
    bytes[seals_at as usize..seals_at as usize + 4].copy_from_slice(&0x40u32.to_ne_bytes());
    // The second file names an fd that is not the preserved memfd.
    put_u64(&mut bytes, fs[1].data + 48, 0);
    let lu2 = boot_bytes(bytes);
    lu2.register_handler(MemfdHandler::new(lu2.memory().clone()))
        .unwrap();
    let dev2 = lu2.open().unwrap();
    let m = dev2.retrieve_session("m").unwrap();
    assert_eq!(errno(m.retrieve_fd(1)), EOPNOTSUPP);
    assert_eq!(errno(m.retrieve_fd(2)), EIO);
}

#[test]
fn finish_with_reserved_nonzero_is_einval() {
    let inc = incoming(&[1]);
    let mut req = finish_req(1, 8, 8);
    assert_eq!(errno(inc.s.ioctl(FINISH, &mut req)), EINVAL);
    assert_eq!(inc.s.session().file_count(), 1);
    assert!(inc.j.take().is_empty(), "no can_finish ran");
}

#[test]
fn finish_when_a_can_finish_refuses_is_ebusy() {
    let inc = incoming(&[1, 2]);
    inc.h.fail(Op::CanFinish, None, EBUSY);
    assert_eq!(errno(inc.s.finish()), EBUSY);
    assert_eq!(inc.s.session().file_count(), 2);
    assert!(!inc.j.take().iter().any(|e| matches!(e, Event::Finish(..))));
}

#[test]
fn get_name_with_reserved_nonzero_is_einval() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    let mut req = get_name_req(1, 72, 72, 0xAA);
    assert_eq!(errno(s.ioctl(GET_NAME, &mut req)), EINVAL);
    assert!(req[8..72].iter().all(|&b| b == 0xAA), "nothing written");
}

#[test]
fn response_copy_out_failure_is_efault_after_the_side_effects() {
    let inc = incoming(&[1, 2]);
    let luo = inc.lu.luo();
    let fault = |buf: Vec<u8>| ReplyFault {
        buf,
        fault_writes: true,
    };
    // CREATE: the session is not created and its name stays free.
    let mut fds = TestFds::default();
    let r = luo.device_ioctl(CREATE, &mut fault(session_req(b"c", 72, 72)), &mut fds);
    assert_eq!(r.err().map(Error::errno), Some(EFAULT));
    assert!(fds.sessions.is_empty());
    assert_eq!(fds.unreserved.get(), 1, "the fd number is given back");
    assert_eq!(luo.outgoing_count(), 0);
    let out = inc.dev.create_session("c").unwrap();
    // PRESERVE_FD: the file stays preserved.
    let m = memfd_with(b"m");
    let r = luo.session_ioctl(
        out.session(),
        PRESERVE,
        &mut fault(fd_req(m.as_raw_fd(), 9, 16, 16)),
        &mut fds,
    );
    assert_eq!(r.err().map(Error::errno), Some(EFAULT));
    assert_eq!(out.session().file_count(), 1);
    assert_eq!(errno(out.preserve_fd(m.as_fd(), 9)), EEXIST);
    // RETRIEVE_FD: the file stays retrieved (the next retrieve does not call the handler).
    let r = luo.session_ioctl(
        inc.s.session(),
        RETRIEVE_FD,
        &mut fault(fd_req(-1, 1, 16, 16)),
        &mut fds,
    );
    assert_eq!(r.err().map(Error::errno), Some(EFAULT));
    assert!(fds.files.is_empty());
    assert_eq!(
        fds.unreserved.get(),
        2,
        "CREATE's and RETRIEVE_FD's fd numbers given back"
    );
    inc.j.take();
    inc.s.retrieve_fd(1).unwrap();
    assert!(inc.j.take().is_empty(), "already retrieved");
    // GET_NAME: nothing happens.
    let r = luo.session_ioctl(
        inc.s.session(),
        GET_NAME,
        &mut fault(get_name_req(0, 72, 72, 0)),
        &mut fds,
    );
    assert_eq!(r.err().map(Error::errno), Some(EFAULT));
    // FINISH: the finish has happened.
    let r = luo.session_ioctl(
        inc.s.session(),
        FINISH,
        &mut fault(finish_req(0, 8, 8)),
        &mut fds,
    );
    assert_eq!(r.err().map(Error::errno), Some(EFAULT));
    assert_eq!(inc.s.session().file_count(), 0);
    assert_eq!(
        inc.j
            .take()
            .iter()
            .filter(|e| matches!(e, Event::Finish(..)))
            .count(),
        2
    );
}

#[test]
fn retrieve_session_response_fault_is_efault_and_puts_the_session_back() {
    // B6 fixed: upstream finishes and frees the session; here it stays unretrieved.
    let (lu, _h, j, store) = cold_test();
    let dev = lu.open().unwrap();
    let s = dev.create_session("keep").unwrap();
    s.preserve_fd(memfd_with(b"k").as_fd(), 1).unwrap();
    drop(dev);
    let fd = kexec(lu);
    drop(s);
    j.take();
    let lu = LiveUpdate::boot(&fd).unwrap();
    lu.register_handler(TestHandler::new("test-h", &j, &store))
        .unwrap();
    let dev = lu.open().unwrap();
    let mut fds = TestFds::default();
    let mut arg = ReplyFault {
        buf: session_req(b"keep", 72, 72),
        fault_writes: true,
    };
    let r = lu.luo().device_ioctl(RETRIEVE, &mut arg, &mut fds);
    assert_eq!(r.err().map(Error::errno), Some(EFAULT));
    assert_eq!(fds.discarded, 1);
    assert_eq!(fds.unreserved.get(), 1, "the fd number is given back");
    assert!(j.take().is_empty(), "nothing finished");
    assert_eq!(lu.luo().incoming_count(), 1);
    let s = dev.retrieve_session("keep").expect("still retrievable");
    s.retrieve_fd(1).expect("file still there");
}

#[test]
fn open_of_an_open_device_is_ebusy() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    assert_eq!(errno(lu.open()), EBUSY);
    // Sessions do not hold the device; closing it frees it.
    let s = dev.create_session("s").unwrap();
    drop(dev);
    let dev2 = lu.open().unwrap();
    assert_eq!(errno(lu.open()), EBUSY);
    drop(dev2);
    drop(s);
}

#[test]
fn open_after_incoming_deserialization_failed_is_eio() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let _s = dev.create_session("s").unwrap();
    drop(dev);
    lu.luo().reboot().unwrap();
    let mut bytes = lu.memory().to_bytes();
    let root = root_of(&bytes);
    bytes[root as usize..root as usize + 8].copy_from_slice(b"luo-v4\0\0");
    let lu2 = boot_bytes(bytes);
    assert_eq!(errno(lu2.open()), EIO);
    // B5 fixed: the next open works, with no incoming sessions.
    let dev2 = lu2.open().unwrap();
    assert_eq!(errno(dev2.retrieve_session("s")), ENOENT);
    dev2.create_session("s").unwrap();
}

#[test]
fn after_a_successful_reboot_every_operation_is_eshutdown() {
    let inc = incoming(&[1, 2]);
    let out = inc.dev.create_session("out").unwrap();
    out.preserve_fd(memfd_with(b"o").as_fd(), 1).unwrap();
    let m = memfd_with(b"m");
    inc.j.take();
    inc.lu.luo().reboot().unwrap();
    assert!(inc.lu.luo().is_serialized());
    assert!(matches!(inc.j.take()[..], [Event::Freeze(..)]));
    assert_eq!(errno(inc.dev.create_session("new")), ESHUTDOWN);
    assert_eq!(errno(inc.dev.retrieve_session("other")), ESHUTDOWN);
    assert_eq!(errno(out.preserve_fd(m.as_fd(), 2)), ESHUTDOWN);
    assert_eq!(errno(inc.s.retrieve_fd(1)), ESHUTDOWN);
    assert_eq!(errno(inc.s.finish()), ESHUTDOWN);
    assert_eq!(errno(out.get_name()), ESHUTDOWN);
    assert_eq!(errno(inc.s.get_name()), ESHUTDOWN);
    // Upstream takes the serialize lock after decoding but before the `reserved` checks, so
    // those block (here: ESHUTDOWN) too; so does RETRIEVE_FD, whatever the fd table.
    let mut f = finish_req(1, 8, 8);
    assert_eq!(errno(inc.s.ioctl(FINISH, &mut f)), ESHUTDOWN);
    let mut g = get_name_req(1, 72, 72, 0);
    assert_eq!(errno(out.ioctl(GET_NAME, &mut g)), ESHUTDOWN);
    assert_eq!(
        in_child(|| fill_fd_table() && errno(inc.s.retrieve_fd(1)) == ESHUTDOWN),
        0
    );
    // Decoding comes first (spec §2.4 steps 1-6 run before the lock): those errors still show.
    let mut bad = fd_req(m.as_raw_fd(), 2, 8, 16);
    assert_eq!(errno(out.ioctl(PRESERVE, &mut bad)), EINVAL);
    assert_eq!(errno(out.ioctl(0xBA44, &mut bad)), EINVAL);
    // Closing does nothing: no unpreserve, no finish.
    drop(out);
    drop(inc.s);
    assert!(inc.j.take().is_empty());
    assert_eq!(inc.lu.luo().outgoing_count(), 1);
    assert_eq!(inc.lu.luo().incoming_count(), 2);
    // A second reboot is a no-op.
    inc.lu.luo().reboot().unwrap();
}
