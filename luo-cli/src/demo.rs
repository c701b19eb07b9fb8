//! `luo demo`: a live update of a running, VMM-like workload across exec, the way QEMU's
//! cpr-exec and Cloud Hypervisor's memfd-passing upgrade keep guest memory in place.
//!
//! The old image keeps "guest RAM" in a memfd that a worker thread keeps rewriting (see
//! [`crate::pattern`]), and a one-page state memfd. It preserves both in a LUO session, stops
//! the worker at the cut, saves the workload state, calls [`LiveUpdate::reboot`] (freeze and
//! serialize into the handover memfd) and execs its next image with the handover fd number and
//! its timestamps on the command line. The new image boots LUO from the handover memfd,
//! retrieves the session and both memfds by token, and resumes the workload while it verifies
//! every byte against the state the old image saved: each page is checked before the resumed
//! worker first rewrites it, so the blackout (last write of the old image to first write of the
//! new one) does not include reading all of RAM, while the old contents are still verified
//! in full. Nothing is copied: the memfds themselves survive the exec.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use backend_user::{next_image, sys, LiveUpdate};
use luo_handlers::MemfdHandler;

use crate::pattern::{self, PAGE};
use crate::size::{format_ns, format_offset, format_size};
use crate::CliError;

/// The session the demo preserves its memfds in.
pub const SESSION: &str = "luo-demo";
/// Token of the guest RAM memfd.
pub const TOKEN_RAM: u64 = 0x5241_4d00;
/// Token of the state memfd.
pub const TOKEN_STATE: u64 = 0x5354_4154;
/// Default guest RAM size.
pub const DEFAULT_RAM: u64 = 256 << 20;
/// Default time the workload runs in the old image before the cut.
pub const DEFAULT_RUN_MS: u64 = 300;
/// How long the new image lets the workload run after verification before it finishes.
const LINGER_MS: u64 = 50;
/// Pages per read or write in bulk phases (1 MiB).
const CHUNK_PAGES: usize = 256;

/// Options of `luo demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Guest RAM size in bytes.
    pub ram: u64,
    /// The next image (default: this binary, via `/proc/self/exe`).
    pub next: Option<PathBuf>,
    /// Where to write the handover image.
    pub dump: Option<PathBuf>,
    /// How long the workload runs before the cut.
    pub run_ms: u64,
    /// Test hook (hidden `--corrupt-byte OFFSET`): flips one byte of guest RAM after the cut,
    /// which the new image's verification must catch.
    pub corrupt: Option<u64>,
}

/// Options of the hidden `luo demo --stage2`.
#[derive(Debug, Clone)]
pub struct Stage2Options {
    /// The inherited handover memfd.
    pub handover_fd: i32,
    /// Timestamps of the old image.
    pub times: Times,
    /// The file the old image dumped the handover to, for the report.
    pub dumped: Option<PathBuf>,
}

/// CLOCK_MONOTONIC timestamps (ns) the old image hands to the new one on its command line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Times {
    /// Filling RAM started.
    pub fill_start: u64,
    /// Filling RAM ended.
    pub fill_end: u64,
    /// LUO setup and preservation started (the workload running).
    pub preserve_start: u64,
    /// Both memfds preserved.
    pub preserve_end: u64,
    /// The last write of the old image completed: the blackout starts.
    pub last_write: u64,
    /// The workload state was saved into the state memfd.
    pub save_end: u64,
    /// `LiveUpdate::reboot` started.
    pub reboot_start: u64,
    /// `LiveUpdate::reboot` returned the handover memfd.
    pub reboot_end: u64,
    /// The handover dump was written (0 without `--dump`).
    pub dump_end: u64,
    /// Just before `execve`.
    pub exec: u64,
}

const TIME_KEYS: [&str; 10] = [
    "fill_start",
    "fill_end",
    "preserve_start",
    "preserve_end",
    "last_write",
    "save_end",
    "reboot_start",
    "reboot_end",
    "dump_end",
    "exec",
];

impl Times {
    fn fields(&self) -> [u64; 10] {
        [
            self.fill_start,
            self.fill_end,
            self.preserve_start,
            self.preserve_end,
            self.last_write,
            self.save_end,
            self.reboot_start,
            self.reboot_end,
            self.dump_end,
            self.exec,
        ]
    }

