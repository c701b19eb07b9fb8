//! The model bodies. Each runs a few LUO operations on concurrent threads and asserts a stated
//! invariant over the results, the callback journal, the handover and the page accounting.
//!
//! Under `--cfg loom`, `tests/loom.rs` runs each body with `loom::model`, which explores every
//! interleaving of the facade's lock operations (bounded by `LOOM_MAX_PREEMPTIONS`). Without
//! loom, `tests/std_stress.rs` runs them on real threads many times, which checks the same
//! assertions on whatever interleavings the OS produces.
//!
//! The models unwrap freely: a failure is a finding.

use luo_core::dispatch::FdTable;
use luo_core::errno::{EBADF, EBUSY, EEXIST, EFAULT, ENOENT, ESHUTDOWN};
use luo_core::uapi::{Direction, UserArg, LIVEUPDATE_IOCTL_CREATE_SESSION};
use luo_core::{create_name, retrieve_name, Error, Luo, SessionRef};

use crate::handover::{self, CanonFile, CanonFlb, CanonSession, Canonical};
use crate::platform::{FakeFile, LoomPlatform};
use crate::recorder::{data_of, Event, Flb, Handler, Journal};
use crate::sync::{thread, Arc};

/// The compatible string of the models' handler.
pub const HANDLER: &str = "loom-handler-v1";
/// The compatible string of the models' FLB.
pub const FLB: &str = "loom-flb-v1";
/// The data word the models' FLB hands over.
pub const FLB_DATA: u64 = 0xF1B0_F1B0;

type L = Luo<LoomPlatform>;
type S = SessionRef<LoomPlatform>;

/// A session name field.
pub fn name(s: &str) -> [u8; 64] {
    let mut n = [0u8; 64];
    n[..s.len()].copy_from_slice(s.as_bytes());
    n
}

/// A booted and started LUO with one recording handler (and optionally an FLB linked to it).
pub struct World {
    /// The orchestrator, shared with the model's threads.
    pub luo: Arc<L>,
    /// Its platform (memory, log).
    pub platform: LoomPlatform,
    /// The callback record.
    pub journal: Journal,
    /// The handler.
    pub handler: Handler,
    /// The FLB, if any.
    pub flb: Option<Flb>,
}

impl World {
    /// A cold boot.
    pub fn cold(with_flb: bool) -> Self {
        Self::boot(LoomPlatform::new(), with_flb, |j| Handler::new(HANDLER, j))
    }

    /// Boots `platform`, registering a handler made by `handler` (and an FLB) before returning.
    pub fn boot(
        platform: LoomPlatform,
        with_flb: bool,
        handler: impl FnOnce(&Journal) -> Handler,
    ) -> Self {
        let luo = Luo::new(platform.clone(), true).unwrap();
        luo.start().unwrap();
        let journal = Journal::new();
        let handler = handler(&journal);
        luo.register_handler(&handler).unwrap();
        let flb = with_flb.then(|| {
            let f = Flb::new(FLB, FLB_DATA, &journal);
            luo.register_flb(&handler, &f).unwrap();
            f
        });
        World {
            luo: Arc::new(luo),
            platform,
            journal,
            handler,
            flb,
        }
    }

    /// Creates an outgoing session (setup: must succeed).
    pub fn create(&self, n: &str) -> S {
        self.luo
            .begin()
            .and_then(|l| l.create_session(&create_name(&name(n))?))
            .unwrap()
    }

    /// Preserves file `id` under `token`.
    pub fn preserve(&self, s: &S, token: u64, id: u64) -> Result<(), Error> {
        self.luo
            .begin()
            .and_then(|l| l.preserve_fd(s, token, || Ok(FakeFile::new(id))))
    }

    /// Closes a session (the last fd of it).
    pub fn release(&self, s: &S) -> Result<(), Error> {
        self.luo.begin().and_then(|l| l.release_session(s))
    }

    /// Pages the core should hold with no sessions: the root and the FLB page.
    pub const BASE_PAGES: usize = 2;

    /// Asserts the core logged no warning or error.
    pub fn assert_quiet(&self) {
        assert_eq!(self.platform.complaints(), Vec::<String>::new());
    }
}

fn count(j: &Journal, e: Event) -> usize {
    j.count(|x| *x == e)
}

