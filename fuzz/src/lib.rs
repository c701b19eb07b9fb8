//! What the fuzz binaries add to the target bodies (luo-fuzz-targets, `fuzz-targets/`): the
//! malloc limit and the leak check a build without a sanitizer would lack.
//!
//! They live here, not with the bodies: a `#[global_allocator]` in luo-fuzz-targets would
//! become the allocator of the regression tests that replay the bodies too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The largest single allocation an input may cause, as libFuzzer's `-malloc_limit_mb` (which
/// defaults to `-rss_limit_mb`, 2048 in `run-ci.sh`).
pub const MALLOC_LIMIT: usize = 2048 << 20;

/// Live Rust allocations (allocations minus deallocations) of the process.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, aborting on an allocation of [`MALLOC_LIMIT`] bytes or more and
/// counting live allocations (for [`run_checked`]).
///
/// libFuzzer enforces `-malloc_limit_mb`, and finds leaks, through a sanitizer's malloc hooks
/// and LeakSanitizer, so a build without a sanitizer (`cargo fuzz build -s none`) would see
/// neither a huge allocation whose pages are never touched (RSS stays low) nor a leak. This
/// allocator and [`run_checked`] make both findings in every build.
pub struct LimitedAlloc;

impl LimitedAlloc {
    #[cold]
    fn too_large() -> ! {
        const MSG: &[u8] =
            b"==luo-fuzz== allocation of 2048 MiB or more: out-of-memory (malloc limit)\n";
        // SAFETY: writes a static buffer to stderr; no allocation in the allocator.
        unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
        std::process::abort()
    }
}

// SAFETY: every call is forwarded to `System` unchanged, or the process aborts.
unsafe impl GlobalAlloc for LimitedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MALLOC_LIMIT {
            Self::too_large();
        }
        LIVE.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MALLOC_LIMIT {
            Self::too_large();
        }
        LIVE.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= MALLOC_LIMIT {
            Self::too_large();
        }
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: LimitedAlloc = LimitedAlloc;

/// Runs `run` on one input and fails (a panic: a finding) if the input leaks.
///
/// A first execution of a path may leave allocations that live on by design (a `OnceLock`, a
/// pool that grew), so an input that ends with more live allocations than it started with is
/// run twice more: if it grows them both times, it leaks.
pub fn run_checked(data: &[u8], run: fn(&[u8])) {
    let before = LIVE.load(Ordering::Relaxed);
    run(data);
    let mut now = LIVE.load(Ordering::Relaxed);
    if now <= before {
        return;
    }
    for _ in 0..2 {
        let start = now;
        run(data);
        now = LIVE.load(Ordering::Relaxed);
        if now <= start {
            return;
        }
    }
    panic!("leak: every execution of this input leaves more allocations live");
}
