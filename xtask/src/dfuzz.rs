//! `cargo xtask vm fuzz`: differential fuzzing of `/dev/liveupdate` in the kernel, with the
//! C core as the oracle (docs/verification.md, "Differential fuzzing in the kernel").
//!
//! `backend-linux/guest/luo_dfuzz.c` (PID 1) turns each seed into a reproducible sequence of
//! LUO operations and writes a canonical trace of every result and observation to the second
//! serial port. The same seeds run on a C-core kernel and on a Rust-core kernel; the traces
//! must be equal line for line, except where a rule below names a deliberate fix of an
//! upstream bug (docs/decisions.md). Rules are keyed to the bug, never to a seed. Any other
//! difference is a finding: the seed and the first differing line are printed, and the run
//! fails. So does a kernel splat in any boot (the VM suite's list), a VM that did not finish
//! its seeds, or a trace that does not check out against its per-sequence hash.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::guest::{self, Entry};
use crate::kbuild::Core;
use crate::paths::Paths;
use crate::qemu::BASE_APPEND;
use crate::suite::{self, kernel_line, FLB_GOOD, SPLATS};
use crate::util::{self, bail, mkdirs, note, output, step, CacheLock, Context, Result};
use crate::vm;

pub(crate) struct Options {
    pub(crate) seeds: (u64, u64),
    pub(crate) cores: Vec<Core>,
    pub(crate) ops: u32,
    pub(crate) kexec_every: u64,
    pub(crate) vms: u64,
    /// vCPUs per VM.
    pub(crate) smp: u64,
    pub(crate) timeout: Option<Duration>,
    pub(crate) debug: bool,
    /// The Rust core's kernel is the `--sanitize` build (KASAN, UBSAN, kmemleak); the C
    /// core, the oracle, stays the plain build.
    pub(crate) sanitize: bool,
    pub(crate) jobs: usize,
}

/// vCPUs per fuzzing VM unless `--smp` says otherwise. One: the guest program is one thread,
/// so a second vCPU only idles, and the two cores' VMs then fill a 2-CPU host exactly instead
/// of four TCG threads contending for it (a boot's stop_machine() and IPIs wait on a
/// descheduled vCPU). `--smp 2` is what the VM suite boots.
const DEFAULT_SMP: u64 = 1;

pub(crate) fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        seeds: (0, 0),
        cores: vec![Core::C, Core::Rust],
        ops: 60,
        kexec_every: 0,
        vms: 1,
        smp: DEFAULT_SMP,
        timeout: None,
        debug: true,
        sanitize: false,
        jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let mut have_seeds = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            match inline.clone().or_else(|| it.next().cloned()) {
                Some(v) => Ok(v),
                None => bail!("{name} needs a value"),
            }
        };
        let num = |name: &str, v: &str| -> Result<u64> {
            match v.parse::<u64>() {
                Ok(n) => Ok(n),
                Err(_) => bail!("{name} must be a number, not `{v}`"),
            }
        };
        match flag {
            "--seeds" => {
                let v = value("--seeds")?;
                let Some((a, b)) = v.split_once("..") else {
                    bail!("--seeds must be A..B, not `{v}`");
                };
                let (a, b) = (num("--seeds", a)?, num("--seeds", b)?);
                if b <= a {
                    bail!("--seeds A..B needs A < B (B is excluded)");
                }
                o.seeds = (a, b);
                have_seeds = true;
            }
            "--core" => {
                let v = value("--core")?;
                o.cores = match v.as_str() {
                    "both" => vec![Core::C, Core::Rust],
                    s => match Core::parse(s) {
                        Some(c) => vec![c],
                        None => bail!("--core must be `c`, `rust` or `both`, not `{v}`"),
                    },
                };
            }
            "--ops" => {
                let v = value("--ops")?;
                match v.parse::<u32>() {
                    Ok(n) if (2..=100_000).contains(&n) => o.ops = n,
                    _ => bail!("--ops must be a number from 2 to 100000, not `{v}`"),
                }
            }
            "--kexec-every" => o.kexec_every = num("--kexec-every", &value("--kexec-every")?)?,
            "--vms" => {
                let v = value("--vms")?;
                o.vms = num("--vms", &v)?;
                if o.vms == 0 {
                    bail!("--vms must be at least 1");
                }
            }
            "--smp" => {
                let v = value("--smp")?;
                match num("--smp", &v)? {
                    n @ 1..=8 => o.smp = n,
                    _ => bail!("--smp must be a number from 1 to 8, not `{v}`"),
                }
            }
            "--timeout" => {
                let v = value("--timeout")?;
                match num("--timeout", &v)? {
                    0 => bail!("--timeout must be positive"),
                    s => o.timeout = Some(Duration::from_secs(s)),
                }
            }
            "--no-debug" => o.debug = false,
            "--sanitize" => o.sanitize = true,
            "--jobs" | "-j" => {
                let v = value("--jobs")?;
                match num("--jobs", &v)? {
                    0 => bail!("--jobs must be positive"),
                    n => o.jobs = n as usize,
                }
            }
            _ => bail!("unknown option `{a}`"),
        }
    }
    if !have_seeds {
        bail!("vm fuzz needs --seeds A..B");
    }
    Ok(o)
}

// ------------------------------------------------------------------------------------------
// Traces
// ------------------------------------------------------------------------------------------

/// One sequence's trace: its lines without the `T <seed> ` prefix ("<step> <text>").
#[derive(Default, Debug)]
pub(crate) struct Seq {
    pub(crate) lines: Vec<String>,
    /// Its `E` line arrived and the line count and hash agree.
    pub(crate) complete: bool,
    /// Kexecs it crossed (each later part prints "boot part <n>").
    pub(crate) kexecs: u32,
}

