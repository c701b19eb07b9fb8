//! `luo inspect`: decodes a handover image (`luo-user-v1`, the bytes of the handover memfd)
//! into a tree: the root, sessions and their files, handler data, FLBs.
//!
//! Validation is layered: [`backend_user::Memory::from_bytes`] checks the file (header, size),
//! [`luo_core::image::parse`] checks everything LUO reads at boot (root, block chains, names,
//! counts, FLB page) and names the offset and the rule for anything wrong, and this module
//! checks the `memfd-user-v1` data words the same way the handler's `retrieve` would. Input is
//! never trusted: sizes are checked before reading, every read is bounds-checked by `Memory`,
//! and chains are bounded, so malformed input ends in one line, never a panic or a hang.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use backend_user::memory::{check_header, HandoverFileError, HEADER_LEN, PAGE_SIZE};
use backend_user::{Memory, UserPlatform};
use luo_core::errno::HandoverError;
use luo_core::image;
use luo_handlers::MEMFD_USER_COMPATIBLE;
use luo_json::{json_bytes, Json};

use crate::size::format_size;

/// Why an image could not be inspected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InspectError {
    /// The file could not be read (exit status 1).
    Io(String),
    /// The image is malformed: the message names the offset and the rule (exit status 2).
    Malformed(String),
}

impl InspectError {
    /// The exit status `luo inspect` uses for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            InspectError::Io(_) => 1,
            InspectError::Malformed(_) => 2,
        }
    }
}

impl std::fmt::Display for InspectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InspectError::Io(m) | InspectError::Malformed(m) => f.write_str(m),
        }
    }
}

/// `struct luo_ser` as found in the image.
#[derive(Debug, Clone)]
pub struct Root {
    /// Where it lives.
    pub at: u64,
    /// The recorded blob size.
    pub size: u64,
    /// `compatible`, up to its NUL.
    pub compatible: Vec<u8>,
    /// `liveupdate_num`.
    pub liveupdate_num: u64,
    /// `sessions_pa`.
    pub sessions_pa: u64,
    /// `flbs_pa`.
    pub flbs_pa: u64,
}

/// The `memfd-user-v1` handler's data (`MemfdUserSer`) for one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemfdInfo {
    /// File position.
    pub pos: u64,
    /// File size.
    pub size: u64,
    /// `F_SEAL_*` bits.
    pub seals: u32,
    /// Unused flags.
    pub flags: u32,
    /// Always 0 for this handler.
    pub nr_folios: u64,
    /// The fd number kept open across exec.
    pub fd: i64,
    /// `st_dev` of the memfd.
    pub dev: u64,
    /// `st_ino` of the memfd.
    pub ino: u64,
}

/// One preserved file.
#[derive(Debug, Clone)]
pub struct FileEntry {
    /// The user's token.
    pub token: u64,
    /// Where the entry lives.
    pub at: u64,
    /// The handler's compatible string.
    pub compatible: Vec<u8>,
    /// The handler's data word.
    pub data: u64,
    /// Decoded data, for `memfd-user-v1`.
    pub memfd: Option<MemfdInfo>,
}

/// One session.
#[derive(Debug, Clone)]
pub struct SessionEntry {
    /// The name.
    pub name: Vec<u8>,
    /// Where the entry lives.
    pub at: u64,
    /// Files in preservation order.
    pub files: Vec<FileEntry>,
}

/// One FLB entry.
#[derive(Debug, Clone)]
pub struct FlbEntry {
    /// The FLB's compatible string.
    pub name: Vec<u8>,
    /// Its data word.
    pub data: u64,
    /// Dependent file references at reboot.
    pub count: u64,
}

/// A decoded, validated handover image.
#[derive(Debug, Clone)]
pub struct Report {
    /// Image size in bytes.
    pub bytes: u64,
    /// The root, or None for an image without LUO state (a cold boot).
    pub root: Option<Root>,
    /// Sessions in handover order.
    pub sessions: Vec<SessionEntry>,
    /// FLB entries, None if no FLB page was handed over.
    pub flbs: Option<Vec<FlbEntry>>,
}

/// How large a file `luo inspect` reads by default: 256 MiB, far above a real image (a few
/// pages per session and per file: `luo demo`'s is 28 KiB). `--max-size` raises it, up to
/// [`backend_user::memory::MAX_HANDOVER_BYTES`].
pub const DEFAULT_MAX_SIZE: u64 = 256 << 20;

