//! The handshake with the next image, before anything is frozen or serialized.
//!
//! A userspace live update ends with an `exec` of the next program image, which must read the
//! handover memfd (`luo-user-v1`, carrying `luo-v5`) and take the command line the old image
//! gives it. If it cannot (`/bin/true`, a junk file, an older or newer luo, another program),
//! the state is serialized, the old image is gone, and every session is lost. So before an
//! update the old image asks the next one:
//!
//! - it runs `NEXT --luo-handover-probe` once ([`PROBE_ARG`], the only argument), by `execve`
//!   of the path itself (no `PATH` search, no `/bin/sh` fallback for a file the kernel cannot
//!   execute), with stdin on `/dev/null` and no other inherited fd, for at most
//!   [`DEFAULT_TIMEOUT`];
//! - the next image must print exactly one line, [`reply`]`(program)`:
//!   `luo-handover abi=luo-v5 image=luo-user-v1 program=PROGRAM`, and exit 0. `PROGRAM` names
//!   the command-line interface the old image will exec it with (`luo` for `luo demo`'s new
//!   image, `luod` for luod); anything else, more or less output, another exit status, or no
//!   answer in time refuses the update, with an error naming the next image and what it
//!   answered.
//!
//! [`exec`] then execs the same path with the same `execve` semantics. Answering is
//! [`is_probe`] + [`answer`], first thing in `main`, before any other argument is parsed.

use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sys;

/// The program kind of `luo` (its next image is run as `luo demo --stage2 ...`).
pub const PROGRAM_LUO: &str = "luo";
/// The program kind of luod (its next image is run with luod's options, `--handover-fd` and
/// `--listen-fd`).
pub const PROGRAM_LUOD: &str = "luod";

/// The one argument that asks a program whether it can be the next image.
pub const PROBE_ARG: &str = "--luo-handover-probe";
/// How long the next image has to answer the probe, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Output of the probed image kept for the check and the error message (bytes per stream);
/// an image printing more is refused.
pub const MAX_ANSWER: usize = 1024;

/// The exact line (without its newline) a next image answers the probe with: the handover ABI
/// (`luo-v5`), this backend's image format ([`crate::memory::FORMAT`]) and `program`.
pub fn reply(program: &str) -> String {
    let abi = std::str::from_utf8(luo_core::abi::LUO_ABI_COMPATIBLE).unwrap_or("luo-v5");
    format!(
        "luo-handover abi={abi} image={} program={program}",
        crate::memory::FORMAT
    )
}

/// True if the command line (without `argv[0]`) is the probe: exactly [`PROBE_ARG`].
pub fn is_probe<S: AsRef<OsStr>>(args: &[S]) -> bool {
    matches!(args, [a] if a.as_ref() == PROBE_ARG)
}

/// Answers the probe on stdout as `program`.
pub fn answer(program: &str) -> io::Result<()> {
    let mut o = io::stdout().lock();
    writeln!(o, "{}", reply(program))?;
    o.flush()
}

