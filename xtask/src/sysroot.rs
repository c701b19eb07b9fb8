//! The `systemd_luo` VM's disks: a cached Debian sid root with systemd 262 and its
//! integration tests (`scripts/sysroot.sh`), and per run an EFI system partition holding the
//! kernel and the Boot Loader Specification entry that `systemctl kexec` loads.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::paths::Paths;
use crate::util::{self, bail, mkdirs, output, run, step, Context, Fnv, Result};

/// What the root needs (issue: systemd's TEST-91-LIVEUPDATE as its harness runs it). The
/// systemd packages are pinned: TEST-91 and its helpers are the version under test.
/// The rest comes at sid's current version; `packages` in the cache directory records it.
pub(crate) const ROOT_PACKAGES: &str = "systemd=262.1-1 systemd-sysv=262.1-1 udev=262.1-1 \
     libsystemd0=262.1-1 libsystemd-shared=262.1-1 libpam-systemd=262.1-1 \
     systemd-container=262.1-1 systemd-tests=262.1-1 dbus jq kexec-tools util-linux bash";
/// systemd's mkosi "minimal-base" image (mkosi.images/minimal-base, Debian): what
/// create_dummy_container copies for the nspawn case.
pub(crate) const TEMPLATE_PACKAGES: &str = "bash grep socat util-linux coreutils \
     bsdextrautils hostname iproute2 mount ncat libsystemd0=262.1-1 libudev1=262.1-1";

/// The cached root filesystem image (ext4, booted read-write from a per-run copy).
pub(crate) struct Sysroot {
    pub(crate) image: PathBuf,
    /// Whether this call built it (cold) or found it in the cache.
    pub(crate) built: bool,
}

/// Build the root image unless the cache has one for the same scripts and package lists.
pub(crate) fn ensure(paths: &Paths) -> Result<Sysroot> {
    let script = paths.scripts().join("sysroot.sh");
    let text =
        fs::read_to_string(&script).context(|| format!("cannot read {}", script.display()))?;
    // And the files sysroot.sh sources or installs into the root.
    let mut key = Fnv::new();
    key.str(&text);
    for f in ["mirror.sh", "kmemleak-scan.sh"] {
        let p = paths.scripts().join(f);
        key.str(&fs::read_to_string(&p).context(|| format!("cannot read {}", p.display()))?);
    }
    let key = key.str(ROOT_PACKAGES).str(TEMPLATE_PACKAGES).hex();
    let dir = paths.cache.join("sysroot").join(&key);
    let image = dir.join("root.ext4");
    if image.is_file() {
        return Ok(Sysroot {
            image,
            built: false,
        });
    }
    step(&format!(
        "Debian sid root for systemd_luo: {}",
        dir.display()
    ));
    mkdirs(&dir)?;
    run(Command::new(&script)
        .arg(&dir)
        .arg(ROOT_PACKAGES)
        .arg(TEMPLATE_PACKAGES))
    .context(|| "building the sid root filesystem (xtask/scripts/sysroot.sh) failed".to_string())?;
    if !image.is_file() {
        bail!("{} did not produce {}", script.display(), image.display());
    }
    // Older roots (another script or package set) are 0.5 GB each and never used again.
    if let Ok(rd) = fs::read_dir(paths.cache.join("sysroot")) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy() != key {
                let _ = util::remove(&e.path());
            }
        }
    }
    Ok(Sysroot { image, built: true })
}

/// The ESP's partition type (UEFI spec), which systemd checks before it trusts /efi.
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// ESP size and where it starts on the disk, in 512-byte sectors.
const ESP_START: u64 = 2048;
const ESP_SECTORS: u64 = 64 * 2048;

