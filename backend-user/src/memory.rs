//! Handover memory for a process: KHO's role, played by a sealed memfd.
//!
//! Outgoing pages live in the process until reboot, when they are written into a new memfd at
//! their addresses (an address is a byte offset into that memfd), and the memfd is sealed and
//! left open across exec. The next image reads the memfd back and serves [`Memory::read`] from
//! it. Page 0 of the memfd is a small header of the backend's own (magic, page size, the root),
//! so no LUO address is ever 0.
//!
//! Format `luo-user-v1` (native endian), page 0:
//! `magic[8] = "LUOUSER1" | page_size u32 | reserved u32 | root u64 | root_size u64 | pages u64`.
//!
//! Page addresses are reused: a freed page's address goes on a free set and the lowest free
//! address is handed out first, and freeing the topmost page lowers the top. The image ends at
//! the highest live page, so its size follows what is live, never how many pages were ever
//! allocated: create/preserve/close in a loop does not grow it. A hole can only be a page freed
//! below a live one, so the image spans at most the peak number of pages live at once.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;

use luo_core::errno::HandoverError;
use luo_core::{Error, Level};

use crate::sys;

/// The name and version of this image format, as the next-image handshake names it.
pub const FORMAT: &str = "luo-user-v1";
/// The handover file's magic.
pub const MAGIC: &[u8; 8] = b"LUOUSER1";
/// Page size of this backend (the `luo-v5` block size).
pub const PAGE_SIZE: usize = 4096;
/// The largest handover file accepted (input larger than this is refused before reading it).
pub const MAX_HANDOVER_BYTES: u64 = 1 << 32;

/// Why a handover file was refused before LUO even looked at it.
#[derive(Debug)]
pub enum HandoverFileError {
    /// Reading the file failed.
    Io(io::Error),
    /// The file is shorter than its header, not page-sized, or too large.
    BadSize(u64),
    /// The header's magic is wrong.
    BadMagic,
    /// The header's page size is not this backend's.
    BadPageSize(u32),
    /// The header's page count disagrees with the file size.
    BadPageCount {
        /// What the header claims.
        claimed: u64,
        /// What the file holds.
        actual: u64,
    },
}

impl std::fmt::Display for HandoverFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandoverFileError::Io(e) => write!(f, "cannot read handover file: {e}"),
            HandoverFileError::BadSize(n) => write!(
                f,
                "at 0x0: handover file size {n} is not a whole number of {PAGE_SIZE}-byte pages \
                 between 1 page and {MAX_HANDOVER_BYTES} bytes"
            ),
            HandoverFileError::BadMagic => {
                write!(
                    f,
                    "at 0x0: magic is not \"LUOUSER1\" (not a luo handover file)"
                )
            }
            HandoverFileError::BadPageSize(n) => {
                write!(f, "at 0x8: page size {n} is not {PAGE_SIZE}")
            }
            HandoverFileError::BadPageCount { claimed, actual } => write!(
                f,
                "at 0x20: header claims {claimed} pages but the file holds {actual}"
            ),
        }
    }
}

impl std::error::Error for HandoverFileError {}

/// Bytes of the header that [`check_header`] reads.
pub const HEADER_LEN: usize = 40;

/// Checks a handover file's size alone: whole pages, at least one, at most
/// [`MAX_HANDOVER_BYTES`].
pub fn check_size(len: u64) -> Result<(), HandoverFileError> {
    if len < PAGE_SIZE as u64 || len % PAGE_SIZE as u64 != 0 || len > MAX_HANDOVER_BYTES {
        return Err(HandoverFileError::BadSize(len));
    }
    Ok(())
}

/// Checks a handover file of `len` bytes by its size and its header (the file's first bytes,
/// at least [`HEADER_LEN`] of them) before the rest is read: size, magic, page size, page
/// count. Returns the root's address and size (address 0: no LUO state).
pub fn check_header(header: &[u8], len: u64) -> Result<(u64, u64), HandoverFileError> {
    check_size(len)?;
    let Some(h) = header.get(..HEADER_LEN) else {
        return Err(HandoverFileError::BadSize(header.len() as u64));
    };
    if &h[..8] != MAGIC {
        return Err(HandoverFileError::BadMagic);
    }
    let word = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[o..o + 8]);
        u64::from_ne_bytes(b)
    };
    let page_size = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
    if page_size as usize != PAGE_SIZE {
        return Err(HandoverFileError::BadPageSize(page_size));
    }
    let pages = word(32);
    if pages != len / PAGE_SIZE as u64 {
        return Err(HandoverFileError::BadPageCount {
            claimed: pages,
            actual: len / PAGE_SIZE as u64,
        });
    }
    Ok((word(16), word(24)))
}

