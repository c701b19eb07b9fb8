//! Small helpers shared by the pipeline steps: errors, running commands, hashing, files.

use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Instant, SystemTime};

/// An error meant for a human: what failed and why, already formatted.
pub(crate) struct Error(String);

impl Error {
    pub(crate) fn msg(s: impl Into<String>) -> Self {
        Error(s.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error(e.to_string())
    }
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

/// Return early with a formatted [`Error`].
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::util::Error::msg(format!($($arg)*)))
    };
}
pub(crate) use bail;

/// Attach a description of what was being done to an error.
pub(crate) trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {e}", what())))
    }
}

/// Print a pipeline step header on stderr (stdout is reserved for the TAP report).
pub(crate) fn step(msg: &str) {
    eprintln!("==> {msg}");
}

/// Print a detail line under a step.
pub(crate) fn note(msg: &str) {
    eprintln!("    {msg}");
}

/// `program arg arg ...`, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run a command with inherited stdio and fail unless it exits 0.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Run a command and return its stdout; on failure the error carries its stderr.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context(|| format!("cannot start `{}`", describe(cmd)))?;
    stdout_of(cmd, out)
}

/// The stdout of a finished command; on failure an error that carries its stderr.
fn stdout_of(cmd: &Command, out: std::process::Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Standard base64 (RFC 4648, with padding), for `systemd.set_credential_binary=`.
pub(crate) fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// [`output`], with `input` written to the command's stdin.
pub(crate) fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> Result<String> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context(|| format!("cannot start `{}`", describe(cmd)))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input)?;
    }
    let out = child.wait_with_output()?;
    stdout_of(cmd, out)
}

/// First line of a command's stdout, or a placeholder if it cannot run: used for
/// version strings, where a missing tool is reported by the step that needs it.
pub(crate) fn first_line(cmd: &mut Command) -> String {
    match output(cmd) {
        Ok(s) => s.lines().next().unwrap_or("").trim().to_string(),
        Err(_) => format!("({} unavailable)", cmd.get_program().to_string_lossy()),
    }
}

