//! luod's wire protocol, version 1: framing, opcodes and message bodies, shared by the daemon
//! and the client so the two cannot drift. `docs/luod.md` describes the same bytes in prose.
//!
//! A frame is a 12-byte header and a body:
//!
//! ```text
//! offset 0  u32 len      body length in bytes (little-endian, like every integer here)
//! offset 4  u16 version  PROTOCOL_VERSION
//! offset 6  u16 op       request opcode; replies are op | REPLY; events have their own opcodes
//! offset 8  u32 tag      chosen by the requester, echoed in the reply (events carry 0)
//! ```
//!
//! The header layout is the same in every version, so a peer that does not speak a version
//! can still skip the body and answer `EPROTONOSUPPORT`. Fds travel as `SCM_RIGHTS` attached
//! to the frame's bytes. A reply body starts with an `i32` status: 0, then the payload; or a
//! positive errno, then a UTF-8 explanation.
//!
//! Nothing here trusts its input: every decoder returns [`Malformed`] instead of panicking.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::sys;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Header size.
pub const HEADER_LEN: usize = 12;
/// Largest request body luod accepts. Requests are small (a name, a command line).
pub const MAX_REQUEST_BODY: usize = 4096;
/// Largest reply or event body a client accepts (a STATUS reply lists every session).
pub const MAX_REPLY_BODY: usize = 1 << 20;
/// Longest session name a client may ask for. The kernel-visible name is `"<uid>/<name>"`;
/// the longest uid prefix is 11 bytes (`"4294967295/"`), and LUO names hold 63 bytes, so 52
/// keeps every valid name valid for every uid.
pub const MAX_NAME: usize = 52;
/// Longest update-listener label.
pub const MAX_LABEL: usize = 64;
/// The session luod keeps its own manifest in. Client sessions always carry a `"<uid>/"`
/// prefix, so no client can create or claim this name.
pub const MANIFEST_SESSION: &str = "luod";

/// Opcodes.
pub mod op {
    /// Version and identity handshake.
    pub const HELLO: u16 = 0x01;
    /// Create an outgoing session; reply carries its fd.
    pub const CREATE: u16 = 0x02;
    /// Hand out an existing outgoing session again (after a reconnect).
    pub const OPEN: u16 = 0x03;
    /// Hand out an incoming session (after an update).
    pub const RETRIEVE: u16 = 0x04;
    /// Drop luod's copy of a session.
    pub const RELEASE: u16 = 0x05;
    /// Sessions and daemon state.
    pub const STATUS: u16 = 0x06;
    /// Turn this connection into an update listener.
    pub const REGISTER: u16 = 0x07;
    /// A listener reached (or refused) the barrier.
    pub const BARRIER: u16 = 0x08;
    /// Load the next kernel, run the barrier, reboot.
    pub const UPDATE: u16 = 0x09;
    /// Root: drop luod's copy of another uid's session (and close its session channels).
    pub const RELEASE_UID: u16 = 0x0A;
    /// Kernel backend: hand luod a session fd the client still holds (after luod restarted
    /// without it), so luod holds and lists it again.
    pub const ADOPT: u16 = 0x0B;
    /// Session channel (user backend): PRESERVE_FD.
    pub const S_PRESERVE: u16 = 0x20;
    /// Session channel: RETRIEVE_FD.
    pub const S_RETRIEVE_FD: u16 = 0x21;
    /// Session channel: FINISH.
    pub const S_FINISH: u16 = 0x22;
    /// Session channel: GET_NAME.
    pub const S_GET_NAME: u16 = 0x23;
    /// Event: an update is starting; reach the barrier within the timeout.
    pub const EV_PREPARE: u16 = 0x40;
    /// Event: the update was abandoned; resume.
    pub const EV_ABORTED: u16 = 0x41;
    /// Event: the barrier held; luod is rebooting now.
    pub const EV_REBOOTING: u16 = 0x42;
    /// Set in a reply's opcode.
    pub const REPLY: u16 = 0x8000;
}

/// Errnos luod uses beyond LUO's own (spec §2.6).
pub mod errno {
    /// A message did not parse.
    pub const EBADMSG: i32 = libc::EBADMSG;
    /// A frame longer than the limit.
    pub const EMSGSIZE: i32 = libc::EMSGSIZE;
    /// Unknown protocol version.
    pub const EPROTONOSUPPORT: i32 = libc::EPROTONOSUPPORT;
    /// Unknown opcode.
    pub const EBADRQC: i32 = libc::EBADRQC;
    /// Not allowed for this uid.
    pub const EPERM: i32 = libc::EPERM;
    /// A barrier or frame deadline passed.
    pub const ETIMEDOUT: i32 = libc::ETIMEDOUT;
}

