//! The `luo-v5` handover ABI, byte-identical to `include/linux/kho/abi/{luo.h,block.h}`.
//!
//! Every C struct is `__packed` and native-endian; these mirrors are `#[repr(C, packed)]` with
//! zerocopy derives so they are read from and written to handover pages by value, never by
//! reference into possibly-unaligned memory. Sizes and field offsets are asserted at compile
//! time against the numbers in spec §7.

use core::cmp::Ordering;
use core::mem::{offset_of, size_of};

/// `LUO_ABI_COMPATIBLE`.
pub const LUO_ABI_COMPATIBLE: &[u8] = b"luo-v5";
/// `LUO_ABI_COMPAT_LEN`: `ALIGN(sizeof("luo-v5"), 8)`.
pub const LUO_ABI_COMPAT_LEN: usize = 8;
/// `LUO_KHO_ENTRY_NAME`: the KHO subtree that holds [`LuoSer`].
pub const LUO_KHO_ENTRY_NAME: &str = "LUO";
/// `LIVEUPDATE_SESSION_NAME_LENGTH`, NUL included.
pub const SESSION_NAME_LEN: usize = 64;
/// `LIVEUPDATE_HNDL_COMPAT_LENGTH`, NUL included.
pub const HNDL_COMPAT_LEN: usize = 48;
/// `LIVEUPDATE_FLB_COMPAT_LENGTH`, NUL included.
pub const FLB_COMPAT_LEN: usize = 48;
/// `KHO_MAX_BLOCKS` (`kho_block.c:38`): the most blocks one block set may hold.
pub const KHO_MAX_BLOCKS: usize = 10_000;
/// `LUO_FLB_PGCNT`.
pub const LUO_FLB_PGCNT: u64 = 1;
/// `MEMFD_LUO_FH_COMPATIBLE`.
pub const MEMFD_COMPATIBLE: &[u8] = b"memfd-v2";

/// `struct luo_ser`: the root of the handover, at the start of its own page.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    zerocopy_derive::FromBytes,
    zerocopy_derive::IntoBytes,
    zerocopy_derive::KnownLayout,
    zerocopy_derive::Immutable,
)]
#[repr(C, packed)]
pub struct LuoSer {
    /// `"luo-v5"` NUL-padded.
    pub compatible: [u8; LUO_ABI_COMPAT_LEN],
    /// Number of LUO-enabled boots in this kexec chain.
    pub liveupdate_num: u64,
    /// Address of the first session block, 0 if there are no sessions.
    pub sessions_pa: u64,
    /// Address of the FLB page.
    pub flbs_pa: u64,
}

/// `struct kho_block_header_ser`: the start of every block page.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    zerocopy_derive::FromBytes,
    zerocopy_derive::IntoBytes,
    zerocopy_derive::KnownLayout,
    zerocopy_derive::Immutable,
)]
#[repr(C, packed)]
pub struct KhoBlockHeaderSer {
    /// Address of the next block, 0 at the end.
    pub next: u64,
    /// Number of valid entries after the header.
    pub count: u64,
}

/// `struct luo_file_set_ser`.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    zerocopy_derive::FromBytes,
    zerocopy_derive::IntoBytes,
    zerocopy_derive::KnownLayout,
    zerocopy_derive::Immutable,
)]
#[repr(C, packed)]
pub struct LuoFileSetSer {
    /// Address of the first file block, 0 if the session has no files.
    pub files: u64,
    /// Number of files.
    pub count: u64,
}

/// `struct luo_session_ser`: one entry of the session chain.
#[derive(
    Clone,
    Copy,
    Debug,
    zerocopy_derive::FromBytes,
    zerocopy_derive::IntoBytes,
    zerocopy_derive::KnownLayout,
    zerocopy_derive::Immutable,
)]
#[repr(C, packed)]
pub struct LuoSessionSer {
    /// NUL-terminated name.
    pub name: [u8; SESSION_NAME_LEN],
    /// The session's files.
    pub file_set_ser: LuoFileSetSer,
}

/// `struct luo_file_ser`: one entry of a session's file chain.
#[derive(
    Clone,
    Copy,
    Debug,
    zerocopy_derive::FromBytes,
    zerocopy_derive::IntoBytes,
    zerocopy_derive::KnownLayout,
    zerocopy_derive::Immutable,
)]
#[repr(C, packed)]
pub struct LuoFileSer {
    /// The handler's compatible string.
    pub compatible: [u8; HNDL_COMPAT_LEN],
    /// The handler's `serialized_data`.
    pub data: u64,
    /// The user's token.
    pub token: u64,
}

