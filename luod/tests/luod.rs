//! luod end to end, over the real socket protocol, with the user backend: each test starts a
//! luod of its own in a temp dir. An update there is `LiveUpdate::reboot` plus an exec of luod
//! (same pid, the socket kept open), so the whole flow runs without a LUO kernel.

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use luo_client::wire::{self, op};
use luo_client::{Dir, UpdateEvent};
use luo_core::errno;

#[test]
fn full_userspace_update_restores_a_memfd_by_name() {
    let d = Daemon::start(&[]);
    let ram = pattern(1, 1 << 20);
    {
        let c = d.connect();
        assert_eq!(c.hello().generation, 0);
        let s = c.create_session("vm0").unwrap();
        assert_eq!(s.name().unwrap(), "0/vm0");
        let m = memfd(&ram);
        s.preserve_fd(&m, 7).unwrap();
        s.preserve_fd(memfd(b"device state"), 8).unwrap();
        assert_eq!(s.preserve_fd(&m, 9).unwrap_err().errno(), errno::EBUSY);
        // The client goes away: luod holds the session.
    }
    let st = d.connect().status().unwrap();
    assert_eq!(st.sessions.len(), 1);
    assert_eq!(
        (st.sessions[0].dir, st.sessions[0].files),
        (Dir::Outgoing, Some(2))
    );

    let o = d.luoctl(&["update"]);
    assert!(o.status.success(), "{}\n{}", stderr(&o), d.log());
    assert!(stdout(&o).contains("generation 0 -> 1"), "{}", stdout(&o));
    let c = d.wait_generation(1);
    assert_eq!(c.hello().pid, d.pid(), "an update execs luod in place");

    assert_eq!(
        c.retrieve_session("nothere").unwrap_err().errno(),
        errno::ENOENT
    );
    assert_eq!(c.open_session("vm0").unwrap_err().errno(), errno::ENOENT);
    let s = c.retrieve_session("vm0").unwrap();
    assert_eq!(s.name().unwrap(), "0/vm0");
    assert_eq!(contents(s.retrieve_fd(7).unwrap()), ram);
    assert_eq!(contents(s.retrieve_fd(8).unwrap()), b"device state");
    assert_eq!(s.retrieve_fd(9).unwrap_err().errno(), errno::ENOENT);
    assert_eq!(
        s.preserve_fd(memfd(b"x"), 1).unwrap_err().errno(),
        errno::EINVAL
    );
    s.finish().unwrap();
    let st = c.status().unwrap();
    assert!(st.sessions[0].finished && st.sessions[0].dir == Dir::Incoming);
    // luod keeps its copy until released: the session is still there, empty.
    let again = c.retrieve_session("vm0").unwrap();
    assert_eq!(again.retrieve_fd(7).unwrap_err().errno(), errno::ENOENT);
    c.release_session(Dir::Incoming, "vm0").unwrap();
    assert_eq!(
        c.release_session(Dir::Incoming, "vm0").unwrap_err().errno(),
        errno::ENOENT
    );
    assert!(c.status().unwrap().sessions.is_empty());

    // And once more, through the library's update call: the flow repeats.
    c.create_session("vm0")
        .unwrap()
        .preserve_fd(memfd(b"second"), 1)
        .unwrap();
    assert_eq!(c.update(None, None, b"", Duration::ZERO).unwrap(), 2);
    let c = d.wait_generation(2);
    let s = c.retrieve_session("vm0").unwrap();
    assert_eq!(contents(s.retrieve_fd(1).unwrap()), b"second");
    s.finish().unwrap();
}

