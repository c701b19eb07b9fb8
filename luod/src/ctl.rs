//! luoctl: talk to luod from a shell.
//!
//! `update` and `status` are the operator's commands. `preserve`, `retrieve`, `finish`,
//! `release` and `listen` make luoctl a minimal luod client, for scripts and for tests that
//! need a client in another process (one that can be killed, or run as another uid).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use luo_client::wire::kernel_name;
use luo_client::{describe_errno, errno_name, Dir, Errno, Error, Luod, Status, UpdateEvent};
use luo_json::Json;

/// Usage text.
pub const USAGE: &str = "\
usage: luoctl [--socket PATH] COMMAND [ARGS]

  status [--json]                      luod's state and the sessions you may see
  update [--kernel BZIMAGE] [--initrd FILE] [--append ARGS] [--reuse-cmdline]
         [--barrier-timeout-ms N] [--force] [--no-wait] [--wait-ms N]
                                       load the next kernel, run the barrier, reboot
                                       (user backend: luod execs its next image; no kernel);
                                       --force (root): listeners that refuse or are late and
                                       sessions that cannot be frozen do not stop it: their
                                       sessions are dropped, and lost
  preserve NAME TOKEN [--file FILE] [--open] [--hold [--adopt]]
                                       copy FILE (or stdin) into a memfd and preserve it in
                                       your outgoing session NAME (created unless --open);
                                       --hold stays connected (holding the session fd) until
                                       killed; --adopt (kernel backend): whenever luod is
                                       restarted, hand it the session again (ADOPT) if it
                                       came back without it
  retrieve NAME TOKEN [--out FILE] [--finish]
                                       write the file preserved under TOKEN in your incoming
                                       session NAME to FILE (or stdout)
  finish NAME                          FINISH your incoming session NAME
  release NAME [--incoming] [--uid UID]
                                       make luod drop its copy of your session NAME;
                                       --uid (root): another uid's, channels included
  listen [--label L] [--delay-ms N] [--refuse ERRNO] [--never]
                                       be an update listener: print events, reach the barrier

The socket is --socket, else $LUOD_SOCKET, else /run/luod.sock. TOKEN is decimal or 0x-hex.
";

/// A command-line or runtime failure, and its exit code.
#[derive(Debug)]
struct Fail {
    code: u8,
    msg: String,
}

fn usage(msg: impl Into<String>) -> Fail {
    Fail {
        code: 2,
        msg: msg.into(),
    }
}

fn fail(msg: impl Into<String>) -> Fail {
    Fail {
        code: 1,
        msg: msg.into(),
    }
}

/// Writes progress to stdout, ignoring a failure (the command's outcome does not depend on it).
fn out(s: &str) {
    let _ = crate::logging::stdout(s);
}

/// Writes a command's result to stdout: a failure to write it is the command's failure, except
/// a reader that stopped reading (`luoctl status | head`).
fn result_out(s: &str) -> Result<(), Fail> {
    match crate::logging::stdout(s) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(fail(format!("cannot write to stdout: {e}")))
        }
        _ => Ok(()),
    }
}

/// Arguments after the command: flags (with values where named in `valued`) and positionals.
struct Args {
    pos: Vec<String>,
    flags: Vec<(String, Option<String>)>,
}

impl Args {
    fn parse(args: &[String], valued: &[&str], bare: &[&str]) -> Result<Args, Fail> {
        let mut a = Args {
            pos: Vec::new(),
            flags: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(s) = it.next() {
            if !s.starts_with("--") {
                a.pos.push(s.clone());
                continue;
            }
            let (f, inline) = match s.split_once('=') {
                Some((f, v)) => (f, Some(v.to_string())),
                None => (s.as_str(), None),
            };
            if valued.contains(&f) {
                let v = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| usage(format!("{f} needs a value")))?,
                };
                a.flags.push((f.to_string(), Some(v)));
            } else if bare.contains(&f) && inline.is_none() {
                a.flags.push((f.to_string(), None));
            } else {
                return Err(usage(format!("unknown option {s:?}")));
            }
        }
        Ok(a)
    }

    fn has(&self, f: &str) -> bool {
        self.flags.iter().any(|(k, _)| k == f)
    }

    fn get(&self, f: &str) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(k, _)| k == f)
            .and_then(|(_, v)| v.as_deref())
    }

    fn num(&self, f: &str) -> Result<Option<u64>, Fail> {
        self.get(f)
            .map(|v| {
                v.parse()
                    .map_err(|_| usage(format!("{f}: not a number: {v:?}")))
            })
            .transpose()
    }

    fn positional(&self, n: usize, what: &str) -> Result<&[String], Fail> {
        if self.pos.len() != n {
            return Err(usage(format!("expected {what}")));
        }
        Ok(&self.pos)
    }
}

