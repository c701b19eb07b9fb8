//! The client side of luod: connect, ask for sessions by name, receive their fds, listen for
//! updates.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::wire::{self, op, Dir, HandoutKind, Hello, Reader, Status, UpdateRequest};
use crate::{Errno, Error, Result, Session};

/// How often a blocked read wakes up to check its deadline.
const POLL: Duration = Duration::from_millis(100);
/// Default deadline for one request and its reply.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

fn protocol(m: impl Into<String>) -> Error {
    Error::Protocol(m.into())
}

/// A reply's payload and fds.
struct Reply {
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// One request/reply connection (to luod's socket, or a session channel).
struct Conn {
    sock: UnixStream,
    /// Serializes request/reply pairs: frames of two threads must not interleave.
    lock: Mutex<()>,
    tag: AtomicU32,
    timeout: Duration,
}

impl Conn {
    fn new(sock: UnixStream) -> Result<Self> {
        sock.set_read_timeout(Some(POLL)).map_err(Error::Io)?;
        sock.set_write_timeout(Some(DEFAULT_TIMEOUT))
            .map_err(Error::Io)?;
        Ok(Conn {
            sock,
            lock: Mutex::new(()),
            tag: AtomicU32::new(1),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    fn read(&self, deadline: Instant) -> Result<wire::Frame> {
        let left = deadline.saturating_duration_since(Instant::now());
        wire::read_frame(
            &self.sock,
            wire::MAX_REPLY_BODY,
            left.max(POLL),
            &mut || Instant::now() < deadline,
        )
        .map_err(|e| match e {
            wire::RecvError::Io(e) => Error::Io(e),
            wire::RecvError::Stopped | wire::RecvError::TimedOut => Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no reply from luod in time",
            )),
            wire::RecvError::Closed | wire::RecvError::Truncated => Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "luod closed the connection",
            )),
            other => protocol(other.to_string()),
        })
    }

    /// Sends a request and waits for its reply. An error reply is `Error::Luod`.
    fn call(
        &self,
        opc: u16,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
        timeout: Option<Duration>,
    ) -> Result<Reply> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let tag = self.tag.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = wire::write_frame(&self.sock, opc, tag, body, fds) {
            // luod may have refused the connection (too many) and closed it before our
            // request went out: its explanation is waiting to be read.
            return match self.read(Instant::now() + POLL) {
                Ok(f) if f.op == op::REPLY && f.tag == 0 => match wire::parse_reply(&f.body) {
                    Ok(Err((errno, message))) => Err(Error::Luod {
                        errno: Errno::new(errno),
                        message,
                    }),
                    _ => Err(Error::Io(e)),
                },
                _ => Err(Error::Io(e)),
            };
        }
        let deadline = Instant::now() + timeout.unwrap_or(self.timeout);
        let f = self.read(deadline)?;
        // luod answers a request it could not even read (too large, too slow, too many
        // connections) with an error reply to opcode 0, tag 0.
        if f.op == op::REPLY && f.tag == 0 {
            if let Ok(Err((errno, message))) = wire::parse_reply(&f.body) {
                return Err(Error::Luod {
                    errno: Errno::new(errno),
                    message,
                });
            }
        }
        if f.op != opc | op::REPLY || f.tag != tag {
            return Err(protocol(format!(
                "expected reply {:#x}/{tag}, got {:#x}/{}",
                opc | op::REPLY,
                f.op,
                f.tag
            )));
        }
        match wire::parse_reply(&f.body).map_err(|e| protocol(e.to_string()))? {
            Ok(p) => Ok(Reply {
                payload: p.to_vec(),
                fds: f.fds,
            }),
            Err((errno, message)) => Err(Error::Luod {
                errno: Errno::new(errno),
                message,
            }),
        }
    }
}

/// The client end of a session channel: how luod's user backend hands out a session. Each
/// `S_*` request is one LUO session ioctl that luod runs on the session it holds.
pub(crate) struct Channel {
    conn: Conn,
}

/// luod relays LUO's errno on a channel without a message: report it as LUO's, like a kernel
/// session's. A refusal of luod's own (a cap) comes with an explanation and stays luod's.
fn luo_err(e: Error) -> Error {
    match e {
        Error::Luod { errno, message } if message.is_empty() => Error::Luo(errno),
        other => other,
    }
}

impl Channel {
    pub(crate) fn preserve_fd(&self, fd: BorrowedFd<'_>, token: u64) -> Result<()> {
        let body = wire::Writer::new().u64(token).finish();
        self.conn
            .call(op::S_PRESERVE, &body, &[fd], None)
            .map_err(luo_err)?;
        Ok(())
    }