// -------------------------------------------------------------------------------------------
// 1. The same file preserved from two sessions at once.
// -------------------------------------------------------------------------------------------

/// Two threads preserve the same file (identity 7) into two different sessions.
///
/// Invariant: exactly one succeeds and the other gets `EBUSY`; the handler's `preserve` ran
/// exactly once; after both sessions close, `unpreserve` ran exactly once, the identity is
/// free again, and every block page is back.
pub fn same_file_two_sessions() {
    let w = World::cold(false);
    let s1 = w.create("one");
    let s2 = w.create("two");
    let (luo, s1c) = (w.luo.clone(), s1.clone());
    let t = thread::spawn(move || {
        luo.begin()
            .and_then(|l| l.preserve_fd(&s1c, 1, || Ok(FakeFile::new(7))))
    });
    let r2 = w.preserve(&s2, 2, 7);
    let r1 = t.join().unwrap();
    match (r1, r2) {
        (Ok(()), Err(e)) | (Err(e), Ok(())) => {
            assert_eq!(e, Error::AlreadyPreserved);
            assert_eq!(e.errno(), EBUSY);
        }
        other => panic!("expected exactly one success and one EBUSY, got {other:?}"),
    }
    assert_eq!(s1.file_count() + s2.file_count(), 1);
    assert_eq!(count(&w.journal, Event::Preserve(7)), 1);
    w.release(&s1).unwrap();
    w.release(&s2).unwrap();
    assert_eq!(count(&w.journal, Event::Unpreserve(7)), 1);
    let s3 = w.create("three");
    w.preserve(&s3, 3, 7).unwrap();
    w.release(&s3).unwrap();
    assert_eq!(w.platform.outgoing_pages(), World::BASE_PAGES);
    w.assert_quiet();
}

// -------------------------------------------------------------------------------------------
// 2. PRESERVE_FD racing the close of the same session.
// -------------------------------------------------------------------------------------------

/// One thread preserves file 2 into a session holding file 1 while another closes it.
///
/// Invariant: every successful preserve is undone exactly once (`unpreserve` count per file ==
/// successful preserve count), a preserve that loses the race fails with `EBADF` (the fd is
/// gone) and leaves nothing behind: no identity held, no block page, no session.
pub fn preserve_races_close() {
    let w = World::cold(true);
    let s = w.create("racy");
    w.preserve(&s, 1, 1).unwrap();
    let (luo, sc) = (w.luo.clone(), s.clone());
    let t = thread::spawn(move || {
        luo.begin()
            .and_then(|l| l.preserve_fd(&sc, 2, || Ok(FakeFile::new(2))))
    });
    w.release(&s).unwrap();
    let r = t.join().unwrap();
    if let Err(e) = r {
        assert_eq!(e, Error::BadFd, "a preserve into a closed session");
    }
    let ok2 = usize::from(r.is_ok());
    assert_eq!(count(&w.journal, Event::Preserve(1)), 1);
    assert_eq!(count(&w.journal, Event::Unpreserve(1)), 1);
    assert_eq!(count(&w.journal, Event::Preserve(2)), ok2);
    assert_eq!(count(&w.journal, Event::Unpreserve(2)), ok2);
    // The FLB followed the files: preserved once per 0->1, unpreserved once per 1->0.
    assert_flb_balanced(&w.journal);
    assert_eq!(w.luo.outgoing_count(), 0);
    assert_eq!(w.platform.outgoing_pages(), World::BASE_PAGES);
    // Both identities are free.
    let s2 = w.create("after");
    w.preserve(&s2, 1, 1).unwrap();
    w.preserve(&s2, 2, 2).unwrap();
    w.release(&s2).unwrap();
    w.assert_quiet();
}

// -------------------------------------------------------------------------------------------
// 3. Two CREATE_SESSION with the same name.
// -------------------------------------------------------------------------------------------

