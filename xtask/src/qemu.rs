//! Boot one QEMU (TCG) VM, timestamp every serial line on the host, enforce a timeout.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::util::{self, describe, Context, Result};

/// Always appended: serial console, LUO on, and reboot (so QEMU exits under -no-reboot)
/// instead of hanging on a panic.
pub(crate) const BASE_APPEND: &str = "console=ttyS0 liveupdate=on panic=-1";

pub(crate) struct Vm<'a> {
    pub(crate) kernel: &'a Path,
    /// The initramfs; `None` boots from the first of `disks` (root= on the command line).
    pub(crate) initrd: Option<&'a Path>,
    /// Raw disk images, attached as virtio-blk in order (/dev/vda, /dev/vdb, ...).
    pub(crate) disks: &'a [PathBuf],
    /// Guest RAM in MiB.
    pub(crate) mem_mib: u32,
    /// Extra kernel command line after [`BASE_APPEND`].
    pub(crate) append: String,
    pub(crate) timeout: Duration,
    pub(crate) log: &'a Path,
    /// Copy the serial output to stderr while it runs.
    pub(crate) echo: bool,
}

/// One serial (or QEMU stderr) line and when the host read it, in seconds after spawn.
pub(crate) struct Line {
    pub(crate) t: f64,
    pub(crate) text: String,
}

pub(crate) struct Run {
    pub(crate) lines: Vec<Line>,
    pub(crate) status: Option<ExitStatus>,
    pub(crate) timed_out: bool,
    pub(crate) wall: Duration,
}