fn parse_token(s: &str) -> Result<u64, Fail> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| usage(format!("not a token (decimal or 0x-hex u64): {s:?}")))
}

fn parse_errno(s: &str) -> Result<Errno, Fail> {
    if let Ok(n) = s.parse::<i32>() {
        if n > 0 {
            return Ok(Errno::new(n));
        }
    }
    (1..134)
        .find(|&n| errno_name(n) == s)
        .map(Errno::new)
        .ok_or_else(|| usage(format!("not an errno name or positive number: {s:?}")))
}

fn connect(socket: &PathBuf) -> Result<Luod, Fail> {
    Luod::connect(socket)
        .map_err(|e| fail(format!("cannot reach luod at {}: {e}", socket.display())))
}

/// luoctl's entry point: returns the exit code (0 success, 1 failure, 2 usage).
pub fn main(args: &[String]) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            crate::logging::stderr(&format!("luoctl: {}\n", f.msg));
            if f.code == 2 {
                crate::logging::stderr(USAGE);
            }
            ExitCode::from(f.code)
        }
    }
}

fn run(args: &[String]) -> Result<(), Fail> {
    let mut socket = std::env::var_os("LUOD_SOCKET")
        .map_or_else(|| PathBuf::from(Luod::DEFAULT_SOCKET), PathBuf::from);
    let mut rest = args;
    loop {
        match rest.first().map(String::as_str) {
            Some("--socket") => {
                let p = rest.get(1).ok_or_else(|| usage("--socket needs a value"))?;
                socket = PathBuf::from(p);
                rest = &rest[2..];
            }
            Some(s) if s.starts_with("--socket=") => {
                socket = PathBuf::from(&s["--socket=".len()..]);
                rest = &rest[1..];
            }
            Some("-h" | "--help" | "help") => return result_out(USAGE),
            _ => break,
        }
    }
    let Some((cmd, rest)) = rest.split_first() else {
        return Err(usage("no command"));
    };
    match cmd.as_str() {
        "status" => status(&socket, &Args::parse(rest, &[], &["--json"])?),
        "update" => update(
            &socket,
            &Args::parse(
                rest,
                &[
                    "--kernel",
                    "--initrd",
                    "--append",
                    "--barrier-timeout-ms",
                    "--wait-ms",
                ],
                &["--reuse-cmdline", "--no-wait", "--force"],
            )?,
        ),
        "preserve" => preserve(
            &socket,
            &Args::parse(rest, &["--file"], &["--open", "--hold", "--adopt"])?,
        ),
        "retrieve" => retrieve(&socket, &Args::parse(rest, &["--out"], &["--finish"])?),
        "finish" => {
            let a = Args::parse(rest, &[], &[])?;
            let name = &a.positional(1, "NAME")?[0];
            let l = connect(&socket)?;
            let s = l
                .retrieve_session(name)
                .map_err(|e| fail(format!("retrieve {name:?}: {e}")))?;
            s.finish()
                .map_err(|e| fail(format!("FINISH {name:?}: {e}")))
        }
        "release" => {
            let a = Args::parse(rest, &["--uid"], &["--incoming"])?;
            let name = &a.positional(1, "NAME")?[0];
            let dir = if a.has("--incoming") {
                Dir::Incoming
            } else {
                Dir::Outgoing
            };
            let l = connect(&socket)?;
            match a.num("--uid")? {
                None => l.release_session(dir, name),
                Some(uid) => {
                    let uid = u32::try_from(uid).map_err(|_| usage("--uid: not a uid"))?;
                    l.release_session_of(uid, dir, name)
                }
            }
            .map_err(|e| fail(format!("release {name:?}: {e}")))
        }
        "listen" => listen(
            &socket,
            &Args::parse(rest, &["--label", "--delay-ms", "--refuse"], &["--never"])?,
        ),
        other => Err(usage(format!("unknown command {other:?}"))),
    }
}

