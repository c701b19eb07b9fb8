//! Helpers shared by the luo-cli integration tests.
#![allow(dead_code, unreachable_pub)]

use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backend_user::LiveUpdate;
use luo_handlers::testing::{Journal, Store, TestFlb, TestHandler};
use luo_handlers::MemfdHandler;

/// The `luo` binary under test.
pub fn luo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_luo"))
}

/// What a finished child left.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `luo args...`, failing the test if it does not end within `limit` (a hang).
pub fn run_with_limit(args: &[&str], limit: Duration) -> Run {
    let mut child = luo()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn luo");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("luo {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        code: status.code().unwrap_or(-1),
        stdout: t_out.join().expect("stdout reader"),
        stderr: t_err.join().expect("stderr reader"),
    }
}

/// Runs `luo args...` with a 60 s limit.
pub fn run(args: &[&str]) -> Run {
    run_with_limit(args, Duration::from_secs(60))
}

/// A fresh temporary directory for one test.
pub fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("luo-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A valid handover image built in-process: two sessions, two memfds (one with seals and a
/// position), one test-handler file with an FLB.
pub fn valid_image() -> Vec<u8> {
    let lu = LiveUpdate::new().expect("luo");
    lu.register_handler(MemfdHandler::new(lu.memory().clone()))
        .expect("memfd handler");
    let journal = Journal::new();
    let store = Store::new();
    let th = TestHandler::new("test-handler-v1", &journal, &store);
    let th_ref: backend_user::HandlerRef = th.clone();
    lu.register_handler(th_ref.clone()).expect("test handler");
    let flb = TestFlb::new("test-flb-v1", 3, &journal);
    lu.register_flb(&th_ref, flb).expect("flb");
    let dev = lu.open().expect("open");

    let a = dev.create_session("vm-1").expect("session");
    let ram = backend_user::sys::memfd_create(c"ram", libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        .expect("memfd");
    let ram = std::fs::File::from(ram);
    ram.set_len(64 << 10).expect("size");
    backend_user::sys::add_seals(ram.as_fd(), libc::F_SEAL_GROW as u32).expect("seal");
    backend_user::sys::lseek(ram.as_fd(), 100, libc::SEEK_SET).expect("seek");
    a.preserve_fd(ram.as_fd(), 1).expect("preserve ram");
    let b = dev.create_session("vm-2 \"quoted\"").expect("session 2");
    let other = backend_user::sys::memfd_create(c"other", libc::MFD_CLOEXEC).expect("memfd");
    b.preserve_fd(other.as_fd(), u64::MAX)
        .expect("preserve other");
    let path = std::env::temp_dir().join(format!("luo-cli-regular-{}", std::process::id()));
    let regular = std::fs::File::create(&path).expect("regular file");
    b.preserve_fd(regular.as_fd(), 7).expect("preserve regular");
    let _ = std::fs::remove_file(&path);
    lu.luo().reboot().expect("reboot");
    let bytes = lu.memory().to_bytes();
    // Keep the preserved fds from leaking into children of other tests.
    drop((a, b, dev));
    bytes
}

/// Writes bytes to a file in `dir` and returns its path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write image");
    p
}

/// Reads a native-endian u64.
pub fn get(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Writes a native-endian u64.
pub fn put(b: &mut [u8], at: u64, v: u64) {
    let at = at as usize;
    b[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// A small deterministic PRNG (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
