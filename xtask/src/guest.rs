//! Guest userspace: the upstream selftest programs built from the kernel tree, and the
//! initramfs images that carry them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::kbuild::Kernel;
use crate::util::{self, bail, mkdirs, output, Context, Result};

/// Where the upstream LUO selftests live in the kernel tree.
pub(crate) const SELFTEST_DIR: &str = "tools/testing/selftests/liveupdate";

/// C library a guest program is linked against.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Libc {
    /// glibc, static: the kselftest harness (liveupdate.c) needs a real libc.
    Glibc,
    /// The kernel's own nolibc, exactly as vmtest.sh builds the kexec tests.
    Nolibc,
    /// nolibc with vmtest.sh's extra size flags for `init`.
    NolibcInit,
}

/// A guest program built from sources in the kernel tree (paths relative to it).
pub(crate) struct Program {
    pub(crate) name: &'static str,
    pub(crate) libc: Libc,
    pub(crate) sources: &'static [&'static str],
}

const LU_UTILS: &str = "tools/testing/selftests/liveupdate/lib/lu_utils.c";

/// Every guest program. A later in-VM benchmark is one more entry (its sources may then
/// live in the repository rather than the tree; `sources` would grow a root for that).
pub(crate) const PROGRAMS: &[Program] = &[
    Program {
        name: "liveupdate",
        libc: Libc::Glibc,
        sources: &["tools/testing/selftests/liveupdate/liveupdate.c", LU_UTILS],
    },
    Program {
        name: "luo_kexec_simple",
        libc: Libc::Nolibc,
        sources: &[
            "tools/testing/selftests/liveupdate/luo_kexec_simple.c",
            LU_UTILS,
        ],
    },
    Program {
        name: "luo_multi_session",
        libc: Libc::Nolibc,
        sources: &[
            "tools/testing/selftests/liveupdate/luo_multi_session.c",
            LU_UTILS,
        ],
    },
    Program {
        name: "luo_stress_files",
        libc: Libc::Nolibc,
        sources: &[
            "tools/testing/selftests/liveupdate/luo_stress_files.c",
            LU_UTILS,
        ],
    },
    Program {
        name: "luo_stress_sessions",
        libc: Libc::Nolibc,
        sources: &[
            "tools/testing/selftests/liveupdate/luo_stress_sessions.c",
            LU_UTILS,
        ],
    },
    Program {
        name: "init",
        libc: Libc::NolibcInit,
        sources: &["tools/testing/selftests/liveupdate/init.c"],
    },
];

/// Directory of built guest programs for one kernel build.
pub(crate) struct Bins {
    pub(crate) dir: PathBuf,
}

