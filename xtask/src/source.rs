//! The kernel source: Debian's linux-source package, unpacked once, plus the project's
//! patch series applied to a hard-link copy.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::host::fetch_deb;
use crate::paths::{Paths, LINUX_DEB_VERSION, LINUX_PKG, LINUX_TARBALL, LINUX_UPSTREAM};
use crate::util::{self, bail, mkdirs, note, output, path_safe, remove, run, Context, Fnv, Result};

/// The kernel tree a build uses and the state of what went into it.
pub(crate) struct Tree {
    pub(crate) path: PathBuf,
    /// Hash of the applied patch series (part of the build key).
    pub(crate) patches: String,
    /// Hash of the linked repository sources (see [`ensure_links`]).
    pub(crate) links: String,
}

/// Unpack the pinned linux-source package into `src/` (once) and return the tree.
pub(crate) fn ensure_pristine(paths: &Paths) -> Result<PathBuf> {
    let dir = paths
        .src()
        .join(format!("linux-{}", path_safe(LINUX_DEB_VERSION)));
    let stamp = dir.join(".luo-unpacked");
    if stamp.is_file() {
        return Ok(dir);
    }
    util::step(&format!("kernel source: {LINUX_PKG} {LINUX_DEB_VERSION}"));
    let deb = fetch_deb(paths, LINUX_PKG, &[LINUX_DEB_VERSION])?;
    let tmp = paths
        .src()
        .join(format!("linux-{}.tmp", path_safe(LINUX_DEB_VERSION)));
    remove(&tmp)?;
    remove(&dir)?;
    mkdirs(&tmp)?;
    // Stream the tarball out of the .deb instead of unpacking the .deb first: one pass,
    // no 160 MB intermediate file.
    let script = format!(
        "set -o pipefail; dpkg-deb --fsys-tarfile \"$1\" | tar -xO {LINUX_TARBALL} | tar -xJ -C \"$2\""
    );
    run(Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg("unpack")
        .arg(&deb)
        .arg(&tmp))
    .context(|| format!("cannot unpack {}", deb.display()))?;
    let entries: Vec<PathBuf> = fs::read_dir(&tmp)?.flatten().map(|e| e.path()).collect();
    let [top] = entries.as_slice() else {
        bail!(
            "{} should hold one top-level directory, it has {entries:?}",
            tmp.display()
        );
    };
    let version = makefile_version(top)?;
    if version != LINUX_UPSTREAM {
        bail!("{LINUX_PKG} {LINUX_DEB_VERSION} unpacked to Linux {version}, expected {LINUX_UPSTREAM}");
    }
    fs::rename(top, &dir)?;
    remove(&tmp)?;
    util::write(&stamp, LINUX_DEB_VERSION)?;
    note(&format!("unpacked Linux {version} -> {}", dir.display()));
    Ok(dir)
}

/// `VERSION.PATCHLEVEL.SUBLEVEL` from the top-level Makefile.
pub(crate) fn makefile_version(tree: &Path) -> Result<String> {
    let mk = fs::read_to_string(tree.join("Makefile"))
        .context(|| format!("cannot read {}/Makefile", tree.display()))?;
    let get = |k: &str| {
        mk.lines()
            .find_map(|l| {
                l.strip_prefix(k)
                    .map(|v| v.trim_start_matches([' ', '=']).trim().to_string())
            })
            .unwrap_or_default()
    };
    Ok(format!(
        "{}.{}.{}",
        get("VERSION"),
        get("PATCHLEVEL"),
        get("SUBLEVEL")
    ))
}

/// The project's kernel patch series (`backend-linux/kernel/patches/*.patch`).
pub(crate) struct Patches {
    pub(crate) files: Vec<PathBuf>,
    texts: Vec<String>,
    pub(crate) hash: String,
}

