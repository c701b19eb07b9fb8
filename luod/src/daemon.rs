//! The daemon: startup and restore (the manifest after an update, systemd's fd store after
//! luod's own restart), the accept loop and SIGTERM, one thread per connection, the session
//! table, access control and caps. The state all this works on, and the rules for its locks,
//! are in `state.rs`, which the update path shares.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use backend_user::LiveUpdate;
use luo_client::sys::{self, PeerCred};
use luo_client::wire::{
    self, errno as werr, op, BackendKind, Dir, Frame, HandoutKind, Hello, Phase, Reader, RecvError,
    SessionInfo, Status, UpdateRequest,
};
use luo_client::{Device, Session};

use crate::manifest::{Manifest, MANIFEST_SESSION};
use crate::options::Options;
use crate::state::{
    lock, lock_table, lock_upd, memfd_with, refuse, Entry, Held, Key, Listener, Out, Refusal,
    Reply, Table, UpdateCtl,
};
use crate::systemd::{self, Notifier, Stored};

pub use crate::state::Daemon;

/// How often idle threads wake up to notice that luod is going away.
const POLL: Duration = Duration::from_millis(200);

pub(crate) use crate::logging::log;

/// The most fds a frame may bring, before its header is complete (`None`) and for its opcode.
type FdLimit = fn(Option<u16>) -> usize;

/// luod's socket: UPDATE takes a kernel and an initrd; nothing else takes any.
fn main_socket_fds(op: Option<u16>) -> usize {
    match op {
        None | Some(op::UPDATE) => 2,
        Some(op::ADOPT) => 1,
        Some(_) => 0,
    }
}

/// A session channel: PRESERVE takes the file.
fn channel_fds(op: Option<u16>) -> usize {
    match op {
        None | Some(op::S_PRESERVE) => 1,
        Some(_) => 0,
    }
}

fn ok(payload: Vec<u8>) -> Reply {
    Ok((payload, Vec::new()))
}

/// Counts a connection or channel for `--max-connections` and `--max-connections-per-uid`;
/// released on drop. The per-uid cap keeps one user from starving the others (and root's
/// luoctl) of connections.
struct Slot {
    d: Arc<Daemon>,
    uid: u32,
}

impl Slot {
    fn take(d: &Arc<Daemon>, uid: u32) -> Result<Slot, Refusal> {
        let o = &d.opts;
        // Root and luod's uid have --admin-connections more, in all and for themselves, so
        // that other users (and root's own clients) cannot lock the operator out.
        let (total, per_uid) = if d.is_admin(uid) {
            (
                o.max_connections,
                o.max_connections_per_uid
                    .saturating_add(o.admin_connections),
            )
        } else {
            (
                o.max_connections.saturating_sub(o.admin_connections),
                o.max_connections_per_uid,
            )
        };
        let mut c = lock(&d.conns);
        if c.0 >= total {
            return Err(refuse(
                libc::EAGAIN,
                format!(
                    "too many connections: {} open, {total} allowed for uid {uid} \
                     (--max-connections {}, of which --admin-connections {} are kept for root)",
                    c.0, o.max_connections, o.admin_connections
                ),
            ));
        }
        let mine = c.1.entry(uid).or_insert(0);
        if *mine >= per_uid {
            return Err(refuse(
                libc::EAGAIN,
                format!(
                    "uid {uid} has {per_uid} connections and session channels open, \
                     its limit (--max-connections-per-uid)"
                ),
            ));
        }
        *mine += 1;
        c.0 += 1;
        Ok(Slot { d: d.clone(), uid })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = lock(&self.d.conns);
        c.0 = c.0.saturating_sub(1);
        if let Some(n) = c.1.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.1.remove(&self.uid);
            }
        }
    }
}

/// Takes ownership of an fd number this image inherited from the previous one.
#[allow(unsafe_code)]
fn adopt(fd: i32, what: &str) -> Result<OwnedFd, String> {
    if fd <= 2 || !sys::fd_is_open(fd) {
        return Err(format!(
            "{what} fd {fd} is not open: --{what}-fd is passed by luod to its next image, not by hand"
        ));
    }
    // SAFETY: the number is open (checked above) and above stdio; it was inherited across exec
    // and this is the one place that adopts it, once, at startup, before anything else in this
    // image could have taken ownership of it.
    Ok(unsafe { sys::adopt_inherited(fd) })
}

fn bind(opts: &Options) -> Result<UnixListener, String> {
    let path = &opts.socket;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!("{} exists and is not a socket", path.display()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "{} is in use: another luod is running",
                path.display()
            ));
        }
        // A stale socket of a luod that is gone.
        std::fs::remove_file(path).map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
    }
    let l = UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(opts.socket_mode))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    Ok(l)
}

