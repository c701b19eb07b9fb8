//! Host prerequisites: Debian packages, rust-src matching rustc, bindgen.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::paths::{Paths, BINDGEN_VERSION, FOREIGN_SUITE, LIBCLANG_DIR, LIBCLANG_PKG};
use crate::util::{
    self, bail, first_line, mkdirs, note, output, remove, run, Context, Fnv, Result,
};

/// Install missing Debian packages (idempotent; a no-op costs one dpkg-query per package).
pub(crate) fn ensure_packages(paths: &Paths) -> Result<()> {
    run(&mut Command::new(paths.scripts().join("host-deps.sh")))
}

/// Everything that goes into the kernel build besides the source and the config.
pub(crate) struct Toolchain {
    pub(crate) rustc: PathBuf,
    pub(crate) rustdoc: PathBuf,
    pub(crate) rustc_release: String,
    rustc_verbose: String,
    pub(crate) rust_lib_src: PathBuf,
    pub(crate) rust_src_deb: String,
    bindgen_bin: PathBuf,
    pub(crate) bindgen: String,
    pub(crate) libclang: String,
    pub(crate) gcc: String,
    pub(crate) ld: String,
    /// `LUO_LLVM` (e.g. `-19`): build with `make LLVM=<it>` (clang, ld.lld) instead of gcc;
    /// KASAN with Rust needs a clang-built kernel. With the `clang --version` it names.
    llvm: Option<(String, String)>,
}

impl Toolchain {
    /// Resolve rustc, fetch the matching rust-src and bindgen into the cache if needed.
    pub(crate) fn ensure(paths: &Paths) -> Result<Self> {
        // Resolve the real rustc behind the rustup proxy once, so that the kernel is
        // built by exactly the compiler whose version we recorded (and whose rust-src
        // we fetched), whatever rust-toolchain files or overrides lie around later.
        let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))?;
        let sysroot = PathBuf::from(sysroot.trim());
        let rustc = sysroot.join("bin/rustc");
        let rustdoc = sysroot.join("bin/rustdoc");
        let rustc_verbose = output(Command::new(&rustc).arg("-vV"))?;
        let Some(release) = rustc_verbose
            .lines()
            .find_map(|l| l.strip_prefix("release: "))
            .map(str::trim)
        else {
            bail!("cannot parse `rustc -vV` output:\n{rustc_verbose}");
        };
        let rustc_release = release.to_string();

        let (rust_lib_src, rust_src_deb) = ensure_rust_src(paths, &rustc_release)?;
        let bindgen_bin = ensure_bindgen(paths)?;
        let bindgen = first_line(Command::new(bindgen_bin.join("bindgen")).arg("--version"));
        let libclang =
            first_line(Command::new("dpkg-query").args(["-W", "-f=${Version}", LIBCLANG_PKG]));
        Ok(Toolchain {
            rustc,
            rustdoc,
            rustc_release,
            rustc_verbose,
            rust_lib_src,
            rust_src_deb,
            bindgen_bin,
            bindgen,
            libclang: format!("{LIBCLANG_PKG} {libclang}"),
            gcc: first_line(Command::new("gcc").arg("--version")),
            ld: first_line(Command::new("ld").arg("--version")),
            llvm: env::var("LUO_LLVM")
                .ok()
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let clang = first_line(Command::new(format!("clang{l}")).arg("--version"));
                    (l, clang)
                }),
        })
    }

    /// Hash of every tool version that can change the kernel binary.
    pub(crate) fn key(&self) -> String {
        Fnv::new()
            .str(&self.rustc_verbose)
            .str(&self.rust_src_deb)
            .str(&self.bindgen)
            .str(&self.libclang)
            .str(&self.gcc)
            .str(&self.ld)
            .str(
                &self
                    .llvm
                    .as_ref()
                    .map_or(String::new(), |(l, c)| format!("llvm {l} {c}")),
            )
            .hex()
    }

    /// Human-readable versions, for the build info file and the report.
    pub(crate) fn describe(&self) -> Vec<(&'static str, String)> {
        let llvm = self
            .rustc_verbose
            .lines()
            .find_map(|l| l.strip_prefix("LLVM version: "))
            .unwrap_or("?");
        let mut v = vec![
            ("rustc", format!("{} (LLVM {llvm})", self.rustc_release)),
            ("rustc path", self.rustc.display().to_string()),
            (
                "rust-src",
                format!("Debian {} ({FOREIGN_SUITE})", self.rust_src_deb),
            ),
            ("bindgen", self.bindgen.clone()),
            ("libclang", self.libclang.clone()),
            ("gcc", self.gcc.clone()),
            ("ld", self.ld.clone()),
        ];
        if let Some((l, clang)) = &self.llvm {
            v.push(("LLVM", format!("LLVM={l}: {clang}")));
        }
        v
    }

    /// Environment and make variables for every kernel `make` call.
    pub(crate) fn apply(&self, cmd: &mut Command) {
        let mut path = OsString::from(&self.bindgen_bin);
        if let Some(p) = env::var_os("PATH") {
            path.push(":");
            path.push(p);
        }
        cmd.env("PATH", path)
            .env("RUST_LIB_SRC", &self.rust_lib_src)
            .env("LIBCLANG_PATH", LIBCLANG_DIR)
            // A parent `make` (CI wrappers) must not leak its jobserver or flags into
            // the kernel build, which picks its own -j.
            .env_remove("MAKEFLAGS")
            .env_remove("MFLAGS")
            .env_remove("MAKELEVEL")
            // HOSTRUSTC too: otherwise the proc macros are built by another rustc than
            // the crates that use them.
            .arg(format!("RUSTC={}", self.rustc.display()))
            .arg(format!("HOSTRUSTC={}", self.rustc.display()))
            .arg(format!("RUSTDOC={}", self.rustdoc.display()));
        if let Some((llvm, _)) = &self.llvm {
            cmd.arg(format!("LLVM={llvm}"));
        }
    }
}