/// `luoctl status --json`.
pub fn status_json(s: &Status) -> String {
    let mut j = Json::new();
    j.begin_object();
    j.key("pid").u64(s.pid.into());
    j.key("backend").string(s.backend.as_str());
    j.key("generation").u64(s.generation);
    j.key("phase").string(s.phase.as_str());
    j.key("listeners").u64(s.listeners.into());
    j.key("last_update");
    match &s.last_update {
        None => j.null(),
        Some((e, m)) => j
            .begin_object()
            .key("errno")
            .i64((*e).into())
            .key("error")
            .string(if *e == 0 { "" } else { errno_name(*e) })
            .key("message")
            .string(m)
            .end_object(),
    };
    j.key("sessions").begin_array();
    for x in &s.sessions {
        j.begin_object();
        j.key("direction").string(x.dir.as_str());
        j.key("uid").u64(x.uid.into());
        j.key("name").string(&x.name);
        j.key("kernel_name").string(&kernel_name(x.uid, &x.name));
        j.key("files");
        match x.files {
            Some(f) => j.u64(f.into()),
            None => j.null(),
        };
        j.key("finished").bool(x.finished);
        j.key("handed_out").bool(x.handed_out);
        j.end_object();
    }
    j.end_array();
    j.end_object();
    let mut out = j.finish();
    out.push('\n');
    out
}

/// `luoctl status` as a table.
pub fn status_table(s: &Status) -> String {
    let mut o = format!(
        "luod pid {}, {} backend, generation {}, update phase {}, {} listener(s)\n",
        s.pid,
        s.backend.as_str(),
        s.generation,
        s.phase.as_str(),
        s.listeners
    );
    match &s.last_update {
        None => {}
        Some((0, m)) => o.push_str(&format!("last update: {m}\n")),
        Some((e, m)) => o.push_str(&format!("last update failed ({}): {m}\n", errno_name(*e))),
    }
    if s.sessions.is_empty() {
        o.push_str("no sessions\n");
        return o;
    }
    let rows: Vec<[String; 6]> = s
        .sessions
        .iter()
        .map(|x| {
            let state = match (x.dir, x.finished, x.handed_out) {
                (Dir::Incoming, true, _) => "finished",
                (Dir::Incoming, false, true) => "retrieved",
                (Dir::Incoming, false, false) => "waiting for its owner",
                (Dir::Outgoing, _, true) => "handed out",
                (Dir::Outgoing, _, false) => "held",
            };
            [
                x.dir.as_str().to_string(),
                x.uid.to_string(),
                x.name.clone(),
                kernel_name(x.uid, &x.name),
                x.files.map_or("-".to_string(), |f| f.to_string()),
                state.to_string(),
            ]
        })
        .collect();
    let head = ["DIRECTION", "UID", "NAME", "KERNEL NAME", "FILES", "STATE"];
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        l.push('\n');
        l
    };
    o.push_str(&line(head.to_vec()));
    for r in &rows {
        o.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    o
}

fn status(socket: &PathBuf, a: &Args) -> Result<(), Fail> {
    a.positional(0, "no arguments")?;
    let s = connect(socket)?
        .status()
        .map_err(|e| fail(format!("status: {e}")))?;
    result_out(&if a.has("--json") {
        status_json(&s)
    } else {
        status_table(&s)
    })
}

fn open_file(path: &str, what: &str) -> Result<File, Fail> {
    File::open(path).map_err(|e| fail(format!("cannot open {what} {path}: {e}")))
}