/// Why the next image was refused. Every message names the image.
#[derive(Debug)]
pub enum NextImageError {
    /// The path does not name an executable regular file.
    NotExecutable {
        /// The next image.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// It could not be run (`execve` failed: `ENOEXEC` for a file the kernel cannot execute).
    Spawn {
        /// The next image.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// It did not answer and exit within the timeout (it was killed).
    Timeout {
        /// The next image.
        path: PathBuf,
        /// The timeout.
        after: Duration,
        /// What it printed until then.
        stdout: Vec<u8>,
    },
    /// It answered something else, or exited with a failure.
    WrongAnswer {
        /// The next image.
        path: PathBuf,
        /// The line it had to print.
        expected: String,
        /// What it printed on stdout (up to [`MAX_ANSWER`] bytes).
        stdout: Vec<u8>,
        /// What it printed on stderr (up to [`MAX_ANSWER`] bytes).
        stderr: Vec<u8>,
        /// How it exited (None: killed for printing too much).
        status: Option<ExitStatus>,
    },
}

impl NextImageError {
    /// The errno an update refused for this reason reports: `ENOEXEC` (the next image cannot
    /// take the handover), `ETIMEDOUT` if it did not answer in time.
    pub fn errno(&self) -> i32 {
        match self {
            NextImageError::Timeout { .. } => libc::ETIMEDOUT,
            _ => libc::ENOEXEC,
        }
    }

    /// The next image.
    pub fn path(&self) -> &Path {
        match self {
            NextImageError::NotExecutable { path, .. }
            | NextImageError::Spawn { path, .. }
            | NextImageError::Timeout { path, .. }
            | NextImageError::WrongAnswer { path, .. } => path,
        }
    }
}

/// What the image printed, as a quoted string: one trailing newline dropped, shortened to
/// 160 characters, every control character escaped (a second line shows as `\n`).
fn shown(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let s = s.strip_suffix('\n').unwrap_or(&s);
    let short: String = s.chars().take(160).collect();
    if short.len() < s.len() {
        format!("{short:?}...")
    } else {
        format!("{short:?}")
    }
}

impl std::fmt::Display for NextImageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self.path().display();
        match self {
            NextImageError::NotExecutable { why, .. } => write!(f, "next image {p}: {why}"),
            NextImageError::Spawn { error, .. } => {
                write!(f, "next image {p} cannot be run: {error}")
            }
            NextImageError::Timeout { after, stdout, .. } => write!(
                f,
                "next image {p} did not answer `{PROBE_ARG}` within {} ms (it printed {})",
                after.as_millis(),
                shown(stdout)
            ),
            NextImageError::WrongAnswer {
                expected,
                stdout,
                stderr,
                status,
                ..
            } => {
                write!(
                    f,
                    "next image {p} does not speak this handover: asked `{PROBE_ARG}`, it answered {}",
                    shown(stdout)
                )?;
                match status {
                    Some(st) => write!(f, " and exited with {st}")?,
                    None => write!(f, " and more than {MAX_ANSWER} bytes")?,
                }
                if !stderr.is_empty() {
                    write!(f, " (stderr: {})", shown(stderr))?;
                }
                write!(f, "; expected {expected:?}")
            }
        }
    }
}

impl std::error::Error for NextImageError {}

/// [`check_within`] with [`DEFAULT_TIMEOUT`].
pub fn check(path: &Path, program: &str) -> Result<(), NextImageError> {
    check_within(path, program, DEFAULT_TIMEOUT)
}

/// Probes the next image at `path`: Ok only if it answered exactly [`reply`]`(program)` and
/// exited 0 within `timeout`. Nothing of this process is changed or shared with it.
pub fn check_within(path: &Path, program: &str, timeout: Duration) -> Result<(), NextImageError> {
    let not_exec = |why: String| NextImageError::NotExecutable {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| not_exec(e.to_string()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(not_exec("not an executable file".into()));
    }
    let spawn_err = |error| NextImageError::Spawn {
        path: path.to_path_buf(),
        error,
    };
    let call =
        sys::ExecCall::new(path, &[path.as_os_str(), OsStr::new(PROBE_ARG)]).map_err(spawn_err)?;
    let mut child = sys::spawn_isolated(Arc::new(call)).map_err(spawn_err)?;
    let deadline = Instant::now() + timeout;
    let streams = [
        child
            .stdout
            .take()
            .map(Box::new)
            .map(|b| b as Box<dyn ReadFd>),
        child
            .stderr
            .take()
            .map(Box::new)
            .map(|b| b as Box<dyn ReadFd>),
    ];
    let Printed {
        stdout,
        stderr,
        end: done,
    } = match collect(streams, deadline) {
        Ok(v) => v,
        Err(e) => {
            kill(&mut child);
            return Err(spawn_err(e));
        }
    };
    if done == Collected::TooMuch {
        kill(&mut child);
        return Err(NextImageError::WrongAnswer {
            path: path.to_path_buf(),
            expected: reply(program),
            stdout,
            stderr,
            status: None,
        });
    }
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline && done == Collected::Eof => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(None) => {
                kill(&mut child);
                return Err(NextImageError::Timeout {
                    path: path.to_path_buf(),
                    after: timeout,
                    stdout,
                });
            }
            Err(e) => {
                kill(&mut child);
                return Err(spawn_err(e));
            }
        }
    };
    let expected = reply(program);
    let mut want = expected.clone().into_bytes();
    want.push(b'\n');
    if status.success() && stdout == want {
        return Ok(());
    }
    Err(NextImageError::WrongAnswer {
        path: path.to_path_buf(),
        expected,
        stdout,
        stderr,
        status: Some(status),
    })
}