/// Which backend luod drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// `/dev/liveupdate`.
    Kernel,
    /// backend-user in luod's process; an update is an exec of luod.
    User,
}

impl BackendKind {
    fn to_u8(self) -> u8 {
        match self {
            BackendKind::Kernel => 0,
            BackendKind::User => 1,
        }
    }

    fn from_u8(v: u8) -> Result<Self, Malformed> {
        match v {
            0 => Ok(BackendKind::Kernel),
            1 => Ok(BackendKind::User),
            _ => Err(Malformed("backend")),
        }
    }

    /// `"kernel"` or `"user"`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Kernel => "kernel",
            BackendKind::User => "user",
        }
    }
}

/// A body that did not parse; the string names the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed message: bad {}", self.0)
    }
}

/// Little-endian body builder.
#[derive(Default, Debug)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// An empty body.
    pub fn new() -> Self {
        Writer(Vec::new())
    }
    /// Appends a `u8`.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// Appends a `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends an `i32`.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends raw bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// Appends a `u16` length and the bytes (truncated to `u16::MAX`).
    pub fn str16(&mut self, v: &[u8]) -> &mut Self {
        let v = &v[..v.len().min(usize::from(u16::MAX))];
        self.u16(v.len() as u16).bytes(v)
    }
    /// The body.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// Little-endian body reader; every read is bounds-checked.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed(what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Malformed> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    /// Reads a `u8`.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, Malformed> {
        Ok(self.array::<1>(what)?[0])
    }
    /// Reads a `u16`.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, Malformed> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    /// Reads a `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, Malformed> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    /// Reads an `i32`.
    pub fn i32(&mut self, what: &'static str) -> Result<i32, Malformed> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }
    /// Reads a `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, Malformed> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// Reads `n` bytes.
    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        self.take(n, what)
    }
    /// Reads a `u16` length and that many bytes.
    pub fn str16(&mut self, what: &'static str) -> Result<&'a [u8], Malformed> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }
    /// The unread rest.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    /// Fails unless everything was read: trailing bytes are an error, not ignored, so a
    /// message is never half-understood.
    pub fn end(&self, what: &'static str) -> Result<(), Malformed> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Malformed(what))
        }
    }
}

fn allowed_byte(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b'/' && b != b'"' && b != b'\\'
}

/// Checks a client session name: 1..=[`MAX_NAME`] bytes of printable ASCII except `/`, `"` and
/// `\`. No `/` keeps `"<uid>/<name>"` unambiguous; no quotes or backslashes keeps names safe to
/// print in tables, logs and JSON without escaping.
pub fn check_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("session name is empty");
    }
    if name.len() > MAX_NAME {
        return Err("session name is longer than 52 bytes");
    }
    if !name.iter().all(|&b| allowed_byte(b)) {
        return Err("session name has a byte outside printable ASCII, or one of / \" \\");
    }
    Ok(())
}

/// Checks a listener label: up to [`MAX_LABEL`] bytes of the names' alphabet; may be empty.
pub fn check_label(label: &[u8]) -> Result<(), &'static str> {
    if label.len() > MAX_LABEL {
        return Err("label is longer than 64 bytes");
    }
    if !label.iter().all(|&b| allowed_byte(b)) {
        return Err("label has a byte outside printable ASCII, or one of / \" \\");
    }
    Ok(())
}

/// The kernel-visible name of a client's session: `"<uid>/<name>"` (at most 63 bytes for a
/// checked name).
pub fn kernel_name(uid: u32, name: &str) -> String {
    format!("{uid}/{name}")
}

/// Splits a kernel-visible name into its owner and client name, if it is in luod's namespace.
pub fn split_kernel_name(kname: &str) -> Option<(u32, &str)> {
    let (uid, name) = kname.split_once('/')?;
    if uid.is_empty() || uid.len() > 10 || !uid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // No leading zeros: one uid has exactly one spelling.
    if uid.len() > 1 && uid.starts_with('0') {
        return None;
    }
    let uid: u32 = uid.parse().ok()?;
    check_name(name.as_bytes()).ok()?;
    Some((uid, name))
}

