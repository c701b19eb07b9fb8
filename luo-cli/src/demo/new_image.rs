//! The new image, the hidden `luo demo --stage2`: boot LUO from the handover, retrieve the
//! memfds, resume the workload while verifying guest RAM, finish the session, and report the
//! timeline and the blackout.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use backend_user::{sys, LiveUpdate};
use luo_handlers::MemfdHandler;

use super::handoff::{DemoState, STATE_LEN};
use super::verify::{resume, verify};
use super::workers::{new_worker, Gate};
use super::{fail, now, Stage2Options, LINGER_MS, SESSION, TOKEN_RAM, TOKEN_STATE};
use crate::pattern::PAGE;
use crate::size::{format_ns, format_offset, format_size};
use crate::CliError;

/// The hidden `luo demo --stage2`: the new image. `t_main` is the first timestamp of `main`.
pub fn stage2(opts: &Stage2Options, t_main: u64) -> Result<(), CliError> {
    let fd = opts.handover_fd;
    if fd <= 2 || !sys::fd_is_open(fd) {
        return Err(fail(format!(
            "handover fd {fd} is not open: --stage2 is run by `luo demo` across exec, not by hand"
        )));
    }
    // SAFETY: the number is open (checked above) and above stdio; nothing in this freshly
    // exec'd image has opened or adopted it, so this is its only owner. It was left open by
    // the old image's `LiveUpdate::reboot` for exactly this adoption.
    let handover = unsafe { sys::adopt(fd) };
    sys::set_cloexec(handover.as_fd(), true).map_err(|e| fail(format!("handover fd {fd}: {e}")))?;
    let t = opts.times;

    let boot_start = now();
    let lu = LiveUpdate::boot(&handover)
        .map_err(|e| fail(format!("cannot boot from handover fd {fd}: {e}")))?;
    // Also marks the inherited memfds close-on-exec until retrieved.
    MemfdHandler::register(&lu)
        .map_err(|e| fail(format!("cannot register the memfd handler: {e}")))?;
    let dev = lu
        .open()
        .map_err(|e| fail(format!("cannot restore the incoming sessions: {e}")))?;
    let boot_end = now();

    let session = dev
        .retrieve_session(SESSION)
        .map_err(|e| fail(format!("cannot retrieve session \"{SESSION}\": {e}")))?;
    let ram = File::from(
        session
            .retrieve_fd(TOKEN_RAM)
            .map_err(|e| fail(format!("cannot retrieve the guest RAM memfd: {e}")))?,
    );
    let state_file = File::from(
        session
            .retrieve_fd(TOKEN_STATE)
            .map_err(|e| fail(format!("cannot retrieve the state memfd: {e}")))?,
    );
    let mut sb = [0u8; STATE_LEN];
    state_file
        .read_exact_at(&mut sb, 0)
        .map_err(|e| fail(format!("cannot read the state memfd: {e}")))?;
    let st = DemoState::from_bytes(&sb).map_err(fail)?;
    let ram_len = ram
        .metadata()
        .map_err(|e| fail(format!("cannot stat guest RAM: {e}")))?
        .len();
    if ram_len != st.ram {
        return Err(fail(format!(
            "guest RAM is {ram_len} bytes, the old image saved {}",
            st.ram
        )));
    }
    let retrieve_end = now();
    let pages = st.ram / PAGE as u64;

    // Resume the workload and verify, each page before its first rewrite.
    let verify_start = now();
    let (first_sum, first_write) = resume(&ram, &st)?;
    let gate = Arc::new(Gate {
        verified: Mutex::new(1),
        cv: Condvar::new(),
        stop: AtomicBool::new(false),
    });
    let worker = {
        let ram = ram
            .try_clone()
            .map_err(|e| fail(format!("cannot dup the RAM memfd: {e}")))?;
        let gate = gate.clone();
        let last = st.last_gen;
        std::thread::Builder::new()
            .name("workload".into())
            .spawn(move || new_worker(ram, pages, last, last + 2, gate))
            .map_err(|e| fail(format!("cannot resume the workload: {e}")))?
    };
    let label = format!(
        "new image: verifying {} against the old image's last state (workload running)",
        format_size(st.ram)
    );
    let verified = verify(&ram, &st, &gate, 1, first_sum, label);
    let verify_end = now();
    if verified.is_ok() {
        std::thread::sleep(Duration::from_millis(LINGER_MS));
    }
    gate.stop();
    let joined = worker.join();
    let checksum = verified?;
    let end = joined
        .map_err(|_| fail("the workload thread panicked"))?
        .map_err(|e| {
            fail(format!(
                "the resumed workload failed to write guest RAM: {e}"
            ))
        })?;
    let writes = end.writes + 1;

    let finish_start = now();
    session
        .finish()
        .map_err(|e| fail(format!("cannot finish session \"{SESSION}\": {e}")))?;
    let finish_end = now();

    // The report.
    let mut o = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "new image: pid {} (same process), booted LUO from handover fd {fd}",
        std::process::id()
    );
    if let Some(p) = &opts.dumped {
        let _ = writeln!(o, "handover image written to {}", p.display());
    }
    let _ = writeln!(
        o,
        "verification: OK, every byte of {pages} pages ({}) is what the old image last wrote (generation {}, checksum {checksum:#018x})",
        format_size(st.ram),
        st.last_gen
    );
    let _ = writeln!(
        o,
        "workload: {} page writes in the old image after the fill, {} in the new one; session \"{SESSION}\" finished",
        st.writes, writes
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "timeline (CLOCK_MONOTONIC, +0 = the old image's last write):"
    );
    let zero = i128::from(t.last_write);
    let mut row = |name: &str, start: u64, took: Option<u64>, what: &str| {
        let at = format_offset(i128::from(start) - zero);
        let took = took.map(format_ns).unwrap_or_default();
        let _ = writeln!(o, "  {name:<18}{at:>13}  {took:>10}  {what}");
    };
    row(
        "fill RAM",
        t.fill_start,
        Some(t.fill_end - t.fill_start),
        "old image writes every page once (before the workload starts)",
    );
    row(
        "preserve",
        t.preserve_start,
        Some(t.preserve_end - t.preserve_start),
        "create session, preserve 2 memfds (workload running)",
    );
    row(
        "stop workload",
        t.last_write,
        None,
        "last write of the old image",
    );
    row(
        "save state",
        t.last_write,
        Some(t.save_end.saturating_sub(t.last_write)),
        "join the workload, save last generation and checksum in the state memfd",
    );
    row(
        "freeze+serialize",
        t.reboot_start,
        Some(t.reboot_end.saturating_sub(t.reboot_start)),
        "LiveUpdate::reboot: freeze files, write luo-v5 into the handover memfd",
    );
    if t.dump_end != 0 {
        row(
            "dump",
            t.reboot_end,
            Some(t.dump_end.saturating_sub(t.reboot_end)),
            "--dump: copy the handover memfd to the file",
        );
    }
    row(
        "exec",
        t.exec,
        Some(t_main.saturating_sub(t.exec)),
        "execve of the next image until its main()",
    );
    row(
        "restore (boot)",
        boot_start,
        Some(boot_end - boot_start),
        "LiveUpdate::boot, register the memfd handler, open",
    );
    row(
        "retrieve",
        boot_end,
        Some(retrieve_end - boot_end),
        "session and both memfds by token, read the saved state",
    );
    row(
        "verify",
        verify_start,
        Some(verify_end - verify_start),
        "every byte, each page before the resumed workload rewrites it",
    );
    row(
        "resume",
        first_write,
        None,
        "first write of the new image (after verifying that page)",
    );
    row(
        "finish",
        finish_start,
        Some(finish_end - finish_start),
        "FINISH the session",
    );
    let blackout = first_write.saturating_sub(t.last_write);
    let _ = writeln!(
        o,
        "blackout: {} = {blackout} ns (last write in the old image -> first write in the new image)",
        format_ns(blackout)
    );
    out!("{o}");
    let _ = std::io::stdout().flush();
    Ok(())
}
