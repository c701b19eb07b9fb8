//! The in-kernel API of `include/linux/liveupdate.h`: file handler and FLB registration, and
//! the FLB references handlers take while they preserve, retrieve and finish.
//!
//! Registering and taking an outgoing reference need LUO on (`liveupdate_enabled()`); while it
//! is off there is nothing registered to unregister.

use super::Luo;
use crate::abi::Compat;
use crate::errno::{Error, Result};
use crate::platform::{FileHandler, FlbOps, PMutex, PRwLock, Platform};

impl<P: Platform> Luo<P> {
    /// `liveupdate_register_file_handler`.
    pub fn register_handler(&self, h: &P::Handler) -> Result {
        if !self.enabled() {
            return Err(Error::Disabled);
        }
        self.registry.write().register_handler(h)
    }

    /// `liveupdate_unregister_file_handler`. Refused (and logged) while files of the handler
    /// are preserved or not yet finished: they would point at a handler that is gone (B10).
    pub fn unregister_handler(&self, h: &P::Handler) -> Result {
        if !self.enabled() {
            return Ok(());
        }
        let mut reg = self.registry.write();
        let refs = self.refs.lock();
        if refs.handler_live(h.key()) > 0 {
            log!(
                self.platform,
                Warn,
                "not unregistering handler with live files: {:?}",
                Compat::new(h.compatible())
            );
            return Err(Error::AlreadyPreserved);
        }
        reg.unregister_handler(h.key(), &refs)
    }

    /// `liveupdate_register_flb`.
    pub fn register_flb(&self, h: &P::Handler, flb: &P::Flb) -> Result {
        if !self.enabled() {
            return Err(Error::Disabled);
        }
        let mut reg = self.registry.write();
        let refs = self.refs.lock();
        reg.register_flb(h.key(), flb, &refs)
    }

    /// `liveupdate_unregister_flb`.
    pub fn unregister_flb(&self, h: &P::Handler, flb: &P::Flb) -> Result {
        if !self.enabled() {
            return Ok(());
        }
        let mut reg = self.registry.write();
        let refs = self.refs.lock();
        let r = reg.unregister_flb(h.key(), flb.key(), &refs);
        if let Err(e) = r {
            log!(self.platform, Warn, "FLB unregister refused: {e}");
        }
        r
    }

    /// `liveupdate_flb_get_incoming`.
    pub fn flb_get_incoming(&self, flb: &P::Flb) -> Result<usize> {
        if !self.enabled {
            return Err(Error::Disabled);
        }
        // Any FLB object may ask, registered or not (early-boot users, lib/tests); a
        // compatible string that cannot have been handed over matches nothing.
        let compat = Compat::new(flb.compatible()).ok_or(Error::FlbNotFound)?;
        self.refs.lock().get_incoming(&self.platform, flb, &compat)
    }

    /// `liveupdate_flb_put_incoming`.
    pub fn flb_put_incoming(&self, flb: &P::Flb) {
        let Some(compat) = Compat::new(flb.compatible()) else {
            return;
        };
        self.refs.lock().put_incoming(&self.platform, flb, &compat);
    }

    /// `liveupdate_flb_get_outgoing`.
    pub fn flb_get_outgoing(&self, flb: &P::Flb) -> Result<usize> {
        if !self.enabled() {
            return Err(Error::Disabled);
        }
        self.refs.lock().get_outgoing(flb.key())
    }

    /// `liveupdate_flb_put_outgoing`.
    pub fn flb_put_outgoing(&self, flb: &P::Flb) {
        let reg = self.registry.read();
        let mut refs = self.refs.lock();
        if !refs.put_outgoing(&reg, flb.key()) {
            log!(
                self.platform,
                Warn,
                "FLB {:?}: outgoing reference count underflow",
                Compat::new(flb.compatible())
            );
        }
    }
}
