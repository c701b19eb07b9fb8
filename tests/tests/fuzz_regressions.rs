//! Fuzz findings as regression tests, and the fuzz seed corpora.
//!
//! The fuzz targets' bodies are the luo-fuzz-targets crate (`fuzz-targets/`), which the fuzz
//! binaries run too, so every crash input the fuzzer found (saved under
//! `tests/fuzz-regressions/`, named after its target) is replayed on every `cargo test` without
//! libFuzzer or nightly. See docs/verification.md.
//!
//! `cargo test -p luo-tests --test fuzz_regressions -- --ignored generate_seeds` rewrites the
//! checked-in seed corpora under `fuzz/corpus/` from the real backend.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use backend_user::{FlbRef, HandlerRef, LiveUpdate, Memory};
use luo_fuzz_targets as targets;
use luo_handlers::testing::{Journal, Op as Cb, Store, TestFlb, TestHandler};
use targets::lifecycle::Op;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Replays every saved input of `target` through `run`; returns how many there were.
fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = root().join("tests/fuzz-regressions").join(target);
    let mut n = 0;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let data = std::fs::read(&p).unwrap();
            eprintln!("replaying {}", p.display());
            run(&data);
            n += 1;
        }
    }
    n
}

/// Runs every checked-in seed of `target` (they must all pass too).
fn seeds(target: &str, run: fn(&[u8])) -> usize {
    let dir = root().join("fuzz/corpus").join(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        run(&std::fs::read(e.path()).unwrap());
        n += 1;
    }
    n
}

/// Serializes the tests that run targets whose files outlive one input, so that
/// [`reused_files_are_released_by_every_input`] sees no other test's references.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn handover_blob_regressions_and_seeds() {
    let _serial = serial();
    replay("handover_blob", targets::blob::run);
    assert!(seeds("handover_blob", targets::blob::run) > 0);
}

#[test]
fn handover_blob_valid_root_regressions_and_seeds() {
    let _serial = serial();
    replay("handover_blob_valid_root", targets::blob::run_valid_root);
    assert!(seeds("handover_blob_valid_root", targets::blob::run_valid_root) > 0);
}

#[test]
fn lifecycle_regressions_and_seeds() {
    let _serial = serial();
    replay("lifecycle", targets::lifecycle::run);
    assert!(seeds("lifecycle", targets::lifecycle::run) > 0);
}

#[test]
fn ioctl_args_regressions_and_seeds() {
    replay("ioctl_args", targets::ioctl::run);
    assert!(seeds("ioctl_args", targets::ioctl::run) > 0);
}

#[test]
fn small_inputs_never_panic() {
    let _serial = serial();
    for len in 0..64usize {
        let data: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
        targets::blob::run(&data);
        targets::blob::run_valid_root(&data);
        targets::lifecycle::run(&data);
        targets::ioctl::run(&data);
    }
}

/// The identity (as `UserPlatform::file_identity` computes it) of every open fd of this
/// process.
fn open_identities() -> Vec<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .map(|m| m.dev().rotate_left(40) ^ m.ino())
        .collect()
}

/// `lifecycle` keeps its memfds, and `handover_blob` the files its handlers hand out, from one
/// input to the next. That is only like fresh files if an input leaves no reference to them
/// behind: after every input of the corpora (which preserve, reboot, retrieve and finish them),
/// each is open exactly once, as the pool holds it.
#[test]
fn reused_files_are_released_by_every_input() {
    let _serial = serial();
    let lifecycle: Vec<u64> = targets::lifecycle::test_files()
        .iter()
        .map(<backend_user::UserPlatform as luo_core::Platform>::file_identity)
        .collect();
    let check = |what: &str| {
        let open = open_identities();
        for &id in lifecycle.iter().chain(&targets::common::pooled()) {
            let n = open.iter().filter(|&&o| o == id).count();
            assert_eq!(n, 1, "{what}: file {id:#x} open {n} times");
        }
    };
    for e in std::fs::read_dir(root().join("fuzz/corpus/lifecycle"))
        .unwrap()
        .flatten()
    {
        targets::lifecycle::run(&std::fs::read(e.path()).unwrap());
        check(&e.path().display().to_string());
    }
    for target in ["handover_blob", "handover_blob_valid_root"] {
        let run = if target == "handover_blob" {
            targets::blob::run
        } else {
            targets::blob::run_valid_root
        };
        for e in std::fs::read_dir(root().join("fuzz/corpus").join(target))
            .unwrap()
            .flatten()
        {
            run(&std::fs::read(e.path()).unwrap());
            check(&e.path().display().to_string());
        }
    }
    assert!(
        !targets::common::pooled().is_empty(),
        "the seeds retrieve files"
    );
}