/// Two threads create a session named "same".
///
/// Invariant: exactly one succeeds, the other gets `EEXIST`; one outgoing session exists and
/// holds exactly one session block; closing it returns every page.
pub fn duplicate_create() {
    let w = World::cold(false);
    let luo = w.luo.clone();
    let t = thread::spawn(move || {
        luo.begin()
            .and_then(|l| l.create_session(&create_name(&name("same"))?))
    });
    let r2 = w
        .luo
        .begin()
        .and_then(|l| l.create_session(&create_name(&name("same"))?));
    let r1 = t.join().unwrap();
    assert_eq!(Error::NameExists.errno(), EEXIST);
    let winner = one_winner(r1, r2, Error::NameExists);
    assert_eq!(w.luo.outgoing_count(), 1);
    assert_eq!(w.platform.outgoing_pages(), World::BASE_PAGES + 1);
    w.release(&winner).unwrap();
    assert_eq!(w.luo.outgoing_count(), 0);
    assert_eq!(w.platform.outgoing_pages(), World::BASE_PAGES);
    w.assert_quiet();
}

// -------------------------------------------------------------------------------------------
// 4. Reboot racing create, preserve and close.
// -------------------------------------------------------------------------------------------

/// Session "a" holds file 1. Concurrently: a reboot; a thread creating session "b" and
/// preserving file 2 into it; the main thread closing "a".
///
/// Invariant: the handover decodes to exactly the state before the cut, as the return values
/// tell it: "a" with file 1 iff its close failed with `ESHUTDOWN`, "b" iff its create
/// succeeded, file 2 in it iff that preserve succeeded; the FLB entry counts exactly the
/// handed-over files; `freeze` ran once per handed-over file and nothing was unfrozen; every
/// operation that failed, failed with `ESHUTDOWN`, and every mutation after the reboot does.
pub fn reboot_cut() {
    let w = World::cold(true);
    let a = w.create("a");
    w.preserve(&a, 10, 1).unwrap();

    let luo = w.luo.clone();
    let reboot = thread::spawn(move || luo.reboot());
    let luo = w.luo.clone();
    let creator = thread::spawn(move || {
        let b = luo
            .begin()
            .and_then(|l| l.create_session(&create_name(&name("b"))?))?;
        let p = luo
            .begin()
            .and_then(|l| l.preserve_fd(&b, 20, || Ok(FakeFile::new(2))));
        Ok::<_, Error>((b, p))
    });
    let closed = w.release(&a);
    reboot.join().unwrap().unwrap();
    let created = creator.join().unwrap();

    for r in [closed.err(), created.as_ref().err().copied()]
        .into_iter()
        .chain([created.as_ref().ok().and_then(|(_, p)| p.err())])
        .flatten()
    {
        assert_eq!(r, Error::Serialized);
        assert_eq!(r.errno(), ESHUTDOWN);
    }

    let file = |id: u64, token: u64| CanonFile {
        compat: HANDLER.into(),
        data: data_of(id),
        token,
    };
    let mut expected = Canonical {
        liveupdate_num: 1,
        ..Canonical::default()
    };
    if closed.is_err() {
        expected.sessions.push(CanonSession {
            name: "a".into(),
            files: vec![file(1, 10)],
        });
    }
    if let Ok((_, p)) = &created {
        expected.sessions.push(CanonSession {
            name: "b".into(),
            files: if p.is_ok() { vec![file(2, 20)] } else { vec![] },
        });
    }
    let files: usize = expected.sessions.iter().map(|s| s.files.len()).sum();
    if files > 0 {
        expected.flbs.push(CanonFlb {
            compat: FLB.into(),
            data: FLB_DATA,
            count: files as u64,
        });
    }
    let snap = w.platform.snapshot();
    assert_eq!(handover::decode(&snap).unwrap(), expected);
    // Frozen exactly what was handed over, once; nothing rolled back.
    assert_eq!(
        count(&w.journal, Event::Freeze(1)),
        usize::from(closed.is_err())
    );
    let b_has_file = matches!(&created, Ok((_, Ok(()))));
    assert_eq!(count(&w.journal, Event::Freeze(2)), usize::from(b_has_file));
    assert_eq!(w.journal.count(|e| matches!(e, Event::Unfreeze(_))), 0);

    // Nothing changes after the cut.
    assert!(w.luo.is_serialized());
    assert_eq!(
        w.luo
            .begin()
            .and_then(|l| l.create_session(&create_name(&name("c"))?))
            .err(),
        Some(Error::Serialized)
    );
    if let Ok((b, _)) = &created {
        assert_eq!(w.preserve(b, 30, 3), Err(Error::Serialized));
        assert_eq!(w.release(b), Err(Error::Serialized));
    }
    if closed.is_err() {
        assert_eq!(w.release(&a), Err(Error::Serialized));
    }
    assert_eq!(w.platform.snapshot(), snap);
    w.assert_quiet();
}

