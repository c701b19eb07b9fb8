//! Verifying guest RAM against the state the old image saved, each page before the resumed
//! workload rewrites it; also run in place when an update is refused before the cut.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::handoff::DemoState;
use super::progress::Progress;
use super::workers::Gate;
use super::{fail, now, CHUNK_PAGES};
use crate::pattern::{self, PAGE};
use crate::CliError;

/// Checks one page against generation `g`, with the error naming the RAM byte.
fn check_page(bytes: &[u8], p: u64, g: u64) -> Result<u64, CliError> {
    pattern::check(bytes, p, g).map_err(|m| {
        fail(format!(
            "verification failed: guest RAM byte {:#x} (page {p}, offset {}): expected word {:#018x} of generation {g}, found {:#018x}",
            p * PAGE as u64 + m.offset as u64,
            m.offset,
            m.expected,
            m.found
        ))
    })
}

/// The resume: verifies the page the workload writes first and writes it (the first write of
/// the new image, which ends the blackout). Returns the page's old checksum and the time.
pub(super) fn resume(ram: &File, st: &DemoState) -> Result<(u64, u64), CliError> {
    let pages = st.ram / PAGE as u64;
    let mut buf = vec![0u8; PAGE];
    let p = pattern::page_of(st.last_gen + 1, pages);
    ram.read_exact_at(&mut buf, p * PAGE as u64)
        .map_err(|e| fail(format!("cannot read guest RAM: {e}")))?;
    let sum = check_page(&buf, p, pattern::generation_of(p, pages, st.last_gen))?;
    pattern::fill(&mut buf, p, st.last_gen + 1);
    ram.write_all_at(&buf, p * PAGE as u64)
        .map_err(|e| fail(format!("cannot write guest RAM: {e}")))?;
    Ok((sum, now()))
}

/// Verifies every page in the order the resumed worker rewrites them, opening the gate as it
/// goes; `done` pages (with checksum `sum`) were verified already. Returns the RAM checksum.
pub(super) fn verify(
    ram: &File,
    st: &DemoState,
    gate: &Gate,
    mut done: u64,
    mut sum: u64,
    label: String,
) -> Result<u64, CliError> {
    let pages = st.ram / PAGE as u64;
    let mut progress = Progress::new(label, pages);
    let started = now();
    let mut buf = vec![0u8; CHUNK_PAGES * PAGE];
    let chunk = CHUNK_PAGES as u64;
    while done < pages {
        let p0 = (st.last_gen + done) % pages;
        let n = chunk.min(pages - p0).min(pages - done);
        let bytes = &mut buf[..n as usize * PAGE];
        ram.read_exact_at(bytes, p0 * PAGE as u64)
            .map_err(|e| fail(format!("cannot read guest RAM: {e}")))?;
        for i in 0..n {
            let p = p0 + i;
            let g = pattern::generation_of(p, pages, st.last_gen);
            let page_bytes = &bytes[i as usize * PAGE..(i as usize + 1) * PAGE];
            sum = sum.wrapping_add(check_page(page_bytes, p, g)?);
        }
        done += n;
        gate.advance(done);
        progress.update(done);
    }
    progress.done(now() - started);
    if sum != st.checksum {
        return Err(fail(format!(
            "verification failed: RAM checksum {sum:#018x}, the old image saved {:#018x}",
            st.checksum
        )));
    }
    Ok(sum)
}
