//! Configure and build the kernel (bzImage, uapi headers, gen_init_cpio) in a cached
//! `O=` directory keyed by everything that determines the result.

use std::fmt;
use std::fs;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::host::Toolchain;
use crate::paths::{Paths, LINUX_DEB_VERSION};
use crate::source::Tree;
use crate::util::{self, bail, mkdirs, note, path_safe, remove, Context, Fnv, Result};

/// Which LUO core the kernel is built with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Core {
    /// Upstream `kernel/liveupdate/luo_*.c`.
    C,
    /// The Rust core from the patch series (`CONFIG_LIVEUPDATE_RUST`).
    Rust,
}

impl Core {
    pub(crate) fn parse(s: &str) -> Option<Core> {
        match s {
            "c" => Some(Core::C),
            "rust" => Some(Core::Rust),
            _ => None,
        }
    }

    /// The Kconfig symbol a patch must define before this core can be built.
    pub(crate) fn required_kconfig(self) -> Option<&'static str> {
        match self {
            Core::C => None,
            Core::Rust => Some("LIVEUPDATE_RUST"),
        }
    }
}

impl fmt::Display for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Core::C => "c",
            Core::Rust => "rust",
        })
    }
}

/// A built kernel and the build artefacts the guest side needs.
pub(crate) struct Kernel {
    pub(crate) core: Core,
    /// Built with config/debug.config (lockdep etc.).
    pub(crate) debug: bool,
    pub(crate) dir: PathBuf,
    pub(crate) bzimage: PathBuf,
    /// Sanitized uapi headers (`make headers` output, what headers_install would copy).
    pub(crate) headers: PathBuf,
    pub(crate) gen_init_cpio: PathBuf,
    /// How long the `make` step took in this run and whether it changed bzImage.
    pub(crate) make_time: Duration,
    pub(crate) rebuilt: bool,
    pub(crate) release: String,
}

/// Bump when the make targets or variables below change, to force one real make.
const BUILD_RECIPE: &str = "make bzImage headers v1";

struct Fragments {
    text: String,
    hash: String,
}

fn fragments(paths: &Paths, core: Core, debug: bool) -> Result<Fragments> {
    let dir = paths.kernel_dir().join("config");
    let mut text = String::new();
    let mut names = vec!["base.config".to_string(), "systemd.config".to_string()];
    if debug {
        names.push("debug.config".to_string());
    }
    names.push(format!("core-{core}.config"));
    // Extra fragments from config/ by name, e.g. LUO_EXTRA_CONFIG=kasan for kasan.config
    // (part of the build key, so they get their own build directory).
    if let Some(extra) = std::env::var_os("LUO_EXTRA_CONFIG") {
        for n in util::comma_list(&extra.to_string_lossy()) {
            names.push(format!("{n}.config"));
        }
    }
    for name in names {
        let p = dir.join(&name);
        let t = fs::read_to_string(&p).context(|| format!("cannot read {}", p.display()))?;
        text.push_str(&format!("# --- {name}\n{t}\n"));
    }
    let hash = Fnv::new().str(&text).hex();
    Ok(Fragments { text, hash })
}

/// What one fragment line asks for: `CONFIG_X=v` (value) or `=n` / `# ... is not set`.
struct Want {
    line: String,
    sym: String,
    value: Option<String>,
}

fn expectations(fragment: &str) -> Vec<Want> {
    let mut out = Vec::new();
    for l in fragment.lines().map(str::trim) {
        if let Some(sym) = l
            .strip_prefix("# ")
            .and_then(|r| r.strip_suffix(" is not set"))
        {
            out.push(Want {
                line: l.to_string(),
                sym: sym.to_string(),
                value: None,
            });
        } else if let Some((sym, val)) = l.split_once('=') {
            if sym.starts_with("CONFIG_") {
                let value = (val != "n").then(|| val.to_string());
                out.push(Want {
                    line: l.to_string(),
                    sym: sym.to_string(),
                    value,
                });
            }
        }
    }
    out
}