/// Run a command, merge its stdout and stderr line by line into `log` and hand every
/// line to `on_line` as it arrives, so that long steps can show progress.
pub(crate) fn stream(
    cmd: &mut Command,
    log: &Path,
    mut on_line: impl FnMut(&str),
) -> Result<ExitStatus> {
    let mut log_file =
        fs::File::create(log).context(|| format!("cannot create {}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context(|| format!("cannot start `{}`", describe(cmd)))?;
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(spawn_line_reader(out, tx.clone(), |_, l| l));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(spawn_line_reader(err, tx.clone(), |_, l| l));
    }
    drop(tx);
    for line in rx {
        writeln!(log_file, "{line}")?;
        on_line(&line);
    }
    for r in readers {
        let _ = r.join();
    }
    Ok(child.wait()?)
}

/// Read `r` line by line on a thread, map each line (with its arrival time) and send it.
/// Bytes that are not UTF-8 (serial noise) are replaced rather than dropped.
pub(crate) fn spawn_line_reader<R, T, F>(
    r: R,
    tx: mpsc::Sender<T>,
    map: F,
) -> thread::JoinHandle<()>
where
    R: Read + Send + 'static,
    T: Send + 'static,
    F: Fn(Instant, String) -> T + Send + 'static,
{
    thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let now = Instant::now();
                    let s = String::from_utf8_lossy(&buf);
                    let s = s.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if tx.send(map(now, s)).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

/// FNV-1a, 64 bit. Only used to name cache directories, so collision resistance
/// against an adversary does not matter and std suffices.
#[derive(Clone)]
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn bytes(&mut self, data: &[u8]) -> &mut Self {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator so that ("ab","c") and ("a","bc") hash differently.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        self
    }

    pub(crate) fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    pub(crate) fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Replace characters that kbuild or shells dislike in paths (`:`, `~`, spaces ...).
pub(crate) fn path_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub(crate) fn read_opt(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

pub(crate) fn write(path: &Path, data: impl AsRef<[u8]>) -> Result<()> {
    fs::write(path, data).context(|| format!("cannot write {}", path.display()))
}

pub(crate) fn mkdirs(path: &Path) -> Result<()> {
    fs::create_dir_all(path).context(|| format!("cannot create {}", path.display()))
}

/// Remove a file or directory tree; a missing path is fine.
pub(crate) fn remove(path: &Path) -> Result<()> {
    let r = match fs::symlink_metadata(path) {
        Err(_) => return Ok(()),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    r.context(|| format!("cannot remove {}", path.display()))
}

/// Newest modification time of the given files, descending into directories.
/// Missing paths count as "now" so that a missing input forces a rebuild.
pub(crate) fn newest_mtime(paths: &[PathBuf]) -> SystemTime {
    fn walk(p: &Path, newest: &mut SystemTime) {
        let Ok(m) = fs::metadata(p) else {
            *newest = SystemTime::now();
            return;
        };
        if m.is_dir() {
            if let Ok(rd) = fs::read_dir(p) {
                for e in rd.flatten() {
                    walk(&e.path(), newest);
                }
            }
        } else if let Ok(t) = m.modified() {
            if t > *newest {
                *newest = t;
            }
        }
    }
    let mut newest = SystemTime::UNIX_EPOCH;
    for p in paths {
        walk(p, &mut newest);
    }
    newest
}

pub(crate) fn mtime(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Local time as `YYYYmmdd-HHMMSS` for log directory names (std has no calendar).
pub(crate) fn timestamp() -> String {
    let s = first_line(Command::new("date").arg("+%Y%m%d-%H%M%S"));
    if s.starts_with('(') {
        // `date` missing: fall back to seconds since the epoch.
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        secs.to_string()
    } else {
        s
    }
}

/// Seconds with millisecond precision, for reports.
pub(crate) fn secs(d: std::time::Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

/// Exclusive use of the cache by one xtask process (CI and a developer may share
/// /var/cache/luo; two builds in one `O=` dir would corrupt it). A directory is created
/// atomically and holds the owner's pid; a lock whose owner is gone is taken over.
pub(crate) struct CacheLock {
    dir: PathBuf,
}

impl CacheLock {
    pub(crate) fn acquire(cache: &Path) -> Result<Self> {
        mkdirs(cache)?;
        let dir = cache.join(".lock");
        let me = std::process::id().to_string();
        let mut announced = false;
        loop {
            match fs::create_dir(&dir) {
                Ok(()) => {
                    write(&dir.join("pid"), &me)?;
                    return Ok(CacheLock { dir });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let owner = read_opt(&dir.join("pid")).unwrap_or_default();
                    let owner = owner.trim();
                    let alive = !owner.is_empty() && Path::new("/proc").join(owner).exists();
                    if !alive {
                        // Either a crashed run, or the owner is between mkdir and writing
                        // its pid; give the latter a moment before taking over.
                        thread::sleep(std::time::Duration::from_millis(200));
                        if read_opt(&dir.join("pid")).unwrap_or_default().trim() == owner {
                            note(&format!(
                                "removing stale cache lock (pid {owner:?} is gone)"
                            ));
                            remove(&dir)?;
                        }
                        continue;
                    }
                    if !announced {
                        step(&format!(
                            "waiting for xtask pid {owner}, which is using {}",
                            cache.display()
                        ));
                        announced = true;
                    }
                    thread::sleep(std::time::Duration::from_secs(2));
                }
                Err(e) => bail!("cannot create {}: {e}", dir.display()),
            }
        }
    }
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The 1/5/15-minute load averages, to judge how much other work skewed the timings.
pub(crate) fn loadavg() -> String {
    read_opt(Path::new("/proc/loadavg"))
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

/// A comma-separated list, as options (`--tests a,b`) and environment variables
/// (`LUO_EXTRA_CONFIG=kasan,sanitize`) give one: items trimmed, empty ones dropped.
pub(crate) fn comma_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc, "{plain:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn comma_lists_trim_and_drop_empty_items() {
        assert_eq!(comma_list(" kasan, sanitize,,"), ["kasan", "sanitize"]);
        assert!(comma_list("").is_empty());
        assert!(comma_list(" , ").is_empty());
    }
}
