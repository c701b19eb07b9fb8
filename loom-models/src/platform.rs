//! [`LoomPlatform`]: luo-core's `Platform` over the facade's primitives.
//!
//! Locks and shared pointers are newtypes over the facade (orphan rules forbid implementing
//! luo-core's traits on loom's types directly); unshared containers are std's `Vec` and
//! `BTreeMap` through luo-core's own impls, and the session tables luo-core's `StdIndex` over
//! the loom shared type. Files are fake: a [`FakeFile`] is a number, and its
//! identity is that number. Handover memory is a map of small pages in memory, outgoing and
//! (when booted from a [`Handover`]) incoming.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;

use luo_core::errno::{AllocError, HandoverError, EFAULT, ENOMEM};
use luo_core::{
    Error, HandoverMemory, IndexKey, Level, PMutex, PRwLock, Platform, Result, Runtime,
    SharedLocked, StdIndex,
};

use crate::recorder::{Flb, Handler};
use crate::sync::{self, lock};

/// Page size of the model platform. Small on purpose: a block then holds 3 sessions or 3
/// files, so two or three files already exercise multi-block chains.
pub const PAGE_SIZE: usize = 256;

/// A shared pointer (`Arc`, a refcount in the kernel).
pub struct LArc<T>(sync::Arc<T>);

impl<T> Clone for LArc<T> {
    fn clone(&self) -> Self {
        LArc(self.0.clone())
    }
}

impl<T> Deref for LArc<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> LArc<T> {
    /// Allocates (infallible constructor for the models' own use).
    pub fn new(value: T) -> Self {
        LArc(sync::Arc::new(value))
    }
}

/// A head and a mutex-protected body in one shared allocation (a session).
pub struct LShared<H, T>(sync::Arc<(H, LMutex<T>)>);

impl<H, T> Clone for LShared<H, T> {
    fn clone(&self) -> Self {
        LShared(self.0.clone())
    }
}

impl<H, T> Deref for LShared<H, T> {
    type Target = H;
    fn deref(&self) -> &H {
        &self.0 .0
    }
}

impl<H, T> SharedLocked<H, T> for LShared<H, T> {
    type Guard<'a>
        = sync::MutexGuard<'a, T>
    where
        Self: 'a;
    fn try_new(head: H, body: T) -> core::result::Result<Self, AllocError> {
        Ok(LShared(sync::Arc::new((head, LMutex::new(body)))))
    }
    fn lock(&self) -> sync::MutexGuard<'_, T> {
        self.0 .1.lock()
    }
    fn ptr_eq(a: &Self, b: &Self) -> bool {
        sync::Arc::ptr_eq(&a.0, &b.0)
    }
}

/// A mutex (`struct mutex`).
pub struct LMutex<T>(sync::Mutex<T>);

impl<T> LMutex<T> {
    /// A new unlocked mutex.
    pub fn new(value: T) -> Self {
        LMutex(sync::Mutex::new(value))
    }
}

impl<T> PMutex<T> for LMutex<T> {
    type Guard<'a>
        = sync::MutexGuard<'a, T>
    where
        Self: 'a;
    fn try_new(value: T) -> core::result::Result<Self, AllocError> {
        Ok(LMutex::new(value))
    }
    fn lock(&self) -> sync::MutexGuard<'_, T> {
        lock(&self.0)
    }
}

/// A reader/writer lock (`struct rw_semaphore`).
pub struct LRwLock<T>(sync::RwLock<T>);

impl<T> PRwLock<T> for LRwLock<T> {
    type Read<'a>
        = sync::RwLockReadGuard<'a, T>
    where
        Self: 'a;
    type Write<'a>
        = sync::RwLockWriteGuard<'a, T>
    where
        Self: 'a;
    fn try_new(value: T) -> core::result::Result<Self, AllocError> {
        Ok(LRwLock(sync::RwLock::new(value)))
    }
    fn read(&self) -> sync::RwLockReadGuard<'_, T> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn write(&self) -> sync::RwLockWriteGuard<'_, T> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A fake open file: a counted reference to file number `id`. Its identity is `id`, so two
/// `FakeFile`s with the same id are "the same file" (a dup'ed fd, in the kernel's terms).
#[derive(Debug, PartialEq, Eq)]
pub struct FakeFile {
    /// The file's identity.
    pub id: u64,
}

impl FakeFile {
    /// A reference to file `id`.
    pub fn new(id: u64) -> Self {
        FakeFile { id }
    }
}

/// A handover image: the pages and the root, as KHO would pass them to the next kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Handover {
    /// Page address to bytes (each `PAGE_SIZE` long).
    pub pages: BTreeMap<u64, Vec<u8>>,
    /// The `"LUO"` subtree: address and size of `luo_ser`.
    pub root: Option<(u64, u64)>,
}

struct Incoming {
    image: Handover,
    released: BTreeSet<u64>,
}

struct Mem {
    out: BTreeMap<u64, Vec<u8>>,
    next: u64,
    root: Option<(u64, u64)>,
    incoming: Option<Incoming>,
    /// Fail page allocation after this many more successes.
    fail_after: Option<usize>,
}

/// A log line the core wrote.
pub type LogLine = (Level, String);

/// The model platform. Clones share the same memory and log.
#[derive(Clone)]
pub struct LoomPlatform {
    mem: LArc<LMutex<Mem>>,
    log: LArc<LMutex<Vec<LogLine>>>,
}

impl LoomPlatform {
    /// A cold boot: no incoming state.
    pub fn new() -> Self {
        Self::with_incoming(None)
    }