    pub(crate) fn retrieve_fd(&self, token: u64) -> Result<OwnedFd> {
        let body = wire::Writer::new().u64(token).finish();
        let mut r = self
            .conn
            .call(op::S_RETRIEVE_FD, &body, &[], None)
            .map_err(luo_err)?;
        match (r.fds.pop(), r.fds.is_empty()) {
            (Some(fd), true) => Ok(fd),
            _ => Err(protocol("RETRIEVE_FD reply without exactly one fd")),
        }
    }

    pub(crate) fn finish(&self) -> Result<()> {
        self.conn
            .call(op::S_FINISH, &[], &[], None)
            .map_err(luo_err)?;
        Ok(())
    }

    pub(crate) fn name(&self) -> Result<String> {
        let r = self
            .conn
            .call(op::S_GET_NAME, &[], &[], None)
            .map_err(luo_err)?;
        Ok(String::from_utf8_lossy(&r.payload).into_owned())
    }
}

/// A connection to luod.
///
/// luod knows who is calling from the socket (`SO_PEERCRED`), so names are per uid: two users
/// may both have a `"vm0"`, and neither can reach the other's.
pub struct Luod {
    conn: Conn,
    hello: Hello,
}

impl std::fmt::Debug for Luod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Luod({:?})", self.hello)
    }
}

impl Luod {
    /// Where luod listens by default.
    pub const DEFAULT_SOCKET: &'static str = "/run/luod.sock";