fn update(socket: &PathBuf, a: &Args) -> Result<(), Fail> {
    a.positional(0, "no positional arguments")?;
    let kernel = a
        .get("--kernel")
        .map(|p| open_file(p, "kernel"))
        .transpose()?;
    let initrd = a
        .get("--initrd")
        .map(|p| open_file(p, "initrd"))
        .transpose()?;
    if initrd.is_some() && kernel.is_none() {
        return Err(usage("--initrd needs --kernel"));
    }
    let mut cmdline = String::new();
    if a.has("--reuse-cmdline") {
        let c = std::fs::read_to_string("/proc/cmdline")
            .map_err(|e| fail(format!("cannot read /proc/cmdline: {e}")))?;
        cmdline.push_str(c.trim_end());
    }
    if let Some(extra) = a.get("--append") {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(extra);
    }
    let timeout = Duration::from_millis(a.num("--barrier-timeout-ms")?.unwrap_or(0));
    let wait = Duration::from_millis(a.num("--wait-ms")?.unwrap_or(10_000));
    let luod = connect(socket)?;
    let backend = luod.hello().backend;
    let from = luod.hello().generation;
    let r = luod.update_with(
        kernel.as_ref().map(|f| f.as_fd()),
        initrd.as_ref().map(|f| f.as_fd()),
        cmdline.as_bytes(),
        timeout,
        a.has("--force"),
    );
    match r {
        Ok((next, dropped)) => {
            if !dropped.is_empty() {
                out(&format!("forced: {dropped}\n"));
            }
            out(&format!(
                "barrier reached; luod is exec'ing its next image (generation {from} -> {next})\n"
            ));
            if a.has("--no-wait") {
                return Ok(());
            }
            wait_for_generation(socket, next, wait)
        }
        Err(Error::Io(e))
            if backend == luo_client::BackendKind::Kernel
                && e.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            out(
                "barrier reached; luod went down with the machine: rebooting into the new kernel\n",
            );
            Ok(())
        }
        Err(e) => Err(fail(format!("update failed: {e}"))),
    }
}