#[test]
fn several_clients_at_once_and_a_stalled_one_blocks_nobody() {
    let d = Daemon::start(&[]);
    // A client that sends half a header and stalls.
    let stalled = d.raw();
    std::io::Write::write_all(&mut &stalled, &[9, 0, 0]).unwrap();
    let t = Instant::now();
    d.connect().status().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    let sock = d.sock.clone();
    let workers: Vec<_> = (0..4)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let c = luo_client::Luod::connect(&sock).unwrap();
                let s = c.create_session(&format!("c{i}")).unwrap();
                for t in 0..3u64 {
                    s.preserve_fd(memfd(&pattern(i * 10 + t, 4096 + t as usize)), t)
                        .unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let c = d.connect();
    let st = c.status().unwrap();
    assert_eq!(st.sessions.len(), 4);
    assert!(st.sessions.iter().all(|s| s.files == Some(3)));
    // The stalled client was cut off after the frame timeout, with an explanation.
    let f = read(&stalled).unwrap();
    assert_eq!(
        wire::parse_reply(&f.body).unwrap().unwrap_err().0,
        libc::ETIMEDOUT
    );
    assert!(drains_to_eof(&stalled));

    assert_eq!(c.update(None, None, b"", Duration::ZERO).unwrap(), 1);
    d.wait_generation(1);
    let workers: Vec<_> = (0..4u64)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let c = luo_client::Luod::connect(&sock).unwrap();
                let s = c.retrieve_session(&format!("c{i}")).unwrap();
                for t in 0..3u64 {
                    assert_eq!(
                        contents(s.retrieve_fd(t).unwrap()),
                        pattern(i * 10 + t, 4096 + t as usize)
                    );
                }
                s.finish().unwrap();
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn a_killed_client_loses_nothing_and_can_come_back() {
    let d = Daemon::start(&[]);
    let data = pattern(3, 100_000);
    let file = d.dir.join("data");
    std::fs::write(&file, &data).unwrap();
    let mut client = d
        .luoctl_cmd(&[
            "preserve",
            "crash",
            "1",
            "--file",
            path_str(&file),
            "--hold",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(client.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("preserved 100000 byte(s)"), "{line:?}");
    client.kill().unwrap(); // SIGKILL: no cleanup of any kind
    client.wait().unwrap();

    let c = d.connect();
    let st = c.status().unwrap();
    assert_eq!(st.sessions.len(), 1);
    assert_eq!(st.sessions[0].files, Some(1));
    // Reconnected: the same session, still holding the killed client's memfd.
    assert_eq!(
        c.create_session("crash").unwrap_err().errno(),
        errno::EEXIST
    );
    let s = c.open_session("crash").unwrap();
    assert_eq!(
        s.preserve_fd(memfd(b"x"), 1).unwrap_err().errno(),
        errno::EEXIST
    );
    s.preserve_fd(memfd(b"after the crash"), 2).unwrap();
    drop(s);

    let o = d.luoctl(&["update"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let c = d.wait_generation(1);
    // A client that dies while restoring (before FINISH) may simply ask again.
    let s = c.retrieve_session("crash").unwrap();
    assert_eq!(contents(s.retrieve_fd(2).unwrap()), b"after the crash");
    drop(s);
    let o = d.luoctl(&["retrieve", "crash", "1", "--finish"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout, data);
    assert!(c.status().unwrap().sessions[0].finished);
}

#[test]
fn another_uid_can_neither_see_nor_take_a_session() {
    if !is_root() {
        eprintln!("SKIP: needs root to run clients as another uid");
        return;
    }
    const NOBODY: u32 = 65534;
    let d = Daemon::start(&[]);
    let c = d.connect();
    let s = c.create_session("secret").unwrap();
    s.preserve_fd(memfd(b"root's data"), 1).unwrap();

    let run = |args: &[&str], input: &[u8]| d.luoctl_with_input(args, input, Some(NOBODY));
    // luod sees the real uid: nothing of root's is visible or reachable.
    let o = run(&["status", "--json"], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).contains("secret"), "{}", stdout(&o));
    let o = run(&["preserve", "secret", "2", "--open"], b"mine");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("ENOENT"), "{}", stderr(&o));
    for name in ["0/secret", "../0/secret", "luod", "secret\u{1}"] {
        let o = run(&["preserve", name, "1"], b"x");
        if name == "luod" {
            // Allowed, but it is "65534/luod": it cannot pose as luod's manifest.
            assert!(o.status.success(), "{}", stderr(&o));
            continue;
        }
        assert!(!o.status.success(), "{name}");
        assert!(stderr(&o).contains("EINVAL"), "{name}: {}", stderr(&o));
    }
    // Its own "secret" is a different session.
    let o = run(&["preserve", "secret", "1"], b"nobody's data");
    assert!(o.status.success(), "{}", stderr(&o));
    // The anti-hijack case: a fake manifest in its own "luod" session, naming root's session
    // as its own.
    let fake =
        format!("luod-manifest 1\ngeneration 9\nsession {NOBODY} stolen\nsession 0 secret\nend\n");
    let o = run(&["preserve", "luod", "0", "--open"], fake.as_bytes());
    assert!(o.status.success(), "{}", stderr(&o));
    // Only root updates.
    let o = run(&["update"], b"");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("EPERM"), "{}", stderr(&o));
    // A release by name touches its own namespace only.
    let o = run(&["release", "nothing"], b"");
    assert!(stderr(&o).contains("ENOENT"), "{}", stderr(&o));

    let st = c.status().unwrap();
    let mut names: Vec<_> = st
        .sessions
        .iter()
        .map(|s| (s.uid, s.name.as_str()))
        .collect();
    names.sort();
    assert_eq!(names, [(0, "secret"), (NOBODY, "luod"), (NOBODY, "secret")]);

    assert!(d.luoctl(&["update"]).status.success());
    let c = d.wait_generation(1);
    assert_eq!(
        c.hello().generation,
        1,
        "the real manifest was used, not the fake"
    );
    let o = run(&["retrieve", "secret", "1"], b"");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout, b"nobody's data");
    let o = run(&["retrieve", "stolen", "1"], b"");
    assert!(stderr(&o).contains("ENOENT"), "{}", stderr(&o));
    let o = run(&["retrieve", "luod", "0"], b"");
    assert_eq!(stdout(&o), fake, "its own session, nothing more");
    let s = c.retrieve_session("secret").unwrap();
    assert_eq!(contents(s.retrieve_fd(1).unwrap()), b"root's data");
    let st = c.status().unwrap();
    assert_eq!(st.sessions.len(), 3, "{st:?}");
}

#[test]
fn hostile_and_malformed_messages_get_errors_and_never_crash_luod() {
    let mut d = Daemon::start(&[]);
    let fds_before = d.fd_count();

    // Random bytes, deterministic per seed.
    for seed in 0..40u64 {
        let s = d.raw();
        let junk = pattern(seed + 100, 1 + (seed as usize * 37) % 300);
        let _ = std::io::Write::write_all(&mut &s, &junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        assert!(drains_to_eof(&s), "seed {seed}");
    }
    // Valid headers, random bodies, every opcode but UPDATE (a valid random UPDATE would
    // really update). Each gets exactly one reply.
    let s = d.raw();
    let ops = [
        op::HELLO,
        op::CREATE,
        op::OPEN,
        op::RETRIEVE,
        op::RELEASE,
        op::STATUS,
        op::REGISTER,
        op::BARRIER,
        op::S_PRESERVE,
        op::S_RETRIEVE_FD,
        op::S_FINISH,
        op::S_GET_NAME,
        op::EV_PREPARE,
        op::EV_ABORTED,
        op::EV_REBOOTING,
        op::REPLY,
        0,
        0x7777,
        0xffff,
    ];
    for (i, &o) in ops.iter().enumerate() {
        for seed in 0..5u64 {
            let body = pattern(seed * 31 + i as u64, (seed as usize * 13) % 70);
            let tag = (i * 10) as u32 + seed as u32;
            let (st, _) = call(&s, o, tag, &body);
            if ![op::STATUS, op::REGISTER, op::HELLO].contains(&o) || !body.is_empty() {
                assert_ne!(st, 0, "op {o:#x} body {body:?}");
            }
        }
    }
    drop(s);

    let s = d.raw();
    // Unknown version: refused, the connection goes on.
    std::io::Write::write_all(&mut &s, &wire::header(0, 2, op::HELLO, 5)).unwrap();
    let f = read(&s).unwrap();
    assert_eq!(f.tag, 5);
    assert_eq!(
        wire::parse_reply(&f.body).unwrap().unwrap_err().0,
        libc::EPROTONOSUPPORT
    );
    assert_eq!(call(&s, op::HELLO, 6, b"").0, 0);
    assert_eq!(call(&s, 0x7777, 7, b"").0, libc::EBADRQC);
    assert_eq!(call(&s, op::HELLO, 8, b"x").0, libc::EBADMSG);
    assert_eq!(call(&s, op::S_FINISH, 9, b"").0, libc::EBADRQC);
    for bad in [
        &b""[..],
        &[b'a'; 53],
        b"a/b",
        b"a b",
        b"\xff",
        b"q\"",
        b"\0",
    ] {
        assert_eq!(call(&s, op::CREATE, 10, bad).0, libc::EINVAL, "{bad:?}");
    }
    assert_eq!(call(&s, op::RELEASE, 11, b"\x07vm").0, libc::EBADMSG);
    assert_eq!(
        call(&s, op::BARRIER, 12, &0i32.to_le_bytes()).0,
        libc::EBADMSG
    );
    assert_eq!(call(&s, op::BARRIER, 12, &[0; 12]).0, libc::EINVAL);
    assert_eq!(
        call(&s, op::UPDATE, 13, &[9, 0, 0, 0, 0, 0, 0, 0]).0,
        libc::EBADMSG
    );
    // UPDATE announcing a kernel fd without sending one.
    assert_eq!(
        call(&s, op::UPDATE, 14, &[1, 0, 0, 0, 0, 0, 0, 0]).0,
        libc::EINVAL
    );
    // Fds where none belong, and more fds than luod keeps.
    let null = std::fs::File::open("/dev/null").unwrap();
    for n in [1usize, 6] {
        let fds: Vec<_> = (0..n).map(|_| null.as_fd()).collect();
        wire::write_frame(&s, op::HELLO, 20, b"", &fds).unwrap();
        let f = read(&s).unwrap();
        assert_eq!(
            wire::parse_reply(&f.body).unwrap().unwrap_err().0,
            libc::EINVAL
        );
    }
    drop(s);

    // A session channel gets the same treatment.
    let s = d.raw();
    let (st, mut f) = call(&s, op::CREATE, 1, b"chan");
    assert_eq!(st, 0);
    let ch = UnixStream::from(f.fds.pop().unwrap());
    ch.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    assert_eq!(
        call(&ch, op::S_PRESERVE, 1, &7u64.to_le_bytes()).0,
        libc::EINVAL,
        "no fd"
    );
    wire::write_frame(&ch, op::S_PRESERVE, 2, &7u64.to_le_bytes(), &[null.as_fd()]).unwrap();
    let f = read(&ch).unwrap();
    assert_eq!(
        wire::parse_reply(&f.body).unwrap().unwrap_err().0,
        libc::ENOENT,
        "no handler takes /dev/null"
    );
    assert_eq!(call(&ch, op::S_PRESERVE, 3, b"short").0, libc::EINVAL);
    assert_eq!(
        call(&ch, op::S_RETRIEVE_FD, 4, &7u64.to_le_bytes()).0,
        libc::EINVAL
    );
    assert_eq!(call(&ch, op::S_FINISH, 5, b"").0, libc::EINVAL);
    assert_eq!(call(&ch, op::S_GET_NAME, 6, b"x").0, libc::EBADMSG);
    assert_eq!(call(&ch, op::HELLO, 7, b"").0, libc::EBADRQC);
    let (st, f) = call(&ch, op::S_GET_NAME, 8, b"");
    assert_eq!((st, &f.body[4..]), (0, &b"0/chan"[..]));
    drop((ch, s));

    // An oversized length: an error reply with the request's tag, then the connection ends.
    let s = d.raw();
    std::io::Write::write_all(&mut &s, &wire::header(u32::MAX, 1, op::STATUS, 77)).unwrap();
    let f = read(&s).unwrap();
    assert_eq!(f.tag, 77);
    assert_eq!(
        wire::parse_reply(&f.body).unwrap().unwrap_err().0,
        libc::EMSGSIZE
    );
    assert!(drains_to_eof(&s));
    // A truncated frame: the peer leaves mid-body.
    let s = d.raw();
    std::io::Write::write_all(&mut &s, &wire::header(100, 1, op::CREATE, 1)).unwrap();
    std::io::Write::write_all(&mut &s, b"0123456789").unwrap();
    drop(s);

    assert!(d.alive(), "{}", d.log());
    let c = d.connect();
    let st = c.status().unwrap();
    assert_eq!(st.sessions.len(), 1, "only the channel test's session");
    drop(c);
    // Every connection's fds went away with it (a few may still be closing).
    let t = Instant::now();
    while d.fd_count() > fds_before + 2 && t.elapsed() < DEADLINE {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        d.fd_count() <= fds_before + 2,
        "{} > {fds_before}",
        d.fd_count()
    );
}

#[test]
fn the_barrier_waits_for_listeners_and_a_late_one_cancels_the_update() {
    let d = Daemon::start(&[]);
    let c = d.connect();
    c.create_session("vm")
        .unwrap()
        .preserve_fd(memfd(b"guest"), 1)
        .unwrap();
    let mut late = d.connect().register_for_update("vmm-a").unwrap();

    let t = Instant::now();
    let o = d.luoctl(&["update", "--barrier-timeout-ms", "300"]);
    assert!(!o.status.success());
    assert!(t.elapsed() >= Duration::from_millis(300));
    let e = stderr(&o);
    assert!(
        e.contains("ETIMEDOUT") && e.contains("\"vmm-a\"") && e.contains("nothing was lost"),
        "{e}"
    );
    match late.next_event(Some(DEADLINE)).unwrap() {
        Some(UpdateEvent::Prepare { timeout, .. }) => {
            assert_eq!(timeout, Duration::from_millis(300))
        }
        other => panic!("{other:?}"),
    }
    match late.next_event(Some(DEADLINE)).unwrap() {
        Some(UpdateEvent::Aborted { errno, .. }) => assert_eq!(errno.get(), libc::ETIMEDOUT),
        other => panic!("{other:?}"),
    }
    // Too late now.
    assert_eq!(late.reach_barrier().unwrap_err().errno(), errno::EINVAL);
    let st = c.status().unwrap();
    assert_eq!((st.generation, st.listeners), (0, 1));
    assert_eq!(st.last_update.as_ref().map(|l| l.0), Some(libc::ETIMEDOUT));
    assert_eq!(st.sessions[0].files, Some(1));

    // A late answer never counts for the next update: the listener answers the first update
    // while a second one waits at the barrier (it has not read the second Prepare yet).
    let second = std::thread::spawn({
        let sock = d.sock.clone();
        move || {
            luo_client::Luod::connect(&sock)
                .unwrap()
                .update(None, None, b"", DEADLINE)
                .unwrap_err()
        }
    });
    while c.status().unwrap().phase != luo_client::wire::Phase::Barrier {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(late.reach_barrier().unwrap_err().errno(), errno::EINVAL);
    // Now it reads the second Prepare, and refuses.
    match late.next_event(Some(DEADLINE)).unwrap() {
        Some(UpdateEvent::Prepare { timeout, .. }) => assert_eq!(timeout, DEADLINE),
        other => panic!("{other:?}"),
    }
    late.refuse(luo_client::Errno::new(libc::ECANCELED))
        .unwrap();
    let e = second.join().unwrap();
    assert_eq!(e.errno().get(), libc::ECANCELED, "{e}");
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(matches!(
        late.next_event(Some(DEADLINE)).unwrap(),
        Some(UpdateEvent::Aborted { .. })
    ));

    // The listener answers from a thread this time, while another listener joins.
    let answerer = std::thread::spawn(move || {
        let mut seen = Vec::new();
        loop {
            match late.next_event(Some(DEADLINE)).unwrap() {
                Some(UpdateEvent::Prepare { .. }) => late.reach_barrier().unwrap(),
                Some(UpdateEvent::Closed) | None => return seen,
                Some(ev) => seen.push(ev),
            }
        }
    });
    let mut other = d.connect().register_for_update("vmm-b").unwrap();
    let other = std::thread::spawn(move || {
        assert!(matches!(
            other.next_event(Some(DEADLINE)).unwrap(),
            Some(UpdateEvent::Prepare { .. })
        ));
        other.reach_barrier().unwrap();
        other.next_event(Some(DEADLINE)).unwrap()
    });
    // Everyone ready: the update goes through.
    assert_eq!(c.update(None, None, b"", DEADLINE).unwrap(), 1);
    assert_eq!(answerer.join().unwrap(), [UpdateEvent::Rebooting]);
    assert_eq!(other.join().unwrap(), Some(UpdateEvent::Rebooting));
    let c = d.wait_generation(1);
    let s = c.retrieve_session("vm").unwrap();
    assert_eq!(contents(s.retrieve_fd(1).unwrap()), b"guest");
}

#[test]
fn a_refused_reboot_loses_nothing() {
    let d = Daemon::start(&[]);
    let c = d.connect();
    let s = c.create_session("vm").unwrap();
    let m = memfd(b"small");
    s.preserve_fd(&m, 1).unwrap();
    // Grow the memfd past what LUO can hand over (more than u32::MAX pages, sparse): freezing
    // it at reboot fails with EFBIG, as the kernel's memfd handler would at preserve.
    m.set_len((u64::from(u32::MAX) + 2) * 4096).unwrap();
    let o = d.luoctl(&["update"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("EFBIG")
            && e.contains("could not be frozen")
            && e.contains("1 preserved file(s)"),
        "{e}"
    );
    let st = c.status().unwrap();
    assert_eq!(st.generation, 0);
    assert_eq!(st.sessions.len(), 1);
    assert_eq!(st.sessions[0].files, Some(1));
    assert_eq!(st.last_update.as_ref().map(|l| l.0), Some(libc::EFBIG));

    // Put it right and retry: the manifest session of the failed attempt is gone, so this works.
    m.set_len(5).unwrap();
    drop(m);
    assert_eq!(c.update(None, None, b"", DEADLINE).unwrap(), 1);
    let c = d.wait_generation(1);
    let s = c.retrieve_session("vm").unwrap();
    assert_eq!(contents(s.retrieve_fd(1).unwrap()), b"small");
}

#[test]
fn luoctl_adopt_needs_hold_and_creates_nothing_without_it() {
    let d = Daemon::start(&[]);
    let o = d.luoctl(&["preserve", "vm", "1", "--adopt", "--file", "/dev/null"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--adopt needs --hold"),
        "{}",
        stderr(&o)
    );
    assert!(d.connect().status().unwrap().sessions.is_empty());
}

#[test]
fn updates_that_cannot_start_are_refused_up_front() {
    let d = Daemon::start(&["--next-image", "/nonexistent/luod"]);
    let c = d.connect();
    c.create_session("vm").unwrap();
    let e = c.update(None, None, b"", DEADLINE).unwrap_err();
    assert_eq!(e.errno().get(), libc::ENOEXEC, "{e}");
    let null = std::fs::File::open("/dev/null").unwrap();
    let e = c
        .update(Some(null.as_fd()), None, b"", DEADLINE)
        .unwrap_err();
    assert_eq!(e.errno(), errno::EINVAL, "{e}");
    assert!(e.to_string().contains("takes no kernel"), "{e}");
    let o = d.luoctl(&["update", "--initrd", "/dev/null"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // One update at a time.
    let d = Daemon::start(&[]);
    let _l = d.connect().register_for_update("slow").unwrap();
    let sock = d.sock.clone();
    let first = std::thread::spawn(move || {
        luo_client::Luod::connect(&sock)
            .unwrap()
            .update(None, None, b"", Duration::from_millis(1500))
            .unwrap_err()
            .errno()
    });
    let c = d.connect();
    while c.status().unwrap().phase != luo_client::wire::Phase::Barrier {
        std::thread::sleep(Duration::from_millis(5));
    }
    let e = c.update(None, None, b"", DEADLINE).unwrap_err();
    assert_eq!(e.errno(), errno::EBUSY, "{e}");
    assert_eq!(first.join().unwrap().get(), libc::ETIMEDOUT);
}

#[test]
fn luod_refuses_to_start_twice_or_without_a_device() {
    let d = Daemon::start(&[]);
    let o = std::process::Command::new(LUOD)
        .args(["--backend", "user", "--socket"])
        .arg(&d.sock)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("another luod is running"),
        "{}",
        stderr(&o)
    );
    let o = std::process::Command::new(LUOD)
        .args([
            "--backend",
            "kernel",
            "--device",
            "/nonexistent/liveupdate",
            "--socket",
        ])
        .arg(d.dir.join("k.sock"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("ENOENT"), "{}", stderr(&o));
    let o = std::process::Command::new(LUOD)
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = std::process::Command::new(LUOD)
        .args(["--backend", "user", "--handover-fd", "99", "--socket"])
        .arg(d.dir.join("h.sock"))
        .output()
        .unwrap();
    assert!(stderr(&o).contains("not open"), "{}", stderr(&o));
}

#[test]
fn status_table_and_json() {
    let d = Daemon::start(&[]);
    let o = d.luoctl_with_input(&["preserve", "vm7", "0x10"], b"abc", None);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = stdout(&d.luoctl(&["status"]));
    assert!(t.contains("user backend, generation 0"), "{t}");
    assert!(
        t.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
            == ["outgoing", "0", "vm7", "0/vm7", "1", "handed", "out"]),
        "{t}"
    );
    let j = stdout(&d.luoctl(&["status", "--json"]));
    assert!(j.contains("\"sessions\":[{\"direction\":\"outgoing\",\"uid\":0,\"name\":\"vm7\",\"kernel_name\":\"0/vm7\",\"files\":1,"), "{j}");
    let o = d.luoctl(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn one_uid_cannot_use_up_every_connection() {
    // No admin headroom here, so that the cap is the same for root (the usual test uid).
    let d = Daemon::start(&["--max-connections-per-uid", "3", "--admin-connections", "0"]);
    // The start-up probe's slot is given back when luod notices its close: retry until free.
    let connect = || {
        let t = Instant::now();
        loop {
            match luo_client::Luod::connect(&d.sock) {
                Ok(c) => return c,
                Err(e) if e.errno().get() == libc::EAGAIN && t.elapsed() < DEADLINE => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    let held: Vec<_> = (0..3).map(|_| connect()).collect();
    let e = luo_client::Luod::connect(&d.sock).unwrap_err();
    assert_eq!(e.errno().get(), libc::EAGAIN, "{e}");
    // A session channel counts too (user backend).
    let e = held[0].create_session("c").unwrap_err();
    assert_eq!(e.errno().get(), libc::EAGAIN, "{e}");
    assert!(
        held[0].status().unwrap().sessions.is_empty(),
        "a session the client never got is not kept"
    );
    if is_root() {
        // Another uid is not affected.
        let o = d.luoctl_with_input(&["status"], b"", Some(65534));
        assert!(o.status.success(), "{}", stderr(&o));
    }
    drop(held);
    connect();
}

#[test]
fn a_listener_killed_during_the_barrier_is_not_waited_for() {
    let d = Daemon::start(&[]);
    let c = d.connect();
    c.create_session("vm")
        .unwrap()
        .preserve_fd(memfd(b"kept"), 1)
        .unwrap();
    let mut listener = d
        .luoctl_cmd(&["listen", "--label", "doomed", "--never"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(listener.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "listening\n");
    let sock = d.sock.clone();
    let t = Instant::now();
    let update = std::thread::spawn(move || {
        luo_client::Luod::connect(&sock)
            .unwrap()
            .update(None, None, b"", DEADLINE)
    });
    line.clear();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("prepare"), "{line:?}");
    listener.kill().unwrap();
    listener.wait().unwrap();
    assert_eq!(update.join().unwrap().unwrap(), 1);
    assert!(t.elapsed() < DEADLINE / 2, "{:?}", t.elapsed());
    let c = d.wait_generation(1);
    let s = c.retrieve_session("vm").unwrap();
    assert_eq!(contents(s.retrieve_fd(1).unwrap()), b"kept");
}

#[test]
fn a_next_image_that_does_not_speak_the_handover_is_refused_and_nothing_is_lost() {
    use std::os::unix::fs::{symlink, PermissionsExt};
    // luod --backend user --next-image /bin/true: refused up front, luod and the session stay.
    let mut d = Daemon::start(&["--next-image", "/bin/true"]);
    let c = d.connect();
    c.create_session("vm")
        .unwrap()
        .preserve_fd(memfd(b"guest"), 1)
        .unwrap();
    let e = c.update(None, None, b"", DEADLINE).unwrap_err();
    assert_eq!(e.errno().get(), libc::ENOEXEC, "{e}");
    let m = e.to_string();
    assert!(
        m.contains("next image /bin/true does not speak this handover")
            && m.contains("answered \"\"")
            && m.contains("program=luod")
            && m.contains("nothing was lost"),
        "{m}"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(d.alive(), "{}", d.log());
    let st = c.status().unwrap();
    assert_eq!((st.generation, st.sessions.len()), (0, 1));
    assert_eq!(st.sessions[0].files, Some(1));
    drop((c, d));

    // The next image behind a symlink we re-point: junk, a `luo` (another program's command
    // line), then luod itself. Only the last is taken, and the session comes through whole.
    let dir = std::env::temp_dir().join(format!("luod-next-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk");
    std::fs::write(&junk, pattern(3, 4096)).unwrap();
    let luo = dir.join("luo.sh");
    std::fs::write(
        &luo,
        "#!/bin/sh\necho 'luo-handover abi=luo-v5 image=luo-user-v1 program=luo'\n",
    )
    .unwrap();
    for p in [&junk, &luo] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let link = dir.join("next");
    symlink(&junk, &link).unwrap();
    let d = Daemon::start(&["--next-image", link.to_str().unwrap()]);
    let c = d.connect();
    c.create_session("vm")
        .unwrap()
        .preserve_fd(memfd(b"guest"), 1)
        .unwrap();
    let e = c.update(None, None, b"", DEADLINE).unwrap_err();
    assert!(e.to_string().contains("Exec format error"), "{e}");
    std::fs::remove_file(&link).unwrap();
    symlink(&luo, &link).unwrap();
    let e = c.update(None, None, b"", DEADLINE).unwrap_err();
    assert!(
        e.to_string()
            .contains("answered \"luo-handover abi=luo-v5 image=luo-user-v1 program=luo\""),
        "{e}"
    );
    std::fs::remove_file(&link).unwrap();
    symlink(LUOD, &link).unwrap();
    assert_eq!(c.update(None, None, b"", DEADLINE).unwrap(), 1);
    let c = d.wait_generation(1);
    let s = c.retrieve_session("vm").unwrap();
    assert_eq!(contents(s.retrieve_fd(1).unwrap()), b"guest");
    s.finish().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn luod_answers_the_next_image_probe() {
    let o = std::process::Command::new(LUOD)
        .arg("--luo-handover-probe")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "luo-handover abi=luo-v5 image=luo-user-v1 program=luod\n"
    );
}

#[test]
fn a_broken_stderr_never_takes_luod_down() {
    // luod's stderr is a pipe nobody reads any more (a dead journal, a killed tee): every log
    // line gets EPIPE. luod must keep serving: refuse an update, run one, answer afterwards.
    let (r, w) = std::io::pipe().unwrap();
    drop(r);
    let d = Daemon::start_with(&[], Some(Stdio::from(w)));
    let c = d.connect();
    c.create_session("vm")
        .unwrap()
        .preserve_fd(memfd(b"kept"), 1)
        .unwrap();
    let mut l = d.connect().register_for_update("refuser").unwrap();
    let refuser = std::thread::spawn(move || {
        assert!(matches!(
            l.next_event(Some(DEADLINE)).unwrap(),
            Some(UpdateEvent::Prepare { .. })
        ));
        l.refuse(luo_client::Errno::new(libc::ECANCELED)).unwrap();
        l
    });
    let e = c.update(None, None, b"", DEADLINE).unwrap_err();
    assert_eq!(e.errno().get(), libc::ECANCELED, "{e}");
    drop(refuser.join().unwrap());
    assert_eq!(c.status().unwrap().phase, luo_client::wire::Phase::Idle);
    assert_eq!(c.update(None, None, b"", DEADLINE).unwrap(), 1);
    let c = d.wait_generation(1);
    let s = c.retrieve_session("vm").unwrap();
    assert_eq!(contents(s.retrieve_fd(1).unwrap()), b"kept");
    assert_eq!(c.status().unwrap().phase, luo_client::wire::Phase::Idle);
    assert!(d.connect().status().is_ok());
}

#[test]
fn help_to_a_full_disk_fails_without_a_panic() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = std::process::Command::new(LUOD)
        .arg("--help")
        .stdout(full)
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    assert_ne!(o.status.code(), Some(101), "a panic: {e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(e.contains("cannot write"), "{e}");
}

#[test]
fn an_fd_flood_in_small_messages_leaves_luod_flat_and_root_answered() {
    // Each connection starts a frame of the largest request body and sends it one byte per
    // message, each message with SCM_RIGHTS fds attached: the kernel hands luod every one of
    // them. luod must close what no opcode takes as it arrives, not collect it for the frame.
    let d = Daemon::start(&["--frame-timeout-ms", "120000"]);
    let before = d.fd_count();
    let null = std::fs::File::open("/dev/null").unwrap();
    let fds = [null.as_fd(); luo_client::sys::MAX_FDS];
    const MESSAGES: usize = 1500;
    let floods: Vec<UnixStream> = (0..3)
        .map(|_| {
            let s = d.raw();
            std::io::Write::write_all(
                &mut &s,
                &wire::header(wire::MAX_REQUEST_BODY as u32, 1, op::HELLO, 3),
            )
            .unwrap();
            for _ in 0..MESSAGES {
                // Blocks while luod's receive queue is full, so luod has read all but the last
                // few hundred messages when this loop ends.
                assert_eq!(
                    luo_client::sys::send_with_fds(s.as_fd(), b"x", &fds).unwrap(),
                    1
                );
            }
            s
        })
        .collect();
    // 18,000 fds were sent; luod holds one socket per flood and a few in flight at most.
    let during = d.fd_count();
    assert!(
        during <= before + floods.len() + 16,
        "luod went from {before} to {during} fds"
    );
    // Root is still answered, at once.
    let (st, _) = call(&d.raw(), op::HELLO, 1, b"");
    assert_eq!(st, 0);
    assert!(d.connect().status().is_ok());
    // Each flood's frame, once complete, is refused for its fds.
    for s in &floods {
        std::io::Write::write_all(&mut &*s, &vec![0u8; wire::MAX_REQUEST_BODY - MESSAGES]).unwrap();
        let f = read(s).unwrap();
        assert_eq!(f.tag, 3);
        let (errno, msg) = wire::parse_reply(&f.body).unwrap().unwrap_err();
        assert_eq!(errno, libc::EINVAL, "{msg}");
        assert!(msg.contains("fd"), "{msg}");
    }
    drop(floods);
    let t = Instant::now();
    while d.fd_count() > before + 2 && t.elapsed() < DEADLINE {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.fd_count() <= before + 2, "{} > {before}", d.fd_count());
}

#[test]
fn a_trickled_frame_is_cut_at_the_absolute_deadline() {
    // One byte every 150 ms: each read returns before luod's 200 ms poll interval, so a
    // deadline checked only on a read timeout never fires. The frame (luod's test default
    // --frame-timeout-ms 500) would take 11 s to complete.
    let d = Daemon::start(&[]);
    let s = d.raw();
    let mut frame = wire::header(64, 1, op::CREATE, 9).to_vec();
    frame.extend_from_slice(&[b'a'; 64]);
    let total = frame.len();
    let w = s.try_clone().unwrap();
    let trickler = std::thread::spawn(move || {
        let mut sent = 0;
        for b in frame {
            if std::io::Write::write_all(&mut &w, &[b]).is_err() {
                break;
            }
            sent += 1;
            std::thread::sleep(Duration::from_millis(150));
        }
        sent
    });
    let f = read(&s).unwrap_or_else(|e| panic!("no answer to the trickled frame: {e}"));
    let (errno, msg) = wire::parse_reply(&f.body).unwrap().unwrap_err();
    assert_eq!(errno, libc::ETIMEDOUT, "{msg}");
    assert!(drains_to_eof(&s));
    let sent = trickler.join().unwrap();
    assert!(sent < total, "the whole frame went through ({sent} bytes)");
    assert!(d.connect().status().is_ok());
}

#[test]
fn four_uids_with_64_connections_each_leave_root_its_status() {
    if !is_root() {
        eprintln!("SKIP: needs root to connect as four other uids");
        return;
    }
    // The defaults: 256 connections in all, 64 per uid. Four users reach both.
    let d = Daemon::start(&[]);
    let mut held = Vec::new();
    let mut refused = 0;
    for uid in 61_000..61_004u32 {
        let sock = d.sock.clone();
        let (conns, errs) = as_uid(uid, move || {
            let mut ok = Vec::new();
            let mut errs = Vec::new();
            for _ in 0..64 {
                match luo_client::Luod::connect(&sock) {
                    Ok(c) => ok.push(c),
                    Err(e) => errs.push(e),
                }
            }
            (ok, errs)
        });
        for e in &errs {
            assert_eq!(e.errno().get(), libc::EAGAIN, "uid {uid}: {e}");
        }
        refused += errs.len();
        held.extend(conns);
    }
    assert!(
        held.len() >= 200,
        "only {} connections were taken",
        held.len()
    );
    // Root (the operator) still gets in: status and an update attempt are answered.
    let c = d.connect();
    assert!(c.status().is_ok());
    let o = d.luoctl(&["status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(refused > 0 || held.len() == 256);
    drop(held);
    // Root's own clients (VMMs often run as root) may fill a per-uid share; luoctl still
    // gets in. Slots come back as luod notices the closes: retry until they have.
    let t = Instant::now();
    let mut mine = Vec::new();
    while mine.len() < 64 {
        match luo_client::Luod::connect(&d.sock) {
            Ok(c) => mine.push(c),
            Err(e) if e.errno().get() == libc::EAGAIN && t.elapsed() < DEADLINE => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    }
    let o = d.luoctl(&["status"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn preserved_files_per_uid_are_capped_with_a_clear_errno() {
    let d = Daemon::start(&["--max-files-per-uid", "3"]);
    let c = d.connect();
    let a = c.create_session("a").unwrap();
    let b = c.create_session("b").unwrap();
    a.preserve_fd(memfd(b"1"), 1).unwrap();
    a.preserve_fd(memfd(b"2"), 2).unwrap();
    b.preserve_fd(memfd(b"3"), 1).unwrap();
    // The cap counts the uid's files across its sessions.
    let e = b.preserve_fd(memfd(b"4"), 2).unwrap_err();
    assert_eq!(e.errno().get(), libc::EDQUOT, "{e}");
    assert!(
        e.to_string().contains("uid 0") && e.to_string().contains("--max-files-per-uid"),
        "{e}"
    );
    // Releasing a session gives its files back.
    drop(a);
    c.release_session(Dir::Outgoing, "a").unwrap();
    let t = Instant::now();
    loop {
        match b.preserve_fd(memfd(b"4"), 2) {
            Ok(()) => break,
            Err(e) if e.errno().get() == libc::EDQUOT && t.elapsed() < DEADLINE => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    }
    if is_root() {
        // Another uid has a cap of its own.
        let sock = d.sock.clone();
        as_uid(61_010, move || {
            let c = luo_client::Luod::connect(&sock).unwrap();
            let s = c.create_session("x").unwrap();
            for t in 0..3 {
                s.preserve_fd(memfd(b"y"), t).unwrap();
            }
            assert_eq!(
                s.preserve_fd(memfd(b"y"), 9).unwrap_err().errno().get(),
                libc::EDQUOT
            );
        });
    }
}

/// A client of luod as `uid` (root only), with one outgoing session `name` holding `data`.
fn client_as(d: &Daemon, uid: u32, name: &'static str, data: &'static [u8]) -> luo_client::Luod {
    let sock = d.sock.clone();
    as_uid(uid, move || {
        let c = luo_client::Luod::connect(&sock).unwrap();
        c.create_session(name)
            .unwrap()
            .preserve_fd(memfd(data), 1)
            .unwrap();
        c
    })
}

/// Collects a listener's events until luod closes the connection, answering each Prepare
/// with `answer` (None: never).
fn run_listener(
    mut l: luo_client::UpdateListener,
    answer: Option<i32>,
) -> std::thread::JoinHandle<Vec<UpdateEvent>> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        loop {
            match l.next_event(Some(DEADLINE)).unwrap() {
                Some(UpdateEvent::Closed) | None => return seen,
                Some(ev) => {
                    if let (UpdateEvent::Prepare { .. }, Some(e)) = (&ev, answer) {
                        let _ = l.refuse(luo_client::Errno::new(e));
                    }
                    seen.push(ev);
                }
            }
        }
    })
}

#[test]
fn an_unprivileged_listener_cannot_hold_back_roots_update() {
    if !is_root() {
        eprintln!("SKIP: needs root to run listeners as other uids");
        return;
    }
    let d = Daemon::start(&[]);
    let c = d.connect();
    c.create_session("rootvm")
        .unwrap()
        .preserve_fd(memfd(b"root's guest"), 1)
        .unwrap();
    // A uid without a session has nothing to protect: it may not register.
    let sock = d.sock.clone();
    let e = as_uid(61_040, move || {
        luo_client::Luod::connect(&sock)
            .unwrap()
            .register_for_update("stall")
            .map(|_| ())
            .unwrap_err()
    });
    assert_eq!(e.errno().get(), libc::EPERM, "{e}");
    // Two users with a session each: one refuses every update, one never answers.
    let refuser = client_as(&d, 61_041, "vm1", b"one")
        .register_for_update("vm1")
        .unwrap();
    let silent = client_as(&d, 61_042, "vm2", b"two")
        .register_for_update("vmm")
        .unwrap();
    let refuser = run_listener(refuser, Some(libc::ECANCELED));
    let silent = run_listener(silent, None);

    let o = d.luoctl(&["update", "--barrier-timeout-ms", "500"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("ECANCELED") && e.contains("uid 61041") && e.contains("\"61041/vm1\""),
        "{e}"
    );
    assert!(
        e.contains("--force") && e.contains("nothing was lost"),
        "{e}"
    );

    // Root overrides: both listeners' sessions are dropped, root's goes through.
    let o = d.luoctl(&["update", "--force", "--barrier-timeout-ms", "500"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{}\n{out}\n{}", stderr(&o), d.log());
    assert!(
        out.contains("\"61041/vm1\"") && out.contains("\"61042/vm2\"") && out.contains("lost"),
        "{out}"
    );
    let c = d.wait_generation(1);
    let s = c.retrieve_session("rootvm").unwrap();
    assert_eq!(contents(s.retrieve_fd(1).unwrap()), b"root's guest");
    let st = c.status().unwrap();
    assert!(
        st.sessions.iter().all(|x| x.uid == 0),
        "dropped sessions were carried: {:?}",
        st.sessions
    );
    // Each dropped listener was told why.
    for (events, what) in [
        (refuser.join().unwrap(), "vm1"),
        (silent.join().unwrap(), "vm2"),
    ] {
        assert!(
            events
                .iter()
                .any(|ev| matches!(ev, UpdateEvent::Aborted { message, .. }
                if message.contains("forced") && message.contains(what))),
            "{events:?}"
        );
    }
}

#[test]
fn an_unfreezable_file_is_named_and_root_can_force_or_release_it() {
    if !is_root() {
        eprintln!("SKIP: needs root to run a client as another uid");
        return;
    }
    let d = Daemon::start(&[]);
    let c = d.connect();
    c.create_session("rootvm")
        .unwrap()
        .preserve_fd(memfd(b"root's guest"), 1)
        .unwrap();
    let m = memfd(b"small");
    let sock = d.sock.clone();
    let m2 = m.try_clone().unwrap();
    let user = as_uid(61_043, move || {
        let c = luo_client::Luod::connect(&sock).unwrap();
        c.create_session("big")
            .unwrap()
            .preserve_fd(&m2, 1)
            .unwrap();
        c
    });
    // The user grows its file past what LUO can hand over: every update fails at the freeze.
    m.set_len((u64::from(u32::MAX) + 2) * 4096).unwrap();
    let o = d.luoctl(&["update"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("EFBIG")
            && e.contains("\"61043/big\"")
            && e.contains("uid 61043")
            && e.contains("token 1"),
        "{e}"
    );
    // Root forces it: the culprit's session is dropped, the rest goes through.
    let o = d.luoctl(&["update", "--force"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{}\n{}", stderr(&o), d.log());
    assert!(
        out.contains("\"61043/big\"") && out.contains("lost"),
        "{out}"
    );
    let c = d.wait_generation(1);
    assert_eq!(
        contents(
            c.retrieve_session("rootvm")
                .unwrap()
                .retrieve_fd(1)
                .unwrap()
        ),
        b"root's guest"
    );
    drop(user);
    // In the next generation the same user does it again; root releases that session alone.
    let sock = d.sock.clone();
    let m2 = m.try_clone().unwrap();
    m.set_len(5).unwrap();
    let user = as_uid(61_043, move || {
        let c = luo_client::Luod::connect(&sock).unwrap();
        c.create_session("big")
            .unwrap()
            .preserve_fd(&m2, 1)
            .unwrap();
        c
    });
    m.set_len((u64::from(u32::MAX) + 2) * 4096).unwrap();
    let o = d.luoctl_with_input(&["release", "big", "--uid", "61043"], b"", Some(61_043));
    assert!(
        !o.status.success(),
        "only root may release another uid's session"
    );
    assert!(stderr(&o).contains("EPERM"), "{}", stderr(&o));
    let o = d.luoctl(&["release", "big", "--uid", "61043"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let st = c.status().unwrap();
    assert!(
        !st.sessions.iter().any(|x| x.uid == 61_043),
        "{:?}",
        st.sessions
    );
    drop(user);
    let o = d.luoctl(&["update"]);
    assert!(o.status.success(), "{}\n{}", stderr(&o), d.log());
    d.wait_generation(2);
}

#[test]
fn a_killed_or_stopped_luod_gets_its_sessions_back_from_the_fd_store() {
    let store = FdStore::new();
    let mut d = Daemon::start_full(&[], None, &[("NOTIFY_SOCKET", store.path.as_os_str())]);
    store.wait("no READY=1", |s| s.ready >= 1);
    let ram = pattern(8, 1 << 20);
    {
        let c = d.connect();
        let s = c.create_session("vm").unwrap();
        s.preserve_fd(memfd(&ram), 1).unwrap();
        s.preserve_fd(memfd(b"device"), 2).unwrap();
        c.create_session("other:1")
            .unwrap()
            .preserve_fd(memfd(b"other"), 5)
            .unwrap();
        // A released session leaves the store with luod's copy.
        c.create_session("gone")
            .unwrap()
            .preserve_fd(memfd(b"x"), 1)
            .unwrap();
        c.release_session(Dir::Outgoing, "gone").unwrap();
    }
    store.wait("the three files are not stored", |s| {
        FdStore::files(s).len() == 3 && !FdStore::files(s).iter().any(|n| n.contains("gone"))
    });
    assert!(store.names().contains(&"luod-g.0".to_string()));

    // kill -9: luod cannot do anything; the store has it all.
    d.restart_with_fds(&store.path, store.copies());
    let c = d.connect();
    let st = c.status().unwrap();
    let mut got: Vec<_> = st
        .sessions
        .iter()
        .map(|x| (x.dir, x.name.clone(), x.files))
        .collect();
    got.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        got,
        [
            (Dir::Outgoing, "other:1".to_string(), Some(1)),
            (Dir::Outgoing, "vm".to_string(), Some(2)),
        ],
        "{}",
        d.log()
    );
    // The restored luod did not store them (or its generation) a second time.
    assert_eq!(store.names().len(), 4, "{:?}", store.names());
    // Its client reconnects to the same session.
    let s = c.open_session("vm").unwrap();
    s.preserve_fd(memfd(b"after"), 3).unwrap();
    drop((s, c));
    store.wait("the new file is not stored", |s| {
        FdStore::files(s).len() == 4
    });

    // SIGTERM: a clean stop that says what it kept.
    // SAFETY: kill with a valid signal number signals our own child; it touches no memory.
    let r = unsafe { libc::kill(d.pid() as i32, libc::SIGTERM) };
    assert_eq!(r, 0, "kill");
    let t = Instant::now();
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < DEADLINE, "luod ignored SIGTERM\n{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}\n{}", d.log());
    store.wait("no STOPPING=1", |s| s.stopping >= 1);
    let log = d.log();
    assert!(
        log.contains("stopping on SIGTERM: kept in systemd's fd store: outgoing \"0/other:1\", outgoing \"0/vm\"; lost with luod: none"),
        "{log}"
    );

    // And back once more, this time with the listening socket from systemd too (luod.socket):
    // luod takes it instead of binding (binding would fail: the path answers, as if another
    // luod ran). Then through an update: they are whole LUO sessions.
    let _ = std::fs::remove_file(&d.sock);
    let activation = std::os::unix::net::UnixListener::bind(&d.sock).unwrap();
    let mut fds = store.copies();
    fds.push(("luod.socket".into(), activation.into()));
    d.restart_with_fds(&store.path, fds);
    assert!(
        d.log().contains("2 from systemd's fd store, 5 fd(s)"),
        "{}",
        d.log()
    );
    let c = d.connect();
    assert_eq!(c.update(None, None, b"", DEADLINE).unwrap(), 1);
    let c = d.wait_generation(1);
    let s = c.retrieve_session("vm").unwrap();
    assert_eq!(contents(s.retrieve_fd(1).unwrap()), ram);
    assert_eq!(contents(s.retrieve_fd(2).unwrap()), b"device");
    assert_eq!(contents(s.retrieve_fd(3).unwrap()), b"after");
    let s = c.retrieve_session("other:1").unwrap();
    assert_eq!(contents(s.retrieve_fd(5).unwrap()), b"other");
    // Carried by the handover now, so the files left the store; the generation went on.
    store.wait("files still stored after the update", |s| {
        s.fds.len() == 1 && s.fds[0].0 == "luod-g.1"
    });
    // A kill -9 now keeps the count (incoming sessions of the user backend live in luod's
    // memory only: they are gone, as docs/luod.md says).
    d.restart_at(&store.path, store.copies(), 1);
    assert!(d.connect().status().unwrap().sessions.is_empty());
}

#[test]
fn adopt_takes_only_a_session_fd_of_the_callers_own() {
    // The user backend has no session fds to hand back.
    let d = Daemon::start(&[]);
    let s = d.raw();
    let m = memfd(b"x");
    wire::write_frame(&s, op::ADOPT, 1, b"\x00vm", &[m.as_fd()]).unwrap();
    let f = read(&s).unwrap();
    let (errno, msg) = wire::parse_reply(&f.body).unwrap().unwrap_err();
    assert_eq!(errno, libc::EOPNOTSUPP, "{msg}");
    drop((s, d));

    // The kernel backend checks the fd with GET_NAME: a file that is not a LUO session is
    // refused (here the "device" is /dev/null, so luod runs without a LUO kernel).
    let d = Daemon::start(&["--backend", "kernel", "--device", "/dev/null"]);
    let s = d.raw();
    let null = std::fs::File::open("/dev/null").unwrap();
    wire::write_frame(&s, op::ADOPT, 2, b"\x00vm", &[null.as_fd()]).unwrap();
    let f = read(&s).unwrap();
    let (errno, msg) = wire::parse_reply(&f.body).unwrap().unwrap_err();
    assert_eq!(errno, libc::EINVAL, "{msg}");
    assert!(msg.contains("not a LUO session"), "{msg}");
    // Exactly one fd, a direction and a valid name.
    assert_eq!(call(&s, op::ADOPT, 3, b"\x00vm").0, libc::EINVAL);
    wire::write_frame(&s, op::ADOPT, 4, b"\x00vm", &[null.as_fd(), null.as_fd()]).unwrap();
    assert_eq!(
        wire::parse_reply(&read(&s).unwrap().body)
            .unwrap()
            .unwrap_err()
            .0,
        libc::EINVAL
    );
    wire::write_frame(&s, op::ADOPT, 5, b"\x07vm", &[null.as_fd()]).unwrap();
    assert_eq!(
        wire::parse_reply(&read(&s).unwrap().body)
            .unwrap()
            .unwrap_err()
            .0,
        libc::EBADMSG
    );
    wire::write_frame(&s, op::ADOPT, 6, b"\x00a/b", &[null.as_fd()]).unwrap();
    assert_eq!(
        wire::parse_reply(&read(&s).unwrap().body)
            .unwrap()
            .unwrap_err()
            .0,
        libc::EINVAL
    );
    assert!(d.connect().status().unwrap().sessions.is_empty());
}

#[test]
fn fd_store_entries_that_do_not_check_out_are_dropped_from_the_store() {
    // Kernel backend (the "device" is /dev/null: no LUO kernel here): a stored "session" that
    // is not a LUO session, a file entry (user backend's), and a name luod never made.
    let store = FdStore::new();
    let mut d = Daemon::start(&["--backend", "kernel", "--device", "/dev/null"]);
    let null = || -> OwnedFd { std::fs::File::open("/dev/null").unwrap().into() };
    d.restart_with_fds(
        &store.path,
        vec![
            ("luod-s.o.0.vm".into(), null()),
            ("luod-f.0.0000000000000001.vm".into(), null()),
            ("garbage".into(), null()),
        ],
    );
    store.wait("READY=1", |s| s.ready >= 1);
    assert!(d.connect().status().unwrap().sessions.is_empty());
    let log = d.log();
    assert!(
        log.contains("\"luod-s.o.0.vm\": not a LUO session"),
        "{log}"
    );
    assert!(log.contains("not for the kernel backend"), "{log}");
    assert!(
        log.contains("\"garbage\" from systemd is not luod's"),
        "{log}"
    );

    // User backend: a stored file that LUO's memfd handler does not take (not a memfd), and a
    // kernel session entry; a good memfd next to them comes back.
    let mut d = Daemon::start(&[]);
    let ok = memfd(b"good");
    // A store of its own, so that its removals are counted apart.
    let store = FdStore::new();
    d.restart_with_fds(
        &store.path,
        vec![
            ("luod-f.0.0000000000000001.bad".into(), null()),
            ("luod-s.i.0.vm".into(), null()),
            ("luod-f.0.0000000000000002.good".into(), ok.into()),
        ],
    );
    store.wait("READY=1", |s| s.ready >= 1);
    let c = d.connect();
    let st = c.status().unwrap();
    assert_eq!(st.sessions.len(), 1, "{:?}\n{}", st.sessions, d.log());
    assert_eq!(
        (st.sessions[0].name.as_str(), st.sessions[0].files),
        ("good", Some(1))
    );
    assert!(
        d.log().contains("cannot preserve it in \"0/bad\" again"),
        "{}",
        d.log()
    );
    assert!(d.log().contains("not for the user backend"), "{}", d.log());
    store.wait("the two bad entries are not removed", |s| {
        let mut r = s.removed.clone();
        r.sort();
        r == ["luod-f.0.0000000000000001.bad", "luod-s.i.0.vm"]
    });
    // No session "bad" was left behind empty.
    assert!(c.open_session("bad").is_err());
}
