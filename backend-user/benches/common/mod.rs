//! Shared by the benches: a platform without fds, a handler with nothing behind it, and
//! builders for the states measured.
#![allow(dead_code, unreachable_pub)]

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use backend_user::{sys, HandlerRef, Memory, UserPlatform};
use luo_core::errno::Errno;
use luo_core::{
    create_name, DelegateMemory, FileHandler, FlbOps, Level, Luo, Platform, Preserved,
    RetrieveStatus, SessionRef, StdRuntime,
};

const COMPAT: &str = "bench-v1";

// ------------------------------------------------------------------------------------------
// A platform without fds: UserPlatform's memory, containers and locks; files are integers.
// ------------------------------------------------------------------------------------------

#[derive(Clone)]
pub struct NoFdPlatform {
    pub mem: Arc<Memory>,
}

pub struct NoFdFile(pub u64);

impl StdRuntime for NoFdPlatform {}

impl DelegateMemory for NoFdPlatform {
    type Memory = Memory;
    fn handover_memory(&self) -> &Memory {
        &self.mem
    }
}

impl Platform for NoFdPlatform {
    type File = NoFdFile;
    type Handler = Arc<dyn FileHandler<NoFdPlatform> + Send + Sync>;
    type Flb = Arc<dyn FlbOps + Send + Sync>;
    fn file_identity(file: &NoFdFile) -> u64 {
        file.0
    }
    fn dup_file(file: &NoFdFile) -> luo_core::Result<NoFdFile> {
        Ok(NoFdFile(file.0))
    }
    fn log(&self, level: Level, args: std::fmt::Arguments<'_>) {
        self.mem.log(level, args)
    }
}

/// A handler with nothing behind it: every file is accepted, its data is a counter, and its
/// identity is unique (so one shared file can be preserved many times).
#[derive(Default)]
pub struct NullHandler {
    next: AtomicU64,
}

impl<P: Platform> FileHandler<P> for NullHandler
where
    P::File: 'static,
{
    fn key(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }
    fn compatible(&self) -> &[u8] {
        COMPAT.as_bytes()
    }
    fn can_preserve(&self, _file: &P::File) -> bool {
        true
    }
    fn preserve(&self, _file: &P::File) -> Result<Preserved, Errno> {
        Ok(Preserved {
            data: self.next.fetch_add(1, Ordering::Relaxed),
            private: 0,
        })
    }
    fn unpreserve(&self, _file: &P::File, _state: Preserved) {}
    fn retrieve(&self, _data: u64) -> Result<P::File, Errno> {
        Err(luo_core::errno::EOPNOTSUPP)
    }
    fn finish(&self, _file: Option<&P::File>, _data: u64, _status: RetrieveStatus) {}
    fn get_id(&self, _file: &P::File) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) | 1 << 63
    }
}

pub fn name(i: usize) -> [u8; 64] {
    let mut n = [0u8; 64];
    let s = format!("session-{i}");
    n[..s.len()].copy_from_slice(s.as_bytes());
    n
}

/// CREATE_SESSION through the core, as the ioctl does it (name check, then the operation).
pub fn create<P: Platform>(luo: &Luo<P>, field: &[u8; 64]) -> SessionRef<P> {
    luo.begin()
        .and_then(|l| l.create_session(&create_name(field)?))
        .expect("create_session")
}

/// An orchestrator over `platform` with `sessions` sessions of `files` files each.
pub fn build<P: Platform>(
    platform: P,
    handler: P::Handler,
    sessions: usize,
    files: usize,
    mut file: impl FnMut() -> P::File,
) -> Luo<P> {
    let luo = Luo::new(platform, true).expect("luo");
    luo.start().expect("start");
    luo.register_handler(&handler).expect("register");
    for i in 0..sessions {
        let s = create(&luo, &name(i));
        for t in 0..files {
            let f = file();
            luo.begin()
                .and_then(|l| l.preserve_fd(&s, t as u64, || Ok(f)))
                .expect("preserve_fd");
        }
    }
    luo
}

pub fn nofd(sessions: usize, files: usize) -> (Luo<NoFdPlatform>, Arc<Memory>) {
    let mem = Arc::new(Memory::new());
    let h: Arc<dyn FileHandler<NoFdPlatform> + Send + Sync> = Arc::new(NullHandler::default());
    let mut i = 0;
    let luo = build(
        NoFdPlatform { mem: mem.clone() },
        h,
        sessions,
        files,
        || {
            i += 1;
            NoFdFile(i)
        },
    );
    (luo, mem)
}

pub fn user(shared: &OwnedFd, sessions: usize, files: usize) -> (Luo<UserPlatform>, Arc<Memory>) {
    let mem = Arc::new(Memory::new());
    let h: HandlerRef = Arc::new(NullHandler::default());
    let luo = build(UserPlatform::new(mem.clone()), h, sessions, files, || {
        sys::dup_cloexec(shared.as_fd()).expect("dup")
    });
    (luo, mem)
}

/// The handover image of a state, serialized.
pub fn image(shared: &OwnedFd, sessions: usize, files: usize) -> Vec<u8> {
    if sessions * files > 10_000 {
        let (luo, mem) = nofd(sessions, files);
        luo.reboot().expect("reboot");
        mem.to_bytes()
    } else {
        let (luo, mem) = user(shared, sessions, files);
        luo.reboot().expect("reboot");
        mem.to_bytes()
    }
}

pub fn boot(bytes: Vec<u8>) -> Luo<UserPlatform> {
    let mem = Arc::new(Memory::from_bytes(bytes).expect("image"));
    let luo = Luo::new(UserPlatform::new(mem), true).expect("luo");
    luo.start().expect("start");
    let h: HandlerRef = Arc::new(NullHandler::default());
    luo.register_handler(&h).expect("register");
    luo.open().expect("open");
    assert!(luo.incoming_count() > 0);
    luo
}

pub fn shared_file() -> OwnedFd {
    let path = std::env::temp_dir().join(format!("luo-bench-{}", std::process::id()));
    let f = std::fs::File::create(&path).expect("bench file");
    let _ = std::fs::remove_file(&path);
    f.into()
}