/// A GPT disk whose only partition is an EFI system partition (vfat) with `kernel` as
/// `/vmlinuz-luo` and the Boot Loader Specification entry `/loader/entries/luo.conf`
/// naming it. The entry has no `options`: TEST-91 passes the whole command line itself
/// (`systemctl kexec --kernel-cmdline="$(cat /proc/cmdline) luo_nboot=1"`).
pub(crate) fn esp_disk(kernel: &Path, title: &str, out: &Path) -> Result<()> {
    let part = out.with_extension("esp.tmp");
    let _ = fs::remove_file(&part);
    let _ = fs::remove_file(out);
    run(Command::new("mkfs.vfat")
        .args(["-n", "ESP", "-C"])
        .arg(&part)
        .arg((ESP_SECTORS / 2).to_string()))?;
    let img = |cmd: &str| {
        let mut c = Command::new(cmd);
        c.arg("-i").arg(&part);
        c
    };
    run(img("mmd").args(["::/loader", "::/loader/entries"]))?;
    run(img("mcopy").arg(kernel).arg("::/vmlinuz-luo"))?;
    let entry = out.with_extension("entry.tmp");
    util::write(&entry, format!("title {title}\nlinux /vmlinuz-luo\n"))?;
    run(img("mcopy").arg(&entry).arg("::/loader/entries/luo.conf"))?;
    let _ = fs::remove_file(&entry);

    // The disk: GPT, the ESP at 1 MiB, room for the backup table at the end.
    let disk_bytes = (ESP_START + ESP_SECTORS + 2048) * 512;
    let f = fs::File::create(out).context(|| format!("cannot create {}", out.display()))?;
    f.set_len(disk_bytes)?;
    drop(f);
    let layout =
        format!("label: gpt\nstart={ESP_START}, size={ESP_SECTORS}, type={ESP_TYPE}, name=esp\n");
    let mut sfdisk = Command::new("sfdisk");
    sfdisk
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(out);
    util::output_with_stdin(&mut sfdisk, layout.as_bytes())?;
    run(Command::new("dd")
        .arg(format!("if={}", part.display()))
        .arg(format!("of={}", out.display()))
        .args(["bs=512", "conv=notrunc,sparse", "status=none"])
        .arg(format!("seek={ESP_START}")))?;
    let _ = fs::remove_file(&part);
    Ok(())
}

/// A private copy of the cached root for one VM run (the VM writes to it; the cache
/// stays pristine). Sparse, so it costs only what the root holds.
pub(crate) fn copy_root(root: &Path, out: &Path) -> Result<()> {
    let _ = fs::remove_file(out);
    run(Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(root)
        .arg(out))
}

/// What a file in the (unmounted) ext4 image is: `None` if absent, else its contents
/// (empty for an empty file). Read with e2fsprogs' debugfs, as systemd's harness reads
/// `/testok` and `/failed` from the image after the VM is gone.
pub(crate) fn read_file(image: &Path, path: &str) -> Result<Option<String>> {
    let stat = Command::new("debugfs")
        .args(["-R", &format!("stat {path}")])
        .arg(image)
        .output()
        .context(|| "cannot run debugfs (e2fsprogs)".to_string())?;
    let err = String::from_utf8_lossy(&stat.stderr);
    if err.contains("File not found") {
        return Ok(None);
    }
    let data = output(
        Command::new("debugfs")
            .args(["-R", &format!("cat {path}")])
            .arg(image),
    )?;
    Ok(Some(data))
}

/// The systemd journal that the VM left on the root disk, one text per boot, oldest
/// first (`journalctl -o short-monotonic`). systemd's harness learns the test's exit status
/// from PID 1 over AF_VSOCK (`EXIT_STATUS=`), which needs the host's vhost-vsock; here the
/// same facts are read from the journal instead (docs/systemd.md). The journal directory is
/// copied to `out` and each boot written to `out/journal-<n>.txt` for a look after a failure.
pub(crate) fn journal(image: &Path, out: &Path) -> Result<Vec<String>> {
    let _ = util::remove(out);
    mkdirs(out)?;
    // rdump copies /var/log/journal as out/journal/<machine id>/*.journal.
    output(
        Command::new("debugfs")
            .args(["-R", &format!("rdump /var/log/journal {}", out.display())])
            .arg(image),
    )?;
    let dir = out.join("journal");
    let jctl = |args: &[&str]| {
        output(
            Command::new("journalctl")
                .arg("-D")
                .arg(&dir)
                .args(["--no-pager", "-q"])
                .args(args),
        )
    };
    let list = jctl(&["--list-boots"])?;
    // " -1 <boot id> <first entry> <last entry>", oldest first.
    let ids: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    let mut boots = Vec::new();
    for (n, id) in ids.iter().enumerate() {
        let text = jctl(&["-b", id, "-o", "short-monotonic"])?;
        util::write(&out.join(format!("journal-{}.txt", n + 1)), &text)?;
        boots.push(text);
    }
    Ok(boots)
}

