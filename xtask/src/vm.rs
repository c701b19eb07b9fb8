//! `cargo xtask vm ...`: the pipeline from host packages to a TAP report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::guest::{self, Bins, Entry};
use crate::host::{self, Toolchain};
use crate::kbuild::{self, Core, Kernel};
use crate::paths::{Paths, LINUX_DEB_VERSION, LINUX_PKG};
use crate::qemu::{self, Vm};
use crate::source::{self, Patches};
use crate::suite::{self, Case, Kind, Metrics, Stage2, TESTS};
use crate::sysroot::{self, Sysroot};
use crate::util::{self, bail, mkdirs, note, remove, step, CacheLock, Result};

pub(crate) struct Options {
    pub(crate) core: Core,
    /// `--tests`: VM test names or `<vm test>.<case>`; empty means all.
    pub(crate) tests: Vec<String>,
    /// `--skip`: VM test names left out of the selection.
    pub(crate) skip: Vec<String>,
    pub(crate) clean: bool,
    /// Include config/debug.config (lockdep, sleep-in-atomic checks).
    pub(crate) debug: bool,
    pub(crate) timeout: Duration,
    pub(crate) verbose: bool,
    pub(crate) jobs: usize,
    /// `--kexec-into`: the core of the kernel the systemd VM kexecs into, if not `core`.
    pub(crate) kexec_into: Option<Core>,
    /// `--sanitize`: KASAN + UBSAN + kmemleak; every boot of the VMs whose init we write must
    /// report its kmemleak scan.
    pub(crate) sanitize: bool,
}

/// Everything up to a built kernel and guest programs.
pub(crate) struct Built {
    tree: PathBuf,
    tc: Toolchain,
    pub(crate) kernel: Kernel,
    bins: Bins,
}

