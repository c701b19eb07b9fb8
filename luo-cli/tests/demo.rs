//! `luo demo` end to end, as a child process: preserve, exec, retrieve, verify, timeline.

mod common;

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
