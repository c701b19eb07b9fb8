//! Helpers shared by the targets: echoing handlers and FLBs, and a canonical decoder.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use backend_user::memory::PAGE_SIZE;
use backend_user::{sys, Memory, UserPlatform};
use luo_core::errno::{Errno, EINVAL};
use luo_core::{FileHandler, FlbOps, HandoverError, Platform, Preserved};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many memfds [`Files`] keeps across inputs (the rest are made per input).
const POOLED: usize = 64;

/// Memfds with their identities, made once per process and lent to every input in turn.
static POOL: Mutex<Vec<(OwnedFd, u64)>> = Mutex::new(Vec::new());

/// The distinct files one input's handlers hand out: the `n`-th is a dup of the `n`-th pooled
/// memfd (the first `POOLED`) or a fresh memfd.
///
/// A memfd is only an identity to the handlers and to LUO (its inode; nothing reads or writes
/// it), and LUO's "already preserved" bookkeeping belongs to one `LiveUpdate`, which does not
/// outlive its input: every dup an input takes is closed when its `LiveUpdate`, sessions and
/// files go, so the next input gets files nobody holds, as fresh memfds would be. A dup costs
/// one syscall where `memfd_create` and `fstat` cost two and a new inode.
#[derive(Default)]
pub struct Files {
    next: Mutex<usize>,
}

impl Files {
    /// No file handed out yet.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A new file, distinct from every other one this input got, and its identity.
    fn take(&self) -> Result<(OwnedFd, u64), Errno> {
        let n = {
            let mut next = lock(&self.next);
            *next += 1;
            *next - 1
        };
        let fresh = || {
            let fd = sys::memfd_create(c"luo-fuzz", libc::MFD_CLOEXEC)
                .map_err(|e| backend_user::errno_of(&e))?;
            let id = UserPlatform::file_identity(&fd);
            Ok::<_, Errno>((fd, id))
        };
        if n >= POOLED {
            return fresh();
        }
        let mut pool = lock(&POOL);
        while pool.len() <= n {
            pool.push(fresh()?);
        }
        let (fd, id) = &pool[n];
        let dup = sys::dup_cloexec(fd.as_fd()).map_err(|e| backend_user::errno_of(&e))?;
        Ok((dup, *id))
    }
}

/// The identities of the memfds pooled so far.
pub fn pooled() -> Vec<u64> {
    lock(&POOL).iter().map(|&(_, id)| id).collect()
}

/// A handler that reproduces data words: `retrieve(data)` hands out a new file (see [`Files`])
/// and remembers its identity with `data`; `preserve` of that file hands the same `data` over
/// again.
pub struct EchoHandler {
    compat: String,
    files: Arc<Files>,
    data_of: Mutex<BTreeMap<u64, u64>>,
    retrieved: Mutex<Vec<u64>>,
}

impl EchoHandler {
    /// A handler named `compat`, taking its files from `files`.
    pub fn new(compat: &str, files: &Arc<Files>) -> Arc<Self> {
        Arc::new(EchoHandler {
            compat: compat.to_owned(),
            files: files.clone(),
            data_of: Mutex::new(BTreeMap::new()),
            retrieved: Mutex::new(Vec::new()),
        })
    }

    /// The data words `retrieve` was called with, in order.
    pub fn retrieved(&self) -> Vec<u64> {
        lock(&self.retrieved).clone()
    }
}

impl FileHandler<UserPlatform> for EchoHandler {
    fn key(&self) -> usize {
        core::ptr::from_ref(self) as usize
    }
    fn compatible(&self) -> &[u8] {
        self.compat.as_bytes()
    }
    fn can_preserve(&self, file: &OwnedFd) -> bool {
        lock(&self.data_of).contains_key(&UserPlatform::file_identity(file))
    }
    fn preserve(&self, file: &OwnedFd) -> Result<Preserved, Errno> {
        let id = UserPlatform::file_identity(file);
        let data = *lock(&self.data_of).get(&id).ok_or(EINVAL)?;
        Ok(Preserved { data, private: 0 })
    }
    fn unpreserve(&self, _file: &OwnedFd, _state: Preserved) {}
    fn retrieve(&self, data: u64) -> Result<OwnedFd, Errno> {
        let (fd, id) = self.files.take()?;
        lock(&self.data_of).insert(id, data);
        lock(&self.retrieved).push(data);
        Ok(fd)
    }
    fn finish(&self, _file: Option<&OwnedFd>, _data: u64, _status: luo_core::RetrieveStatus) {}
}

/// The data an [`EchoFlb`] hands over when it received none.
pub const ECHO_FLB_DEFAULT: u64 = 0x00EC_40F1_B000_0000;