impl Bins {
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Build every program against the kernel's uapi headers; skip those whose inputs and
/// command line are unchanged since the last build.
pub(crate) fn build_programs(tree: &Path, kernel: &Kernel) -> Result<Bins> {
    let dir = kernel.dir.join("luo/bin");
    mkdirs(&dir)?;
    let st = tree.join(SELFTEST_DIR);
    let nolibc = tree.join("tools/include/nolibc");
    let mut built = Vec::new();
    for p in PROGRAMS {
        let out = dir.join(p.name);
        let mut cmd = Command::new("gcc");
        match p.libc {
            Libc::Glibc => {
                cmd.args([
                    "-static",
                    "-O2",
                    "-Wall",
                    "-Wno-unused-function",
                    "-isystem",
                ])
                .arg(&kernel.headers)
                .arg("-I")
                .arg(st.join("lib/include"));
            }
            Libc::Nolibc => {
                cmd.args(["-static", "-O2", "-nostdinc", "-nostdlib", "-I"])
                    .arg(&kernel.headers)
                    .arg("-I")
                    .arg(&nolibc)
                    .arg("-I")
                    .arg(st.join("lib/include"));
            }
            Libc::NolibcInit => {
                cmd.args([
                    "-s",
                    "-static",
                    "-Os",
                    "-nostdinc",
                    "-nostdlib",
                    "-fno-asynchronous-unwind-tables",
                    "-fno-ident",
                    "-fno-stack-protector",
                    "-I",
                ])
                .arg(&kernel.headers)
                .arg("-I")
                .arg(&nolibc);
            }
        }
        cmd.arg("-o").arg(&out);
        let mut inputs = vec![kernel.headers.clone(), st.join("lib/include")];
        if p.libc != Libc::Glibc {
            inputs.push(nolibc.clone());
        }
        for s in p.sources {
            cmd.arg(tree.join(s));
            inputs.push(tree.join(s));
        }
        let cmdline = util::describe(&cmd);
        let cmd_file = dir.join(format!("{}.cmd", p.name));
        let fresh = util::read_opt(&cmd_file).as_deref() == Some(cmdline.as_str())
            && util::mtime(&out).is_some_and(|t| t >= util::newest_mtime(&inputs));
        if fresh {
            continue;
        }
        output(&mut cmd).context(|| format!("cannot build guest program {}", p.name))?;
        util::write(&cmd_file, &cmdline)?;
        built.push(p.name);
    }
    if !built.is_empty() {
        util::note(&format!("built guest programs: {}", built.join(" ")));
    }
    Ok(Bins { dir })
}

/// One initramfs entry, in gen_init_cpio terms.
pub(crate) enum Entry {
    Dir(&'static str),
    /// `/dev/console`: without it init has no stdout.
    Console,
    File {
        guest: String,
        host: PathBuf,
        mode: u32,
    },
    Slink {
        guest: &'static str,
        target: &'static str,
    },
}

/// Pack `entries` into an uncompressed cpio with the kernel's own gen_init_cpio (as
/// vmtest.sh does), so no host cpio quirks (owners, device nodes) get in the way.
pub(crate) fn pack(gen_init_cpio: &Path, entries: &[Entry], out: &Path) -> Result<()> {
    let mut list = String::new();
    for e in entries {
        match e {
            Entry::Dir(d) => list.push_str(&format!("dir {d} 0755 0 0\n")),
            Entry::Console => list.push_str("nod /dev/console 0600 0 0 c 5 1\n"),
            Entry::File { guest, host, mode } => {
                if !host.is_file() {
                    bail!("initramfs input {} is missing", host.display());
                }
                list.push_str(&format!("file {guest} {} {mode:o} 0 0\n", host.display()));
            }
            Entry::Slink { guest, target } => {
                list.push_str(&format!("slink {guest} {target} 0777 0 0\n"));
            }
        }
    }
    let list_path = out.with_extension("list");
    util::write(&list_path, &list)?;
    let cpio = Command::new(gen_init_cpio)
        .arg(&list_path)
        .output()
        .context(|| format!("cannot run {}", gen_init_cpio.display()))?;
    if !cpio.status.success() {
        bail!(
            "gen_init_cpio {} failed: {}",
            list_path.display(),
            String::from_utf8_lossy(&cpio.stderr)
        );
    }
    util::write(out, &cpio.stdout)
}

/// `luod` and `luoctl` for the guest: a static glibc build of the workspace's `luod` crate
/// (`-C target-feature=+crt-static`, libc6-dev's libc.a), stripped into `dir`. cargo decides
/// what to rebuild; its target directory keeps the host builds apart (`--target`).
pub(crate) fn build_luod(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    const TARGET: &str = "x86_64-unknown-linux-gnu";
    let Some(root) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() else {
        bail!("xtask has no parent directory");
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "luod",
            "--target",
            TARGET,
        ])
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    output(&mut cmd).context(|| "cannot build luod for the guest".to_string())?;
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    mkdirs(dir)?;
    let mut out = Vec::new();
    for name in ["luod", "luoctl"] {
        let built = target_dir.join(TARGET).join("release").join(name);
        let dst = dir.join(name);
        output(Command::new("strip").arg("-o").arg(&dst).arg(&built))
            .context(|| format!("cannot strip {}", built.display()))?;
        let file = output(Command::new("file").arg("-b").arg(&dst)).unwrap_or_default();
        if file.contains("dynamically linked") {
            bail!("{} is not static: {}", dst.display(), file.trim());
        }
        out.push(dst);
    }
    Ok((out.remove(0), out.remove(0)))
}
