//! The KHO block chain (`include/linux/kho/abi/block.h`): page-sized blocks, each a 16-byte
//! header `{next, count}` followed by packed entries.
//!
//! The writer ([`BlockSet`]) reserves pages eagerly as entries are added, so serializing at
//! reboot never allocates; it links the chain and writes counts only when serializing, which
//! makes an empty trailing block (upstream bug B1) impossible to emit. The reader
//! ([`read_chain`]) validates every block before trusting it: address, alignment, count,
//! chain length, and cycles or sharing between chains (one visited set for the whole image).

use crate::abi::{entries_per_block, KhoBlockHeaderSer, BLOCK_HEADER_SIZE, KHO_MAX_BLOCKS};
use crate::errno::{Error, HandoverError, Result};
use crate::platform::{OrdMap, PVec, Platform};
use core::marker::PhantomData;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The largest entry any chain holds (`luo_session_ser`).
pub(crate) const MAX_ENTRY: usize = 80;

/// An outgoing block set: the pages reserved for one chain of `T` entries.
pub(crate) struct BlockSet<P: Platform, T> {
    pages: P::Vec<u64>,
    /// Set by the first [`BlockSet::write`]: until then every page is as `alloc_page` gave it,
    /// all zero.
    written: bool,
    _entry: PhantomData<fn() -> T>,
}

impl<P: Platform, T: IntoBytes + Immutable> BlockSet<P, T> {
    const ENTRY_SIZE: usize = core::mem::size_of::<T>();

    /// An empty set.
    pub(crate) fn new() -> Self {
        BlockSet {
            pages: P::Vec::default(),
            written: false,
            _entry: PhantomData,
        }
    }

    fn per_block(&self) -> usize {
        entries_per_block(P::PAGE_SIZE, Self::ENTRY_SIZE)
    }

    /// Blocks needed for `count` entries.
    fn blocks_for(&self, count: usize) -> usize {
        count.div_ceil(self.per_block())
    }

    /// Makes room for `count` entries (`kho_block_set_grow`): `ENOSPC` past `KHO_MAX_BLOCKS`,
    /// `ENOMEM` if a page cannot be had; nothing changes on failure.
    pub(crate) fn grow(&mut self, p: &P, count: usize) -> Result {
        let want = self.blocks_for(count);
        if want > KHO_MAX_BLOCKS {
            return Err(Error::NoSpace);
        }
        let had = self.pages.len();
        while self.pages.len() < want {
            let page = match p.alloc_page() {
                Ok(page) => page,
                Err(e) => {
                    self.shrink_to_blocks(p, had);
                    return Err(e);
                }
            };
            if self.pages.try_push(page).is_err() {
                p.free_page(page);
                self.shrink_to_blocks(p, had);
                return Err(Error::NoMemory);
            }
        }
        Ok(())
    }

    /// True when no page is reserved.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Frees pages no longer needed for `count` entries (`kho_block_set_shrink`).
    pub(crate) fn shrink(&mut self, p: &P, count: usize) {
        let want = self.blocks_for(count);
        self.shrink_to_blocks(p, want);
    }

    fn shrink_to_blocks(&mut self, p: &P, blocks: usize) {
        while self.pages.len() > blocks {
            if let Some(page) = self.pages.pop() {
                p.free_page(page);
            }
        }
    }

    /// Frees every page.
    pub(crate) fn destroy(&mut self, p: &P) {
        self.shrink_to_blocks(p, 0);
    }