/// The value of `sym` in a .config; `None` if unset or absent.
fn config_value<'a>(cfg: &'a str, sym: &str) -> Option<&'a str> {
    cfg.lines()
        .find_map(|l| l.strip_prefix(sym).and_then(|r| r.strip_prefix('=')))
}

fn make(tree: &Path, dir: &Path, tc: &Toolchain) -> Command {
    let mut cmd = Command::new("make");
    cmd.arg("-C").arg(tree).arg(format!("O={}", dir.display()));
    tc.apply(&mut cmd);
    cmd
}

/// Run a quiet make step, keeping its output in `log` and showing it only on failure.
fn make_quiet(mut cmd: Command, log: &Path, what: &str) -> Result<()> {
    let st = util::stream(&mut cmd, log, |_| {})?;
    if !st.success() {
        bail!("{what} failed ({st}); output:\n{}", tail(log, 40));
    }
    Ok(())
}

fn tail(log: &Path, n: usize) -> String {
    let t = util::read_opt(log).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Configure (if the fragments changed) and build the kernel for `core`.
pub(crate) fn ensure(
    paths: &Paths,
    src: &Tree,
    tc: &Toolchain,
    core: Core,
    debug: bool,
    jobs: usize,
) -> Result<Kernel> {
    let frags = fragments(paths, core, debug)?;
    let tree = src.path.as_path();
    let links = src.links.as_str();
    let tc_key = tc.key();
    let key = Fnv::new()
        .str(LINUX_DEB_VERSION)
        .str(&frags.hash)
        .str(&src.patches)
        .str(&tc_key)
        .hex();
    let name = format!(
        "linux-{}-{core}{}-{}",
        path_safe(LINUX_DEB_VERSION),
        if debug { "" } else { "-nodebug" },
        &key[..12]
    );
    let dir = paths.build().join(&name);
    let meta = dir.join("luo");
    let info = format!(
        "source={LINUX_DEB_VERSION}\ncore={core}\nconfig={}\npatches={}\ntoolchain={tc_key}\n",
        frags.hash, src.patches
    );
    if !dir.join("luo/info").is_file() {
        mkdirs(&paths.build())?;
        seed(paths, &dir, &tc_key)?;
        mkdirs(&meta)?;
        let mut full = info.clone();
        for (k, v) in tc.describe() {
            full.push_str(&format!("# {k}: {v}\n"));
        }
        util::write(&meta.join("info"), full)?;
    }
    util::step(&format!("kernel ({core} core): {}", dir.display()));
    prune(paths, &dir);

    let cfg_stamp = meta.join("config.hash");
    if util::read_opt(&cfg_stamp).as_deref() != Some(frags.hash.as_str())
        || !dir.join(".config").is_file()
    {
        remove(&meta.join("built"))?;
        configure(tree, &dir, tc, &frags)?;
        util::write(&cfg_stamp, &frags.hash)?;
    }

    let bzimage = dir.join("arch/x86/boot/bzImage");
    let before = util::mtime(&bzimage);
    let t = Instant::now();
    // The directory's key covers every input of the build except the repository sources
    // linked into the tree (tree-links), whose state is in `links`; the tree itself is
    // only ever changed through the patch series. So a finished build with the same
    // stamp is up to date and even a no-op make (5 to 10 s on 2 busy cores) is skipped.
    let done_stamp = meta.join("built");
    let done = format!("{BUILD_RECIPE}\nlinks {links}\n{before:?}\n");
    if util::read_opt(&done_stamp).as_deref() == Some(done.as_str()) && before.is_some() {
        note("bzImage is up to date for this build key (make skipped)");
    } else {
        util::remove(&done_stamp)?;
        build(tree, &dir, tc, jobs, &meta.join("build.log"))?;
    }
    let make_time = t.elapsed();
    let rebuilt = util::mtime(&bzimage) != before;
    let gen_init_cpio = dir.join("usr/gen_init_cpio");
    if !gen_init_cpio.is_file() {
        // Normally built with the (empty) built-in initramfs; build it explicitly if a
        // config change ever stops that.
        let mut cmd = make(tree, &dir, tc);
        cmd.arg("usr/gen_init_cpio");
        make_quiet(
            cmd,
            &meta.join("gen_init_cpio.log"),
            "make usr/gen_init_cpio",
        )?;
    }
    let release = util::read_opt(&dir.join("include/config/kernel.release"))
        .unwrap_or_default()
        .trim()
        .to_string();
    util::write(
        &done_stamp,
        format!(
            "{BUILD_RECIPE}\nlinks {links}\n{:?}\n",
            util::mtime(&bzimage)
        ),
    )?;
    Ok(Kernel {
        core,
        debug,
        headers: dir.join("usr/include"),
        dir,
        bzimage,
        gen_init_cpio,
        make_time,
        rebuilt,
        release,
    })
}

/// Build directories kept (the most recently built ones). Every patch or config edit
/// makes a new key and about 450 MB of objects; 16 cover c/rust x debug/no-debug/KASAN
/// with room for the keys of a patch being worked on.
const KEEP_BUILDS: usize = 16;

/// Remove the least recently built directories beyond [`KEEP_BUILDS`] (never `keep`).
/// Runs under the cache lock, so no other xtask is using them.
fn prune(paths: &Paths, keep: &Path) {
    let Ok(rd) = fs::read_dir(paths.build()) else {
        return;
    };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p != keep)
        .map(|p| {
            let t = util::mtime(&p.join("luo/built"))
                .or_else(|| util::mtime(&p))
                .unwrap_or(std::time::UNIX_EPOCH);
            (t, p)
        })
        .collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
    for (_, d) in dirs.into_iter().skip(KEEP_BUILDS - 1) {
        note(&format!("removing old build directory {}", d.display()));
        let _ = remove(&d);
    }
}

