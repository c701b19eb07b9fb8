//! luod's one way to log: a line to stderr, written with `write_all`, errors ignored.
//!
//! `eprintln!` panics when stderr is broken (`EPIPE` from a dead journal or tee, `ENOSPC`),
//! and a panic in a connection thread loses the reply, in the update path leaves the phase at
//! "rebooting", in the accept loop ends luod. A log line is never worth that: if it cannot be
//! written it is dropped. SIGPIPE is ignored (Rust's runtime already does; luod says so
//! itself, [`ignore_sigpipe`]), so a broken pipe is an error return, never a signal.

use std::fmt;
use std::io::Write;

/// Writes `luod[pid]: <line>\n` to stderr in one `write_all`; a failure is ignored.
pub fn line(args: fmt::Arguments<'_>) {
    let s = format!("luod[{}]: {args}\n", std::process::id());
    let _ = std::io::stderr().lock().write_all(s.as_bytes());
}

/// Writes `text` to stdout and flushes it; the error, if any, for the caller to report.
pub fn stdout(text: &str) -> std::io::Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(text.as_bytes())?;
    o.flush()
}

/// Writes `text` to stderr, ignoring a failure (there is nowhere left to report it).
pub fn stderr(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Sets SIGPIPE to ignored, so writes to a closed pipe or socket fail with `EPIPE`.
pub fn ignore_sigpipe() {
    luo_client::sys::ignore_sigpipe();
}

/// Logs a line to stderr (journald adds the timestamp); never panics.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::logging::line(format_args!($($arg)*))
    };
}
pub(crate) use log;