pub(crate) struct Phases(pub(crate) Vec<(&'static str, Duration)>);

impl Phases {
    fn time<T>(&mut self, name: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t = Instant::now();
        let r = f();
        self.0.push((name, t.elapsed()));
        r
    }
}

/// Run directories kept under logs/ (the oldest beyond this are removed).
const KEEP_RUNS: usize = 50;

fn prune_logs(logs: &Path) {
    let Ok(rd) = std::fs::read_dir(logs) else {
        return;
    };
    let mut runs: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    // Names start with a sortable timestamp.
    runs.sort();
    let excess = runs.len().saturating_sub(KEEP_RUNS - 1);
    for r in &runs[..excess] {
        let _ = remove(r);
    }
}

pub(crate) fn clean(paths: &Paths) -> Result<()> {
    step(&format!(
        "removing build outputs under {}",
        paths.build().display()
    ));
    remove(&paths.build())
}

/// `--sanitize`: bookworm's clang 19 (Kconfig allows Rust with KASAN only in a clang build).
const SANITIZE_LLVM: &str = "-19";
const SANITIZE_FRAGMENTS: [&str; 2] = ["kasan", "sanitize"];

/// The environment that makes the next builds `--sanitize` ones: the documented form
/// `LUO_LLVM=-19 LUO_EXTRA_CONFIG=kasan,sanitize`, which the toolchain, host-deps.sh and the
/// fragment list read (an explicit `LUO_LLVM` wins; extra fragments are added to). Dropping
/// it restores what was there, so that one process can build a plain and a sanitizer
/// kernel (`vm fuzz --sanitize`). Set only while no other thread runs.
pub(crate) struct SanitizeEnv {
    llvm: Option<std::ffi::OsString>,
    extra: Option<std::ffi::OsString>,
}

impl SanitizeEnv {
    pub(crate) fn set() -> Self {
        let old = SanitizeEnv {
            llvm: std::env::var_os("LUO_LLVM"),
            extra: std::env::var_os("LUO_EXTRA_CONFIG"),
        };
        if old.llvm.as_ref().is_none_or(|v| v.is_empty()) {
            std::env::set_var("LUO_LLVM", SANITIZE_LLVM);
        }
        let mut extra = old
            .extra
            .as_ref()
            .map(|v| util::comma_list(&v.to_string_lossy()))
            .unwrap_or_default();
        for f in SANITIZE_FRAGMENTS {
            if !extra.iter().any(|e| e == f) {
                extra.push(f.to_string());
            }
        }
        std::env::set_var("LUO_EXTRA_CONFIG", extra.join(","));
        old
    }
}

impl Drop for SanitizeEnv {
    fn drop(&mut self) {
        for (name, old) in [("LUO_LLVM", &self.llvm), ("LUO_EXTRA_CONFIG", &self.extra)] {
            match old {
                Some(v) => std::env::set_var(name, v),
                None => std::env::remove_var(name),
            }
        }
    }
}

pub(crate) fn prepare(paths: &Paths, opts: &Options, phases: &mut Phases) -> Result<Built> {
    let patches = Patches::load(&paths.kernel_dir().join("patches"))?;
    if let Some(sym) = opts.core.required_kconfig() {
        if !patches.defines_kconfig(sym) {
            bail!(
                "no Rust core patch series yet: --core {} needs a patch in {} that defines \
                 `config {sym}` (the series has {} patch(es)); use --core c",
                opts.core,
                paths.kernel_dir().join("patches").display(),
                patches.files.len()
            );
        }
    }
    if opts.clean {
        clean(paths)?;
    }
    phases.time("host packages", || host::ensure_packages(paths))?;
    let tc = phases.time("toolchain", || Toolchain::ensure(paths))?;
    let tree = phases.time("kernel source", || {
        let pristine = source::ensure_pristine(paths)?;
        let path = source::ensure_tree(paths, &pristine, &patches)?;
        let links = source::ensure_links(paths, &path)?;
        Ok(source::Tree {
            path,
            patches: patches.hash.clone(),
            links,
        })
    })?;
    let kernel = phases.time("kernel build", || {
        kbuild::ensure(paths, &tree, &tc, opts.core, opts.debug, opts.jobs)
    })?;
    let bins = phases.time("guest programs", || {
        guest::build_programs(&tree.path, &kernel)
    })?;
    Ok(Built {
        tree: tree.path,
        tc,
        kernel,
        bins,
    })
}

pub(crate) fn build(paths: &Paths, opts: &Options) -> Result<()> {
    let _lock = CacheLock::acquire(&paths.cache)?;
    let mut phases = Phases(Vec::new());
    let b = prepare(paths, opts, &mut phases)?;
    println!("bzImage: {}", b.kernel.bzimage.display());
    println!("guest programs: {}", b.bins.dir.display());
    print_phases(&phases, None);
    Ok(())
}

/// Which VM tests to run, and for harness tests which cases (`None` = all).
fn select(opts: &Options) -> Result<BTreeMap<usize, Option<Vec<String>>>> {
    let mut sel = select_tests(opts)?;
    for name in &opts.skip {
        let Some(i) = TESTS.iter().position(|t| t.name == name) else {
            bail!("--skip: unknown test `{name}`; `cargo xtask vm list` shows the names");
        };
        sel.remove(&i);
    }
    if sel.is_empty() {
        bail!("no VM test left to run (--tests and --skip)");
    }
    Ok(sel)
}

fn select_tests(opts: &Options) -> Result<BTreeMap<usize, Option<Vec<String>>>> {
    let mut sel: BTreeMap<usize, Option<Vec<String>>> = BTreeMap::new();
    if opts.tests.is_empty() {
        for (i, t) in TESTS.iter().enumerate() {
            if !t.opt_in {
                sel.insert(i, None);
            }
        }
        return Ok(sel);
    }
    for want in &opts.tests {
        let (vm, case) = match want.split_once('.') {
            Some((v, c)) => (v, Some(c)),
            None => (want.as_str(), None),
        };
        let Some(i) = TESTS.iter().position(|t| t.name == vm) else {
            bail!("unknown test `{want}`; `cargo xtask vm list` shows the names");
        };
        match (case, &TESTS[i].kind) {
            (None, _) => {
                sel.insert(i, None);
            }
            (Some(c), Kind::Harness { .. }) => {
                let e = sel.entry(i).or_insert_with(|| Some(Vec::new()));
                if let Some(v) = e {
                    v.push(c.to_string());
                }
            }
            (
                Some(_),
                Kind::Kexec { .. } | Kind::Luod { .. } | Kind::Systemd | Kind::LuodSystemd { .. },
            ) => {
                bail!("`{want}`: kexec tests have no cases; use `{vm}`")
            }
        }
    }
    Ok(sel)
}

pub(crate) fn list(paths: &Paths) {
    let tree = paths
        .tree()
        .join(format!("linux-{}", util::path_safe(LINUX_DEB_VERSION)));
    for t in TESTS {
        match t.kind {
            Kind::Harness { program } => {
                println!("{}  (one VM: {program}, kselftest harness)", t.name);
                let cases = suite::harness_cases(&tree, program);
                if cases.is_empty() {
                    println!("    (cases are listed once the kernel source is in the cache)");
                }
                for c in cases {
                    let short = c.split_once('.').map_or(c.as_str(), |(_, n)| n);
                    println!("  {}.{short}", t.name);
                }
            }
            Kind::Kexec { program, .. } => {
                println!(
                    "{}  (one VM, two boots: {program} -s 1, kexec, -s 2)",
                    t.name
                )
            }
            Kind::Systemd => println!(
                "{}  (one VM, two boots: systemd 262 runs its TEST-91-LIVEUPDATE, \
                 `systemctl kexec`, the second boot checks the fd stores)",
                t.name
            ),
            Kind::Luod { .. } => println!(
                "{}  (one VM, two boots: luod + luoctl preserve, luoctl update kexecs, \
                 luoctl retrieve{})",
                t.name,
                if t.opt_in { "; opt-in" } else { "" }
            ),
            Kind::LuodSystemd { .. } => println!(
                "{}  (one VM, two boots: systemd 262 runs luod from luod.service/.socket; \
                 SIGKILL, stop + start, luoctl update kexecs, the same again, retrieve)",
                t.name
            ),
        }
    }
}

pub(crate) fn test(paths: &Paths, opts: &Options) -> Result<bool> {
    let total = Instant::now();
    let sel = select(opts)?;
    // Held while anything is built into the cache; the VMs only read the builds (each run
    // writes under its own log directory), so they run without it and another run may build.
    let lock = CacheLock::acquire(&paths.cache)?;
    let load_start = util::loadavg();
    let mut phases = Phases(Vec::new());
    let b = prepare(paths, opts, &mut phases)?;
    // The second kernel of a cross-core run (systemd_luo only).
    let next = match opts.kexec_into {
        Some(c) if c != opts.core => {
            if sel.keys().any(|&i| !matches!(TESTS[i].kind, Kind::Systemd)) {
                bail!("--kexec-into applies to systemd_luo only; add `--tests systemd_luo`");
            }
            let o = Options {
                core: c,
                tests: Vec::new(),
                skip: Vec::new(),
                clean: false,
                kexec_into: None,
                ..*opts
            };
            Some(prepare(paths, &o, &mut phases)?.kernel)
        }
        _ => None,
    };
    let run_name = match &next {
        Some(n) => format!("{}-{}-to-{}", util::timestamp(), opts.core, n.core),
        None => format!("{}-{}", util::timestamp(), opts.core),
    };

    let run_dir = paths.logs().join(run_name);
    prune_logs(&paths.logs());
    mkdirs(&run_dir)?;
    let latest = paths.logs().join("latest");
    let _ = std::fs::remove_file(&latest);
    let _ = std::os::unix::fs::symlink(&run_dir, &latest);

    // luod and luoctl for the luod VM, built once, outside the VM timings.
    let luod_bins = if sel
        .keys()
        .any(|&i| matches!(TESTS[i].kind, Kind::Luod { .. } | Kind::LuodSystemd { .. }))
    {
        Some(phases.time("luod (static)", || {
            guest::build_luod(&b.kernel.dir.join("luo/luod"))
        })?)
    } else {
        None
    };
    let sysroot = if sel
        .keys()
        .any(|&i| matches!(TESTS[i].kind, Kind::Systemd | Kind::LuodSystemd { .. }))
    {
        let root = phases.time("sid root", || sysroot::ensure(paths))?;
        if root.built {
            note(&format!("built {}", root.image.display()));
        }
        Some(root)
    } else {
        None
    };
    drop(lock);

    let t_vms = Instant::now();
    let mut cases: Vec<Case> = Vec::new();
    let mut metrics: Vec<(String, Metrics, PathBuf)> = Vec::new();
    for (&i, cases_sel) in &sel {
        let t = &TESTS[i];
        let log = run_dir.join(format!("{}.log", t.name));
        step(&format!("VM {}", t.name));
        let (mut got, m, run) = match t.kind {
            Kind::Harness { program } => {
                let all = suite::harness_cases(&b.tree, program);
                if all.is_empty() {
                    bail!("found no TEST_F cases for {program} in the kernel tree");
                }
                let expected = match cases_sel {
                    None => all,
                    Some(want) => {
                        let mut v = Vec::new();
                        for w in want {
                            match all.iter().find(|c| c.ends_with(&format!(".{w}"))) {
                                Some(c) => v.push(c.clone()),
                                None => bail!(
                                    "{} has no case `{w}`; `cargo xtask vm list` shows them",
                                    t.name
                                ),
                            }
                        }
                        v
                    }
                };
                let image = busybox_image(&b, program)?;
                let mut append = format!("-- {program}");
                if cases_sel.is_some() {
                    for c in &expected {
                        let short = c.split_once('.').map_or(c.as_str(), |(_, n)| n);
                        let _ = write!(append, " -t {short}");
                    }
                }
                let run = qemu::boot(&Vm {
                    kernel: &b.kernel.bzimage,
                    initrd: Some(&image),
                    disks: &[],
                    mem_mib: 1024,
                    append,
                    timeout: opts.timeout,
                    log: &log,
                    echo: opts.verbose,
                })?;
                let (c, m) = suite::judge_harness(t, &run, &expected);
                (c, m, run)
            }
            Kind::Kexec {
                program,
                pass,
                stage2,
            } => {
                let stage2_kernel = match stage2 {
                    Stage2::Same => b.kernel.bzimage.clone(),
                };
                let image = kexec_image(&b, t.name, program, &stage2_kernel)?;
                let run = qemu::boot(&Vm {
                    kernel: &b.kernel.bzimage,
                    initrd: Some(&image),
                    disks: &[],
                    mem_mib: 1024,
                    append: String::new(),
                    timeout: opts.timeout,
                    log: &log,
                    echo: opts.verbose,
                })?;
                let (c, m) = suite::judge_kexec(t, &run, pass);
                (vec![c], m, run)
            }
            Kind::Systemd => {
                let Some(root) = &sysroot else {
                    bail!("the sid root was not built for {}", t.name);
                };
                let next_kernel = next.as_ref().unwrap_or(&b.kernel);
                let disks = log.with_extension("disks");
                let (run, disk) = systemd_vm(&b.kernel, next_kernel, root, opts, &log, &disks)?;
                let (c, m) = suite::judge_systemd(t, &run, &disk);
                if c.ok {
                    // 0.5 GB each; a failed run keeps them for a look.
                    let _ = remove(&disks);
                }
                (vec![c], m, run)
            }
            Kind::LuodSystemd { pass } => {
                let (Some(root), Some(bins)) = (&sysroot, &luod_bins) else {
                    bail!("the sid root or luod was not built for {}", t.name);
                };
                let disks = log.with_extension("disks");
                let run = luod_systemd_vm(&b.kernel, root, bins, opts, &log, &disks)?;
                let (c, m) = suite::judge_luod_systemd(t, &run, pass);
                if c.ok {
                    let _ = remove(&disks);
                }
                (vec![c], m, run)
            }
            Kind::Luod { pass } => {
                let Some((luod, luoctl)) = &luod_bins else {
                    bail!("luod was not built for {}", t.name);
                };
                let image = luod_image(&b, t.name, luod, luoctl)?;
                let run = qemu::boot(&Vm {
                    kernel: &b.kernel.bzimage,
                    initrd: Some(&image),
                    disks: &[],
                    mem_mib: 1024,
                    append: String::new(),
                    timeout: opts.timeout,
                    log: &log,
                    echo: opts.verbose,
                })?;
                let (c, m) = suite::judge_kexec(t, &run, pass);
                (vec![c], m, run)
            }
        };
        if opts.sanitize {
            if let Some(c) = got.last_mut() {
                suite::check_kmemleak(t, &run, &mut c.diag);
                c.ok = c.diag.is_empty();
            }
        }
        for c in &got {
            let time = c.secs.map_or(String::new(), |s| format!(" {s:.3} s"));
            note(&format!(
                "{} {}{time}",
                if c.ok { "ok    " } else { "NOT OK" },
                c.name
            ));
            for d in &c.diag {
                note(&format!("    {d}"));
            }
        }
        cases.append(&mut got);
        metrics.push((t.name.to_string(), m, log));
    }
    phases.0.push(("VMs", t_vms.elapsed()));

    let ok = cases.iter().all(|c| c.ok);
    let tap = tap_report(&cases, &metrics);
    print!("{tap}");
    util::write(&run_dir.join("summary.tap"), &tap)?;
    println!(
        "# kernel: {LINUX_PKG} {LINUX_DEB_VERSION} (Linux {}), {} core, {}, make {} s{}",
        b.kernel.release,
        b.kernel.core,
        if b.kernel.debug {
            "with debug.config"
        } else {
            "without debug.config"
        },
        util::secs(b.kernel.make_time),
        if b.kernel.rebuilt {
            " (bzImage rebuilt)"
        } else {
            " (bzImage up to date)"
        }
    );
    for (k, v) in b.tc.describe().into_iter().chain(host::runtime_versions()) {
        println!("# {k}: {v}");
    }
    print_phases(&phases, Some(total.elapsed()));
    println!(
        "# host: {} CPUs, load average {load_start} at start, {} at end",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        util::loadavg()
    );
    println!("# serial logs: {}", run_dir.display());
    println!(
        "# result: {} of {} passed",
        cases.iter().filter(|c| c.ok).count(),
        cases.len()
    );
    Ok(ok)
}

fn print_phases(phases: &Phases, total: Option<Duration>) {
    let mut s: Vec<String> = phases
        .0
        .iter()
        .map(|(n, d)| format!("{n} {} s", util::secs(*d)))
        .collect();
    if let Some(t) = total {
        s.push(format!("total {} s", util::secs(t)));
    }
    println!("# timings: {}", s.join(", "));
}

fn tap_report(cases: &[Case], metrics: &[(String, Metrics, PathBuf)]) -> String {
    let mut out = String::from("TAP version 13\n");
    let _ = writeln!(out, "1..{}", cases.len());
    for (n, c) in cases.iter().enumerate() {
        let time = c.secs.map_or(String::new(), |s| format!(" [{s:.3} s]"));
        let detail = if c.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", c.detail)
        };
        let _ = writeln!(
            out,
            "{} {} - {}{time}{detail}",
            if c.ok { "ok" } else { "not ok" },
            n + 1,
            c.name
        );
        for d in &c.diag {
            let _ = writeln!(out, "# {d}");
        }
    }
    for (name, m, log) in metrics {
        let boot = m.boot_to_init.map_or(String::new(), |(h, g)| {
            format!(
                ", boot to /init {h:.3} s host{}",
                g.map_or(String::new(), |g| format!(" ({g:.3} s guest)"))
            )
        });
        let _ = writeln!(out, "# {name}: log {}{boot}", log.display());
    }
    out
}

/// The base of every busybox image: the usual directories, a console, busybox-static (a
/// static binary, so the image needs no libraries) as `/bin/sh`, and `init_script` (relative
/// to xtask/) as `/init`.
fn busybox_entries(init_script: &str) -> Vec<Entry> {
    vec![
        Entry::Dir("/bin"),
        Entry::Dir("/dev"),
        Entry::Dir("/proc"),
        Entry::Dir("/sys"),
        Entry::Dir("/tmp"),
        Entry::Console,
        Entry::File {
            guest: "/bin/busybox".into(),
            host: PathBuf::from("/bin/busybox"),
            mode: 0o755,
        },
        Entry::Slink {
            guest: "/bin/sh",
            target: "busybox",
        },
        Entry::File {
            guest: "/init".into(),
            host: Path::new(env!("CARGO_MANIFEST_DIR")).join(init_script),
            mode: 0o755,
        },
        Entry::File {
            guest: "/bin/kmemleak-scan".into(),
            host: Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kmemleak-scan.sh"),
            mode: 0o755,
        },
    ]
}

fn busybox_image(b: &Built, program: &str) -> Result<PathBuf> {
    let dir = b.kernel.dir.join("luo/initramfs");
    mkdirs(&dir)?;
    let out = dir.join(format!("busybox-{program}.cpio"));
    let mut entries = busybox_entries("scripts/vm-init.sh");
    entries.push(Entry::File {
        guest: format!("/bin/{program}"),
        host: b.bins.path(program),
        mode: 0o755,
    });
    guest::pack(&b.kernel.gen_init_cpio, &entries, &out)?;
    Ok(out)
}

/// vmtest.sh's layout: the inner image is what the kexec'd kernel boots with; the outer
/// one adds the kernel to kexec into and the inner image as files.
fn kexec_image(b: &Built, name: &str, program: &str, stage2_kernel: &Path) -> Result<PathBuf> {
    let dir = b.kernel.dir.join("luo/initramfs");
    mkdirs(&dir)?;
    let mut entries = vec![
        Entry::Dir("/dev"),
        Entry::Dir("/proc"),
        Entry::Dir("/debugfs"),
        Entry::Console,
        Entry::File {
            guest: "/init".into(),
            host: b.bins.path("init"),
            mode: 0o755,
        },
        Entry::File {
            guest: "/test_binary".into(),
            host: b.bins.path(program),
            mode: 0o755,
        },
    ];
    let inner = dir.join(format!("{name}-inner.cpio"));
    guest::pack(&b.kernel.gen_init_cpio, &entries, &inner)?;
    entries.push(Entry::File {
        guest: "/kernel".into(),
        host: stage2_kernel.to_path_buf(),
        mode: 0o644,
    });
    entries.push(Entry::File {
        guest: "/initrd.img".into(),
        host: inner,
        mode: 0o644,
    });
    let outer = dir.join(format!("{name}.cpio"));
    guest::pack(&b.kernel.gen_init_cpio, &entries, &outer)?;
    Ok(outer)
}

/// The luod VM: busybox, static luod and luoctl, `xtask/scripts/luod-init.sh` as `/init`.
/// As in `kexec_image`, the outer image adds `/kernel` and the inner image as
/// `/initrd.img`, which `luoctl update --kernel /kernel --initrd /initrd.img` loads.
fn luod_image(b: &Built, name: &str, luod: &Path, luoctl: &Path) -> Result<PathBuf> {
    let dir = b.kernel.dir.join("luo/initramfs");
    mkdirs(&dir)?;
    let mut entries = busybox_entries("scripts/luod-init.sh");
    entries.extend([
        Entry::Dir("/run"),
        Entry::File {
            guest: "/bin/luod".into(),
            host: luod.to_path_buf(),
            mode: 0o755,
        },
        Entry::File {
            guest: "/bin/luoctl".into(),
            host: luoctl.to_path_buf(),
            mode: 0o755,
        },
    ]);
    let inner = dir.join(format!("{name}-inner.cpio"));
    guest::pack(&b.kernel.gen_init_cpio, &entries, &inner)?;
    entries.push(Entry::File {
        guest: "/kernel".into(),
        host: b.kernel.bzimage.clone(),
        mode: 0o644,
    });
    entries.push(Entry::File {
        guest: "/initrd.img".into(),
        host: inner,
        mode: 0o644,
    });
    let outer = dir.join(format!("{name}.cpio"));
    guest::pack(&b.kernel.gen_init_cpio, &entries, &outer)?;
    Ok(outer)
}

/// How long the systemd VM may take at least: two systemd boots and the test under TCG.
const SYSTEMD_TIMEOUT: Duration = Duration::from_secs(900);
/// The same under `--sanitize`: kmemleak's bookkeeping of every allocation makes a systemd
/// boot several times slower.
const SYSTEMD_SANITIZE_TIMEOUT: Duration = Duration::from_secs(1800);

/// The systemd VMs' timeout floor.
fn systemd_timeout(opts: &Options) -> Duration {
    if opts.sanitize {
        SYSTEMD_SANITIZE_TIMEOUT
    } else {
        SYSTEMD_TIMEOUT
    }
}

/// The command line of a systemd VM (2 GiB, PCI disks). `--sanitize` adds two things:
/// - `kho_scratch=64M,384M,64M`: a kexec'd kernel makes its early allocations only in the KHO
///   scratch areas, and KASAN's shadow of 2 GiB (256 MiB) does not fit the 64M,128M,64M that
///   kasan.config builds in for the 1 GiB VMs: the next kernel died before its console came
///   up. The last `kho_scratch=` wins, and TEST-91 and luoctl pass the line on to the next
///   kernel.
/// - `pci=noacpi`: under kmemleak the ACPI interpreter is so slow that QEMU's
///   `\_SB.PCI0._PRT` (a 128-step AML loop) hits ACPICA's 30 s loop timeout
///   (`AE_AML_LOOP_TIMEOUT`), the virtio disks get no interrupt ("PCI INT A: no GSI") and the
///   boot stops at the root; the plain kernels run the same method in milliseconds. With
///   it, legacy interrupts are routed by the BIOS's $PIR table instead; nothing of LUO
///   depends on how.
fn disk_vm_cmdline(line: String, opts: &Options) -> String {
    if opts.sanitize {
        line + " kho_scratch=64M,384M,64M pci=noacpi"
    } else {
        line
    }
}

/// The kernel command line of the systemd VM: what systemd's integration-test harness
/// passes (mkosi.conf's KernelCommandLine=, integration-test-wrapper.py's
/// --kernel-command-line-extra, TEST-91's meson `cmdline`), the root disk, and the
/// harness's credentials (which mkosi passes over SMBIOS) as `systemd.set_credential_binary=`.
fn systemd_cmdline() -> String {
    const HARNESS: &[&str] = &[
        // the root and the ESP (docs/systemd.md)
        "root=/dev/vda rw",
        // TEST-91-LIVEUPDATE/meson.build
        "kho=on liveupdate=on systemd.minimum_uptime_sec=0",
        // mkosi/mkosi.conf (console:info keeps the serial log readable under TCG)
        "systemd.log_level=debug,console:info systemd.log_ratelimit_kmsg=0 printk.devkmsg=on",
        "selinux=0 systemd.early_core_pattern=/core systemd.firstboot=no raid=noautodetect",
        "oops=panic softlockup_panic=1 panic_on_warn=1 psi=1 mitigations=off",
        // integration-test-wrapper.py, for a test run without a terminal
        "systemd.hostname=H",
        "SYSTEMD_UNIT_PATH=/usr/lib/systemd/tests/testdata/TEST-91-LIVEUPDATE.units:\
         /usr/lib/systemd/tests/testdata/units:",
        "systemd.unit=TEST-91-LIVEUPDATE.service",
        "systemd.mask=systemd-networkd-wait-online.service systemd.mask=serial-getty@.service",
        "systemd.show_status=error systemd.crash_shell=0 systemd.crash_action=poweroff loglevel=6",
        // The kernel's default console level again (7: KERN_INFO shows), as in every other VM
        // test: the LUO test FLBs report at info level, and their lines are judged per boot.
        "loglevel=7",
    ];
    // integration-test-wrapper.py's credentials for a run without a terminal.
    const DROPIN: &str = "[Service]\nStandardOutput=journal+console\n\n\
        [Unit]\nSuccessAction=exit\nSuccessActionExitStatus=123\n\n\
        [Unit]\nFailureAction=exit\n";
    const EMERGENCY_EXIT_SERVICE: &str = "[Unit]\nDefaultDependencies=no\n\
        Conflicts=shutdown.target\nConflicts=rescue.service\nBefore=shutdown.target\n\
        Before=rescue.service\nFailureAction=exit\n\n[Service]\nExecStart=false\n";
    const EMERGENCY_EXIT_DROPIN: &str = "[Unit]\nWants=emergency-exit.service\n";
    let creds = [
        ("systemd.unit-dropin.TEST-91-LIVEUPDATE.service", DROPIN),
        (
            "systemd.extra-unit.emergency-exit.service",
            EMERGENCY_EXIT_SERVICE,
        ),
        (
            "systemd.unit-dropin.emergency.target",
            EMERGENCY_EXIT_DROPIN,
        ),
        ("journal.storage", "persistent"),
    ];
    let mut out = HARNESS.join(" ");
    for (name, value) in creds {
        let _ = write!(
            out,
            " systemd.set_credential_binary={name}:{}",
            util::base64(value.as_bytes())
        );
    }
    out
}

/// Boot the systemd VM with `kernel` on a fresh copy of the root and an ESP holding
/// `next` (the kernel `systemctl kexec` loads), both in `dir`; then read what the harness
/// reads from the root disk.
fn systemd_vm(
    kernel: &Kernel,
    next: &Kernel,
    root: &Sysroot,
    opts: &Options,
    log: &Path,
    dir: &Path,
) -> Result<(qemu::Run, suite::SystemdDisk)> {
    mkdirs(dir)?;
    let disk = dir.join("root.ext4");
    sysroot::copy_root(&root.image, &disk)?;
    let esp = dir.join("esp.img");
    sysroot::esp_disk(
        &next.bzimage,
        &format!("Linux {} ({} core)", next.release, next.core),
        &esp,
    )?;
    let run = qemu::boot(&Vm {
        kernel: &kernel.bzimage,
        initrd: None,
        disks: &[disk.clone(), esp],
        mem_mib: 2048,
        append: disk_vm_cmdline(systemd_cmdline(), opts),
        timeout: opts.timeout.max(systemd_timeout(opts)),
        log,
        echo: opts.verbose,
    })?;
    let result = suite::SystemdDisk {
        testok: sysroot::read_file(&disk, "/testok")?.is_some(),
        failed: sysroot::read_file(&disk, "/failed")?,
        journal: sysroot::journal(&disk, &log.with_extension("journal"))?,
    };
    Ok((run, result))
}

/// The kernel command line of the luod_systemd VM: systemd_luo's, without TEST-91's unit path,
/// unit and credentials; PID 1's goal is the test unit, in both boots (`luoctl update
/// --reuse-cmdline` hands this line on, plus `luo_nboot=1` and the md5s).
fn luod_systemd_cmdline() -> String {
    const LINE: &[&str] = &[
        "root=/dev/vda rw",
        "kho=on liveupdate=on systemd.minimum_uptime_sec=0",
        "systemd.log_level=debug,console:info systemd.log_ratelimit_kmsg=0 printk.devkmsg=on",
        "selinux=0 systemd.firstboot=no raid=noautodetect",
        "oops=panic softlockup_panic=1 panic_on_warn=1 psi=1 mitigations=off",
        "systemd.hostname=H systemd.unit=luod-systemd-test.service",
        // The kernel to update into is in the root (/usr/lib/luo/vmlinuz): no ESP, and no
        // wait for the root's fstab entry of one (on a loaded TCG host its device job timed
        // out after 90 s, /efi was missing, or the test unit waited for it).
        "systemd.mask=efi.mount",
        "systemd.mask=systemd-networkd-wait-online.service systemd.mask=serial-getty@.service",
        "systemd.show_status=error systemd.crash_shell=0 systemd.crash_action=poweroff",
        "loglevel=7",
        // Under TCG on a loaded host the boot-time check of the IO-APIC timer can fail
        // ("IO-APIC + timer doesn't work!", a panic before the kernel banner's first second);
        // the check proves nothing about LUO.
        "no_timer_check",
    ];
    LINE.join(" ")
}

/// Boot the luod_systemd VM: a fresh copy (in `dir`) of the sid root with luod, luoctl, the
/// shipped units (unchanged), the test unit and script, and `kernel` as
/// `/usr/lib/luo/vmlinuz` (what `luoctl update --kernel` loads) installed.
fn luod_systemd_vm(
    kernel: &Kernel,
    root: &Sysroot,
    (luod, luoctl): &(PathBuf, PathBuf),
    opts: &Options,
    log: &Path,
    dir: &Path,
) -> Result<qemu::Run> {
    mkdirs(dir)?;
    let disk = dir.join("root.ext4");
    sysroot::copy_root(&root.image, &disk)?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let units = repo.join("../luod/systemd");
    let scripts = repo.join("scripts");
    let (service, socket) = (units.join("luod.service"), units.join("luod.socket"));
    let test_unit = scripts.join("luod-systemd-test.service");
    let test_script = scripts.join("luod-systemd-test.sh");
    sysroot::install(
        &disk,
        &["/usr/lib/luo"],
        &[
            (luod.as_path(), "/usr/bin/luod", 0o755),
            (luoctl.as_path(), "/usr/bin/luoctl", 0o755),
            (&service, "/etc/systemd/system/luod.service", 0o644),
            (&socket, "/etc/systemd/system/luod.socket", 0o644),
            (
                &test_unit,
                "/etc/systemd/system/luod-systemd-test.service",
                0o644,
            ),
            (&test_script, "/usr/lib/luo/luod-systemd-test.sh", 0o755),
            (&kernel.bzimage, "/usr/lib/luo/vmlinuz", 0o644),
        ],
    )?;
    qemu::boot(&Vm {
        kernel: &kernel.bzimage,
        initrd: None,
        disks: &[disk],
        mem_mib: 2048,
        append: disk_vm_cmdline(luod_systemd_cmdline(), opts),
        timeout: opts.timeout.max(systemd_timeout(opts)),
        log,
        echo: opts.verbose,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(args: &[&str]) -> Result<Vec<&'static str>> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let opts = crate::parse_vm_options(&args)?;
        Ok(select(&opts)?.keys().map(|&i| TESTS[i].name).collect())
    }

    #[test]
    fn skip_leaves_out_exactly_the_named_tests() {
        let all = names(&[]).unwrap();
        assert!(all.contains(&"systemd_luo") && all.contains(&"liveupdate"));
        let some = names(&["--skip", "systemd_luo"]).unwrap();
        assert_eq!(
            some,
            all.iter()
                .copied()
                .filter(|n| *n != "systemd_luo")
                .collect::<Vec<_>>()
        );
        // --skip applies to an explicit selection too, and a typo is an error, not a no-op.
        assert_eq!(
            names(&["--tests", "liveupdate,luod_update", "--skip=luod_update"]).unwrap(),
            ["liveupdate"]
        );
        assert!(names(&["--skip", "systemd-luo"]).is_err());
        assert!(names(&["--tests", "liveupdate", "--skip", "liveupdate"]).is_err());
    }
}
