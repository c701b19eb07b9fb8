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
//!
//! One file per part: the two images (`old_image`, `new_image`), what passes between them
//! besides the memfds (`handoff`), the workload threads (`workers`), verification (`verify`),
//! `--dump` (`dump`) and the progress lines (`progress`); options are parsed here.
//!
//! [`LiveUpdate::reboot`]: backend_user::LiveUpdate::reboot

mod dump;
mod handoff;
mod new_image;
mod old_image;
mod progress;
mod verify;
mod workers;

use std::ffi::OsString;
use std::path::PathBuf;

use backend_user::sys;

use crate::CliError;

pub use handoff::{DemoState, Times};
pub use new_image::stage2;
pub use old_image::run;

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

fn now() -> u64 {
    sys::monotonic_ns()
}

fn fail(msg: impl Into<String>) -> CliError {
    CliError::fail(msg)
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
