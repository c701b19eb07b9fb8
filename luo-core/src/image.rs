//! Reading the incoming `luo-v5` state: everything the previous kernel left, validated once at
//! boot into a compact in-memory image.
//!
//! Upstream parses the root at `early_initcall` but walks sessions and files lazily at the first
//! open, and panics (or leaks) on anything malformed (spec §13 B2, B5, B15). Here the whole image
//! is validated at boot, every rule broken is a typed [`HandoverError`], and the pages the
//! previous kernel used for LUO's own metadata are released as soon as they have been read. Only
//! matching compatible strings to registered handlers waits for the first open, because handlers
//! register later in boot.

use zerocopy::FromBytes;

use crate::abi::{
    c_strlen, flb_max, Compat, LuoFileSer, LuoFlbHeaderSer, LuoFlbSer, LuoSer, LuoSessionSer,
    SessionName, LUO_ABI_COMPATIBLE, LUO_FLB_PGCNT,
};
use crate::block::read_chain;
use crate::errno::HandoverError;
use crate::platform::{OrdMap, PVec, Platform};

/// One preserved file as the previous kernel described it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageFile {
    /// Handler compatible string.
    pub compat: Compat,
    /// The handler's `serialized_data`.
    pub data: u64,
    /// The user's token.
    pub token: u64,
    /// Where the entry was read (for error messages).
    pub at: u64,
}

/// One incoming session.
pub struct ImageSession<P: Platform> {
    /// The name.
    pub name: SessionName,
    /// Files in preservation order.
    pub files: P::Vec<ImageFile>,
    /// Where the entry was read.
    pub at: u64,
}

/// One incoming FLB entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageFlb {
    /// FLB compatible string.
    pub compat: Compat,
    /// The handle from `preserve`.
    pub data: u64,
    /// Dependent file references at reboot.
    pub count: u64,
}

/// The validated incoming state.
pub struct Image<P: Platform> {
    /// `luo_ser.liveupdate_num` of the previous kernel.
    pub liveupdate_num: u64,
    /// Sessions in handover (creation) order.
    pub sessions: P::Vec<ImageSession<P>>,
    /// FLB entries; None if the previous kernel handed over no FLB page.
    pub flbs: Option<P::Vec<ImageFlb>>,
}

/// Pages of LUO metadata found while reading (released once read).
struct Pages<P: Platform> {
    visited: P::Map<u64, ()>,
    list: P::Vec<u64>,
}

/// Reads the incoming state, if any. On success and on failure, every metadata page that was
/// proven to belong to the handover (readable, aligned, reached once) is released.
pub fn parse<P: Platform>(p: &P) -> Result<Option<Image<P>>, HandoverError> {
    let Some((root, size)) = p.incoming_root()? else {
        return Ok(None);
    };
    let mut pages = Pages::<P> {
        visited: P::Map::default(),
        list: P::Vec::default(),
    };
    let result = parse_root(p, root, size, &mut pages);
    for &page in pages.list.as_slice() {
        p.release_incoming_page(page);
    }
    // The root page is released like upstream does (it came from KHO, so it is genuine).
    p.release_incoming_page(root - root % P::PAGE_SIZE as u64);
    result.map(Some)
}

fn parse_root<P: Platform>(
    p: &P,
    root: u64,
    size: u64,
    pages: &mut Pages<P>,
) -> Result<Image<P>, HandoverError> {
    if size < core::mem::size_of::<LuoSer>() as u64 {
        return Err(HandoverError::RootTooSmall { size });
    }
    let mut rb = [0u8; core::mem::size_of::<LuoSer>()];
    p.read(root, &mut rb)?;
    let ser = LuoSer::read_from_bytes(&rb).map_err(|_| HandoverError::BadAddress { at: root })?;
    // strncmp(compatible, "luo-v5", 8): equal up to and including the NUL.
    let compat = ser.compatible;
    if c_strlen(&compat) != Some(LUO_ABI_COMPATIBLE.len())
        || &compat[..LUO_ABI_COMPATIBLE.len()] != LUO_ABI_COMPATIBLE
    {
        return Err(HandoverError::BadCompatible { at: root });
    }
    if (root % P::PAGE_SIZE as u64) != 0 {
        return Err(HandoverError::BadAddress { at: root });
    }
    pages.visited.try_insert(root, ())?;
    let sessions = parse_sessions(p, ser.sessions_pa, pages)?;
    let flbs = if ser.flbs_pa == 0 {
        None
    } else {
        Some(parse_flbs(p, ser.flbs_pa, pages)?)
    };
    Ok(Image {
        liveupdate_num: ser.liveupdate_num,
        sessions,
        flbs,
    })
}