impl Patches {
    pub(crate) fn load(dir: &Path) -> Result<Self> {
        let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "patch"))
                .collect(),
            Err(_) => Vec::new(),
        };
        files.sort();
        let mut h = Fnv::new();
        let mut texts = Vec::new();
        for f in &files {
            let t = fs::read_to_string(f).context(|| format!("cannot read {}", f.display()))?;
            h.str(&f.file_name().unwrap_or_default().to_string_lossy())
                .str(&t);
            texts.push(t);
        }
        Ok(Patches {
            files,
            texts,
            hash: h.hex(),
        })
    }

    /// Does some patch add `config SYM` to a Kconfig file?
    pub(crate) fn defines_kconfig(&self, sym: &str) -> bool {
        let want = format!("config {sym}");
        self.texts.iter().any(|t| {
            t.lines()
                .filter_map(|l| l.strip_prefix('+'))
                .any(|l| l.trim() == want)
        })
    }

    /// Every path (relative to the tree) the series creates, modifies or deletes.
    fn touched(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for t in &self.texts {
            for l in t.lines() {
                let Some(p) = l.strip_prefix("--- ").or_else(|| l.strip_prefix("+++ ")) else {
                    continue;
                };
                // `a/path\tdate` -> `path`, as `patch -p1` sees it.
                let p = p.split('\t').next().unwrap_or("").trim();
                if p == "/dev/null" {
                    continue;
                }
                if let Some((_, rest)) = p.split_once('/') {
                    if !rest.is_empty() && !rest.split('/').any(|c| c == "..") {
                        out.insert(rest.to_string());
                    }
                }
            }
        }
        out
    }
}

/// A patched tree that shares unmodified files with the pristine one by hard links.
///
/// The tree keeps its path across patch changes, so kernel build directories stay valid
/// and rebuild only what changed: files touched by the old series are replaced by fresh
/// copies from the pristine tree (new mtime, so make notices even a revert), then the
/// new series is applied to files whose links were broken first.
pub(crate) fn ensure_tree(paths: &Paths, pristine: &Path, patches: &Patches) -> Result<PathBuf> {
    let name = pristine.file_name().unwrap_or_default();
    let tree = paths.tree().join(name);
    let state_file = paths
        .tree()
        .join(format!("{}.patches", name.to_string_lossy()));
    if !tree.join("Makefile").is_file() {
        util::step("hard-link copy of the kernel source for patching");
        mkdirs(&paths.tree())?;
        let tmp = tree.with_extension("tmp");
        remove(&tmp)?;
        remove(&tree)?;
        run(Command::new("cp").arg("-al").arg(pristine).arg(&tmp))?;
        fs::rename(&tmp, &tree)?;
        util::write(&state_file, format!("hash {}\n", Patches::empty_hash()))?;
    }
    let state = util::read_opt(&state_file).unwrap_or_default();
    let old_hash = state
        .lines()
        .find_map(|l| l.strip_prefix("hash "))
        .unwrap_or("");
    if old_hash == patches.hash {
        return Ok(tree);
    }
    util::step(&format!(
        "patch series changed ({} patches): re-applying to {}",
        patches.files.len(),
        tree.display()
    ));
    // Revert whatever the previous series (or a half-applied one) touched.
    for f in state.lines().filter_map(|l| l.strip_prefix("file ")) {
        restore_from(pristine, &tree, f)?;
    }
    let touched = patches.touched();
    // Record the files before patching, so that a failing patch is still reverted on
    // the next run.
    let mut st = String::from("hash (partial)\n");
    for f in &touched {
        st.push_str(&format!("file {f}\n"));
    }
    util::write(&state_file, &st)?;
    for f in &touched {
        break_link(&tree.join(f))?;
    }
    for p in &patches.files {
        note(&format!("applying {}", p.display()));
        let out = output(
            Command::new("patch")
                .args([
                    "-p1",
                    "--forward",
                    "--batch",
                    "--no-backup-if-mismatch",
                    "-d",
                ])
                .arg(&tree)
                .arg("-i")
                .arg(p),
        );
        if let Err(e) = out {
            bail!(
                "patch {} does not apply to {LINUX_PKG} {LINUX_DEB_VERSION}: {e}",
                p.display()
            );
        }
    }
    util::write(
        &state_file,
        st.replace("hash (partial)", &format!("hash {}", patches.hash)),
    )?;
    Ok(tree)
}

