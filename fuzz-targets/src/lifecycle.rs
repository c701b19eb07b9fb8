//! `lifecycle`: an arbitrary sequence of operations against backend-user and a small reference
//! model of the spec (§2.5, §3, §4, §5, §6), step by step.
//!
//! Operations: create, retrieve, preserve, close, retrieve_fd, finish, get_name, reboot+boot,
//! open while open, reopen, and fault injection (`TestHandler::fail` on preserve, freeze,
//! retrieve and can_finish; `Memory::fail_alloc_after`). After every step:
//! - the result (errno) equals the model's;
//! - the callbacks that ran, in order, equal the model's (handler and FLB: so the spec's
//!   orders, FIFO preserve/freeze/can_finish, LIFO unpreserve/finish/unfreeze, FLB
//!   preserve/unpreserve on 0->1/1->0, FLB retrieve+finish on the last incoming file);
//! - the handover pages held equal the block pages the model's sessions and files need.
//!
//! At the end every session is closed and every incoming session finished, and every data
//! word preserved is balanced by exactly one unpreserve or finish, except those the model
//! knows were dropped by a reboot (incoming files never finished before the next reboot).
//!
//! Input encoding: one byte selects the operation, the next bytes its arguments (missing bytes
//! read as 0); at most [`MAX_OPS`] operations.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use backend_user::{sys, Device, FlbRef, HandlerRef, LiveUpdate, Memory, SessionFd};
use luo_core::errno::{Errno, EBUSY, EEXIST, EINVAL, EIO, ENOENT, ENOMEM, ENOSPC};
use luo_core::{Error, Platform};
use luo_handlers::testing::{Event, Journal, Op as Cb, Store, TestFlb, TestHandler};

/// At most this many operations per input.
pub const MAX_OPS: usize = 64;
const SLOTS: usize = 4;
const FILES: usize = 4;
const TOKENS: u8 = 4;
const NAMES: [&str; 4] = ["s0", "s1", "s2", ""];
const ERRNOS: [Errno; 4] = [EIO, ENOMEM, EINVAL, ENOSPC];
const CALLBACKS: [Cb; 4] = [Cb::Preserve, Cb::Freeze, Cb::Retrieve, Cb::CanFinish];
const H: &str = "lifecycle-handler";
const F: &str = "lifecycle-flb";
const FLB_DATA: u64 = luo_handlers::testing::TEST_FLB_DATA;
const SESSIONS_PER_BLOCK: usize = 51;
const FILES_PER_BLOCK: usize = 63;

/// One operation.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// CREATE_SESSION into an empty slot.
    Create(usize, usize),
    /// RETRIEVE_SESSION into an empty slot.
    Retrieve(usize, usize),
    /// PRESERVE_FD of a file with a token on a slot's session.
    Preserve(usize, usize, u64),
    /// close() of a slot's session fd.
    Close(usize),
    /// RETRIEVE_FD of a token.
    RetrieveFd(usize, u64),
    /// FINISH.
    Finish(usize),
    /// GET_NAME.
    GetName(usize),
    /// reboot(), then boot from the handover and open the device.
    Reboot,
    /// Make a handler callback fail with an errno.
    Fail(Cb, Errno),
    /// Stop failing a callback.
    Heal(Cb),
    /// Page allocation fails after n more successes (None: never).
    FailAlloc(Option<usize>),
    /// open() while the device is open (EBUSY).
    OpenAgain,
    /// close() and open() the device.
    Reopen,
}