/// [`inspect_path_with`] with [`DEFAULT_MAX_SIZE`].
pub fn inspect_path(path: &Path) -> Result<Report, InspectError> {
    inspect_path_with(path, DEFAULT_MAX_SIZE)
}

/// Reads and inspects the image in `path`. Only a regular file is read (it is opened
/// non-blocking, so a FIFO cannot hang the open); its size and header are checked before the
/// rest is read, and a file larger than `max_size` is refused, so memory use is bounded by
/// `max_size` and a file that is not an image is never read past its first bytes.
pub fn inspect_path_with(path: &Path, max_size: u64) -> Result<Report, InspectError> {
    let io = |what: &str, e: std::io::Error| {
        InspectError::Io(format!("cannot {what} {}: {e}", path.display()))
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| io("open", e))?;
    let meta = file.metadata().map_err(|e| io("stat", e))?;
    if !meta.is_file() {
        return Err(InspectError::Io(format!(
            "{} is a {}, not a regular file",
            path.display(),
            crate::file_kind(&meta.file_type())
        )));
    }
    let len = meta.len();
    check_size(len)?;
    let mut header = [0u8; HEADER_LEN];
    file.read_exact_at(&mut header, 0)
        .map_err(|e| io("read", e))?;
    check_header(&header, len).map_err(malformed_file)?;
    if len > max_size {
        return Err(InspectError::Io(format!(
            "{} is {}, more than the {} cap (--max-size, default {}): pass --max-size {len} to read it",
            path.display(),
            format_size(len),
            format_size(max_size),
            format_size(DEFAULT_MAX_SIZE)
        )));
    }
    let cap = usize::try_from(len).map_err(|_| malformed_file(HandoverFileError::BadSize(len)))?;
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(cap)
        .map_err(|_| InspectError::Io(format!("cannot allocate {len} bytes to read the image")))?;
    (&file)
        .take(len.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| io("read", e))?;
    if bytes.len() as u64 != len {
        return Err(InspectError::Io(format!(
            "{} changed size while being read",
            path.display()
        )));
    }
    inspect_bytes(bytes)
}

fn check_size(len: u64) -> Result<(), InspectError> {
    backend_user::memory::check_size(len).map_err(malformed_file)
}

fn malformed_file(e: HandoverFileError) -> InspectError {
    InspectError::Malformed(e.to_string())
}

/// The message for a LUO-level error: every one names an offset.
fn malformed_luo(e: HandoverError) -> InspectError {
    InspectError::Malformed(match e {
        // The root size is the header's `root_size` field.
        HandoverError::RootTooSmall { .. } => format!("at 0x18: {e}"),
        _ if e.at().is_some() => e.to_string(),
        _ => format!("at 0x0: {e}"),
    })
}

fn word(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(w)
}

fn cstr(field: &[u8]) -> Vec<u8> {
    let len = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    field[..len].to_vec()
}

