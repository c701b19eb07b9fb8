//! End-to-end smoke test: preserve a memfd, reboot, boot, retrieve, verify.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};

use backend_user::LiveUpdate;
use luo_handlers::MemfdHandler;

fn memfd(data: &[u8]) -> std::fs::File {
    let fd: OwnedFd = backend_user::sys::memfd_create(c"smoke", libc::MFD_CLOEXEC).unwrap();
    let mut f = std::fs::File::from(fd);
    f.write_all(data).unwrap();
    f
}

#[test]
fn memfd_survives_reboot() {
    let lu = LiveUpdate::new().unwrap();
    lu.register_handler(MemfdHandler::new(lu.memory().clone()))
        .unwrap();
    let dev = lu.open().unwrap();
    let s = dev.create_session("smoke").unwrap();
    let mut f = memfd(b"hello kexec world");
    f.seek(SeekFrom::Start(6)).unwrap();
    s.preserve_fd(f.as_fd(), 0x1a).unwrap();
    drop(f);
    drop(dev);
    let handover = lu.reboot_and_abandon().unwrap();

    let lu2 = LiveUpdate::boot(&handover).unwrap();
    lu2.register_handler(MemfdHandler::new(lu2.memory().clone()))
        .unwrap();
    let dev2 = lu2.open().unwrap();
    let s2 = dev2.retrieve_session("smoke").unwrap();
    assert_eq!(s2.get_name().unwrap(), "smoke");
    let fd = s2.retrieve_fd(0x1a).unwrap();
    let mut f2 = std::fs::File::from(fd);
    assert_eq!(f2.stream_position().unwrap(), 6);
    let mut buf = String::new();
    f2.seek(SeekFrom::Start(0)).unwrap();
    f2.read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "hello kexec world");
    s2.finish().unwrap();
    drop(s2);
    assert_eq!(lu2.luo().incoming_count(), 0);
}

/// A memfd that the next image never retrieves must not leak into the image after it: the
/// handler marks inherited fds close-on-exec at registration.
#[test]
fn unretrieved_memfd_is_close_on_exec_in_the_next_image() {
    let lu = LiveUpdate::new().unwrap();
    lu.register_handler(MemfdHandler::new(lu.memory().clone()))
        .unwrap();
    let dev = lu.open().unwrap();
    let s = dev.create_session("leak").unwrap();
    let f = memfd(b"never retrieved");
    s.preserve_fd(f.as_fd(), 7).unwrap();
    drop(f);
    drop(dev);
    let handover = lu.reboot_and_abandon().unwrap();
    // Find the inherited fd: the one memfd without FD_CLOEXEC whose content matches.
    let lu2 = LiveUpdate::boot(&handover).unwrap();
    let mut inherited = Vec::new();
    for fd in 0..1024 {
        if backend_user::sys::fd_is_open(fd) {
            let st = backend_user::sys::fstat_raw(fd).unwrap();
            if st.st_nlink == 0 && st.st_size == 15 {
                inherited.push(fd);
            }
        }
    }
    assert!(!inherited.is_empty(), "the preserved memfd is inherited");
    MemfdHandler::register(&lu2).unwrap();
    for fd in inherited {
        // SAFETY: borrowed only for this check; the fd stays owned by nobody.
        let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        assert!(
            backend_user::sys::get_cloexec(b).unwrap(),
            "inherited fd {fd} must be close-on-exec until retrieved"
        );
    }
}
