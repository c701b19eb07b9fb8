//! The `Platform` implementation for a process.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use luo_core::errno::HandoverError;
use luo_core::{
    DelegateMemory, Error, FileHandler, FlbOps, HandoverMemory, Level, Platform, Result, StdRuntime,
};

use crate::memory::{Memory, PAGE_SIZE};
use crate::{errno_of, sys};

/// A registered file handler of the userspace backend.
pub type HandlerRef = Arc<dyn FileHandler<UserPlatform> + Send + Sync>;
/// A registered FLB of the userspace backend.
pub type FlbRef = Arc<dyn FlbOps + Send + Sync>;

/// std containers and locks, `OwnedFd` files, memfd-backed handover memory.
#[derive(Clone)]
pub struct UserPlatform {
    mem: Arc<Memory>,
}

impl UserPlatform {
    /// A platform over the given handover memory.
    pub fn new(mem: Arc<Memory>) -> Self {
        UserPlatform { mem }
    }

    /// The handover memory.
    pub fn memory(&self) -> &Arc<Memory> {
        &self.mem
    }
}

impl StdRuntime for UserPlatform {}

/// backend-user's handover memory as luo-core's, through `Memory`'s inherent methods (which
/// take precedence over these of the same names).
impl HandoverMemory for Memory {
    const PAGE_SIZE: usize = PAGE_SIZE;

    fn alloc_page(&self) -> Result<u64> {
        Memory::alloc_page(self)
    }

    fn free_page(&self, addr: u64) {
        Memory::free_page(self, addr)
    }

    fn release_incoming_page(&self, addr: u64) {
        self.release_incoming(addr)
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> std::result::Result<(), HandoverError> {
        Memory::read(self, addr, buf)
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result {
        Memory::write(self, addr, data)
    }

    fn incoming_root(&self) -> std::result::Result<Option<(u64, u64)>, HandoverError> {
        Ok(Memory::incoming_root(self))
    }

    fn publish_root(&self, addr: u64, size: u64) -> Result {
        Memory::publish_root(self, addr, size);
        Ok(())
    }
}

impl DelegateMemory for UserPlatform {
    type Memory = Memory;
    fn handover_memory(&self) -> &Memory {
        &self.mem
    }
}

impl Platform for UserPlatform {
    type File = OwnedFd;
    type Handler = HandlerRef;
    type Flb = FlbRef;

    /// The inode (device and number): a process cannot name an open file description, so two
    /// descriptions of one inode count as the same file (stricter than the kernel's pointer).
    fn file_identity(file: &OwnedFd) -> u64 {
        match sys::fstat(file.as_fd()) {
            Ok(st) => st.st_dev.rotate_left(40) ^ st.st_ino,
            Err(_) => 0,
        }
    }

    fn dup_file(file: &OwnedFd) -> Result<OwnedFd> {
        sys::dup_cloexec(file.as_fd()).map_err(|e| match e.raw_os_error() {
            Some(libc::EMFILE) => Error::TooManyFds,
            _ => Error::Platform(errno_of(&e)),
        })
    }

    fn log(&self, level: Level, args: std::fmt::Arguments<'_>) {
        self.mem.log(level, args)
    }
}
