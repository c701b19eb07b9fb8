//! The workload threads: the old image's, which rewrites guest RAM until the cut, and the new
//! image's, which resumes after it but rewrites no page before the verifier has checked it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::now;
use crate::pattern::{self, PAGE};

/// What the old image's worker leaves at the cut.
pub(super) struct WorkerEnd {
    pub(super) last_gen: u64,
    pub(super) checksum: u64,
    pub(super) writes: u64,
    pub(super) last_write: u64,
}

/// The old image's workload: rewrites pages round robin with increasing generations until told
/// to stop, keeping the RAM checksum up to date. The generation a write replaces is known
/// (`k - pages`), so no per-page table is kept: the process's own memory does not grow with
/// the guest RAM, and neither does the teardown of its address space at exec.
pub(super) fn old_worker(
    ram: File,
    pages: u64,
    mut checksum: u64,
    fill_end: u64,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
) -> std::io::Result<WorkerEnd> {
    let mut buf = vec![0u8; PAGE];
    let mut k = pages + 1;
    let mut writes = 0;
    let mut last_write = fill_end;
    while !stop.load(Ordering::Acquire) {
        let p = pattern::page_of(k, pages);
        let c = pattern::fill(&mut buf, p, k);
        ram.write_all_at(&buf, p * PAGE as u64)?;
        last_write = now();
        checksum = checksum
            .wrapping_sub(pattern::checksum(p, k - pages))
            .wrapping_add(c);
        k += 1;
        writes += 1;
        progress.store(writes, Ordering::Relaxed);
    }
    Ok(WorkerEnd {
        last_gen: k - 1,
        checksum,
        writes,
        last_write,
    })
}

/// Hands the resumed worker the pages it may rewrite: positions (in its write order) up to
/// `verified` have been checked.
pub(super) struct Gate {
    pub(super) verified: Mutex<u64>,
    pub(super) cv: Condvar,
    pub(super) stop: AtomicBool,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn advance(&self, to: u64) {
        *self.lock() = to;
        self.cv.notify_all();
    }

    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _guard = self.lock();
        self.cv.notify_all();
    }
}

pub(super) struct NewWorkerEnd {
    pub(super) writes: u64,
}

/// The new image's workload: continues with generation `from` (the main thread wrote the ones
/// after `last` before it), never rewriting a page before the verifier has checked it.
pub(super) fn new_worker(
    ram: File,
    pages: u64,
    last: u64,
    from: u64,
    gate: Arc<Gate>,
) -> std::io::Result<NewWorkerEnd> {
    let mut buf = vec![0u8; PAGE];
    let mut writes = 0;
    let mut k = from;
    loop {
        if gate.stop.load(Ordering::Acquire) {
            break;
        }
        let pos = k - last;
        if pos <= pages {
            let mut v = gate.lock();
            while *v < pos && !gate.stop.load(Ordering::Acquire) {
                v = gate.cv.wait(v).unwrap_or_else(|e| e.into_inner());
            }
            if gate.stop.load(Ordering::Acquire) {
                break;
            }
        }
        let p = pattern::page_of(k, pages);
        pattern::fill(&mut buf, p, k);
        ram.write_all_at(&buf, p * PAGE as u64)?;
        writes += 1;
        k += 1;
    }
    Ok(NewWorkerEnd { writes })
}
