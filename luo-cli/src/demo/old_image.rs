//! The old image, `luo demo`: fill guest RAM, run the workload, preserve it, check everything
//! that could refuse the update, then the cut: stop, save, freeze and serialize, exec.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use backend_user::{next_image, sys, LiveUpdate};
use luo_handlers::MemfdHandler;

use super::dump::Dump;
use super::handoff::{DemoState, Times};
use super::progress::Progress;
use super::verify::verify;
use super::workers::{old_worker, Gate, WorkerEnd};
use super::{fail, now, DemoOptions, CHUNK_PAGES, SESSION, TOKEN_RAM, TOKEN_STATE};
use crate::pattern::{self, PAGE};
use crate::size::{format_ns, format_size};
use crate::CliError;

fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

fn new_memfd(name: &std::ffi::CStr, len: u64) -> Result<File, CliError> {
    let fd = sys::memfd_create(name, libc::MFD_CLOEXEC)
        .map_err(|e| fail(format!("memfd_create: {e}")))?;
    let f = File::from(fd);
    f.set_len(len)
        .map_err(|e| fail(format!("cannot size a {} memfd: {e}", format_size(len))))?;
    Ok(f)
}

/// `luo demo`: runs the old image and execs the new one. Returns only on failure.
pub fn run(opts: &DemoOptions, argv0: &OsStr) -> Result<std::convert::Infallible, CliError> {
    let page = PAGE as u64;
    if opts.ram < page || opts.ram % page != 0 {
        return Err(CliError::usage(format!(
            "--ram {} must be a positive multiple of {PAGE} bytes",
            opts.ram
        )));
    }
    let pages = opts.ram / page;
    if pages > u64::from(u32::MAX) {
        return Err(CliError::usage(format!(
            "--ram {} is larger than a memfd LUO preserves ({} pages)",
            format_size(opts.ram),
            u32::MAX
        )));
    }
    if let Some(avail) = mem_available() {
        if opts.ram > avail / 10 * 9 {
            return Err(CliError::usage(format!(
                "--ram {} is more than this machine has available ({})",
                format_size(opts.ram),
                format_size(avail)
            )));
        }
    }
    if let Some(off) = opts.corrupt {
        if off >= opts.ram {
            return Err(CliError::usage(format!(
                "--corrupt-byte {off} is outside the {} of guest RAM",
                format_size(opts.ram)
            )));
        }
    }
    let next: PathBuf = match &opts.next {
        Some(p) => {
            let meta = std::fs::metadata(p)
                .map_err(|e| CliError::usage(format!("--next {}: {e}", p.display())))?;
            if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
                return Err(CliError::usage(format!(
                    "--next {}: not an executable file",
                    p.display()
                )));
            }
            p.clone()
        }
        None => PathBuf::from("/proc/self/exe"),
    };
    let mut dump = match &opts.dump {
        Some(p) => Some(Dump::open(p)?),
        None => None,
    };
    let mut t = Times::default();
    let pid = std::process::id();
    out!(
        "luo demo: live update of a running workload across exec (pid {pid}, {} of guest RAM in a memfd)\n",
        format_size(opts.ram)
    );

    // The workload: guest RAM and its state page.
    let ram = new_memfd(c"luo-demo-ram", opts.ram)?;
    let state = new_memfd(c"luo-demo-state", page)?;
    t.fill_start = now();
    let mut progress = Progress::new(
        format!("old image: filling {}", format_size(opts.ram)),
        pages,
    );
    let mut checksum = 0u64;
    let mut buf = vec![0u8; CHUNK_PAGES * PAGE];
    let mut p = 0u64;
    while p < pages {
        let n = (pages - p).min(CHUNK_PAGES as u64) as usize;
        for i in 0..n {
            let pg = p + i as u64;
            let c = pattern::fill(&mut buf[i * PAGE..(i + 1) * PAGE], pg, pg + 1);
            checksum = checksum.wrapping_add(c);
        }
        ram.write_all_at(&buf[..n * PAGE], p * page)
            .map_err(|e| fail(format!("cannot fill guest RAM: {e}")))?;
        p += n as u64;
        progress.update(p);
    }
    t.fill_end = now();
    progress.done(t.fill_end - t.fill_start);
    drop(buf);

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let worker = {
        let ram = ram
            .try_clone()
            .map_err(|e| fail(format!("cannot dup the RAM memfd: {e}")))?;
        let stop = stop.clone();
        let written = written.clone();
        let fill_end = t.fill_end;
        std::thread::Builder::new()
            .name("workload".into())
            .spawn(move || old_worker(ram, pages, checksum, fill_end, stop, written))
            .map_err(|e| fail(format!("cannot start the workload: {e}")))?
    };
    let worker_start = now();
    let stop_worker = |stop: &AtomicBool| stop.store(true, Ordering::Release);

    // LUO: preserve both memfds while the workload runs.
    t.preserve_start = now();
    let luo = (|| {
        let lu = LiveUpdate::new()?;
        MemfdHandler::register(&lu)?;
        let dev = lu.open()?;
        let session = dev.create_session(SESSION)?;
        session.preserve_fd(ram.as_fd(), TOKEN_RAM)?;
        session.preserve_fd(state.as_fd(), TOKEN_STATE)?;
        Ok::<_, luo_core::Error>((lu, dev, session))
    })();
    t.preserve_end = now();
    let (lu, _dev, _session) = match luo {
        Ok(v) => v,
        Err(e) => {
            stop_worker(&stop);
            let _ = worker.join();
            return Err(fail(format!("cannot preserve the workload's memfds: {e}")));
        }
    };
    err!(
        "old image: preserved guest RAM (token {TOKEN_RAM:#x}) and state (token {TOKEN_STATE:#x}) in session \"{SESSION}\" in {}\n",
        format_ns(t.preserve_end - t.preserve_start)
    );

    let elapsed = now().saturating_sub(worker_start);
    let run = opts.run_ms.saturating_mul(1_000_000);
    if run > elapsed {
        std::thread::sleep(Duration::from_nanos(run - elapsed));
    }
    // On a busy machine the worker may not have run yet: the cut comes after its first write.
    let deadline = now().saturating_add(10_000_000_000);
    while written.load(Ordering::Relaxed) == 0 && !worker.is_finished() && now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }

    // Before the cut, everything that can refuse the update, while the workload runs: the next
    // image must speak this handover, and the dump must fit (reboot allocates no page, so the
    // image's size is known now).
    let ready = next_image::check(&next, crate::PROGRAM)
        .map_err(|e| e.to_string())
        .and_then(|()| match dump.as_mut() {
            Some(d) => d.reserve(lu.memory().image_len()),
            None => Ok(()),
        });
    if let Err(why) = ready {
        stop_worker(&stop);
        return Err(refused_before_the_cut(why, worker, &ram, opts.ram));
    }

    // The cut: stop the workload, save its state, freeze and serialize, exec.
    stop_worker(&stop);
    let end = worker
        .join()
        .map_err(|_| fail("the workload thread panicked"))?
        .map_err(|e| fail(format!("the workload failed to write guest RAM: {e}")))?;
    t.last_write = end.last_write;
    let saved = DemoState {
        ram: opts.ram,
        last_gen: end.last_gen,
        checksum: end.checksum,
        writes: end.writes,
        last_write: end.last_write,
    };
    state
        .write_all_at(&saved.to_bytes(), 0)
        .map_err(|e| fail(format!("cannot save the workload state: {e}")))?;
    t.save_end = now();
    if let Some(off) = opts.corrupt {
        let mut b = [0u8; 1];
        ram.read_exact_at(&mut b, off)
            .and_then(|()| ram.write_all_at(&[b[0] ^ 0x01], off))
            .map_err(|e| fail(format!("--corrupt-byte: {e}")))?;
        err!("old image: flipped guest RAM byte {off:#x} after the cut (--corrupt-byte)\n");
    }
    t.reboot_start = now();
    let handover = lu
        .reboot()
        .map_err(|e| fail(format!("live update reboot failed: {e}")))?;
    t.reboot_end = now();
    let mut dumped = None;
    if let Some(d) = dump.as_mut() {
        // The space was reserved before the cut; should the write still fail, the update goes
        // on without the dump rather than lose the workload.
        match d.write(&handover) {
            Ok(()) => dumped = Some(d.path.clone()),
            Err(e) => err!(
                "old image: cannot complete the dump to {} after the cut: {e}; the update goes on without it\n",
                d.path.display()
            ),
        }
        t.dump_end = now();
    }
    err!(
        "old image: workload stopped after {} page writes (last generation {}); exec {}\n",
        end.writes,
        end.last_gen,
        next.display()
    );
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();

    let mut args: Vec<OsString> = ["demo", "--stage2", "--handover-fd"]
        .iter()
        .map(OsString::from)
        .collect();
    args.push(handover.as_raw_fd().to_string().into());
    if let Some(p) = dumped {
        args.push("--dumped".into());
        args.push(p.into());
    }
    args.push("--times".into());
    t.exec = now();
    args.push(t.encode().into());
    let err = next_image::exec(&next, argv0, &args);
    Err(fail(format!(
        "cannot exec {} after the cut: {err}; the handover was serialized and the guest RAM goes with this process",
        next.display()
    )))
}