/// Restores what the previous image handed over: luod's manifest, then every session it
/// lists. Returns the previous generation (`None` on a cold start) and the sessions.
fn restore(device: &Device) -> (Option<u64>, Table) {
    let mut table = Table::new();
    let ms = match device.retrieve_session(MANIFEST_SESSION) {
        Ok(s) => s,
        Err(e) if e.errno() == luo_core::errno::ENOENT => return (None, table),
        Err(e) => {
            log!("cannot retrieve the manifest session: {e}; restoring nothing");
            return (None, table);
        }
    };
    let manifest = ms
        .retrieve_fd(0)
        .map_err(|e| format!("cannot retrieve the manifest memfd: {e}"))
        .and_then(|fd| {
            let f = std::fs::File::from(fd);
            let len = f.metadata().map_err(|e| e.to_string())?.len();
            if len > crate::manifest::MAX_LEN {
                return Err(format!("manifest of {len} bytes is too large"));
            }
            let mut buf = vec![0u8; len as usize];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0)
                .map_err(|e| format!("cannot read the manifest: {e}"))?;
            Manifest::decode(&buf)
        });
    // The manifest session has served its purpose either way.
    if let Err(e) = ms.finish() {
        log!("FINISH of the manifest session: {e}");
    }
    drop(ms);
    let m = match manifest {
        Ok(m) => m,
        Err(e) => {
            log!("{e}; restoring nothing (sessions are never handed out on a guess)");
            return (None, table);
        }
    };
    for (uid, name) in m.sessions {
        let kname = wire::kernel_name(uid, &name);
        match device.retrieve_session(&kname) {
            Ok(s) => {
                let key = (uid, Dir::Incoming, name);
                table.insert(key.clone(), Entry::new(key, s, false));
            }
            Err(e) => log!("session {kname:?} listed in the manifest: {e}"),
        }
    }
    (Some(m.generation), table)
}