/// Waits until luod answers with generation `gen` (it keeps the socket across the exec, so
/// connections wait in the backlog meanwhile).
fn wait_for_generation(socket: &PathBuf, gen: u64, wait: Duration) -> Result<(), Fail> {
    let deadline = Instant::now() + wait;
    loop {
        let last = match Luod::connect(socket) {
            Ok(l) if l.hello().generation >= gen => {
                let s = l.status().map_err(|e| fail(format!("status: {e}")))?;
                let incoming = s.sessions.iter().filter(|x| x.dir == Dir::Incoming).count();
                out(&format!(
                    "luod generation {} is up (pid {}), {incoming} incoming session(s) visible to you\n",
                    s.generation, s.pid
                ));
                return Ok(());
            }
            Ok(l) => format!("still generation {}", l.hello().generation),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(fail(format!(
                "luod generation {gen} did not come up within {} ms ({last})",
                wait.as_millis()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn preserve(socket: &PathBuf, a: &Args) -> Result<(), Fail> {
    let p = a.positional(2, "NAME TOKEN")?;
    if a.has("--adopt") && !a.has("--hold") {
        return Err(usage("--adopt needs --hold"));
    }
    let (name, token) = (&p[0], parse_token(&p[1])?);
    let mut data = Vec::new();
    match a.get("--file") {
        Some(f) => open_file(f, "file")?.read_to_end(&mut data),
        None => std::io::stdin().read_to_end(&mut data),
    }
    .map_err(|e| fail(format!("cannot read the data: {e}")))?;
    let memfd = backend_user::sys::memfd_create(c"luoctl", libc::MFD_CLOEXEC)
        .map_err(|e| fail(format!("memfd_create: {e}")))?;
    let memfd = File::from(memfd);
    memfd
        .write_all_at(&data, 0)
        .map_err(|e| fail(format!("cannot fill the memfd: {e}")))?;
    let luod = connect(socket)?;
    let s = if a.has("--open") {
        luod.open_session(name)
    } else {
        luod.create_session(name)
    }
    .map_err(|e| {
        let hint = if e.errno() == luo_core::errno::EEXIST {
            " (add --open to use the existing session)"
        } else {
            ""
        };
        fail(format!("session {name:?}: {e}{hint}"))
    })?;
    s.preserve_fd(&memfd, token)
        .map_err(|e| fail(format!("PRESERVE_FD {name:?} token {token}: {e}")))?;
    out(&format!(
        "preserved {} byte(s) in {:?} under token {token}\n",
        data.len(),
        s.name().unwrap_or_default()
    ));
    if a.has("--hold") {
        if a.has("--adopt") {
            return hold_and_adopt(socket, name, &s, luod);
        }
        // A client that stays connected until it is killed (tests kill it to show that what
        // it preserved outlives it).
        loop {
            std::thread::park();
        }
    }
    Ok(())
}

/// `preserve --hold --adopt`: holds the session fd until killed and, each time luod goes away
/// and comes back, hands it the session again with ADOPT. A luod restarted from systemd's fd
/// store has it already (`EEXIST`); one restarted without the store takes it back here.
fn hold_and_adopt(
    socket: &PathBuf,
    name: &str,
    s: &luo_client::Session,
    mut luod: Luod,
) -> Result<(), Fail> {
    loop {
        std::thread::sleep(Duration::from_millis(250));
        if luod.status().is_ok() {
            continue;
        }
        // luod went away: wait for the next one (its socket may be systemd's, so connecting
        // can succeed before luod answers; HELLO in connect waits for that).
        let next = loop {
            match Luod::connect(socket) {
                Ok(l) => break l,
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let pid = next.hello().pid;
        match next.adopt_session(Dir::Outgoing, name, s) {
            Ok(()) => out(&format!("adopted: luod pid {pid} holds {name:?} again\n")),
            Err(e) if e.errno() == luo_core::errno::EEXIST => {
                out(&format!("luod pid {pid} has {name:?} already\n"))
            }
            Err(e) => out(&format!("ADOPT {name:?} by luod pid {pid}: {e}\n")),
        }
        luod = next;
    }
}

fn retrieve(socket: &PathBuf, a: &Args) -> Result<(), Fail> {
    let p = a.positional(2, "NAME TOKEN")?;
    let (name, token) = (&p[0], parse_token(&p[1])?);
    let luod = connect(socket)?;
    let s = luod
        .retrieve_session(name)
        .map_err(|e| fail(format!("retrieve {name:?}: {e}")))?;
    let f = File::from(
        s.retrieve_fd(token)
            .map_err(|e| fail(format!("RETRIEVE_FD {name:?} token {token}: {e}")))?,
    );
    let len = f.metadata().map_err(|e| fail(format!("fstat: {e}")))?.len();
    let mut data = vec![0u8; usize::try_from(len).map_err(|_| fail("file too large"))?];
    f.read_exact_at(&mut data, 0)
        .map_err(|e| fail(format!("cannot read the file: {e}")))?;
    match a.get("--out") {
        Some(path) => std::fs::write(path, &data).map_err(|e| fail(format!("{path}: {e}")))?,
        None => {
            let mut o = std::io::stdout().lock();
            o.write_all(&data)
                .and_then(|()| o.flush())
                .map_err(|e| fail(format!("stdout: {e}")))?;
        }
    }
    if a.has("--finish") {
        s.finish()
            .map_err(|e| fail(format!("FINISH {name:?}: {e}")))?;
    }
    Ok(())
}

fn listen(socket: &PathBuf, a: &Args) -> Result<(), Fail> {
    a.positional(0, "no positional arguments")?;
    let refuse = a.get("--refuse").map(parse_errno).transpose()?;
    let delay = Duration::from_millis(a.num("--delay-ms")?.unwrap_or(0));
    let never = a.has("--never");
    let label = a.get("--label").unwrap_or("");
    let mut l = connect(socket)?
        .register_for_update(label)
        .map_err(|e| fail(format!("register: {e}")))?;
    out("listening\n");
    loop {
        let ev = l
            .next_event(None)
            .map_err(|e| fail(format!("listener: {e}")))?;
        match ev {
            Some(UpdateEvent::Prepare { timeout, .. }) => {
                out(&format!("prepare {}\n", timeout.as_millis()));
                if never {
                    continue;
                }
                std::thread::sleep(delay);
                let r = match refuse {
                    Some(e) => l.refuse(e),
                    None => l.reach_barrier(),
                };
                match r {
                    Ok(()) => out(if refuse.is_some() {
                        "refused\n"
                    } else {
                        "ready\n"
                    }),
                    Err(e) => out(&format!("barrier answer not taken: {e}\n")),
                }
            }
            Some(UpdateEvent::Aborted { errno, message }) => {
                out(&format!("aborted {}: {message}\n", describe_errno(errno)));
            }
            Some(UpdateEvent::Rebooting) => out("rebooting\n"),
            Some(UpdateEvent::Closed) => {
                out("closed\n");
                return Ok(());
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use luo_client::wire::{BackendKind, Phase, SessionInfo};
    use luo_json::json_str;

    fn sample() -> Status {
        Status {
            backend: BackendKind::User,
            phase: Phase::Idle,
            pid: 7,
            generation: 2,
            listeners: 1,
            last_update: Some((110, "1 listener(s) did not \"reach\"\n".into())),
            sessions: vec![SessionInfo {
                uid: 1000,
                dir: Dir::Outgoing,
                name: "vm0".into(),
                files: Some(2),
                finished: false,
                handed_out: true,
            }],
        }
    }

    #[test]
    fn json_is_escaped_and_complete() {
        let j = status_json(&sample());
        assert!(j.contains("\"kernel_name\":\"1000/vm0\""), "{j}");
        assert!(j.contains("\"error\":\"ETIMEDOUT\""), "{j}");
        assert!(j.contains("did not \\\"reach\\\"\\n"), "{j}");
        assert_eq!(json_str("\u{1}"), "\"\\u0001\"");
    }

    #[test]
    fn json_keeps_its_exact_shape() {
        // Scripts parse `luoctl status --json`: how it is written may change, its bytes may not.
        let mut s = sample();
        assert_eq!(
            status_json(&s),
            "{\"pid\":7,\"backend\":\"user\",\"generation\":2,\"phase\":\"idle\",\"listeners\":1,\
             \"last_update\":{\"errno\":110,\"error\":\"ETIMEDOUT\",\
             \"message\":\"1 listener(s) did not \\\"reach\\\"\\n\"},\
             \"sessions\":[{\"direction\":\"outgoing\",\"uid\":1000,\"name\":\"vm0\",\
             \"kernel_name\":\"1000/vm0\",\"files\":2,\"finished\":false,\"handed_out\":true}]}\n"
        );
        s.last_update = None;
        s.sessions[0].files = None;
        s.sessions[0].finished = true;
        s.sessions.push(s.sessions[0].clone());
        let one = "{\"direction\":\"outgoing\",\"uid\":1000,\"name\":\"vm0\",\
                   \"kernel_name\":\"1000/vm0\",\"files\":null,\"finished\":true,\"handed_out\":true}";
        assert_eq!(
            status_json(&s),
            format!(
                "{{\"pid\":7,\"backend\":\"user\",\"generation\":2,\"phase\":\"idle\",\
                 \"listeners\":1,\"last_update\":null,\"sessions\":[{one},{one}]}}\n"
            )
        );
        s.sessions.clear();
        s.last_update = Some((0, String::new()));
        assert_eq!(
            status_json(&s),
            "{\"pid\":7,\"backend\":\"user\",\"generation\":2,\"phase\":\"idle\",\"listeners\":1,\
             \"last_update\":{\"errno\":0,\"error\":\"\",\"message\":\"\"},\"sessions\":[]}\n"
        );
    }

    #[test]
    fn table_has_a_row_per_session() {
        let t = status_table(&sample());
        assert!(
            t.contains("outgoing   1000  vm0   1000/vm0     2      handed out"),
            "{t}"
        );
    }

    #[test]
    fn arguments() {
        assert_eq!(parse_token("0x1f").unwrap(), 31);
        assert_eq!(parse_token("7").unwrap(), 7);
        assert!(parse_token("-1").is_err());
        assert_eq!(parse_errno("EBUSY").unwrap().get(), libc::EBUSY);
        assert_eq!(parse_errno("5").unwrap().get(), 5);
        assert!(parse_errno("EWHAT").is_err());
        let s: Vec<String> = ["--json", "x"].iter().map(|s| s.to_string()).collect();
        let a = Args::parse(&s, &[], &["--json"]).unwrap();
        assert!(a.has("--json") && a.pos == ["x"]);
        let s: Vec<String> = ["--kernel"].iter().map(|s| s.to_string()).collect();
        assert!(Args::parse(&s, &["--kernel"], &[]).is_err());
        let s: Vec<String> = ["--json=1"].iter().map(|s| s.to_string()).collect();
        assert!(Args::parse(&s, &[], &["--json"]).is_err());
    }
}