/// Which list a session is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dir {
    /// Created in this boot, for the next one.
    Outgoing,
    /// Handed over by the previous boot.
    Incoming,
}

impl Dir {
    /// Wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            Dir::Outgoing => 0,
            Dir::Incoming => 1,
        }
    }
    /// Parses a wire value.
    pub fn from_u8(v: u8) -> Result<Self, Malformed> {
        match v {
            0 => Ok(Dir::Outgoing),
            1 => Ok(Dir::Incoming),
            _ => Err(Malformed("direction")),
        }
    }
    /// `"outgoing"` or `"incoming"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dir::Outgoing => "outgoing",
            Dir::Incoming => "incoming",
        }
    }
}

/// How a session reaches the client in a CREATE/OPEN/RETRIEVE reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoutKind {
    /// The attached fd is a LUO session fd: use the ioctls on it directly.
    KernelFd,
    /// The attached fd is a session channel to luod (user backend): send `S_*` frames on it.
    Channel,
}

impl HandoutKind {
    /// Wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            HandoutKind::KernelFd => 0,
            HandoutKind::Channel => 1,
        }
    }
    /// Parses a wire value.
    pub fn from_u8(v: u8) -> Result<Self, Malformed> {
        match v {
            0 => Ok(HandoutKind::KernelFd),
            1 => Ok(HandoutKind::Channel),
            _ => Err(Malformed("handout kind")),
        }
    }
}

/// HELLO reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version luod speaks.
    pub version: u16,
    /// luod's backend.
    pub backend: BackendKind,
    /// The caller's uid as luod sees it (`SO_PEERCRED`).
    pub uid: u32,
    /// luod's pid.
    pub pid: u32,
    /// Updates since luod's first start (0 on a cold start).
    pub generation: u64,
}

impl Hello {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        Writer::new()
            .u16(self.version)
            .u8(self.backend.to_u8())
            .u8(0)
            .u32(self.uid)
            .u32(self.pid)
            .u64(self.generation)
            .finish()
    }
    /// Decodes the payload.
    pub fn decode(b: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(b);
        let version = r.u16("version")?;
        let backend = BackendKind::from_u8(r.u8("backend")?)?;
        r.u8("reserved")?;
        let h = Hello {
            version,
            backend,
            uid: r.u32("uid")?,
            pid: r.u32("pid")?,
            generation: r.u64("generation")?,
        };
        r.end("hello length")?;
        Ok(h)
    }
}

/// Phase of the update machinery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No update running.
    Idle,
    /// Waiting for listeners to reach the barrier.
    Barrier,
    /// Serializing and rebooting.
    Rebooting,
}

impl Phase {
    fn to_u8(self) -> u8 {
        match self {
            Phase::Idle => 0,
            Phase::Barrier => 1,
            Phase::Rebooting => 2,
        }
    }
    fn from_u8(v: u8) -> Result<Self, Malformed> {
        match v {
            0 => Ok(Phase::Idle),
            1 => Ok(Phase::Barrier),
            2 => Ok(Phase::Rebooting),
            _ => Err(Malformed("phase")),
        }
    }
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Barrier => "barrier",
            Phase::Rebooting => "rebooting",
        }
    }
}

/// One session in a STATUS reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Owner uid.
    pub uid: u32,
    /// Outgoing or incoming.
    pub dir: Dir,
    /// The client's name (the kernel's is `"<uid>/<name>"`).
    pub name: String,
    /// Files in the session, if luod can know (user backend); `None` with the kernel backend,
    /// where clients preserve through their own fd.
    pub files: Option<u32>,
    /// An incoming session finished through luod.
    pub finished: bool,
    /// Handed to a client at least once in this boot.
    pub handed_out: bool,
}

/// STATUS reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// luod's backend.
    pub backend: BackendKind,
    /// Update phase.
    pub phase: Phase,
    /// luod's pid.
    pub pid: u32,
    /// Updates since luod's first start.
    pub generation: u64,
    /// Connected update listeners.
    pub listeners: u32,
    /// Outcome of the last update attempt in this boot: `None` if none ran, `Some((0, _))` if
    /// it passed the barrier, `Some((errno, why))` if it was abandoned.
    pub last_update: Option<(i32, String)>,
    /// Sessions the caller may see (its own; all of them for root).
    pub sessions: Vec<SessionInfo>,
}