fn is_socket(fd: BorrowedFd<'_>) -> bool {
    backend_user::sys::fstat(fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
}

/// Takes back the sessions the fd store kept while luod was down (it was killed or stopped;
/// see `docs/luod.md`). Kernel backend: each stored fd is luod's copy of a session fd, taken
/// back if GET_NAME is the name it was stored under. User backend: each stored fd is a
/// preserved file; the outgoing sessions are created again, with the same names and tokens,
/// in the new in-process LUO. What does not check out is removed from the store and logged.
/// Returns a note for the start-up line.
fn restore_from_store(
    device: &Device,
    notifier: &Notifier,
    table: &mut Table,
    stored: &mut BTreeSet<String>,
    items: Vec<(Stored, String, OwnedFd)>,
    generation: &mut Option<u64>,
) -> String {
    if items.is_empty() {
        return String::new();
    }
    let n_items = items.len();
    let drop_item = |name: &str, why: String| {
        log!("fd store entry {name:?}: {why}; removed from the store");
        let _ = notifier.remove(name);
    };
    // (uid, name) -> [(token, FDNAME, file)]
    type StoredFiles = Vec<(u64, String, OwnedFd)>;
    let mut files: BTreeMap<(u32, String), StoredFiles> = BTreeMap::new();
    let mut sessions = 0usize;
    for (what, name, fd) in items {
        match (what, device.backend()) {
            (Stored::Session { uid, dir, name: n }, BackendKind::Kernel) => {
                let s = Session::from_kernel_fd(fd);
                let want = wire::kernel_name(uid, &n);
                match s.name() {
                    Ok(got) if got == want => {}
                    Ok(got) => {
                        drop_item(&name, format!("the session is {got:?}, not {want:?}"));
                        continue;
                    }
                    Err(e) => {
                        drop_item(&name, format!("not a LUO session: {e}"));
                        continue;
                    }
                }
                let key = (uid, dir, n);
                if table.contains_key(&key) {
                    drop_item(&name, "luod has that session already".into());
                    continue;
                }
                table.insert(key.clone(), Entry::new(key, s, false));
                stored.insert(name);
                sessions += 1;
            }
            (
                Stored::File {
                    uid,
                    name: n,
                    token,
                },
                BackendKind::User,
            ) => {
                files.entry((uid, n)).or_default().push((token, name, fd));
            }
            (Stored::Generation(g), _) => {
                // The highest one counts; any other is stale.
                if generation.is_some_and(|old| old >= g) {
                    drop_item(&name, "an older generation".into());
                } else {
                    if let Some(old) = generation.replace(g) {
                        let _ = notifier.remove(&Stored::Generation(old).fd_name());
                    }
                    stored.insert(name);
                }
            }
            (_, b) => drop_item(&name, format!("not for the {} backend", b.as_str())),
        }
    }
    for ((uid, n), fds) in files {
        let kname = wire::kernel_name(uid, &n);
        let key = (uid, Dir::Outgoing, n);
        if table.contains_key(&key) {
            for (_, name, _) in &fds {
                drop_item(name, format!("luod has a session {kname:?} already"));
            }
            continue;
        }
        let s = match device.create_session(&kname) {
            Ok(s) => s,
            Err(e) => {
                for (_, name, _) in &fds {
                    drop_item(
                        name,
                        format!("cannot create the session {kname:?} again: {e}"),
                    );
                }
                continue;
            }
        };
        let entry = Entry::new(key.clone(), s, false);
        let mut back = 0;
        for (token, name, fd) in fds {
            match entry.held.session.preserve_fd(&fd, token) {
                Ok(()) => {
                    if let Ok(st) = backend_user::sys::fstat(fd.as_fd()) {
                        lock(&entry.held.files).insert(token, (st.st_dev, st.st_ino));
                    }
                    stored.insert(name);
                    back += 1;
                }
                Err(e) => drop_item(&name, format!("cannot preserve it in {kname:?} again: {e}")),
            }
        }
        // A session none of whose files came back is not made up empty.
        if back > 0 {
            table.insert(key, entry);
            sessions += 1;
        }
    }
    format!(" ({sessions} from systemd's fd store, {n_items} fd(s))")
}

impl Daemon {
    /// Opens the backend, restores the previous image's sessions, and binds (or inherits)
    /// the socket.
    pub fn start(opts: Options) -> Result<Arc<Daemon>, String> {
        // Every session, channel and (user backend) preserved file is an fd of luod's; the
        // caps keep the count bounded, the hard limit is what the system grants.
        let nofile = match sys::raise_nofile_limit() {
            Ok(n) => format!("fd limit {n}"),
            Err(e) => format!("fd limit not raised: {e}"),
        };
        // Before any thread exists, so that every thread inherits the blocked mask.
        let signals =
            sys::term_signalfd().map_err(|e| format!("cannot set up SIGTERM handling: {e}"))?;
        // What systemd passed: the fd store's contents and the activation socket. An image
        // started by luod itself (after a userspace update) has the same pid and environment
        // but not those fds any more.
        let (passed, missing) = if opts.handover_fd.is_none() && opts.listen_fd.is_none() {
            systemd::listen_fds()
        } else {
            (Vec::new(), Vec::new())
        };
        if !missing.is_empty() {
            log!("fds systemd announced are not open: {}", missing.join(", "));
        }
        let notifier = Notifier::from_env().unwrap_or_else(|e| {
            log!("{e}; running without systemd notifications and fd store");
            Notifier::from_env_none()
        });
        let mut from_store = Vec::new();
        let mut activation: Option<OwnedFd> = None;
        for (name, fd) in passed {
            match Stored::parse(&name) {
                Some(what) => from_store.push((what, name, fd)),
                None if activation.is_none() && is_socket(fd.as_fd()) => activation = Some(fd),
                None => {
                    log!("fd {name:?} from systemd is not luod's; closing it");
                    let _ = notifier.remove(&name);
                }
            }
        }
        let (device, lu) = match opts.backend {
            BackendKind::Kernel => {
                if opts.handover_fd.is_some() {
                    return Err("--handover-fd is for the user backend".into());
                }
                let d = Device::open_path(&opts.device)
                    .map_err(|e| format!("cannot open {}: {e}", opts.device.display()))?;
                (d, None)
            }
            BackendKind::User => {
                let lu = match opts.handover_fd {
                    Some(fd) => {
                        let h = adopt(fd, "handover")?;
                        backend_user::sys::set_cloexec(h.as_fd(), true)
                            .map_err(|e| format!("handover fd: {e}"))?;
                        LiveUpdate::boot(&h)
                            .map_err(|e| format!("cannot boot from the handover: {e}"))?
                    }
                    None => LiveUpdate::new().map_err(|e| format!("cannot start LUO: {e}"))?,
                };
                // Also marks inherited memfds close-on-exec until retrieved.
                luo_handlers::MemfdHandler::register(&lu)
                    .map_err(|e| format!("cannot register the memfd handler: {e}"))?;
                let d = Device::in_process(&lu)
                    .map_err(|e| format!("cannot restore the incoming sessions: {e}"))?;
                (d, Some(lu))
            }
        };
        let listener = match (opts.listen_fd, activation) {
            (Some(fd), _) => {
                let l = adopt(fd, "listen")?;
                backend_user::sys::set_cloexec(l.as_fd(), true)
                    .map_err(|e| format!("listen fd: {e}"))?;
                UnixListener::from(l)
            }
            (None, Some(l)) => UnixListener::from(l),
            (None, None) => bind(&opts)?,
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("listen socket: {e}"))?;
        let (prev, mut table) = restore(&device);
        let mut stored = BTreeSet::new();
        let mut stored_gen = None;
        let back = restore_from_store(
            &device,
            &notifier,
            &mut table,
            &mut stored,
            from_store,
            &mut stored_gen,
        );
        // After an update the manifest says; after luod's own restart, the fd store.
        let generation = match (prev, stored_gen) {
            (Some(g), _) => g.saturating_add(1),
            (None, Some(g)) => g,
            (None, None) => 0,
        };
        let next_image = match &opts.next_image {
            Some(p) => p.clone(),
            None => {
                std::env::current_exe().map_err(|e| format!("cannot find luod's binary: {e}"))?
            }
        };
        log!(
            "{} backend, generation {generation}, {} session(s) restored{back}, listening on {}, \
             {nofile}{}",
            opts.backend.as_str(),
            table.len(),
            opts.socket.display(),
            if notifier.enabled() {
                ", systemd fd store in use"
            } else {
                ""
            }
        );
        let ready = format!(
            "READY=1\nSTATUS=generation {generation}, {} session(s)\n",
            table.len()
        );
        if let Err(e) = notifier.send(&ready, &[]) {
            log!("sd_notify READY=1: {e}");
        }
        let d = Arc::new(Daemon {
            opts,
            device,
            lu,
            generation,
            euid: sys::geteuid(),
            next_image,
            listener,
            table: Mutex::new(table),
            upd: Mutex::new(UpdateCtl {
                phase: Phase::Idle,
                round: 0,
                listeners: BTreeMap::new(),
                last: None,
            }),
            upd_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            accept_gate: Mutex::new(()),
            conns: Mutex::new((0, HashMap::new())),
            next_id: AtomicU64::new(1),
            notifier,
            stored: Mutex::new(stored),
            signals,
        });
        // The generation goes to the fd store (replacing the previous image's, after a
        // userspace update: that image stored generation - 1).
        if let Some(p) = prev {
            let _ = d.notifier.remove(&Stored::Generation(p).fd_name());
        }
        if d.notifier.enabled() {
            match memfd_with(b"") {
                Ok(m) => d.keep(Stored::Generation(generation), m.as_fd()),
                Err(e) => log!("cannot store the generation: {e}"),
            }
        }
        // Incoming sessions restored from the manifest (kernel backend) go to the fd store
        // now; those that came from it are there already.
        let fresh: Vec<(Key, Arc<Held>)> = lock_table(&d)
            .iter()
            .map(|(k, e)| (k.clone(), e.held.clone()))
            .collect();
        for (k, held) in fresh {
            if let Some(fd) = held.session.kernel_fd() {
                d.keep(
                    Stored::Session {
                        uid: k.0,
                        dir: k.1,
                        name: k.2.clone(),
                    },
                    fd,
                );
            }
        }
        Ok(d)
    }

    /// Accepts connections until SIGTERM or SIGINT (then returns `Ok`, see [`Daemon::stop`]).
    pub fn run(self: &Arc<Self>) -> Result<(), String> {
        loop {
            let ready = sys::poll_readable_any(
                &[self.listener.as_fd(), self.signals.as_fd()],
                POLL.as_millis() as i32,
            )
            .map_err(|e| format!("poll: {e}"))?;
            if ready[1] {
                if let Ok(Some(signo)) = sys::read_signal(self.signals.as_fd()) {
                    if self.stop(signo) {
                        return Ok(());
                    }
                }
            }
            if !ready[0] {
                continue;
            }
            let _gate = lock(&self.accept_gate);
            if self.stopping.load(Ordering::Acquire) {
                // The exec is imminent; leave new connections in the backlog for the next image.
                drop(_gate);
                std::thread::sleep(POLL);
                continue;
            }
            match self.listener.accept() {
                Ok((sock, _)) => self.spawn_conn(sock),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log!("accept: {e}");
                    std::thread::sleep(POLL);
                }
            }
        }
    }

    /// SIGTERM or SIGINT: a clean stop, unless an update is rebooting (then the signal is
    /// ignored: the exec or kexec is imminent and must not be cut in half). What luod holds
    /// is in systemd's fd store already (pushed as it arrived); this says what was kept and
    /// what goes down with luod. Returns true to stop.
    fn stop(&self, signo: u32) -> bool {
        let sig = if signo == libc::SIGINT as u32 {
            "SIGINT"
        } else {
            "SIGTERM"
        };
        if lock_upd(self).phase == Phase::Rebooting {
            log!("{sig} ignored: an update is rebooting");
            return false;
        }
        self.stopping.store(true, Ordering::Release);
        let stored = lock(&self.stored).clone();
        let (mut kept, mut lost) = (Vec::new(), Vec::new());
        for ((uid, dir, name), e) in lock_table(self).iter() {
            let kname = wire::kernel_name(*uid, name);
            let is_kept = match e.held.session.kernel_fd() {
                Some(_) => stored.contains(
                    &Stored::Session {
                        uid: *uid,
                        dir: *dir,
                        name: name.clone(),
                    }
                    .fd_name(),
                ),
                None => {
                    let files = lock(&e.held.files);
                    *dir == Dir::Outgoing
                        && !files.is_empty()
                        && files.len() == e.held.session.file_count().unwrap_or(0)
                        && files.keys().all(|t| {
                            stored.contains(
                                &Stored::File {
                                    uid: *uid,
                                    name: name.clone(),
                                    token: *t,
                                }
                                .fd_name(),
                            )
                        })
                }
            };
            let what = format!("{} {kname:?}", dir.as_str());
            if is_kept {
                kept.push(what);
            } else {
                lost.push(what);
            }
        }
        let _ = self.notifier.send("STOPPING=1\n", &[]);
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        let why_lost = if lost.is_empty() {
            ""
        } else if !self.notifier.enabled() {
            " (no fd store: luod was not started by systemd with FileDescriptorStoreMax=)"
        } else if self.lu.is_some() {
            " (user backend: incoming and empty sessions live only in luod's memory)"
        } else {
            ""
        };
        log!(
            "stopping on {sig}: kept in systemd's fd store: {}; lost with luod{why_lost}: {}",
            list(&kept),
            list(&lost)
        );
        true
    }

    fn spawn_conn(self: &Arc<Self>, sock: UnixStream) {
        // The kernel recorded the peer's credentials at connect; they cannot be forged.
        let cred = match sys::peer_cred(sock.as_fd()) {
            Ok(c) => c,
            Err(e) => {
                log!("SO_PEERCRED: {e}");
                return;
            }
        };
        let slot = match Slot::take(self, cred.uid) {
            Ok(s) => s,
            Err(r) => {
                let _ = sock.set_write_timeout(Some(self.opts.frame_timeout));
                let _ = wire::write_err(&sock, 0, 0, r.errno, &r.msg);
                return;
            }
        };
        let d = self.clone();
        let r = std::thread::Builder::new()
            .name("luod-conn".into())
            .stack_size(256 << 10)
            .spawn(move || {
                let _slot = slot;
                d.serve(sock, cred);
            });
        if let Err(e) = r {
            log!("cannot start a connection thread: {e}");
        }
    }

    fn setup(&self, sock: &UnixStream) -> io::Result<()> {
        sock.set_nonblocking(false)?;
        sock.set_read_timeout(Some(POLL))?;
        sock.set_write_timeout(Some(self.opts.frame_timeout))
    }

    fn keep_waiting(&self) -> bool {
        !self.stopping.load(Ordering::Acquire)
    }

    /// Reads the next frame; `None` when the connection is over (after telling the peer why,
    /// if it can still hear it).
    fn next_frame(&self, sock: &UnixStream, out: &Out, fds: FdLimit) -> Option<Frame> {
        match wire::read_frame_limited(
            sock,
            wire::MAX_REQUEST_BODY,
            self.opts.frame_timeout,
            &fds,
            &mut || self.keep_waiting(),
        ) {
            Ok(f) => Some(f),
            Err(RecvError::TooLarge { len, op, tag }) => {
                let msg = format!(
                    "frame body of {len} bytes is over the limit of {}",
                    wire::MAX_REQUEST_BODY
                );
                let _ = out.reply(op, tag, Err(refuse(werr::EMSGSIZE, msg)));
                None
            }
            Err(RecvError::TimedOut) => {
                let msg = format!(
                    "frame not completed within {} ms",
                    self.opts.frame_timeout.as_millis()
                );
                let _ = out.reply(0, 0, Err(refuse(werr::ETIMEDOUT, msg)));
                None
            }
            Err(RecvError::Stopped) => {
                let _ = out.reply(
                    0,
                    0,
                    Err(refuse(libc::ESHUTDOWN, "luod is restarting for an update")),
                );
                None
            }
            Err(_) => None,
        }
    }

    /// Checks what every frame must satisfy before its opcode is looked at.
    fn precheck(f: &Frame, fds_expected: usize) -> Result<(), Refusal> {
        if f.version != wire::PROTOCOL_VERSION {
            return Err(refuse(
                werr::EPROTONOSUPPORT,
                format!(
                    "protocol version {} is not supported; luod speaks {}",
                    f.version,
                    wire::PROTOCOL_VERSION
                ),
            ));
        }
        if f.fds_truncated {
            return Err(refuse(
                libc::EINVAL,
                format!(
                    "this request carries {fds_expected} fd(s), and more were attached \
                     (closed as they arrived)"
                ),
            ));
        }
        if f.fds.len() != fds_expected {
            return Err(refuse(
                libc::EINVAL,
                format!(
                    "this request carries {fds_expected} fd(s), not {}",
                    f.fds.len()
                ),
            ));
        }
        Ok(())
    }

    /// One client connection.
    fn serve(self: &Arc<Self>, sock: UnixStream, cred: PeerCred) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.setup(&sock) {
            log!("connection {id}: {e}");
            return;
        }
        let out = match sock.try_clone() {
            Ok(s) => Arc::new(Out::new(s)),
            Err(e) => {
                log!("connection {id}: {e}");
                return;
            }
        };
        while let Some(f) = self.next_frame(&sock, &out, main_socket_fds) {
            let (opc, tag) = (f.op, f.tag);
            let r = self.dispatch(id, cred, &out, f);
            let Some(r) = r else {
                // The update path answered itself.
                continue;
            };
            if out.reply(opc, tag, r).is_err() {
                break;
            }
        }
        let mut upd = lock_upd(self);
        if upd.listeners.remove(&id).is_some() {
            self.upd_cv.notify_all();
        }
    }

    fn dispatch(
        self: &Arc<Self>,
        id: u64,
        cred: PeerCred,
        out: &Arc<Out>,
        f: Frame,
    ) -> Option<Reply> {
        let fds = match f.op {
            op::UPDATE => UpdateRequest::decode(&f.body).map_or(0, |u| u.fd_count()),
            op::ADOPT => 1,
            _ => 0,
        };
        if let Err(e) = Self::precheck(&f, fds) {
            return Some(Err(e));
        }
        if self.stopping.load(Ordering::Acquire) {
            return Some(Err(refuse(
                libc::ESHUTDOWN,
                "luod is restarting for an update",
            )));
        }
        let uid = cred.uid;
        Some(match f.op {
            op::HELLO => self.hello(uid, &f.body),
            op::CREATE => self.create(uid, &f.body),
            op::OPEN => self.lookup(uid, Dir::Outgoing, &f.body),
            op::RETRIEVE => self.lookup(uid, Dir::Incoming, &f.body),
            op::RELEASE => self.release(uid, &f.body),
            op::RELEASE_UID => self.release_uid(uid, &f.body),
            op::ADOPT => self.adopt(uid, f),
            op::STATUS => self.status(uid, &f.body),
            op::REGISTER => self.register(id, cred, out, &f.body),
            op::BARRIER => return self.barrier(id, out, f.tag, &f.body),
            op::UPDATE => return crate::update::run(self, cred, out, f),
            op::S_PRESERVE | op::S_RETRIEVE_FD | op::S_FINISH | op::S_GET_NAME => Err(refuse(
                werr::EBADRQC,
                "session requests go to a session channel, not luod's socket",
            )),
            other => Err(refuse(werr::EBADRQC, format!("unknown request {other:#x}"))),
        })
    }

    fn hello(&self, uid: u32, body: &[u8]) -> Reply {
        if !body.is_empty() {
            return Err(refuse(werr::EBADMSG, "HELLO has no body"));
        }
        ok(Hello {
            version: wire::PROTOCOL_VERSION,
            backend: self.opts.backend,
            uid,
            pid: std::process::id(),
            generation: self.generation,
        }
        .encode())
    }

    fn name(body: &[u8]) -> Result<String, Refusal> {
        wire::check_name(body).map_err(|m| refuse(libc::EINVAL, m))?;
        // check_name admits ASCII only.
        Ok(String::from_utf8_lossy(body).into_owned())
    }

    fn create(self: &Arc<Self>, uid: u32, body: &[u8]) -> Reply {
        let name = Self::name(body)?;
        let mut t = lock_table(self);
        let key = (uid, Dir::Outgoing, name);
        if t.contains_key(&key) {
            return Err(refuse(
                libc::EEXIST,
                format!("you already have an outgoing session {:?}", key.2),
            ));
        }
        let mine = t
            .keys()
            .filter(|(u, d, _)| *u == uid && *d == Dir::Outgoing)
            .count();
        if mine >= self.opts.max_sessions_per_uid {
            return Err(refuse(
                libc::ENOSPC,
                format!(
                    "uid {uid} has {mine} outgoing sessions, the limit (--max-sessions-per-uid)"
                ),
            ));
        }
        let kname = wire::kernel_name(uid, &key.2);
        let s = self
            .device
            .create_session(&kname)
            .map_err(|e| refuse(e.errno().get(), format!("CREATE_SESSION {kname:?}: {e}")))?;
        let entry = Entry::new(key.clone(), s, true);
        // A session the client never received is closed again (and so gone from the
        // kernel), so that a retry is a plain CREATE, not an EEXIST.
        let r = self.hand_out(uid, &entry)?;
        if let Some(fd) = entry.held.session.kernel_fd() {
            self.keep(
                Stored::Session {
                    uid,
                    dir: Dir::Outgoing,
                    name: key.2.clone(),
                },
                fd,
            );
        }
        t.insert(key, entry);
        Ok(r)
    }

    fn lookup(self: &Arc<Self>, uid: u32, dir: Dir, body: &[u8]) -> Reply {
        let name = Self::name(body)?;
        let mut t = lock_table(self);
        // Only the caller's own namespace is searched: another uid's session of the same name
        // is simply not there for it (ENOENT, not EPERM, so names do not leak either).
        let Some(entry) = t.get_mut(&(uid, dir, name.clone())) else {
            return Err(refuse(
                libc::ENOENT,
                format!("you have no {} session {name:?}", dir.as_str()),
            ));
        };
        let r = self.hand_out(uid, entry);
        if r.is_ok() {
            entry.handed_out = true;
        }
        r
    }

    /// The reply that gives a client its handle: a dup of the kernel session fd, or a new
    /// session channel (user backend).
    fn hand_out(self: &Arc<Self>, uid: u32, entry: &Entry) -> Reply {
        if let Some(fd) = entry.held.session.kernel_fd() {
            let dup = fd
                .try_clone_to_owned()
                .map_err(|e| refuse(e.raw_os_error().unwrap_or(libc::EIO), e.to_string()))?;
            return Ok((vec![HandoutKind::KernelFd.to_u8()], vec![dup]));
        }
        let (mine, theirs) = UnixStream::pair()
            .map_err(|e| refuse(e.raw_os_error().unwrap_or(libc::EIO), e.to_string()))?;
        let slot = Slot::take(self, uid)?;
        let d = self.clone();
        let held = entry.held.clone();
        let chan_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let registered = mine
            .try_clone()
            .map_err(|e| refuse(e.raw_os_error().unwrap_or(libc::EIO), e.to_string()))?;
        lock(&held.channels).push((chan_id, registered));
        let spawned = std::thread::Builder::new()
            .name("luod-chan".into())
            .stack_size(256 << 10)
            .spawn({
                let held = held.clone();
                move || {
                    let _slot = slot;
                    d.serve_channel(mine, uid, &held);
                    lock(&held.channels).retain(|(id, _)| *id != chan_id);
                }
            });
        if spawned.is_err() {
            lock(&held.channels).retain(|(id, _)| *id != chan_id);
        }
        spawned.map_err(|e| refuse(libc::EAGAIN, format!("cannot start a channel thread: {e}")))?;
        Ok((vec![HandoutKind::Channel.to_u8()], vec![theirs.into()]))
    }

    fn release(&self, uid: u32, body: &[u8]) -> Reply {
        let mut r = Reader::new(body);
        let dir = r
            .u8("direction")
            .and_then(Dir::from_u8)
            .map_err(|e| refuse(werr::EBADMSG, e.to_string()))?;
        let name = Self::name(r.rest())?;
        let removed = lock_table(self).remove(&(uid, dir, name.clone()));
        match removed {
            // Dropped outside the lock: closing an incoming session finishes it, which runs
            // handler callbacks.
            Some(e) => {
                self.forget(&e.held);
                drop(e);
                ok(Vec::new())
            }
            None => Err(refuse(
                libc::ENOENT,
                format!("you have no {} session {name:?}", dir.as_str()),
            )),
        }
    }

    /// ADOPT (kernel backend): take back a session fd a client kept while luod was down.
    fn adopt(&self, uid: u32, mut f: Frame) -> Reply {
        if self.lu.is_some() {
            return Err(refuse(
                libc::EOPNOTSUPP,
                "the user backend's sessions live inside luod: there is no session fd to adopt",
            ));
        }
        let mut r = Reader::new(&f.body);
        let dir = r
            .u8("direction")
            .and_then(Dir::from_u8)
            .map_err(|e| refuse(werr::EBADMSG, e.to_string()))?;
        let name = Self::name(r.rest())?;
        let fd = f.fds.pop().ok_or_else(|| refuse(libc::EBADF, "no fd"))?;
        let session = Session::from_kernel_fd(fd);
        let want = wire::kernel_name(uid, &name);
        // The kernel says whose it is: a LUO session's name is set at creation, by luod.
        let got = session.name().map_err(|e| {
            refuse(
                libc::EINVAL,
                format!("the fd you sent is not a LUO session ({e})"),
            )
        })?;
        if got != want {
            return Err(refuse(
                libc::EPERM,
                format!("the session you sent is {got:?}, not yours {want:?}"),
            ));
        }
        let mut t = lock_table(self);
        let key = (uid, dir, name);
        if t.contains_key(&key) {
            return Err(refuse(
                libc::EEXIST,
                format!("luod holds {} session {want:?} already", dir.as_str()),
            ));
        }
        let entry = Entry::new(key.clone(), session, true);
        if let Some(fd) = entry.held.session.kernel_fd() {
            self.keep(
                Stored::Session {
                    uid,
                    dir,
                    name: key.2.clone(),
                },
                fd,
            );
        }
        t.insert(key, entry);
        log!("uid {uid} handed back {} session {want:?}", dir.as_str());
        ok(Vec::new())
    }

    /// RELEASE_UID (root): drop another uid's session for good, channels included.
    fn release_uid(&self, caller: u32, body: &[u8]) -> Reply {
        if !self.is_admin(caller) {
            return Err(refuse(
                libc::EPERM,
                format!("uid {caller} may not release another uid's session: only root may"),
            ));
        }
        let mut r = Reader::new(body);
        let (dir, uid) = r
            .u8("direction")
            .and_then(Dir::from_u8)
            .and_then(|dir| Ok((dir, r.u32("uid")?)))
            .map_err(|e| refuse(werr::EBADMSG, e.to_string()))?;
        let name = Self::name(r.rest())?;
        let removed = lock_table(self).remove(&(uid, dir, name.clone()));
        let kname = wire::kernel_name(uid, &name);
        let Some(e) = removed else {
            return Err(refuse(
                libc::ENOENT,
                format!("uid {uid} has no {} session {name:?}", dir.as_str()),
            ));
        };
        let files = e.held.session.file_count();
        self.forget(&e.held);
        if !e.revoke(self.revoke_wait()) {
            log!("session {kname:?}: a channel thread still holds it; it closes when that ends");
        }
        log!(
            "uid {caller} released {} session {kname:?} of uid {uid}{}",
            dir.as_str(),
            files.map_or(String::new(), |n| format!(" ({n} file(s))"))
        );
        ok(Vec::new())
    }

    fn status(&self, uid: u32, body: &[u8]) -> Reply {
        if !body.is_empty() {
            return Err(refuse(werr::EBADMSG, "STATUS has no body"));
        }
        let (phase, listeners, last_update) = {
            let u = lock_upd(self);
            (u.phase, u.listeners.len() as u32, u.last.clone())
        };
        let all = self.is_admin(uid);
        let sessions = lock_table(self)
            .iter()
            .filter(|((u, _, _), _)| all || *u == uid)
            .map(|((u, dir, name), e)| SessionInfo {
                uid: *u,
                dir: *dir,
                name: name.clone(),
                files: e
                    .held
                    .session
                    .file_count()
                    .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
                finished: e.held.finished.load(Ordering::Relaxed),
                handed_out: e.handed_out,
            })
            .collect();
        ok(Status {
            backend: self.opts.backend,
            phase,
            pid: std::process::id(),
            generation: self.generation,
            listeners,
            last_update,
            sessions,
        }
        .encode())
    }

    fn register(&self, id: u64, cred: PeerCred, out: &Arc<Out>, body: &[u8]) -> Reply {
        wire::check_label(body).map_err(|m| refuse(libc::EINVAL, m))?;
        let label = String::from_utf8_lossy(body).into_owned();
        // A listener holds back updates for its sessions: a uid with none has nothing to
        // protect, and may not stall the host's updates (root's --force overrides the rest).
        if !self.is_admin(cred.uid) && !lock_table(self).keys().any(|k| k.0 == cred.uid) {
            return Err(refuse(
                libc::EPERM,
                format!(
                    "uid {} has no session in luod: only a uid with a session (or root) may \
                     register for updates",
                    cred.uid
                ),
            ));
        }
        let mut u = lock_upd(self);
        if u.listeners.contains_key(&id) {
            return Err(refuse(
                libc::EINVAL,
                "this connection is already a listener",
            ));
        }
        u.listeners.insert(
            id,
            Listener {
                label,
                uid: cred.uid,
                pid: cred.pid,
                out: out.clone(),
                answer: None,
            },
        );
        ok(Vec::new())
    }

    /// BARRIER. The reply goes out *before* the answer counts: once the last answer counts,
    /// the update may reboot (or exec) at once, and the listener must not lose its reply to
    /// that. `None`: the reply was sent here.
    fn barrier(&self, id: u64, out: &Out, tag: u32, body: &[u8]) -> Option<Reply> {
        let mut r = Reader::new(body);
        let parsed = r.i32("status").and_then(|status| {
            let answered = r.u64("round")?;
            r.end("BARRIER length")?;
            Ok((status, answered))
        });
        let (status, answered) = match parsed {
            Ok(v) => v,
            Err(e) => return Some(Err(refuse(werr::EBADMSG, e.to_string()))),
        };
        if status < 0 {
            return Some(Err(refuse(
                werr::EBADMSG,
                "a barrier status is 0 or an errno",
            )));
        }
        let waiting = |u: &UpdateCtl| {
            u.listeners.contains_key(&id) && u.phase == Phase::Barrier && u.round == answered
        };
        {
            let u = lock_upd(self);
            if !u.listeners.contains_key(&id) {
                return Some(Err(refuse(
                    libc::EINVAL,
                    "this connection is not a listener (REGISTER first)",
                )));
            }
            if !waiting(&u) {
                // Also a late answer to an abandoned update: it must not count for this one.
                return Some(Err(refuse(
                    libc::EINVAL,
                    "no update is waiting at the barrier for this answer",
                )));
            }
        }
        if out.reply(op::BARRIER, tag, ok(Vec::new())).is_err() {
            return None;
        }
        let mut u = lock_upd(self);
        // If the deadline passed meanwhile, the answer is lost and EV_ABORTED follows.
        if waiting(&u) {
            if let Some(l) = u.listeners.get_mut(&id) {
                l.answer = Some((answered, status));
            }
            self.upd_cv.notify_all();
        }
        None
    }

    /// A session channel (user backend): each frame is one session ioctl on `session`.
    fn serve_channel(&self, sock: UnixStream, uid: u32, held: &Held) {
        if let Err(e) = self.setup(&sock) {
            log!("channel: {e}");
            return;
        }
        let out = match sock.try_clone() {
            Ok(s) => Out::new(s),
            Err(e) => {
                log!("channel: {e}");
                return;
            }
        };
        while let Some(f) = self.next_frame(&sock, &out, channel_fds) {
            let (opc, tag) = (f.op, f.tag);
            let r = self.channel_request(uid, held, f);
            if out.reply(opc, tag, r).is_err() {
                break;
            }
        }
    }

    fn channel_request(&self, uid: u32, held: &Held, mut f: Frame) -> Reply {
        let session = &held.session;
        let fds = usize::from(f.op == op::S_PRESERVE);
        Self::precheck(&f, fds)?;
        let luo = |e: luo_client::Error| refuse(e.errno().get(), String::new());
        let token = |body: &[u8]| {
            let mut r = Reader::new(body);
            let t = r.u64("token");
            r.end("token length")
                .and(t)
                .map_err(|e| refuse(werr::EBADMSG, e.to_string()))
        };
        match f.op {
            op::S_PRESERVE => {
                let t = token(&f.body)?;
                let fd = f.fds.pop().ok_or_else(|| refuse(libc::EBADF, "no fd"))?;
                // The table lock serializes the count and the preserve, so two channels of
                // one uid cannot both take the last file.
                let t_lock = lock_table(self);
                let files: usize = t_lock
                    .iter()
                    .filter(|((u, _, _), _)| *u == uid)
                    .filter_map(|(_, e)| e.held.session.file_count())
                    .sum();
                if files >= self.opts.max_files_per_uid {
                    return Err(refuse(
                        libc::EDQUOT,
                        format!(
                            "uid {uid} has {files} preserved files, its limit \
                             (--max-files-per-uid); release a session to preserve more"
                        ),
                    ));
                }
                session.preserve_fd(&fd, t).map_err(luo)?;
                drop(t_lock);
                if let Ok(st) = backend_user::sys::fstat(fd.as_fd()) {
                    lock(&held.files).insert(t, (st.st_dev, st.st_ino));
                }
                self.keep(
                    Stored::File {
                        uid: held.key.0,
                        name: held.key.2.clone(),
                        token: t,
                    },
                    fd.as_fd(),
                );
                ok(Vec::new())
            }
            op::S_RETRIEVE_FD => {
                let fd = session.retrieve_fd(token(&f.body)?).map_err(luo)?;
                Ok((Vec::new(), vec![fd]))
            }
            op::S_FINISH => {
                if !f.body.is_empty() {
                    return Err(refuse(werr::EBADMSG, "FINISH has no body"));
                }
                session.finish().map_err(luo)?;
                held.finished.store(true, Ordering::Relaxed);
                ok(Vec::new())
            }
            op::S_GET_NAME => {
                if !f.body.is_empty() {
                    return Err(refuse(werr::EBADMSG, "GET_NAME has no body"));
                }
                ok(session.name().map_err(luo)?.into_bytes())
            }
            other => Err(refuse(
                werr::EBADRQC,
                format!("unknown session channel request {other:#x}"),
            )),
        }
    }
}
