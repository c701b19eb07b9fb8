//! File handlers and FLBs: registration, and the FLB reference counts (spec §4.8, §5).
//!
//! The registry (handlers, FLBs and the links between them) is read far more often than it
//! changes, so it sits behind a reader/writer lock; the counts that change on every preserve and
//! finish sit behind their own mutex ([`Refs`], in `refs`), taken inside the registry lock. FLB
//! callbacks run under that mutex, as upstream runs them under the per-FLB mutex.

use crate::abi::{flb_max, Compat};
use crate::errno::{Error, Result};
use crate::platform::{FileHandler, FlbOps, OrdMap, PVec, Platform};

mod refs;

pub(crate) use refs::Refs;

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