impl Status {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(self.backend.to_u8())
            .u8(self.phase.to_u8())
            .u16(0)
            .u32(self.pid)
            .u64(self.generation)
            .u32(self.listeners);
        match &self.last_update {
            None => w.u8(0).i32(0).str16(b""),
            Some((e, m)) => w.u8(1).i32(*e).str16(m.as_bytes()),
        };
        w.u32(self.sessions.len() as u32);
        for s in &self.sessions {
            let flags = u8::from(s.finished) | (u8::from(s.handed_out) << 1);
            w.u32(s.uid)
                .u8(s.dir.to_u8())
                .u8(flags)
                .i32(s.files.map_or(-1, |f| f.min(i32::MAX as u32) as i32))
                .str16(s.name.as_bytes());
        }
        w.finish()
    }

    /// Decodes the payload.
    pub fn decode(b: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(b);
        let backend = BackendKind::from_u8(r.u8("backend")?)?;
        let phase = Phase::from_u8(r.u8("phase")?)?;
        r.u16("reserved")?;
        let pid = r.u32("pid")?;
        let generation = r.u64("generation")?;
        let listeners = r.u32("listeners")?;
        let has_last = r.u8("last update flag")?;
        let last_errno = r.i32("last update errno")?;
        let last_msg = String::from_utf8_lossy(r.str16("last update message")?).into_owned();
        let last_update = (has_last != 0).then_some((last_errno, last_msg));
        let n = r.u32("session count")?;
        let mut sessions = Vec::new();
        for _ in 0..n {
            let uid = r.u32("uid")?;
            let dir = Dir::from_u8(r.u8("direction")?)?;
            let flags = r.u8("flags")?;
            let files = r.i32("files")?;
            let name = r.str16("name")?;
            sessions.push(SessionInfo {
                uid,
                dir,
                name: String::from_utf8_lossy(name).into_owned(),
                files: u32::try_from(files).ok(),
                finished: flags & 1 != 0,
                handed_out: flags & 2 != 0,
            });
        }
        r.end("status length")?;
        Ok(Status {
            backend,
            phase,
            pid,
            generation,
            listeners,
            last_update,
            sessions,
        })
    }
}

/// The UPDATE flags this version knows: 1 kernel fd, 2 initrd fd, 4 force. A luod that
/// predates a flag refuses it (`EBADMSG`), so a client never gets a silently weaker request.
pub const UPDATE_FLAGS: u32 = 7;

/// UPDATE request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpdateRequest {
    /// How long listeners have to reach the barrier, in milliseconds (0: luod's default).
    pub barrier_timeout_ms: u32,
    /// The next kernel's command line (kernel backend).
    pub cmdline: Vec<u8>,
    /// A kernel fd is attached (first fd).
    pub has_kernel: bool,
    /// An initrd fd is attached (after the kernel's).
    pub has_initrd: bool,
    /// Root's forced update: listeners that refuse or are late do not stop it (their sessions
    /// are dropped instead), nor do sessions whose files cannot be frozen (dropped too).
    pub force: bool,
}

impl UpdateRequest {
    /// Encodes the body (the fds travel separately).
    pub fn encode(&self) -> Vec<u8> {
        let flags = u32::from(self.has_kernel)
            | (u32::from(self.has_initrd) << 1)
            | (u32::from(self.force) << 2);
        Writer::new()
            .u32(flags)
            .u32(self.barrier_timeout_ms)
            .bytes(&self.cmdline)
            .finish()
    }
    /// Decodes the body.
    pub fn decode(b: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader::new(b);
        let flags = r.u32("update flags")?;
        if flags & !UPDATE_FLAGS != 0 {
            return Err(Malformed("update flags"));
        }
        let barrier_timeout_ms = r.u32("barrier timeout")?;
        let cmdline = r.rest().to_vec();
        if cmdline.contains(&0) {
            return Err(Malformed("command line"));
        }
        Ok(UpdateRequest {
            barrier_timeout_ms,
            cmdline,
            has_kernel: flags & 1 != 0,
            has_initrd: flags & 2 != 0,
            force: flags & 4 != 0,
        })
    }
    /// Fds this request must carry.
    pub fn fd_count(&self) -> usize {
        usize::from(self.has_kernel) + usize::from(self.has_initrd)
    }
}