/// `struct luo_flb_header_ser`: the start of the FLB page.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    zerocopy_derive::FromBytes,
    zerocopy_derive::IntoBytes,
    zerocopy_derive::KnownLayout,
    zerocopy_derive::Immutable,
)]
#[repr(C, packed)]
pub struct LuoFlbHeaderSer {
    /// Always [`LUO_FLB_PGCNT`].
    pub pgcnt: u64,
    /// Number of [`LuoFlbSer`] entries that follow.
    pub count: u64,
}

/// `struct luo_flb_ser`.
#[derive(
    Clone,
    Copy,
    Debug,
    zerocopy_derive::FromBytes,
    zerocopy_derive::IntoBytes,
    zerocopy_derive::KnownLayout,
    zerocopy_derive::Immutable,
)]
#[repr(C, packed)]
pub struct LuoFlbSer {
    /// The FLB's compatible string.
    pub name: [u8; FLB_COMPAT_LEN],
    /// The handle from `preserve`.
    pub data: u64,
    /// Dependent references at reboot.
    pub count: u64,
}

/// The header size of a block (`sizeof(struct kho_block_header_ser)`).
pub const BLOCK_HEADER_SIZE: usize = size_of::<KhoBlockHeaderSer>();

/// Entries of `entry_size` bytes one block of `page_size` holds (`count_per_block`).
pub const fn entries_per_block(page_size: usize, entry_size: usize) -> usize {
    (page_size - BLOCK_HEADER_SIZE) / entry_size
}

/// `LUO_FLB_MAX`: FLB entries that fit in the one FLB page.
pub const fn flb_max(page_size: usize) -> usize {
    (page_size - size_of::<LuoFlbHeaderSer>()) / size_of::<LuoFlbSer>()
}

// The layout contract with include/linux/kho/abi/{luo.h,block.h} (spec §7).
const _: () = assert!(size_of::<LuoSer>() == 32);
const _: () = assert!(offset_of!(LuoSer, compatible) == 0);
const _: () = assert!(offset_of!(LuoSer, liveupdate_num) == 8);
const _: () = assert!(offset_of!(LuoSer, sessions_pa) == 16);
const _: () = assert!(offset_of!(LuoSer, flbs_pa) == 24);
const _: () = assert!(size_of::<KhoBlockHeaderSer>() == 16);
const _: () = assert!(offset_of!(KhoBlockHeaderSer, next) == 0);
const _: () = assert!(offset_of!(KhoBlockHeaderSer, count) == 8);
const _: () = assert!(size_of::<LuoFileSetSer>() == 16);
const _: () = assert!(offset_of!(LuoFileSetSer, files) == 0);
const _: () = assert!(offset_of!(LuoFileSetSer, count) == 8);
const _: () = assert!(size_of::<LuoSessionSer>() == 80);
const _: () = assert!(offset_of!(LuoSessionSer, name) == 0);
const _: () = assert!(offset_of!(LuoSessionSer, file_set_ser) == 64);
const _: () = assert!(size_of::<LuoFileSer>() == 64);
const _: () = assert!(offset_of!(LuoFileSer, compatible) == 0);
const _: () = assert!(offset_of!(LuoFileSer, data) == 48);
const _: () = assert!(offset_of!(LuoFileSer, token) == 56);
const _: () = assert!(size_of::<LuoFlbHeaderSer>() == 16);
const _: () = assert!(offset_of!(LuoFlbHeaderSer, pgcnt) == 0);
const _: () = assert!(offset_of!(LuoFlbHeaderSer, count) == 8);
const _: () = assert!(size_of::<LuoFlbSer>() == 64);
const _: () = assert!(offset_of!(LuoFlbSer, name) == 0);
const _: () = assert!(offset_of!(LuoFlbSer, data) == 48);
const _: () = assert!(offset_of!(LuoFlbSer, count) == 56);
// Capacities at 4K pages (spec §12): 51 sessions and 63 files per block, 63 FLBs.
const _: () = assert!(entries_per_block(4096, size_of::<LuoSessionSer>()) == 51);
const _: () = assert!(entries_per_block(4096, size_of::<LuoFileSer>()) == 63);
const _: () = assert!(flb_max(4096) == 63);
const _: () = assert!(flb_max(16384) == 255);
const _: () = assert!(flb_max(65536) == 1023);

