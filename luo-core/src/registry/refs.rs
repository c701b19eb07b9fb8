//! The FLB reference counts and the live files per handler: what changes on every preserve,
//! unpreserve and finish, behind its own mutex inside the registry lock (spec §5.3, §5.4).

use super::Registry;
use crate::abi::Compat;
use crate::errno::{Error, Result};
use crate::image::ImageFlb;
use crate::platform::{FlbOps, Level, OrdMap, PVec, Platform};

/// Outgoing state of one FLB (spec §5.3).
#[derive(Clone, Copy, Default)]
pub(crate) struct OutFlb {
    /// References from preserved files.
    pub(crate) files: u64,
    /// References from `liveupdate_flb_get_outgoing` callers.
    pub(crate) extra: u64,
    pub(crate) data: u64,
    pub(crate) obj: usize,
}

/// Incoming state of one FLB the previous kernel handed over (spec §5.4).
#[derive(Clone, Copy)]
pub(crate) struct InFlb {
    pub(crate) data: u64,
    /// Loaded from the handover at boot (upstream loads it lazily: bug B3).
    pub(crate) count: u64,
    pub(crate) obj: usize,
    /// 0 not tried, 1 ok, negative errno.
    pub(crate) status: i32,
    pub(crate) finished: bool,
}

/// Reference counts that change on every preserve, unpreserve and finish.
pub(crate) struct Refs<P: Platform> {
    pub(crate) outgoing: P::Map<usize, OutFlb>,
    /// None when the previous kernel handed over no FLB page.
    pub(crate) incoming: Option<P::Map<Compat, InFlb>>,
    /// Files (outgoing preserved or incoming not yet finished) per handler key.
    pub(crate) live: P::Map<usize, u64>,
}

impl<P: Platform> Refs<P> {
    pub(crate) fn new() -> Self {
        Refs {
            outgoing: Default::default(),
            incoming: None,
            live: Default::default(),
        }
    }

    /// Loads the incoming FLB table from the boot image.
    pub(crate) fn load_incoming(&mut self, flbs: Option<&P::Vec<ImageFlb>>) -> Result {
        let Some(flbs) = flbs else {
            self.incoming = None;
            return Ok(());
        };
        let mut map = P::Map::<Compat, InFlb>::default();
        for f in flbs.as_slice() {
            map.try_insert(
                f.compat,
                InFlb {
                    data: f.data,
                    count: f.count,
                    obj: 0,
                    status: 0,
                    finished: false,
                },
            )?;
        }
        self.incoming = Some(map);
        Ok(())
    }

    pub(crate) fn handler_live(&self, hkey: usize) -> u64 {
        self.live.get(&hkey).copied().unwrap_or(0)
    }

    pub(super) fn outgoing_live(&self, fk: usize) -> bool {
        self.outgoing
            .get(&fk)
            .is_some_and(|o| o.files + o.extra > 0)
    }

    pub(crate) fn live_inc(&mut self, hkey: usize) -> Result {
        let n = self.handler_live(hkey);
        self.live.try_insert(hkey, n + 1)?;
        Ok(())
    }