/// A new build key usually differs from an existing build directory by a config or patch
/// change only. Starting from a copy of the most recent directory built with the same
/// source and toolchain lets kbuild rebuild just what changed (it tracks per-option
/// config dependencies and source mtimes) instead of a 3-minute cold build.
fn seed(paths: &Paths, dir: &Path, tc_key: &str) -> Result<()> {
    let want_src = format!("source={LINUX_DEB_VERSION}\n");
    let want_tc = format!("toolchain={tc_key}\n");
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in fs::read_dir(paths.build())?.flatten() {
        let p = e.path();
        let Some(info) = util::read_opt(&p.join("luo/info")) else {
            continue;
        };
        if !info.contains(&want_src) || !info.contains(&want_tc) {
            continue;
        }
        let Some(t) = util::mtime(&p.join("luo/built")) else {
            continue;
        };
        if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, p));
        }
    }
    remove(dir)?;
    if std::env::var_os("LUO_NO_SEED").is_none() {
        if let Some((_, from)) = best {
            note(&format!("new build key: seeding from {}", from.display()));
            let tmp = dir.with_extension("tmp");
            remove(&tmp)?;
            util::run(Command::new("cp").arg("-a").arg(&from).arg(&tmp))?;
            // Drop the source directory's stamps and guest files, except the config hash:
            // if the fragments are the same, the copied .config is already right, and
            // re-running tinyconfig would rewrite it and make kbuild rebuild far more.
            for e in fs::read_dir(tmp.join("luo"))?.flatten() {
                if e.file_name() != "config.hash" {
                    remove(&e.path())?;
                }
            }
            fs::rename(&tmp, dir)?;
            return Ok(());
        }
    }
    mkdirs(dir)
}

