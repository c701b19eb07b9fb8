//! `ioctl_args`: arbitrary command words, sizes and argument bytes, through the decoders
//! (`decode_device`/`decode_session`) and the full `device_ioctl`/`session_ioctl` of a
//! `LiveUpdate`, compared with a straightforward reference implementation of spec §2.4-§2.5.
//!
//! The argument is a byte buffer whose end faults, like the end of mapped memory. Every input
//! runs against a fresh state: an outgoing session "out", and an incoming session "inc"
//! (retrieved) holding one file under token 7 that a fixed handler hands back.
//!
//! Input encoding, repeated: `[target|mode][cmd: 1 byte, or 4 if mode][len: u16][len bytes]`,
//! target 0 = the device, 1 = "out", 2 = "inc"; mode (bit 7) = a raw 32-bit command word
//! instead of `0xBA00 | nr`.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use backend_user::{sys, HandlerRef, Installed, LiveUpdate, Memory, SessionFd, UserPlatform};
use luo_core::errno::{Errno, E2BIG, EBADF, EBUSY, EEXIST, EFAULT, EINVAL, ENOENT, ENOTTY};
use luo_core::uapi::{decode_device, decode_session, Direction, SliceArg};
use luo_core::uapi::{DeviceRequest, SessionRequest};
use luo_core::{FileHandler, Platform, Preserved, RetrieveStatus};

use crate::common::name_field;

/// The token of the incoming file.
pub const TOKEN: u64 = 7;
const DATA: u64 = 0x5EED;
const MAX_RECORDS: usize = 16;
const MAX_SESSIONS: usize = 32;

fn memfd() -> &'static OwnedFd {
    static FD: OnceLock<OwnedFd> = OnceLock::new();
    FD.get_or_init(|| sys::memfd_create(c"ioctl-args", libc::MFD_CLOEXEC).expect("memfd"))
}

fn fixed_id() -> u64 {
    UserPlatform::file_identity(memfd())
}

/// Accepts only the one fixed memfd and hands it back.
struct Fixed;

impl FileHandler<UserPlatform> for Fixed {
    fn key(&self) -> usize {
        core::ptr::from_ref(self) as usize
    }
    fn compatible(&self) -> &[u8] {
        b"ioctl-fixed"
    }
    fn can_preserve(&self, file: &OwnedFd) -> bool {
        UserPlatform::file_identity(file) == fixed_id()
    }
    fn preserve(&self, _file: &OwnedFd) -> Result<Preserved, Errno> {
        Ok(Preserved {
            data: DATA,
            private: 0,
        })
    }
    fn unpreserve(&self, _file: &OwnedFd, _state: Preserved) {}
    fn retrieve(&self, data: u64) -> Result<OwnedFd, Errno> {
        if data != DATA {
            return Err(EINVAL);
        }
        sys::dup_cloexec(memfd().as_fd()).map_err(|e| backend_user::errno_of(&e))
    }
    fn finish(&self, _file: Option<&OwnedFd>, _data: u64, _status: RetrieveStatus) {}
}

fn handler() -> HandlerRef {
    Arc::new(Fixed)
}

/// The handover every input boots from: session "inc" with the memfd under [`TOKEN`].
fn image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let lu = LiveUpdate::new().expect("cold boot");
        lu.register_handler(handler()).expect("register");
        let dev = lu.open().expect("open");
        let s = dev.create_session("inc").expect("create");
        s.preserve_fd(memfd().as_fd(), TOKEN).expect("preserve");
        lu.luo().reboot().expect("reboot");
        lu.memory().to_bytes()
    })
}

/// The reference's view of the state.
struct Ref {
    names: BTreeSet<Vec<u8>>,
    out_tokens: BTreeSet<u64>,
    out_holds: bool,
    inc_holds: bool,
    inc_retrieved_file: bool,
    inc_finished: bool,
}

/// Struct size and minimum size per command number (spec §2.4 step 5).
fn ksize(nr: u32) -> usize {
    match nr {
        0x00 | 0x01 | 0x43 => 72,
        0x40 | 0x41 => 16,
        _ => 8,
    }
}

