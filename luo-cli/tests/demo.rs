//! `luo demo` end to end, as a child process: preserve, exec, retrieve, verify, timeline.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{run, tempdir};

fn assert_timeline(stdout: &str) {
    for step in [
        "  preserve ",
        "  freeze+serialize ",
        "  exec ",
        "  restore (boot) ",
        "  retrieve ",
        "  resume ",
        "  verify ",
        "  finish ",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(step)),
            "no timeline line for {step:?} in:\n{stdout}"
        );
    }
    assert!(
        stdout.lines().any(|l| l.starts_with("blackout: ")),
        "no blackout line in:\n{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("verification: OK")),
        "no verification line in:\n{stdout}"
    );
}

#[test]
fn demo_live_updates_and_verifies() {
    let r = run(&["demo", "--ram", "8M", "--run-ms", "100"]);
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert_timeline(&r.stdout);
    assert!(r.stdout.contains("2048 pages (8 MiB)"), "{}", r.stdout);
    // Progress went to stderr; the old and the new image were the same process.
    assert!(r.stderr.contains("filling 8 MiB"), "{}", r.stderr);
    assert!(r.stderr.contains("verifying 8 MiB"), "{}", r.stderr);
    assert!(r.stdout.contains("(same process)"));
    assert!(!r.stderr.contains("panicked"));
}

#[test]
fn demo_execs_the_next_binary_given() {
    let r = run(&[
        "demo",
        "--ram=1MiB",
        "--run-ms=20",
        "--next",
        env!("CARGO_BIN_EXE_luo"),
    ]);
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert_timeline(&r.stdout);
    assert!(r
        .stderr
        .contains(&format!("exec {}", env!("CARGO_BIN_EXE_luo"))));
}

