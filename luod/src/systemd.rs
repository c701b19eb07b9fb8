//! systemd integration without libsystemd: the `sd_notify` datagram (`READY=1`, `STOPPING=1`,
//! `STATUS=`, and the fd store: `FDSTORE=1` / `FDSTOREREMOVE=1` with `FDNAME=`), and the fds
//! systemd passes at start (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`, from fd 3 on).
//!
//! The fd store is how luod survives its own death: every fd that holds a session (kernel
//! backend: luod's copy of each session fd; user backend: each preserved file) is pushed to
//! systemd when luod gets it, under a name that says what it is, and removed when luod lets
//! it go. systemd keeps them while luod is restarted (`FileDescriptorStorePreserve=yes` keeps
//! them even across a stop), and hands them back at the next start. See `docs/luod.md`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;

use luo_client::sys;
use luo_client::wire::{self, Dir};

/// A connection to systemd's notification socket, if luod runs under systemd.
#[derive(Debug)]
pub struct Notifier {
    sock: Option<UnixDatagram>,
}

impl Notifier {
    /// Connects to `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). Without it,
    /// every call does nothing and [`Notifier::enabled`] is false.
    pub fn from_env() -> Result<Notifier, String> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(Notifier { sock: None }),
            Some(path) => Notifier::connect(&path),
        }
    }

    /// Connects to a notification socket: a path, or `@name` for an abstract socket.
    pub fn connect(path: &std::ffi::OsStr) -> Result<Notifier, String> {
        let sock = UnixDatagram::unbound().map_err(|e| format!("NOTIFY_SOCKET: {e}"))?;
        // systemd reads every datagram at once; a bound on the wait keeps a wedged manager
        // from stalling luod (the fd is then not stored, and luod says so).
        sock.set_write_timeout(Some(std::time::Duration::from_secs(2)))
            .map_err(|e| format!("NOTIFY_SOCKET: {e}"))?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path);
        let r = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|a| sock.connect_addr(&a))
            }
            None => sock.connect(path),
        };
        r.map_err(|e| format!("NOTIFY_SOCKET {}: {e}", path.to_string_lossy()))?;
        Ok(Notifier { sock: Some(sock) })
    }

    /// A notifier that does nothing (no systemd).
    pub fn from_env_none() -> Notifier {
        Notifier { sock: None }
    }

    /// True under systemd (a notification socket is set).
    pub fn enabled(&self) -> bool {
        self.sock.is_some()
    }

    /// Sends one notification, with `fds` attached. `Ok(false)` without systemd.
    pub fn send(&self, state: &str, fds: &[BorrowedFd<'_>]) -> io::Result<bool> {
        let Some(s) = &self.sock else {
            return Ok(false);
        };
        let n = sys::send_with_fds(s.as_fd(), state.as_bytes(), fds)?;
        if n != state.len() {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        Ok(true)
    }

    /// Puts `fd` in the fd store under `name`. `Ok(false)` without systemd.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<bool> {
        self.send(&format!("FDSTORE=1\nFDNAME={name}\n"), &[fd])
    }

    /// Removes every fd stored under `name`.
    pub fn remove(&self, name: &str) -> io::Result<bool> {
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), &[])
    }
}

/// Escapes a client name for `FDNAME=` (which may not hold `:`): `%` and `:` as `%25`, `%3A`.
fn escape(name: &str) -> String {
    name.replace('%', "%25").replace(':', "%3A")
}

fn unescape(s: &str) -> Option<String> {
    let out = s.replace("%3A", ":").replace("%25", "%");
    // Only what escape() produces: a '%' left over would be ambiguous.
    (escape(&out) == s).then_some(out)
}

/// What a stored fd holds, from its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Kernel backend: luod's copy of a session fd: `luod-s.<o|i>.<uid>.<name>`.
    Session {
        /// Owner.
        uid: u32,
        /// Direction.
        dir: Dir,
        /// Client name.
        name: String,
    },
    /// luod's generation number (updates since its first start), so that a restart within
    /// the same boot goes on counting: `luod-g.<n>` (the fd is an empty memfd).
    Generation(u64),
    /// User backend: a preserved file of an outgoing session: `luod-f.<uid>.<token>.<name>`.
    File {
        /// Owner.
        uid: u32,
        /// Client name.
        name: String,
        /// Token (16 hex digits).
        token: u64,
    },
}

impl Stored {
    /// The `FDNAME=`.
    pub fn fd_name(&self) -> String {
        match self {
            Stored::Session { uid, dir, name } => {
                let d = if *dir == Dir::Outgoing { 'o' } else { 'i' };
                format!("luod-s.{d}.{uid}.{}", escape(name))
            }
            Stored::Generation(g) => format!("luod-g.{g}"),
            Stored::File { uid, name, token } => {
                format!("luod-f.{uid}.{token:016x}.{}", escape(name))
            }
        }
    }

