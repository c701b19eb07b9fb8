//! An update: load the next kernel, run the barrier, write the manifest, reboot.
//!
//! Every step before the reboot can fail, and every failure leaves things as they were:
//! the loaded kernel is unloaded, the manifest session is closed (which unpreserves it),
//! listeners are told to resume (`EV_ABORTED`), and the requester gets the errno and an account
//! of what luod still holds. The kernel's own refusal (a file that cannot be frozen) is the
//! same: LUO unfreezes everything before `reboot()` returns (spec §3.4), so luod only has to
//! clean up its manifest.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use luo_client::sys::{self, PeerCred};
use luo_client::wire::{
    self, errno as werr, op, BackendKind, Dir, Frame, Phase, UpdateRequest, Writer,
};
use luo_client::{errno_name, Session};

use crate::logging::log;
use crate::manifest::{Manifest, MANIFEST_SESSION};
use crate::state::{
    holdings, lock_table, lock_upd, memfd_with, names, refuse, sessions_of, Daemon, Key, Out,
    Refusal, Reply, Table,
};

/// A listener taking part in one update.
struct Part {
    id: u64,
    who: String,
    uid: u32,
    label: String,
    out: Arc<Out>,
}

/// Why a listener did not let an update through.
#[derive(Clone, Copy)]
enum Verdict {
    Refused(i32),
    Late,
}

/// A failed listener: its index, verdict, the sessions it speaks for, and the account.
type Described = (usize, Verdict, Vec<Key>, String);

/// The barrier's result.
struct Outcome {
    /// Listeners that disconnected meanwhile (not waited for).
    gone: Vec<String>,
    /// Listeners that refused or were late, by index into the parts.
    failed: Vec<(usize, Verdict)>,
}

/// Runs an UPDATE request. Returns the reply, or never returns (a successful update: the
/// kernel reboots, or luod execs its next image after answering the requester itself).
pub(crate) fn run(d: &Arc<Daemon>, cred: PeerCred, out: &Arc<Out>, f: Frame) -> Option<Reply> {
    if !d.is_admin(cred.uid) {
        return Some(Err(refuse(
            libc::EPERM,
            format!(
                "uid {} may not update: only root and luod's own uid may",
                cred.uid
            ),
        )));
    }
    let req = match UpdateRequest::decode(&f.body) {
        Ok(r) => r,
        Err(e) => return Some(Err(refuse(werr::EBADMSG, e.to_string()))),
    };
    let round = {
        let mut u = lock_upd(d);
        if u.phase != Phase::Idle {
            return Some(Err(refuse(libc::EBUSY, "an update is already running")));
        }
        u.phase = Phase::Barrier;
        u.round += 1;
        u.round
    };
    let mut fds = f.fds.into_iter();
    let kernel = if req.has_kernel { fds.next() } else { None };
    let initrd = if req.has_initrd { fds.next() } else { None };
    Some(Err(attempt(d, out, f.tag, &req, round, kernel, initrd)))
}

/// Abandons the update: see the module comment. Returns the refusal for the requester.
fn abort(d: &Daemon, parts: &[Part], errno: i32, why: String, unload: bool) -> Refusal {
    if unload {
        if let Err(e) = sys::kexec_unload() {
            log!("kexec unload: {e}");
        }
    }
    let state = holdings(&lock_table(d));
    let msg = format!("{why}; {state}; nothing was lost and the update can be retried");
    {
        let mut u = lock_upd(d);
        u.phase = Phase::Idle;
        u.last = Some((errno, msg.clone()));
    }
    let body = Writer::new().i32(errno).bytes(msg.as_bytes()).finish();
    for p in parts {
        // Best effort: a listener that went away has nothing to resume.
        let _ = p.out.send(op::EV_ABORTED, 0, &body);
    }
    log!("update abandoned: {msg} ({})", errno_name(errno));
    refuse(errno, msg)
}

