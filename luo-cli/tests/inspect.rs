//! `luo inspect` on valid, truncated, corrupted and random images: a valid image decodes; a
//! malformed one gives exit status 2 and one line naming the offset and the rule; nothing
//! panics or hangs.

mod common;

use std::time::{Duration, Instant};

use common::{get, put, run, run_with_limit, tempdir, valid_image, write, Rng};
use luo_cli::inspect::{inspect_bytes, InspectError, Report};

const PAGE: u64 = 4096;

fn report(bytes: &[u8]) -> Report {
    inspect_bytes(bytes.to_vec()).expect("valid image")
}

/// The message of a malformed image; fails the test for anything else.
fn malformed(bytes: Vec<u8>) -> String {
    match inspect_bytes(bytes) {
        Err(InspectError::Malformed(m)) => m,
        Err(e) => panic!("expected a malformed-image error, got {e:?}"),
        Ok(r) => panic!(
            "expected a malformed-image error, got a valid image:\n{}",
            r.text()
        ),
    }
}

#[test]
fn valid_image_decodes() {
    let img = valid_image();
    let r = report(&img);
    let root = r.root.as_ref().expect("root");
    assert_eq!(root.compatible, b"luo-v5");
    assert_eq!(root.liveupdate_num, 1);
    assert_eq!(r.sessions.len(), 2);
    assert_eq!(r.sessions[0].name, b"vm-1");
    assert_eq!(r.sessions[1].name, b"vm-2 \"quoted\"");
    let ram = &r.sessions[0].files[0];
    assert_eq!(ram.token, 1);
    assert_eq!(ram.compatible, b"memfd-user-v1");
    let m = ram.memfd.expect("memfd data decoded");
    assert_eq!((m.size, m.pos), (64 << 10, 100));
    assert_eq!(m.seals, libc::F_SEAL_GROW as u32);
    assert!(m.fd > 2);
    assert_eq!(r.sessions[1].files[0].token, u64::MAX);
    let t = &r.sessions[1].files[1];
    assert_eq!(t.compatible, b"test-handler-v1");
    assert!(t.memfd.is_none());
    let flbs = r.flbs.as_ref().expect("flb page");
    assert_eq!(flbs.len(), 1);
    assert_eq!(flbs[0].name, b"test-flb-v1");
    assert_eq!(flbs[0].data, luo_handlers::testing::TEST_FLB_DATA + 3);
    assert_eq!(flbs[0].count, 1);

    let text = r.text();
    assert!(text.contains("session \"vm-2 \\\"quoted\\\"\""), "{text}");
    assert!(text.contains("file token 0xffffffffffffffff"), "{text}");
    assert!(
        text.contains("flb \"test-flb-v1\": data 0xfeedf00dcafebee3, count 1"),
        "{text}"
    );
    let json = r.json();
    assert!(json.contains(r#""name":"vm-2 \"quoted\"""#), "{json}");
    assert!(json.contains(r#""flbs":[{"name":"test-flb-v1""#), "{json}");
    assert!(json.contains(&format!(r#""token":{}"#, u64::MAX)), "{json}");

    // And through the binary.
    let dir = tempdir("valid");
    let p = write(&dir, "ok.img", &img);
    let out = run(&["inspect", p.to_str().expect("path")]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, text);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cold_boot_image_has_no_root() {
    let lu = backend_user::LiveUpdate::new().expect("luo");
    let mut img = lu.memory().to_bytes();
    // A header without a root: what a process with LUO disabled would hand over.
    put(&mut img, 16, 0);
    put(&mut img, 24, 0);
    let r = report(&img);
    assert!(r.root.is_none());
    assert!(r.text().contains("no LUO root"));
    assert!(r.json().contains(r#""root":null"#));
}

/// Each corruption: what to change, and what the message must say.
fn corruptions(img: &[u8]) -> Vec<(&'static str, Vec<u8>, String)> {
    let r = report(img);
    let root = r.root.clone().expect("root");
    let s0 = &r.sessions[0];
    let s1 = &r.sessions[1];
    let sblock = root.sessions_pa;
    let fblock0 = s0.files[0].at - 16;
    let fblock1 = s1.files[0].at - 16;
    let ram_data = s0.files[0].data;
    let len = img.len() as u64;
    let mut v: Vec<(&'static str, Vec<u8>, String)> = Vec::new();
    let mut add = |name: &'static str, f: &dyn Fn(&mut Vec<u8>), needle: String| {
        let mut b = img.to_vec();
        f(&mut b);
        v.push((name, b, needle));
    };
    add(
        "truncated mid-page",
        &|b| b.truncate(b.len() - 100),
        "at 0x0: handover file size".into(),
    );
    add(
        "truncated by a page",
        &|b| b.truncate(b.len() - 4096),
        "at 0x20: header claims".into(),
    );
    add(
        "truncated to nothing",
        &|b| b.clear(),
        "at 0x0: handover file size 0".into(),
    );
    add("magic", &|b| b[0] ^= 1, "at 0x0: magic".into());
    add("page size", &|b| b[8] ^= 1, "at 0x8: page size".into());
    add(
        "root size",
        &|b| put(b, 24, 8),
        "at 0x18: LUO root blob is 8 bytes".into(),
    );
    add(
        "root address",
        &|b| put(b, 16, 0x1234),
        "at 0x1234: ".into(),
    );
    add(
        "root past the end",
        &|b| put(b, 16, len),
        format!("at {len:#x}: address"),
    );
    add(
        "root compat",
        &|b| b[root.at as usize] ^= 0x20,
        format!("at {:#x}: luo_ser.compatible is not \"luo-v5\"", root.at),
    );
    add(
        "root compat unterminated",
        &|b| b[root.at as usize + 6] = b'x',
        format!("at {:#x}: luo_ser.compatible", root.at),
    );
    add(
        "sessions_pa unaligned",
        &|b| put(b, root.at + 16, sblock + 8),
        format!("at {:#x}: address", sblock + 8),
    );
    add(
        "sessions_pa past the end",
        &|b| put(b, root.at + 16, len + PAGE),
        format!("at {:#x}: address", len + PAGE),
    );
    add(
        "sessions_pa at the root",
        &|b| put(b, root.at + 16, root.at),
        format!("at {:#x}: block chain has a cycle", root.at),
    );
    add(
        "session block count 0",
        &|b| put(b, sblock + 8, 0),
        format!("at {sblock:#x}: block contains invalid entry count 0"),
    );
    add(
        "session block count 52",
        &|b| put(b, sblock + 8, 52),
        format!("at {sblock:#x}: block contains invalid entry count 52"),
    );
    add(
        "session block count 3",
        &|b| put(b, sblock + 8, 3),
        "session name is empty".into(),
    );
    add(
        "session next to itself",
        &|b| put(b, sblock, sblock),
        format!("at {sblock:#x}: block chain has a cycle"),
    );
    add(
        "session next unaligned",
        &|b| put(b, sblock, 0x10),
        "at 0x10: address".into(),
    );
    add(
        "session next past the end",
        &|b| put(b, sblock, 1 << 40),
        format!("at {:#x}: address", 1u64 << 40),
    );
    add(
        "session name empty",
        &|b| b[s0.at as usize] = 0,
        format!("at {:#x}: session name is empty", s0.at),
    );
    add(
        "session name unterminated",
        &|b| b[s0.at as usize..s0.at as usize + 64].fill(b'n'),
        format!("at {:#x}: session name", s0.at),
    );
    add(
        "duplicate session name",
        &|b| {
            let (a, c) = (s0.at as usize, s1.at as usize);
            let name: Vec<u8> = b[a..a + 64].to_vec();
            b[c..c + 64].copy_from_slice(&name);
        },
        format!("at {:#x}: duplicate session name", s1.at),
    );
    add(
        "file count high",
        &|b| put(b, s0.at + 72, 2),
        format!(
            "at {:#x}: session claims 2 files but its chain holds 1",
            s0.at
        ),
    );
    add(
        "file count zero",
        &|b| put(b, s0.at + 72, 0),
        format!("at {:#x}: session claims 0 files", s0.at),
    );
    add(
        "file chain missing",
        &|b| put(b, s0.at + 64, 0),
        format!(
            "at {:#x}: session claims 1 files but its chain holds 0",
            s0.at
        ),
    );
    add(
        "file chain shared",
        &|b| put(b, s1.at + 64, fblock0),
        format!("at {fblock0:#x}: block chain has a cycle"),
    );
    add(
        "file chain into sessions",
        &|b| put(b, s0.at + 64, sblock),
        format!("at {sblock:#x}: block chain has a cycle"),
    );
    add(
        "file block count 64",
        &|b| put(b, fblock0 + 8, 64),
        format!("at {fblock0:#x}: block contains invalid entry count 64"),
    );
    add(
        "file next to itself",
        &|b| put(b, fblock1, fblock1),
        format!("at {fblock1:#x}: block chain has a cycle"),
    );
    add(
        "file next to the root",
        &|b| put(b, fblock1, root.at),
        format!("at {:#x}: block chain has a cycle", root.at),
    );
    add(
        "file compat unterminated",
        &|b| b[s0.files[0].at as usize..s0.files[0].at as usize + 48].fill(b'c'),
        format!("at {:#x}: compatible string", s0.files[0].at),
    );
    add(
        "file compat empty",
        &|b| b[s0.files[0].at as usize] = 0,
        format!("at {:#x}: compatible string", s0.files[0].at),
    );
    add(
        "duplicate token",
        &|b| put(b, s1.files[1].at + 56, u64::MAX),
        format!(
            "at {:#x}: duplicate file token 0xffffffffffffffff",
            s1.files[1].at
        ),
    );
    add(
        "memfd data unaligned tail",
        &|b| put(b, s0.files[0].at + 48, ram_data + 4090),
        format!("at {:#x}: memfd-user-v1 data", s0.files[0].at + 48),
    );
    add(
        "memfd data past the end",
        &|b| put(b, s0.files[0].at + 48, len + 8),
        format!("at {:#x}: memfd-user-v1 data", s0.files[0].at + 48),
    );
    add(
        "memfd data into the file block",
        &|b| put(b, s0.files[0].at + 48, fblock0),
        format!("at {:#x}: memfd-user-v1 data", s0.files[0].at + 48),
    );
    add(
        "memfd data shared",
        &|b| put(b, s1.files[0].at + 48, ram_data),
        format!(
            "at {:#x}: memfd-user-v1 data {ram_data:#x} is also",
            s1.files[0].at + 48
        ),
    );
    add(
        "memfd seals",
        &|b| b[ram_data as usize + 16] |= 0x40,
        format!("at {:#x}: memfd seals", ram_data + 16),
    );
    add(
        "memfd fd",
        &|b| put(b, ram_data + 48, u64::MAX),
        format!("at {:#x}: memfd-user-v1 fd -1", ram_data + 48),
    );
    add(
        "memfd fd shared",
        &|b| {
            let fd = get(b, ram_data + 48);
            put(b, s1.files[0].data + 48, fd);
        },
        "memfd-user-v1 fd".into(),
    );
    add(
        "flb pgcnt",
        &|b| put(b, root.flbs_pa, 2),
        format!("at {:#x}: FLB header", root.flbs_pa),
    );
    add(
        "flb count",
        &|b| put(b, root.flbs_pa + 8, 64),
        format!("at {:#x}: FLB header", root.flbs_pa),
    );
    add(
        "flb name unterminated",
        &|b| b[root.flbs_pa as usize + 16..root.flbs_pa as usize + 64].fill(b'f'),
        format!("at {:#x}: compatible string", root.flbs_pa + 16),
    );
    add(
        "flbs_pa unaligned",
        &|b| put(b, root.at + 24, root.flbs_pa + 1),
        format!("at {:#x}: address", root.flbs_pa + 1),
    );
    add(
        "flbs_pa on the session block",
        &|b| put(b, root.at + 24, sblock),
        format!("at {sblock:#x}: block chain has a cycle"),
    );
    v
}

#[test]
fn corrupted_images_name_offset_and_rule() {
    let img = valid_image();
    for (name, bytes, needle) in corruptions(&img) {
        let m = malformed(bytes);
        assert!(m.contains(&needle), "{name}: {needle:?} not in {m:?}");
        assert!(m.starts_with("at 0x"), "{name}: no offset first in {m:?}");
        assert!(!m.contains('\n'), "{name}: {m:?}");
    }
}

#[test]
fn corrupted_images_exit_2_with_one_line() {
    let img = valid_image();
    let dir = tempdir("corrupt");
    for (i, (name, bytes, needle)) in corruptions(&img).into_iter().enumerate() {
        let p = write(&dir, &format!("c{i}.img"), &bytes);
        let r = run_with_limit(
            &["inspect", p.to_str().expect("path")],
            Duration::from_secs(20),
        );
        assert_eq!(r.code, 2, "{name}: stdout {} stderr {}", r.stdout, r.stderr);
        assert!(r.stdout.is_empty(), "{name}: {}", r.stdout);
        assert_eq!(r.stderr.lines().count(), 1, "{name}: {}", r.stderr);
        assert!(
            r.stderr.contains(&needle),
            "{name}: {needle:?} not in {}",
            r.stderr
        );
        let json = run_with_limit(
            &["inspect", "--json", p.to_str().expect("path")],
            Duration::from_secs(20),
        );
        assert_eq!(json.code, 2, "{name} --json");
        assert_eq!(json.stderr, r.stderr, "{name} --json");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn io_errors_exit_1() {
    let r = run(&["inspect", "/nonexistent/handover.img"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("cannot open"));
    let r = run(&["inspect", "/"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("not a regular file"), "{}", r.stderr);
    let r = run(&["inspect"]);
    assert_eq!(r.code, 2);
    let r = run(&["inspect", "a", "b"]);
    assert_eq!(r.code, 2);
    let r = run(&["inspect", "--yaml", "a"]);
    assert_eq!(r.code, 2);
}

#[test]
fn huge_file_is_refused_before_reading() {
    let dir = tempdir("huge");
    let p = dir.join("sparse.img");
    let f = std::fs::File::create(&p).expect("create");
    // Sparse: nothing is written, and inspect must not try to read 5 GiB.
    f.set_len(5 << 30).expect("set_len");
    let start = Instant::now();
    let r = run_with_limit(
        &["inspect", p.to_str().expect("path")],
        Duration::from_secs(20),
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("at 0x0: handover file size 5368709120"),
        "{}",
        r.stderr
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

fn header(pages: u64, root: u64) -> Vec<u8> {
    let mut b = vec![0u8; (pages * PAGE) as usize];
    b[..8].copy_from_slice(b"LUOUSER1");
    b[8..12].copy_from_slice(&4096u32.to_ne_bytes());
    put(&mut b, 16, root);
    put(&mut b, 24, 32);
    put(&mut b, 32, pages);
    b
}

/// The result of inspecting arbitrary bytes must be a value, never a panic; errors name an
/// offset.
fn check_arbitrary(bytes: Vec<u8>) {
    match inspect_bytes(bytes) {
        Ok(r) => {
            // Whatever decoded must render.
            let _ = r.text();
            let _ = r.json();
        }
        Err(InspectError::Malformed(m)) => {
            assert!(m.starts_with("at 0x"), "no offset in {m:?}");
            assert!(!m.contains('\n'));
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

#[test]
fn random_input_never_panics() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _ in 0..300 {
        // Random bytes of random sizes.
        let len = rng.below(5 * PAGE);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        check_arbitrary(bytes);
        // A valid header over random pages, the root somewhere in them.
        let pages = 2 + rng.below(6);
        let mut b = header(pages, PAGE * (1 + rng.below(pages - 1)));
        for x in b[PAGE as usize..].iter_mut() {
            *x = rng.next() as u8;
        }
        check_arbitrary(b.clone());
        // Mostly zero pages with a valid root and random small words: chains that go places.
        let mut b = header(pages, PAGE);
        b[PAGE as usize..PAGE as usize + 6].copy_from_slice(b"luo-v5");
        for _ in 0..16 {
            let at = PAGE + rng.below((pages - 1) * PAGE - 8) / 8 * 8;
            let v = match rng.below(3) {
                0 => rng.below(pages + 1) * PAGE,
                1 => rng.below(70),
                _ => rng.next(),
            };
            put(&mut b, at, v);
        }
        check_arbitrary(b);
    }
}

#[test]
fn mutated_valid_images_never_panic() {
    let img = valid_image();
    let mut rng = Rng(0xfeed_beef_0bad_cafe);
    let mut errors = 0;
    for i in 0..3000 {
        let mut b = img.clone();
        let flips = 1 + rng.below(4);
        for _ in 0..flips {
            // The first 160 bytes of a page (headers, first entries, handler data: where the
            // image has content), sometimes anywhere.
            let pages = b.len() as u64 / PAGE;
            let at = if rng.below(10) == 0 {
                rng.below(b.len() as u64)
            } else {
                rng.below(pages) * PAGE + rng.below(160)
            } as usize;
            match i % 3 {
                0 => b[at] ^= 1 << rng.below(8),
                1 => b[at] = rng.next() as u8,
                _ => {
                    let at = (at as u64 & !7).min(b.len() as u64 - 8);
                    put(
                        &mut b,
                        at,
                        [0, 1, PAGE, PAGE * 3, u64::MAX, rng.below(100)][rng.below(6) as usize],
                    );
                }
            }
        }
        if inspect_bytes(b.clone()).is_err() {
            errors += 1;
        }
        check_arbitrary(b);
    }
    // Not every mutation is detectable (a name or a token can change to another valid one),
    // but many must be caught.
    assert!(errors > 500, "only {errors} of 3000 mutations were refused");
}

#[test]
fn random_files_exit_2_through_the_binary() {
    let dir = tempdir("random");
    let mut rng = Rng(42);
    for i in 0..12 {
        let bytes: Vec<u8> = if i % 2 == 0 {
            (0..rng.below(3 * PAGE)).map(|_| rng.next() as u8).collect()
        } else {
            let mut b = header(4, PAGE);
            for x in b[PAGE as usize..].iter_mut() {
                *x = rng.next() as u8;
            }
            b
        };
        let p = write(&dir, &format!("r{i}.img"), &bytes);
        let r = run_with_limit(
            &["inspect", p.to_str().expect("path")],
            Duration::from_secs(20),
        );
        assert_eq!(r.code, 2, "stdout {} stderr {}", r.stdout, r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(r.stderr.contains(": at 0x"), "{}", r.stderr);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fifo_is_refused_without_hanging() {
    let dir = tempdir("fifo");
    let fifo = dir.join("fifo");
    let ok = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(ok.success());
    let r = run_with_limit(
        &["inspect", fifo.to_str().expect("path")],
        Duration::from_secs(30),
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("is a FIFO, not a regular file"),
        "{}",
        r.stderr
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `luo inspect args...` with its address space limited to 1 GiB: an inspect that tried
/// to read a 2 GiB file whole could not allocate the buffer.
fn inspect_in_1g(args: &[&str]) -> common::Run {
    let mut sh = vec!["-c", "ulimit -v 1048576 && exec \"$0\" inspect \"$@\""];
    sh.push(env!("CARGO_BIN_EXE_luo"));
    sh.extend_from_slice(args);
    let o = std::process::Command::new("/bin/sh")
        .args(&sh)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("sh");
    common::Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

#[test]
fn a_large_file_is_judged_by_its_header_before_it_is_read() {
    let dir = tempdir("large");
    // 2 GiB, sparse, a whole number of pages (so its size alone is acceptable), wrong magic.
    let p = dir.join("wrong-magic.img");
    let f = std::fs::File::create(&p).expect("create");
    f.set_len(2 << 30).expect("set_len");
    std::os::unix::fs::FileExt::write_all_at(&f, b"NOTLUO!!", 0).expect("write");
    let r = inspect_in_1g(&[p.to_str().expect("path")]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("at 0x0: magic is not \"LUOUSER1\""),
        "{}",
        r.stderr
    );

    // The right header, but more than inspect reads by default: refused, and --max-size says
    // how to raise the cap.
    let p = dir.join("large.img");
    let f = std::fs::File::create(&p).expect("create");
    f.set_len(2 << 30).expect("set_len");
    let mut h = header(1, 0);
    put(&mut h, 32, (2u64 << 30) / PAGE);
    std::os::unix::fs::FileExt::write_all_at(&f, &h, 0).expect("write");
    let r = inspect_in_1g(&[p.to_str().expect("path")]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("2 GiB") && r.stderr.contains("--max-size"),
        "{}",
        r.stderr
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn max_size_caps_what_inspect_reads() {
    let dir = tempdir("max-size");
    let img = valid_image();
    let p = write(&dir, "h.img", &img);
    let p = p.to_str().expect("path");
    let r = run(&["inspect", "--max-size", "4K", p]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("more than the 4 KiB cap")
            && r.stderr.contains(&format!("--max-size {}", img.len())),
        "{}",
        r.stderr
    );
    let r = run(&["inspect", &format!("--max-size={}", img.len()), p]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run(&["inspect", p, "--max-size", "lots"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = run(&["inspect", p, "--max-size"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}
