//! The `luo` command: a live update demo across exec, and a handover image inspector.
//!
//! - `luo demo [--ram SIZE] [--next PATH] [--dump FILE]`: see [`demo`].
//! - `luo inspect FILE [--json]`: see [`inspect`].
//!
//! Exit status: 0 on success, 1 when something failed at run time, 2 for a usage error or a
//! malformed handover image. Every error is one line on stderr.

/// `print!` that ignores a closed or broken stdout (`luo inspect img | head`) instead of
/// panicking.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout().lock();
        let _ = write!(o, $($t)*);
        let _ = o.flush();
    }};
}

/// `eprint!` that ignores a closed stderr.
macro_rules! err {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($t)*);
    }};
}

pub mod demo;
pub mod inspect;
pub mod pattern;
pub mod size;

use std::ffi::OsString;

/// The program kind `luo` answers the next-image probe with
/// ([`backend_user::next_image`]): its command line is `luo demo --stage2 ...`.
pub const PROGRAM: &str = backend_user::next_image::PROGRAM_LUO;
use std::path::PathBuf;

/// A failure of the command: a one-line message and an exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    /// Exit status.
    pub code: i32,
    /// One line, without the `luo: ` prefix.
    pub message: String,
}

impl CliError {
    /// A usage error (exit status 2).
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: 2,
            message: message.into(),
        }
    }

    /// A run-time failure (exit status 1).
    pub fn fail(message: impl Into<String>) -> Self {
        CliError {
            code: 1,
            message: message.into(),
        }
    }
}

/// The help text.
pub const USAGE: &str = "\
usage:
  luo demo [--ram SIZE] [--next PATH] [--dump FILE] [--run-ms MS]
      Live-update a running VMM-like workload across exec: its guest RAM (a memfd of SIZE,
      default 256MiB; sizes like 64M, 1G, 256MiB) is preserved with LUO, the process execs
      its next image (PATH, default itself), which retrieves the memory, verifies every byte
      and resumes. Prints the timeline and the blackout. --dump also writes the handover
      image to FILE. --run-ms is how long the workload runs before the cut (default 300).
      Before the cut PATH must answer `PATH --luo-handover-probe` with this handover's
      version line, and the dump must fit in FILE; otherwise the update is refused, the
      guest RAM is verified intact in place and nothing is lost (exit status 1).
  luo inspect FILE [--json] [--max-size SIZE]
      Decode a handover image (as written by --dump): root, sessions, files, handler data,
      FLBs. A malformed image gives one line naming the offset and the rule, exit status 2.
      FILE must be a regular file; its header is checked before the rest is read, and a
      file larger than SIZE (default 256MiB) is refused.
  luo --luo-handover-probe
      Print the handover version line (for an old image checking its next image).
  luo help | --help
  luo --version
";

/// Runs the command line (without argv[0]); returns the exit status. `t_start` is the first
/// CLOCK_MONOTONIC reading of `main`.
pub fn run(argv0: OsString, args: Vec<OsString>, t_start: u64) -> i32 {
    if backend_user::next_image::is_probe(&args) {
        return match backend_user::next_image::answer(PROGRAM) {
            Ok(()) => 0,
            Err(_) => 1,
        };
    }
    match dispatch(argv0, &args, t_start) {
        Ok(()) => 0,
        Err(e) => {
            err!("luo: {}\n", e.message.replace('\n', " "));
            e.code
        }
    }
}

fn dispatch(argv0: OsString, args: &[OsString], t_start: u64) -> Result<(), CliError> {
    let Some(cmd) = args.first() else {
        err!("{USAGE}");
        return Err(CliError::usage("no command given"));
    };
    let rest = &args[1..];
    match cmd.to_str() {
        Some("demo") => match demo::parse_args(rest)? {
            demo::DemoCommand::Run(opts) => match demo::run(&opts, &argv0) {
                Ok(never) => match never {},
                Err(e) => Err(e),
            },
            demo::DemoCommand::Stage2(opts) => demo::stage2(&opts, t_start),
        },
        Some("inspect") => inspect_cmd(rest),
        Some("help" | "--help" | "-h") => {
            out!("{USAGE}");
            Ok(())
        }
        Some("--version" | "-V") => {
            out!("luo {}\n", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        _ => Err(CliError::usage(format!(
            "unknown command '{}' (try: luo demo, luo inspect FILE, luo help)",
            cmd.to_string_lossy()
        ))),
    }
}

/// What kind of file this is, for an error ("FIFO", "directory", ...).
pub fn file_kind(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_file() {
        "regular file"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

fn inspect_cmd(args: &[OsString]) -> Result<(), CliError> {
    const USE: &str = "usage: luo inspect FILE [--json] [--max-size SIZE]";
    let mut json = false;
    let mut file: Option<PathBuf> = None;
    let mut max_size = inspect::DEFAULT_MAX_SIZE;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.to_str().and_then(|s| s.split_once('=')) {
            Some((n, v)) if n == "--max-size" => (Some(n), Some(v.to_string())),
            _ => (a.to_str(), None),
        };
        match name {
            Some("--json") => json = true,
            Some("--max-size") => {
                let v = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .and_then(|v| v.to_str())
                        .map(str::to_string)
                        .ok_or_else(|| {
                            CliError::usage(format!("inspect: --max-size needs a size ({USE})"))
                        })?,
                };
                max_size = size::parse_size(&v)
                    .map_err(|e| CliError::usage(format!("inspect: --max-size: {e}")))?;
            }
            Some(s) if s.starts_with('-') && s.len() > 1 => {
                return Err(CliError::usage(format!(
                    "inspect: unknown option '{s}' ({USE})"
                )))
            }
            _ if file.is_none() => file = Some(PathBuf::from(a)),
            _ => return Err(CliError::usage(format!("inspect: one FILE only ({USE})"))),
        }
    }
    let file = file.ok_or_else(|| CliError::usage(format!("inspect: no FILE given ({USE})")))?;
    let report = inspect::inspect_path_with(&file, max_size).map_err(|e| CliError {
        code: e.exit_code(),
        message: format!("inspect {}: {e}", file.display()),
    })?;
    if json {
        out!("{}\n", report.json());
    } else {
        out!("{}", report.text());
    }
    Ok(())
}