#[test]
fn demo_dump_is_a_valid_image() {
    let dir = tempdir("dump");
    let dump = dir.join("handover.img");
    let dump_s = dump.to_str().expect("utf-8 path");
    let r = run(&["demo", "--ram", "2M", "--run-ms", "20", "--dump", dump_s]);
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("handover image written to"));

    let i = run(&["inspect", dump_s]);
    assert_eq!(i.code, 0, "stdout:\n{}\nstderr:\n{}", i.stdout, i.stderr);
    assert!(
        i.stdout.contains("compatible \"luo-v5\", liveupdate_num 1"),
        "{}",
        i.stdout
    );
    assert!(i.stdout.contains("session \"luo-demo\""), "{}", i.stdout);
    assert!(i.stdout.contains("file token 0x52414d00"), "{}", i.stdout);
    assert!(i.stdout.contains("file token 0x53544154"), "{}", i.stdout);
    assert!(
        i.stdout.contains("handler \"memfd-user-v1\""),
        "{}",
        i.stdout
    );
    assert!(
        i.stdout.contains("memfd: size 2097152 (2 MiB)"),
        "{}",
        i.stdout
    );
    assert!(
        i.stdout.contains("memfd: size 4096 (4 KiB)"),
        "{}",
        i.stdout
    );
    assert!(i.stderr.is_empty(), "{}", i.stderr);

    let j = run(&["inspect", "--json", dump_s]);
    assert_eq!(j.code, 0, "{}", j.stderr);
    let out = j.stdout.trim();
    assert!(out.starts_with('{') && out.ends_with('}'), "{out}");
    assert!(out.contains(r#""name":"luo-demo""#), "{out}");
    assert!(out.contains(r#""compatible":"memfd-user-v1""#), "{out}");
    assert!(out.contains(r#""size":2097152"#), "{out}");
    assert!(
        out.contains(&format!(r#""token":{}"#, 0x5241_4d00u64)),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupted_guest_ram_fails_verification() {
    // Byte 0x3039 is in page 3: flipped after the cut, before the exec.
    let r = run(&[
        "demo",
        "--ram",
        "1M",
        "--run-ms",
        "20",
        "--corrupt-byte",
        "12345",
    ]);
    assert_eq!(r.code, 1, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    let last = r.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("luo: verification failed: guest RAM byte 0x3039 (page 3, offset 57)"),
        "{}",
        r.stderr
    );
    assert!(!r.stdout.contains("verification: OK"));
    assert!(!r.stderr.contains("panicked"));
}

fn assert_one_line_error(r: &common::Run, code: i32, needle: &str) {
    assert_eq!(r.code, code, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "stderr:\n{}", r.stderr);
    assert!(r.stderr.starts_with("luo: "), "{}", r.stderr);
    assert!(r.stderr.contains(needle), "{needle:?} not in {}", r.stderr);
    assert!(!r.stderr.contains("panicked"));
}

#[test]
fn demo_user_errors_are_one_line() {
    assert_one_line_error(&run(&["demo", "--ram", "lots"]), 2, "not a size");
    assert_one_line_error(&run(&["demo", "--ram", "12X"]), 2, "unknown unit");
    assert_one_line_error(&run(&["demo", "--ram", "1000"]), 2, "multiple of 4096");
    assert_one_line_error(&run(&["demo", "--ram", "0"]), 2, "multiple of 4096");
    assert_one_line_error(&run(&["demo", "--ram", "100T"]), 2, "--ram");
    assert_one_line_error(&run(&["demo", "--ram"]), 2, "needs a value");
    assert_one_line_error(&run(&["demo", "--bogus"]), 2, "unknown argument");
    assert_one_line_error(
        &run(&["demo", "--ram", "1M", "--next", "/nonexistent/luo"]),
        2,
        "--next /nonexistent/luo",
    );
    assert_one_line_error(
        &run(&["demo", "--ram", "1M", "--dump", "/nonexistent/dir/x.img"]),
        1,
        "cannot create dump file",
    );
    assert_one_line_error(&run(&["frobnicate"]), 2, "unknown command");
}

#[test]
fn stage2_by_hand_fails_cleanly() {
    let times = "fill_start=1,fill_end=2,preserve_start=3,preserve_end=4,last_write=5,save_end=6,reboot_start=7,reboot_end=8,dump_end=0,exec=9";
    assert_one_line_error(
        &run(&["demo", "--stage2", "--handover-fd", "99", "--times", times]),
        1,
        "handover fd 99 is not open",
    );
    assert_one_line_error(
        &run(&["demo", "--stage2", "--handover-fd", "2", "--times", times]),
        1,
        "is not open",
    );
    assert_one_line_error(
        &run(&[
            "demo",
            "--stage2",
            "--handover-fd",
            "9",
            "--times",
            "exec=1",
        ]),
        2,
        "--times",
    );
    assert_one_line_error(&run(&["demo", "--stage2"]), 2, "--handover-fd");
}

/// The last line of stderr: the one-line error after any progress lines.
fn last_line(r: &common::Run) -> &str {
    r.stderr.lines().last().unwrap_or_default()
}

/// A refused update: exit status 1, the error says nothing was lost and the demo verified its
/// guest RAM in place, and the old image never reached the cut.
fn assert_refused_before_the_cut(r: &common::Run, needles: &[&str]) {
    assert_eq!(r.code, 1, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    let last = last_line(r);
    assert!(last.starts_with("luo: "), "{}", r.stderr);
    for n in needles {
        assert!(last.contains(n), "{n:?} not in {last}");
    }
    assert!(
        last.contains("nothing was lost") && last.contains("verified intact"),
        "{last}"
    );
    assert!(!r.stderr.contains("workload stopped after"), "{}", r.stderr);
    assert!(!r.stdout.contains("verification: OK"), "{}", r.stdout);
    assert!(!r.stderr.contains("panicked"));
}

#[test]
fn luo_answers_the_next_image_probe() {
    let r = run(&["--luo-handover-probe"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "luo-handover abi=luo-v5 image=luo-user-v1 program=luo\n"
    );
    assert!(r.stderr.is_empty(), "{}", r.stderr);
}

#[test]
fn demo_refuses_a_next_image_that_does_not_speak_the_handover() {
    let dir = tempdir("next");
    // Random bytes, executable.
    let junk = dir.join("junk");
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    assert!(&bytes[..2] != b"#!" && &bytes[..4] != b"\x7fELF");
    std::fs::write(&junk, &bytes).expect("junk");
    // A script that answers with another image format version.
    let wrong = dir.join("wrong-version");
    std::fs::write(
        &wrong,
        "#!/bin/sh\necho 'luo-handover abi=luo-v5 image=luo-user-v0 program=luo'\n",
    )
    .expect("script");
    for p in [&junk, &wrong] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let (junk, wrong) = (
        junk.to_str().expect("utf-8"),
        wrong.to_str().expect("utf-8"),
    );
    for (next, said) in [
        ("/bin/true", "answered \"\" and exited with exit status: 0"),
        (junk, "Exec format error"),
        (
            wrong,
            "answered \"luo-handover abi=luo-v5 image=luo-user-v0 program=luo\"",
        ),
    ] {
        let r = run(&["demo", "--ram", "1M", "--run-ms", "20", "--next", next]);
        assert_refused_before_the_cut(&r, &[&format!("next image {next}"), said]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_dump_to_a_full_disk_is_refused_before_the_cut() {
    let r = run(&[
        "demo",
        "--ram",
        "1M",
        "--run-ms",
        "20",
        "--dump",
        "/dev/full",
    ]);
    assert_refused_before_the_cut(&r, &["/dev/full", "No space left on device"]);
}

#[test]
fn demo_dump_to_a_fifo_is_refused_without_hanging() {
    let dir = tempdir("dump-fifo");
    let fifo = dir.join("fifo");
    let ok = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(ok.success());
    let fifo = fifo.to_str().expect("utf-8");
    let r = common::run_with_limit(
        &["demo", "--ram", "1M", "--dump", fifo],
        std::time::Duration::from_secs(30),
    );
    assert_one_line_error(&r, 1, "is a FIFO, not a regular file");
    let _ = std::fs::remove_dir_all(&dir);
}
