//! The memfd handler for the userspace backend: upstream `memfd-v2` semantics over exec.
//!
//! The kernel handler pins the memfd's folios and rebuilds a new memfd from them after kexec.
//! A process keeps something better: the memfd itself, which stays open across exec when its
//! `FD_CLOEXEC` flag is cleared. So nothing is copied: `freeze` clears `FD_CLOEXEC` on LUO's
//! reference and records its fd number and inode, and `retrieve` in the next image adopts that fd
//! after checking that the number still names the same inode.
//!
//! Like upstream it accepts only unlinked tmpfs files (memfds, `O_TMPFILE`), refuses seals
//! outside `0x3f` with `EOPNOTSUPP` and files over `u32::MAX` pages with `EFBIG`, and restores
//! size, file position and seals. Unlike the kernel it cannot freeze the file's size while it is
//! preserved; the size is recorded at preserve and again at freeze, and checked at retrieve.
//!
//! Serialized data: the address of a handover page holding [`MemfdUserSer`], whose first 48
//! bytes have upstream `struct memfd_luo_ser`'s layout (`pos`, `size`, `seals`, `flags`, and no
//! folios), followed by the inherited fd number and the inode that identifies it. The compatible
//! string is distinct from the kernel's because the data means something else.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use backend_user::{sys, LiveUpdate, Memory, UserPlatform};
use luo_core::errno::{self, Errno};
use luo_core::{FileHandler, Preserved, RetrieveStatus};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The handler's compatible string.
pub const MEMFD_USER_COMPATIBLE: &str = "memfd-user-v1";
/// `MEMFD_LUO_ALL_SEALS`: SEAL, SHRINK, GROW, WRITE, FUTURE_WRITE, EXEC.
pub const MEMFD_ALL_SEALS: u32 = 0x3f;
/// `TMPFS_MAGIC`: memfds live on shmem.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// What the handler hands over for one memfd.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C, packed)]
pub struct MemfdUserSer {
    /// File position.
    pub pos: u64,
    /// File size.
    pub size: u64,
    /// `F_SEAL_*` bits.
    pub seals: u32,
    /// Unused, zero.
    pub flags: u32,
    /// Always 0: the memory is not described page by page, it stays in the memfd.
    pub nr_folios: u64,
    /// Always zero (upstream `struct kho_vmalloc`).
    pub folios: [u64; 2],
    /// The fd number that stays open across exec; -1 until frozen.
    pub fd: i64,
    /// `st_dev` of the memfd.
    pub dev: u64,
    /// `st_ino` of the memfd.
    pub ino: u64,
}

const _: () = assert!(core::mem::size_of::<MemfdUserSer>() == 72);
const _: () = assert!(core::mem::offset_of!(MemfdUserSer, seals) == 16);
const _: () = assert!(core::mem::offset_of!(MemfdUserSer, nr_folios) == 24);
const _: () = assert!(core::mem::offset_of!(MemfdUserSer, fd) == 48);

/// The userspace memfd handler.
pub struct MemfdHandler {
    mem: Arc<Memory>,
    /// Inherited fd numbers already adopted in this image (a handover naming one twice is
    /// refused instead of closing an fd twice).
    adopted: Mutex<BTreeSet<i64>>,
}

impl MemfdHandler {
    /// A handler allocating its handover pages from `mem`.
    pub fn new(mem: Arc<Memory>) -> Arc<Self> {
        Arc::new(MemfdHandler {
            mem,
            adopted: Mutex::new(BTreeSet::new()),
        })
    }

    fn describe(&self, file: &OwnedFd) -> Result<MemfdUserSer, Errno> {
        let st = sys::fstat(file.as_fd()).map_err(|e| backend_user::errno_of(&e))?;
        // A plain tmpfs file has no seals interface beyond F_SEAL_SEAL; treat errors as none.
        let seals = sys::get_seals(file.as_fd()).unwrap_or(0);
        if seals & !MEMFD_ALL_SEALS != 0 {
            return Err(errno::EOPNOTSUPP);
        }
        let size = st.st_size as u64;
        if size.div_ceil(backend_user::memory::PAGE_SIZE as u64) > u64::from(u32::MAX) {
            return Err(errno::EFBIG);
        }
        let pos =
            sys::lseek(file.as_fd(), 0, libc::SEEK_CUR).map_err(|e| backend_user::errno_of(&e))?;
        Ok(MemfdUserSer {
            pos,
            size,
            seals,
            fd: -1,
            dev: st.st_dev,
            ino: st.st_ino,
            ..MemfdUserSer::default()
        })
    }