fn os_errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn attempt(
    d: &Arc<Daemon>,
    out: &Arc<Out>,
    tag: u32,
    req: &UpdateRequest,
    round: u64,
    kernel: Option<OwnedFd>,
    initrd: Option<OwnedFd>,
) -> Refusal {
    // 1. The next image.
    let unload = match d.opts.backend {
        BackendKind::Kernel => {
            let Some(k) = kernel else {
                return abort(
                    d,
                    &[],
                    libc::EINVAL,
                    "the kernel backend needs a kernel image".into(),
                    false,
                );
            };
            let Ok(cmdline) = CString::new(req.cmdline.clone()) else {
                return abort(
                    d,
                    &[],
                    libc::EINVAL,
                    "command line has a NUL byte".into(),
                    false,
                );
            };
            if let Err(e) =
                sys::kexec_file_load(k.as_fd(), initrd.as_ref().map(|f| f.as_fd()), &cmdline)
            {
                let why = format!("kexec_file_load refused the kernel: {e}; no kernel is loaded");
                return abort(d, &[], os_errno(&e), why, false);
            }
            true
        }
        BackendKind::User => {
            if kernel.is_some() || initrd.is_some() {
                let why = format!(
                    "the user backend updates by exec'ing luod's next image ({}); it takes no kernel or initrd",
                    d.next_image.display()
                );
                return abort(d, &[], libc::EINVAL, why, false);
            }
            // The next image must prove it speaks this handover before anything is frozen.
            let program = backend_user::next_image::PROGRAM_LUOD;
            if let Err(e) = backend_user::next_image::check(&d.next_image, program) {
                return abort(d, &[], e.errno(), e.to_string(), false);
            }
            false
        }
    };

    // 2. The barrier.
    let timeout = match req.barrier_timeout_ms {
        0 => d.opts.barrier_timeout,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let parts: Vec<Part> = lock_upd(d)
        .listeners
        .iter()
        .map(|(id, l)| Part {
            id: *id,
            who: if l.label.is_empty() {
                format!("pid {} (uid {})", l.pid, l.uid)
            } else {
                format!("{:?} (pid {}, uid {})", l.label, l.pid, l.uid)
            },
            uid: l.uid,
            label: l.label.clone(),
            out: l.out.clone(),
        })
        .collect();
    let outcome = barrier(d, &parts, round, timeout, req.force);
    if !outcome.gone.is_empty() {
        log!(
            "listener(s) went away during the barrier, not waited for: {}",
            outcome.gone.join(", ")
        );
    }
    let ms_timeout = timeout.as_millis();
    let mut dropped: Vec<String> = Vec::new();
    let mut parts = parts;
    if !outcome.failed.is_empty() {
        let described: Vec<Described> = {
            let t = lock_table(d);
            outcome
                .failed
                .iter()
                .map(|&(i, v)| {
                    let p = &parts[i];
                    let keys = sessions_of(&t, p.uid, &p.label);
                    let what = match v {
                        Verdict::Refused(e) => format!("refused the update with {}", errno_name(e)),
                        Verdict::Late => {
                            format!("did not reach the barrier within {ms_timeout} ms")
                        }
                    };
                    let line = format!(
                        "listener {} {what}, for uid {}'s {}",
                        p.who,
                        p.uid,
                        names(&keys)
                    );
                    (i, v, keys, line)
                })
                .collect()
        };
        if !req.force {
            let errno = described
                .iter()
                .find_map(|(_, v, _, _)| match v {
                    Verdict::Refused(e) => Some(*e),
                    Verdict::Late => None,
                })
                .unwrap_or(werr::ETIMEDOUT);
            let lines: Vec<_> = described.iter().map(|x| x.3.clone()).collect();
            let why = format!(
                "{}; root may override with a forced update (luoctl update --force), which drops \
                 those sessions",
                lines.join("; ")
            );
            return abort(d, &parts, errno, why, unload);
        }
        // Forced: the veto of each such listener counts for its own sessions only. They are
        // dropped (not handed over); the listener is told and resumes; the update goes on.
        let mut out_of_it = BTreeSet::new();
        for (i, _, keys, line) in &described {
            let gone_now = drop_sessions(d, keys);
            let account = format!("{line}: dropped by root's forced update: {gone_now}");
            let body = Writer::new()
                .i32(libc::ECANCELED)
                .bytes(account.as_bytes())
                .finish();
            let _ = parts[*i].out.send(op::EV_ABORTED, 0, &body);
            log!("{account}");
            dropped.push(account);
            out_of_it.insert(*i);
        }
        let mut i = 0;
        parts.retain(|_| {
            i += 1;
            !out_of_it.contains(&(i - 1))
        });
    }

    // 3. The manifest, then the reboot. The table stays locked from here: a session created
    // now would be missing from the manifest. A forced update that fails to freeze a file
    // drops that file's session and tries once more.
    let mut retried = false;
    loop {
        let table = lock_table(d);
        let manifest = Manifest {
            generation: d.generation,
            sessions: table
                .keys()
                .filter(|(_, dir, _)| *dir == Dir::Outgoing)
                .map(|(uid, _, name)| (*uid, name.clone()))
                .collect(),
        };
        let ms = match write_manifest(d, &manifest) {
            Ok(s) => s,
            Err(e) => {
                drop(table);
                let why = format!("cannot preserve luod's manifest: {e}");
                return abort(d, &parts, e.errno().get(), why, unload);
            }
        };
        lock_upd(d).phase = Phase::Rebooting;
        log!(
            "barrier reached by {} listener(s); rebooting with {} session(s)",
            parts.len(),
            manifest.sessions.len()
        );
        match d.opts.backend {
            BackendKind::Kernel => {
                for p in &parts {
                    let _ = p.out.send(op::EV_REBOOTING, 0, &[]);
                }
                // Returns only if the kernel refused; LUO has unfrozen everything by then.
                let e = sys::reboot_kexec();
                drop(ms);
                drop(table);
                let why = format!(
                    "the kernel refused reboot(LINUX_REBOOT_CMD_KEXEC): {e} (with the kernel \
                     backend luod cannot tell which file; each client's own preserve shows it)"
                );
                return abort(d, &parts, os_errno(&e), why, true);
            }
            BackendKind::User => {
                let gate = d.accept_gate.lock().unwrap_or_else(|e| e.into_inner());
                let Some(lu) = d.lu.as_ref() else {
                    drop((gate, ms, table));
                    return abort(
                        d,
                        &parts,
                        libc::EIO,
                        "user backend without LUO".into(),
                        false,
                    );
                };
                match lu.reboot() {
                    Err(e) => {
                        drop((gate, ms, table));
                        let culprits = unfreezable(&lock_table(d));
                        if req.force && !retried && !culprits.is_empty() {
                            retried = true;
                            let keys: Vec<_> = culprits.iter().map(|c| c.0.clone()).collect();
                            let gone_now = drop_sessions(d, &keys);
                            let account = format!(
                                "{}: dropped by root's forced update: {gone_now}",
                                describe(&culprits)
                            );
                            log!("{account}");
                            dropped.push(account);
                            continue;
                        }
                        let who = if culprits.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "; {}; root may release it (luoctl release NAME --uid UID) or \
                                 force the update (luoctl update --force), which drops it",
                                describe(&culprits)
                            )
                        };
                        let why = format!(
                            "LUO refused the reboot (a preserved file could not be frozen): {e}{who}"
                        );
                        return abort(d, &parts, e.errno().get(), why, false);
                    }
                    Ok(handover) => {
                        d.stopping.store(true, Ordering::Release);
                        for p in &parts {
                            let _ = p.out.send(op::EV_REBOOTING, 0, &[]);
                        }
                        let next = d.generation.saturating_add(1);
                        let _ = out.reply(
                            op::UPDATE,
                            tag,
                            Ok((
                                Writer::new()
                                    .u64(next)
                                    .bytes(dropped.join("; ").as_bytes())
                                    .finish(),
                                Vec::new(),
                            )),
                        );
                        // The outgoing sessions are in the handover now (incoming in the next
                        // image): their files leave the fd store, which would otherwise hand
                        // them to a later luod a second time.
                        for e in table.values() {
                            d.forget(&e.held);
                        }
                        let e = exec_next(d, &handover);
                        // The state is serialized into `handover` and this image can no longer
                        // change it; without a next image there is nobody to hand it to.
                        log!("FATAL: cannot exec {}: {e}", d.next_image.display());
                        std::process::exit(70);
                    }
                }
            }
        }
    }
}