/// Inspects an image given as bytes.
pub fn inspect_bytes(bytes: Vec<u8>) -> Result<Report, InspectError> {
    let len = bytes.len() as u64;
    check_size(len)?;
    let mem = Arc::new(Memory::from_bytes(bytes).map_err(malformed_file)?);
    let Some((root_at, root_size)) = mem.incoming_root() else {
        return Ok(Report {
            bytes: len,
            root: None,
            sessions: Vec::new(),
            flbs: None,
        });
    };
    // The raw root, for display; `parse` validates it (and releases its page).
    let mut rb = [0u8; 32];
    let raw_root = mem.read(root_at, &mut rb).ok().map(|()| Root {
        at: root_at,
        size: root_size,
        compatible: cstr(&rb[..8]),
        liveupdate_num: word(&rb, 8),
        sessions_pa: word(&rb, 16),
        flbs_pa: word(&rb, 24),
    });
    let platform = UserPlatform::new(mem.clone());
    let img = match image::parse(&platform) {
        Ok(Some(img)) => img,
        Ok(None) => {
            return Ok(Report {
                bytes: len,
                root: None,
                sessions: Vec::new(),
                flbs: None,
            })
        }
        Err(e) => return Err(malformed_luo(e)),
    };
    let root = raw_root.ok_or_else(|| malformed_luo(HandoverError::BadAddress { at: root_at }))?;

    let mut data_seen: BTreeMap<u64, u64> = BTreeMap::new();
    let mut fds_seen: BTreeMap<i64, u64> = BTreeMap::new();
    let mut sessions = Vec::with_capacity(img.sessions.len());
    for s in &img.sessions {
        let mut files = Vec::with_capacity(s.files.len());
        for f in &s.files {
            let compatible = f.compat.as_bytes().to_vec();
            let memfd = if compatible == MEMFD_USER_COMPATIBLE.as_bytes() {
                let info = decode_memfd(&mem, f.data, f.at)?;
                if let Some(prev) = data_seen.insert(f.data, f.at) {
                    return Err(InspectError::Malformed(format!(
                        "at {:#x}: memfd-user-v1 data {:#x} is also the data of the file at {prev:#x}",
                        f.at + 48,
                        f.data
                    )));
                }
                if let Some(prev) = fds_seen.insert(info.fd, f.at) {
                    return Err(InspectError::Malformed(format!(
                        "at {:#x}: memfd-user-v1 fd {} is also the fd of the file at {prev:#x}",
                        f.data + 48,
                        info.fd
                    )));
                }
                Some(info)
            } else {
                None
            };
            files.push(FileEntry {
                token: f.token,
                at: f.at,
                compatible,
                data: f.data,
                memfd,
            });
        }
        sessions.push(SessionEntry {
            name: s.name.as_bytes().to_vec(),
            at: s.at,
            files,
        });
    }
    let flbs = img.flbs.as_ref().map(|v| {
        v.iter()
            .map(|f| FlbEntry {
                name: f.compat.as_bytes().to_vec(),
                data: f.data,
                count: f.count,
            })
            .collect()
    });
    Ok(Report {
        bytes: len,
        root: Some(root),
        sessions,
        flbs,
    })
}

/// Size of `MemfdUserSer`.
const MEMFD_SER_SIZE: usize = 72;

/// Decodes and checks a `memfd-user-v1` data word as the handler's `retrieve` would.
fn decode_memfd(mem: &Memory, data: u64, file_at: u64) -> Result<MemfdInfo, InspectError> {
    let mut b = [0u8; MEMFD_SER_SIZE];
    mem.read(data, &mut b).map_err(|_| {
        InspectError::Malformed(format!(
            "at {:#x}: memfd-user-v1 data {data:#x} does not point at {MEMFD_SER_SIZE} bytes of \
             handover memory outside LUO's own pages",
            file_at + 48
        ))
    })?;
    let w32 = |off: usize| u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
    let info = MemfdInfo {
        pos: word(&b, 0),
        size: word(&b, 8),
        seals: w32(16),
        flags: w32(20),
        nr_folios: word(&b, 24),
        fd: word(&b, 48) as i64,
        dev: word(&b, 56),
        ino: word(&b, 64),
    };
    if info.seals & !luo_handlers::memfd::MEMFD_ALL_SEALS != 0 {
        return Err(InspectError::Malformed(format!(
            "at {:#x}: memfd seals {:#x} are outside F_SEAL_* 0x3f",
            data + 16,
            info.seals
        )));
    }
    if info.fd < 0 || info.fd > i64::from(i32::MAX) {
        return Err(InspectError::Malformed(format!(
            "at {:#x}: memfd-user-v1 fd {} is not an fd number (the file was never frozen)",
            data + 48,
            info.fd
        )));
    }
    Ok(info)
}

fn show(name: &[u8]) -> String {
    format!("\"{}\"", name.escape_ascii())
}