    /// Connects and checks the protocol version.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self> {
        let sock = UnixStream::connect(path).map_err(Error::Io)?;
        let conn = Conn::new(sock)?;
        let r = conn.call(op::HELLO, &[], &[], None)?;
        let hello = Hello::decode(&r.payload).map_err(|e| protocol(e.to_string()))?;
        if hello.version != wire::PROTOCOL_VERSION {
            return Err(protocol(format!(
                "luod speaks protocol {}, this client {}",
                hello.version,
                wire::PROTOCOL_VERSION
            )));
        }
        Ok(Luod { conn, hello })
    }

    /// Changes the deadline for each later request's reply (default 30 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.conn.timeout = timeout;
    }

    /// What luod said at connect: backend, generation, the caller's uid as luod sees it.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    fn handout(&self, opc: u16, name: &str) -> Result<Session> {
        let mut r = self.conn.call(opc, name.as_bytes(), &[], None)?;
        let mut rd = Reader::new(&r.payload);
        let kind = rd
            .u8("handout kind")
            .and_then(HandoutKind::from_u8)
            .map_err(|e| protocol(e.to_string()))?;
        let fd = match (r.fds.pop(), r.fds.is_empty()) {
            (Some(fd), true) => fd,
            _ => return Err(protocol("session reply without exactly one fd")),
        };
        Ok(match kind {
            HandoutKind::KernelFd => Session::from_kernel_fd(fd),
            HandoutKind::Channel => Session::from_channel(Channel {
                conn: Conn::new(UnixStream::from(fd))?,
            }),
        })
    }

    /// Creates the outgoing session `name` (kernel name `"<uid>/<name>"`) and hands it over.
    /// `EEXIST` if this uid already has one of that name (use [`Luod::open_session`]).
    pub fn create_session(&self, name: &str) -> Result<Session> {
        self.handout(op::CREATE, name)
    }

    /// Hands over this uid's existing outgoing session `name` again, e.g. after the client
    /// restarted: what it preserved is still there.
    pub fn open_session(&self, name: &str) -> Result<Session> {
        self.handout(op::OPEN, name)
    }

    /// Hands over this uid's session `name` from before the update. luod keeps its own copy
    /// until [`Luod::release_session`], so a client that crashes while restoring may ask again.
    pub fn retrieve_session(&self, name: &str) -> Result<Session> {
        self.handout(op::RETRIEVE, name)
    }

    /// Drops luod's copy of a session. Outgoing: its files are unpreserved once every client
    /// handle is closed too. Incoming: it is finished (unretrieved files are lost).
    pub fn release_session(&self, dir: Dir, name: &str) -> Result<()> {
        let body = wire::Writer::new()
            .u8(dir.to_u8())
            .bytes(name.as_bytes())
            .finish();
        self.conn.call(op::RELEASE, &body, &[], None)?;
        Ok(())
    }

    /// Root: drops luod's copy of `uid`'s session `name` and closes the session channels it
    /// handed out for it (user backend), so the session is really gone. Kernel backend: a
    /// client that still holds the session fd keeps the session alive; luod no longer does,
    /// and no longer lists it. `EPERM` for other uids, `EBADRQC` from a luod that predates it.
    pub fn release_session_of(&self, uid: u32, dir: Dir, name: &str) -> Result<()> {
        let body = wire::Writer::new()
            .u8(dir.to_u8())
            .u32(uid)
            .bytes(name.as_bytes())
            .finish();
        self.conn.call(op::RELEASE_UID, &body, &[], None)?;
        Ok(())
    }

    /// Hands luod a kernel session fd this client still holds, for a luod that lost its own
    /// copy (it was restarted without systemd's fd store): luod checks with GET_NAME that the
    /// session is this uid's `"<uid>/<name>"` and holds (and lists, and hands over at the next
    /// update) it again. `EEXIST` if luod has that session; `EOPNOTSUPP` from the user
    /// backend (its sessions live inside luod); `EBADRQC` from a luod that predates it.
    pub fn adopt_session(&self, dir: Dir, name: &str, session: &Session) -> Result<()> {
        let fd = session.kernel_fd().ok_or_else(|| {
            protocol("only a kernel session fd can be adopted (a session channel is luod's own)")
        })?;
        let body = wire::Writer::new()
            .u8(dir.to_u8())
            .bytes(name.as_bytes())
            .finish();
        self.conn.call(op::ADOPT, &body, &[fd], None)?;
        Ok(())
    }

    /// luod's state and the sessions this uid may see (all of them for root).
    pub fn status(&self) -> Result<Status> {
        let r = self.conn.call(op::STATUS, &[], &[], None)?;
        Status::decode(&r.payload).map_err(|e| protocol(e.to_string()))
    }

    /// Runs an update (root only): load `kernel` (kernel backend), give every listener
    /// `barrier_timeout` to reach the barrier, reboot.
    ///
    /// Returns the next generation number once luod is about to exec its next image (user
    /// backend). With the kernel backend a successful update never answers: the connection
    /// ends when the machine goes down, which this reports as `Error::Io(UnexpectedEof)`.
    /// A refused update is `Error::Luod` with the errno and luod's account of the state.
    pub fn update(
        &self,
        kernel: Option<BorrowedFd<'_>>,
        initrd: Option<BorrowedFd<'_>>,
        cmdline: &[u8],
        barrier_timeout: Duration,
    ) -> Result<u64> {
        self.update_with(kernel, initrd, cmdline, barrier_timeout, false)
            .map(|(generation, _)| generation)
    }

    /// [`Luod::update`], optionally forced (root's override, see `docs/luod.md`): listeners
    /// that refuse or are late, and sessions whose files cannot be frozen, no longer stop the
    /// update; their sessions are dropped instead. Returns the next generation and luod's
    /// account of what it dropped (empty when nothing was). A luod that predates `force`
    /// refuses it with `EBADMSG`.
    pub fn update_with(
        &self,
        kernel: Option<BorrowedFd<'_>>,
        initrd: Option<BorrowedFd<'_>>,
        cmdline: &[u8],
        barrier_timeout: Duration,
        force: bool,
    ) -> Result<(u64, String)> {
        let req = UpdateRequest {
            barrier_timeout_ms: u32::try_from(barrier_timeout.as_millis()).unwrap_or(u32::MAX),
            cmdline: cmdline.to_vec(),
            has_kernel: kernel.is_some(),
            has_initrd: initrd.is_some(),
            force,
        };
        let fds: Vec<BorrowedFd<'_>> = kernel.into_iter().chain(initrd).collect();
        let r = self.conn.call(
            op::UPDATE,
            &req.encode(),
            &fds,
            Some(barrier_timeout + DEFAULT_TIMEOUT),
        )?;
        let mut rd = Reader::new(&r.payload);
        let generation = rd.u64("generation").map_err(|e| protocol(e.to_string()))?;
        Ok((generation, String::from_utf8_lossy(rd.rest()).into_owned()))
    }

    /// Turns this connection into an update listener: luod will not reboot until this client
    /// reached the barrier (or the update's barrier timeout passed, which cancels the update).
    /// `label` names the client in status output and errors.
    pub fn register_for_update(self, label: &str) -> Result<UpdateListener> {
        self.conn.call(op::REGISTER, label.as_bytes(), &[], None)?;
        Ok(UpdateListener {
            conn: self.conn,
            pending: Vec::new(),
            round: 0,
        })
    }
}