/// Spec §2.4 steps 1-6, byte by byte: the kernel's copy of the struct, or the errno.
fn ref_decode(
    target: Option<Direction>,
    cmd: u32,
    arg: &[u8],
) -> Result<(u32, u32, Vec<u8>), Errno> {
    let nr = cmd & 0xff;
    match target {
        None if nr >= 2 => return Err(EINVAL),
        Some(_) if !(0x40..0x44).contains(&nr) => return Err(EINVAL),
        _ => {}
    }
    let Some(sz) = arg.get(..4) else {
        return Err(EFAULT);
    };
    let size = u32::from_ne_bytes([sz[0], sz[1], sz[2], sz[3]]);
    if cmd != 0xBA00 | nr {
        return Err(ENOTTY);
    }
    match (target, nr) {
        (Some(Direction::Incoming), 0x40) => return Err(EINVAL),
        (Some(Direction::Outgoing), 0x41 | 0x42) => return Err(EINVAL),
        _ => {}
    }
    let k = ksize(nr);
    if (size as usize) < k {
        return Err(EINVAL);
    }
    // check_zeroed_user: the first non-zero byte before the first unreadable one wins.
    for i in k..size as usize {
        match arg.get(i) {
            None => return Err(EFAULT),
            Some(0) => {}
            Some(_) => return Err(E2BIG),
        }
    }
    let copy = arg.get(..k).ok_or(EFAULT)?.to_vec();
    Ok((nr, size, copy))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The name a 64-byte field holds (up to the first NUL), if valid.
fn field_name(f: &[u8]) -> Option<Vec<u8>> {
    let len = f.iter().position(|&b| b == 0)?;
    (len > 0).then(|| f[..len].to_vec())
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mem = Memory::from_bytes(image().to_vec()).expect("own image");
    let lu = LiveUpdate::with_memory(Arc::new(mem)).expect("boot");
    lu.register_handler(handler()).expect("register");
    let dev = lu.open().expect("open");
    let out = dev.create_session("out").expect("create out");
    let inc = dev.retrieve_session("inc").expect("retrieve inc");
    let mut created: Vec<SessionFd> = Vec::new();
    let mut r = Ref {
        names: [b"out".to_vec()].into_iter().collect(),
        out_tokens: BTreeSet::new(),
        out_holds: false,
        inc_holds: false,
        inc_retrieved_file: false,
        inc_finished: false,
    };

    let mut at = 0usize;
    let byte = |at: &mut usize| {
        let b = data.get(*at).copied().unwrap_or(0);
        *at += 1;
        b
    };
    for _ in 0..MAX_RECORDS {
        if at >= data.len() {
            break;
        }
        let head = byte(&mut at);
        let cmd = if head & 0x80 != 0 {
            u32::from_ne_bytes([byte(&mut at), byte(&mut at), byte(&mut at), byte(&mut at)])
        } else {
            0xBA00 | u32::from(byte(&mut at))
        };
        let len = usize::from(u16::from_le_bytes([byte(&mut at), byte(&mut at)])) % 1024;
        let end = (at + len).min(data.len());
        let arg = data.get(at..end).unwrap_or(&[]).to_vec();
        at = end;
        let target = match head & 0x7f {
            0 => None,
            1 => Some(Direction::Outgoing),
            _ => Some(Direction::Incoming),
        };
        check_one(&dev, &out, &inc, &mut created, &mut r, target, cmd, arg);
    }
    drop(created);
}

#[allow(clippy::too_many_arguments)]
fn check_one(
    dev: &backend_user::Device,
    out: &SessionFd,
    inc: &SessionFd,
    created: &mut Vec<SessionFd>,
    r: &mut Ref,
    target: Option<Direction>,
    cmd: u32,
    arg: Vec<u8>,
) {
    // 1. The decoder alone.
    let want = ref_decode(target, cmd, &arg);
    let mut copy = arg.clone();
    let got: Result<Vec<u8>, Errno> = match target {
        None => decode_device(cmd, &mut SliceArg(&mut copy))
            .map(|req| match req {
                DeviceRequest::Create(s) | DeviceRequest::Retrieve(s) => s.bytes(),
            })
            .map_err(|e| e.errno()),
        Some(dir) => decode_session(cmd, dir, &mut SliceArg(&mut copy))
            .map(|req| match req {
                SessionRequest::PreserveFd(s) | SessionRequest::RetrieveFd(s) => s.bytes(),
                SessionRequest::Finish(s) | SessionRequest::GetName(s) => s.bytes(),
            })
            .map_err(|e| e.errno()),
    };
    // GET_NAME's name is output only: the decoder keeps the header of what it copied in.
    let header_only = |nr: u32, mut c: Vec<u8>| {
        if nr == 0x43 {
            c.truncate(8);
        }
        c
    };
    assert_eq!(
        got,
        want.clone().map(|(nr, _, c)| header_only(nr, c)),
        "decode of {cmd:#x} ({target:?}) with {} bytes",
        arg.len()
    );
    assert_eq!(copy, arg, "the decoder wrote to the argument");

    // 2. The full ioctl, against the reference execution.
    let mut buf = arg.clone();
    let result = match target {
        None => dev.ioctl(cmd, &mut buf),
        Some(Direction::Outgoing) => out.ioctl(cmd, &mut buf),
        Some(Direction::Incoming) => inc.ioctl(cmd, &mut buf),
    };
    let (nr, size, mut kcopy) = match want {
        Err(e) => {
            assert_eq!(result.err().map(|e| e.errno()), Some(e), "ioctl {cmd:#x}");
            assert_eq!(buf, arg, "a failed ioctl wrote its argument");
            return;
        }
        Ok(w) => w,
    };
    let expect: Result<(), Errno> = match nr {
        0x00 => match field_name(&kcopy[8..72]) {
            None => Err(EINVAL),
            Some(n) if r.names.contains(&n) => Err(EEXIST),
            Some(n) => {
                r.names.insert(n);
                Ok(())
            }
        },
        0x01 => match field_name(&kcopy[8..72]) {
            Some(n) if n == b"inc" => Err(EINVAL),
            _ => Err(ENOENT),
        },
        0x40 => {
            let token = u64::from_ne_bytes(kcopy[8..16].try_into().unwrap_or([0; 8]));
            let fd = u32_at(&kcopy, 4) as i32;
            if r.out_tokens.contains(&token) {
                Err(EEXIST)
            } else {
                match sys::fget(fd) {
                    Err(_) => Err(EBADF),
                    Ok(f) if UserPlatform::file_identity(&f) != fixed_id() => Err(ENOENT),
                    Ok(_) if r.out_holds || r.inc_holds => Err(EBUSY),
                    Ok(_) => {
                        r.out_tokens.insert(token);
                        r.out_holds = true;
                        Ok(())
                    }
                }
            }
        }
        0x41 => {
            let token = u64::from_ne_bytes(kcopy[8..16].try_into().unwrap_or([0; 8]));
            if r.inc_finished || token != TOKEN {
                Err(ENOENT)
            } else {
                if !r.inc_retrieved_file {
                    r.inc_retrieved_file = true;
                    r.inc_holds = !r.out_holds;
                }
                Ok(())
            }
        }
        0x42 | 0x43 if u32_at(&kcopy, 4) != 0 => Err(EINVAL),
        0x42 => {
            r.inc_finished = true;
            r.inc_holds = false;
            Ok(())
        }
        _ => {
            let name: &[u8] = if target == Some(Direction::Outgoing) {
                b"out"
            } else {
                b"inc"
            };
            kcopy[8..72].copy_from_slice(&name_field(name));
            Ok(())
        }
    };
    match (result, expect) {
        (Err(e), Err(w)) => {
            assert_eq!(e.errno(), w, "ioctl {cmd:#x}");
            assert_eq!(buf, arg, "a failed ioctl wrote its argument");
        }
        (Ok(installed), Ok(())) => {
            match installed {
                Installed::Nothing => assert!(matches!(nr, 0x40 | 0x42 | 0x43)),
                Installed::Session(s) => {
                    assert_eq!(nr, 0x00);
                    kcopy[4..8].copy_from_slice(&s.raw_fd().to_ne_bytes());
                    if created.len() < MAX_SESSIONS {
                        created.push(s);
                    } else {
                        // Closing it frees the name again.
                        if let Some(n) = field_name(&kcopy[8..72]) {
                            r.names.remove(&n);
                        }
                    }
                }
                Installed::File(f) => {
                    assert_eq!(nr, 0x41);
                    assert_eq!(UserPlatform::file_identity(&f), fixed_id());
                    kcopy[4..8].copy_from_slice(&f.as_raw_fd().to_ne_bytes());
                }
            }
            // The response: min(size, sizeof) bytes of the kernel copy; the rest untouched.
            let n = (size as usize).min(kcopy.len());
            let mut expected = arg.clone();
            expected[..n].copy_from_slice(&kcopy[..n]);
            assert_eq!(buf, expected, "response of {cmd:#x}");
        }
        (got, want) => panic!(
            "ioctl {cmd:#x}: got {:?}, reference {want:?}",
            got.map(|_| ())
        ),
    }
}

/// The native-endian bytes of a decoded uAPI struct (its `#[repr(C)]` layout, spec §2.3).
trait Bytes {
    fn bytes(&self) -> Vec<u8>;
}

impl Bytes for luo_core::uapi::CreateSession {
    fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(72);
        v.extend_from_slice(&self.size.to_ne_bytes());
        v.extend_from_slice(&self.fd.to_ne_bytes());
        v.extend_from_slice(&self.name);
        v
    }
}

impl Bytes for luo_core::uapi::PreserveFd {
    fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&self.size.to_ne_bytes());
        v.extend_from_slice(&self.fd.to_ne_bytes());
        v.extend_from_slice(&self.token.to_ne_bytes());
        v
    }
}

impl Bytes for luo_core::uapi::Finish {
    fn bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8);
        v.extend_from_slice(&self.size.to_ne_bytes());
        v.extend_from_slice(&self.reserved.to_ne_bytes());
        v
    }
}