impl Report {
    /// The human-readable tree.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let pages = self.bytes / PAGE_SIZE as u64;
        let _ = writeln!(
            o,
            "handover image: {} bytes ({pages} pages of {PAGE_SIZE}), format luo-user-v1",
            self.bytes
        );
        let Some(root) = &self.root else {
            let _ = writeln!(o, "no LUO root: a cold boot (nothing handed over)");
            return o;
        };
        let _ = writeln!(
            o,
            "luo_ser @ {:#x} ({} bytes): compatible {}, liveupdate_num {}, sessions_pa {:#x}, flbs_pa {:#x}",
            root.at,
            root.size,
            show(&root.compatible),
            root.liveupdate_num,
            root.sessions_pa,
            root.flbs_pa
        );
        let nfiles: usize = self.sessions.iter().map(|s| s.files.len()).sum();
        let _ = writeln!(o, "sessions: {}, files: {nfiles}", self.sessions.len());
        for (i, s) in self.sessions.iter().enumerate() {
            let last_s = i + 1 == self.sessions.len();
            let (branch, indent) = if last_s {
                ("└─", "   ")
            } else {
                ("├─", "│  ")
            };
            let _ = writeln!(
                o,
                "{branch} session {} @ {:#x}: {} file{}",
                show(&s.name),
                s.at,
                s.files.len(),
                if s.files.len() == 1 { "" } else { "s" }
            );
            for (j, f) in s.files.iter().enumerate() {
                let last_f = j + 1 == s.files.len();
                let (fb, fi) = if last_f {
                    ("└─", "   ")
                } else {
                    ("├─", "│  ")
                };
                let _ = writeln!(
                    o,
                    "{indent}{fb} file token {:#x} @ {:#x}: handler {}, data {:#x}",
                    f.token,
                    f.at,
                    show(&f.compatible),
                    f.data
                );
                if let Some(m) = &f.memfd {
                    let _ = writeln!(
                        o,
                        "{indent}{fi}   memfd: size {} ({}), pos {}, seals {:#x}, flags {:#x}, nr_folios {}, fd {}, dev {:#x}, ino {}",
                        m.size,
                        format_size(m.size),
                        m.pos,
                        m.seals,
                        m.flags,
                        m.nr_folios,
                        m.fd,
                        m.dev,
                        m.ino
                    );
                }
            }
        }
        match &self.flbs {
            None => {
                let _ = writeln!(o, "flbs: none (no FLB page)");
            }
            Some(flbs) => {
                let _ = writeln!(
                    o,
                    "flbs @ {:#x}: {} entr{}",
                    root.flbs_pa,
                    flbs.len(),
                    if flbs.len() == 1 { "y" } else { "ies" }
                );
                for (i, f) in flbs.iter().enumerate() {
                    let branch = if i + 1 == flbs.len() {
                        "└─"
                    } else {
                        "├─"
                    };
                    let _ = writeln!(
                        o,
                        "{branch} flb {}: data {:#x}, count {}",
                        show(&f.name),
                        f.data,
                        f.count
                    );
                }
            }
        }
        o
    }

    /// The same tree as JSON (one object; integers as JSON numbers).
    pub fn json(&self) -> String {
        let mut j = Json::new();
        j.begin_object();
        j.key("format").string("luo-user-v1");
        j.key("bytes").u64(self.bytes);
        j.key("page_size").u64(PAGE_SIZE as u64);
        j.key("root");
        match &self.root {
            None => {
                j.null();
            }
            Some(r) => {
                j.begin_object();
                j.key("at").u64(r.at);
                j.key("size").u64(r.size);
                j.key("compatible").raw(&json_bytes(&r.compatible));
                j.key("liveupdate_num").u64(r.liveupdate_num);
                j.key("sessions_pa").u64(r.sessions_pa);
                j.key("flbs_pa").u64(r.flbs_pa);
                j.end_object();
            }
        }
        j.key("sessions").begin_array();
        for s in &self.sessions {
            j.begin_object();
            j.key("name").raw(&json_bytes(&s.name));
            j.key("at").u64(s.at);
            j.key("files").begin_array();
            for f in &s.files {
                j.begin_object();
                j.key("token").u64(f.token);
                j.key("at").u64(f.at);
                j.key("compatible").raw(&json_bytes(&f.compatible));
                j.key("data").u64(f.data);
                if let Some(m) = &f.memfd {
                    j.key("memfd").begin_object();
                    j.key("pos").u64(m.pos);
                    j.key("size").u64(m.size);
                    j.key("seals").u64(u64::from(m.seals));
                    j.key("flags").u64(u64::from(m.flags));
                    j.key("nr_folios").u64(m.nr_folios);
                    j.key("fd").i64(m.fd);
                    j.key("dev").u64(m.dev);
                    j.key("ino").u64(m.ino);
                    j.end_object();
                }
                j.end_object();
            }
            j.end_array();
            j.end_object();
        }
        j.end_array();
        j.key("flbs");
        match &self.flbs {
            None => {
                j.null();
            }
            Some(flbs) => {
                j.begin_array();
                for f in flbs {
                    j.begin_object();
                    j.key("name").raw(&json_bytes(&f.name));
                    j.key("data").u64(f.data);
                    j.key("count").u64(f.count);
                    j.end_object();
                }
                j.end_array();
            }
        }
        j.end_object();
        j.finish()
    }
}
