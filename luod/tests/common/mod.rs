//! Shared test harness: a luod (user backend) in its own temp dir, luoctl runs, raw frames.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
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
    extra: Vec<String>,
}

impl Daemon {
    /// Starts `luod --backend user` with short frame timeouts, plus `extra` arguments.
    pub fn start(extra: &[&str]) -> Daemon {
        Daemon::start_with(extra, None)
    }

    /// As [`Daemon::start`], with luod's stderr going to `stderr` instead of `luod.log`.
    pub fn start_with(extra: &[&str], stderr: Option<Stdio>) -> Daemon {
        Daemon::start_full(extra, stderr, &[])
    }

    /// As [`Daemon::start_with`], with extra environment variables.
    pub fn start_full(extra: &[&str], stderr: Option<Stdio>, env: &[(&str, &OsStr)]) -> Daemon {
        let dir = std::env::temp_dir().join(format!(
            "luod-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sock = dir.join("luod.sock");
        let mut cmd = Command::new(LUOD);
        Daemon::args(&mut cmd, &sock, extra, env);
        let child = cmd
            .stderr(stderr.unwrap_or_else(|| Daemon::log_file(&dir)))
            .spawn()
            .unwrap();
        let d = Daemon {
            dir,
            sock,
            child,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.wait_generation(0);
        d
    }

    fn log_file(dir: &Path) -> Stdio {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("luod.log"))
            .unwrap()
            .into()
    }

    fn args(cmd: &mut Command, sock: &Path, extra: &[&str], env: &[(&str, &OsStr)]) {
        cmd.args(["--backend", "user", "--socket"])
            .arg(sock)
            .args(["--frame-timeout-ms", "500"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
    }

    /// Starts luod again (same socket, same arguments) the way systemd does with an fd
    /// store: `fds` at 3, 4, ..., `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`, and
    /// `NOTIFY_SOCKET` set. The previous luod must be gone (killed, or stopped).
    pub fn restart_with_fds(&mut self, notify: &Path, fds: Vec<(String, OwnedFd)>) {
        self.restart_at(notify, fds, 0)
    }

    /// As [`Daemon::restart_with_fds`], for a luod that comes back at generation `gen`.
    pub fn restart_at(&mut self, notify: &Path, fds: Vec<(String, OwnedFd)>, gen: u64) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // LISTEN_PID is the pid of the process that execs luod: sh's, kept by exec.
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
            .arg(LUOD);
        let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        Daemon::args(
            &mut cmd,
            &self.sock,
            &extra,
            &[
                ("NOTIFY_SOCKET", notify.as_os_str()),
                ("LISTEN_FDS", OsStr::new(&fds.len().to_string())),
                ("LISTEN_FDNAMES", OsStr::new(&names.join(":"))),
            ],
        );
        let raw: Vec<i32> = fds.iter().map(|(_, f)| f.as_raw_fd()).collect();
        let mut tmp = vec![-1i32; raw.len()];
        // SAFETY: the closure runs in the child between fork and exec and calls only fcntl
        // and dup2 (async-signal-safe), writing into `tmp`, allocated before the fork. The
        // fds are first moved above every target number (close-on-exec copies), then put at
        // 3.. (dup2 clears close-on-exec), so no source is overwritten before it is copied.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                for (i, fd) in raw.iter().enumerate() {
                    let t = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10_000);
                    if t < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    tmp[i] = t;
                }
                for (i, t) in tmp.iter().enumerate() {
                    if libc::dup2(*t, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        self.child = cmd.stderr(Daemon::log_file(&self.dir)).spawn().unwrap();
        drop(fds);
        self.wait_generation(gen);
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

/// What a fake systemd fd store has received.
#[derive(Default)]
pub struct StoreState {
    /// Stored fds, in the order they came, with their `FDNAME`.
    pub fds: Vec<(String, OwnedFd)>,
    /// `READY=1` notifications.
    pub ready: usize,
    /// `STOPPING=1` notifications.
    pub stopping: usize,
    /// The `FDNAME`s of `FDSTOREREMOVE=1` notifications.
    pub removed: Vec<String>,
}

/// systemd's side of `sd_notify` and the fd store, enough for luod: a datagram socket that
/// keeps `FDSTORE=1` fds under their `FDNAME`, drops them on `FDSTOREREMOVE=1`, and counts
/// `READY=1` and `STOPPING=1`.
pub struct FdStore {
    pub path: PathBuf,
    pub state: std::sync::Arc<std::sync::Mutex<StoreState>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FdStore {
    pub fn new() -> FdStore {
        let path = std::env::temp_dir().join(format!(
            "luod-notify-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let state = std::sync::Arc::new(std::sync::Mutex::new(StoreState::default()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (state, stop) = (state.clone(), stop.clone());
            move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let mut fds = Vec::new();
                    let Ok(r) = luo_client::sys::recv_with_fds(sock.as_fd(), &mut buf, &mut fds)
                    else {
                        continue;
                    };
                    let text = String::from_utf8_lossy(&buf[..r.len]).into_owned();
                    let lines: Vec<&str> = text.lines().collect();
                    let name = lines
                        .iter()
                        .find_map(|l| l.strip_prefix("FDNAME="))
                        .unwrap_or("stored")
                        .to_string();
                    let mut st = state.lock().unwrap();
                    for l in &lines {
                        match *l {
                            "READY=1" => st.ready += 1,
                            "STOPPING=1" => st.stopping += 1,
                            "FDSTOREREMOVE=1" => {
                                st.fds.retain(|(n, _)| *n != name);
                                st.removed.push(name.clone());
                            }
                            "FDSTORE=1" => {
                                for fd in fds.drain(..) {
                                    st.fds.push((name.clone(), fd));
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
        });
        FdStore {
            path,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits (up to DEADLINE) until `f` holds for the store.
    pub fn wait(&self, what: &str, f: impl Fn(&StoreState) -> bool) {
        let t = Instant::now();
        loop {
            {
                let st = self.state.lock().unwrap();
                if f(&st) {
                    return;
                }
                assert!(
                    t.elapsed() < DEADLINE,
                    "fd store: {what}; it holds {:?} (ready {}, stopping {})",
                    st.fds.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
                    st.ready,
                    st.stopping
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn names(&self) -> Vec<String> {
        let st = self.state.lock().unwrap();
        st.fds.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The stored files (user backend), without luod's generation entry.
    pub fn files(s: &StoreState) -> Vec<&str> {
        s.fds
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| n.starts_with("luod-f."))
            .collect()
    }

    /// Copies of the stored fds, as systemd passes them at the next start (it keeps its own).
    pub fn copies(&self) -> Vec<(String, OwnedFd)> {
        let st = self.state.lock().unwrap();
        st.fds
            .iter()
            .map(|(n, f)| (n.clone(), f.try_clone().unwrap()))
            .collect()
    }
}

impl Drop for FdStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