/// Puts host files into the (unmounted) ext4 image with debugfs, without mounting it:
/// `dirs` are created first (parents before children), then each `(host, guest path, mode)`
/// is written and given `mode` (regular file), owned by root. Each file is checked
/// afterwards, since debugfs reports a failed command on stderr but still exits 0.
pub(crate) fn install(image: &Path, dirs: &[&str], files: &[(&Path, &str, u32)]) -> Result<()> {
    let mut script = String::new();
    for d in dirs {
        script.push_str(&format!("mkdir {d}\n"));
    }
    for (host, guest, mode) in files {
        if !host.is_file() {
            bail!("{} (for {guest} in the root) is missing", host.display());
        }
        script.push_str(&format!(
            "write {} {guest}\nsif {guest} mode 0{:o}\nsif {guest} uid 0\nsif {guest} gid 0\n",
            host.display(),
            0o100000 | mode
        ));
    }
    let cmds = image.with_extension("debugfs");
    util::write(&cmds, &script)?;
    output(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&cmds)
            .arg(image),
    )?;
    let _ = fs::remove_file(&cmds);
    for (host, guest, _) in files {
        let want = fs::metadata(host)?.len();
        let stat = output(
            Command::new("debugfs")
                .args(["-R", &format!("stat {guest}")])
                .arg(image),
        )?;
        if !stat.contains(&format!("Size: {want}")) {
            bail!(
                "debugfs did not write {guest} ({want} bytes) into {}: {}",
                image.display(),
                stat.lines().next().unwrap_or("no such file")
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `install` on a small ext4 image made with `mke2fs -d` (skipped without e2fsprogs):
    /// files land with their bytes, mode and root as owner; a missing host file is an error.
    #[test]
    fn install_writes_files_into_an_unmounted_image() {
        if Command::new("mke2fs").arg("-V").output().is_err()
            || Command::new("debugfs").arg("-V").output().is_err()
        {
            eprintln!("SKIP: no e2fsprogs (mke2fs, debugfs)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("xtask-install-{}", std::process::id()));
        let _ = util::remove(&dir);
        let tree = dir.join("tree");
        mkdirs(&tree.join("etc")).unwrap();
        let img = dir.join("root.ext4");
        output(
            Command::new("mke2fs")
                .args(["-q", "-F", "-t", "ext4", "-d"])
                .arg(&tree)
                .arg(&img)
                .arg("8M"),
        )
        .unwrap();
        let script = dir.join("t.sh");
        util::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        let unit = dir.join("u.service");
        util::write(&unit, "[Unit]\n").unwrap();
        install(
            &img,
            &["/usr", "/usr/lib"],
            &[
                (script.as_path(), "/usr/lib/t.sh", 0o755),
                (unit.as_path(), "/etc/u.service", 0o644),
            ],
        )
        .unwrap();
        assert_eq!(
            read_file(&img, "/usr/lib/t.sh").unwrap().as_deref(),
            Some("#!/bin/sh\necho hi\n")
        );
        let stat = output(
            Command::new("debugfs")
                .args(["-R", "stat /usr/lib/t.sh"])
                .arg(&img),
        )
        .unwrap();
        assert!(stat.contains("Mode:  0755"), "{stat}");
        assert!(stat.contains("User:     0"), "{stat}");
        assert_eq!(
            read_file(&img, "/etc/u.service").unwrap().as_deref(),
            Some("[Unit]\n")
        );
        assert!(install(&img, &[], &[(&dir.join("nope"), "/nope", 0o644)]).is_err());
        // A path debugfs cannot write (no such directory) is caught by the check.
        assert!(install(&img, &[], &[(unit.as_path(), "/no/such/dir/u", 0o644)]).is_err());
        let _ = util::remove(&dir);
    }
}