    pub(crate) fn live_dec(&mut self, hkey: usize) {
        match self.live.get_mut(&hkey) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.live.remove(&hkey);
            }
            None => {}
        }
    }

    /// Takes one file reference on each FLB of the handler, in link order; the first reference
    /// runs the FLB's `preserve`. On failure, the references taken are dropped in reverse.
    pub(crate) fn file_preserve(&mut self, reg: &Registry<P>, hkey: usize) -> Result {
        let links = reg.handler_flbs(hkey);
        for (i, &fk) in links.iter().enumerate() {
            if let Err(e) = self.get_one(reg, fk) {
                for &undo in links[..i].iter().rev() {
                    self.put_file_ref(reg, undo);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn get_one(&mut self, reg: &Registry<P>, fk: usize) -> Result {
        let Some(entry) = reg.flbs.get(&fk) else {
            return Ok(());
        };
        let cur = self.outgoing.get(&fk).copied().unwrap_or_default();
        let mut next = cur;
        if cur.files + cur.extra == 0 {
            if !entry.flb.get_owner() {
                return Err(Error::OwnerGone);
            }
            match entry.flb.preserve() {
                Ok((data, obj)) => {
                    next.data = data;
                    next.obj = obj;
                }
                Err(e) => {
                    entry.flb.put_owner();
                    return Err(Error::Handler(e));
                }
            }
        }
        next.files += 1;
        if self.outgoing.try_insert(fk, next).is_err() {
            if cur.files + cur.extra == 0 {
                entry.flb.unpreserve(next.data, next.obj);
                entry.flb.put_owner();
            }
            return Err(Error::NoMemory);
        }
        Ok(())
    }

    /// Drops one file reference on each FLB of the handler, in reverse link order.
    pub(crate) fn file_unpreserve(&mut self, reg: &Registry<P>, hkey: usize) {
        for &fk in reg.handler_flbs(hkey).iter().rev() {
            self.put_file_ref(reg, fk);
        }
    }

    fn put_file_ref(&mut self, reg: &Registry<P>, fk: usize) {
        let Some(o) = self.outgoing.get_mut(&fk) else {
            return;
        };
        if o.files == 0 {
            return;
        }
        o.files -= 1;
        self.maybe_unpreserve(reg, fk);
    }

    fn maybe_unpreserve(&mut self, reg: &Registry<P>, fk: usize) {
        let Some(&o) = self.outgoing.get(&fk) else {
            return;
        };
        if o.files + o.extra == 0 {
            self.outgoing.remove(&fk);
            if let Some(entry) = reg.flbs.get(&fk) {
                entry.flb.unpreserve(o.data, o.obj);
                entry.flb.put_owner();
            }
        }
    }

    /// `liveupdate_flb_get_outgoing`.
    pub(crate) fn get_outgoing(&mut self, fk: usize) -> Result<usize> {
        match self.outgoing.get_mut(&fk) {
            Some(o) if o.obj != 0 => {
                o.extra += 1;
                Ok(o.obj)
            }
            _ => Err(Error::FlbNotFound),
        }
    }

    /// `liveupdate_flb_put_outgoing` for a reference from [`Refs::get_outgoing`]; false on
    /// underflow (nothing happens then).
    pub(crate) fn put_outgoing(&mut self, reg: &Registry<P>, fk: usize) -> bool {
        let Some(o) = self.outgoing.get_mut(&fk) else {
            return false;
        };
        if o.extra == 0 {
            return false;
        }
        o.extra -= 1;
        self.maybe_unpreserve(reg, fk);
        true
    }

    /// Retrieves the incoming object of `flb` (named `compat`) once; later calls return the
    /// cached outcome. Works on any FLB object, registered or not: incoming FLB state is keyed
    /// by its compatible string, as upstream searches the handed-over entries by name.
    fn retrieve_one(&mut self, flb: &P::Flb, compat: &Compat) -> Result {
        let Some(incoming) = self.incoming.as_mut() else {
            return Err(Error::FlbNoData);
        };
        let Some(state) = incoming.get_mut(compat) else {
            return Err(Error::FlbNotFound);
        };
        if state.finished {
            return Err(Error::FlbNoData);
        }
        if state.status < 0 {
            return Err(Error::Handler(crate::errno::Errno::new(-state.status)));
        }
        if state.status > 0 {
            return Ok(());
        }
        if !flb.get_owner() {
            return Err(Error::OwnerGone);
        }
        match flb.retrieve(state.data) {
            Ok(obj) => {
                state.obj = obj;
                state.status = 1;
                Ok(())
            }
            Err(e) => {
                state.status = -e.get();
                flb.put_owner();
                Err(Error::Handler(e))
            }
        }
    }

    /// `liveupdate_flb_get_incoming`. The FLB need not be registered: upstream's incoming
    /// FLB data is usable from early boot, before any handler (or FLB) registers (spec §1.3),
    /// and `lib/tests/liveupdate.c` calls this before linking its FLBs (spec §5.8).
    ///
    /// The count starts at what the handover claims, so a reference that would overflow it
    /// saturates it instead, like the kernel's `refcount_t`: a saturated count never drops
    /// again, so the FLB is never finished (its object is kept rather than finished in use).
    pub(crate) fn get_incoming(&mut self, p: &P, flb: &P::Flb, compat: &Compat) -> Result<usize> {
        self.retrieve_one(flb, compat)?;
        let Some(state) = self.incoming.as_mut().and_then(|m| m.get_mut(compat)) else {
            return Err(Error::FlbNotFound);
        };
        match state.count.checked_add(1) {
            Some(count) => state.count = count,
            None => p.log(
                Level::Warn,
                format_args!("FLB {compat:?}: incoming reference count saturated"),
            ),
        }
        Ok(state.obj)
    }

    /// `liveupdate_flb_put_incoming`: the last put runs `finish`.
    pub(crate) fn put_incoming(&mut self, p: &P, flb: &P::Flb, compat: &Compat) {
        let Some(state) = self.incoming.as_mut().and_then(|m| m.get_mut(compat)) else {
            // The previous kernel handed nothing over for this FLB: no reference to drop.
            return;
        };
        if state.finished || state.count == 0 {
            p.log(
                Level::Warn,
                format_args!("FLB {compat:?}: incoming reference count underflow"),
            );
            return;
        }
        if state.count == u64::MAX {
            // Saturated (see `get_incoming`): stays so.
            return;
        }
        state.count -= 1;
        if state.count > 0 {
            return;
        }
        if state.status <= 0 {
            if let Err(e) = self.retrieve_one(flb, compat) {
                p.log(
                    Level::Warn,
                    format_args!("FLB {compat:?}: retrieve before finish failed: {e}"),
                );
                return;
            }
        }
        let Some(state) = self.incoming.as_mut().and_then(|m| m.get_mut(compat)) else {
            return;
        };
        flb.finish(state.data, state.obj);
        state.obj = 0;
        state.data = 0;
        state.finished = true;
        flb.put_owner();
    }

    /// Drops one incoming reference on each FLB of the handler, in reverse link order.
    pub(crate) fn file_finish(&mut self, p: &P, reg: &Registry<P>, hkey: usize) {
        for &fk in reg.handler_flbs(hkey).iter().rev() {
            if let Some(entry) = reg.flbs.get(&fk) {
                self.put_incoming(p, &entry.flb, &entry.compat);
            }
        }
    }
}
