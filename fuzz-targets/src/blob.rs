//! `handover_blob`: arbitrary bytes as the handover memory a process boots from.
//!
//! Properties checked on every input:
//! - booting never fails and never panics, whatever the bytes;
//! - the first open agrees with an independent decode: refused state gives `EIO` (and the next
//!   open proceeds), unknown handlers give `EIO`, valid state opens;
//! - valid state can be retrieved entirely (every session by name, every file by token, with
//!   the handed-over data word given to the handler), and finished;
//! - re-preserving the same sessions and files with handlers that reproduce the data words and
//!   rebooting hands over the same canonical content: names, compatibles, data and tokens in
//!   order, `liveupdate_num + 1`, and one FLB entry per registered FLB with dependent files
//!   (its retrieved data, its dependent-file count).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use backend_user::memory::MAGIC;
use backend_user::{Device, FlbRef, HandlerRef, Installed, LiveUpdate, Memory, SessionFd};
use luo_core::uapi::{LIVEUPDATE_IOCTL_CREATE_SESSION, LIVEUPDATE_IOCTL_RETRIEVE_SESSION};
use luo_core::Error;

use crate::common::{
    decode, decode_owned, name_field, word, CanonFlb, Canonical, Decoded, EchoFlb, EchoHandler,
    Files, PAGE,
};

/// Handler compatibles registered before the first open.
pub const HANDLERS: [&str; 2] = ["fuzz-a", "fuzz-b"];
/// FLBs registered: `fuzz-flb-0` linked to `fuzz-a`, `fuzz-flb-1` linked to both handlers.
pub const FLBS: [&str; 2] = ["fuzz-flb-0", "fuzz-flb-1"];

fn session_ioctl(dev: &Device, cmd: u32, name: &[u8]) -> Result<SessionFd, Error> {
    let mut arg = Vec::with_capacity(72);
    arg.extend_from_slice(&72u32.to_ne_bytes());
    arg.extend_from_slice(&(-1i32).to_ne_bytes());
    arg.extend_from_slice(&name_field(name));
    match dev.ioctl(cmd, &mut arg)? {
        Installed::Session(s) => Ok(s),
        _ => panic!("session ioctl installed no session"),
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    run_image(data.to_vec());
}

/// [`run`] on an owned handover file (no copy for the memory the process boots from).
fn run_image(image: Vec<u8>) {
    let decoded = decode(&image);
    let Ok(mem) = Memory::from_bytes(image) else {
        assert!(matches!(decoded, Decoded::NotAFile));
        return;
    };
    let mem = Arc::new(mem);
    let lu = LiveUpdate::with_memory(mem.clone()).expect("booting never fails on bad state");
    let files = Files::new();
    let handlers = HANDLERS.map(|h| EchoHandler::new(h, &files));
    let flbs = FLBS.map(EchoFlb::new);
    let hrefs: Vec<HandlerRef> = handlers
        .iter()
        .cloned()
        .map(|h| -> HandlerRef { h })
        .collect();
    for h in &hrefs {
        lu.register_handler(h.clone()).unwrap();
    }
    lu.register_flb(&hrefs[0], flbs[0].clone()).unwrap();
    lu.register_flb(&hrefs[0], flbs[1].clone()).unwrap();
    lu.register_flb(&hrefs[1], flbs[1].clone()).unwrap();

    let canon = match decoded {
        Decoded::NotAFile => panic!("Memory accepted what decode refused"),
        Decoded::Cold => {
            let dev = lu.open().expect("cold boot opens");
            drop(dev);
            return;
        }
        Decoded::Refused(_) => {
            assert_eq!(lu.open().err(), Some(Error::IncomingRefused));
            // Refused state is reported once; the next update can still be prepared.
            let dev = lu.open().expect("second open after refused state");
            let s = dev.create_session("after-refusal").unwrap();
            drop(s);
            return;
        }
        Decoded::State(c) => c,
    };
    let known = canon
        .sessions
        .iter()
        .flat_map(|s| &s.files)
        .all(|f| HANDLERS.iter().any(|h| h.as_bytes() == f.compat));
    let dev = match lu.open() {
        Ok(dev) => {
            assert!(known, "open accepted a file without a handler");
            dev
        }
        Err(e) => {
            assert!(!known, "valid state with known handlers refused: {e:?}");
            assert_eq!(e, Error::IncomingRefused);
            return;
        }
    };
    retrieve_and_reserialize(&lu, &mem, &dev, &canon, &handlers, &flbs);
}

fn retrieve_and_reserialize(
    lu: &LiveUpdate,
    mem: &Memory,
    dev: &Device,
    canon: &Canonical,
    handlers: &[Arc<EchoHandler>; 2],
    flbs: &[Arc<EchoFlb>; 2],
) {
    // Retrieve everything; EMFILE (a huge image against the fd limit) ends the check early.
    let mut sessions: Vec<(SessionFd, Vec<OwnedFd>)> = Vec::new();
    for s in &canon.sessions {
        let fd = session_ioctl(dev, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &s.name);
        let fd = match fd {
            Ok(fd) => fd,
            Err(Error::TooManyFds) => return,
            Err(e) => panic!("retrieve of a handed-over session failed: {e:?}"),
        };
        assert_eq!(
            session_ioctl(dev, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &s.name).err(),
            Some(Error::AlreadyRetrieved)
        );
        let mut files = Vec::new();
        for f in &s.files {
            match fd.retrieve_fd(f.token) {
                Ok(file) => files.push(file),
                Err(Error::TooManyFds) | Err(Error::Handler(_)) => return,
                Err(e) => panic!("retrieve of a handed-over file failed: {e:?}"),
            }
        }
        sessions.push((fd, files));
    }
    // Every handler saw exactly the data words of its files, in handover order.
    for (i, h) in handlers.iter().enumerate() {
        let want: Vec<u64> = canon
            .sessions
            .iter()
            .flat_map(|s| &s.files)
            .filter(|f| f.compat == HANDLERS[i].as_bytes())
            .map(|f| f.data)
            .collect();
        assert_eq!(h.retrieved(), want);
    }
    // The FLBs' incoming data, as the previous kernel left it.
    for (i, flb) in flbs.iter().enumerate() {
        let handed = canon
            .flbs
            .iter()
            .flatten()
            .find(|f| f.compat == FLBS[i].as_bytes());
        let flb_ref: FlbRef = flb.clone();
        match lu.luo().flb_get_incoming(&flb_ref) {
            Ok(_) => {
                assert!(handed.is_some());
                lu.luo().flb_put_incoming(&flb_ref);
            }
            Err(e) => {
                assert!(handed.is_none(), "handed-over FLB not retrievable: {e:?}");
                let none = if canon.flbs.is_none() {
                    Error::FlbNoData
                } else {
                    Error::FlbNotFound
                };
                assert_eq!(e, none);
            }
        }
    }
    for (fd, _) in &sessions {
        fd.finish().expect("finish of a fully retrieved session");
    }

    // Hand the same content over again.
    let mut outgoing = Vec::new();
    for (s, (_, files)) in canon.sessions.iter().zip(&sessions) {
        let out = match session_ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &s.name) {
            Ok(out) => out,
            Err(Error::TooManyFds) => return,
            Err(e) => panic!("create failed: {e:?}"),
        };
        for (f, file) in s.files.iter().zip(files) {
            out.preserve_fd(file.as_fd(), f.token)
                .expect("re-preserve of a retrieved and finished file");
        }
        outgoing.push(out);
    }
    // The core's reboot (freeze and serialize) writes the pages `to_bytes` reads; the memfd
    // `LiveUpdate::reboot` copies them into is I/O that no handover content reaches, and the
    // backend-user tests cover it.
    lu.luo().reboot().expect("reboot");
    let again = match decode_owned(mem.to_bytes()) {
        Decoded::State(c) => c,
        other => panic!("re-serialized state does not decode: {other:?}"),
    };
    let mut flb_entries = Vec::new();
    for (i, flb) in flbs.iter().enumerate() {
        let linked: &[&str] = if i == 0 { &HANDLERS[..1] } else { &HANDLERS };
        let n = canon
            .sessions
            .iter()
            .flat_map(|s| &s.files)
            .filter(|f| linked.iter().any(|h| h.as_bytes() == f.compat))
            .count() as u64;
        if n > 0 {
            flb_entries.push(CanonFlb {
                compat: FLBS[i].as_bytes().to_vec(),
                data: flb.incoming().unwrap_or(crate::common::ECHO_FLB_DEFAULT),
                count: n,
            });
        }
    }
    let expected = Canonical {
        num: canon.num.wrapping_add(1),
        sessions: canon.sessions.clone(),
        flbs: Some(flb_entries),
    };
    assert_eq!(again, expected);
    drop(outgoing);
}