/// An FLB that hands over again what it retrieved (or [`ECHO_FLB_DEFAULT`]).
pub struct EchoFlb {
    compat: String,
    incoming: Mutex<Option<u64>>,
}

impl EchoFlb {
    /// An FLB named `compat`.
    pub fn new(compat: &str) -> Arc<Self> {
        Arc::new(EchoFlb {
            compat: compat.to_owned(),
            incoming: Mutex::new(None),
        })
    }

    /// The data it retrieved, if any.
    pub fn incoming(&self) -> Option<u64> {
        *lock(&self.incoming)
    }
}

impl FlbOps for EchoFlb {
    fn key(&self) -> usize {
        core::ptr::from_ref(self) as usize
    }
    fn compatible(&self) -> &[u8] {
        self.compat.as_bytes()
    }
    fn preserve(&self) -> Result<(u64, usize), Errno> {
        Ok((self.incoming().unwrap_or(ECHO_FLB_DEFAULT), 1))
    }
    fn unpreserve(&self, _data: u64, _obj: usize) {}
    fn retrieve(&self, data: u64) -> Result<usize, Errno> {
        *lock(&self.incoming) = Some(data);
        Ok(1)
    }
    fn finish(&self, _data: u64, _obj: usize) {}
}

/// One handed-over file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonFile {
    /// Handler compatible string.
    pub compat: Vec<u8>,
    /// `serialized_data`.
    pub data: u64,
    /// Token.
    pub token: u64,
}

/// One handed-over session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonSession {
    /// Name bytes (no NUL).
    pub name: Vec<u8>,
    /// Files in order.
    pub files: Vec<CanonFile>,
}

/// One handed-over FLB entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonFlb {
    /// FLB compatible string.
    pub compat: Vec<u8>,
    /// Data.
    pub data: u64,
    /// Count.
    pub count: u64,
}

/// The canonical content of a handover image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Canonical {
    /// `liveupdate_num`.
    pub num: u64,
    /// Sessions in order.
    pub sessions: Vec<CanonSession>,
    /// FLB entries in order; None when the image has no FLB page.
    pub flbs: Option<Vec<CanonFlb>>,
}

/// What a handover file holds, read independently of `LiveUpdate`.
#[derive(Debug)]
pub enum Decoded {
    /// Not a handover file (`Memory::from_bytes` refuses it).
    NotAFile,
    /// A handover file with no LUO root: a cold boot.
    Cold,
    /// LUO state refused.
    Refused(HandoverError),
    /// Valid LUO state.
    State(Canonical),
}

/// Decodes handover file bytes with luo-core's reader.
pub fn decode(bytes: &[u8]) -> Decoded {
    decode_owned(bytes.to_vec())
}

/// [`decode`] of bytes the caller no longer needs (no copy).
pub fn decode_owned(bytes: Vec<u8>) -> Decoded {
    let Ok(mem) = Memory::from_bytes(bytes) else {
        return Decoded::NotAFile;
    };
    let p = UserPlatform::new(Arc::new(mem));
    match luo_core::image::parse(&p) {
        Err(e) => Decoded::Refused(e),
        Ok(None) => Decoded::Cold,
        Ok(Some(img)) => Decoded::State(Canonical {
            num: img.liveupdate_num,
            sessions: img
                .sessions
                .iter()
                .map(|s| CanonSession {
                    name: s.name.as_bytes().to_vec(),
                    files: s
                        .files
                        .iter()
                        .map(|f| CanonFile {
                            compat: f.compat.as_bytes().to_vec(),
                            data: f.data,
                            token: f.token,
                        })
                        .collect(),
                })
                .collect(),
            flbs: img.flbs.as_ref().map(|v| {
                v.iter()
                    .map(|f| CanonFlb {
                        compat: f.compat.as_bytes().to_vec(),
                        data: f.data,
                        count: f.count,
                    })
                    .collect()
            }),
        }),
    }
}

/// Reads a native-endian u64 at `off` of `b`, zero-padded past the end.
pub fn word(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    for (i, x) in w.iter_mut().enumerate() {
        *x = b.get(off + i).copied().unwrap_or(0);
    }
    u64::from_ne_bytes(w)
}

/// A 64-byte name field holding `name` (truncated to 64 bytes).
pub fn name_field(name: &[u8]) -> [u8; 64] {
    let mut f = [0u8; 64];
    let n = name.len().min(64);
    f[..n].copy_from_slice(&name[..n]);
    f
}

/// The handover page size.
pub const PAGE: usize = PAGE_SIZE;