    /// Writes `count` entries into the reserved pages in chain order, linking the chain, and
    /// returns the head address (0 when `count == 0`). `entry(slot)` writes one entry, field
    /// by field from where the data lives (no staging copy of the entry), and must write
    /// every byte of it: a retried reboot rewrites the same pages.
    pub(crate) fn write(
        &mut self,
        p: &P,
        count: usize,
        mut entry: impl FnMut(&EntrySlot<'_, P, T>) -> Result,
    ) -> Result<u64> {
        if count == 0 {
            return Ok(0);
        }
        let per = self.per_block();
        let used = self.blocks_for(count);
        let fresh = !self.written;
        self.written = true;
        let pages = self.pages.as_slice();
        if used > pages.len() {
            // The set is grown on every insert, so this is a core bug, not bad input.
            return Err(Error::NoSpace);
        }
        for (b, &page) in pages[..used].iter().enumerate() {
            let first = b * per;
            let n = core::cmp::min(per, count - first);
            let next = if b + 1 < used { pages[b + 1] } else { 0 };
            let header = KhoBlockHeaderSer {
                next,
                count: n as u64,
            };
            p.write(page, header.as_bytes())?;
            for i in 0..n {
                let off = (BLOCK_HEADER_SIZE + i * Self::ENTRY_SIZE) as u64;
                entry(&EntrySlot {
                    p,
                    addr: page + off,
                    fresh,
                    _entry: PhantomData,
                })?;
            }
        }
        Ok(pages[0])
    }
}

/// Where one `T` entry of a block goes.
pub(crate) struct EntrySlot<'a, P, T> {
    p: &'a P,
    addr: u64,
    fresh: bool,
    _entry: PhantomData<fn() -> T>,
}

impl<P: Platform, T> EntrySlot<'_, P, T> {
    /// True when the entry's bytes are all zero (no earlier, failed serialization wrote this
    /// set), so a NUL-padded field may be written only up to its padding.
    #[inline(always)]
    pub(crate) fn fresh(&self) -> bool {
        self.fresh
    }

    /// Writes `bytes` at `offset` within the entry (`offset_of!` a field of `T`); refuses
    /// anything that would spill out of the entry.
    #[inline(always)]
    pub(crate) fn put(&self, offset: usize, bytes: &[u8]) -> Result {
        if offset + bytes.len() > core::mem::size_of::<T>() {
            return Err(Error::NoSpace);
        }
        self.p.write(self.addr + offset as u64, bytes)
    }
}

/// Reads and validates the chain at `head`, calling `entry(addr, bytes)` for each entry in
/// chain order and recording every block address in `blocks` (for release) and `visited`
/// (shared across chains, so a block reachable twice is refused as a cycle).
pub(crate) fn read_chain<P: Platform>(
    p: &P,
    head: u64,
    entry_size: usize,
    visited: &mut P::Map<u64, ()>,
    blocks: &mut P::Vec<u64>,
    mut entry: impl FnMut(u64, &[u8]) -> core::result::Result<(), HandoverError>,
) -> core::result::Result<usize, HandoverError> {
    let per = entries_per_block(P::PAGE_SIZE, entry_size) as u64;
    let mut at = head;
    let mut nblocks = 0usize;
    let mut total = 0usize;
    let mut buf = [0u8; MAX_ENTRY];
    let buf = &mut buf[..entry_size];
    while at != 0 {
        if at % P::PAGE_SIZE as u64 != 0 {
            return Err(HandoverError::BadAddress { at });
        }
        if visited.contains(&at) {
            return Err(HandoverError::Cycle { at });
        }
        nblocks += 1;
        if nblocks > KHO_MAX_BLOCKS {
            return Err(HandoverError::TooManyBlocks { at });
        }
        let mut hb = [0u8; BLOCK_HEADER_SIZE];
        p.read(at, &mut hb)?;
        let header = KhoBlockHeaderSer::read_from_bytes(&hb)
            .map_err(|_| HandoverError::BadAddress { at })?;
        let count = header.count;
        if count == 0 || count > per {
            return Err(HandoverError::BadBlockCount { at, count });
        }
        visited.try_insert(at, ())?;
        blocks.try_push(at)?;
        for i in 0..count {
            let addr = at + BLOCK_HEADER_SIZE as u64 + i * entry_size as u64;
            p.read(addr, buf)?;
            entry(addr, buf)?;
        }
        total += count as usize;
        at = header.next;
    }
    Ok(total)
}
