//! The orchestrator: sessions, files, reboot and boot (spec §2.5, §3, §4, §6).
//!
//! Lock order, outermost first (the same hierarchy as upstream, spec §8.1):
//! `device` → `phase` (the serialize rwsem) → `outgoing`/`incoming` session tables →
//! a session's `files` mutex → `registry` → `refs` → `ids`.
//! `phase` is taken shared by every operation and exclusively by [`Luo::reboot`]; once a reboot
//! has serialized the state, every later operation fails with [`Error::Serialized`] (the kernel
//! backend turns that into "block until the kexec", as upstream does).

use crate::abi::{LuoSer, SessionName};
use crate::block::BlockSet;
use crate::errno::{Error, Result};
use crate::image;
use crate::platform::{FileHandler, OrdMap, PMutex, PRwLock, PVec, Platform, RetrieveStatus};
use crate::registry::{Refs, Registry};
use crate::uapi::Direction;
use core::mem::size_of;

/// One log line at a [`Level`]; defined before the modules so that all of them can use it.
macro_rules! log {
    ($p:expr, $lvl:ident, $($arg:tt)*) => {
        $p.log($crate::platform::Level::$lvl, format_args!($($arg)*))
    };
}

mod api;
mod incoming;
mod serialize;
mod session;

use incoming::{Device, Incoming};
use session::{FileEntry, IncomingSlot, Outgoing};
pub use session::{FileSet, Session, SessionHead, SessionRef};

/// The phase, read-locked: holding it keeps `liveupdate_reboot()` out.
type PhaseRead<'a, P> = <<P as Platform>::RwLock<Phase> as PRwLock<Phase>>::Read<'a>;

/// Where the serialize lock stands. A `&Phase` passed to a `*_held` function is the proof
/// that its caller holds the lock (nothing outside this module can make one).
pub(crate) struct Phase {
    /// The outgoing root page, its FLB page and the outgoing `liveupdate_num`.
    root: Option<Root>,
    serialized: bool,
}

/// The outgoing handover's fixed pages, allocated and published at start.
#[derive(Clone, Copy)]
struct Root {
    root: u64,
    flbs: u64,
    num: u64,
}

/// The Live Update Orchestrator over a platform.
pub struct Luo<P: Platform> {
    platform: P,
    enabled: bool,
    incoming_num: u64,
    device: P::Mutex<Device<P>>,
    phase: P::RwLock<Phase>,
    outgoing: P::RwLock<Outgoing<P>>,
    incoming: P::RwLock<P::Map<SessionName, IncomingSlot<P>>>,
    registry: P::RwLock<Registry<P>>,
    refs: P::Mutex<Refs<P>>,
    /// Identities of every file preserved or retrieved-and-not-finished (upstream's xarray).
    ids: P::Mutex<P::Map<u64, ()>>,
}

impl<P: Platform> Luo<P> {
    /// Early boot (`luo_early_startup`): reads and validates the incoming state.
    ///
    /// Never fails on bad incoming state: it is refused, logged once, and reported by the first
    /// open with `EIO` (upstream panics, spec §13 B2). `enabled` is the `liveupdate=` switch
    /// combined with KHO being on; the incoming state is read either way, like upstream.
    pub fn new(platform: P, enabled: bool) -> Result<Self> {
        let (incoming, incoming_num, flbs) = match image::parse(&platform) {
            Ok(None) => (Incoming::None, 0, None),
            Ok(Some(mut img)) => {
                log!(
                    platform,
                    Info,
                    "Retrieved live update data, liveupdate number: {}",
                    img.liveupdate_num
                );
                let num = img.liveupdate_num;
                let flbs = img.flbs.take();
                (Incoming::Pending(img), num, flbs)
            }
            Err(e) => {
                log!(platform, Error, "refusing incoming live update state: {e}");
                (Incoming::Refused(e), 0, None)
            }
        };
        let mut refs = Refs::new();
        refs.load_incoming(flbs.as_ref())?;
        Ok(Luo {
            enabled,
            incoming_num,
            device: P::Mutex::try_new(Device {
                in_use: false,
                incoming,
            })?,
            phase: P::RwLock::try_new(Phase {
                root: None,
                serialized: false,
            })?,
            outgoing: P::RwLock::try_new(Outgoing {
                by_name: Default::default(),
                order: Default::default(),
                blocks: BlockSet::new(),
            })?,
            incoming: P::RwLock::try_new(Default::default())?,
            registry: P::RwLock::try_new(Registry::default())?,
            refs: P::Mutex::try_new(refs)?,
            ids: P::Mutex::try_new(Default::default())?,
            platform,
        })
    }