fn parse_sessions<P: Platform>(
    p: &P,
    head: u64,
    pages: &mut Pages<P>,
) -> Result<P::Vec<ImageSession<P>>, HandoverError> {
    let mut sessions = P::Vec::<ImageSession<P>>::default();
    let mut names = P::Map::<SessionName, ()>::default();
    let mut raw = P::Vec::<(LuoSessionSer, u64)>::default();
    read_chain::<P>(
        p,
        head,
        core::mem::size_of::<LuoSessionSer>(),
        &mut pages.visited,
        &mut pages.list,
        |at, bytes| {
            let s = LuoSessionSer::read_from_bytes(bytes)
                .map_err(|_| HandoverError::BadAddress { at })?;
            raw.try_push((s, at))?;
            Ok(())
        },
    )?;
    for &(s, at) in raw.as_slice() {
        let name =
            SessionName::from_field(&s.name).map_err(|_| HandoverError::BadSessionName { at })?;
        if names.try_insert(name, ())?.is_some() {
            return Err(HandoverError::DuplicateSessionName { at });
        }
        let files = parse_files(p, &s, at, pages)?;
        sessions.try_push(ImageSession { name, files, at })?;
    }
    Ok(sessions)
}

fn parse_files<P: Platform>(
    p: &P,
    s: &LuoSessionSer,
    at: u64,
    pages: &mut Pages<P>,
) -> Result<P::Vec<ImageFile>, HandoverError> {
    let set = s.file_set_ser;
    let (head, claimed) = (set.files, set.count);
    let mut files = P::Vec::<ImageFile>::default();
    let mut tokens = P::Map::<u64, ()>::default();
    let found = read_chain::<P>(
        p,
        head,
        core::mem::size_of::<LuoFileSer>(),
        &mut pages.visited,
        &mut pages.list,
        |fat, bytes| {
            let f = LuoFileSer::read_from_bytes(bytes)
                .map_err(|_| HandoverError::BadAddress { at: fat })?;
            let compat = Compat::from_field(&f.compatible)
                .map_err(|_| HandoverError::BadCompatibleString { at: fat })?;
            let token = f.token;
            if tokens.try_insert(token, ())?.is_some() {
                return Err(HandoverError::DuplicateToken { at: fat, token });
            }
            files.try_push(ImageFile {
                compat,
                data: f.data,
                token,
                at: fat,
            })?;
            Ok(())
        },
    )?;
    if found as u64 != claimed {
        return Err(HandoverError::FileCountMismatch {
            at,
            claimed,
            found: found as u64,
        });
    }
    Ok(files)
}

fn parse_flbs<P: Platform>(
    p: &P,
    at: u64,
    pages: &mut Pages<P>,
) -> Result<P::Vec<ImageFlb>, HandoverError> {
    if at % P::PAGE_SIZE as u64 != 0 {
        return Err(HandoverError::BadAddress { at });
    }
    if pages.visited.contains(&at) {
        return Err(HandoverError::Cycle { at });
    }
    let mut hb = [0u8; core::mem::size_of::<LuoFlbHeaderSer>()];
    p.read(at, &mut hb)?;
    pages.visited.try_insert(at, ())?;
    pages.list.try_push(at)?;
    let header =
        LuoFlbHeaderSer::read_from_bytes(&hb).map_err(|_| HandoverError::BadAddress { at })?;
    let count = header.count;
    if header.pgcnt != LUO_FLB_PGCNT || count > flb_max(P::PAGE_SIZE) as u64 {
        return Err(HandoverError::BadFlbHeader { at });
    }
    let mut flbs = P::Vec::<ImageFlb>::default();
    let mut names = P::Map::<Compat, ()>::default();
    let mut eb = [0u8; core::mem::size_of::<LuoFlbSer>()];
    for i in 0..count {
        let eat = at + hb.len() as u64 + i * eb.len() as u64;
        p.read(eat, &mut eb)?;
        let e =
            LuoFlbSer::read_from_bytes(&eb).map_err(|_| HandoverError::BadAddress { at: eat })?;
        let compat = Compat::from_field(&e.name)
            .map_err(|_| HandoverError::BadCompatibleString { at: eat })?;
        if names.try_insert(compat, ())?.is_some() {
            return Err(HandoverError::DuplicateFlb { at: eat });
        }
        flbs.try_push(ImageFlb {
            compat,
            data: e.data,
            count: e.count,
        })?;
    }
    Ok(flbs)
}