/// The rustup toolchain here has no rust-src component and cannot download one, so take
/// the source of the same release from Debian. rustc and the library source must be the
/// exact same release: a mismatch passes `make rustavailable` but breaks `core.o`.
fn ensure_rust_src(paths: &Paths, release: &str) -> Result<(PathBuf, String)> {
    let marker = paths
        .toolchain()
        .join(format!("rust-src-{release}.deb-version"));
    let lib = paths
        .toolchain()
        .join(format!("rust-src-{release}/library"));
    if let Some(v) = util::read_opt(&marker) {
        if lib.join("core/src/lib.rs").is_file() {
            return Ok((lib, v.trim().to_string()));
        }
    }
    util::step(&format!("rust-src {release} from Debian {FOREIGN_SUITE}"));
    let deb = fetch_deb(paths, "rust-src", &["--upstream", release]).context(|| {
        format!(
            "rustc {release} needs rust-src of exactly that release (a mismatch breaks \
             rust/core.o); use a rustc that Debian {FOREIGN_SUITE} has rust-src for"
        )
    })?;
    let deb_version = deb_version_of(&deb, "rust-src")?;
    let tmp = paths.toolchain().join(format!("rust-src-{release}.tmp"));
    remove(&tmp)?;
    mkdirs(&tmp)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    let src_root = tmp.join("usr/src");
    let wanted = src_root.join(format!("rustc-{release}/library"));
    if !wanted.join("core/src/lib.rs").is_file() {
        let found: Vec<String> = std::fs::read_dir(&src_root)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        bail!(
            "rust-src {deb_version} does not match rustc {release}: expected \
             usr/src/rustc-{release}/library, the package has {found:?}. rustc and \
             rust-src must be the same release"
        );
    }
    // Keep only library/ (68 MB of the 432 MB unpacked); nothing else is used.
    let dest = lib.parent().map(Path::to_path_buf).unwrap_or_default();
    remove(&dest)?;
    mkdirs(&dest)?;
    std::fs::rename(&wanted, &lib).context(|| format!("cannot move {}", wanted.display()))?;
    remove(&tmp)?;
    util::write(&marker, &deb_version)?;
    note(&format!("rust-src {deb_version} -> {}", lib.display()));
    Ok((lib, deb_version))
}

