//! File handlers and FLBs: registration, and the FLB reference counts (spec §4.8, §5).
//!
//! The registry (handlers, FLBs and the links between them) is read far more often than it
//! changes, so it sits behind a reader/writer lock; the counts that change on every preserve and
//! finish sit behind their own mutex ([`Refs`]), taken inside the registry lock. FLB callbacks
//! run under that mutex, as upstream runs them under the per-FLB mutex.

use crate::abi::{flb_max, Compat};
use crate::errno::{Error, Result};
use crate::image::ImageFlb;
use crate::platform::{FileHandler, FlbOps, Level, OrdMap, PVec, Platform};

/// A registered handler.
pub(crate) struct HandlerEntry<P: Platform> {
    pub(crate) handler: P::Handler,
    pub(crate) compat: Compat,
    /// Keys of linked FLBs, in link (registration) order.
    pub(crate) flbs: P::Vec<usize>,
}

/// A registered FLB.
pub(crate) struct FlbEntry<P: Platform> {
    pub(crate) flb: P::Flb,
    pub(crate) compat: Compat,
    /// Number of handlers linked to it.
    pub(crate) users: usize,
    /// Registration sequence number: the serialization order.
    pub(crate) seq: u64,
}

/// Handlers and FLBs, in registration order.
pub(crate) struct Registry<P: Platform> {
    next_seq: u64,
    /// seq -> handler key: the `can_preserve` probe order.
    handler_order: P::Map<u64, usize>,
    pub(crate) handlers: P::Map<usize, (u64, HandlerEntry<P>)>,
    handler_by_compat: P::Map<Compat, usize>,
    /// seq -> FLB key: the serialization order.
    pub(crate) flb_order: P::Map<u64, usize>,
    pub(crate) flbs: P::Map<usize, FlbEntry<P>>,
    flb_by_compat: P::Map<Compat, usize>,
}

impl<P: Platform> Default for Registry<P> {
    fn default() -> Self {
        Registry {
            next_seq: 0,
            handler_order: Default::default(),
            handlers: Default::default(),
            handler_by_compat: Default::default(),
            flb_order: Default::default(),
            flbs: Default::default(),
            flb_by_compat: Default::default(),
        }
    }
}

impl<P: Platform> Registry<P> {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// `liveupdate_register_file_handler` under the write lock (after the enable check).
    pub(crate) fn register_handler(&mut self, h: &P::Handler) -> Result {
        if !h.has_required_ops() {
            return Err(Error::InvalidDefinition);
        }
        let compat = Compat::new(h.compatible()).ok_or(Error::InvalidDefinition)?;
        let key = h.key();
        if self.handlers.contains(&key) || self.handler_by_compat.contains(&compat) {
            return Err(Error::AlreadyRegistered);
        }
        let seq = self.seq();
        let entry = HandlerEntry {
            handler: h.clone(),
            compat,
            flbs: P::Vec::default(),
        };
        self.handlers.try_insert(key, (seq, entry))?;
        if self.handler_by_compat.try_insert(compat, key).is_err() {
            self.handlers.remove(&key);
            return Err(Error::NoMemory);
        }
        if self.handler_order.try_insert(seq, key).is_err() {
            self.handlers.remove(&key);
            self.handler_by_compat.remove(&compat);
            return Err(Error::NoMemory);
        }
        Ok(())
    }

    /// Removes a handler and its FLB links (the caller checked it has no live files).
    pub(crate) fn unregister_handler(&mut self, key: usize, refs: &Refs<P>) -> Result {
        let Some((_, entry)) = self.handlers.get(&key) else {
            return Err(Error::FlbNotFound);
        };
        // Refuse if any linked FLB would lose live outgoing state (upstream bug B10).
        for &fk in entry.flbs.as_slice() {
            if self.flbs.get(&fk).is_some_and(|f| f.users == 1) && refs.outgoing_live(fk) {
                return Err(Error::AlreadyPreserved);
            }
        }
        let Some((seq, entry)) = self.handlers.remove(&key) else {
            return Err(Error::FlbNotFound);
        };
        self.handler_order.remove(&seq);
        self.handler_by_compat.remove(&entry.compat);
        for &fk in entry.flbs.as_slice() {
            self.drop_flb_user(fk);
        }
        Ok(())
    }

    fn drop_flb_user(&mut self, fk: usize) {
        let gone = match self.flbs.get_mut(&fk) {
            Some(f) => {
                f.users = f.users.saturating_sub(1);
                f.users == 0
            }
            None => false,
        };
        if gone {
            if let Some(f) = self.flbs.remove(&fk) {
                self.flb_order.remove(&f.seq);
                self.flb_by_compat.remove(&f.compat);
            }
        }
    }

