//! Building a `luo-v5` handover by hand (incoming state made outside any model) and decoding
//! one back into canonical content with luo-core's own reader.

use luo_core::abi::{
    entries_per_block, Compat, KhoBlockHeaderSer, LuoFileSer, LuoFileSetSer, LuoFlbHeaderSer,
    LuoFlbSer, LuoSer, LuoSessionSer, SessionName, BLOCK_HEADER_SIZE, LUO_ABI_COMPATIBLE,
    LUO_FLB_PGCNT,
};
use luo_core::HandoverError;
use zerocopy::IntoBytes;

use crate::platform::{Handover, LoomPlatform, PAGE_SIZE};

/// One file as handed over: handler compatible, data word, token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonFile {
    /// The handler's compatible string.
    pub compat: String,
    /// `serialized_data`.
    pub data: u64,
    /// The user's token.
    pub token: u64,
}

/// One session as handed over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonSession {
    /// The name.
    pub name: String,
    /// Files in preservation order.
    pub files: Vec<CanonFile>,
}

/// One FLB entry as handed over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanonFlb {
    /// The FLB compatible string.
    pub compat: String,
    /// The handle from `preserve`.
    pub data: u64,
    /// Dependent file references.
    pub count: u64,
}

/// Everything a handover says, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Canonical {
    /// `liveupdate_num`.
    pub liveupdate_num: u64,
    /// Sessions in creation order.
    pub sessions: Vec<CanonSession>,
    /// FLB entries in registration order.
    pub flbs: Vec<CanonFlb>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Decodes a handover with `luo_core::image::parse`, over a platform booted from it.
pub fn decode(h: &Handover) -> Result<Canonical, HandoverError> {
    let p = LoomPlatform::booted_from(h);
    let Some(img) = luo_core::image::parse(&p)? else {
        return Ok(Canonical::default());
    };
    let sessions = img
        .sessions
        .as_slice()
        .iter()
        .map(|s| CanonSession {
            name: text(s.name.as_bytes()),
            files: s
                .files
                .as_slice()
                .iter()
                .map(|f| CanonFile {
                    compat: text(f.compat.as_bytes()),
                    data: f.data,
                    token: f.token,
                })
                .collect(),
        })
        .collect();
    let flbs = img
        .flbs
        .as_ref()
        .map(|v| {
            v.as_slice()
                .iter()
                .map(|f| CanonFlb {
                    compat: text(f.compat.as_bytes()),
                    data: f.data,
                    count: f.count,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Canonical {
        liveupdate_num: img.liveupdate_num,
        sessions,
        flbs,
    })
}

struct Writer {
    image: Handover,
    next: u64,
}

impl Writer {
    fn page(&mut self) -> u64 {
        let at = self.next;
        self.next += PAGE_SIZE as u64;
        self.image.pages.insert(at, vec![0; PAGE_SIZE]);
        at
    }

    fn put(&mut self, at: u64, bytes: &[u8]) {
        let base = at - at % PAGE_SIZE as u64;
        let off = (at - base) as usize;
        if let Some(p) = self.image.pages.get_mut(&base) {
            p[off..off + bytes.len()].copy_from_slice(bytes);
        }
    }

    /// Writes a chain of `entries` (each `size` bytes) and returns its head (0 if empty).
    fn chain(&mut self, size: usize, entries: &[Vec<u8>]) -> u64 {
        let per = entries_per_block(PAGE_SIZE, size);
        let blocks: Vec<u64> = entries.chunks(per).map(|_| self.page()).collect();
        for (b, chunk) in entries.chunks(per).enumerate() {
            let header = KhoBlockHeaderSer {
                next: blocks.get(b + 1).copied().unwrap_or(0),
                count: chunk.len() as u64,
            };
            self.put(blocks[b], header.as_bytes());
            for (i, e) in chunk.iter().enumerate() {
                self.put(blocks[b] + (BLOCK_HEADER_SIZE + i * size) as u64, e);
            }
        }
        blocks.first().copied().unwrap_or(0)
    }
}

/// Builds the handover a previous kernel would have left with these sessions and FLB entries
/// (the models' incoming state, made outside the model). Names and compatibles must be valid.
pub fn build(num: u64, sessions: &[CanonSession], flbs: &[CanonFlb]) -> Handover {
    let mut w = Writer {
        image: Handover::default(),
        next: PAGE_SIZE as u64,
    };
    let root = w.page();
    let flb_page = w.page();
    let mut session_entries = Vec::new();
    for s in sessions {
        let files: Vec<Vec<u8>> = s
            .files
            .iter()
            .map(|f| {
                LuoFileSer {
                    compatible: Compat::new(f.compat.as_bytes())
                        .expect("valid compatible")
                        .field(),
                    data: f.data,
                    token: f.token,
                }
                .as_bytes()
                .to_vec()
            })
            .collect();
        let head = w.chain(core::mem::size_of::<LuoFileSer>(), &files);
        session_entries.push(
            LuoSessionSer {
                name: SessionName::new(s.name.as_bytes())
                    .expect("valid name")
                    .field(),
                file_set_ser: LuoFileSetSer {
                    files: head,
                    count: s.files.len() as u64,
                },
            }
            .as_bytes()
            .to_vec(),
        );
    }
    let sessions_pa = w.chain(core::mem::size_of::<LuoSessionSer>(), &session_entries);
    let header = LuoFlbHeaderSer {
        pgcnt: LUO_FLB_PGCNT,
        count: flbs.len() as u64,
    };
    w.put(flb_page, header.as_bytes());
    for (i, f) in flbs.iter().enumerate() {
        let e = LuoFlbSer {
            name: Compat::new(f.compat.as_bytes())
                .expect("valid compatible")
                .field(),
            data: f.data,
            count: f.count,
        };
        w.put(
            flb_page + (header.as_bytes().len() + i * e.as_bytes().len()) as u64,
            e.as_bytes(),
        );
    }
    let mut compatible = [0u8; 8];
    compatible[..LUO_ABI_COMPATIBLE.len()].copy_from_slice(LUO_ABI_COMPATIBLE);
    let ser = LuoSer {
        compatible,
        liveupdate_num: num,
        sessions_pa,
        flbs_pa: flb_page,
    };
    w.put(root, ser.as_bytes());
    w.image.root = Some((root, core::mem::size_of::<LuoSer>() as u64));
    w.image
}
