//! The daemon's shared state: the session table, the update machinery's state, the write side
//! of a connection, and the `Daemon` that holds them. The daemon (connections) and the update
//! path both work on it; it depends on neither.
//!
//! Threads never hold a lock while they talk to a peer, so a client that stops reading or
//! stalls mid-frame holds up its own thread only (and loses its connection after the frame
//! timeout). The two locks, `table` and `upd`, are never held together except in the update
//! path's reboot step, which takes `table` and then `upd` briefly. The small locks are leaves
//! taken after `table` if at all: a session's `files` and `channels`, then `stored` (the fd
//! store's names; its notifications are datagrams to systemd, with a send timeout).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use backend_user::LiveUpdate;
use luo_client::wire::{self, Dir, Phase};
use luo_client::{Device, Session};

use crate::logging::log;
use crate::options::Options;
use crate::systemd::{Notifier, Stored};

/// An error reply: errno and explanation.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) errno: i32,
    pub(crate) msg: String,
}

pub(crate) fn refuse(errno: i32, msg: impl Into<String>) -> Refusal {
    Refusal {
        errno,
        msg: msg.into(),
    }
}

/// A successful reply: payload and fds.
pub(crate) type Reply = Result<(Vec<u8>, Vec<OwnedFd>), Refusal>;

/// The write side of a connection, shared by its thread (replies) and the update path
/// (events), which must not interleave their frames.
pub(crate) struct Out {
    sock: UnixStream,
    lock: Mutex<()>,
}

impl Out {
    pub(crate) fn new(sock: UnixStream) -> Out {
        Out {
            sock,
            lock: Mutex::new(()),
        }
    }

    pub(crate) fn send(&self, opc: u16, tag: u32, body: &[u8]) -> io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        wire::write_frame(&self.sock, opc, tag, body, &[])
    }

    pub(crate) fn reply(&self, opc: u16, tag: u32, r: Reply) -> io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            Ok((payload, fds)) => {
                let b: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
                wire::write_ok(&self.sock, opc, tag, &payload, &b)
            }
            Err(e) => wire::write_err(&self.sock, opc, tag, e.errno, &e.msg),
        }
    }
}

/// A session luod holds, shared with its session channels (user backend).
pub(crate) struct Held {
    pub(crate) key: Key,
    pub(crate) session: Session,
    /// An incoming session finished through luod's channel.
    pub(crate) finished: AtomicBool,
    /// `(st_dev, st_ino)` of each file preserved through a channel, by token: how luod finds
    /// the file that cannot be frozen when an update fails (user backend).
    pub(crate) files: Mutex<BTreeMap<u64, (u64, u64)>>,
    /// luod's ends of the open session channels, by channel id: shut down to revoke the
    /// session (root's release of another uid's session, a forced update).
    pub(crate) channels: Mutex<Vec<(u64, UnixStream)>>,
}

/// A session luod holds.
pub(crate) struct Entry {
    pub(crate) held: Arc<Held>,
    pub(crate) handed_out: bool,
}

impl Entry {
    pub(crate) fn new(key: Key, session: Session, handed_out: bool) -> Entry {
        Entry {
            held: Arc::new(Held {
                key,
                session,
                finished: AtomicBool::new(false),
                files: Mutex::new(BTreeMap::new()),
                channels: Mutex::new(Vec::new()),
            }),
            handed_out,
        }
    }