/// Removes `keys` from the table and closes them for good (channels included); returns an
/// account for the log and the requester.
fn drop_sessions(d: &Daemon, keys: &[(u32, Dir, String)]) -> String {
    let entries: Vec<_> = {
        let mut t = lock_table(d);
        keys.iter()
            .filter_map(|k| t.remove(k).map(|e| (k.clone(), e)))
            .collect()
    };
    if entries.is_empty() {
        return "no session to drop".into();
    }
    let mut lost = Vec::new();
    for (k, e) in entries {
        d.forget(&e.held);
        let files = e
            .held
            .session
            .file_count()
            .map_or(String::new(), |n| format!(" with {n} file(s)"));
        if !e.revoke(d.revoke_wait()) {
            log!("session {:?}: a channel thread still holds it", k.2);
        }
        lost.push(format!("{}{files}", names(&[k])));
    }
    format!("{} (lost)", lost.join(", "))
}

/// A file that cannot be frozen: its session, token and size.
type Culprit = ((u32, Dir, String), u64, u64);

/// The outgoing files LUO's memfd handler refuses to freeze (`EFBIG`: more than `u32::MAX`
/// pages). luod recorded each file's inode at preserve; the file itself is open in luod's own
/// fd table (LUO holds it), so `/proc/self/fd` gives its size now.
fn unfreezable(t: &Table) -> Vec<Culprit> {
    use std::os::unix::fs::MetadataExt;
    let mut sizes = std::collections::HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for ent in dir.flatten() {
            if let Ok(m) = std::fs::metadata(ent.path()) {
                sizes.insert((m.dev(), m.ino()), m.size());
            }
        }
    }
    let page = backend_user::memory::PAGE_SIZE as u64;
    let mut v = Vec::new();
    for (k, e) in t.iter().filter(|(k, _)| k.1 == Dir::Outgoing) {
        let files = e.held.files.lock().unwrap_or_else(|p| p.into_inner());
        for (token, id) in files.iter() {
            if let Some(&size) = sizes.get(id) {
                if size.div_ceil(page) > u64::from(u32::MAX) {
                    v.push((k.clone(), *token, size));
                }
            }
        }
    }
    v
}