    /// `key=ns,key=ns,...`.
    pub fn encode(&self) -> String {
        TIME_KEYS
            .iter()
            .zip(self.fields())
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Parses [`Times::encode`]'s output; every key is required.
    pub fn decode(s: &str) -> Result<Times, String> {
        let mut v = [None::<u64>; 10];
        for item in s.split(',') {
            let (k, n) = item
                .split_once('=')
                .ok_or_else(|| format!("'{item}' is not key=value"))?;
            let i = TIME_KEYS
                .iter()
                .position(|&key| key == k)
                .ok_or_else(|| format!("unknown time '{k}'"))?;
            v[i] = Some(n.parse().map_err(|_| format!("'{n}' is not a time"))?);
        }
        let mut f = [0u64; 10];
        for (i, slot) in v.iter().enumerate() {
            f[i] = slot.ok_or_else(|| format!("missing time '{}'", TIME_KEYS[i]))?;
        }
        Ok(Times {
            fill_start: f[0],
            fill_end: f[1],
            preserve_start: f[2],
            preserve_end: f[3],
            last_write: f[4],
            save_end: f[5],
            reboot_start: f[6],
            reboot_end: f[7],
            dump_end: f[8],
            exec: f[9],
        })
    }
}

/// What the old image saves in the state memfd at the cut: all the verifier needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoState {
    /// Guest RAM bytes.
    pub ram: u64,
    /// The last generation written (generations `1..=last_gen` were written in order).
    pub last_gen: u64,
    /// Wrapping sum of every page's checksum.
    pub checksum: u64,
    /// Page writes of the old image's worker after the fill.
    pub writes: u64,
    /// CLOCK_MONOTONIC of the last write.
    pub last_write: u64,
}

const STATE_MAGIC: &[u8; 8] = b"LUODEMO1";
const STATE_LEN: usize = 56;

impl DemoState {
    fn to_bytes(self) -> [u8; STATE_LEN] {
        let mut b = [0u8; STATE_LEN];
        b[..8].copy_from_slice(STATE_MAGIC);
        let words = [
            PAGE as u64,
            self.ram,
            self.last_gen,
            self.checksum,
            self.writes,
            self.last_write,
        ];
        for (i, w) in words.iter().enumerate() {
            b[8 + i * 8..16 + i * 8].copy_from_slice(&w.to_ne_bytes());
        }
        b
    }

    fn from_bytes(b: &[u8; STATE_LEN]) -> Result<DemoState, String> {
        if &b[..8] != STATE_MAGIC {
            return Err("the state memfd does not hold a luo demo state".into());
        }
        let w = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[8 + i * 8..16 + i * 8]);
            u64::from_ne_bytes(x)
        };
        if w(0) != PAGE as u64 {
            return Err(format!("state page size {} is not {PAGE}", w(0)));
        }
        let s = DemoState {
            ram: w(1),
            last_gen: w(2),
            checksum: w(3),
            writes: w(4),
            last_write: w(5),
        };
        let pages = s.ram / PAGE as u64;
        if s.ram == 0 || s.ram % PAGE as u64 != 0 || s.last_gen < pages {
            return Err(format!(
                "state is inconsistent: {} bytes of RAM, last generation {}",
                s.ram, s.last_gen
            ));
        }
        Ok(s)
    }
}

fn now() -> u64 {
    sys::monotonic_ns()
}

fn fail(msg: impl Into<String>) -> CliError {
    CliError::fail(msg)
}

/// Progress of a long step on stderr: a live percentage on a terminal, start and end lines
/// otherwise (logs and tests stay short).
struct Progress {
    label: String,
    total: u64,
    shown: u64,
    tty: bool,
}

impl Progress {
    fn new(label: String, total: u64) -> Self {
        let tty = std::io::stderr().is_terminal();
        if !tty {
            err!("{label}...\n");
        }
        Progress {
            label,
            total: total.max(1),
            shown: 0,
            tty,
        }
    }

    fn update(&mut self, done: u64) {
        if !self.tty {
            return;
        }
        let pct = done * 100 / self.total;
        if pct >= self.shown + 5 {
            self.shown = pct;
            err!("\r{}: {pct:3}%", self.label);
        }
    }

    fn done(self, took: u64) {
        if self.tty {
            err!("\r");
        }
        err!("{}: done in {}\n", self.label, format_ns(took));
    }
}

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

/// What the old image's worker leaves at the cut.
struct WorkerEnd {
    last_gen: u64,
    checksum: u64,
    writes: u64,
    last_write: u64,
}

