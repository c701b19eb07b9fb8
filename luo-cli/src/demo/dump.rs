//! `luo demo --dump FILE`: the handover image, written to a file for `luo inspect`.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use backend_user::sys;

use super::{fail, CHUNK_PAGES};
use crate::pattern::PAGE;
use crate::size::format_size;
use crate::CliError;

/// The `--dump` target: opened at the start, filled with zeros up to the image's size before
/// the cut (so a full disk refuses the update while nothing is lost yet), and overwritten with
/// the image after it. A regular file, or a character device (`/dev/null`); anything else is
/// refused without opening it for long: a FIFO is opened non-blocking, never waiting for a
/// reader.
pub(super) struct Dump {
    pub(super) path: PathBuf,
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
    pub(super) fn open(p: &Path) -> Result<Dump, CliError> {
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
    pub(super) fn reserve(&mut self, len: u64) -> Result<(), String> {
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
    pub(super) fn write(&mut self, handover: &OwnedFd) -> std::io::Result<()> {
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