// -------------------------------------------------------------------------------------------
// 4b. CREATE_SESSION whose reply faults, against the reboot.
// -------------------------------------------------------------------------------------------

/// A CREATE_SESSION request whose reply cannot be written (the user's buffer faults on write).
struct FaultingReply(Vec<u8>);

impl FaultingReply {
    fn create(n: &str) -> Self {
        let mut v = vec![0u8; 72];
        v[0..4].copy_from_slice(&72u32.to_ne_bytes());
        v[8..72].copy_from_slice(&name(n));
        FaultingReply(v)
    }
}

impl UserArg for FaultingReply {
    fn read(&mut self, offset: usize, buf: &mut [u8]) -> luo_core::Result {
        let src = self.0.get(offset..offset + buf.len()).ok_or(Error::Fault)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write(&mut self, _offset: usize, _data: &[u8]) -> luo_core::Result {
        Err(Error::Fault)
    }
}

/// An fd table that never runs out; what it installs is kept, so the model can see it.
#[derive(Default)]
struct ModelFds {
    installed: Vec<S>,
}

impl FdTable<LoomPlatform> for ModelFds {
    type Slot = ();
    type SessionFile = S;
    fn reserve(&mut self) -> luo_core::Result<()> {
        Ok(())
    }
    fn slot_fd(&self, _slot: &()) -> i32 {
        3
    }
    fn session_file(&mut self, session: &S) -> luo_core::Result<S> {
        Ok(session.clone())
    }
    fn discard_session_file(&mut self, _file: S) {}
    fn install_session(&mut self, _slot: (), file: S) {
        self.installed.push(file);
    }
    fn install_file(&mut self, _slot: (), _file: FakeFile) {}
    fn fget(&mut self, _fd: i32) -> luo_core::Result<FakeFile> {
        Err(Error::BadFd)
    }
}

/// CREATE_SESSION runs while another thread reboots, and its reply faults, so the creation is
/// undone (spec §2.5: nothing of a failed CREATE remains).
///
/// Invariant: whatever the interleaving, the session is not in the handover: either the reboot
/// came first (CREATE fails with `ESHUTDOWN`) or CREATE, its failed reply and its undo all ran
/// under one hold of the serialize lock, before the reboot (`EFAULT`, and the session is gone
/// when the reboot serializes). If the lock were released between the create and the undo, a
/// reboot in between would hand over a session nobody has an fd for, and the undo would fail.
pub fn create_reply_fault_races_reboot() {
    let w = World::cold(false);
    let luo = w.luo.clone();
    let creator = thread::spawn(move || {
        let mut fds = ModelFds::default();
        let r = luo.device_ioctl(
            LIVEUPDATE_IOCTL_CREATE_SESSION,
            &mut FaultingReply::create("b"),
            &mut fds,
        );
        (r, fds.installed.len())
    });
    w.luo.reboot().unwrap();
    let (r, installed) = creator.join().unwrap();
    assert_eq!(installed, 0, "nothing installed after a failed reply");
    let e = r.expect_err("the reply always faults");
    assert!(
        e.errno() == EFAULT || e == Error::Serialized,
        "CREATE failed with {e:?}"
    );
    assert_eq!(w.luo.outgoing_count(), 0, "the session was undone");
    let expected = Canonical {
        liveupdate_num: 1,
        ..Canonical::default()
    };
    assert_eq!(handover::decode(&w.platform.snapshot()).unwrap(), expected);
    w.assert_quiet();
}

// -------------------------------------------------------------------------------------------
// 5. FLB refcount under concurrent preserve and unpreserve.
// -------------------------------------------------------------------------------------------

/// Checks, on the journal order, that the FLB's callbacks ran exactly once per 0->1 and 1->0
/// transition of the number of dependent files: `FlbPreserve` and `FlbUnpreserve` alternate,
/// start with a preserve, happen only when no file of the handler is preserved, and every file
/// preserve happens while the FLB is preserved. Returns the number of preserve/unpreserve
/// pairs; panics if the FLB is left preserved.
pub fn assert_flb_balanced(j: &Journal) -> usize {
    let mut live = 0i64;
    let mut on = false;
    let mut pairs = 0;
    for e in j.events() {
        match e {
            Event::FlbPreserve => {
                assert!(
                    !on,
                    "FLB preserved twice without unpreserve: {:?}",
                    j.events()
                );
                assert_eq!(live, 0, "FLB preserve with dependent files live");
                on = true;
            }
            Event::FlbUnpreserve => {
                assert!(on, "FLB unpreserve without preserve: {:?}", j.events());
                assert_eq!(live, 0, "FLB unpreserve with dependent files live");
                on = false;
                pairs += 1;
            }
            Event::Preserve(_) => {
                assert!(on, "file preserved before its FLB");
                live += 1;
            }
            Event::Unpreserve(_) => {
                assert!(on, "file unpreserved after its FLB");
                live -= 1;
            }
            _ => {}
        }
    }
    assert_eq!(live, 0);
    assert!(!on, "FLB left preserved with no files: {:?}", j.events());
    pairs
}

/// Two threads each preserve a file of the same handler into their own session and close it.
///
/// Invariant: see [`assert_flb_balanced`]; at least one preserve/unpreserve pair ran and at
/// most one per preserve attempt (a failed file preserve may be the 0->1 and the 1->0).
pub fn flb_refcount() {
    flb_refcount_with(Handler::new)
}

/// [`flb_refcount`] where the second file's `preserve` fails after its FLB reference was
/// taken, so the error path drops that reference concurrently with the other thread.
pub fn flb_refcount_failing_preserve() {
    flb_refcount_with(|c, j| Handler::failing_preserve(c, j, 2))
}

fn flb_refcount_with(make: impl FnOnce(&'static str, &Journal) -> Handler) {
    let w = World::boot(LoomPlatform::new(), true, |j| make(HANDLER, j));
    let s1 = w.create("one");
    let s2 = w.create("two");
    let (luo, s1c) = (w.luo.clone(), s1.clone());
    let t = thread::spawn(move || {
        let r = luo
            .begin()
            .and_then(|l| l.preserve_fd(&s1c, 1, || Ok(FakeFile::new(1))));
        luo.begin().and_then(|l| l.release_session(&s1c)).unwrap();
        r
    });
    let r2 = w.preserve(&s2, 2, 2);
    w.release(&s2).unwrap();
    let r1 = t.join().unwrap();
    r1.unwrap();
    if let Err(e) = r2 {
        assert_eq!(e, Error::Handler(luo_core::errno::EIO));
    }
    let pairs = assert_flb_balanced(&w.journal);
    assert!((1..=2).contains(&pairs), "{pairs} FLB pairs");
    assert_eq!(w.platform.outgoing_pages(), World::BASE_PAGES);
    w.assert_quiet();
}

// -------------------------------------------------------------------------------------------
// 6. FINISH racing RETRIEVE_FD and close on an incoming session.
// -------------------------------------------------------------------------------------------

/// The incoming state every model 6 variant boots from: session "in" with files 1 (token 11)
/// and 2 (token 12) of the models' handler, and the FLB with two dependent files.
pub fn incoming_image() -> crate::platform::Handover {
    let f = |id: u64| CanonFile {
        compat: HANDLER.into(),
        data: data_of(id),
        token: 10 + id,
    };
    handover::build(
        1,
        &[CanonSession {
            name: "in".into(),
            files: vec![f(1), f(2)],
        }],
        &[CanonFlb {
            compat: FLB.into(),
            data: FLB_DATA,
            count: 2,
        }],
    )
}

/// RETRIEVE_SESSION of the incoming session "in".
fn retrieve_in(luo: &Luo<LoomPlatform>) -> Result<S, Error> {
    luo.begin()
        .and_then(|l| l.retrieve_session(&retrieve_name(&name("in"))?))
}

/// Of two racing operations exactly one succeeds and the other fails with `lost`: the winner.
fn one_winner(a: Result<S, Error>, b: Result<S, Error>, lost: Error) -> S {
    match (a, b) {
        (Ok(s), Err(e)) | (Err(e), Ok(s)) => {
            assert_eq!(e, lost);
            s
        }
        (a, b) => panic!(
            "expected one success and one {lost:?}, got {:?} / {:?}",
            a.map(|_| ()),
            b.map(|_| ())
        ),
    }
}

/// Boots from `image`, opens the device and retrieves session "in".
fn incoming_world(
    image: &crate::platform::Handover,
    make: impl FnOnce(&Journal) -> Handler,
) -> (World, S) {
    let w = World::boot(LoomPlatform::booted_from(image), true, make);
    w.luo.open().unwrap();
    let s = retrieve_in(&w.luo).unwrap();
    assert_eq!(s.direction(), Direction::Incoming);
    (w, s)
}

/// What a RETRIEVE_FD returned, checked against the journal: the file itself (and then the
/// finish saw it retrieved), `ENOENT` because the session was already finished, or `EBADF`
/// because it was already closed (and then the finish saw it never retrieved). Nothing else.
fn check_retrieve(j: &Journal, r: &Result<FakeFile, Error>, id: u64) {
    match r {
        Ok(f) => {
            assert_eq!(f.id, id);
            assert_eq!(count(j, Event::Retrieve(id)), 1);
            assert_eq!(count(j, Event::Finish(id, true, 1)), 1);
        }
        Err(e) => {
            assert!(
                matches!(e, Error::NoSuchToken | Error::BadFd),
                "retrieve failed with {e:?}"
            );
            assert!([ENOENT, EBADF].contains(&e.errno()));
            assert_eq!(count(j, Event::Retrieve(id)), 0);
            assert_eq!(count(j, Event::Finish(id, false, 0)), 1);
        }
    }
}

/// Every file finished exactly once, the FLB retrieved at most once and finished exactly once
/// after the last file, the identities free, the session gone, the incoming pages released.
fn check_finished(w: &World) {
    let events = w.journal.events();
    for id in [1, 2] {
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::Finish(i, _, _) if *i == id))
                .count(),
            1,
            "file {id} finished exactly once: {events:?}"
        );
    }
    let flb_finish = events.iter().position(|e| *e == Event::FlbFinish);
    let last_finish = events.iter().rposition(|e| matches!(e, Event::Finish(..)));
    assert_eq!(count(&w.journal, Event::FlbFinish), 1, "{events:?}");
    assert!(flb_finish > last_finish, "FLB finished before its files");
    assert_eq!(count(&w.journal, Event::FlbRetrieve(FLB_DATA)), 1);
    assert_eq!(w.luo.incoming_count(), 0);
    // The identities of retrieved files are free again.
    let s = w.create("next");
    w.preserve(&s, 1, 1).unwrap();
    w.preserve(&s, 2, 2).unwrap();
    w.release(&s).unwrap();
    w.assert_quiet();
}