    /// Creates the handler, registers it with `lu`, and marks every memfd the previous image
    /// handed over close-on-exec until it is retrieved: a file that is never retrieved then
    /// goes away at the next exec instead of leaking into every later image (upstream drops
    /// such files at the next kexec the same way, by not preserving them again).
    pub fn register(lu: &LiveUpdate) -> luo_core::Result<Arc<Self>> {
        let h = MemfdHandler::new(lu.memory().clone());
        lu.register_handler(h.clone())?;
        let compat = luo_core::abi::Compat::new(MEMFD_USER_COMPATIBLE.as_bytes());
        lu.luo().for_each_pending_incoming_file(|c, data| {
            if Some(*c) != compat {
                return;
            }
            let Ok(ser) = h.read_ser(data) else {
                return;
            };
            let (fd, dev, ino) = (ser.fd, ser.dev, ser.ino);
            let Ok(fd) = i32::try_from(fd) else {
                return;
            };
            // Only an fd that still names the preserved inode is touched.
            if sys::fstat_raw(fd).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino) {
                let _ = sys::set_cloexec_raw(fd);
            }
        });
        Ok(h)
    }

    fn read_ser(&self, data: u64) -> Result<MemfdUserSer, Errno> {
        let mut b = [0u8; core::mem::size_of::<MemfdUserSer>()];
        self.mem.read(data, &mut b).map_err(|_| errno::EINVAL)?;
        MemfdUserSer::read_from_bytes(&b).map_err(|_| errno::EINVAL)
    }

    /// Takes ownership of the inherited fd the ser names, after checking it is the same inode.
    fn adopt(&self, ser: &MemfdUserSer) -> Result<OwnedFd, Errno> {
        let fd = ser.fd;
        if fd < 0 || fd > i64::from(i32::MAX) {
            return Err(errno::EINVAL);
        }
        let mut adopted = self.adopted.lock().unwrap_or_else(|e| e.into_inner());
        if adopted.contains(&fd) || !sys::fd_is_open(fd as i32) {
            return Err(errno::EIO);
        }
        // Check identity before taking ownership of the number. No new fd is needed for that
        // (a duplicate would fail with a full fd table, and the failure would be cached as this
        // file's retrieve status for good).
        let st = sys::fstat_raw(fd as i32).map_err(|_| errno::EIO)?;
        let (dev, ino) = (ser.dev, ser.ino);
        if st.st_dev != dev || st.st_ino != ino {
            return Err(errno::EIO);
        }
        adopted.insert(fd);
        // SAFETY: the number is open, names the inode the previous image preserved (checked
        // above), and no other owner exists in this image: it was inherited across exec and is
        // adopted at most once (the `adopted` set).
        Ok(unsafe { sys::adopt(fd as i32) })
    }
}

impl FileHandler<UserPlatform> for MemfdHandler {
    fn key(&self) -> usize {
        core::ptr::from_ref(self) as usize
    }

    fn compatible(&self) -> &[u8] {
        MEMFD_USER_COMPATIBLE.as_bytes()
    }

    /// `shmem_file(file) && i_nlink == 0`, as upstream.
    fn can_preserve(&self, file: &OwnedFd) -> bool {
        let Ok(fs) = sys::fs_type(file.as_fd()) else {
            return false;
        };
        let Ok(st) = sys::fstat(file.as_fd()) else {
            return false;
        };
        fs == TMPFS_MAGIC && st.st_nlink == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFREG
    }

    fn preserve(&self, file: &OwnedFd) -> Result<Preserved, Errno> {
        let ser = self.describe(file)?;
        let page = self.mem.alloc_page().map_err(|e| e.errno())?;
        if let Err(e) = self.mem.write(page, ser.as_bytes()) {
            self.mem.free_page(page);
            return Err(e.errno());
        }
        Ok(Preserved {
            data: page,
            private: 0,
        })
    }

    fn unpreserve(&self, _file: &OwnedFd, state: Preserved) {
        self.mem.free_page(state.data);
    }

    /// Refreshes position and size, and lets LUO's reference survive exec.
    fn freeze(&self, file: &OwnedFd, state: &mut Preserved) -> Result<(), Errno> {
        let mut ser = self.describe(file)?;
        ser.fd = i64::from(file.as_raw_fd());
        self.mem
            .write(state.data, ser.as_bytes())
            .map_err(|e| e.errno())?;
        sys::set_cloexec(file.as_fd(), false).map_err(|e| backend_user::errno_of(&e))
    }

    fn unfreeze(&self, file: &OwnedFd, _state: Preserved) {
        // Best effort: a failure leaves an fd that leaks into the next exec, nothing worse.
        let _ = sys::set_cloexec(file.as_fd(), true);
    }

    fn retrieve(&self, data: u64) -> Result<OwnedFd, Errno> {
        let ser = self.read_ser(data)?;
        let seals = ser.seals;
        if seals & !MEMFD_ALL_SEALS != 0 {
            return Err(errno::EOPNOTSUPP);
        }
        let fd = self.adopt(&ser)?;
        self.mem.release_incoming(data);
        sys::set_cloexec(fd.as_fd(), true).map_err(|e| backend_user::errno_of(&e))?;
        let st = sys::fstat(fd.as_fd()).map_err(|e| backend_user::errno_of(&e))?;
        let size = ser.size;
        if st.st_size as u64 != size {
            return Err(errno::EIO);
        }
        let have = sys::get_seals(fd.as_fd()).unwrap_or(0);
        if have & seals != seals {
            sys::add_seals(fd.as_fd(), seals & !have).map_err(|e| backend_user::errno_of(&e))?;
        }
        let pos = ser.pos;
        sys::lseek(fd.as_fd(), pos as i64, libc::SEEK_SET)
            .map_err(|e| backend_user::errno_of(&e))?;
        Ok(fd)
    }

    /// A file never retrieved is released: its inherited fd is closed, which frees the memory.
    fn finish(&self, _file: Option<&OwnedFd>, data: u64, status: RetrieveStatus) {
        if status != RetrieveStatus::NotAttempted {
            return;
        }
        if let Ok(ser) = self.read_ser(data) {
            drop(self.adopt(&ser));
        }
        self.mem.release_incoming(data);
    }

    /// The inode, as upstream: two fds of one memfd are one file.
    fn get_id(&self, file: &OwnedFd) -> u64 {
        <UserPlatform as luo_core::Platform>::file_identity(file)
    }
}