    /// A boot from `image` (produced by [`LoomPlatform::snapshot`] or built by hand).
    pub fn booted_from(image: &Handover) -> Self {
        Self::with_incoming(Some(image.clone()))
    }

    fn with_incoming(image: Option<Handover>) -> Self {
        // Outgoing addresses start past the incoming ones, as fresh physical pages would.
        let next = image
            .as_ref()
            .and_then(|i| i.pages.keys().next_back().copied())
            .map_or(PAGE_SIZE as u64, |last| last + PAGE_SIZE as u64);
        LoomPlatform {
            mem: LArc::new(LMutex::new(Mem {
                out: BTreeMap::new(),
                next,
                root: None,
                incoming: image.map(|image| Incoming {
                    image,
                    released: BTreeSet::new(),
                }),
                fail_after: None,
            })),
            log: LArc::new(LMutex::new(Vec::new())),
        }
    }

    /// The outgoing pages and root as the next kernel would find them.
    pub fn snapshot(&self) -> Handover {
        let m = self.mem.lock();
        Handover {
            pages: m.out.clone(),
            root: m.root,
        }
    }

    /// Number of outgoing pages currently allocated (for leak checks).
    pub fn outgoing_pages(&self) -> usize {
        self.mem.lock().out.len()
    }

    /// Number of incoming pages released so far.
    pub fn released_incoming(&self) -> usize {
        self.mem
            .lock()
            .incoming
            .as_ref()
            .map_or(0, |i| i.released.len())
    }

    /// Makes page allocation fail after `n` more successes (None: never).
    pub fn fail_alloc_after(&self, n: Option<usize>) {
        self.mem.lock().fail_after = n;
    }

    /// Every line logged so far.
    pub fn log_lines(&self) -> Vec<LogLine> {
        self.log.lock().clone()
    }

    /// Lines logged at `Warn` or `Error`: a model that expects none asserts this is empty.
    pub fn complaints(&self) -> Vec<String> {
        self.log
            .lock()
            .iter()
            .filter(|(l, _)| *l != Level::Info)
            .map(|(_, s)| s.clone())
            .collect()
    }
}

impl Default for LoomPlatform {
    fn default() -> Self {
        Self::new()
    }
}

fn page_of(addr: u64) -> (u64, usize) {
    let base = addr - addr % PAGE_SIZE as u64;
    (base, (addr - base) as usize)
}

/// In full although `Vec` and `Map` are std's: luo-core's `StdRuntime` brings std's locks too
/// (why `Runtime` is not split: luo-core's `platform` module docs).
impl Runtime for LoomPlatform {
    type Vec<T> = Vec<T>;
    type Map<K: Ord + Copy, V> = BTreeMap<K, V>;
    type Shared<H: 'static, T: 'static> = LShared<H, T>;
    type Index<H: IndexKey + 'static, T: 'static> = StdIndex<H::Key, LShared<H, T>>;
    type Mutex<T> = LMutex<T>;
    type RwLock<T> = LRwLock<T>;
}

impl HandoverMemory for LoomPlatform {
    const PAGE_SIZE: usize = PAGE_SIZE;

    fn alloc_page(&self) -> Result<u64> {
        let mut m = self.mem.lock();
        match m.fail_after {
            Some(0) => return Err(Error::Platform(ENOMEM)),
            Some(ref mut n) => *n -= 1,
            None => {}
        }
        let addr = m.next;
        m.next += PAGE_SIZE as u64;
        m.out.insert(addr, vec![0; PAGE_SIZE]);
        Ok(addr)
    }

    fn free_page(&self, addr: u64) {
        let gone = self.mem.lock().out.remove(&addr).is_none();
        if gone {
            self.log(Level::Error, format_args!("free of unknown page {addr:#x}"));
        }
    }

    fn release_incoming_page(&self, addr: u64) {
        let twice = match self.mem.lock().incoming.as_mut() {
            Some(inc) => !inc.released.insert(addr),
            None => true,
        };
        if twice {
            self.log(
                Level::Error,
                format_args!("incoming page {addr:#x} released twice or unknown"),
            );
        }
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> core::result::Result<(), HandoverError> {
        let bad = HandoverError::BadAddress { at: addr };
        let (base, off) = page_of(addr);
        let m = self.mem.lock();
        let inc = m.incoming.as_ref().ok_or(bad)?;
        if inc.released.contains(&base) {
            return Err(bad);
        }
        let page = inc.image.pages.get(&base).ok_or(bad)?;
        let src = page.get(off..off + buf.len()).ok_or(bad)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result {
        let (base, off) = page_of(addr);
        let mut m = self.mem.lock();
        let page = m.out.get_mut(&base).ok_or(Error::Platform(EFAULT))?;
        let dst = page
            .get_mut(off..off + data.len())
            .ok_or(Error::Platform(EFAULT))?;
        dst.copy_from_slice(data);
        Ok(())
    }

    fn incoming_root(&self) -> core::result::Result<Option<(u64, u64)>, HandoverError> {
        Ok(self.mem.lock().incoming.as_ref().and_then(|i| i.image.root))
    }

    fn publish_root(&self, addr: u64, size: u64) -> Result {
        self.mem.lock().root = Some((addr, size));
        Ok(())
    }
}

impl Platform for LoomPlatform {
    type File = FakeFile;
    type Handler = Handler;
    type Flb = Flb;

    fn file_identity(file: &FakeFile) -> u64 {
        file.id
    }

    fn dup_file(file: &FakeFile) -> Result<FakeFile> {
        Ok(FakeFile { id: file.id })
    }

    fn log(&self, level: Level, args: core::fmt::Arguments<'_>) {
        self.log.lock().push((level, format!("luo: {args}")));
    }
}