/// One received frame.
#[derive(Debug)]
pub struct Frame {
    /// Header version.
    pub version: u16,
    /// Opcode.
    pub op: u16,
    /// Tag.
    pub tag: u32,
    /// Body.
    pub body: Vec<u8>,
    /// Fds that arrived with the frame's bytes (close-on-exec, owned).
    pub fds: Vec<OwnedFd>,
    /// The sender attached more fds than luod keeps; the excess was closed.
    pub fds_truncated: bool,
}

/// Why [`read_frame`] returned no frame.
#[derive(Debug)]
pub enum RecvError {
    /// The peer closed the connection between frames.
    Closed,
    /// The peer closed the connection in the middle of a frame.
    Truncated,
    /// A started frame did not complete within the frame timeout.
    TimedOut,
    /// The header announced a body over the limit; the stream cannot be resynchronized.
    TooLarge {
        /// The announced length.
        len: u32,
        /// The header's opcode.
        op: u16,
        /// The header's tag.
        tag: u32,
    },
    /// The caller's `keep_waiting` said stop while idle between frames.
    Stopped,
    /// A socket error.
    Io(io::Error),
}

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecvError::Closed => write!(f, "connection closed"),
            RecvError::Truncated => write!(f, "connection closed in the middle of a frame"),
            RecvError::TimedOut => write!(f, "frame not completed in time"),
            RecvError::TooLarge { len, .. } => {
                write!(f, "frame body of {len} bytes is over the limit")
            }
            RecvError::Stopped => write!(f, "stopped"),
            RecvError::Io(e) => write!(f, "{e}"),
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads one frame, keeping at most [`sys::MAX_FDS`] fds; see [`read_frame_limited`].
pub fn read_frame(
    sock: &UnixStream,
    max_body: usize,
    frame_timeout: Duration,
    keep_waiting: &mut dyn FnMut() -> bool,
) -> Result<Frame, RecvError> {
    read_frame_limited(
        sock,
        max_body,
        frame_timeout,
        &|_| sys::MAX_FDS,
        keep_waiting,
    )
}

/// Reads one frame.
///
/// The socket's read timeout (if any) is the polling interval: while no byte of a frame has
/// arrived, each timeout asks `keep_waiting` whether to go on (an idle connection may wait
/// forever); once the first byte arrived, the whole frame must complete within
/// `frame_timeout` of it. That deadline is absolute: it is checked after every read, so a peer
/// trickling one byte at a time is cut off as surely as one that stalls (at most one polling
/// interval late).
///
/// `max_fds(None)` bounds the fds kept before the header is complete, `max_fds(Some(op))`
/// after it: a frame can be sent as many small messages, each with its own `SCM_RIGHTS`, so
/// fds beyond the bound are closed the moment they arrive (and the frame is marked
/// [`Frame::fds_truncated`]) instead of being collected: one frame can never pin more fds
/// than its opcode takes.
pub fn read_frame_limited(
    sock: &UnixStream,
    max_body: usize,
    frame_timeout: Duration,
    max_fds: &dyn Fn(Option<u16>) -> usize,
    keep_waiting: &mut dyn FnMut() -> bool,
) -> Result<Frame, RecvError> {
    let mut st = FillState {
        fds: Vec::new(),
        truncated: false,
        started: None,
        frame_timeout,
        max_fds: max_fds(None),
    };
    let mut hdr = [0u8; HEADER_LEN];
    fill(sock, &mut hdr, &mut st, keep_waiting)?;
    let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let version = u16::from_le_bytes([hdr[4], hdr[5]]);
    let op = u16::from_le_bytes([hdr[6], hdr[7]]);
    let tag = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    let n = usize::try_from(len).unwrap_or(usize::MAX);
    if n > max_body {
        return Err(RecvError::TooLarge { len, op, tag });
    }
    st.max_fds = max_fds(Some(op));
    st.keep_at_most();
    let mut body = vec![0u8; n];
    fill(sock, &mut body, &mut st, keep_waiting)?;
    Ok(Frame {
        version,
        op,
        tag,
        body,
        fds: st.fds,
        fds_truncated: st.truncated,
    })
}

/// A frame being read: its fds so far, and its deadline.
struct FillState {
    fds: Vec<OwnedFd>,
    truncated: bool,
    started: Option<Instant>,
    frame_timeout: Duration,
    max_fds: usize,
}

impl FillState {
    /// Closes the fds over the bound (newest first) and remembers that there were some.
    fn keep_at_most(&mut self) {
        if self.fds.len() > self.max_fds {
            self.fds.truncate(self.max_fds);
            self.truncated = true;
        }
    }