    /// Parses an `FDNAME`; `None` for names luod did not make (or that do not check out).
    pub fn parse(s: &str) -> Option<Stored> {
        let uid = |u: &str| u.parse::<u32>().ok().filter(|v| v.to_string() == u);
        let name = |n: &str| {
            let n = unescape(n)?;
            wire::check_name(n.as_bytes()).ok()?;
            Some(n)
        };
        if let Some(rest) = s.strip_prefix("luod-s.") {
            let mut it = rest.splitn(3, '.');
            let dir = match it.next()? {
                "o" => Dir::Outgoing,
                "i" => Dir::Incoming,
                _ => return None,
            };
            return Some(Stored::Session {
                dir,
                uid: uid(it.next()?)?,
                name: name(it.next()?)?,
            });
        }
        if let Some(g) = s.strip_prefix("luod-g.") {
            let n = g.parse::<u64>().ok().filter(|n| n.to_string() == g)?;
            return Some(Stored::Generation(n));
        }
        let rest = s.strip_prefix("luod-f.")?;
        let mut it = rest.splitn(3, '.');
        let u = uid(it.next()?)?;
        let t = it.next()?;
        if t.len() != 16 {
            return None;
        }
        let token = u64::from_str_radix(t, 16).ok()?;
        Some(Stored::File {
            uid: u,
            token,
            name: name(it.next()?)?,
        })
    }
}

/// The fds systemd passed to this process (`LISTEN_FDS` from fd 3, named by
/// `LISTEN_FDNAMES`), if `LISTEN_PID` is this process. Each is owned from here on and
/// close-on-exec. An fd that is not open is skipped (with its name in the second list).
#[allow(unsafe_code)]
pub fn listen_fds() -> (Vec<(String, OwnedFd)>, Vec<String>) {
    let mine = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let n: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if !mine || n <= 0 {
        return (Vec::new(), Vec::new());
    }
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(String::from).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for i in 0..n.min(65_536) {
        let fd = 3 + i;
        let name = names
            .get(i as usize)
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        if !sys::fd_is_open(fd) {
            missing.push(name);
            continue;
        }
        // SAFETY: systemd passed fds 3..3+LISTEN_FDS to this very process (LISTEN_PID is
        // ours); the number is open (checked above), nothing in luod has touched fds it did
        // not open itself before this runs (at start, once), so this is its only owner.
        let owned = unsafe { sys::adopt_inherited(fd) };
        let _ = backend_user::sys::set_cloexec(owned.as_fd(), true);
        out.push((name, owned));
    }
    (out, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_an_abstract_socket_with_their_fd() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("luod-test-notify-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::connect(std::ffi::OsStr::new(&format!("@{name}"))).unwrap();
        assert!(n.enabled());
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(n.store("luod-s.o.1.vm", f.as_fd()).unwrap());
        let mut buf = [0u8; 256];
        let mut fds = Vec::new();
        let r = sys::recv_with_fds(server.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..r.len], b"FDSTORE=1\nFDNAME=luod-s.o.1.vm\n");
        assert_eq!(fds.len(), 1);
        assert!(!Notifier::from_env_none().send("READY=1\n", &[]).unwrap());
        assert!(Notifier::connect(std::ffi::OsStr::new("/nonexistent/notify")).is_err());
    }

    #[test]
    fn fd_names_round_trip_and_strangers_are_refused() {
        for s in [
            Stored::Session {
                uid: 1000,
                dir: Dir::Outgoing,
                name: "vm:0%.x".into(),
            },
            Stored::Session {
                uid: 0,
                dir: Dir::Incoming,
                name: "a".into(),
            },
            Stored::File {
                uid: 4_294_967_295,
                name: "g.u.e.s.t".into(),
                token: u64::MAX,
            },
            Stored::Generation(7),
        ] {
            let n = s.fd_name();
            assert!(!n.contains(':') && n.len() <= 255, "{n}");
            assert_eq!(Stored::parse(&n), Some(s), "{n}");
        }
        for bad in [
            "luod.socket",
            "luod-s.x.1.a",
            "luod-s.o.01.a",
            "luod-s.o.1.a/b",
            "luod-f.1.1.a",
            "luod-f.1.000000000000000g.a",
            "luod-f.1.0000000000000001.%zz",
            "luod-s.o.1.",
            "luod-g.07",
            "luod-g.",
        ] {
            assert_eq!(Stored::parse(bad), None, "{bad}");
        }
    }
}
