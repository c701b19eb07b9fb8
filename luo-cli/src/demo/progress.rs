//! Progress of the long steps (filling and verifying guest RAM) on stderr.

use std::io::IsTerminal;

use crate::size::format_ns;

/// Progress of a long step on stderr: a live percentage on a terminal, start and end lines
/// otherwise (logs and tests stay short).
pub(super) struct Progress {
    label: String,
    total: u64,
    shown: u64,
    tty: bool,
}

impl Progress {
    pub(super) fn new(label: String, total: u64) -> Self {
        let tty = std::io::stderr().is_terminal();
        if !tty {
            err!("{label}...\n");
        }
        Progress {
            label,
            total: total.max(1),
            shown: 0,
            tty,
        }
    }

    pub(super) fn update(&mut self, done: u64) {
        if !self.tty {
            return;
        }
        let pct = done * 100 / self.total;
        if pct >= self.shown + 5 {
            self.shown = pct;
            err!("\r{}: {pct:3}%", self.label);
        }
    }

    pub(super) fn done(self, took: u64) {
        if self.tty {
            err!("\r");
        }
        err!("{}: done in {}\n", self.label, format_ns(took));
    }
}