impl Seq {
    /// Operations generated (the highest step; cleanup and probes carry the last one).
    fn ops(&self) -> u64 {
        self.lines
            .iter()
            .filter_map(|l| l.split(' ').next()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
    }
}

/// What one VM's trace says.
#[derive(Default)]
pub(crate) struct Trace {
    pub(crate) seqs: BTreeMap<u64, Seq>,
    /// Broken lines, hash mismatches, the guest's own failures.
    pub(crate) problems: Vec<String>,
    pub(crate) done: bool,
    pub(crate) lines: u64,
}

/// The guest's FNV-1a over "<seed> <step> <text>\n" of every line of a sequence.
fn fnv(h: u64, line: &str) -> u64 {
    let mut h = h;
    for b in line.bytes().chain(std::iter::once(b'\n')) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

pub(crate) fn parse_trace(text: &str) -> Trace {
    let mut t = Trace::default();
    let mut hashes: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("T ") {
            let Some((seed, body)) = rest.split_once(' ') else {
                t.problems.push(format!("broken trace line: {line}"));
                continue;
            };
            let Ok(seed) = seed.parse::<u64>() else {
                t.problems.push(format!("broken trace line: {line}"));
                continue;
            };
            let h = hashes.entry(seed).or_insert((0, FNV_START));
            h.0 += 1;
            h.1 = fnv(h.1, rest);
            let seq = t.seqs.entry(seed).or_default();
            if body
                .split_once(' ')
                .is_some_and(|(_, text)| text.starts_with("boot part "))
            {
                seq.kexecs += 1;
            }
            seq.lines.push(body.to_string());
            t.lines += 1;
        } else if let Some(rest) = line.strip_prefix("E ") {
            let f: Vec<&str> = rest.split(' ').collect();
            let parsed = match f.as_slice() {
                [s, n, h] => match (
                    s.parse::<u64>(),
                    n.parse::<u64>(),
                    u64::from_str_radix(h, 16),
                ) {
                    (Ok(s), Ok(n), Ok(h)) => Some((s, n, h)),
                    _ => None,
                },
                _ => None,
            };
            let Some((seed, n, h)) = parsed else {
                t.problems.push(format!("broken end line: {line}"));
                continue;
            };
            let got = hashes.get(&seed).copied().unwrap_or((0, FNV_START));
            if got != (n, h) {
                t.problems.push(format!(
                    "seed {seed}: the trace does not check out: the guest wrote {n} lines \
                     (hash {h:016x}), {} arrived (hash {:016x})",
                    got.0, got.1
                ));
            } else {
                t.seqs.entry(seed).or_default().complete = true;
            }
        } else if line.starts_with("DONE ") {
            t.done = true;
        } else if let Some(rest) = line.strip_prefix("I FAIL") {
            t.problems.push(format!("guest: FAIL{rest}"));
        }
    }
    t
}

// ------------------------------------------------------------------------------------------
// The differ and its rules
// ------------------------------------------------------------------------------------------

/// A rule's predicate: at the first difference (`c[i]` vs `rust[j]`, everything before
/// equal), how many lines of each trace it explains, or `None`.
type Explains = fn(c: &[String], i: usize, r: &[String], j: usize) -> Option<(usize, usize)>;

/// A deliberate difference from the C core, recognised by what the lines say.
pub(crate) struct Rule {
    /// The entry in docs/decisions.md.
    pub(crate) id: &'static str,
    pub(crate) what: &'static str,
    pub(crate) explains: Explains,
}

pub(crate) const RULES: &[Rule] = &[
    Rule {
        id: "B18",
        what: "GET_NAME: the C core leaves the caller's bytes after the name's NUL word \
               (tail=echo@K), the Rust core zeroes them (tail=zero)",
        explains: b18,
    },
    Rule {
        id: "B6",
        what: "RETRIEVE_SESSION whose reply faults: the C core finishes and destroys the \
               session (the probe that follows finds nothing), the Rust core puts it back \
               (the probe retrieves and finishes it); the test FLBs' messages move with it",
        explains: b6,
    },
];

/// Splits "<step> <text>" into the text.
fn text(line: &str) -> &str {
    line.split_once(' ').map_or(line, |(_, t)| t)
}

fn b18(c: &[String], i: usize, r: &[String], j: usize) -> Option<(usize, usize)> {
    let (a, b) = (c.get(i)?, r.get(j)?);
    if !text(a).starts_with("get_name ") {
        return None;
    }
    let at = a.find(" tail=echo@")?;
    let rest = &a[at + " tail=echo@".len()..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let normal = format!("{} tail=zero{}", &a[..at], &rest[digits..]);
    (normal == *b).then_some((1, 1))
}

/// The name of a `retrieve_session <fd> n<N> ...` line, if its reply faulted: the argument
/// was on a read-only page (`,ro+0,`) and the result is `EFAULT`.
fn faulted_retrieve(line: &str) -> Option<&str> {
    let t = text(line);
    let rest = t.strip_prefix("retrieve_session ")?;
    let mut f = rest.split(' ');
    let _fd = f.next()?;
    let name = f.next()?;
    let arg = f.next()?;
    (arg.contains(",ro+") && t.ends_with(" = EFAULT")).then_some(name)
}

/// `k ...` lines from `from` on, then the line `want`, then `k ...` lines: the end index and
/// the `k` texts.
fn probe_window<'a>(lines: &'a [String], from: usize, want: &str) -> Option<(usize, Vec<&'a str>)> {
    let mut k = Vec::new();
    let mut at = from;
    while text(lines.get(at)?).starts_with("k ") {
        k.push(text(&lines[at]));
        at += 1;
    }
    if text(&lines[at]) != want {
        return None;
    }
    at += 1;
    while lines.get(at).is_some_and(|l| text(l).starts_with("k ")) {
        k.push(text(&lines[at]));
        at += 1;
    }
    k.sort_unstable();
    Some((at, k))
}

fn b6(c: &[String], i: usize, r: &[String], j: usize) -> Option<(usize, usize)> {
    let (i0, j0) = (i.checked_sub(1)?, j.checked_sub(1)?);
    if c[i0] != r[j0] {
        return None;
    }
    let name = faulted_retrieve(&c[i0])?;
    let (ce, ck) = probe_window(c, i, &format!("b6probe {name} = ENOENT"))?;
    let (re, rk) = probe_window(r, j, &format!("b6probe {name} = ok finish=ok close=ok"))?;
    (ck == rk).then_some((ce - i, re - j))
}

/// The first difference no rule explains.
#[derive(Debug, PartialEq)]
pub(crate) struct Finding {
    /// 1-based line of the sequence's trace, in the C core's numbering.
    pub(crate) line: usize,
    pub(crate) c: Option<String>,
    pub(crate) rust: Option<String>,
    /// Up to three lines before it (equal, or explained).
    pub(crate) context: Vec<String>,
}

/// Compares two traces of one sequence: the rules that explained differences (with repeats),
/// and the first finding.
pub(crate) fn diff(c: &[String], r: &[String]) -> (Vec<&'static str>, Option<Finding>) {
    let (mut i, mut j) = (0, 0);
    let mut used = Vec::new();
    loop {
        match (c.get(i), r.get(j)) {
            (None, None) => return (used, None),
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (a, b) => {
                if let Some((rule, (di, dj))) = RULES
                    .iter()
                    .find_map(|rule| (rule.explains)(c, i, r, j).map(|d| (rule.id, d)))
                {
                    used.push(rule);
                    i += di;
                    j += dj;
                    continue;
                }
                let context = c[i.saturating_sub(3)..i].to_vec();
                return (
                    used,
                    Some(Finding {
                        line: i + 1,
                        c: a.cloned(),
                        rust: b.cloned(),
                        context,
                    }),
                );
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Kernels, image, VMs
// ------------------------------------------------------------------------------------------

struct KernelFiles {
    core: Core,
    bzimage: PathBuf,
    /// The kernel's System.map (copied beside the bzImage), to name where a stuck VM's CPUs
    /// are (the kernels are built without KASLR).
    system_map: PathBuf,
    headers: PathBuf,
    gen_init_cpio: PathBuf,
    /// Its last boot scans kmemleak (the guest's `kmemleak_scan`), which the run checks.
    kmemleak: bool,
    what: String,
}

/// The kernels: from LUO_DFUZZ_BZIMAGE_<CORE> if set (a bzImage inside its build directory),
/// else from the pipeline, under the cache lock (returned: held until the guest program and
/// the images are built). Either way the bzImage is copied into the run directory, so that
/// the VMs need nothing of the build directory once the lock is gone.
fn kernels(
    paths: &Paths,
    opts: &Options,
    run_dir: &Path,
) -> Result<(Option<CacheLock>, Vec<KernelFiles>)> {
    let mut lock = None;
    let mut out = Vec::new();
    for &core in &opts.cores {
        let var = format!("LUO_DFUZZ_BZIMAGE_{}", core.to_string().to_uppercase());
        if let Some(bz) = std::env::var_os(&var).map(PathBuf::from) {
            let Some(dir) = build_dir(&bz) else {
                bail!(
                    "{var}: {} is not <build>/arch/x86/boot/bzImage",
                    bz.display()
                );
            };
            let copy = run_dir.join(format!("bzImage-{core}"));
            fs::copy(&bz, &copy).context(|| format!("cannot copy {}", bz.display()))?;
            out.push(KernelFiles {
                core,
                bzimage: copy,
                system_map: copy_map(dir, run_dir, core),
                headers: dir.join("usr/include"),
                gen_init_cpio: dir.join("usr/gen_init_cpio"),
                kmemleak: has_kmemleak(dir),
                what: format!("{} (from {var})", bz.display()),
            });
            continue;
        }
        if lock.is_none() {
            lock = Some(CacheLock::acquire(&paths.cache)?);
        }
        let vo = vm::Options {
            core,
            tests: Vec::new(),
            skip: Vec::new(),
            clean: false,
            debug: opts.debug,
            timeout: Duration::from_secs(120),
            verbose: false,
            jobs: opts.jobs,
            kexec_into: None,
            sanitize: opts.sanitize && core == Core::Rust,
        };
        let mut phases = vm::Phases(Vec::new());
        let env = vo.sanitize.then(vm::SanitizeEnv::set);
        let b = vm::prepare(paths, &vo, &mut phases)?;
        drop(env);
        let copy = run_dir.join(format!("bzImage-{core}"));
        fs::copy(&b.kernel.bzimage, &copy)
            .context(|| format!("cannot copy {}", b.kernel.bzimage.display()))?;
        let dir = build_dir(&b.kernel.bzimage).unwrap_or(Path::new("/"));
        out.push(KernelFiles {
            core,
            bzimage: copy,
            system_map: copy_map(dir, run_dir, core),
            headers: b.kernel.headers.clone(),
            gen_init_cpio: b.kernel.gen_init_cpio.clone(),
            kmemleak: has_kmemleak(dir),
            what: format!(
                "{} ({}, {}{})",
                b.kernel.bzimage.display(),
                b.kernel.release,
                if b.kernel.debug {
                    "with debug.config"
                } else {
                    "without debug.config"
                },
                if vo.sanitize {
                    ", KASAN + UBSAN + kmemleak"
                } else {
                    ""
                }
            ),
        });
    }
    Ok((lock, out))
}

/// The build directory of `<build>/arch/x86/boot/bzImage`.
fn build_dir(bzimage: &Path) -> Option<&Path> {
    bzimage.ancestors().nth(4)
}

/// Was the kernel in `build` configured with kmemleak?
fn has_kmemleak(build: &Path) -> bool {
    fs::read_to_string(build.join(".config"))
        .is_ok_and(|c| c.lines().any(|l| l == "CONFIG_DEBUG_KMEMLEAK=y"))
}

/// The build's System.map copied into the run directory (a missing map only costs the
/// symbol names in a stall report).
fn copy_map(build: &Path, run_dir: &Path, core: Core) -> PathBuf {
    let copy = run_dir.join(format!("System.map-{core}"));
    let _ = fs::copy(build.join("System.map"), &copy);
    copy
}

fn build_guest(headers: &Path, out: &Path) -> Result<()> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../backend-linux/guest/luo_dfuzz.c");
    let mut cmd = Command::new("gcc");
    cmd.args(["-static", "-O2", "-Wall", "-Werror", "-isystem"])
        .arg(headers)
        .arg("-o")
        .arg(out)
        .arg(&src);
    output(&mut cmd).context(|| "cannot build luo_dfuzz".to_string())?;
    Ok(())
}

/// /init is the fuzzer, /kernel the kernel it kexecs into (itself); the kernel keeps this
/// image (`retain_initrd`) and the guest hands it on.
fn image(k: &KernelFiles, prog: &Path, out: &Path) -> Result<()> {
    let entries = vec![
        Entry::Dir("/dev"),
        Entry::Dir("/proc"),
        Entry::Dir("/sys"),
        Entry::Console,
        Entry::File {
            guest: "/init".into(),
            host: prog.to_path_buf(),
            mode: 0o755,
        },
        Entry::File {
            guest: "/kernel".into(),
            host: k.bzimage.clone(),
            mode: 0o644,
        },
    ];
    guest::pack(&k.gen_init_cpio, &entries, out)
}

struct VmRun {
    core: Core,
    seeds: (u64, u64),
    log: PathBuf,
    trace: Trace,
    ok_exit: bool,
    kmemleak: bool,
    /// Killed at the timeout or a stall: where its CPUs were (`stall_report`).
    timed_out: Option<String>,
    wall: Duration,
}

/// The kexecs the guest makes for `seeds`: seed % every == every - 1 is a kexec sequence,
/// with two kexecs for every other one (luo_dfuzz.c, run_seq).
fn kexecs(seeds: (u64, u64), every: u64) -> u64 {
    if every == 0 {
        return 0;
    }
    (seeds.0..seeds.1)
        .filter(|s| s % every == every - 1)
        .map(|s| 1 + (s / every) % 2)
        .sum()
}

/// How long a VM may go without writing to its trace.
const STALL: Duration = Duration::from_secs(180);

/// One VM over `seeds`: the console goes to `<name>.log`, the trace (ttyS1) to `<name>.trace`.
fn boot(
    k: &KernelFiles,
    initrd: &Path,
    opts: &Options,
    seeds: (u64, u64),
    dir: &Path,
) -> Result<VmRun> {
    let name = format!("{}-{}-{}", k.core, seeds.0, seeds.1);
    let log = dir.join(format!("{name}.log"));
    let trace = dir.join(format!("{name}.trace"));
    let monitor = dir.join(format!("{name}.mon"));
    let n = seeds.1 - seeds.0;
    let timeout = opts.timeout.unwrap_or_else(|| {
        Duration::from_secs(
            (300 + n * u64::from(opts.ops) / 200 + 30 * kexecs(seeds, opts.kexec_every))
                // A sanitizer kernel (KASAN's shadow checks) runs the same work slower.
                * if k.kmemleak { 2 } else { 1 },
        )
    });
    // The whole kernel log goes to the console, as in the VM suite (the guest reads the test
    // FLBs' messages from /dev/kmsg itself, for the trace). no_timer_check: on a loaded TCG
    // host, one boot in a few hundred failed the IO-APIC timer check ("IO-APIC + timer
    // doesn't work!", a panic at 0.03 s) after a kexec; a chain boots dozens of kernels.
    let append = format!(
        "{BASE_APPEND} no_timer_check retain_initrd dfuzz_seeds={}-{} dfuzz_ops={} \
         dfuzz_kexec_every={}",
        seeds.0, seeds.1, opts.ops, opts.kexec_every
    );
    let logf = fs::File::create(&log).context(|| format!("cannot create {}", log.display()))?;
    let errf = logf.try_clone()?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-m",
        "1G",
        "-smp",
        &opts.smp.to_string(),
        "-no-reboot",
        "-nographic",
        "-nodefaults",
    ])
    .args(["-accel", "tcg", "-serial", "stdio", "-serial"])
    .arg(format!("file:{}", trace.display()))
    .arg("-monitor")
    .arg(format!("unix:{},server=on,wait=off", monitor.display()))
    .arg("-kernel")
    .arg(&k.bzimage)
    .arg("-initrd")
    .arg(initrd)
    .arg("-append")
    .arg(&append)
    .stdin(Stdio::null())
    .stdout(Stdio::from(logf))
    .stderr(Stdio::from(errf));
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .context(|| format!("cannot start `{}`", util::describe(&cmd)))?;
    let mut timed_out = None;
    let mut stalled = None;
    let (mut size, mut moved) = (0, Instant::now());
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        // A guest that writes no trace for STALL (a kexec and a boot take about 10 s) is
        // stuck: stop it instead of waiting for the whole timeout.
        let now = fs::metadata(&trace).map_or(0, |m| m.len());
        if now != size {
            (size, moved) = (now, Instant::now());
        }
        if start.elapsed() > timeout || moved.elapsed() > STALL {
            if moved.elapsed() > STALL {
                stalled = Some(moved.duration_since(start));
            }
            // Stuck or only slow: either way, where the CPUs are is worth the log.
            timed_out = Some(stall_report(&monitor, &k.system_map, &log));
            let _ = child.kill();
            break child.wait().ok();
        }
        thread::sleep(Duration::from_millis(200));
    };
    let wall = start.elapsed();
    let text = fs::read(&trace).unwrap_or_default();
    let mut trace = parse_trace(&String::from_utf8_lossy(&text));
    if let Some(at) = stalled {
        let last = trace.seqs.iter().next_back().map(|(s, q)| {
            format!(
                "seed {s}, after `{}`",
                q.lines.last().map_or("", String::as_str)
            )
        });
        trace.problems.push(format!(
            "no trace output for {} s after {:.0} s (stuck at {}); see the console log",
            STALL.as_secs(),
            at.as_secs_f64(),
            last.unwrap_or_else(|| "the start".into())
        ));
    }
    Ok(VmRun {
        core: k.core,
        seeds,
        log,
        trace,
        ok_exit: status.is_some_and(|s| s.success()),
        kmemleak: k.kmemleak,
        timed_out,
        wall,
    })
}

/// What a stuck guest's CPUs are doing, for the report: QEMU's `info registers -a` and the
/// words on each CPU's stack, over the monitor socket, appended to the console log; returned
/// is each CPU's RIP and the kernel-text words on its stack named from System.map (the
/// kernels are built without KASLR). Best effort: a monitor that does not answer gives "".
fn stall_report(monitor: &Path, map: &Path, log: &Path) -> String {
    let Ok(mut mon) = Monitor::connect(monitor) else {
        return String::new();
    };
    let regs = mon.ask("info registers -a");
    let mut dump = regs.clone();
    let syms = text_symbols(&fs::read_to_string(map).unwrap_or_default());
    let mut out = String::new();
    for (cpu, rip, halted) in cpu_rips(&regs) {
        let _ = write!(
            out,
            "; CPU {cpu} at {}{}",
            symbolize(&syms, rip).unwrap_or_else(|| format!("{rip:#x}")),
            if halted { " (halted)" } else { "" }
        );
        // The words on this CPU's stack that point into kernel text: a rough backtrace.
        mon.ask(&format!("cpu {cpu}"));
        let words = mon.ask("x/96gx $sp");
        let _ = write!(dump, "\nCPU {cpu} stack:\n{words}");
        let frames = stack_text(&syms, &words);
        if !frames.is_empty() {
            let _ = write!(out, ", stack {}", frames.join(" < "));
        }
    }
    if let Ok(mut f) = fs::OpenOptions::new().append(true).open(log) {
        use std::io::Write;
        let _ = writeln!(f, "\n==== xtask: stalled guest, QEMU monitor ====\n{dump}");
    }
    if out.is_empty() {
        out
    } else {
        format!("; QEMU monitor{out} (full dump at the end of the console log)")
    }
}

/// Each CPU of `info registers -a`: its index, RIP and whether it sits in HLT.
fn cpu_rips(regs: &str) -> Vec<(u32, u64, bool)> {
    let mut out = Vec::new();
    let mut cpu = 0;
    for l in regs.lines() {
        if let Some(n) = l.strip_prefix("CPU#").and_then(|n| n.trim().parse().ok()) {
            cpu = n;
        } else if let Some(rest) = l.strip_prefix("RIP=") {
            let rip = rest.split_whitespace().next().unwrap_or("");
            if let Ok(a) = u64::from_str_radix(rip, 16) {
                out.push((cpu, a, rest.contains("HLT=1")));
            }
        }
    }
    out
}

/// `sym+off` for an address in kernel text; `None` past the last symbol or far (1 MiB)
/// from the one before.
fn symbolize(syms: &[(u64, String)], a: u64) -> Option<String> {
    let i = syms.partition_point(|(s, _)| *s <= a).checked_sub(1)?;
    let (base, sym) = &syms[i];
    (a - base < 0x10_0000 && i + 1 < syms.len()).then(|| format!("{sym}+{:#x}", a - base))
}

/// The first 16 words of an `x/Ngx` dump that point into kernel text, named.
fn stack_text(syms: &[(u64, String)], words: &str) -> Vec<String> {
    words
        .lines()
        .filter_map(|l| l.split_once(": "))
        .flat_map(|(_, w)| w.split_whitespace())
        .filter_map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
        .filter_map(|a| symbolize(syms, a))
        .take(16)
        .collect()
}

/// QEMU's human monitor on a unix socket, one command at a time.
struct Monitor(std::os::unix::net::UnixStream);

impl Monitor {
    fn connect(path: &Path) -> std::io::Result<Self> {
        let s = std::os::unix::net::UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut m = Monitor(s);
        m.until_prompt();
        Ok(m)
    }