pub(crate) fn boot(vm: &Vm<'_>) -> Result<Run> {
    let mut cmd = Command::new("qemu-system-x86_64");
    // KVM cannot run this guest on these hosts (kvm-pvm: emulation failures), and TCG
    // boots the tiny kernel in about a second, so TCG is used unconditionally.
    cmd.arg("-m")
        .arg(format!("{}M", vm.mem_mib))
        .args(["-smp", "2", "-no-reboot", "-nographic", "-nodefaults"])
        .args(["-accel", "tcg", "-serial", "stdio"])
        .arg("-append")
        .arg(format!("{BASE_APPEND} {}", vm.append).trim_end())
        .arg("-kernel")
        .arg(vm.kernel);
    if let Some(initrd) = vm.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    for d in vm.disks {
        cmd.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,cache=unsafe",
            d.display()
        ));
    }
    if !vm.disks.is_empty() {
        // systemd's first boot reads getrandom(); the host's entropy keeps it from waiting.
        cmd.args(["-device", "virtio-rng-pci"]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut log =
        fs::File::create(vm.log).context(|| format!("cannot create {}", vm.log.display()))?;
    writeln!(log, "# {}", describe(&cmd))?;
    writeln!(
        log,
        "# [host s] = seconds since QEMU was started, taken when the host read the line"
    )?;

    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .context(|| format!("cannot start `{}`", describe(&cmd)))?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(util::spawn_line_reader(out, tx.clone(), |t, l| {
            (t, strip_escapes(&l))
        }));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(util::spawn_line_reader(err, tx.clone(), |t, l| {
            (t, format!("qemu stderr: {l}"))
        }));
    }
    drop(tx);

    let deadline = start + vm.timeout;
    let mut lines = Vec::new();
    let mut joiner = Joiner::default();
    let mut timed_out = false;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(if timed_out {
            Duration::from_secs(5)
        } else {
            wait
        }) {
            Ok((t, text)) => {
                let t = t.duration_since(start).as_secs_f64();
                // Written as it arrives, so a killed run still leaves a useful log.
                writeln!(log, "[host {t:8.3}] {text}")?;
                if vm.echo {
                    eprintln!("[host {t:8.3}] {text}");
                }
                joiner.push(t, text, &mut lines);
            }
            Err(RecvTimeoutError::Timeout) if !timed_out => {
                timed_out = true;
                writeln!(
                    log,
                    "# TIMEOUT after {} s: killing QEMU",
                    vm.timeout.as_secs()
                )?;
                let _ = child.kill();
            }
            // Killed but the pipes stay open (should not happen): stop waiting anyway.
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = if timed_out {
        let _ = child.kill();
        child.wait().ok()
    } else {
        Some(child.wait()?)
    };
    for r in readers {
        let _ = r.join();
    }
    let wall = start.elapsed();
    writeln!(log, "# QEMU exit: {status:?}, wall {} s", util::secs(wall))?;
    Ok(Run {
        lines,
        status,
        timed_out,
        wall,
    })
}

/// Drop terminal escape sequences (SeaBIOS clears the screen) so that logs are plain
/// text and markers match.
fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // CSI: parameters and intermediates up to a final byte in @..~. Anything else
        // after ESC is a two-character sequence such as ESC c (reset): drop both.
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// Kernel console output and the guest's own writes share one serial port, and a kernel
/// record can arrive in the middle of a user line that is being written piecewise
/// (nolibc's printf writes around each `%d`):
///
/// ```text
/// # [STAGE 1] Creating [    2.65] liveupdate test: ...preserve was triggered
/// [    2.65] liveupdate test: ...
/// 2000 sessions...
/// ```
///
/// Kernel records themselves are written whole. So cut a line at an embedded kernel
/// timestamp, hold the user fragment, and glue it to the next non-kernel line. The log
/// file keeps the raw lines; the parsed lines are the repaired ones.
#[derive(Default)]
struct Joiner {
    pending: Option<String>,
}

impl Joiner {
    fn push(&mut self, t: f64, text: String, out: &mut Vec<Line>) {
        let cut = text.match_indices('[').map(|(i, _)| i).find(|&i| {
            text[i + 1..].split_once("] ").is_some_and(|(ts, _)| {
                let ts = ts.trim();
                ts.contains('.') && ts.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            })
        });
        let (user, kernel) = match cut {
            Some(i) => (&text[..i], Some(&text[i..])),
            None => (text.as_str(), None),
        };
        match kernel {
            Some(k) => {
                if !user.is_empty() {
                    let p = self.pending.take().unwrap_or_default();
                    self.pending = Some(p + user);
                }
                // A new kernel's banner: whatever was pending is firmware output (SeaBIOS
                // prints no newline before the kernel starts), not a user line.
                if k.contains("] Linux version ") {
                    self.pending = None;
                }
                out.push(Line {
                    t,
                    text: k.to_string(),
                });
            }
            None => {
                let text = match self.pending.take() {
                    Some(p) => p + user,
                    None => text,
                };
                out.push(Line { t, text });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(raw: &[&str]) -> Vec<String> {
        let mut j = Joiner::default();
        let mut out = Vec::new();
        for (i, l) in raw.iter().enumerate() {
            j.push(i as f64, strip_escapes(l), &mut out);
        }
        out.into_iter().map(|l| l.text).collect()
    }

    #[test]
    fn user_line_split_by_printk_is_rejoined() {
        let got = feed(&[
            "# [STAGE 1] Creating [    2.656118] liveupdate test: a",
            "[    2.656119] liveupdate test: b",
            "2000 sessions...",
        ]);
        assert_eq!(
            got,
            [
                "[    2.656118] liveupdate test: a",
                "[    2.656119] liveupdate test: b",
                "# [STAGE 1] Creating 2000 sessions...",
            ]
        );
    }

    #[test]
    fn tap_line_cut_before_its_newline() {
        let got = feed(&["ok 6 fixture.case[    1.3] msg", ""]);
        assert_eq!(got, ["[    1.3] msg", "ok 6 fixture.case"]);
    }

    #[test]
    fn firmware_output_before_the_banner_is_dropped() {
        let got = feed(&[
            "Booting from ROM..\u{1b}c\u{1b}[?7l\u{1b}[2J[    0.000000] Linux version 7.3.4",
            "INIT: Starting Stage 1",
        ]);
        assert_eq!(
            got,
            [
                "[    0.000000] Linux version 7.3.4",
                "INIT: Starting Stage 1"
            ]
        );
    }

    #[test]
    fn brackets_that_are_not_timestamps_stay() {
        let got = feed(&["# [STAGE 2] Retrieving session 'x'..."]);
        assert_eq!(got, ["# [STAGE 2] Retrieving session 'x'..."]);
    }
}