/// What luod tells an update listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateEvent {
    /// An update is starting: quiesce (pause the guest, preserve what must survive), then call
    /// [`UpdateListener::reach_barrier`] within `timeout`.
    Prepare {
        /// The barrier timeout.
        timeout: Duration,
        /// Which update this is. [`UpdateListener::reach_barrier`] answers the latest Prepare
        /// that `next_event` returned, so a late answer to an abandoned update can never count
        /// for the next one.
        round: u64,
    },
    /// The update was abandoned (a listener was late or refused, or the kernel refused the
    /// reboot): resume. Nothing preserved was lost.
    Aborted {
        /// Why.
        errno: Errno,
        /// luod's account.
        message: String,
    },
    /// Every listener reached the barrier; luod is rebooting now.
    Rebooting,
    /// luod closed the connection: it went down for the update (or crashed). Reconnect.
    Closed,
}

/// A connection that receives update events. See [`Luod::register_for_update`].
pub struct UpdateListener {
    conn: Conn,
    pending: Vec<UpdateEvent>,
    /// The round of the latest Prepare handed to the caller.
    round: u64,
}

impl UpdateListener {
    /// The socket, to wait for events in an event loop (readable: call
    /// [`UpdateListener::next_event`]).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.sock.as_fd()
    }

    fn event_from(f: &wire::Frame) -> Result<UpdateEvent> {
        let mut r = Reader::new(&f.body);
        let bad = |e: wire::Malformed| protocol(e.to_string());
        Ok(match f.op {
            op::EV_PREPARE => UpdateEvent::Prepare {
                timeout: Duration::from_millis(u64::from(r.u32("timeout").map_err(bad)?)),
                round: r.u64("round").map_err(bad)?,
            },
            op::EV_ABORTED => UpdateEvent::Aborted {
                errno: Errno::new(r.i32("errno").map_err(bad)?),
                message: String::from_utf8_lossy(r.rest()).into_owned(),
            },
            op::EV_REBOOTING => UpdateEvent::Rebooting,
            other => return Err(protocol(format!("unexpected frame {other:#x}"))),
        })
    }

    /// The next event, waiting up to `timeout` (`None`: forever). `Ok(None)` on timeout.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Result<Option<UpdateEvent>> {
        let ev = self.read_event(timeout)?;
        if let Some(UpdateEvent::Prepare { round, .. }) = ev {
            self.round = round;
        }
        Ok(ev)
    }

    fn read_event(&mut self, timeout: Option<Duration>) -> Result<Option<UpdateEvent>> {
        if !self.pending.is_empty() {
            return Ok(Some(self.pending.remove(0)));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let _g = self.conn.lock.lock().unwrap_or_else(|e| e.into_inner());
        let r = wire::read_frame(
            &self.conn.sock,
            wire::MAX_REPLY_BODY,
            self.conn.timeout,
            &mut || deadline.is_none_or(|d| Instant::now() < d),
        );
        match r {
            Ok(f) => Self::event_from(&f).map(Some),
            Err(wire::RecvError::Stopped) => Ok(None),
            Err(wire::RecvError::Closed) => Ok(Some(UpdateEvent::Closed)),
            Err(wire::RecvError::Io(e)) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                Ok(Some(UpdateEvent::Closed))
            }
            Err(wire::RecvError::Io(e)) => Err(Error::Io(e)),
            Err(e) => Err(protocol(e.to_string())),
        }
    }

    fn barrier(&mut self, status: i32) -> Result<()> {
        let _g = self.conn.lock.lock().unwrap_or_else(|e| e.into_inner());
        let tag = self.conn.tag.fetch_add(1, Ordering::Relaxed);
        let body = wire::Writer::new().i32(status).u64(self.round).finish();
        wire::write_frame(&self.conn.sock, op::BARRIER, tag, &body, &[]).map_err(Error::Io)?;
        let deadline = Instant::now() + self.conn.timeout;
        loop {
            let f = self.conn.read(deadline)?;
            if f.op == op::BARRIER | op::REPLY && f.tag == tag {
                return match wire::parse_reply(&f.body).map_err(|e| protocol(e.to_string()))? {
                    Ok(_) => Ok(()),
                    Err((errno, message)) => Err(Error::Luod {
                        errno: Errno::new(errno),
                        message,
                    }),
                };
            }
            // An event that raced with our reply: keep it for next_event.
            self.pending.push(Self::event_from(&f)?);
        }
    }

    /// Tells luod this client reached the barrier of the latest Prepare: it may reboot as far
    /// as this client is concerned. `EINVAL` if that update is no longer waiting (it was
    /// abandoned meanwhile: an `Aborted` event follows).
    pub fn reach_barrier(&mut self) -> Result<()> {
        self.barrier(0)
    }

    /// Tells luod this client cannot go through with the update; luod abandons it and reports
    /// `errno`.
    pub fn refuse(&mut self, errno: Errno) -> Result<()> {
        self.barrier(errno.get())
    }
}

impl AsRawFd for UpdateListener {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.conn.sock.as_raw_fd()
    }
}