    /// `liveupdate_register_flb` under the write lock.
    pub(crate) fn register_flb(&mut self, hkey: usize, flb: &P::Flb, refs: &Refs<P>) -> Result {
        if !flb.has_required_ops() {
            return Err(Error::InvalidDefinition);
        }
        // Upstream's "handler registered" check cannot tell (B9); this one can.
        let Some((_, h)) = self.handlers.get(&hkey) else {
            return Err(Error::InvalidDefinition);
        };
        let compat = Compat::new(flb.compatible()).ok_or(Error::InvalidDefinition)?;
        let fk = flb.key();
        if h.flbs.as_slice().contains(&fk) {
            return Err(Error::AlreadyRegistered);
        }
        // Linking an FLB to a handler that already has live files would make the next
        // unpreserve or finish drop a reference that was never taken.
        if refs.handler_live(hkey) > 0 {
            return Err(Error::AlreadyPreserved);
        }
        let new = !self.flbs.contains(&fk);
        if new {
            if self.flbs.len() >= flb_max(P::PAGE_SIZE) {
                return Err(Error::NoSpace);
            }
            if self.flb_by_compat.contains(&compat) {
                return Err(Error::AlreadyRegistered);
            }
            let seq = self.seq();
            self.flbs.try_insert(
                fk,
                FlbEntry {
                    flb: flb.clone(),
                    compat,
                    users: 0,
                    seq,
                },
            )?;
            if self.flb_order.try_insert(seq, fk).is_err()
                || self.flb_by_compat.try_insert(compat, fk).is_err()
            {
                self.flb_order.remove(&seq);
                self.flbs.remove(&fk);
                return Err(Error::NoMemory);
            }
        }
        let pushed = match self.handlers.get_mut(&hkey) {
            Some((_, h)) => h.flbs.try_push(fk).is_ok(),
            None => false,
        };
        if !pushed {
            if new {
                self.drop_flb_user_new(fk);
            }
            return Err(Error::NoMemory);
        }
        if let Some(f) = self.flbs.get_mut(&fk) {
            f.users += 1;
        }
        Ok(())
    }

    fn drop_flb_user_new(&mut self, fk: usize) {
        if let Some(f) = self.flbs.remove(&fk) {
            self.flb_order.remove(&f.seq);
            self.flb_by_compat.remove(&f.compat);
        }
    }

    /// `liveupdate_unregister_flb` under the write lock.
    pub(crate) fn unregister_flb(&mut self, hkey: usize, fk: usize, refs: &Refs<P>) -> Result {
        let Some((_, h)) = self.handlers.get(&hkey) else {
            return Err(Error::FlbNotFound);
        };
        let Some(pos) = h.flbs.as_slice().iter().position(|&k| k == fk) else {
            return Err(Error::FlbNotFound);
        };
        if refs.handler_live(hkey) > 0
            || (self.flbs.get(&fk).is_some_and(|f| f.users == 1) && refs.outgoing_live(fk))
        {
            return Err(Error::AlreadyPreserved);
        }
        if let Some((_, h)) = self.handlers.get_mut(&hkey) {
            remove_at::<P>(&mut h.flbs, pos);
        }
        self.drop_flb_user(fk);
        Ok(())
    }

    /// The first handler, in registration order, whose `can_preserve` accepts `file`.
    pub(crate) fn find_handler(&self, file: &P::File) -> Option<(usize, P::Handler)> {
        for (_, &key) in self.handler_order.iter() {
            if let Some((_, h)) = self.handlers.get(&key) {
                if h.handler.can_preserve(file) {
                    return Some((key, h.handler.clone()));
                }
            }
        }
        None
    }

    /// The handler registered with this compatible string.
    pub(crate) fn handler_by_compat(&self, compat: &Compat) -> Option<(usize, P::Handler)> {
        let key = *self.handler_by_compat.get(compat)?;
        let (_, h) = self.handlers.get(&key)?;
        Some((key, h.handler.clone()))
    }

    /// The FLB keys linked to a handler, in link order.
    pub(crate) fn handler_flbs(&self, hkey: usize) -> &[usize] {
        match self.handlers.get(&hkey) {
            Some((_, h)) => h.flbs.as_slice(),
            None => &[],
        }
    }
}

/// Removes element `pos` of a platform vector, keeping order (FLB links are few).
fn remove_at<P: Platform>(v: &mut P::Vec<usize>, pos: usize) {
    let s = v.as_mut_slice();
    if pos < s.len() {
        s[pos..].rotate_left(1);
        v.pop();
    }
}

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

    fn outgoing_live(&self, fk: usize) -> bool {
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