/// bindgen-cli links no libclang (it is loaded at run time), so a `cargo install` into
/// the cache is enough and keeps the system untouched.
fn ensure_bindgen(paths: &Paths) -> Result<PathBuf> {
    let root = paths.toolchain().join(format!("bindgen-{BINDGEN_VERSION}"));
    let bin = root.join("bin");
    let have = first_line(Command::new(bin.join("bindgen")).arg("--version"));
    if have == format!("bindgen {BINDGEN_VERSION}") {
        return Ok(bin);
    }
    util::step(&format!(
        "cargo install bindgen-cli {BINDGEN_VERSION} (takes about 80 s)"
    ));
    mkdirs(&root)?;
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "bindgen-cli",
        "--version",
        BINDGEN_VERSION,
        "--locked",
        "--root",
    ])
    .arg(&root)
    // Outside the workspace, so its .cargo/config.toml and target dir stay out of it.
    .current_dir(paths.toolchain())
    .env_remove("CARGO_TARGET_DIR")
    .env_remove("RUSTFLAGS")
    .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run(&mut cmd)?;
    let have = first_line(Command::new(bin.join("bindgen")).arg("--version"));
    if have != format!("bindgen {BINDGEN_VERSION}") {
        bail!("cargo install bindgen-cli {BINDGEN_VERSION} produced `{have}`");
    }
    Ok(bin)
}

/// Download a package from [`FOREIGN_SUITE`] into the cache (see scripts/fetch-deb.sh).
pub(crate) fn fetch_deb(paths: &Paths, pkg: &str, version: &[&str]) -> Result<PathBuf> {
    mkdirs(&paths.cache)?;
    let mut cmd = Command::new(paths.scripts().join("fetch-deb.sh"));
    cmd.arg(&paths.cache)
        .arg(FOREIGN_SUITE)
        .arg(pkg)
        .args(version);
    let out =
        output(&mut cmd).context(|| format!("cannot fetch {pkg} from Debian {FOREIGN_SUITE}"))?;
    match out.lines().last() {
        Some(l) if !l.trim().is_empty() => Ok(PathBuf::from(l.trim())),
        _ => bail!("fetch-deb.sh printed no .deb path for {pkg}"),
    }
}

/// `pkg_1.2-3_all.deb` -> `1.2-3` (with an epoch's `%3a` decoded).
pub(crate) fn deb_version_of(deb: &Path, pkg: &str) -> Result<String> {
    let name = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(rest) = name.strip_prefix(&format!("{pkg}_")) else {
        bail!("unexpected .deb name {name}");
    };
    let Some((ver, _arch)) = rest.rsplit_once('_') else {
        bail!("unexpected .deb name {name}");
    };
    Ok(ver.replace("%3a", ":"))
}

/// Versions of the tools that run the tests (not part of the build key).
pub(crate) fn runtime_versions() -> Vec<(&'static str, String)> {
    vec![
        (
            "qemu",
            first_line(Command::new("qemu-system-x86_64").arg("--version")),
        ),
        ("busybox", {
            let b = first_line(Command::new("busybox").arg("--help"));
            b.split(" multi-call").next().unwrap_or(&b).to_string()
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb_versions() {
        let v = deb_version_of(
            Path::new("/x/rust-src_1.95.0+dfsg1-2~bpo13+1_all.deb"),
            "rust-src",
        );
        assert_eq!(v.ok().as_deref(), Some("1.95.0+dfsg1-2~bpo13+1"));
        let v = deb_version_of(Path::new("/x/foo_1%3a2.0-1_amd64.deb"), "foo");
        assert_eq!(v.ok().as_deref(), Some("1:2.0-1"));
        assert!(deb_version_of(Path::new("/x/bar_1.0_all.deb"), "foo").is_err());
    }
}
