//! The handover image is only as large as what is live (issue 12, item 1): pages freed by closed
//! sessions and unpreserved files are reused, so a user who creates, preserves and closes in a
//! loop cannot grow the image that the next image must read and keep.

use std::os::fd::AsFd;

use backend_user::{sys, LiveUpdate};
use luo_tests::*;

/// Cycles of create session / preserve a memfd / close the session.
const CYCLES: usize = 100_000;

/// The live state every image ends with: session "keep" with two memfds.
fn build_live(dev: &backend_user::Device) -> backend_user::SessionFd {
    let s = dev.create_session("keep").unwrap();
    s.preserve_fd(memfd_with(b"first").as_fd(), 1).unwrap();
    s.preserve_fd(memfd_with(b"second").as_fd(), 2).unwrap();
    s
}

/// Reboots and returns the handover image's size, then boots it and checks the live state came
/// through intact (the reused pages hold what was written last, nothing stale).
fn reboot_and_check(lu: LiveUpdate) -> u64 {
    let fd = kexec(lu);
    let size = sys::fstat(fd.as_fd()).unwrap().st_size as u64;
    let next = boot_memfd(&fd);
    let dev = next.open().unwrap();
    let s = dev.retrieve_session("keep").unwrap();
    assert_eq!(
        read_all(&mut std::fs::File::from(s.retrieve_fd(1).unwrap())),
        b"first"
    );
    assert_eq!(
        read_all(&mut std::fs::File::from(s.retrieve_fd(2).unwrap())),
        b"second"
    );
    s.finish().unwrap();
    size
}

#[test]
fn preserve_close_cycles_do_not_grow_the_handover_image() {
    // The live state alone, built fresh.
    let fresh = {
        let lu = cold_memfd();
        let dev = lu.open().unwrap();
        let _keep = build_live(&dev);
        reboot_and_check(lu)
    };

    // The same live state after CYCLES create/preserve/close cycles, some before it is built
    // and some after (pages freed on either side of live ones).
    let cycled = {
        let lu = cold_memfd();
        let dev = lu.open().unwrap();
        let tmp = memfd_with(b"transient");
        let cycle = |n: usize| {
            for i in 0..n {
                let s = dev.create_session(&format!("tmp{}", i % 7)).unwrap();
                s.preserve_fd(tmp.as_fd(), i as u64).unwrap();
                drop(s);
            }
        };
        cycle(CYCLES / 2);
        let _keep = build_live(&dev);
        cycle(CYCLES - CYCLES / 2);
        reboot_and_check(lu)
    };
    assert_eq!(
        cycled, fresh,
        "after {CYCLES} create/preserve/close cycles the handover image is {cycled} bytes, \
         {fresh} bytes for the same live state built fresh"
    );
}

#[test]
fn a_hole_below_a_live_page_is_reused_first() {
    // Pages freed below a live one leave a hole that the next allocation fills, so the image
    // spans no more than the peak number of pages ever live at once.
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let f = memfd_with(b"x");
    let g = memfd_with(b"y");
    let a = dev.create_session("a").unwrap();
    a.preserve_fd(f.as_fd(), 1).unwrap();
    let b = dev.create_session("b").unwrap();
    b.preserve_fd(g.as_fd(), 1).unwrap();
    let peak = lu.memory().to_bytes().len();
    drop(a);
    let c = dev.create_session("c").unwrap();
    c.preserve_fd(f.as_fd(), 1).unwrap();
    assert_eq!(lu.memory().to_bytes().len(), peak, "c reuses a's pages");
    drop((b, c));
    // Everything closed: the image shrinks back to what is still live (root and FLB pages).
    let empty = {
        let lu = cold_memfd();
        let _dev = lu.open().unwrap();
        lu.memory().to_bytes().len()
    };
    assert_eq!(lu.memory().to_bytes().len(), empty);
}

#[test]
fn an_image_too_large_for_the_next_image_is_refused_before_anything_is_frozen() {
    let lu = cold_memfd();
    let dev = lu.open().unwrap();
    let keep = build_live(&dev);
    let len = lu.memory().image_len();
    lu.memory().limit_image(Some(len - 4096));
    assert_eq!(errno(lu.reboot()), luo_core::errno::EFBIG);
    assert!(logged(
        lu.memory(),
        "reboot refused: the handover image would be"
    ));
    // Nothing was frozen or serialized: the session still takes files, and once the image
    // fits, the update goes through with everything.
    keep.preserve_fd(memfd_with(b"third").as_fd(), 3).unwrap();
    lu.memory().limit_image(None);
    let fd = kexec(lu);
    drop(keep);
    let next = boot_memfd(&fd);
    let dev = next.open().unwrap();
    let s = dev.retrieve_session("keep").unwrap();
    assert_eq!(
        read_all(&mut std::fs::File::from(s.retrieve_fd(3).unwrap())),
        b"third"
    );
}