/// Counters and knobs for tests and fuzzing.
#[derive(Default)]
struct Faults {
    /// Fail page allocation after this many more successes.
    alloc_fail_after: Option<usize>,
    /// A lower image size limit than [`MAX_HANDOVER_BYTES`].
    max_image: Option<u64>,
}

/// The outgoing pages. Invariant: every page address in `[PAGE_SIZE, next)` is either in
/// `pages` (live) or in `free`, never both, and the page just below `next` is live.
#[derive(Default)]
struct Arena {
    pages: BTreeMap<u64, Box<[u8]>>,
    /// Freed addresses below `next`; the lowest is reused first.
    free: BTreeSet<u64>,
    /// One past the highest address handed out and not freed.
    next: u64,
    root: Option<(u64, u64)>,
}

impl Arena {
    /// The lowest free address, or a new one at the top. O(log n).
    fn take_addr(&mut self) -> u64 {
        if let Some(addr) = self.free.pop_first() {
            return addr;
        }
        let addr = self.next;
        self.next += PAGE_SIZE as u64;
        addr
    }

    /// Returns a freed page's address; the top comes down past every free page under it
    /// (amortized O(log n): each address is put on the free set and taken off it once).
    fn give_back(&mut self, addr: u64) {
        if addr + PAGE_SIZE as u64 != self.next {
            self.free.insert(addr);
            return;
        }
        self.next = addr;
        while let Some(&top) = self.free.last() {
            if top + PAGE_SIZE as u64 != self.next {
                break;
            }
            self.free.pop_last();
            self.next = top;
        }
    }
}

struct Incoming {
    bytes: Vec<u8>,
    root: Option<(u64, u64)>,
    released: BTreeSet<u64>,
}

/// The process's handover memory: outgoing pages, and the incoming image if booted from one.
pub struct Memory {
    out: Mutex<Arena>,
    incoming: Mutex<Option<Incoming>>,
    faults: Mutex<Faults>,
    log: Mutex<Vec<(Level, String)>>,
    echo_log: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Memory {
    /// Empty memory: a cold boot.
    pub fn new() -> Self {
        Memory {
            out: Mutex::new(Arena {
                next: PAGE_SIZE as u64,
                ..Arena::default()
            }),
            incoming: Mutex::new(None),
            faults: Mutex::new(Faults::default()),
            log: Mutex::new(Vec::new()),
            echo_log: std::env::var_os("LUO_LOG").is_some(),
        }
    }

    /// Memory booted from a handover file's bytes (checked: header, size).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, HandoverFileError> {
        let (root, root_size) = check_header(&bytes, bytes.len() as u64)?;
        let mem = Memory::new();
        *lock(&mem.incoming) = Some(Incoming {
            bytes,
            root: if root == 0 {
                None
            } else {
                Some((root, root_size))
            },
            released: BTreeSet::new(),
        });
        Ok(mem)
    }

    /// Memory booted from a handover memfd: the header is checked first, then the file is read
    /// whole (the memory is bounded by its size).
    pub fn from_fd(fd: &OwnedFd) -> Result<Self, HandoverFileError> {
        let st = sys::fstat(fd.as_fd()).map_err(HandoverFileError::Io)?;
        let len = st.st_size as u64;
        check_size(len)?;
        let mut header = [0u8; HEADER_LEN];
        sys::pread_exact(fd.as_fd(), &mut header, 0).map_err(HandoverFileError::Io)?;
        check_header(&header, len)?;
        let mut bytes = vec![0u8; len as usize];
        sys::pread_exact(fd.as_fd(), &mut bytes, 0).map_err(HandoverFileError::Io)?;
        Memory::from_bytes(bytes)
    }

    /// Makes page allocation fail after `n` more successes (None: never).
    pub fn fail_alloc_after(&self, n: Option<usize>) {
        lock(&self.faults).alloc_fail_after = n;
    }

    /// Lowers the largest image [`Memory::image_fits`] accepts (tests; None: the real limit).
    pub fn limit_image(&self, bytes: Option<u64>) {
        lock(&self.faults).max_image = bytes;
    }

    /// The largest handover image the next image accepts: [`MAX_HANDOVER_BYTES`], unless a
    /// test lowered it.
    pub fn max_image(&self) -> u64 {
        lock(&self.faults)
            .max_image
            .map_or(MAX_HANDOVER_BYTES, |m| m.min(MAX_HANDOVER_BYTES))
    }

