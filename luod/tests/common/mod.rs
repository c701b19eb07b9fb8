//! Shared test harness: a luod (user backend) in its own temp dir, luoctl runs, raw frames.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use luo_client::wire::{self, Frame};
use luo_client::Luod;

pub const LUOD: &str = env!("CARGO_BIN_EXE_luod");
pub const LUOCTL: &str = env!("CARGO_BIN_EXE_luoctl");

/// Generous on a loaded 2-core machine; the happy paths take milliseconds.
pub const DEADLINE: Duration = Duration::from_secs(10);

static N: AtomicU32 = AtomicU32::new(0);

/// A luod of its own, in a temp dir that other uids can enter (for the access tests).
pub struct Daemon {
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub child: Child,
}

impl Daemon {
    /// Starts `luod --backend user` with short frame timeouts, plus `extra` arguments.
    pub fn start(extra: &[&str]) -> Daemon {
        Daemon::start_with(extra, None)
    }

    /// As [`Daemon::start`], with luod's stderr going to `stderr` instead of `luod.log`.
    pub fn start_with(extra: &[&str], stderr: Option<Stdio>) -> Daemon {
        let dir = std::env::temp_dir().join(format!(
            "luod-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sock = dir.join("luod.sock");
        let log = match stderr {
            Some(s) => s,
            None => std::fs::File::create(dir.join("luod.log")).unwrap().into(),
        };
        let child = Command::new(LUOD)
            .args(["--backend", "user", "--socket"])
            .arg(&sock)
            .args(["--frame-timeout-ms", "500"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Daemon { dir, sock, child };
        d.wait_generation(0);
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("luod.log")).unwrap_or_default()
    }

    pub fn connect(&self) -> Luod {
        Luod::connect(&self.sock).unwrap_or_else(|e| panic!("connect: {e}\n{}", self.log()))
    }

    /// Waits until luod answers with generation `gen` (it keeps its pid across an update).
    pub fn wait_generation(&self, gen: u64) -> Luod {
        let t = Instant::now();
        loop {
            if let Ok(l) = Luod::connect(&self.sock) {
                if l.hello().generation == gen {
                    return l;
                }
            }
            assert!(
                t.elapsed() < DEADLINE,
                "luod generation {gen} did not come up\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// True while the luod process runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn luoctl(&self, args: &[&str]) -> Output {
        self.luoctl_cmd(args).output().unwrap()
    }

    pub fn luoctl_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(LUOCTL);
        c.arg("--socket").arg(&self.sock).args(args);
        c.stdin(Stdio::null());
        c
    }

    /// Runs luoctl with `input` on stdin.
    pub fn luoctl_with_input(&self, args: &[&str], input: &[u8], uid: Option<u32>) -> Output {
        let mut c = self.luoctl_cmd(args);
        if let Some(u) = uid {
            std::os::unix::process::CommandExt::uid(&mut c, u);
            std::os::unix::process::CommandExt::gid(&mut c, u);
        }
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// The number of fds luod has open.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        s
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- luod log ----\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A memfd with `data`.
pub fn memfd(data: &[u8]) -> std::fs::File {
    let fd = backend_user::sys::memfd_create(c"test", libc::MFD_CLOEXEC).unwrap();
    let f = std::fs::File::from(fd);
    f.write_all_at(data, 0).unwrap();
    f
}

/// The whole content of a file, from offset 0.
pub fn contents(fd: OwnedFd) -> Vec<u8> {
    let f = std::fs::File::from(fd);
    let mut v = vec![0u8; f.metadata().unwrap().len() as usize];
    f.read_exact_at(&mut v, 0).unwrap();
    v
}

/// A deterministic byte pattern.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Reads one frame (up to DEADLINE).
pub fn read(s: &UnixStream) -> Result<Frame, wire::RecvError> {
    let t = Instant::now();
    wire::read_frame(s, wire::MAX_REPLY_BODY, DEADLINE, &mut || {
        t.elapsed() < DEADLINE
    })
}

/// Sends a request and returns the reply's status (0 or errno) and the frame.
pub fn call(s: &UnixStream, op: u16, tag: u32, body: &[u8]) -> (i32, Frame) {
    wire::write_frame(s, op, tag, body, &[]).unwrap();
    let f = read(s).unwrap();
    assert_eq!((f.op, f.tag), (op | wire::op::REPLY, tag), "reply header");
    let st = match wire::parse_reply(&f.body).unwrap() {
        Ok(_) => 0,
        Err((e, _)) => e,
    };
    (st, f)
}

/// Reads until EOF (or the deadline); true if the peer closed.
pub fn drains_to_eof(s: &UnixStream) -> bool {
    use std::io::Read;
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    while t.elapsed() < DEADLINE {
        match (&*s).read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

pub fn is_root() -> bool {
    luo_client::sys::geteuid() == 0
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `f` on a thread of its own whose effective uid is `uid` (root only): a socket it
/// connects carries that uid in `SO_PEERCRED`. Linux credentials are per thread at the system
/// call level (glibc's `seteuid` would change every thread; the raw call changes this one), and
/// the real and saved uids stay 0, so the thread could switch back; it simply ends instead.
pub fn as_uid<T: Send + 'static>(uid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: setresgid/setresuid with -1 for the unchanged ids take no pointers; the raw
        // system call changes only the calling thread's credentials, which is what we want.
        let r = unsafe {
            let g = libc::syscall(libc::SYS_setresgid, -1i64, i64::from(uid), -1i64);
            let u = libc::syscall(libc::SYS_setresuid, -1i64, i64::from(uid), -1i64);
            g.min(u)
        };
        assert_eq!(
            r,
            0,
            "setresuid to {uid}: {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .unwrap()
}