    fn past_deadline(&self) -> bool {
        self.started
            .is_some_and(|t| t.elapsed() >= self.frame_timeout)
    }
}

fn fill(
    sock: &UnixStream,
    buf: &mut [u8],
    st: &mut FillState,
    keep_waiting: &mut dyn FnMut() -> bool,
) -> Result<(), RecvError> {
    let mut got = 0;
    while got < buf.len() {
        match sys::recv_with_fds(sock.as_fd(), &mut buf[got..], &mut st.fds) {
            Ok(r) if r.len == 0 => {
                return Err(if st.started.is_none() {
                    RecvError::Closed
                } else {
                    RecvError::Truncated
                });
            }
            Ok(r) => {
                got += r.len;
                st.truncated |= r.fds_truncated;
                st.keep_at_most();
                st.started.get_or_insert_with(Instant::now);
                if got < buf.len() && st.past_deadline() {
                    return Err(RecvError::TimedOut);
                }
            }
            Err(e) if is_timeout(&e) => {
                if st.started.is_none() {
                    if !keep_waiting() {
                        return Err(RecvError::Stopped);
                    }
                } else if st.past_deadline() {
                    return Err(RecvError::TimedOut);
                }
            }
            Err(e) => return Err(RecvError::Io(e)),
        }
    }
    Ok(())
}

/// Encodes a header.
pub fn header(len: u32, version: u16, op: u16, tag: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4..6].copy_from_slice(&version.to_le_bytes());
    h[6..8].copy_from_slice(&op.to_le_bytes());
    h[8..12].copy_from_slice(&tag.to_le_bytes());
    h
}