fn describe(c: &[Culprit]) -> String {
    c.iter()
        .map(|((uid, _, name), token, size)| {
            format!(
                "session {:?} of uid {uid}: file token {token} is {size} bytes, more than \
                 LUO hands over (u32::MAX pages)",
                wire::kernel_name(*uid, name)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Waits until every listener of `parts` reached the barrier, one refused (unless `force`:
/// then every refusal is noted and the others are still waited for), or `timeout` passed
/// (the listeners still waiting are late). Listeners that disconnect meanwhile are not waited
/// for: a client that is gone has nothing in flight, and luod holds its sessions.
fn barrier(d: &Daemon, parts: &[Part], round: u64, timeout: Duration, force: bool) -> Outcome {
    let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    let body = Writer::new().u32(ms).u64(round).finish();
    let mut gone = BTreeSet::new();
    for p in parts {
        if p.out.send(op::EV_PREPARE, 0, &body).is_err() {
            gone.insert(p.id);
        }
    }
    let deadline = Instant::now() + timeout;
    let mut u = lock_upd(d);
    loop {
        let mut waiting = Vec::new();
        let mut failed = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            if gone.contains(&p.id) {
                continue;
            }
            match u.listeners.get(&p.id).map(|l| l.answer) {
                None => {
                    gone.insert(p.id);
                }
                Some(Some((r, 0))) if r == round => {}
                Some(Some((r, e))) if r == round => failed.push((i, Verdict::Refused(e))),
                Some(_) => waiting.push(i),
            }
        }
        let now = Instant::now();
        let over = waiting.is_empty() || now >= deadline || (!force && !failed.is_empty());
        if over {
            if failed.is_empty() || force {
                failed.extend(waiting.iter().map(|&i| (i, Verdict::Late)));
            }
            return Outcome {
                gone: parts
                    .iter()
                    .filter(|p| gone.contains(&p.id))
                    .map(|p| p.who.clone())
                    .collect(),
                failed,
            };
        }
        u = d
            .upd_cv
            .wait_timeout(u, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Creates luod's manifest session with the manifest memfd under token 0.
fn write_manifest(d: &Daemon, m: &Manifest) -> Result<Session, luo_client::Error> {
    let s = d.device.create_session(MANIFEST_SESSION)?;
    let fd = memfd_with(&m.encode()).map_err(luo_client::Error::Io)?;
    s.preserve_fd(&fd, 0)?;
    Ok(s)
}

/// Execs luod's next image with the handover memfd and the listening socket (user backend).
/// Returns only on failure.
fn exec_next(d: &Daemon, handover: &OwnedFd) -> std::io::Error {
    let listen = d.listen_fd();
    // The listener keeps owning the fd; only its close-on-exec flag changes, so it survives.
    if let Err(e) = backend_user::sys::set_cloexec(d.listener.as_fd(), false) {
        return e;
    }
    // execve of the path itself: no PATH search, no /bin/sh fallback (Command's execvp has one).
    let mut args: Vec<std::ffi::OsString> = d.opts.to_args().into_iter().map(Into::into).collect();
    args.push("--handover-fd".into());
    args.push(handover.as_raw_fd().to_string().into());
    args.push("--listen-fd".into());
    args.push(listen.to_string().into());
    backend_user::next_image::exec(&d.next_image, d.next_image.as_os_str(), &args)
}