/// FINISH on one thread, RETRIEVE_FD of file 1 on another; then the session is closed.
///
/// Invariant: each file is finished exactly once (the close finds nothing left), the FLB is
/// finished exactly once after both, and the retrieve returned the file iff it ran before the
/// finish ([`check_retrieve`]).
pub fn finish_races_retrieve() {
    let (w, s) = incoming_world(&incoming_image(), |j| Handler::new(HANDLER, j));
    let (luo, sc) = (w.luo.clone(), s.clone());
    let t = thread::spawn(move || luo.begin().and_then(|l| l.retrieve_fd(&sc, 11)));
    w.luo.begin().and_then(|l| l.finish(&s)).unwrap();
    let r = t.join().unwrap();
    check_retrieve(&w.journal, &r, 1);
    drop(r);
    // FINISH again is a no-op, and the close finishes nothing more.
    w.luo.begin().and_then(|l| l.finish(&s)).unwrap();
    w.release(&s).unwrap();
    check_finished(&w);
}

/// FINISH, RETRIEVE_FD of file 2 and the close of the session, all at once.
///
/// Invariant: as [`finish_races_retrieve`]; the close succeeds, and FINISH succeeds unless
/// the close came first (then `EBADF`: the fd is gone); the files are finished once either way.
pub fn finish_retrieve_close() {
    let (w, s) = incoming_world(&incoming_image(), |j| Handler::new(HANDLER, j));
    let (luo, sc) = (w.luo.clone(), s.clone());
    let finisher = thread::spawn(move || luo.begin().and_then(|l| l.finish(&sc)));
    let (luo, sc) = (w.luo.clone(), s.clone());
    let retriever = thread::spawn(move || luo.begin().and_then(|l| l.retrieve_fd(&sc, 12)));
    w.release(&s).unwrap();
    let finished = finisher.join().unwrap();
    assert!(
        matches!(finished, Ok(()) | Err(Error::BadFd)),
        "{finished:?}"
    );
    let r = retriever.join().unwrap();
    check_retrieve(&w.journal, &r, 2);
    drop(r);
    check_finished(&w);
}

