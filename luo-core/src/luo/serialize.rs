//! Writing the outgoing `luo-v5` state at reboot: the mirror of [`image`](crate::image), which
//! reads it back in the next kernel.
//!
//! Every page the handover needs was reserved before (the root and the FLB page at start, room
//! in the block pages whenever a session or file was added), so nothing here allocates. The
//! root is written last: a failure before it hands the next kernel no sessions, and the state
//! stays live for a retry.

use super::session::{FileSet, Outgoing};
use super::{Luo, Root};
use crate::abi::{
    Compat, LuoFileSer, LuoFlbHeaderSer, LuoFlbSer, LuoSer, LuoSessionSer, HNDL_COMPAT_LEN,
    LUO_ABI_COMPATIBLE, LUO_ABI_COMPAT_LEN, LUO_FLB_PGCNT, SESSION_NAME_LEN,
};
use crate::errno::{Error, Result};
use crate::platform::{
    FileHandler, OrdMap, PMutex, PRwLock, PVec, Platform, SharedIndex, SharedLocked,
};
use core::mem::{offset_of, size_of};
use zerocopy::IntoBytes;

impl<P: Platform> Luo<P> {
    /// `liveupdate_reboot()` (spec §6.1): freezes every file (sessions in creation order, files
    /// in preservation order) and writes the handover. If a freeze fails, everything frozen is
    /// unfrozen newest first (upstream mixes FIFO and LIFO: bug B13) and its error returned;
    /// the caller may retry. On success nothing can change any more.
    pub fn reboot(&self) -> Result {
        if !self.enabled {
            return Ok(());
        }
        let mut phase = self.phase.write();
        if phase.serialized {
            return Ok(());
        }
        let Some(root) = phase.root else {
            return Ok(());
        };
        let mut out = self.outgoing.write();
        let mut frozen_sessions = 0usize;
        if let Err(e) = self.freeze_and_write(&mut out, root, &mut frozen_sessions) {
            // Unfreeze sessions newest first; a session whose freeze failed already rolled
            // itself back. Walking back from the last frozen session needs no memory (this
            // path must not fail).
            let newer = out.sessions.len() - frozen_sessions;
            for s in out.sessions.iter_rev().skip(newer) {
                let mut set = s.lock();
                let n = set.files.len();
                unfreeze_set(&mut set, n);
            }
            log!(self.platform, Error, "live update reboot aborted: {e}");
            return Err(e);
        }
        phase.serialized = true;
        Ok(())
    }

    /// Freezes every session and writes the handover, in one pass as upstream does: sessions
    /// in creation order, each frozen (files in preservation order) and written under one
    /// hold of its lock, then the FLBs, then the root. `frozen` counts the sessions frozen so
    /// far, for the caller's rollback.
    fn freeze_and_write(&self, out: &mut Outgoing<P>, root: Root, frozen: &mut usize) -> Result {
        let p = &self.platform;
        let count = out.sessions.len();
        let Outgoing { sessions, blocks } = out;
        let mut sessions = sessions.iter();
        let head = blocks.write(p, count, |slot| {
            let s = sessions.next().ok_or(Error::NoSpace)?;
            let mut set = s.lock();
            // A session whose files fail to freeze (or to be written) rolls itself back.
            let files = if set.files.is_empty() {
                0
            } else {
                freeze_and_write_files(p, &mut set)?
            };
            *frozen += 1;
            let file_set = crate::abi::LuoFileSetSer {
                files,
                count: set.files.len() as u64,
            };
            // Pages not yet written are zero, so the name is written up to its NUL.
            let name = s.name.as_field();
            let span = if slot.fresh() {
                s.name_span
            } else {
                name.len()
            };
            slot.put(offset_of!(LuoSessionSer, name), &name[..span])?;
            slot.put(offset_of!(LuoSessionSer, file_set_ser), file_set.as_bytes())
        })?;
        // FLBs with file references, in registration order (only file references are
        // handed over: references leaked by get_outgoing callers would keep the next kernel
        // from ever finishing the FLB, bug B4).
        {
            let reg = self.registry.read();
            let refs = self.refs.lock();
            let mut n = 0u64;
            let header_size = size_of::<LuoFlbHeaderSer>() as u64;
            let entry_size = size_of::<LuoFlbSer>() as u64;
            for (_, &fk) in reg.flb_order.iter() {
                let (Some(f), Some(o)) = (reg.flbs.get(&fk), refs.outgoing.get(&fk)) else {
                    continue;
                };
                if o.files == 0 {
                    continue;
                }
                let e = LuoFlbSer {
                    name: f.compat.field(),
                    data: o.data,
                    count: o.files,
                };
                p.write(root.flbs + header_size + n * entry_size, e.as_bytes())?;
                n += 1;
            }
            root.write_flb_header(p, n)?;
        }
        // Last, the root: the next kernel sees sessions only once everything else is written.
        root.write_root(p, head)
    }
}