    /// Allocates a zeroed outgoing page.
    pub fn alloc_page(&self) -> Result<u64, Error> {
        {
            let mut f = lock(&self.faults);
            match f.alloc_fail_after {
                Some(0) => return Err(Error::NoMemory),
                Some(ref mut n) => *n -= 1,
                None => {}
            }
        }
        let page = vec![0u8; PAGE_SIZE].into_boxed_slice();
        let mut a = lock(&self.out);
        let addr = a.take_addr();
        a.pages.insert(addr, page);
        Ok(addr)
    }

    /// Frees an outgoing page; its address is reused by a later [`Memory::alloc_page`].
    pub fn free_page(&self, addr: u64) {
        let mut a = lock(&self.out);
        if a.pages.remove(&addr).is_none() {
            drop(a);
            self.log(Level::Warn, format_args!("freeing unknown page {addr:#x}"));
            return;
        }
        a.give_back(addr);
    }

    /// Number of outgoing pages held (for leak checks).
    pub fn outgoing_pages(&self) -> usize {
        lock(&self.out).pages.len()
    }

    /// Writes into an outgoing page.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), Error> {
        let mut a = lock(&self.out);
        let base = addr - addr % PAGE_SIZE as u64;
        let off = (addr - base) as usize;
        let page = a
            .pages
            .get_mut(&base)
            .ok_or(Error::Platform(luo_core::errno::EFAULT))?;
        let dst = page
            .get_mut(off..off + data.len())
            .ok_or(Error::Platform(luo_core::errno::EFAULT))?;
        dst.copy_from_slice(data);
        Ok(())
    }

    /// Reads from an outgoing page (tests and `luo inspect` of live state).
    pub fn read_outgoing(&self, addr: u64, buf: &mut [u8]) -> Result<(), HandoverError> {
        let a = lock(&self.out);
        let base = addr - addr % PAGE_SIZE as u64;
        let off = (addr - base) as usize;
        let src = a
            .pages
            .get(&base)
            .and_then(|p| p.get(off..off + buf.len()))
            .ok_or(HandoverError::BadAddress { at: addr })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    /// Reads incoming handover memory; the range must lie inside one page past the header.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), HandoverError> {
        let bad = HandoverError::BadAddress { at: addr };
        let guard = lock(&self.incoming);
        let inc = guard.as_ref().ok_or(bad)?;
        let end = addr.checked_add(buf.len() as u64).ok_or(bad)?;
        let page = addr / PAGE_SIZE as u64;
        if page == 0 || buf.is_empty() || (end - 1) / PAGE_SIZE as u64 != page {
            return Err(bad);
        }
        if inc.released.contains(&(page * PAGE_SIZE as u64)) {
            return Err(bad);
        }
        let src = inc.bytes.get(addr as usize..end as usize).ok_or(bad)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    /// Releases an incoming page (`kho_restore_free`): later reads of it fail.
    pub fn release_incoming(&self, addr: u64) {
        let mut guard = lock(&self.incoming);
        if let Some(inc) = guard.as_mut() {
            if !inc.released.insert(addr - addr % PAGE_SIZE as u64) {
                drop(guard);
                self.log(
                    Level::Warn,
                    format_args!("incoming page {addr:#x} released twice"),
                );
            }
        }
    }

    /// Number of incoming pages released so far.
    pub fn released_incoming(&self) -> usize {
        lock(&self.incoming)
            .as_ref()
            .map_or(0, |i| i.released.len())
    }

    /// The incoming root.
    pub fn incoming_root(&self) -> Option<(u64, u64)> {
        lock(&self.incoming).as_ref().and_then(|i| i.root)
    }

    /// Records the outgoing root.
    pub fn publish_root(&self, addr: u64, size: u64) {
        lock(&self.out).root = Some((addr, size));
    }

    /// The size in bytes of the handover image [`Memory::to_bytes`] would write now: the header
    /// page up to the highest live page. Reboot allocates nothing, so this is known before it.
    pub fn image_len(&self) -> u64 {
        Self::end(&lock(&self.out))
    }

    fn end(a: &Arena) -> u64 {
        a.pages
            .keys()
            .next_back()
            .map_or(PAGE_SIZE as u64, |&k| k + PAGE_SIZE as u64)
    }

    /// The handover image as bytes: header page plus every outgoing page at its address.
    pub fn to_bytes(&self) -> Vec<u8> {
        let a = lock(&self.out);
        let end = Self::end(&a);
        let mut bytes = vec![0u8; end as usize];
        bytes[..8].copy_from_slice(MAGIC);
        bytes[8..12].copy_from_slice(&(PAGE_SIZE as u32).to_ne_bytes());
        let (root, size) = a.root.unwrap_or((0, 0));
        bytes[16..24].copy_from_slice(&root.to_ne_bytes());
        bytes[24..32].copy_from_slice(&size.to_ne_bytes());
        bytes[32..40].copy_from_slice(&(end / PAGE_SIZE as u64).to_ne_bytes());
        for (&addr, page) in &a.pages {
            bytes[addr as usize..addr as usize + PAGE_SIZE].copy_from_slice(page);
        }
        bytes
    }

    /// Writes the handover image into a new sealed memfd that stays open across exec.
    pub fn to_memfd(&self) -> io::Result<OwnedFd> {
        let bytes = self.to_bytes();
        let fd = sys::memfd_create(c"luo-handover", libc::MFD_ALLOW_SEALING)?;
        sys::ftruncate(fd.as_fd(), bytes.len() as u64)?;
        sys::pwrite_all(fd.as_fd(), &bytes, 0)?;
        sys::add_seals(
            fd.as_fd(),
            (libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE)
                as u32,
        )?;
        Ok(fd)
    }

    /// Logs a line (kept for tests; echoed to stderr when `LUO_LOG` is set).
    pub fn log(&self, level: Level, args: std::fmt::Arguments<'_>) {
        let line = format!("luo: {args}");
        if self.echo_log {
            // Not eprintln!: it panics when stderr is gone (EPIPE from a dead journal or
            // tee), and a log line must never take the process and its sessions down.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
        lock(&self.log).push((level, line));
    }

    /// The log lines so far.
    pub fn log_lines(&self) -> Vec<(Level, String)> {
        lock(&self.log).clone()
    }
}

impl Default for Memory {
    fn default() -> Self {
        Memory::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE as u64;

    fn image_pages(m: &Memory) -> u64 {
        m.to_bytes().len() as u64 / P
    }

    #[test]
    fn freed_addresses_are_reused_lowest_first_and_the_top_comes_down() {
        let m = Memory::new();
        let a: Vec<u64> = (0..5).map(|_| m.alloc_page().unwrap()).collect();
        assert_eq!(a, [P, 2 * P, 3 * P, 4 * P, 5 * P]);
        m.free_page(4 * P);
        m.free_page(2 * P);
        assert_eq!(image_pages(&m), 6, "holes below a live page stay");
        assert_eq!(m.alloc_page().unwrap(), 2 * P);
        assert_eq!(m.alloc_page().unwrap(), 4 * P);
        assert_eq!(m.alloc_page().unwrap(), 6 * P);
        // Free from the top down across holes: the top comes down past all of them.
        for addr in [3 * P, 5 * P, 6 * P] {
            m.free_page(addr);
        }
        assert_eq!(image_pages(&m), 5, "pages 1, 2, 4 live");
        m.free_page(4 * P);
        assert_eq!(image_pages(&m), 3);
        assert_eq!(lock(&m.out).next, 3 * P);
        assert!(lock(&m.out).free.is_empty());
        assert_eq!(m.alloc_page().unwrap(), 3 * P);
    }

    #[test]
    fn a_reused_page_is_zeroed_and_unknown_frees_change_nothing() {
        let m = Memory::new();
        let a = m.alloc_page().unwrap();
        let b = m.alloc_page().unwrap();
        m.write(a, &[0xaa; 16]).unwrap();
        m.free_page(a);
        m.free_page(a);
        m.free_page(77 * P);
        assert_eq!(m.alloc_page().unwrap(), a);
        let mut buf = [1u8; 16];
        m.read_outgoing(a, &mut buf).unwrap();
        assert_eq!(buf, [0; 16]);
        assert_eq!(m.alloc_page().unwrap(), b + P);
        assert_eq!(m.outgoing_pages(), 3);
        assert!(m
            .log_lines()
            .iter()
            .any(|(_, l)| l.contains("freeing unknown page")));
    }

    #[test]
    fn many_cycles_keep_the_image_at_the_live_size() {
        let m = Memory::new();
        let live = m.alloc_page().unwrap();
        for _ in 0..10_000 {
            let x = m.alloc_page().unwrap();
            let y = m.alloc_page().unwrap();
            m.free_page(x);
            m.free_page(y);
        }
        let last = m.alloc_page().unwrap();
        assert_eq!((live, last), (P, 2 * P));
        assert_eq!(image_pages(&m), 3);
        assert_eq!(m.image_len(), 3 * P);
    }
}