/// Decodes the operations of an input.
pub fn decode_ops(data: &[u8]) -> Vec<Op> {
    let mut it = data.iter().copied();
    let mut next = move || it.next();
    let mut ops = Vec::new();
    while ops.len() < MAX_OPS {
        let Some(b) = next() else { break };
        let mut arg = || next().unwrap_or(0) as usize;
        let op = match b % 14 {
            0 => Op::Create(arg() % SLOTS, arg() % NAMES.len()),
            1 => Op::Retrieve(arg() % SLOTS, arg() % NAMES.len()),
            2 | 13 => Op::Preserve(
                arg() % SLOTS,
                arg() % FILES,
                (arg() % TOKENS as usize) as u64,
            ),
            3 => Op::Close(arg() % SLOTS),
            4 => Op::RetrieveFd(arg() % SLOTS, (arg() % TOKENS as usize) as u64),
            5 => Op::Finish(arg() % SLOTS),
            6 => Op::GetName(arg() % SLOTS),
            7 => Op::Reboot,
            8 => Op::Fail(CALLBACKS[arg() % 4], ERRNOS[arg() % 4]),
            9 => Op::Heal(CALLBACKS[arg() % 4]),
            10 => Op::FailAlloc(match arg() % 5 {
                4 => None,
                n => Some(n),
            }),
            11 => Op::OpenAgain,
            _ => Op::Reopen,
        };
        ops.push(op);
    }
    ops
}