    /// Closes luod's copy for good: every session channel is shut down, and once their threads
    /// let go (within about `wait`), the session itself is closed (outgoing: unpreserved, as
    /// far as luod holds it; incoming: finished). False if a channel thread did not let go in
    /// time (the session then closes when it does).
    pub(crate) fn revoke(self, wait: Duration) -> bool {
        for (_, c) in lock(&self.held.channels).iter() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let t = std::time::Instant::now();
        while Arc::strong_count(&self.held) > 1 {
            if t.elapsed() >= wait {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

/// A session's key: owner, direction, client name.
pub(crate) type Key = (u32, Dir, String);

/// Sessions by key.
pub(crate) type Table = BTreeMap<Key, Entry>;

/// An update listener.
pub(crate) struct Listener {
    pub(crate) label: String,
    pub(crate) uid: u32,
    pub(crate) pid: i32,
    pub(crate) out: Arc<Out>,
    /// `(round, status)` of its last BARRIER.
    pub(crate) answer: Option<(u64, i32)>,
}

/// The update machinery's state.
pub(crate) struct UpdateCtl {
    pub(crate) phase: Phase,
    pub(crate) round: u64,
    pub(crate) listeners: BTreeMap<u64, Listener>,
    pub(crate) last: Option<(i32, String)>,
}

/// The daemon.
pub struct Daemon {
    pub(crate) opts: Options,
    pub(crate) device: Device,
    /// The in-process LUO (user backend), whose `reboot` an update calls.
    pub(crate) lu: Option<LiveUpdate>,
    pub(crate) generation: u64,
    pub(crate) euid: u32,
    pub(crate) next_image: PathBuf,
    pub(crate) listener: UnixListener,
    pub(crate) table: Mutex<Table>,
    pub(crate) upd: Mutex<UpdateCtl>,
    pub(crate) upd_cv: Condvar,
    /// Set once a userspace reboot succeeded: every thread winds down before the exec.
    pub(crate) stopping: AtomicBool,
    /// Held by the accept loop around each accept, and by the update path from the reboot on,
    /// so no connection is accepted by an image that is about to be replaced.
    pub(crate) accept_gate: Mutex<()>,
    /// Open connections and channels: in total, and per uid.
    pub(crate) conns: Mutex<(usize, HashMap<u32, usize>)>,
    pub(crate) next_id: AtomicU64,
    /// systemd's notification socket (fd store), if luod runs under systemd.
    pub(crate) notifier: Notifier,
    /// The `FDNAME`s luod put in the fd store and has not removed.
    pub(crate) stored: Mutex<BTreeSet<String>>,
    /// Readable when SIGTERM or SIGINT is pending (both are blocked in every thread).
    pub(crate) signals: OwnedFd,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking thread must not take the daemon down with it: the data behind these locks
    // stays consistent between statements, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn lock_table(d: &Daemon) -> MutexGuard<'_, Table> {
    lock(&d.table)
}

pub(crate) fn lock_upd(d: &Daemon) -> MutexGuard<'_, UpdateCtl> {
    lock(&d.upd)
}

impl Daemon {
    /// Puts an fd that holds a session in systemd's fd store (nothing without systemd).
    pub(crate) fn keep(&self, what: Stored, fd: BorrowedFd<'_>) {
        let name = what.fd_name();
        if lock(&self.stored).contains(&name) {
            return;
        }
        match self.notifier.store(&name, fd) {
            Ok(true) => {
                lock(&self.stored).insert(name);
            }
            Ok(false) => {}
            Err(e) => log!("cannot put {name:?} in the fd store: {e}; it will not survive luod"),
        }
    }

    /// Removes what luod stored for a session it let go of.
    pub(crate) fn forget(&self, held: &Held) {
        let (uid, dir, name) = held.key.clone();
        let mut names = vec![Stored::Session {
            uid,
            dir,
            name: name.clone(),
        }
        .fd_name()];
        for token in lock(&held.files).keys() {
            names.push(
                Stored::File {
                    uid,
                    name: name.clone(),
                    token: *token,
                }
                .fd_name(),
            );
        }
        let mut stored = lock(&self.stored);
        for n in names {
            if stored.remove(&n) {
                if let Err(e) = self.notifier.remove(&n) {
                    log!("cannot remove {n:?} from the fd store: {e}");
                }
            }
        }
    }

    /// The listening socket's fd (kept open across a userspace update).
    pub(crate) fn listen_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// True for the uids that may update and see every session: root and luod's own.
    pub(crate) fn is_admin(&self, uid: u32) -> bool {
        uid == 0 || uid == self.euid
    }

    /// How long revoking a session waits for its channel threads (they notice a shutdown at
    /// once, or after the frame they are reading).
    pub(crate) fn revoke_wait(&self) -> Duration {
        self.opts.frame_timeout + Duration::from_secs(2)
    }
}

/// Opens a memfd holding `bytes`.
pub(crate) fn memfd_with(bytes: &[u8]) -> io::Result<OwnedFd> {
    let fd = backend_user::sys::memfd_create(c"luod-manifest", libc::MFD_CLOEXEC)?;
    backend_user::sys::pwrite_all(fd.as_fd(), bytes, 0)?;
    Ok(fd)
}

/// The sessions a listener speaks for: its uid's session named like its label, if there is
/// one (a VMM registers with its session's name), else every session of its uid.
pub(crate) fn sessions_of(t: &Table, uid: u32, label: &str) -> Vec<(u32, Dir, String)> {
    let mine: Vec<_> = t.keys().filter(|k| k.0 == uid).cloned().collect();
    let named: Vec<_> = mine.iter().filter(|k| k.2 == label).cloned().collect();
    if named.is_empty() {
        mine
    } else {
        named
    }
}

/// `"1000/vm0", "1000/vm1"` (or `no session`).
pub(crate) fn names(keys: &[(u32, Dir, String)]) -> String {
    if keys.is_empty() {
        return "no session".into();
    }
    keys.iter()
        .map(|(u, dir, n)| format!("{} session {:?}", dir.as_str(), wire::kernel_name(*u, n)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A one-line account of what luod holds, for update failures: what was not lost.
pub(crate) fn holdings(t: &Table) -> String {
    let out: Vec<_> = t.iter().filter(|(k, _)| k.1 == Dir::Outgoing).collect();
    let files: Option<usize> = out
        .iter()
        .map(|(_, e)| e.held.session.file_count())
        .sum::<Option<usize>>();
    let files = files.map_or(String::new(), |f| format!(" with {f} preserved file(s)"));
    format!(
        "luod still holds {} outgoing session(s){files}, all intact",
        out.len()
    )
}