    /// Everything up to the next `(qemu) ` prompt (or a 3 s silence).
    fn until_prompt(&mut self) -> String {
        use std::io::Read;
        let mut raw = Vec::new();
        let mut buf = [0u8; 65536];
        while !raw.ends_with(b"(qemu) ") {
            match self.0.read(&mut buf) {
                Ok(n) if n > 0 => raw.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&raw).replace('\r', "")
    }

    /// The output of `cmd`, without the monitor's echo of it (the first line, full of
    /// cursor movements) and the prompt.
    fn ask(&mut self, cmd: &str) -> String {
        use std::io::Write;
        if self.0.write_all(format!("{cmd}\n").as_bytes()).is_err() {
            return String::new();
        }
        let text = self.until_prompt();
        let text = text.strip_suffix("(qemu) ").unwrap_or(&text);
        text.split_once('\n')
            .map_or("", |(_, rest)| rest)
            .to_string()
    }
}

/// The text symbols of a System.map, sorted by address.
fn text_symbols(map: &str) -> Vec<(u64, String)> {
    let mut v: Vec<(u64, String)> = map
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let a = u64::from_str_radix(f.next()?, 16).ok()?;
            let kind = f.next()?;
            let sym = f.next()?;
            matches!(kind, "t" | "T" | "w" | "W").then(|| (a, sym.to_string()))
        })
        .collect();
    v.sort();
    v
}

