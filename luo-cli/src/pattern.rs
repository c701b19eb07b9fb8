//! The demo's "guest RAM" pattern: every 4 KiB page says which page it is, which generation
//! of it this is, and a checksum, followed by 4072 bytes derived from (page, generation).
//!
//! Layout of a page (native-endian u64 words): `[0]` page index, `[1]` generation, `[2]`
//! checksum of the payload, `[3..512]` payload. Generation `k` (1, 2, 3, ...) is always written
//! to page `(k - 1) % pages`: the first `pages` generations fill the RAM, later ones rewrite it
//! round robin. So the last generation written is enough to know what every byte must be.

/// Bytes per page.
pub const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
const HEADER_WORDS: usize = 3;

fn mix(mut x: u64) -> u64 {
    // splitmix64's finalizer.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn seed(page: u64, generation: u64) -> u64 {
    mix(page.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ generation.rotate_left(29)
        ^ 0x6c75_6f2d_6465_6d6f)
}

/// Payload word `i` of `(page, generation)`.
#[inline]
fn word(seed: u64, i: usize) -> u64 {
    mix(seed.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
}

#[inline]
fn fold(cs: u64, w: u64) -> u64 {
    (cs ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(17)
}

fn get(buf: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[i * 8..i * 8 + 8]);
    u64::from_ne_bytes(b)
}

fn put(buf: &mut [u8], i: usize, v: u64) {
    buf[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
}

/// The checksum page `(page, generation)` carries (and that the RAM checksum sums).
pub fn checksum(page: u64, generation: u64) -> u64 {
    let s = seed(page, generation);
    (HEADER_WORDS..WORDS).fold(s, |cs, i| fold(cs, word(s, i)))
}

/// Writes generation `generation` of page `page` into `buf` (one page); returns its checksum.
pub fn fill(buf: &mut [u8], page: u64, generation: u64) -> u64 {
    let s = seed(page, generation);
    let mut cs = s;
    for i in HEADER_WORDS..WORDS {
        let w = word(s, i);
        cs = fold(cs, w);
        put(buf, i, w);
    }
    put(buf, 0, page);
    put(buf, 1, generation);
    put(buf, 2, cs);
    cs
}

/// The first byte that differs from what a page must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Byte offset in the page.
    pub offset: usize,
    /// The expected 8-byte word at that offset's word.
    pub expected: u64,
    /// The word found.
    pub found: u64,
}

/// Checks every byte of `buf` (one page) against generation `generation` of page `page`;
/// returns its checksum.
pub fn check(buf: &[u8], page: u64, generation: u64) -> Result<u64, Mismatch> {
    let s = seed(page, generation);
    let mut cs = s;
    let bad = |i: usize, expected: u64, found: u64| {
        let diff = (expected ^ found).to_ne_bytes();
        let byte = diff.iter().position(|&b| b != 0).unwrap_or(0);
        Mismatch {
            offset: i * 8 + byte,
            expected,
            found,
        }
    };
    for i in HEADER_WORDS..WORDS {
        let w = word(s, i);
        cs = fold(cs, w);
        let found = get(buf, i);
        if found != w {
            return Err(bad(i, w, found));
        }
    }
    for (i, expected) in [page, generation, cs].into_iter().enumerate() {
        let found = get(buf, i);
        if found != expected {
            return Err(bad(i, expected, found));
        }
    }
    Ok(cs)
}

/// The generation page `page` holds once generations `1..=last` were written to `pages` pages
/// (requires `last >= pages`: the RAM was filled).
pub fn generation_of(page: u64, pages: u64, last: u64) -> u64 {
    let first = page + 1;
    first + (last - first) / pages * pages
}

/// The page generation `generation` is written to.
pub fn page_of(generation: u64, pages: u64) -> u64 {
    (generation - 1) % pages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_mismatch() {
        let mut buf = vec![0u8; PAGE];
        let cs = fill(&mut buf, 7, 42);
        assert_eq!(cs, checksum(7, 42));
        assert_eq!(check(&buf, 7, 42), Ok(cs));
        assert!(check(&buf, 7, 43).is_err());
        assert!(check(&buf, 8, 42).is_err());
        buf[1000] ^= 0x10;
        let m = check(&buf, 7, 42).unwrap_err();
        assert_eq!(m.offset, 1000);
    }

    #[test]
    fn generations() {
        let pages = 4;
        // 1..=4 fill pages 0..=3; 5 rewrites page 0, ..., 10 rewrites page 1.
        assert_eq!(page_of(5, pages), 0);
        assert_eq!(page_of(10, pages), 1);
        assert_eq!(generation_of(0, pages, 10), 9);
        assert_eq!(generation_of(1, pages, 10), 10);
        assert_eq!(generation_of(2, pages, 10), 7);
        assert_eq!(generation_of(3, pages, 4), 4);
        for last in 4..40 {
            for page in 0..pages {
                let g = generation_of(page, pages, last);
                assert!(g <= last && g + pages > last && page_of(g, pages) == page);
            }
        }
    }
}