/// Kills and reaps our own probe child (it may have exited already).
fn kill(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A pipe end to the child.
trait ReadFd: Read + AsFd {}
impl<T: Read + AsFd> ReadFd for T {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Collected {
    /// Both streams reached end of file.
    Eof,
    /// One printed more than [`MAX_ANSWER`].
    TooMuch,
    /// The deadline passed first.
    Deadline,
}

/// What the probed image printed.
struct Printed {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    end: Collected,
}

impl Printed {
    fn new(bufs: [Vec<u8>; 2], end: Collected) -> Printed {
        let [stdout, stderr] = bufs;
        Printed {
            stdout,
            stderr,
            end,
        }
    }
}

/// Reads both streams until both end, one overflows or the deadline passes.
fn collect(mut streams: [Option<Box<dyn ReadFd>>; 2], deadline: Instant) -> io::Result<Printed> {
    let mut bufs = [Vec::new(), Vec::new()];
    let mut chunk = [0u8; 512];
    loop {
        let open: Vec<usize> = (0..2).filter(|&i| streams[i].is_some()).collect();
        if open.is_empty() {
            return Ok(Printed::new(bufs, Collected::Eof));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Printed::new(bufs, Collected::Deadline));
        }
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        let ready = {
            let fds: Vec<_> = open
                .iter()
                .filter_map(|&i| streams[i].as_ref().map(|s| s.as_fd()))
                .collect();
            sys::poll_in(&fds, ms)?
        };
        for (k, &i) in open.iter().enumerate() {
            if !ready[k] {
                continue;
            }
            let Some(s) = streams[i].as_mut() else {
                continue;
            };
            match s.read(&mut chunk) {
                Ok(0) => streams[i] = None,
                Ok(n) => {
                    bufs[i].extend_from_slice(&chunk[..n]);
                    if bufs[i].len() > MAX_ANSWER {
                        bufs[i].truncate(MAX_ANSWER);
                        return Ok(Printed::new(bufs, Collected::TooMuch));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Execs the next image at `path` with `argv0` and `args`, by `execve` of the path itself (no
/// `PATH` search, no shell fallback) with this process's environment. Returns only on failure.
pub fn exec(path: &Path, argv0: &OsStr, args: &[OsString]) -> io::Error {
    let mut argv: Vec<&OsStr> = vec![argv0];
    argv.extend(args.iter().map(OsString::as_os_str));
    match sys::ExecCall::new(path, &argv) {
        Ok(call) => call.exec(),
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("luo-next-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn script(d: &Path, name: &str, body: &str) -> PathBuf {
        let p = d.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn the_reply_names_the_abi_the_format_and_the_program() {
        assert_eq!(
            reply("luod"),
            "luo-handover abi=luo-v5 image=luo-user-v1 program=luod"
        );
        assert!(is_probe(&["--luo-handover-probe"]));
        assert!(!is_probe(&["--luo-handover-probe", "x"]));
        assert!(!is_probe::<&str>(&[]));
        assert!(!is_probe(&["demo"]));
    }

    #[test]
    fn an_image_that_answers_exactly_is_accepted() {
        let d = dir("ok");
        let good = script(
            &d,
            "good",
            &format!(
                "#!/bin/sh\n[ \"$1\" = {PROBE_ARG} ] && [ $# = 1 ] && echo '{}'\n",
                reply("luo")
            ),
        );
        check(&good, "luo").unwrap();
        // The same image asked for another program is refused.
        let e = check(&good, "luod").unwrap_err();
        assert!(matches!(e, NextImageError::WrongAnswer { .. }), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn wrong_answers_junk_and_silence_are_refused_with_what_was_answered() {
        let d = dir("bad");
        let e = check(Path::new("/bin/true"), "luo").unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("next image /bin/true does not speak this handover")
                && m.contains("answered \"\"")
                && m.contains("luo-handover abi=luo-v5 image=luo-user-v1 program=luo"),
            "{m}"
        );
        assert_eq!(e.errno(), libc::ENOEXEC);

        let old = script(
            &d,
            "old",
            "#!/bin/sh\necho 'luo-handover abi=luo-v4 image=luo-user-v1 program=luo'\n",
        );
        let m = check(&old, "luo").unwrap_err().to_string();
        assert!(m.contains("answered \"luo-handover abi=luo-v4"), "{m}");

        // The right line, but a failure status, or a second line: refused.
        let line = reply("luo");
        let failing = script(
            &d,
            "failing",
            &format!("#!/bin/sh\necho '{line}'\nexit 3\n"),
        );
        let m = check(&failing, "luo").unwrap_err().to_string();
        assert!(m.contains("exit status: 3"), "{m}");
        let chatty = script(
            &d,
            "chatty",
            &format!("#!/bin/sh\necho '{line}'\necho more\n"),
        );
        let m = check(&chatty, "luo").unwrap_err().to_string();
        assert!(m.contains(&format!("answered \"{line}\\nmore\"")), "{m}");
        let noisy = script(&d, "noisy", "#!/bin/sh\nyes\n");
        let m = check(&noisy, "luo").unwrap_err().to_string();
        assert!(m.contains(&format!("more than {MAX_ANSWER} bytes")), "{m}");

        // Random bytes, mode 0755: execve says ENOEXEC, no shell runs it.
        let junk = d.join("junk");
        std::fs::write(&junk, b"\x13\x37echo luo-handover\n\xff\xfe garbage").unwrap();
        std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = check(&junk, "luo").unwrap_err();
        assert!(
            matches!(&e, NextImageError::Spawn { error, .. } if error.raw_os_error() == Some(libc::ENOEXEC)),
            "{e}"
        );

        let m = check(&d, "luo").unwrap_err().to_string();
        assert!(m.contains("not an executable file"), "{m}");
        let m = check(&d.join("missing"), "luo").unwrap_err().to_string();
        assert!(m.contains("missing") && m.contains("No such file"), "{m}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_image_that_does_not_answer_in_time_is_killed_and_refused() {
        let d = dir("slow");
        let slow = script(&d, "slow", "#!/bin/sh\necho -n partial\nexec sleep 30\n");
        let t = Instant::now();
        let e = check_within(&slow, "luo", Duration::from_millis(300)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_eq!(e.errno(), libc::ETIMEDOUT);
        assert!(e.to_string().contains("within 300 ms"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_probed_image_inherits_no_fd() {
        let d = dir("fds");
        // Answers only if fds 0-2 are its only open fds.
        let line = reply("luo");
        let p = script(
            &d,
            "fds",
            &format!(
                "#!/bin/sh\nn=$(ls /proc/self/fd | wc -l)\n[ \"$n\" -le 4 ] && echo '{line}' || echo \"open fds: $(ls /proc/self/fd)\"\n"
            ),
        );
        // An fd without close-on-exec in this process.
        let f = std::fs::File::open("/dev/null").unwrap();
        sys::set_cloexec(f.as_fd(), false).unwrap();
        check(&p, "luo").unwrap();
        drop(f);
        let _ = std::fs::remove_dir_all(&d);
    }
}