/// Kernel splats and test-FLB errors in a console log (the VM suite's rules).
fn kernel_problems(lines: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for &l in lines {
        let Some((_, msg)) = kernel_line(l) else {
            continue;
        };
        if let Some(p) = SPLATS.iter().find(|p| msg.contains(*p)) {
            out.push(format!("kernel splat ({p}): {}", l.trim_end()));
        }
        if let Some(m) = msg.split_once("liveupdate test: ").map(|(_, m)| m) {
            if !FLB_GOOD.iter().any(|g| m.contains(g)) {
                out.push(format!("lib/tests/liveupdate.c error: {}", l.trim_end()));
            }
        }
    }
    out
}

/// Keeps the newest `keep` run directories (their names start with a sortable timestamp).
fn prune(dir: &Path, keep: usize) {
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    let mut runs: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    runs.sort();
    let excess = runs.len().saturating_sub(keep);
    for r in &runs[..excess] {
        let _ = util::remove(r);
    }
}

/// Splits `seeds` into `n` contiguous ranges.
fn chunks(seeds: (u64, u64), n: u64) -> Vec<(u64, u64)> {
    let len = seeds.1 - seeds.0;
    let n = n.min(len).max(1);
    (0..n)
        .map(|i| (seeds.0 + len * i / n, seeds.0 + len * (i + 1) / n))
        .collect()
}

