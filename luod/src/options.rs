//! luod's command line. Parsed by hand (no dependency); every error is a message, never a panic.

use std::path::PathBuf;
use std::time::Duration;

use luo_client::BackendKind;

/// luod's settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--backend kernel|user`.
    pub backend: BackendKind,
    /// `--socket PATH`.
    pub socket: PathBuf,
    /// `--device PATH` (kernel backend).
    pub device: PathBuf,
    /// `--socket-mode OCTAL`: access is decided per uid (`SO_PEERCRED`), so the default lets
    /// every local user connect.
    pub socket_mode: u32,
    /// `--barrier-timeout-ms N`: used when an UPDATE request gives 0.
    pub barrier_timeout: Duration,
    /// `--frame-timeout-ms N`: a started frame must complete within this, and a reply must be
    /// accepted by the peer within this.
    pub frame_timeout: Duration,
    /// `--max-connections N`: connections plus session channels.
    pub max_connections: usize,
    /// `--max-connections-per-uid N`.
    pub max_connections_per_uid: usize,
    /// `--max-sessions-per-uid N`.
    pub max_sessions_per_uid: usize,
    /// `--admin-connections N`: connections kept for root and luod's own uid, on top of what
    /// the others may use (they stop at `max_connections - N` in all) and of the per-uid cap
    /// (an admin uid may hold `max_connections_per_uid + N`), so the operator's luoctl always
    /// gets in.
    pub admin_connections: usize,
    /// `--max-files-per-uid N`: preserved files per uid, over all its sessions (user backend,
    /// where each one is an fd luod holds).
    pub max_files_per_uid: usize,
    /// `--next-image PATH` (user backend): what an update execs; default: luod's own binary.
    pub next_image: Option<PathBuf>,
    /// `--handover-fd N`: set by luod for its next image (user backend).
    pub handover_fd: Option<i32>,
    /// `--listen-fd N`: set by luod for its next image, so the socket never goes away.
    pub listen_fd: Option<i32>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            backend: BackendKind::Kernel,
            socket: PathBuf::from(luo_client::Luod::DEFAULT_SOCKET),
            device: PathBuf::from(luo_client::Device::PATH),
            socket_mode: 0o666,
            barrier_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(5),
            max_connections: 256,
            max_connections_per_uid: 64,
            max_sessions_per_uid: 64,
            admin_connections: 16,
            max_files_per_uid: 256,
            next_image: None,
            handover_fd: None,
            listen_fd: None,
        }
    }
}

/// Usage text.
pub const USAGE: &str = "\
usage: luod [--backend kernel|user] [--socket PATH] [--device PATH] [--socket-mode OCTAL]
            [--barrier-timeout-ms N] [--frame-timeout-ms N] [--max-connections N]
            [--max-connections-per-uid N] [--max-sessions-per-uid N] [--admin-connections N]
            [--max-files-per-uid N] [--next-image PATH]

Owns /dev/liveupdate (or, with --backend user, an in-process LUO whose reboot is an exec of
--next-image), hands LUO sessions to clients over a Unix socket, and runs updates (luoctl).
";

/// What the command line asked for.
#[derive(Debug)]
pub enum Parsed {
    /// Run with these options.
    Run(Options),
    /// Print usage and exit 0.
    Help,
}

fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{flag}: not a valid number: {v:?}"))
}

/// Parses luod's arguments (without `argv[0]`).
pub fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        if flag == "-h" || flag == "--help" {
            return Ok(Parsed::Help);
        }
        let mut value = || -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value")),
            }
        };
        match flag {
            "--backend" => {
                o.backend = match value()?.as_str() {
                    "kernel" => BackendKind::Kernel,
                    "user" => BackendKind::User,
                    other => {
                        return Err(format!("--backend: expected kernel or user, got {other:?}"))
                    }
                }
            }
            "--socket" => o.socket = PathBuf::from(value()?),
            "--device" => o.device = PathBuf::from(value()?),
            "--socket-mode" => {
                let v = value()?;
                o.socket_mode = u32::from_str_radix(&v, 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| format!("--socket-mode: not an octal mode: {v:?}"))?;
            }
            "--barrier-timeout-ms" => {
                o.barrier_timeout = Duration::from_millis(num(flag, &value()?)?);
            }
            "--frame-timeout-ms" => {
                let ms: u64 = num(flag, &value()?)?;
                if ms == 0 {
                    return Err("--frame-timeout-ms must be positive".into());
                }
                o.frame_timeout = Duration::from_millis(ms);
            }
            "--max-connections" => o.max_connections = num(flag, &value()?)?,
            "--max-connections-per-uid" => o.max_connections_per_uid = num(flag, &value()?)?,
            "--max-sessions-per-uid" => o.max_sessions_per_uid = num(flag, &value()?)?,
            "--admin-connections" => o.admin_connections = num(flag, &value()?)?,
            "--max-files-per-uid" => o.max_files_per_uid = num(flag, &value()?)?,
            "--next-image" => o.next_image = Some(PathBuf::from(value()?)),
            "--handover-fd" => o.handover_fd = Some(num(flag, &value()?)?),
            "--listen-fd" => o.listen_fd = Some(num(flag, &value()?)?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.admin_connections >= o.max_connections {
        return Err(format!(
            "--admin-connections ({}) must be below --max-connections ({})",
            o.admin_connections, o.max_connections
        ));
    }
    Ok(Parsed::Run(o))
}

impl Options {
    /// The arguments that give the next image (after a userspace update) these same settings,
    /// without the per-exec fds.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--backend".to_string(),
            self.backend.as_str().to_string(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--device".into(),
            self.device.display().to_string(),
            "--socket-mode".into(),
            format!("{:o}", self.socket_mode),
            "--barrier-timeout-ms".into(),
            self.barrier_timeout.as_millis().to_string(),
            "--frame-timeout-ms".into(),
            self.frame_timeout.as_millis().to_string(),
            "--max-connections".into(),
            self.max_connections.to_string(),
            "--max-connections-per-uid".into(),
            self.max_connections_per_uid.to_string(),
            "--max-sessions-per-uid".into(),
            self.max_sessions_per_uid.to_string(),
            "--admin-connections".into(),
            self.admin_connections.to_string(),
            "--max-files-per-uid".into(),
            self.max_files_per_uid.to_string(),
        ];
        if let Some(p) = &self.next_image {
            v.push("--next-image".into());
            v.push(p.display().to_string());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn round_trip_through_to_args() {
        let Parsed::Run(o) = parse(&args(
            "--backend user --socket /tmp/s --frame-timeout-ms=250 --socket-mode 600 --next-image /x",
        ))
        .unwrap() else {
            panic!()
        };
        assert_eq!(o.backend, BackendKind::User);
        assert_eq!(o.frame_timeout, Duration::from_millis(250));
        assert_eq!(o.socket_mode, 0o600);
        let Parsed::Run(o2) = parse(&o.to_args()).unwrap() else {
            panic!()
        };
        assert_eq!(format!("{o:?}"), format!("{o2:?}"));
    }

    #[test]
    fn bad_arguments_are_messages() {
        for bad in [
            "--backend",
            "--backend vm",
            "--frame-timeout-ms 0",
            "--frame-timeout-ms x",
            "--socket-mode 999",
            "--max-connections 8 --admin-connections 8",
            "--what",
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad}");
        }
        assert!(matches!(parse(&args("--help")), Ok(Parsed::Help)));
    }
}