/// `handover_blob_valid_root`: the input is `[liveupdate_num, sessions_pa, flbs_pa]` (three
/// native-endian u64) followed by the pages after the root; the target puts a valid
/// `luo-user-v1` header and a valid `luo-v5` root in front, so every execution reaches the
/// block chains, names, compatibles and FLB page.
pub fn run_valid_root(data: &[u8]) {
    run_image(valid_root_image(data));
}

/// Builds the handover file for [`run_valid_root`].
pub fn valid_root_image(data: &[u8]) -> Vec<u8> {
    let body = data.get(24..).unwrap_or(&[]);
    let pages = 2 + body.len().div_ceil(PAGE);
    let mut img = vec![0u8; pages * PAGE];
    img[..8].copy_from_slice(MAGIC);
    img[8..12].copy_from_slice(&(PAGE as u32).to_ne_bytes());
    img[16..24].copy_from_slice(&(PAGE as u64).to_ne_bytes());
    img[24..32].copy_from_slice(&32u64.to_ne_bytes());
    img[32..40].copy_from_slice(&(pages as u64).to_ne_bytes());
    let root = PAGE;
    img[root..root + 6].copy_from_slice(b"luo-v5");
    for (i, off) in [0usize, 8, 16].into_iter().enumerate() {
        let w = word(data, off);
        img[root + 8 + 8 * i..root + 16 + 8 * i].copy_from_slice(&w.to_ne_bytes());
    }
    img[2 * PAGE..2 * PAGE + body.len()].copy_from_slice(body);
    img
}

/// The inverse of [`valid_root_image`] for a real handover file (seed generation): the root
/// words followed by the pages after the root. None if the root is not at page 1.
pub fn valid_root_input(image: &[u8]) -> Option<Vec<u8>> {
    if image.len() < 2 * PAGE || word(image, 16) != PAGE as u64 {
        return None;
    }
    let mut out = Vec::new();
    for off in [8usize, 16, 24] {
        out.extend_from_slice(&word(image, PAGE + off).to_ne_bytes());
    }
    out.extend_from_slice(&image[2 * PAGE..]);
    Some(out)
}
