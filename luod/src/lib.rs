//! luod, the live-update agent, and luoctl, its command line.
//!
//! `/dev/liveupdate` admits one opener, and preserved state survives a kexec only while some
//! process holds its session fd (spec §3.2). luod is that process: it owns the device, creates
//! sessions for clients in a per-uid namespace (`"<uid>/<name>"`), hands each client its
//! session fd over a Unix socket (`SCM_RIGHTS`), keeps a copy of every fd so clients may crash
//! and come back, and runs updates: load the next kernel, wait for every registered client at
//! the barrier, reboot. After the reboot it restores the sessions listed in its own manifest
//! and hands each back to the uid that created it. See `docs/luod.md`.

#![deny(unsafe_code)]

pub mod ctl;
pub mod daemon;
pub mod logging;
pub mod manifest;
pub mod options;
mod state;
pub mod systemd;
mod update;

pub use daemon::Daemon;
