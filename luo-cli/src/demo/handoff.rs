//! What the old image hands the new one besides the memfds themselves: its timestamps, on the
//! command line, and the workload's state at the cut, in the state memfd.

use crate::pattern::PAGE;

/// CLOCK_MONOTONIC timestamps (ns) the old image hands to the new one on its command line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Times {
    /// Filling RAM started.
    pub fill_start: u64,
    /// Filling RAM ended.
    pub fill_end: u64,
    /// LUO setup and preservation started (the workload running).
    pub preserve_start: u64,
    /// Both memfds preserved.
    pub preserve_end: u64,
    /// The last write of the old image completed: the blackout starts.
    pub last_write: u64,
    /// The workload state was saved into the state memfd.
    pub save_end: u64,
    /// `LiveUpdate::reboot` started.
    pub reboot_start: u64,
    /// `LiveUpdate::reboot` returned the handover memfd.
    pub reboot_end: u64,
    /// The handover dump was written (0 without `--dump`).
    pub dump_end: u64,
    /// Just before `execve`.
    pub exec: u64,
}

const TIME_KEYS: [&str; 10] = [
    "fill_start",
    "fill_end",
    "preserve_start",
    "preserve_end",
    "last_write",
    "save_end",
    "reboot_start",
    "reboot_end",
    "dump_end",
    "exec",
];

impl Times {
    fn fields(&self) -> [u64; 10] {
        [
            self.fill_start,
            self.fill_end,
            self.preserve_start,
            self.preserve_end,
            self.last_write,
            self.save_end,
            self.reboot_start,
            self.reboot_end,
            self.dump_end,
            self.exec,
        ]
    }

    /// `key=ns,key=ns,...`.
    pub fn encode(&self) -> String {
        TIME_KEYS
            .iter()
            .zip(self.fields())
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Parses [`Times::encode`]'s output; every key is required.
    pub fn decode(s: &str) -> Result<Times, String> {
        let mut v = [None::<u64>; 10];
        for item in s.split(',') {
            let (k, n) = item
                .split_once('=')
                .ok_or_else(|| format!("'{item}' is not key=value"))?;
            let i = TIME_KEYS
                .iter()
                .position(|&key| key == k)
                .ok_or_else(|| format!("unknown time '{k}'"))?;
            v[i] = Some(n.parse().map_err(|_| format!("'{n}' is not a time"))?);
        }
        let mut f = [0u64; 10];
        for (i, slot) in v.iter().enumerate() {
            f[i] = slot.ok_or_else(|| format!("missing time '{}'", TIME_KEYS[i]))?;
        }
        Ok(Times {
            fill_start: f[0],
            fill_end: f[1],
            preserve_start: f[2],
            preserve_end: f[3],
            last_write: f[4],
            save_end: f[5],
            reboot_start: f[6],
            reboot_end: f[7],
            dump_end: f[8],
            exec: f[9],
        })
    }
}

/// What the old image saves in the state memfd at the cut: all the verifier needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoState {
    /// Guest RAM bytes.
    pub ram: u64,
    /// The last generation written (generations `1..=last_gen` were written in order).
    pub last_gen: u64,
    /// Wrapping sum of every page's checksum.
    pub checksum: u64,
    /// Page writes of the old image's worker after the fill.
    pub writes: u64,
    /// CLOCK_MONOTONIC of the last write.
    pub last_write: u64,
}

const STATE_MAGIC: &[u8; 8] = b"LUODEMO1";
pub(super) const STATE_LEN: usize = 56;

impl DemoState {
    pub(super) fn to_bytes(self) -> [u8; STATE_LEN] {
        let mut b = [0u8; STATE_LEN];
        b[..8].copy_from_slice(STATE_MAGIC);
        let words = [
            PAGE as u64,
            self.ram,
            self.last_gen,
            self.checksum,
            self.writes,
            self.last_write,
        ];
        for (i, w) in words.iter().enumerate() {
            b[8 + i * 8..16 + i * 8].copy_from_slice(&w.to_ne_bytes());
        }
        b
    }

    pub(super) fn from_bytes(b: &[u8; STATE_LEN]) -> Result<DemoState, String> {
        if &b[..8] != STATE_MAGIC {
            return Err("the state memfd does not hold a luo demo state".into());
        }
        let w = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[8 + i * 8..16 + i * 8]);
            u64::from_ne_bytes(x)
        };
        if w(0) != PAGE as u64 {
            return Err(format!("state page size {} is not {PAGE}", w(0)));
        }
        let s = DemoState {
            ram: w(1),
            last_gen: w(2),
            checksum: w(3),
            writes: w(4),
            last_write: w(5),
        };
        let pages = s.ram / PAGE as u64;
        if s.ram == 0 || s.ram % PAGE as u64 != 0 || s.last_gen < pages {
            return Err(format!(
                "state is inconsistent: {} bytes of RAM, last generation {}",
                s.ram, s.last_gen
            ));
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_roundtrip() {
        let t = Times {
            fill_start: 1,
            fill_end: 2,
            preserve_start: 3,
            preserve_end: 4,
            last_write: 5,
            save_end: 6,
            reboot_start: 7,
            reboot_end: 8,
            dump_end: 0,
            exec: u64::MAX,
        };
        assert_eq!(Times::decode(&t.encode()), Ok(t));
        assert!(Times::decode("exec=1").is_err());
        assert!(Times::decode("bogus").is_err());
    }

    #[test]
    fn state_roundtrip() {
        let s = DemoState {
            ram: 8 << 20,
            last_gen: 5000,
            checksum: 0xdead_beef,
            writes: 2952,
            last_write: 77,
        };
        assert_eq!(DemoState::from_bytes(&s.to_bytes()), Ok(s));
        let mut b = s.to_bytes();
        b[0] = b'X';
        assert!(DemoState::from_bytes(&b).is_err());
    }
}
