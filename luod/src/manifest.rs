//! luod's manifest: which sessions it handed over, and to whom.
//!
//! Incoming sessions are invisible until retrieved by exact name (spec §3.3), so luod cannot
//! list what the previous kernel handed over. Before each reboot it therefore preserves a
//! memfd under token 0 of its own session [`MANIFEST_SESSION`] (`"luod"`), listing every
//! outgoing session it holds; after boot it retrieves that session first. Only the sessions
//! listed there are ever handed out again: a session some other program left behind under a
//! `"<uid>/..."` name is never retrieved (the anti-hijack rule, as in systemd's TEST-91).
//!
//! The format is text, one record a line, so an operator can read it with `luo inspect`:
//!
//! ```text
//! luod-manifest 1
//! generation 3
//! session 1000 vm0
//! end
//! ```
//!
//! The `end` line makes a truncated manifest detectable.

pub use luo_client::wire::MANIFEST_SESSION;
use luo_client::wire::{check_name, MAX_NAME};

/// The first line.
const MAGIC: &str = "luod-manifest 1";
/// Largest manifest luod reads back (a line per session; sessions are limited per uid).
pub const MAX_LEN: u64 = 16 << 20;

/// What a manifest says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    /// The generation that wrote it.
    pub generation: u64,
    /// `(owner uid, client name)` of every session handed over, in creation order.
    pub sessions: Vec<(u32, String)>,
}

impl Manifest {
    /// The bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut s = format!("{MAGIC}\ngeneration {}\n", self.generation);
        for (uid, name) in &self.sessions {
            s.push_str(&format!("session {uid} {name}\n"));
        }
        s.push_str("end\n");
        s.into_bytes()
    }

    /// Parses a manifest. Anything unexpected refuses the whole manifest: a half-understood
    /// list could hand a session to the wrong owner.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(b).map_err(|_| "manifest is not UTF-8".to_string())?;
        // The "end" line and its newline close the manifest; nothing may follow.
        let body = text
            .strip_suffix("\nend\n")
            .ok_or("manifest is truncated (it does not end with an \"end\" line)")?;
        let mut lines = body.split('\n');
        if lines.next() != Some(MAGIC) {
            return Err("manifest does not start with \"luod-manifest 1\"".into());
        }
        let generation = lines
            .next()
            .and_then(|l| l.strip_prefix("generation "))
            .and_then(|g| g.parse::<u64>().ok())
            .ok_or("manifest has no generation line")?;
        let mut m = Manifest {
            generation,
            sessions: Vec::new(),
        };
        for (i, line) in lines.enumerate() {
            let bad = || format!("manifest line {}: {line:?}", i + 3);
            let mut f = line.split(' ');
            let (Some("session"), Some(uid), Some(name), None) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                return Err(bad());
            };
            let uid: u32 = uid.parse().map_err(|_| bad())?;
            if name.len() > MAX_NAME || check_name(name.as_bytes()).is_err() {
                return Err(bad());
            }
            if m.sessions.iter().any(|(u, n)| *u == uid && n == name) {
                return Err(format!("manifest lists {uid}/{name} twice"));
            }
            m.sessions.push((uid, name.to_string()));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = Manifest {
            generation: 4,
            sessions: vec![(1000, "vm0".into()), (0, "x".into())],
        };
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert_eq!(
            Manifest::decode(&Manifest::default().encode()).unwrap(),
            Manifest::default()
        );
    }

    #[test]
    fn anything_odd_refuses_the_manifest() {
        let good = Manifest {
            generation: 1,
            sessions: vec![(5, "a".into())],
        }
        .encode();
        for n in 0..good.len() {
            assert!(Manifest::decode(&good[..n]).is_err(), "prefix {n}");
        }
        for bad in [
            "luod-manifest 2\ngeneration 1\nend\n",
            "luod-manifest 1\ngeneration x\nend\n",
            "luod-manifest 1\ngeneration 1\nsession 5 a/b\nend\n",
            "luod-manifest 1\ngeneration 1\nsession -1 a\nend\n",
            "luod-manifest 1\ngeneration 1\nsession 5 a extra\nend\n",
            "luod-manifest 1\ngeneration 1\nsession 5 a\nsession 5 a\nend\n",
            "luod-manifest 1\ngeneration 1\n\nsession 5 a\nend\n",
            "luod-manifest 1\ngeneration 1\nfile 5 a\nend\n",
            "luod-manifest 1\ngeneration 1\nsession 5 \u{e9}\nend\n",
            "luod-manifest 1\ngeneration 1\nend\nsession 5 a\n",
            "luod-manifest 1\ngeneration 1\nend\n\n",
        ] {
            assert!(Manifest::decode(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(Manifest::decode(b"\xff\xfe").is_err());
    }
}