/// The old image's workload: rewrites pages round robin with increasing generations until told
/// to stop, keeping the RAM checksum up to date. The generation a write replaces is known
/// (`k - pages`), so no per-page table is kept: the process's own memory does not grow with
/// the guest RAM, and neither does the teardown of its address space at exec.
fn old_worker(
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

/// The `--dump` target: opened at the start, filled with zeros up to the image's size before
/// the cut (so a full disk refuses the update while nothing is lost yet), and overwritten with
/// the image after it. A regular file, or a character device (`/dev/null`); anything else is
/// refused without opening it for long: a FIFO is opened non-blocking, never waiting for a
/// reader.
struct Dump {
    path: PathBuf,
    file: File,
    regular: bool,
}

/// What a file that cannot take a dump is, for the error.
fn kind_of(ft: &std::fs::FileType) -> Option<&'static str> {
    if ft.is_file() || ft.is_char_device() {
        None
    } else {
        Some(crate::file_kind(ft))
    }
}

impl Dump {
    fn open(p: &Path) -> Result<Dump, CliError> {
        let refuse = |kind: &str| {
            fail(format!(
                "--dump {}: is a {kind}, not a regular file (or a character device like /dev/null)",
                p.display()
            ))
        };
        if let Some(kind) = std::fs::metadata(p)
            .ok()
            .and_then(|m| kind_of(&m.file_type()))
        {
            return Err(refuse(kind));
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK)
            .mode(0o644)
            .open(p)
            .map_err(|e| match e.raw_os_error() {
                // A FIFO created since the check, without a reader.
                Some(libc::ENXIO) => refuse("FIFO"),
                _ => fail(format!("cannot create dump file {}: {e}", p.display())),
            })?;
        let ft = file
            .metadata()
            .map_err(|e| fail(format!("cannot stat dump file {}: {e}", p.display())))?
            .file_type();
        if let Some(kind) = kind_of(&ft) {
            return Err(refuse(kind));
        }
        Ok(Dump {
            path: p.to_path_buf(),
            file,
            regular: ft.is_file(),
        })
    }

    /// Before the cut: writes `len` zero bytes (and syncs a regular file), so the image of
    /// that size can be written after the cut without running out of space.
    fn reserve(&mut self, len: u64) -> Result<(), String> {
        let what = |e: std::io::Error| {
            format!(
                "cannot write the {} dump to {}: {e}",
                format_size(len),
                self.path.display()
            )
        };
        let zeros = vec![0u8; CHUNK_PAGES * PAGE];
        let mut done = 0u64;
        if self.regular {
            self.file.set_len(0).map_err(what)?;
        }
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            if self.regular {
                self.file.write_all_at(&zeros[..n], done)
            } else {
                self.file.write_all(&zeros[..n])
            }
            .map_err(what)?;
            done += n as u64;
        }
        if self.regular {
            self.file.sync_all().map_err(what)?;
        }
        Ok(())
    }

    /// After the cut: the image itself, over the reserved space.
    fn write(&mut self, handover: &OwnedFd) -> std::io::Result<()> {
        let st = sys::fstat(handover.as_fd())?;
        let len = usize::try_from(st.st_size).map_err(|_| std::io::ErrorKind::InvalidData)?;
        let mut bytes = vec![0u8; len];
        sys::pread_exact(handover.as_fd(), &mut bytes, 0)?;
        if self.regular {
            self.file.write_all_at(&bytes, 0)?;
            self.file.set_len(len as u64)?;
            self.file.sync_all()
        } else {
            self.file.write_all(&bytes)
        }
    }
}

/// Hands the resumed worker the pages it may rewrite: positions (in its write order) up to
/// `verified` have been checked.
struct Gate {
    verified: Mutex<u64>,
    cv: Condvar,
    stop: AtomicBool,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn advance(&self, to: u64) {
        *self.lock() = to;
        self.cv.notify_all();
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _guard = self.lock();
        self.cv.notify_all();
    }
}

struct NewWorkerEnd {
    writes: u64,
}

