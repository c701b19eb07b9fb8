//! Where things live: the repository, the cache, and the pinned versions.

use std::env;
use std::path::{Path, PathBuf};

use crate::util::{bail, Result};

/// Debian suite that carries the kernel source and a rust-src matching rustup's rustc.
/// Only `apt-get download` + unpack is done from it; nothing is installed.
pub(crate) const FOREIGN_SUITE: &str = "trixie-backports";
/// The kernel source package and the exact version every result in docs/kernel.md
/// was measured with. Bump both together, deliberately.
pub(crate) const LINUX_PKG: &str = "linux-source-7.3";
pub(crate) const LINUX_DEB_VERSION: &str = "7.3.4-1~bpo13+1";
/// What the tree's top-level Makefile must say (VERSION.PATCHLEVEL.SUBLEVEL).
pub(crate) const LINUX_UPSTREAM: &str = "7.3.4";
/// The tarball inside the .deb.
pub(crate) const LINUX_TARBALL: &str = "./usr/src/linux-source-7.3.tar.xz";
/// Kernel 7.3 checks bindgen's version; this one is known to work (docs/kernel.md).
pub(crate) const BINDGEN_VERSION: &str = "0.71.1";
/// Bookworm's libclang 19; the default libclang 14 is older than the kernel's minimum
/// (17.0.1). Pointing bindgen at it explicitly keeps other installed versions out.
pub(crate) const LIBCLANG_DIR: &str = "/usr/lib/llvm-19/lib";
pub(crate) const LIBCLANG_PKG: &str = "libclang1-19";
/// Default cache root; `LUO_CACHE` overrides it.
const DEFAULT_CACHE: &str = "/var/cache/luo";

pub(crate) struct Paths {
    /// Workspace root.
    pub(crate) repo: PathBuf,
    /// Cache root (`LUO_CACHE`).
    pub(crate) cache: PathBuf,
}

impl Paths {
    pub(crate) fn new() -> Result<Self> {
        // The xtask crate sits directly under the workspace root; the path is baked in
        // at compile time, so the command works from any directory.
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let Some(repo) = manifest.parent() else {
            bail!(
                "cannot locate the workspace root above {}",
                manifest.display()
            );
        };
        let cache = match env::var_os("LUO_CACHE") {
            Some(c) if !c.is_empty() => PathBuf::from(c),
            _ => PathBuf::from(DEFAULT_CACHE),
        };
        let cache = if cache.is_absolute() {
            cache
        } else {
            env::current_dir()?.join(cache)
        };
        Ok(Paths {
            repo: repo.to_path_buf(),
            cache,
        })
    }

    pub(crate) fn scripts(&self) -> PathBuf {
        self.repo.join("xtask/scripts")
    }

    /// `backend-linux/kernel`: config fragments and the patch series.
    pub(crate) fn kernel_dir(&self) -> PathBuf {
        self.repo.join("backend-linux/kernel")
    }

    pub(crate) fn toolchain(&self) -> PathBuf {
        self.cache.join("toolchain")
    }

    /// Pristine unpacked sources, one directory per Debian version.
    pub(crate) fn src(&self) -> PathBuf {
        self.cache.join("src")
    }

    /// Patched working trees (hard-link copies of `src/`).
    pub(crate) fn tree(&self) -> PathBuf {
        self.cache.join("tree")
    }

    /// Kernel build (`O=`) directories, one per build key; `--clean` wipes this.
    pub(crate) fn build(&self) -> PathBuf {
        self.cache.join("build")
    }

    /// Per-run logs (serial logs, build logs, the TAP summary).
    pub(crate) fn logs(&self) -> PathBuf {
        self.cache.join("logs")
    }
}