// ---------------------------------------------------------------------------------------------
// Seed generation.
// ---------------------------------------------------------------------------------------------

/// A handover image made by the real backend with the handlers and FLBs `handover_blob`
/// registers: `sessions` lists, per session, the handler index (0 = "fuzz-a", 1 = "fuzz-b")
/// of each file.
fn blob_image(sessions: &[(&str, &[usize])]) -> Vec<u8> {
    let journal = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let hs = targets::blob::HANDLERS.map(|n| TestHandler::new(n, &journal, &store));
    let hrefs: Vec<HandlerRef> = hs.iter().cloned().map(|h| -> HandlerRef { h }).collect();
    for h in &hrefs {
        lu.register_handler(h.clone()).unwrap();
    }
    let f0: FlbRef = TestFlb::new(targets::blob::FLBS[0], 0, &journal);
    let f1: FlbRef = TestFlb::new(targets::blob::FLBS[1], 1, &journal);
    lu.register_flb(&hrefs[0], f0).unwrap();
    lu.register_flb(&hrefs[0], f1.clone()).unwrap();
    lu.register_flb(&hrefs[1], f1).unwrap();
    let dev = lu.open().unwrap();
    let mut fds = Vec::new();
    let mut open = Vec::new();
    for (name, files) in sessions {
        let s = dev.create_session(name).unwrap();
        for (i, &h) in files.iter().enumerate() {
            let f = backend_user::sys::memfd_create(c"seed", libc::MFD_CLOEXEC).unwrap();
            hs[h].accept_only(&[
                <backend_user::UserPlatform as luo_core::Platform>::file_identity(&f),
            ]);
            hs[1 - h].accept_only(&[]);
            s.preserve_fd(f.as_fd(), 100 + i as u64).unwrap();
            fds.push(f);
        }
        open.push(s);
    }
    lu.luo().reboot().unwrap();
    lu.memory().to_bytes()
}