/// The new image's workload: continues with generation `from` (the main thread wrote the ones
/// after `last` before it), never rewriting a page before the verifier has checked it.
fn new_worker(
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
fn resume(ram: &File, st: &DemoState) -> Result<(u64, u64), CliError> {
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
fn verify(
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

/// Parses `luo demo` arguments (after `demo`).
pub enum DemoCommand {
    /// The old image.
    Run(DemoOptions),
    /// The new image.
    Stage2(Stage2Options),
}

/// Parses the arguments of `luo demo`.
pub fn parse_args(args: &[OsString]) -> Result<DemoCommand, CliError> {
    let mut ram = DEFAULT_RAM;
    let mut next = None;
    let mut dump = None;
    let mut run_ms = DEFAULT_RUN_MS;
    let mut stage2 = false;
    let mut handover_fd = None;
    let mut times = None;
    let mut dumped = None;
    let mut corrupt = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let s = arg.to_str().ok_or_else(|| {
            CliError::usage(format!(
                "demo: unexpected argument {}",
                arg.to_string_lossy()
            ))
        })?;
        let (name, inline) = match s.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(OsString::from(v))),
            _ => (s, None),
        };
        let value = |it: &mut std::slice::Iter<'_, OsString>| -> Result<OsString, CliError> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| CliError::usage(format!("demo: {name} needs a value"))),
            }
        };
        let text = |v: OsString| -> Result<String, CliError> {
            v.into_string().map_err(|v| {
                CliError::usage(format!(
                    "demo: {name}: '{}' is not UTF-8",
                    v.to_string_lossy()
                ))
            })
        };
        match name {
            "--ram" => {
                let v = text(value(&mut it)?)?;
                ram = crate::size::parse_size(&v)
                    .map_err(|e| CliError::usage(format!("demo: --ram: {e}")))?;
            }
            "--next" => next = Some(PathBuf::from(value(&mut it)?)),
            "--dump" => dump = Some(PathBuf::from(value(&mut it)?)),
            "--run-ms" => {
                let v = text(value(&mut it)?)?;
                run_ms = v
                    .parse()
                    .map_err(|_| CliError::usage(format!("demo: --run-ms: '{v}' is not a number of milliseconds")))?;
            }
            "--stage2" => stage2 = true,
            "--handover-fd" => {
                let v = text(value(&mut it)?)?;
                handover_fd = Some(v.parse::<i32>().map_err(|_| {
                    CliError::usage(format!("demo: --handover-fd: '{v}' is not an fd number"))
                })?);
            }
            "--times" => {
                let v = text(value(&mut it)?)?;
                times = Some(
                    Times::decode(&v).map_err(|e| CliError::usage(format!("demo: --times: {e}")))?,
                );
            }
            "--dumped" => dumped = Some(PathBuf::from(value(&mut it)?)),
            "--corrupt-byte" => {
                let v = text(value(&mut it)?)?;
                corrupt = Some(crate::size::parse_size(&v).map_err(|e| {
                    CliError::usage(format!("demo: --corrupt-byte: {e}"))
                })?);
            }
            _ => {
                return Err(CliError::usage(format!(
                    "demo: unknown argument '{s}' (usage: luo demo [--ram SIZE] [--next PATH] [--dump FILE])"
                )))
            }
        }
    }
    if stage2 {
        let handover_fd = handover_fd
            .ok_or_else(|| CliError::usage("demo --stage2 needs --handover-fd".to_string()))?;
        let times =
            times.ok_or_else(|| CliError::usage("demo --stage2 needs --times".to_string()))?;
        return Ok(DemoCommand::Stage2(Stage2Options {
            handover_fd,
            times,
            dumped,
        }));
    }
    Ok(DemoCommand::Run(DemoOptions {
        ram,
        next,
        dump,
        run_ms,
        corrupt,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_roundtrip() {
        let t = Times {
            fill_start: 1,
            fill_end: 2,
            preserve_start: 3,
            preserve_end: 4,
            last_write: 5,
            save_end: 6,
            reboot_start: 7,
            reboot_end: 8,
            dump_end: 0,
            exec: u64::MAX,
        };
        assert_eq!(Times::decode(&t.encode()), Ok(t));
        assert!(Times::decode("exec=1").is_err());
        assert!(Times::decode("bogus").is_err());
    }

    #[test]
    fn state_roundtrip() {
        let s = DemoState {
            ram: 8 << 20,
            last_gen: 5000,
            checksum: 0xdead_beef,
            writes: 2952,
            last_write: 77,
        };
        assert_eq!(DemoState::from_bytes(&s.to_bytes()), Ok(s));
        let mut b = s.to_bytes();
        b[0] = b'X';
        assert!(DemoState::from_bytes(&b).is_err());
    }
}