pub(crate) fn run(paths: &Paths, opts: &Options) -> Result<bool> {
    let total = Instant::now();
    // Under logs/dfuzz/, so that these runs do not push the VM suite's out of logs/.
    let runs_dir = paths.logs().join("dfuzz");
    let run_dir = runs_dir.join(format!(
        "{}-{}-{}",
        util::timestamp(),
        opts.seeds.0,
        opts.seeds.1
    ));
    mkdirs(&run_dir)?;
    prune(&runs_dir, 20);
    let (lock, ks) = kernels(paths, opts, &run_dir)?;
    let prog = run_dir.join("luo_dfuzz");
    let Some(first) = ks.first() else {
        bail!("no core to fuzz");
    };
    build_guest(&first.headers, &prog)?;
    let mut jobs = Vec::new();
    for k in &ks {
        let initrd = run_dir.join(format!("initrd-{}.cpio", k.core));
        image(k, &prog, &initrd)?;
        for c in chunks(opts.seeds, opts.vms) {
            jobs.push((k, initrd.clone(), c));
        }
    }
    // The VMs use only the run directory: builds may go on meanwhile.
    drop(lock);
    step(&format!(
        "fuzzing seeds {}..{} ({} ops each, kexec every {}) on {} in {} VM(s); logs in {}",
        opts.seeds.0,
        opts.seeds.1,
        opts.ops,
        opts.kexec_every,
        ks.iter()
            .map(|k| k.core.to_string())
            .collect::<Vec<_>>()
            .join(" and "),
        jobs.len(),
        run_dir.display()
    ));
    let runs: Vec<Result<VmRun>> = thread::scope(|s| {
        let hs: Vec<_> = jobs
            .iter()
            .map(|(k, initrd, c)| s.spawn(|| boot(k, initrd, opts, *c, &run_dir)))
            .collect();
        hs.into_iter()
            .map(|h| match h.join() {
                Ok(r) => r,
                Err(_) => Err(util::Error::msg("a VM thread panicked")),
            })
            .collect()
    });
    let runs = runs.into_iter().collect::<Result<Vec<_>>>()?;

    let mut report = String::new();
    let mut ok = true;
    let mut per_core: BTreeMap<String, BTreeMap<u64, Seq>> = BTreeMap::new();
    for r in runs {
        let mut problems = r.trace.problems.clone();
        let text = fs::read(&r.log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        problems.extend(kernel_problems(&lines));
        if r.kmemleak {
            problems.extend(suite::kmemleak_problems(&lines, 1));
        }
        if let Some(cpus) = &r.timed_out {
            problems.push(format!(
                "timed out after {} s (QEMU killed){cpus}",
                r.wall.as_secs()
            ));
        } else if !r.ok_exit {
            problems.push("QEMU did not exit cleanly".into());
        }
        if !r.trace.done {
            problems.push("the guest did not finish (no DONE line)".into());
        }
        let missing: Vec<u64> = (r.seeds.0..r.seeds.1)
            .filter(|s| !r.trace.seqs.get(s).is_some_and(|q| q.complete))
            .collect();
        if let Some(first) = missing.first() {
            problems.push(format!(
                "{} sequence(s) incomplete, the first is seed {first}",
                missing.len()
            ));
        }
        let kseqs = r.trace.seqs.values().filter(|q| q.kexecs > 0).count();
        let kexecs: u32 = r.trace.seqs.values().map(|q| q.kexecs).sum();
        let _ = writeln!(
            report,
            "# {} core, seeds {}..{}: {} sequences ({kseqs} with {kexecs} kexecs), {} operations, \
             {} trace lines, {:.1} s; log {}",
            r.core,
            r.seeds.0,
            r.seeds.1,
            r.trace.seqs.values().filter(|q| q.complete).count(),
            r.trace.seqs.values().map(Seq::ops).sum::<u64>(),
            r.trace.lines,
            r.wall.as_secs_f64(),
            r.log.display()
        );
        if problems.len() > 10 {
            let more = problems.len() - 10;
            problems.truncate(10);
            problems.push(format!("... and {more} more"));
        }
        for p in &problems {
            ok = false;
            let _ = writeln!(
                report,
                "FAIL {} core, seeds {}..{}: {p}",
                r.core, r.seeds.0, r.seeds.1
            );
        }
        per_core
            .entry(r.core.to_string())
            .or_default()
            .extend(r.trace.seqs);
    }

    if let (Some(c), Some(rust)) = (per_core.get("c"), per_core.get("rust")) {
        let mut explained: BTreeMap<&str, usize> = BTreeMap::new();
        let mut findings = 0;
        let mut compared = 0;
        for (seed, cs) in c {
            let Some(rs) = rust.get(seed) else { continue };
            if !cs.complete || !rs.complete {
                continue;
            }
            compared += 1;
            let (used, finding) = diff(&cs.lines, &rs.lines);
            for u in used {
                *explained.entry(u).or_default() += 1;
            }
            if let Some(f) = finding {
                findings += 1;
                ok = false;
                if findings <= 20 {
                    let _ = writeln!(
                        report,
                        "FINDING seed {seed}: first difference at line {} of its trace{}",
                        f.line,
                        if cs.kexecs > 0 {
                            " (a kexec sequence)"
                        } else {
                            ""
                        }
                    );
                    for l in &f.context {
                        let _ = writeln!(report, "    both: {l}");
                    }
                    let _ = writeln!(report, "    c:    {}", f.c.as_deref().unwrap_or("(end)"));
                    let _ = writeln!(report, "    rust: {}", f.rust.as_deref().unwrap_or("(end)"));
                    let _ = writeln!(
                        report,
                        "    again: cargo xtask vm fuzz --seeds {seed}..{} --ops {} \
                         --kexec-every {}",
                        seed + 1,
                        opts.ops,
                        opts.kexec_every
                    );
                }
            }
        }
        for rule in RULES {
            if let Some(n) = explained.get(rule.id) {
                let _ = writeln!(
                    report,
                    "# explained by docs/decisions.md {}: {n} difference(s) ({})",
                    rule.id, rule.what
                );
            }
        }
        let _ = writeln!(
            report,
            "# compared {compared} sequences on both cores: {findings} with an unexplained \
             difference"
        );
    }
    let _ = writeln!(
        report,
        "# kernels: {}",
        ks.iter()
            .map(|k| format!("{} core {}", k.core, k.what))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        report,
        "# total {:.1} s, host load average {}; traces and logs in {}",
        total.elapsed().as_secs_f64(),
        util::loadavg(),
        run_dir.display()
    );
    let _ = writeln!(report, "# result: {}", if ok { "PASS" } else { "FAIL" });
    print!("{report}");
    util::write(&run_dir.join("summary.txt"), &report)?;
    if !ok {
        note("see the FAIL/FINDING lines above");
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A guest trace of `seqs`, with the guest's hash on each `E` line.
    fn guest_text(seqs: &[(u64, &[&str])]) -> String {
        let mut out = String::new();
        for (seed, ls) in seqs {
            let mut h = FNV_START;
            for l in *ls {
                let line = format!("{seed} {l}");
                h = fnv(h, &line);
                let _ = writeln!(out, "T {line}");
            }
            let _ = writeln!(out, "E {seed} {} {h:016x}", ls.len());
        }
        out.push_str("DONE 0 2\n");
        out
    }

    #[test]
    fn a_stall_report_names_each_cpu_and_its_stack_from_system_map() {
        let syms = text_symbols(
            "ffffffff81000000 T _stext\n\
             ffffffff81100000 t stop_machine_cpuslocked\n\
             ffffffff81100400 T multi_cpu_stop\n\
             ffffffff81200000 D some_data\n\
             ffffffff81200100 T default_idle\n\
             ffffffff81300000 T _etext\n",
        );
        // The data symbol is not text: its address belongs to the text symbol before it.
        assert_eq!(syms.len(), 5);
        let regs = "CPU#0\n\
            RAX=0000000000000000 RBX=ffff888003a1c000\n\
            RIP=ffffffff81100410 RFL=00000202 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0\n\
            CPU#1\n\
            RIP=ffffffff81200104 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n";
        assert_eq!(
            cpu_rips(regs),
            vec![
                (0, 0xffff_ffff_8110_0410, false),
                (1, 0xffff_ffff_8120_0104, true)
            ]
        );
        assert_eq!(
            symbolize(&syms, 0xffff_ffff_8110_0410).as_deref(),
            Some("multi_cpu_stop+0x10")
        );
        // Past _etext and below _stext are not text.
        assert_eq!(symbolize(&syms, 0xffff_ffff_8130_0010), None);
        assert_eq!(symbolize(&syms, 0xffff_8880_03a1_c000), None);
        let stack = "ffffc90000013e48: 0x0000000000000000 0xffffffff81100020\n\
                     ffffc90000013e58: 0xffff888003a1c000 0xffffffff81200180\n";
        assert_eq!(
            stack_text(&syms, stack),
            vec!["stop_machine_cpuslocked+0x20", "default_idle+0x80"]
        );
    }

    #[test]
    fn trace_hash_checks_out_and_catches_damage() {
        let text = guest_text(&[
            (0, &["1 open_dev = h0", "1 probe done"]),
            (1, &["0 x = ok"]),
        ]);
        let t = parse_trace(&text);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        assert!(t.done && t.seqs[&0].complete && t.seqs[&1].complete);
        assert_eq!(
            t.seqs[&0].lines,
            lines(&["1 open_dev = h0", "1 probe done"])
        );
        // One byte changed in transit: seed 0 no longer checks out.
        let bad = text.replacen("= h0", "= h1", 1);
        let t = parse_trace(&bad);
        assert!(!t.seqs[&0].complete);
        assert!(t.problems[0].contains("seed 0"));
        // A lost line, too.
        let lost = text.replacen("T 0 1 probe done\n", "", 1);
        assert!(!parse_trace(&lost).seqs[&0].complete);
    }

    #[test]
    fn equal_traces_have_no_finding() {
        let a = lines(&["1 open_dev = h0", "2 create h0 n1 arg=std = h1"]);
        assert_eq!(diff(&a, &a), (vec![], None));
    }

    #[test]
    fn a_perturbed_line_is_a_finding_at_its_line() {
        let c = lines(&[
            "1 open_dev = h0",
            "2 create h0 n1 arg=std = h1",
            "3 close h1 = ok",
        ]);
        let mut r = c.clone();
        r[1] = "2 create h0 n1 arg=std = EEXIST".into();
        let (_, f) = diff(&c, &r);
        let f = f.expect("the perturbed line must be found");
        assert_eq!(f.line, 2);
        assert_eq!(f.rust.as_deref(), Some("2 create h0 n1 arg=std = EEXIST"));
        assert_eq!(f.context, lines(&["1 open_dev = h0"]));
        // A missing last line is a finding too.
        let (_, f) = diff(&c, &c[..2]);
        assert_eq!(f.map(|f| (f.line, f.rust)), Some((3, None)));
    }

    #[test]
    fn b18_explains_only_the_get_name_tail() {
        let c = lines(&["5 get_name h1 res=0 junk=1 arg=std = ok name=7330 tail=echo@8"]);
        let r = lines(&["5 get_name h1 res=0 junk=1 arg=std = ok name=7330 tail=zero"]);
        assert_eq!(diff(&c, &r), (vec!["B18"], None));
        // Not the other way round, not with another difference, not on another line.
        assert!(diff(&r, &c).1.is_some());
        let r2 = lines(&["5 get_name h1 res=0 junk=1 arg=std = ok name=7331 tail=zero"]);
        assert!(diff(&c, &r2).1.is_some());
        let c3 = lines(&["5 obs now h1 x tail=echo@8"]);
        let r3 = lines(&["5 obs now h1 x tail=zero"]);
        assert!(diff(&c3, &r3).1.is_some());
    }

    #[test]
    fn b6_explains_the_probe_and_the_moved_flb_messages() {
        let fault = "7 retrieve_session h0 n2 arg=size:72+0,ro+0,tail:0/0 = EFAULT";
        let c = lines(&[
            fault,
            "7 k liveupdate-test-flb-v0: finish was triggered",
            "7 b6probe n2 = ENOENT",
            "8 close h0 dev = ok",
        ]);
        let r = lines(&[
            fault,
            "7 b6probe n2 = ok finish=ok close=ok",
            "7 k liveupdate-test-flb-v0: finish was triggered",
            "8 close h0 dev = ok",
        ]);
        assert_eq!(diff(&c, &r), (vec!["B6"], None));
        // The FLB messages must match as a multiset.
        let mut r2 = r.clone();
        r2[2] = "7 k liveupdate-test-flb-v1: finish was triggered".into();
        assert!(diff(&c, &r2).1.is_some());
        // Without the faulted reply before it, the same probe lines are a finding.
        let mut c3 = c.clone();
        let mut r3 = r.clone();
        c3[0] = "7 retrieve_session h0 n2 arg=std = EFAULT".into();
        r3[0] = c3[0].clone();
        assert!(diff(&c3, &r3).1.is_some());
        // Nor the other way round (the Rust core losing the session).
        assert!(diff(&r, &c).1.is_some());
    }

    #[test]
    fn seeds_split_into_contiguous_chunks() {
        assert_eq!(chunks((0, 10), 3), vec![(0, 3), (3, 6), (6, 10)]);
        assert_eq!(chunks((5, 7), 4), vec![(5, 6), (6, 7)]);
        assert_eq!(kexecs((0, 200), 100), 3);
        assert_eq!(kexecs((0, 200), 0), 0);
    }
}