/// Length of a NUL-terminated string inside a fixed field, or None if there is no NUL.
pub const fn c_strlen(field: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < field.len() {
        if field[i] == 0 {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// A NUL-terminated string in a fixed `N`-byte field, as the C structs store names: 1..=N-1
/// bytes (any byte but NUL), NUL-padded. Bytes after the first NUL of a field read from memory
/// are ignored (upstream compares with `strcmp`/`strncmp`) and never kept.
///
/// Ordered as the byte strings are (`strcmp`'s order, which is also the padded arrays'), but
/// compared eight bytes at a time and only up to the word that holds the NUL: names are the
/// keys of the session tables, and a derived comparison `memcmp`s all 64 bytes at every step
/// of a tree walk.
#[derive(Clone, Copy)]
pub struct FixedStr<const N: usize>([u8; N]);

impl<const N: usize> FixedStr<N> {
    /// Compares two padded fields in big-endian words (so word order is byte order), stopping
    /// after the first word that ends in NUL in both: the rest is padding, zero in both.
    fn compare(&self, other: &Self) -> Ordering {
        let mut i = 0;
        while i + 8 <= N {
            let (Some(x), Some(y)) = (
                self.0[i..].first_chunk::<8>(),
                other.0[i..].first_chunk::<8>(),
            ) else {
                break;
            };
            let (x, y) = (u64::from_be_bytes(*x), u64::from_be_bytes(*y));
            if x != y {
                return x.cmp(&y);
            }
            if x & 0xff == 0 {
                return Ordering::Equal;
            }
            i += 8;
        }
        self.0.get(i..).cmp(&other.0.get(i..))
    }
}

impl<const N: usize> PartialEq for FixedStr<N> {
    fn eq(&self, other: &Self) -> bool {
        self.compare(other) == Ordering::Equal
    }
}

impl<const N: usize> Eq for FixedStr<N> {}

impl<const N: usize> PartialOrd for FixedStr<N> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<const N: usize> Ord for FixedStr<N> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.compare(other)
    }
}

/// A compatible string (handler or FLB): 1..=47 bytes in 48.
pub type Compat = FixedStr<HNDL_COMPAT_LEN>;

/// A session name: 1..=63 bytes in 64.
pub type SessionName = FixedStr<SESSION_NAME_LEN>;

impl<const N: usize> FixedStr<N> {
    /// Validates a string given without NUL (registration, names from callers).
    pub fn new(s: &[u8]) -> Option<Self> {
        if s.is_empty() || s.len() >= N || s.contains(&0) {
            return None;
        }
        let mut b = [0u8; N];
        b[..s.len()].copy_from_slice(s);
        Some(FixedStr(b))
    }

    /// Validates a field: the string ends at the first NUL; empty or unterminated fields are
    /// refused (CREATE_SESSION's rules, and the handover reader's). Inline: the ioctls build
    /// the name in place (out of line, its 65-byte result was copied twice more).
    #[inline]
    pub fn from_field(field: &[u8; N]) -> core::result::Result<Self, NameError> {
        match c_strlen(field) {
            None => Err(NameError::Unterminated),
            Some(0) => Err(NameError::Empty),
            Some(len) => {
                let mut b = [0u8; N];
                b[..len].copy_from_slice(&field[..len]);
                Ok(FixedStr(b))
            }
        }
    }

    /// The string without NUL.
    pub fn as_bytes(&self) -> &[u8] {
        let len = c_strlen(&self.0).unwrap_or(N);
        &self.0[..len]
    }

    /// The field up to the end of the word (8 bytes) that holds the first NUL, or all of it:
    /// what tells two strings apart (the rest is zero padding in both), found a word at a
    /// time. Equal strings have equal prefixes; hashing one is cheaper than the string's
    /// `strlen` and a byte-wise hash.
    #[inline]
    pub fn significant(&self) -> &[u8] {
        let mut end = 0;
        while let Some(word) = self.0.get(end..).and_then(|w| w.first_chunk::<8>()) {
            end += 8;
            if u64::from_be_bytes(*word) & 0xff == 0 {
                return &self.0[..end];
            }
        }
        &self.0
    }

    /// The NUL-padded field as written to memory.
    pub const fn field(&self) -> [u8; N] {
        self.0
    }

    /// The NUL-padded field, borrowed.
    pub const fn as_field(&self) -> &[u8; N] {
        &self.0
    }
}

impl<const N: usize> core::fmt::Debug for FixedStr<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "\"{}\"", self.as_bytes().escape_ascii())
    }
}

impl<const N: usize> core::fmt::Display for FixedStr<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.as_bytes().escape_ascii())
    }
}

/// Why a name field was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameError {
    /// First byte is NUL.
    Empty,
    /// No NUL in the field.
    Unterminated,
}