    /// Late boot (`luo_state_setup`): allocates and publishes the outgoing root and FLB page.
    /// On failure LUO stays disabled, as upstream.
    pub fn start(&self) -> Result {
        if !self.enabled {
            return Err(Error::Disabled);
        }
        let mut phase = self.phase.write();
        if phase.root.is_some() {
            return Ok(());
        }
        let p = &self.platform;
        let root = p.alloc_page()?;
        let flbs = match p.alloc_page() {
            Ok(f) => f,
            Err(e) => {
                p.free_page(root);
                return Err(e);
            }
        };
        let new = Root {
            root,
            flbs,
            num: self.incoming_num.wrapping_add(1),
        };
        let r = new
            .write_root(p, 0)
            .and_then(|()| new.write_flb_header(p, 0))
            .and_then(|()| p.publish_root(root, size_of::<LuoSer>() as u64));
        if let Err(e) = r {
            p.free_page(flbs);
            p.free_page(root);
            return Err(e);
        }
        phase.root = Some(new);
        Ok(())
    }

    /// The platform.
    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// `liveupdate_enabled()`: switched on and the outgoing state exists.
    pub fn enabled(&self) -> bool {
        self.enabled && self.phase.read().root.is_some()
    }

    /// `liveupdate_num` this kernel will hand over (previous + 1).
    pub fn liveupdate_num(&self) -> u64 {
        self.incoming_num.wrapping_add(1)
    }