fn configure(tree: &Path, dir: &Path, tc: &Toolchain, frags: &Fragments) -> Result<()> {
    util::step("configure: tinyconfig + fragments + olddefconfig");
    let log = dir.join("luo/config.log");
    let mut cmd = make(tree, dir, tc);
    cmd.arg("tinyconfig");
    make_quiet(cmd, &log, "make tinyconfig")?;
    let cfg_path = dir.join(".config");
    let mut cfg = fs::OpenOptions::new()
        .append(true)
        .open(&cfg_path)
        .context(|| format!("cannot open {}", cfg_path.display()))?;
    cfg.write_all(frags.text.as_bytes())?;
    drop(cfg);
    let mut cmd = make(tree, dir, tc);
    cmd.arg("olddefconfig");
    make_quiet(cmd, &dir.join("luo/olddefconfig.log"), "make olddefconfig")?;

    // olddefconfig silently drops options whose dependencies are unmet; the tests would
    // then fail (or skip) far from the cause, so insist on every line here.
    let cfg = fs::read_to_string(&cfg_path)?;
    let wants = expectations(&frags.text);
    let mut missing = Vec::new();
    for w in &wants {
        let got = config_value(&cfg, &w.sym);
        if got != w.value.as_deref() {
            let got = got.map_or(
                "unset (not defined, or dependencies unmet)".to_string(),
                |v| format!("{}={v}", w.sym),
            );
            missing.push(format!("  {}  ->  {got}", w.line));
        }
    }
    if !missing.is_empty() {
        // Remove the config so the next run does not mistake it for a good one.
        remove(&cfg_path)?;
        bail!(
            "config fragment lines did not survive olddefconfig:\n{}",
            missing.join("\n")
        );
    }
    note(&format!(
        "{} fragment lines verified, {} options =y",
        wants.len(),
        cfg.lines().filter(|l| l.ends_with("=y")).count()
    ));

    // Fail here, with the kernel's own explanation, rather than deep inside the build.
    let mut cmd = make(tree, dir, tc);
    cmd.arg("rustavailable");
    let log = dir.join("luo/rustavailable.log");
    let st = util::stream(&mut cmd, &log, |_| {})?;
    if !st.success() {
        remove(&cfg_path)?;
        bail!(
            "the kernel does not accept the Rust toolchain:\n{}",
            tail(&log, 30)
        );
    }
    Ok(())
}

/// `make bzImage headers` with a progress line: full output goes to `log`.
fn build(tree: &Path, dir: &Path, tc: &Toolchain, jobs: usize, log: &Path) -> Result<()> {
    let mut cmd = make(tree, dir, tc);
    cmd.arg(format!("-j{jobs}")).args(["bzImage", "headers"]);
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut steps = 0usize;
    let mut last_print = Instant::now();
    let mut printed = false;
    let dir_prefix = format!("{}/", dir.display());
    let status = util::stream(&mut cmd, log, |line| {
        // kbuild's quiet lines look like "  CC      kernel/fork.o".
        let is_step =
            line.starts_with("  ") && line[2..].starts_with(|c: char| c.is_ascii_uppercase());
        if !is_step {
            return;
        }
        steps += 1;
        let every = if tty {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(15)
        };
        if last_print.elapsed() >= every {
            last_print = Instant::now();
            // Paths inside O= are printed absolute for a few steps; shorten them.
            let what: String = line
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .replace(&dir_prefix, "");
            let msg = format!(
                "    [{:>4.0} s] {steps:>5} steps  {}",
                start.elapsed().as_secs_f64(),
                what.chars().take(60).collect::<String>()
            );
            if tty {
                eprint!("\r{msg:<90}");
            } else {
                eprintln!("{msg}");
            }
            printed = true;
        }
    })?;
    if tty && printed {
        eprintln!();
    }
    if !status.success() {
        bail!(
            "kernel build failed ({status}); last lines of {}:\n{}",
            log.display(),
            tail(log, 40)
        );
    }
    note(&format!(
        "make bzImage headers: {} s, {steps} steps (log {})",
        util::secs(start.elapsed()),
        log.display()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_expectations() {
        let w = expectations("# c\nCONFIG_A=y\nCONFIG_B=n\n# CONFIG_C is not set\nFOO=1\n");
        let got: Vec<(&str, Option<&str>)> = w
            .iter()
            .map(|w| (w.sym.as_str(), w.value.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("CONFIG_A", Some("y")),
                ("CONFIG_B", None),
                ("CONFIG_C", None)
            ]
        );
        let cfg = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_AB=m\n";
        assert_eq!(config_value(cfg, "CONFIG_A"), Some("y"));
        assert_eq!(config_value(cfg, "CONFIG_B"), None);
        assert_eq!(config_value(cfg, "CONFIG_C"), None);
    }
}