/// FINISH refused by `can_finish` racing RETRIEVE_FD and the close.
///
/// Invariant: nothing is finished (no `finish`, no FLB `finish`), FINISH and the close both
/// fail with `EBUSY`, the retrieve always returns the file, and the session goes back to
/// unretrieved: it can be retrieved again and still holds both files.
pub fn refused_finish_races_retrieve() {
    let (w, s) = incoming_world(&incoming_image(), |j| Handler::refusing_finish(HANDLER, j));
    let (luo, sc) = (w.luo.clone(), s.clone());
    let finisher = thread::spawn(move || luo.begin().and_then(|l| l.finish(&sc)));
    let (luo, sc) = (w.luo.clone(), s.clone());
    let retriever = thread::spawn(move || luo.begin().and_then(|l| l.retrieve_fd(&sc, 11)));
    let closed = w.release(&s);
    let finished = finisher.join().unwrap();
    let r = retriever.join().unwrap();
    assert_eq!(finished, Err(Error::FinishRefused));
    assert_eq!(closed, Err(Error::FinishRefused));
    assert_eq!(r.unwrap().id, 1);
    assert_eq!(w.journal.count(|e| matches!(e, Event::Finish(..))), 0);
    assert_eq!(count(&w.journal, Event::FlbFinish), 0);
    let again = retrieve_in(&w.luo).unwrap();
    assert_eq!(again.file_count(), 2);
    assert_eq!(
        w.luo
            .begin()
            .and_then(|l| l.retrieve_fd(&again, 11))
            .unwrap()
            .id,
        1
    );
    // The retrieved file is still owned by LUO (not finished): it cannot be preserved.
    let out = w.create("out");
    assert_eq!(w.preserve(&out, 1, 1), Err(Error::AlreadyPreserved));
    w.release(&out).unwrap();
}

