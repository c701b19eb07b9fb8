//! The orchestrator: sessions, files, reboot and boot (spec §2.5, §3, §4, §6).
//!
//! Lock order, outermost first (the same hierarchy as upstream, spec §8.1):
//! `device` → `phase` (the serialize rwsem) → `outgoing`/`incoming` session tables →
//! a session's `files` mutex → `registry` → `refs` → `ids`.
//! `phase` is taken shared by every operation and exclusively by [`Luo::reboot`]; once a reboot
//! has serialized the state, every later operation fails with [`Error::Serialized`] (the kernel
//! backend turns that into "block until the kexec", as upstream does).
//!
//! Here: [`Luo`], its boot (`new`, `start`) and [`Live`], the guard every operation is a
//! method of ([`Luo::begin`] takes the phase shared). Beside it, one file per concern:
//! - `session`: the data model (sessions, their file sets, the outgoing and incoming tables);
//! - `incoming`: the first open builds the incoming sessions; RETRIEVE_SESSION hands them out;
//! - `ops`: create and release a session, preserve, retrieve and finish its files (on [`Live`]);
//! - `serialize`: reboot, the writer of the handover (the mirror of [`image`]);
//! - `api`: the in-kernel handler and FLB API.

use crate::abi::LuoSer;
use crate::block::BlockSet;
use crate::errno::{Error, Result};
use crate::image;
use crate::platform::{PMutex, PRwLock, Platform, Runtime, SharedIndex};
use crate::registry::{Refs, Registry};
use core::mem::size_of;

/// One log line at a [`Level`](crate::platform::Level); defined before the modules so that
/// all of them can use it.
macro_rules! log {
    ($p:expr, $lvl:ident, $($arg:tt)*) => {
        $p.log($crate::platform::Level::$lvl, format_args!($($arg)*))
    };
}

mod api;
mod incoming;
mod ops;
mod serialize;
mod session;

pub use incoming::retrieve_name;
use incoming::{Device, Incoming};
pub use ops::create_name;
pub use session::{FileSet, Session, SessionHead, SessionRef};
use session::{Outgoing, Sessions};

/// The phase, read-locked: holding it keeps `liveupdate_reboot()` out.
type PhaseRead<'a, P> = <<P as Runtime>::RwLock<Phase> as PRwLock<Phase>>::Read<'a>;

/// Where the serialize lock stands.
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
    incoming: P::RwLock<Sessions<P>>,
    registry: P::RwLock<Registry<P>>,
    refs: P::Mutex<Refs<P>>,
    /// Identities of every file preserved or retrieved-and-not-finished (upstream's xarray).
    ids: P::Mutex<P::Map<u64, ()>>,
}

/// The serialize lock held shared, with the state not serialized: what every session and file
/// operation needs, so they are its methods (`ops`, `incoming`). Made by [`Luo::begin`]; the
/// lock is released when it drops.
///
/// It deliberately does not dereference to [`Luo`]: a [`Luo::reboot`] or another
/// [`Luo::begin`] through it would take the lock it holds again.
pub struct Live<'a, P: Platform> {
    luo: &'a Luo<P>,
    phase: PhaseRead<'a, P>,
}

impl<P: Platform> Live<'_, P> {
    /// Outgoing work needs LUO on: switched on and the outgoing root published. Incoming work
    /// does not (it is allowed even if outgoing setup failed).
    fn outgoing_ready(&self) -> Result {
        if !self.luo.enabled || self.phase.root.is_none() {
            return Err(Error::Disabled);
        }
        Ok(())
    }
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
                sessions: Default::default(),
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

    /// Takes the serialize lock shared for one operation: [`Error::Serialized`] once the state
    /// is serialized for the next kernel (where upstream's session ioctls block, spec §2.4
    /// step 7). The operations are the methods of the returned guard, so whoever calls one
    /// (the ioctl layer, a backend's release, a test) holds the lock for as long as it runs,
    /// and `liveupdate_reboot()` waits for it.
    #[inline]
    pub fn begin(&self) -> Result<Live<'_, P>> {
        let phase = self.phase.read();
        if phase.serialized {
            return Err(Error::Serialized);
        }
        Ok(Live { luo: self, phase })
    }

    /// Number of outgoing sessions.
    pub fn outgoing_count(&self) -> usize {
        self.outgoing.read().sessions.len()
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