    /// Reads the shared phase and fails if LUO is off or the state was serialized.
    fn live(&self) -> Result<PhaseRead<'_, P>> {
        let phase = self.live_or_incoming()?;
        self.check_live(&phase)?;
        Ok(phase)
    }

    /// With the phase read: fails if LUO is off (outgoing work needs a published root).
    pub(crate) fn check_live(&self, phase: &Phase) -> Result {
        if !self.enabled || phase.root.is_none() {
            return Err(Error::Disabled);
        }
        Ok(())
    }

    /// Incoming work needs only "not serialized": it is allowed even if outgoing setup failed.
    ///
    /// The session ioctls take this once, after decoding, and hold it while the command runs
    /// (upstream's serialize rwsem, spec §2.4 step 7): `ESHUTDOWN` once the state is
    /// serialized for the next kernel, where upstream's session ioctls block.
    #[inline]
    pub(crate) fn live_or_incoming(&self) -> Result<PhaseRead<'_, P>> {
        let phase = self.phase.read();
        if phase.serialized {
            return Err(Error::Serialized);
        }
        Ok(phase)
    }

    /// CREATE_SESSION after the fd is reserved (spec §2.5): name rules, then unique insert.
    pub fn create_session(&self, name: &[u8; 64]) -> Result<SessionRef<P>> {
        let name = SessionName::from_field(name).map_err(|e| match e {
            crate::abi::NameError::Empty => Error::NameEmpty,
            crate::abi::NameError::Unterminated => Error::NameUnterminated,
        })?;
        let _phase = self.live()?;
        let mut out = self.outgoing.write();
        // Check the name before growing the block set (upstream grows first and leaks an empty
        // block on EEXIST, which panics the next kernel: bug B1).
        if out.by_name.contains(&name) {
            return Err(Error::NameExists);
        }
        let session = Session::<P>::try_new(name, Direction::Outgoing)?;
        let count = out.len();
        out.order.try_reserve(1)?;
        out.blocks.grow(&self.platform, count + 1)?;
        let index = out.order.len();
        session.files().slot = index;
        if out.by_name.try_insert(name, ()).is_err() {
            out.blocks.shrink(&self.platform, count);
            return Err(Error::NoMemory);
        }
        // Reserved above, so this cannot fail; undone all the same if it did.
        if out.order.try_push(Some(session.clone())).is_err() {
            out.by_name.remove(&name);
            out.blocks.shrink(&self.platform, count);
            return Err(Error::NoMemory);
        }
        Ok(session)
    }

    /// The last fd of a session closed.
    ///
    /// Outgoing: every file is unpreserved, newest first, and the session is gone. Incoming:
    /// an implicit FINISH; if a `can_finish` refuses, the session goes back to the unretrieved
    /// state so it can be retrieved and finished later (upstream leaks it forever: bug B7).
    pub fn release_session(&self, s: &SessionRef<P>) -> Result {
        let _phase = self.live_or_incoming()?;
        match s.dir {
            Direction::Outgoing => {
                // Nobody else holds this session (its last fd closed, and reboot excludes us
                // through the phase lock), so callbacks run without the table lock.
                {
                    let mut set = s.files();
                    if set.closed {
                        return Err(Error::BadFd);
                    }
                    set.closed = true;
                    self.unpreserve_all(&mut set);
                }
                let mut out = self.outgoing.write();
                if out.remove(s) {
                    let count = out.len();
                    out.blocks.shrink(&self.platform, count);
                }
                Ok(())
            }
            Direction::Incoming => {
                let r = {
                    let mut set = s.files();
                    if set.closed {
                        return Err(Error::BadFd);
                    }
                    let r = self.finish_files(&mut set);
                    // A refused finish puts the session back for a later retrieve (B7).
                    set.closed = r.is_ok();
                    r
                };
                let mut table = self.incoming.write();
                match r {
                    Ok(()) => {
                        table.remove(&s.name);
                        Ok(())
                    }
                    Err(e) => {
                        log!(
                            self.platform,
                            Warn,
                            "Unable to finish session [{}] on release",
                            s.name
                        );
                        if let Some(slot) = table.get_mut(&s.name) {
                            slot.retrieved = false;
                        }
                        Err(e)
                    }
                }
            }
        }
    }

    fn unpreserve_all(&self, set: &mut FileSet<P>) {
        while let Some(e) = set.pop_last() {
            if let Some(file) = e.file.as_ref() {
                e.handler.unpreserve(file, e.state);
            }
            {
                let reg = self.registry.read();
                let mut refs = self.refs.lock();
                refs.file_unpreserve(&reg, e.hkey);
                refs.live_dec(e.hkey);
            }
            if let Some(id) = e.id {
                self.ids.lock().remove(&id);
            }
            e.handler.put_owner();
            let n = set.files.len();
            set.blocks.shrink(&self.platform, n);
            // `e.file` (LUO's reference) drops here.
        }
        set.blocks.destroy(&self.platform);
    }

    // ---------------------------------------------------------------------------------------
    // Session operations
    // ---------------------------------------------------------------------------------------

    /// PRESERVE_FD (spec §4.2), with upstream's check order. `fget` resolves the fd; it runs
    /// after the token check and the block reservation, as upstream's `fget` does.
    pub fn preserve_fd(
        &self,
        s: &SessionRef<P>,
        token: u64,
        fget: impl FnOnce() -> Result<P::File>,
    ) -> Result {
        if s.dir != Direction::Outgoing {
            return Err(Error::WrongDirection);
        }
        let phase = self.live()?;
        self.preserve_fd_held(&phase, s, token, fget)
    }

    /// PRESERVE_FD with the phase read and live (`check_live`); `s` is outgoing.
    pub(crate) fn preserve_fd_held(
        &self,
        _phase: &Phase,
        s: &SessionRef<P>,
        token: u64,
        fget: impl FnOnce() -> Result<P::File>,
    ) -> Result {
        let mut set = s.files();
        if set.closed {
            return Err(Error::BadFd);
        }
        if set.by_token.contains(&token) {
            return Err(Error::TokenInUse);
        }
        let count = set.files.len();
        set.blocks.grow(&self.platform, count + 1)?;
        let r = self.preserve_locked(&mut set, token, fget);
        if r.is_err() {
            set.blocks.shrink(&self.platform, count);
        }
        r
    }

    fn preserve_locked(
        &self,
        set: &mut FileSet<P>,
        token: u64,
        fget: impl FnOnce() -> Result<P::File>,
    ) -> Result {
        let file = fget()?;
        let reg = self.registry.read();
        let (hkey, handler) = reg.find_handler(&file).ok_or(Error::NoHandler)?;
        if !handler.get_owner() {
            return Err(Error::NoHandler);
        }
        let id = handler.get_id(&file);
        let undo_owner = |e: Error| {
            handler.put_owner();
            Err(e)
        };
        match self.ids.lock().try_insert(id, ()) {
            Ok(None) => {}
            Ok(Some(())) => return undo_owner(Error::AlreadyPreserved),
            Err(_) => return undo_owner(Error::NoMemory),
        }
        let undo_id = |e: Error| {
            self.ids.lock().remove(&id);
            undo_owner(e)
        };
        {
            let mut refs = self.refs.lock();
            if let Err(e) = refs.file_preserve(&reg, hkey) {
                drop(refs);
                return undo_id(e);
            }
            if let Err(e) = refs.live_inc(hkey) {
                refs.file_unpreserve(&reg, hkey);
                drop(refs);
                return undo_id(e);
            }
        }
        let undo_flb = |e: Error| {
            let mut refs = self.refs.lock();
            refs.live_dec(hkey);
            refs.file_unpreserve(&reg, hkey);
            drop(refs);
            undo_id(e)
        };
        // Reserve the map slots first: once `preserve` ran, recording the file cannot fail.
        if set.reserve_one().is_err() {
            return undo_flb(Error::NoMemory);
        }
        let state = match handler.preserve(&file) {
            Ok(state) => state,
            Err(e) => return undo_flb(Error::Handler(e)),
        };
        let entry = FileEntry::<P> {
            hkey,
            handler: handler.clone(),
            file: Some(file),
            state,
            token,
            status: RetrieveStatus::NotAttempted,
            id: Some(id),
        };
        set.insert(entry)
    }

    /// RETRIEVE_FD (spec §4.4): returns a new reference to the file for a new fd.
    pub fn retrieve_fd(&self, s: &SessionRef<P>, token: u64) -> Result<P::File> {
        if s.dir != Direction::Incoming {
            return Err(Error::WrongDirection);
        }
        let phase = self.live_or_incoming()?;
        self.retrieve_fd_held(&phase, s, token)
    }

    /// RETRIEVE_FD with the phase read; `s` is incoming.
    pub(crate) fn retrieve_fd_held(
        &self,
        _phase: &Phase,
        s: &SessionRef<P>,
        token: u64,
    ) -> Result<P::File> {
        let mut set = s.files();
        if set.closed {
            return Err(Error::BadFd);
        }
        let index = *set.by_token.get(&token).ok_or(Error::NoSuchToken)?;
        let entry = set
            .files
            .as_mut_slice()
            .get_mut(index)
            .ok_or(Error::NoSuchToken)?;
        match entry.status {
            RetrieveStatus::Failed(e) => return Err(Error::Handler(e)),
            RetrieveStatus::Retrieved => {
                let file = entry.file.as_ref().ok_or(Error::NoSuchToken)?;
                return P::dup_file(file);
            }
            RetrieveStatus::NotAttempted => {}
        }
        let file = match entry.handler.retrieve(entry.state.data) {
            Ok(file) => file,
            Err(e) => {
                entry.status = RetrieveStatus::Failed(e);
                return Err(Error::Handler(e));
            }
        };
        let id = entry.handler.get_id(&file);
        match self.ids.lock().try_insert(id, ()) {
            Ok(None) => entry.id = Some(id),
            Ok(Some(())) => log!(
                self.platform,
                Warn,
                "retrieved file identity {id:#x} is already in use"
            ),
            Err(_) => log!(self.platform, Warn, "cannot track retrieved file {id:#x}"),
        }
        // Record the file before making the caller's reference: the handler has consumed its
        // handover state, so if that reference cannot be made (no fd left) the file must stay
        // retrieved, for the next RETRIEVE_FD to hand out (upstream's `get_file` cannot fail).
        let file = entry.file.insert(file);
        entry.status = RetrieveStatus::Retrieved;
        P::dup_file(file)
    }

    /// FINISH (spec §4.5): `can_finish` on every file (FIFO), then `finish` (LIFO).
    pub fn finish(&self, s: &SessionRef<P>) -> Result {
        if s.dir != Direction::Incoming {
            return Err(Error::WrongDirection);
        }
        let phase = self.live_or_incoming()?;
        self.finish_held(&phase, s)
    }

    /// FINISH with the phase read; `s` is incoming.
    #[inline]
    pub(crate) fn finish_held(&self, _phase: &Phase, s: &SessionRef<P>) -> Result {
        let mut set = s.files();
        if set.closed {
            return Err(Error::BadFd);
        }
        if set.files.is_empty() {
            return Ok(());
        }
        self.finish_files(&mut set)
    }

    fn finish_files(&self, set: &mut FileSet<P>) -> Result {
        for e in set.files.as_slice() {
            let file = if e.status == RetrieveStatus::Retrieved {
                e.file.as_ref()
            } else {
                None
            };
            if !e.handler.can_finish(file, e.state.data, e.status) {
                return Err(Error::FinishRefused);
            }
        }
        while let Some(e) = set.pop_last() {
            let file = if e.status == RetrieveStatus::Retrieved {
                e.file.as_ref()
            } else {
                None
            };
            e.handler.finish(file, e.state.data, e.status);
            {
                let reg = self.registry.read();
                let mut refs = self.refs.lock();
                refs.file_finish(&self.platform, &reg, e.hkey);
                refs.live_dec(e.hkey);
            }
            if let Some(id) = e.id {
                self.ids.lock().remove(&id);
            }
            e.handler.put_owner();
        }
        Ok(())
    }

    /// Number of outgoing sessions.
    pub fn outgoing_count(&self) -> usize {
        self.outgoing.read().len()
    }

    /// Number of incoming sessions not yet closed (retrieved or not).
    pub fn incoming_count(&self) -> usize {
        self.incoming.read().len()
    }

    /// True while the state is serialized for the next kernel.
    pub fn is_serialized(&self) -> bool {
        self.phase.read().serialized
    }

    /// Address of the outgoing root (`luo_ser`), once [`Luo::start`] succeeded.
    pub fn root_addr(&self) -> Option<u64> {
        self.phase.read().root.map(|r| r.root)
    }
}