/// The update was refused before the cut: the workload is stopped now, not at a cut, and its
/// guest RAM verified in place, so the error can say that nothing was lost.
fn refused_before_the_cut(
    why: String,
    worker: std::thread::JoinHandle<std::io::Result<WorkerEnd>>,
    ram: &File,
    ram_len: u64,
) -> CliError {
    let end = match worker.join() {
        Ok(Ok(end)) => end,
        Ok(Err(e)) => {
            return fail(format!(
                "{why}; the update was refused before the cut, but the workload failed to write guest RAM: {e}"
            ))
        }
        Err(_) => {
            return fail(format!(
                "{why}; the update was refused before the cut, but the workload thread panicked"
            ))
        }
    };
    let st = DemoState {
        ram: ram_len,
        last_gen: end.last_gen,
        checksum: end.checksum,
        writes: end.writes,
        last_write: end.last_write,
    };
    let gate = Gate {
        verified: Mutex::new(0),
        cv: Condvar::new(),
        stop: AtomicBool::new(false),
    };
    let label = format!(
        "old image: update refused; verifying {} in place",
        format_size(ram_len)
    );
    match verify(ram, &st, &gate, 0, 0, label) {
        Ok(_) => fail(format!(
            "{why}; nothing was lost: the update was refused before the cut, the workload ran on \
             and its {} of guest RAM verified intact in place (generation {})",
            format_size(ram_len),
            end.last_gen
        )),
        Err(e) => fail(format!(
            "{why}; the update was refused before the cut, but {}",
            e.message
        )),
    }
}