impl Patches {
    fn empty_hash() -> String {
        Fnv::new().hex()
    }
}

/// Put back the pristine version of `rel` (as a fresh copy), or delete it if the
/// pristine tree does not have it (the series had created it).
fn restore_from(pristine: &Path, tree: &Path, rel: &str) -> Result<()> {
    let dst = tree.join(rel);
    remove(&dst)?;
    let src = pristine.join(rel);
    if src.is_file() {
        fs::copy(&src, &dst).context(|| format!("cannot restore {}", dst.display()))?;
    }
    Ok(())
}

/// Replace a hard link by a private copy so that patching it leaves the pristine tree
/// (and every other link) alone, whatever way the patch tool writes files.
fn break_link(path: &Path) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let tmp = path.with_extension("luo-unlink");
    fs::copy(path, &tmp).context(|| format!("cannot copy {}", path.display()))?;
    fs::rename(&tmp, path).context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

/// Create the symlinks listed in `backend-linux/kernel/tree-links` and return a hash of
/// what they point at (paths, sizes and mtimes of every file below them). Skipping a
/// no-op make is only safe while that hash is unchanged, because these sources live
/// outside the build key.
pub(crate) fn ensure_links(paths: &Paths, tree: &Path) -> Result<String> {
    let list = paths.kernel_dir().join("tree-links");
    let text = util::read_opt(&list).unwrap_or_default();
    let mut h = Fnv::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [in_tree, in_repo] = fields.as_slice() else {
            bail!(
                "{}:{}: expected `<tree path> <repo path>`",
                list.display(),
                n + 1
            );
        };
        if in_tree.split('/').any(|c| c == ".." || c.is_empty()) || in_tree.starts_with('/') {
            bail!("{}:{}: bad tree path `{in_tree}`", list.display(), n + 1);
        }
        let target = paths.repo.join(in_repo);
        let link = tree.join(in_tree);
        if !target.is_dir() {
            // Not written yet (the Rust core arrives in stages); nothing refers to it then.
            if fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
                remove(&link)?;
            }
            continue;
        }
        let current = fs::read_link(&link).ok();
        if current.as_deref() != Some(target.as_path()) {
            if fs::symlink_metadata(&link).is_ok() {
                if !fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
                    bail!(
                        "{} exists in the kernel tree and is not a symlink; \
                         tree-links must name new paths",
                        link.display()
                    );
                }
                remove(&link)?;
            }
            if let Some(parent) = link.parent() {
                mkdirs(parent)?;
            }
            std::os::unix::fs::symlink(&target, &link)
                .context(|| format!("cannot link {} -> {}", link.display(), target.display()))?;
            note(&format!("linked {in_tree} -> {}", target.display()));
        }
        h.str(in_tree).str(&target.display().to_string());
        hash_tree(&target, &mut h);
    }
    Ok(h.hex())
}

/// Fold every file's relative path, size and mtime below `dir` into `h`, in sorted order.
fn hash_tree(dir: &Path, h: &mut Fnv) {
    let mut stack = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(_) => files.push(p),
                Err(_) => {}
            }
        }
    }
    files.sort();
    for f in files {
        let rel = f.strip_prefix(dir).unwrap_or(&f).display().to_string();
        let meta = fs::metadata(&f).ok();
        let stamp = meta.map(|m| format!("{} {:?}", m.len(), m.modified().ok()));
        h.str(&rel).str(&stamp.unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_files_and_kconfig() {
        let p = Patches {
            files: Vec::new(),
            texts: vec![
                "--- a/kernel/x.c\t2026\n+++ b/kernel/x.c\t2026\n@@\n+config LIVEUPDATE_RUST\n\
                 --- /dev/null\n+++ b/new/file.rs\n--- a/../etc/passwd\n"
                    .to_string(),
            ],
            hash: String::new(),
        };
        let t: Vec<String> = p.touched().into_iter().collect();
        assert_eq!(t, ["kernel/x.c", "new/file.rs"]);
        assert!(p.defines_kconfig("LIVEUPDATE_RUST"));
        assert!(!p.defines_kconfig("LIVEUPDATE"));
    }
}