/// Two RETRIEVE_SESSIONs of one incoming session at once (the retrieved flag lives under the
/// session's lock, taken with the incoming table held shared).
///
/// Invariant: exactly one gets the session, the other `EINVAL` (`AlreadyRetrieved`); once the
/// winner closes it (finishing both files), the name is gone (`ENOENT`).
pub fn retrieve_session_twice() {
    let w = World::boot(LoomPlatform::booted_from(&incoming_image()), true, |j| {
        Handler::new(HANDLER, j)
    });
    w.luo.open().unwrap();
    let luo = w.luo.clone();
    let t = thread::spawn(move || retrieve_in(&luo));
    let here = retrieve_in(&w.luo);
    let s = one_winner(here, t.join().unwrap(), Error::AlreadyRetrieved);
    w.release(&s).unwrap();
    check_finished(&w);
    assert_eq!(retrieve_in(&w.luo).err(), Some(Error::NoSuchSession));
}

/// The close of a retrieved session whose finish is refused, racing a RETRIEVE_SESSION of it.
///
/// Invariant: the close fails with `EBUSY` and puts the session back (B7); the retrieve either
/// came first (`EINVAL`: still retrieved) or gets the session with both files. Either way the
/// session can then be had exactly once more, and nothing was finished.
pub fn refused_close_races_retrieve_session() {
    let (w, s) = incoming_world(&incoming_image(), |j| Handler::refusing_finish(HANDLER, j));
    let luo = w.luo.clone();
    let t = thread::spawn(move || retrieve_in(&luo));
    assert_eq!(w.release(&s), Err(Error::FinishRefused));
    let raced = t.join().unwrap();
    let s = one_winner(raced, retrieve_in(&w.luo), Error::AlreadyRetrieved);
    assert_eq!(s.file_count(), 2);
    assert_eq!(w.journal.count(|e| matches!(e, Event::Finish(..))), 0);
}