impl Root {
    /// Writes `luo_ser`, the one place that does. Start writes it with no sessions before it
    /// publishes the root, so the root is never published unwritten; reboot writes it again,
    /// last, pointing at the session chain.
    #[inline]
    pub(super) fn write_root<P: Platform>(&self, p: &P, sessions_pa: u64) -> Result {
        let mut compatible = [0u8; LUO_ABI_COMPAT_LEN];
        compatible[..LUO_ABI_COMPATIBLE.len()].copy_from_slice(LUO_ABI_COMPATIBLE);
        let ser = LuoSer {
            compatible,
            liveupdate_num: self.num,
            sessions_pa,
            flbs_pa: self.flbs,
        };
        p.write(self.root, ser.as_bytes())
    }

    /// Writes the FLB page's header: `count` entries follow it (none until reboot).
    #[inline]
    pub(super) fn write_flb_header<P: Platform>(&self, p: &P, count: u64) -> Result {
        let header = LuoFlbHeaderSer {
            pgcnt: LUO_FLB_PGCNT,
            count,
        };
        p.write(self.flbs, header.as_bytes())
    }
}

/// The bytes of a NUL-padded `field_len`-byte field that hold a string of `len` bytes and its
/// NUL, rounded up to whole words (what a copy into a zeroed field has to write).
pub(super) const fn padded_span(len: usize, field_len: usize) -> usize {
    let span = (len + 1).div_ceil(8) * 8;
    if span < field_len {
        span
    } else {
        field_len
    }
}

/// Unfreezes the first `n` files of a session, newest first.
pub(super) fn unfreeze_set<P: Platform>(set: &mut FileSet<P>, n: usize) {
    let files = set.files.as_slice();
    for e in files[..n.min(files.len())].iter().rev() {
        if let Some(file) = e.file.as_ref() {
            e.handler.unfreeze(file, e.state);
        }
    }
}

// The entry writers put every field of their entries, so every byte is rewritten.
const _: () = assert!(
    offset_of!(LuoSessionSer, file_set_ser) == SESSION_NAME_LEN
        && SESSION_NAME_LEN + size_of::<crate::abi::LuoFileSetSer>() == size_of::<LuoSessionSer>()
);
const _: () = assert!(
    offset_of!(LuoFileSer, data) == HNDL_COMPAT_LEN
        && offset_of!(LuoFileSer, token) == offset_of!(LuoFileSer, data) + 8
        && HNDL_COMPAT_LEN + 16 == size_of::<LuoFileSer>()
);

/// Freezes a session's files in preservation order, writing each one's entry right after its
/// freeze (one walk, as upstream's `luo_file_freeze`), and returns the chain's head. If a
/// freeze or a write fails, the files frozen so far are unfrozen, newest first (the one whose
/// freeze failed is not), and the error returned; what was written does not matter then, the
/// root is not published.
fn freeze_and_write_files<P: Platform>(p: &P, set: &mut FileSet<P>) -> Result<u64> {
    let n = set.files.len();
    let mut done = 0usize;
    // Files of one session mostly share a handler: its compatible string is checked and
    // copied once per run of equal handlers, not once per file.
    let mut compat: Option<(usize, Compat, usize)> = None;
    let result = {
        let FileSet { files, blocks, .. } = &mut *set;
        let mut entries = files.as_mut_slice().iter_mut();
        blocks.write(p, n, |slot| {
            let e = entries.next().ok_or(Error::NoSpace)?;
            if let Some(file) = e.file.as_ref() {
                let mut state = e.state;
                e.handler.freeze(file, &mut state).map_err(Error::Handler)?;
                e.state = state;
            }
            done += 1;
            let (c, span) = match compat {
                Some((hkey, c, span)) if hkey == e.hkey => (c, span),
                _ => {
                    let c = Compat::new(e.handler.compatible()).ok_or(Error::InvalidDefinition)?;
                    let span = padded_span(c.as_bytes().len(), HNDL_COMPAT_LEN);
                    compat = Some((e.hkey, c, span));
                    (c, span)
                }
            };
            let field = c.as_field();
            let span = if slot.fresh() { span } else { field.len() };
            slot.put(offset_of!(LuoFileSer, compatible), &field[..span])?;
            slot.put(
                offset_of!(LuoFileSer, data),
                [e.state.data, e.token].as_bytes(),
            )
        })
    };
    if result.is_err() {
        unfreeze_set(set, done);
    }
    result
}