/// Encodes operations (seed generation); `decode_ops(&encode_ops(ops))` gives `ops` back.
pub fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let cb = |c: Cb| CALLBACKS.iter().position(|&x| x == c).unwrap_or(0) as u8;
    let er = |e: Errno| ERRNOS.iter().position(|&x| x == e).unwrap_or(0) as u8;
    let mut out = Vec::new();
    for op in ops {
        match *op {
            Op::Create(s, n) => out.extend([0, s as u8, n as u8]),
            Op::Retrieve(s, n) => out.extend([1, s as u8, n as u8]),
            Op::Preserve(s, f, t) => out.extend([2, s as u8, f as u8, t as u8]),
            Op::Close(s) => out.extend([3, s as u8]),
            Op::RetrieveFd(s, t) => out.extend([4, s as u8, t as u8]),
            Op::Finish(s) => out.extend([5, s as u8]),
            Op::GetName(s) => out.extend([6, s as u8]),
            Op::Reboot => out.push(7),
            Op::Fail(c, e) => out.extend([8, cb(c), er(e)]),
            Op::Heal(c) => out.extend([9, cb(c)]),
            Op::FailAlloc(n) => out.extend([10, n.map_or(4, |n| n as u8)]),
            Op::OpenAgain => out.push(11),
            Op::Reopen => out.push(12),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The reference model.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    NotAttempted,
    Retrieved,
    Failed(Errno),
}

impl St {
    fn raw(self) -> i32 {
        match self {
            St::NotAttempted => 0,
            St::Retrieved => 1,
            St::Failed(e) => -e.get(),
        }
    }
}

#[derive(Clone, Debug)]
struct OutFile {
    file: usize,
    token: u64,
    data: u64,
}

#[derive(Clone, Debug)]
struct OutSession {
    key: u64,
    name: &'static str,
    files: Vec<OutFile>,
}

#[derive(Clone, Debug)]
struct InFile {
    file: usize,
    token: u64,
    data: u64,
    st: St,
    holds_id: bool,
}

#[derive(Clone, Debug)]
struct InSession {
    key: u64,
    name: &'static str,
    files: Vec<InFile>,
    retrieved: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Out(u64),
    In(u64),
}

struct Model {
    next_key: u64,
    out: Vec<OutSession>,
    inc: Vec<InSession>,
    slots: [Option<Dir>; SLOTS],
    ids: BTreeSet<usize>,
    next_data: u64,
    failing: BTreeMap<Cb, Errno>,
    alloc_left: Option<usize>,
    flb_out: u64,
    /// Incoming FLB: remaining count and finished.
    flb_in: Option<(u64, bool)>,
    events: Vec<Event>,
    dropped: BTreeSet<u64>,
}

fn blocks(n: usize, per: usize) -> usize {
    n.div_ceil(per)
}

impl Model {
    fn new() -> Self {
        Model {
            next_key: 0,
            out: Vec::new(),
            inc: Vec::new(),
            slots: [None; SLOTS],
            ids: BTreeSet::new(),
            next_data: 0x1000,
            failing: BTreeMap::new(),
            alloc_left: None,
            flb_out: 0,
            flb_in: None,
            events: Vec::new(),
            dropped: BTreeSet::new(),
        }
    }

    fn ev(&mut self, e: Event) {
        self.events.push(e);
    }

    fn alloc(&mut self) -> Result<(), Errno> {
        match self.alloc_left {
            Some(0) => Err(ENOMEM),
            Some(ref mut n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn pages(&self) -> usize {
        2 + blocks(self.out.len(), SESSIONS_PER_BLOCK)
            + self
                .out
                .iter()
                .map(|s| blocks(s.files.len(), FILES_PER_BLOCK))
                .sum::<usize>()
    }

    fn out_mut(&mut self, key: u64) -> &mut OutSession {
        self.out
            .iter_mut()
            .find(|s| s.key == key)
            .expect("slot names a live outgoing session")
    }

    fn in_idx(&self, key: u64) -> usize {
        self.inc
            .iter()
            .position(|s| s.key == key)
            .expect("slot names a live incoming session")
    }

    fn create(&mut self, name: &'static str) -> Result<Dir, Errno> {
        if name.is_empty() {
            return Err(EINVAL);
        }
        if self.out.iter().any(|s| s.name == name) {
            return Err(EEXIST);
        }
        if blocks(self.out.len() + 1, SESSIONS_PER_BLOCK)
            > blocks(self.out.len(), SESSIONS_PER_BLOCK)
        {
            self.alloc()?;
        }
        self.next_key += 1;
        self.out.push(OutSession {
            key: self.next_key,
            name,
            files: Vec::new(),
        });
        Ok(Dir::Out(self.next_key))
    }

    fn retrieve(&mut self, name: &'static str) -> Result<Dir, Errno> {
        let s = self
            .inc
            .iter_mut()
            .find(|s| s.name == name && !name.is_empty())
            .ok_or(ENOENT)?;
        if s.retrieved {
            return Err(EINVAL);
        }
        s.retrieved = true;
        Ok(Dir::In(s.key))
    }

    fn flb_put_out(&mut self) {
        self.flb_out -= 1;
        if self.flb_out == 0 {
            self.ev(Event::FlbUnpreserve(F.into()));
        }
    }

    fn preserve(&mut self, dir: Dir, file: usize, token: u64) -> Result<(), Errno> {
        let Dir::Out(key) = dir else {
            return Err(EINVAL);
        };
        let s = self.out_mut(key);
        if s.files.iter().any(|f| f.token == token) {
            return Err(EEXIST);
        }
        let n = s.files.len();
        if blocks(n + 1, FILES_PER_BLOCK) > blocks(n, FILES_PER_BLOCK) {
            self.alloc()?;
        }
        if self.ids.contains(&file) {
            return Err(EBUSY);
        }
        if self.flb_out == 0 {
            self.ev(Event::FlbPreserve(F.into()));
        }
        self.flb_out += 1;
        let data = self.next_data;
        self.next_data += 1;
        if let Some(&e) = self.failing.get(&Cb::Preserve) {
            self.flb_put_out();
            return Err(e);
        }
        self.ev(Event::Preserve(H.into(), data));
        self.ids.insert(file);
        self.out_mut(key).files.push(OutFile { file, token, data });
        Ok(())
    }

    fn close(&mut self, dir: Dir) {
        match dir {
            Dir::Out(key) => {
                let i = self
                    .out
                    .iter()
                    .position(|s| s.key == key)
                    .expect("live outgoing session");
                let s = self.out.remove(i);
                for f in s.files.iter().rev() {
                    self.ev(Event::Unpreserve(H.into(), f.data));
                    self.flb_put_out();
                    self.ids.remove(&f.file);
                }
            }
            Dir::In(key) => {
                let i = self.in_idx(key);
                if self.finish_files(i).is_ok() {
                    self.inc.remove(i);
                } else {
                    self.inc[i].retrieved = false;
                }
            }
        }
    }

    fn finish_files(&mut self, i: usize) -> Result<(), Errno> {
        let files = self.inc[i].files.clone();
        for f in &files {
            self.ev(Event::CanFinish(H.into(), f.data, f.st == St::Retrieved));
            if self.failing.contains_key(&Cb::CanFinish) {
                return Err(EBUSY);
            }
        }
        for f in files.iter().rev() {
            self.ev(Event::Finish(H.into(), f.data, f.st.raw()));
            if let Some((count, finished)) = self.flb_in {
                if !finished && count > 0 {
                    let count = count - 1;
                    self.flb_in = Some((count, false));
                    if count == 0 {
                        self.ev(Event::FlbRetrieve(F.into(), FLB_DATA));
                        self.ev(Event::FlbFinish(F.into(), FLB_DATA));
                        self.flb_in = Some((0, true));
                    }
                }
            }
            if f.holds_id {
                self.ids.remove(&f.file);
            }
        }
        self.inc[i].files.clear();
        Ok(())
    }

    fn retrieve_fd(&mut self, dir: Dir, token: u64) -> Result<usize, Errno> {
        let Dir::In(key) = dir else {
            return Err(EINVAL);
        };
        let i = self.in_idx(key);
        let fi = self.inc[i]
            .files
            .iter()
            .position(|f| f.token == token)
            .ok_or(ENOENT)?;
        let f = self.inc[i].files[fi].clone();
        match f.st {
            St::Failed(e) => return Err(e),
            St::Retrieved => return Ok(f.file),
            St::NotAttempted => {}
        }
        self.ev(Event::Retrieve(H.into(), f.data));
        if let Some(&e) = self.failing.get(&Cb::Retrieve) {
            self.inc[i].files[fi].st = St::Failed(e);
            return Err(e);
        }
        let holds = self.ids.insert(f.file);
        let m = &mut self.inc[i].files[fi];
        m.holds_id = holds;
        m.st = St::Retrieved;
        Ok(f.file)
    }

    fn finish(&mut self, dir: Dir) -> Result<(), Errno> {
        let Dir::In(key) = dir else {
            return Err(EINVAL);
        };
        let i = self.in_idx(key);
        self.finish_files(i)
    }

    fn name(&self, dir: Dir) -> &'static str {
        match dir {
            Dir::Out(k) => self.out.iter().find(|s| s.key == k).map_or("", |s| s.name),
            Dir::In(k) => self.inc.iter().find(|s| s.key == k).map_or("", |s| s.name),
        }
    }

    /// Freeze in order; on failure, unfreeze newest first and return the errno.
    fn reboot(&mut self) -> Result<(), Errno> {
        let mut frozen = Vec::new();
        for s in &self.out {
            for f in &s.files {
                if let Some(&e) = self.failing.get(&Cb::Freeze) {
                    for d in frozen.iter().rev() {
                        self.events.push(Event::Unfreeze(H.into(), *d));
                    }
                    return Err(e);
                }
                self.events.push(Event::Freeze(H.into(), f.data));
                frozen.push(f.data);
            }
        }
        // Boot: outgoing becomes incoming; what was incoming and not finished is dropped.
        for s in &self.inc {
            for f in &s.files {
                self.dropped.insert(f.data);
            }
        }
        let files: u64 = self.out.iter().map(|s| s.files.len() as u64).sum();
        self.flb_in = (files > 0).then_some((files, false));
        self.inc = std::mem::take(&mut self.out)
            .into_iter()
            .map(|s| InSession {
                key: s.key,
                name: s.name,
                files: s
                    .files
                    .into_iter()
                    .map(|f| InFile {
                        file: f.file,
                        token: f.token,
                        data: f.data,
                        st: St::NotAttempted,
                        holds_id: false,
                    })
                    .collect(),
                retrieved: false,
            })
            .collect();
        self.slots = [None; SLOTS];
        self.ids.clear();
        self.flb_out = 0;
        self.alloc_left = None;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The system under test.
// ---------------------------------------------------------------------------------------------

/// The `FILES` memfds every input preserves, made once per process: a memfd is only an
/// identity here (nothing reads or writes it), and every reference LUO or the handler takes is
/// a dup that the end of [`run`] has closed (no session, no stored object is left), so the next
/// input starts from files nobody else holds, as fresh ones would be.
pub fn test_files() -> &'static [OwnedFd; FILES] {
    static FILES_ONCE: OnceLock<[OwnedFd; FILES]> = OnceLock::new();
    FILES_ONCE.get_or_init(|| {
        std::array::from_fn(|_| sys::memfd_create(c"lifecycle", libc::MFD_CLOEXEC).expect("memfd"))
    })
}

struct System {
    journal: Journal,
    handler: Arc<TestHandler>,
    flb: Arc<TestFlb>,
    files: &'static [OwnedFd; FILES],
    lu: LiveUpdate,
    dev: Option<Device>,
    slots: [Option<SessionFd>; SLOTS],
}

impl System {
    fn boot(
        mem: Memory,
        journal: &Journal,
        handler: &Arc<TestHandler>,
        flb: &Arc<TestFlb>,
    ) -> (LiveUpdate, Device) {
        let lu = LiveUpdate::with_memory(Arc::new(mem)).expect("boot");
        let h: HandlerRef = handler.clone();
        let f: FlbRef = flb.clone();
        lu.register_handler(h.clone()).expect("register handler");
        lu.register_flb(&h, f).expect("register FLB");
        let dev = lu.open().expect("first open after boot");
        let _ = journal;
        (lu, dev)
    }

    fn identity(f: &OwnedFd) -> u64 {
        backend_user::UserPlatform::file_identity(f)
    }
}

fn errno<T>(r: Result<T, Error>) -> Result<T, Errno> {
    r.map_err(|e| e.errno())
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let ops = decode_ops(data);
    let journal = Journal::new();
    let store = Store::new();
    let handler = TestHandler::new(H, &journal, &store);
    let flb = TestFlb::new(F, 0, &journal);
    let files = test_files();
    let (lu, dev) = System::boot(Memory::new(), &journal, &handler, &flb);
    let mut sys = System {
        journal: journal.clone(),
        handler,
        flb,
        files,
        lu,
        dev: Some(dev),
        slots: Default::default(),
    };
    let mut model = Model::new();
    let mut history = journal.take();
    for (step, op) in ops.iter().enumerate() {
        apply(&mut sys, &mut model, *op, step);
        let got = sys.journal.take();
        let want = std::mem::take(&mut model.events);
        assert_eq!(got, want, "step {step} {op:?}: callbacks differ");
        history.extend(got);
        assert_eq!(
            sys.lu.memory().outgoing_pages(),
            model.pages(),
            "step {step} {op:?}: handover pages"
        );
    }
    // Teardown: heal, close everything, retrieve and finish every incoming session.
    for c in CALLBACKS {
        sys.handler.heal(c);
        model.failing.remove(&c);
    }
    sys.lu.memory().fail_alloc_after(None);
    model.alloc_left = None;
    for slot in 0..SLOTS {
        apply(&mut sys, &mut model, Op::Close(slot), usize::MAX);
    }
    for name in 0..NAMES.len() - 1 {
        apply(&mut sys, &mut model, Op::Retrieve(0, name), usize::MAX);
        apply(&mut sys, &mut model, Op::Close(0), usize::MAX);
    }
    let got = sys.journal.take();
    assert_eq!(got, std::mem::take(&mut model.events), "teardown callbacks");
    history.extend(got);
    assert!(model.out.is_empty() && model.inc.is_empty());
    assert_eq!(sys.lu.luo().outgoing_count(), 0);
    assert_eq!(sys.lu.luo().incoming_count(), 0);
    assert_eq!(sys.lu.memory().outgoing_pages(), 2);
    // Every preserve balanced by exactly one unpreserve or finish, unless a reboot dropped it.
    for e in &history {
        if let Event::Preserve(_, d) = e {
            let undone = history
                .iter()
                .filter(|x| matches!(x, Event::Unpreserve(_, y) | Event::Finish(_, y, _) if y == d))
                .count();
            let want = usize::from(!model.dropped.contains(d));
            assert_eq!(undone, want, "data {d:#x}: preserve undone {undone} times");
        }
    }
    drop(sys.flb);
}

fn apply(sys: &mut System, m: &mut Model, op: Op, step: usize) {
    match op {
        Op::Create(slot, name) | Op::Retrieve(slot, name) => {
            if sys.slots[slot].is_some() {
                return;
            }
            let Some(dev) = sys.dev.as_ref() else { return };
            let (got, want) = if matches!(op, Op::Create(..)) {
                (
                    errno(dev.create_session(NAMES[name])),
                    m.create(NAMES[name]),
                )
            } else {
                (
                    errno(dev.retrieve_session(NAMES[name])),
                    m.retrieve(NAMES[name]),
                )
            };
            assert_eq!(
                got.as_ref().err(),
                want.as_ref().err(),
                "step {step} {op:?}"
            );
            if let (Ok(fd), Ok(dir)) = (got, want) {
                sys.slots[slot] = Some(fd);
                m.slots[slot] = Some(dir);
            }
        }
        Op::Preserve(slot, file, token) => {
            let (Some(fd), Some(dir)) = (&sys.slots[slot], m.slots[slot]) else {
                return;
            };
            let got = errno(fd.preserve_fd(sys.files[file].as_fd(), token));
            let want = m.preserve(dir, file, token);
            assert_eq!(got, want, "step {step} {op:?}");
        }
        Op::Close(slot) => {
            let (Some(fd), Some(dir)) = (sys.slots[slot].take(), m.slots[slot].take()) else {
                return;
            };
            drop(fd);
            m.close(dir);
        }
        Op::RetrieveFd(slot, token) => {
            let (Some(fd), Some(dir)) = (&sys.slots[slot], m.slots[slot]) else {
                return;
            };
            let got = errno(fd.retrieve_fd(token));
            let want = m.retrieve_fd(dir, token);
            match (got, want) {
                (Ok(f), Ok(file)) => {
                    assert_eq!(
                        System::identity(&f),
                        System::identity(&sys.files[file]),
                        "step {step} {op:?}: retrieved the wrong file"
                    );
                    assert!(sys::get_cloexec(f.as_fd()).unwrap_or(false));
                }
                (got, want) => assert_eq!(got.err(), want.err(), "step {step} {op:?}"),
            }
        }
        Op::Finish(slot) => {
            let (Some(fd), Some(dir)) = (&sys.slots[slot], m.slots[slot]) else {
                return;
            };
            assert_eq!(errno(fd.finish()), m.finish(dir), "step {step} {op:?}");
        }
        Op::GetName(slot) => {
            let (Some(fd), Some(dir)) = (&sys.slots[slot], m.slots[slot]) else {
                return;
            };
            assert_eq!(
                errno(fd.get_name()).as_deref(),
                Ok(m.name(dir)),
                "step {step} {op:?}"
            );
        }
        Op::Reboot => {
            let got = errno(sys.lu.luo().reboot());
            let want = m.reboot();
            assert_eq!(got, want, "step {step} {op:?}");
            if got.is_ok() {
                let bytes = sys.lu.memory().to_bytes();
                // The old image's fds and device go away with it (closing does nothing now).
                sys.slots = Default::default();
                sys.dev = None;
                let mem = Memory::from_bytes(bytes).expect("own handover parses");
                let (lu, dev) = System::boot(mem, &sys.journal, &sys.handler, &sys.flb);
                sys.lu = lu;
                sys.dev = Some(dev);
            }
        }
        Op::Fail(cb, e) => {
            sys.handler.fail(cb, None, e);
            m.failing.insert(cb, e);
        }
        Op::Heal(cb) => {
            sys.handler.heal(cb);
            m.failing.remove(&cb);
        }
        Op::FailAlloc(n) => {
            sys.lu.memory().fail_alloc_after(n);
            m.alloc_left = n;
        }
        Op::OpenAgain => {
            if sys.dev.is_some() {
                assert_eq!(
                    sys.lu.open().err(),
                    Some(Error::DeviceBusy),
                    "step {step} {op:?}"
                );
            }
        }
        Op::Reopen => {
            sys.dev = None;
            sys.dev = Some(sys.lu.open().expect("reopen"));
        }
    }
}