/// Writes one frame with `fds` attached. The socket's write timeout bounds how long a peer
/// that does not read can hold the writer.
pub fn write_frame(
    sock: &UnixStream,
    op: u16,
    tag: u32,
    body: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "body too large"))?;
    let mut msg = Vec::with_capacity(HEADER_LEN + body.len());
    msg.extend_from_slice(&header(len, PROTOCOL_VERSION, op, tag));
    msg.extend_from_slice(body);
    let mut sent = sys::send_with_fds(sock.as_fd(), &msg, fds)?;
    while sent < msg.len() {
        match sys::send_with_fds(sock.as_fd(), &msg[sent..], &[]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes a reply: status 0 and `payload`.
pub fn write_ok(
    sock: &UnixStream,
    op: u16,
    tag: u32,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut body = Vec::with_capacity(4 + payload.len());
    body.extend_from_slice(&0i32.to_le_bytes());
    body.extend_from_slice(payload);
    write_frame(sock, op | op::REPLY, tag, &body, fds)
}

/// Writes an error reply: `errno` and an explanation.
pub fn write_err(sock: &UnixStream, op: u16, tag: u32, errno: i32, why: &str) -> io::Result<()> {
    let mut body = Vec::with_capacity(4 + why.len());
    body.extend_from_slice(&errno.max(1).to_le_bytes());
    body.extend_from_slice(why.as_bytes());
    write_frame(sock, op | op::REPLY, tag, &body, &[])
}

/// Splits a reply body into `Ok(payload)` or `Err((errno, explanation))`.
pub fn parse_reply(body: &[u8]) -> Result<Result<&[u8], (i32, String)>, Malformed> {
    let mut r = Reader::new(body);
    let status = r.i32("status")?;
    let rest = r.rest();
    if status == 0 {
        Ok(Ok(rest))
    } else if status > 0 {
        Ok(Err((status, String::from_utf8_lossy(rest).into_owned())))
    } else {
        Err(Malformed("status"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name(b"vm0").is_ok());
        assert!(check_name(&[b'a'; MAX_NAME]).is_ok());
        assert!(check_name(&[b'a'; MAX_NAME + 1]).is_err());
        for bad in [&b""[..], b"a/b", b"a b", b"a\0", b"\xff", b"q\"", b"x\\"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        let k = kernel_name(u32::MAX, std::str::from_utf8(&[b'a'; MAX_NAME]).unwrap());
        assert_eq!(k.len(), 63);
        assert_eq!(split_kernel_name("1000/vm"), Some((1000, "vm")));
        assert_eq!(split_kernel_name("0/vm"), Some((0, "vm")));
        for bad in [
            "luod",
            "01/vm",
            "/vm",
            "x/vm",
            "1/",
            "1/a/b",
            "99999999999/a",
        ] {
            assert_eq!(split_kernel_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn labels() {
        assert!(check_label(b"").is_ok());
        assert!(check_label(&[b'l'; MAX_LABEL]).is_ok());
        assert!(check_label(&[b'l'; MAX_LABEL + 1]).is_err());
        let mut l = vec![b'l'; MAX_LABEL];
        l[60] = b' ';
        assert!(check_label(&l).is_err());
    }

    #[test]
    fn status_round_trip() {
        let s = Status {
            backend: BackendKind::User,
            phase: Phase::Barrier,
            pid: 42,
            generation: 7,
            listeners: 2,
            last_update: Some((110, "timed out".into())),
            sessions: vec![
                SessionInfo {
                    uid: 1000,
                    dir: Dir::Incoming,
                    name: "vm".into(),
                    files: Some(3),
                    finished: true,
                    handed_out: true,
                },
                SessionInfo {
                    uid: 0,
                    dir: Dir::Outgoing,
                    name: "x".into(),
                    files: None,
                    finished: false,
                    handed_out: false,
                },
            ],
        };
        let b = s.encode();
        assert_eq!(Status::decode(&b).unwrap(), s);
        // Every strict prefix is malformed, never a panic or a shorter status.
        for n in 0..b.len() {
            assert!(Status::decode(&b[..n]).is_err(), "prefix {n}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(Status::decode(&long).is_err());
    }

    #[test]
    fn hello_and_update_round_trip() {
        let h = Hello {
            version: 1,
            backend: BackendKind::Kernel,
            uid: 5,
            pid: 6,
            generation: 9,
        };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let u = UpdateRequest {
            barrier_timeout_ms: 1500,
            cmdline: b"console=ttyS0 luo_nboot=1".to_vec(),
            has_kernel: true,
            has_initrd: false,
            force: true,
        };
        assert_eq!(UpdateRequest::decode(&u.encode()).unwrap(), u);
        assert!(UpdateRequest::decode(&[8, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(UpdateRequest::decode(&[0, 0, 0, 0, 0, 0, 0, 0, b'a', 0]).is_err());
    }

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let (a, b) = UnixStream::pair().unwrap();
        write_ok(&a, op::HELLO, 77, b"payload", &[]).unwrap();
        let f = read_frame(&b, MAX_REPLY_BODY, Duration::from_secs(1), &mut || true).unwrap();
        assert_eq!((f.op, f.tag, f.version), (op::HELLO | op::REPLY, 77, 1));
        assert_eq!(parse_reply(&f.body).unwrap().unwrap(), b"payload");

        write_err(&a, op::CREATE, 1, libc::EEXIST, "exists").unwrap();
        let f = read_frame(&b, MAX_REPLY_BODY, Duration::from_secs(1), &mut || true).unwrap();
        assert_eq!(
            parse_reply(&f.body).unwrap().unwrap_err(),
            (libc::EEXIST, "exists".to_string())
        );

        // Oversized announcement.
        use std::io::Write;
        (&a).write_all(&header(u32::MAX, 1, op::HELLO, 0)).unwrap();
        match read_frame(&b, MAX_REQUEST_BODY, Duration::from_secs(1), &mut || true) {
            Err(RecvError::TooLarge { len, op, tag }) => {
                assert_eq!((len, op, tag), (u32::MAX, op::HELLO, 0))
            }
            other => panic!("{other:?}"),
        }

        // A stalled frame times out; an idle connection asks keep_waiting.
        b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        (&a).write_all(&[1, 0]).unwrap();
        match read_frame(
            &b,
            MAX_REQUEST_BODY,
            Duration::from_millis(100),
            &mut || true,
        ) {
            Err(RecvError::TimedOut) => {}
            other => panic!("{other:?}"),
        }
        let (c, d) = UnixStream::pair().unwrap();
        d.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let mut asked = 0;
        match read_frame(
            &d,
            MAX_REQUEST_BODY,
            Duration::from_millis(100),
            &mut || {
                asked += 1;
                asked < 3
            },
        ) {
            Err(RecvError::Stopped) => assert_eq!(asked, 3),
            other => panic!("{other:?}"),
        }
        (&c).write_all(&[1, 2, 3]).unwrap();
        drop(c);
        match read_frame(&d, MAX_REQUEST_BODY, Duration::from_secs(1), &mut || true) {
            Err(RecvError::Truncated) => {}
            other => panic!("{other:?}"),
        }
    }
}