fn write_seed(target: &str, name: &str, data: &[u8]) {
    let dir = root().join("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

#[test]
#[ignore = "rewrites fuzz/corpus; run by hand"]
fn generate_seeds() {
    let many: Vec<usize> = (0..70).map(|i| i % 2).collect();
    let names: Vec<String> = (0..53).map(|i| format!("many-{i}")).collect();
    let many_sessions: Vec<(&str, &[usize])> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                n.as_str(),
                if i % 10 == 0 { &[0usize][..] } else { &[][..] },
            )
        })
        .collect();
    let images: Vec<(&str, Vec<u8>)> = vec![
        ("cold", Memory::new().to_bytes()),
        ("no-sessions", blob_image(&[])),
        ("empty-session", blob_image(&[("empty", &[])])),
        ("two-files", blob_image(&[("two", &[0, 0])])),
        (
            "mixed",
            blob_image(&[("a", &[0, 1]), ("b", &[]), ("c", &[1])]),
        ),
        ("only-b", blob_image(&[("b-only", &[1, 1, 1])])),
        ("two-file-blocks", blob_image(&[("big", &many)])),
        ("two-session-blocks", blob_image(&many_sessions)),
    ];
    for (name, img) in &images {
        targets::blob::run(img);
        write_seed("handover_blob", name, img);
        if let Some(input) = targets::blob::valid_root_input(img) {
            targets::blob::run_valid_root(&input);
            write_seed("handover_blob_valid_root", name, &input);
        }
    }

    let lifecycle: Vec<(&str, Vec<Op>)> = vec![
        (
            "preserve-reboot-retrieve-finish",
            vec![
                Op::Create(0, 0),
                Op::Preserve(0, 0, 0),
                Op::Preserve(0, 1, 1),
                Op::Create(1, 1),
                Op::Preserve(1, 2, 0),
                Op::Reboot,
                Op::Retrieve(0, 0),
                Op::RetrieveFd(0, 0),
                Op::GetName(0),
                Op::Finish(0),
                Op::Close(0),
                Op::Retrieve(1, 1),
                Op::Close(1),
            ],
        ),
        (
            "errors",
            vec![
                Op::Create(0, 3),
                Op::Create(0, 0),
                Op::Create(1, 0),
                Op::Preserve(0, 0, 0),
                Op::Preserve(0, 0, 0),
                Op::Preserve(0, 0, 1),
                Op::Create(1, 1),
                Op::Preserve(1, 0, 0),
                Op::RetrieveFd(0, 0),
                Op::Finish(0),
                Op::Retrieve(2, 0),
                Op::OpenAgain,
                Op::Reopen,
            ],
        ),
        (
            "freeze-failure",
            vec![
                Op::Create(0, 0),
                Op::Preserve(0, 0, 0),
                Op::Preserve(0, 1, 1),
                Op::Create(1, 1),
                Op::Preserve(1, 2, 2),
                Op::Fail(Cb::Freeze, luo_core::errno::EIO),
                Op::Reboot,
                Op::Heal(Cb::Freeze),
                Op::Reboot,
                Op::Retrieve(0, 1),
                Op::Fail(Cb::Retrieve, luo_core::errno::ENOMEM),
                Op::RetrieveFd(0, 2),
                Op::RetrieveFd(0, 2),
                Op::Fail(Cb::CanFinish, luo_core::errno::EIO),
                Op::Finish(0),
                Op::Close(0),
                Op::Retrieve(0, 1),
                Op::Heal(Cb::CanFinish),
                Op::Close(0),
            ],
        ),
        (
            "alloc-failure",
            vec![
                Op::FailAlloc(Some(0)),
                Op::Create(0, 0),
                Op::FailAlloc(Some(1)),
                Op::Create(0, 0),
                Op::Preserve(0, 0, 0),
                Op::FailAlloc(None),
                Op::Preserve(0, 0, 0),
                Op::Fail(Cb::Preserve, luo_core::errno::ENOSPC),
                Op::Preserve(0, 1, 1),
                Op::Close(0),
            ],
        ),
        (
            "carry-forward",
            vec![
                Op::Create(0, 0),
                Op::Preserve(0, 0, 0),
                Op::Reboot,
                Op::Retrieve(0, 0),
                Op::RetrieveFd(0, 0),
                Op::Create(1, 0),
                Op::Preserve(1, 0, 0),
                Op::Finish(0),
                Op::Preserve(1, 0, 0),
                Op::Reboot,
                Op::Retrieve(2, 0),
                Op::RetrieveFd(2, 0),
            ],
        ),
    ];
    for (name, ops) in &lifecycle {
        let data = targets::lifecycle::encode_ops(ops);
        targets::lifecycle::run(&data);
        write_seed("lifecycle", name, &data);
    }

    let rec = |head: u8, cmd: u8, arg: &[u8]| {
        let mut v = vec![head, cmd];
        v.extend_from_slice(&(arg.len() as u16).to_le_bytes());
        v.extend_from_slice(arg);
        v
    };
    let named = |size: u32, name: &[u8]| {
        let mut v = size.to_ne_bytes().to_vec();
        v.extend_from_slice(&(-1i32).to_ne_bytes());
        let mut f = [0u8; 64];
        f[..name.len()].copy_from_slice(name);
        v.extend_from_slice(&f);
        v.resize(size.max(72) as usize, 0);
        v
    };
    let fd_token = |fd: i32, token: u64| {
        let mut v = 16u32.to_ne_bytes().to_vec();
        v.extend_from_slice(&fd.to_ne_bytes());
        v.extend_from_slice(&token.to_ne_bytes());
        v
    };
    let small = |size: u32, reserved: u32, len: usize| {
        let mut v = size.to_ne_bytes().to_vec();
        v.extend_from_slice(&reserved.to_ne_bytes());
        v.resize(len, 0);
        v
    };
    let ioctl: Vec<(&str, Vec<u8>)> = vec![
        (
            "device",
            [
                rec(0, 0x00, &named(72, b"x")),
                rec(0, 0x00, &named(72, b"x")),
                rec(0, 0x00, &named(80, b"y")),
                rec(0, 0x01, &named(72, b"inc")),
                rec(0, 0x01, &named(72, b"nope")),
                rec(0, 0x02, &named(72, b"x")),
            ]
            .concat(),
        ),
        (
            "session",
            [
                rec(1, 0x40, &fd_token(3, 1)),
                rec(1, 0x40, &fd_token(-1, 2)),
                rec(2, 0x41, &fd_token(-1, 7)),
                rec(2, 0x41, &fd_token(-1, 8)),
                rec(1, 0x43, &small(72, 0, 72)),
                rec(2, 0x43, &small(72, 1, 72)),
                rec(2, 0x42, &small(8, 0, 8)),
                rec(2, 0x42, &small(16, 0, 12)),
                rec(1, 0x42, &small(8, 0, 8)),
            ]
            .concat(),
        ),
    ];
    for (name, data) in &ioctl {
        targets::ioctl::run(data);
        write_seed("ioctl_args", name, data);
    }
}
