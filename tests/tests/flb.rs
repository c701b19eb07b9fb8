//! File-Lifecycle-Bound objects (spec §5): the checks of `lib/tests/liveupdate.c` (§5.8) with
//! the memfd handler, plus refcounting across sessions and handlers, preserve rollback, the
//! `LUO_FLB_MAX` limit, `get_outgoing`/`get_incoming` errors, and the B3/B4 fixes.

use std::os::fd::AsFd;
use std::sync::Arc;

use backend_user::{FlbRef, HandlerRef, LiveUpdate};
use luo_core::errno::{EEXIST, EINVAL, EIO, ENODATA, ENOENT, ENOSPC};
use luo_core::Level;
use luo_handlers::testing::{Event, Journal, Store, TestFlb, TestHandler, TEST_FLB_DATA};
use luo_handlers::MemfdHandler;
use luo_tests::{
    boot_bytes, errno, flb_entries, flbs_pa, identity, kexec, logged, memfd_with, read_all,
};

const FLB_NAMES: [&str; 3] = [
    "liveupdate-test-flb-v0",
    "liveupdate-test-flb-v1",
    "liveupdate-test-flb-v2",
];

fn test_flbs(j: &Journal) -> Vec<Arc<TestFlb>> {
    FLB_NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| TestFlb::new(n, i as u64, j))
        .collect()
}

fn flb_ref(f: &Arc<TestFlb>) -> FlbRef {
    f.clone()
}

fn memfd_handler(lu: &LiveUpdate) -> HandlerRef {
    let h: HandlerRef = MemfdHandler::new(lu.memory().clone());
    lu.register_handler(h.clone()).expect("register memfd");
    h
}

/// `liveupdate_test_register(fh)` steps 2 and 3: link the three FLBs, then expect EEXIST for a
/// second link of the first one.
fn liveupdate_test_register(lu: &LiveUpdate, h: &HandlerRef, flbs: &[Arc<TestFlb>]) {
    for f in flbs {
        lu.register_flb(h, flb_ref(f)).expect("register test FLB");
    }
    assert_eq!(errno(lu.register_flb(h, flb_ref(&flbs[0]))), EEXIST);
}

fn flb_events(j: &Journal) -> Vec<Event> {
    j.take()
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                Event::FlbPreserve(_)
                    | Event::FlbUnpreserve(_)
                    | Event::FlbRetrieve(..)
                    | Event::FlbFinish(..)
            )
        })
        .collect()
}

fn all(f: impl Fn(&'static str) -> Event) -> Vec<Event> {
    FLB_NAMES.iter().map(|n| f(n)).collect()
}

fn all_rev(f: impl Fn(&'static str) -> Event) -> Vec<Event> {
    FLB_NAMES.iter().rev().map(|n| f(n)).collect()
}

#[test]
fn registering_an_flb_twice_with_a_handler_gives_eexist() {
    let j = Journal::new();
    let lu = LiveUpdate::new().unwrap();
    let h = memfd_handler(&lu);
    let flbs = test_flbs(&j);
    liveupdate_test_register(&lu, &h, &flbs);
    // Another FLB object with an already registered compatible is refused too.
    let twin = TestFlb::new(FLB_NAMES[1], 1, &j);
    assert_eq!(errno(lu.register_flb(&h, twin)), EEXIST);
    // An FLB cannot be linked to a handler that is not registered (upstream B9).
    let stranger: HandlerRef = MemfdHandler::new(lu.memory().clone());
    assert_eq!(
        errno(lu.register_flb(&stranger, TestFlb::new("other-flb", 7, &j))),
        EINVAL
    );
}

#[test]
fn first_preserve_runs_each_flb_preserve_once() {
    let j = Journal::new();
    let lu = LiveUpdate::new().unwrap();
    let h = memfd_handler(&lu);
    let flbs = test_flbs(&j);
    liveupdate_test_register(&lu, &h, &flbs);
    let dev = lu.open().unwrap();
    let s1 = dev.create_session("flb-1").unwrap();
    let s2 = dev.create_session("flb-2").unwrap();
    let (m1, m2, m3) = (memfd_with(b"1"), memfd_with(b"2"), memfd_with(b"3"));
    assert!(flb_events(&j).is_empty(), "nothing before the first file");
    s1.preserve_fd(m1.as_fd(), 1).unwrap();
    assert_eq!(flb_events(&j), all(|n| Event::FlbPreserve(n.into())));
    s1.preserve_fd(m2.as_fd(), 2).unwrap();
    s2.preserve_fd(m3.as_fd(), 3).unwrap();
    assert!(
        flb_events(&j).is_empty(),
        "later files only take references"
    );
    // The test FLB sets data but no object: get_outgoing finds no object.
    for f in &flbs {
        let r: FlbRef = f.clone();
        assert_eq!(errno(lu.luo().flb_get_outgoing(&r)), ENOENT);
    }
}

#[test]
fn last_unpreserve_runs_flb_unpreserve_across_sessions() {
    let j = Journal::new();
    let lu = LiveUpdate::new().unwrap();
    let h = memfd_handler(&lu);
    liveupdate_test_register(&lu, &h, &test_flbs(&j));
    let dev = lu.open().unwrap();
    let s1 = dev.create_session("a").unwrap();
    let s2 = dev.create_session("b").unwrap();
    let (m1, m2, m3) = (memfd_with(b"1"), memfd_with(b"2"), memfd_with(b"3"));
    s1.preserve_fd(m1.as_fd(), 1).unwrap();
    s1.preserve_fd(m2.as_fd(), 2).unwrap();
    s2.preserve_fd(m3.as_fd(), 3).unwrap();
    j.take();
    drop(s1);
    assert!(
        flb_events(&j).is_empty(),
        "session b still holds a dependent file"
    );
    drop(s2);
    assert_eq!(flb_events(&j), all_rev(|n| Event::FlbUnpreserve(n.into())));
    // A new first file preserves again.
    let s3 = dev.create_session("c").unwrap();
    s3.preserve_fd(m1.as_fd(), 1).unwrap();
    assert_eq!(flb_events(&j), all(|n| Event::FlbPreserve(n.into())));
}

/// Builds stage 1 of the lib/tests scenario: memfds in two sessions ("one": 1 file, "two": 2
/// files) with the three test FLBs, and reboots.
fn stage1(j: &Journal) -> std::os::fd::OwnedFd {
    let lu = LiveUpdate::new().unwrap();
    let h = memfd_handler(&lu);
    liveupdate_test_register(&lu, &h, &test_flbs(j));
    let dev = lu.open().unwrap();
    let one = dev.create_session("one").unwrap();
    let two = dev.create_session("two").unwrap();
    one.preserve_fd(memfd_with(b"x").as_fd(), 1).unwrap();
    two.preserve_fd(memfd_with(b"y").as_fd(), 2).unwrap();
    two.preserve_fd(memfd_with(b"z").as_fd(), 3).unwrap();
    drop(dev);
    // Serialized: one entry per FLB, in registration order, counting the 3 dependent files.
    lu.luo().reboot().unwrap();
    let bytes = lu.memory().to_bytes();
    let expected: Vec<_> = FLB_NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), TEST_FLB_DATA + i as u64, 3))
        .collect();
    assert_eq!(flb_entries(&bytes), expected);
    let fd = kexec(lu);
    drop((one, two));
    j.take();
    fd
}

#[test]
fn across_reboot_retrieve_sees_data_and_finish_runs_once_after_the_last_file() {
    let j = Journal::new();
    let handover = stage1(&j);
    let lu = LiveUpdate::boot(&handover).unwrap();
    let h = memfd_handler(&lu);
    let flbs = test_flbs(&j);
    liveupdate_test_register(&lu, &h, &flbs);
    // liveupdate_test_init: get_incoming validates the data handle, then put_incoming.
    for (i, f) in flbs.iter().enumerate() {
        let r: FlbRef = f.clone();
        let obj = lu.luo().flb_get_incoming(&r).expect("get_incoming");
        assert_eq!(obj as u64, TEST_FLB_DATA + i as u64);
        lu.luo().flb_put_incoming(&r);
    }
    assert_eq!(
        flb_events(&j),
        FLB_NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| Event::FlbRetrieve(n.to_string(), TEST_FLB_DATA + i as u64))
            .collect::<Vec<_>>()
    );
    let dev = lu.open().unwrap();
    let one = dev.retrieve_session("one").unwrap();
    let two = dev.retrieve_session("two").unwrap();
    drop(two.retrieve_fd(2).unwrap());
    two.finish().unwrap();
    assert!(flb_events(&j).is_empty(), "one dependent file left");
    // The last dependent file, never retrieved, finishes on close.
    drop(one);
    assert_eq!(
        flb_events(&j),
        FLB_NAMES
            .iter()
            .enumerate()
            .rev()
            .map(|(i, n)| Event::FlbFinish(n.to_string(), TEST_FLB_DATA + i as u64))
            .collect::<Vec<_>>()
    );
    // Finished: no more incoming data, and a stray put changes nothing.
    let r: FlbRef = flbs[0].clone();
    assert_eq!(errno(lu.luo().flb_get_incoming(&r)), ENODATA);
    lu.luo().flb_put_incoming(&r);
    assert!(flb_events(&j).is_empty());
}

/// Upstream's exact init order: `liveupdate_test_init` calls `get_incoming` on the test FLBs
/// *before* registering them with the handler (incoming FLB data is usable from early boot,
/// spec §1.3, §5.8).
#[test]
fn get_incoming_works_before_the_flb_is_registered() {
    let j = Journal::new();
    let handover = stage1(&j);
    let lu = LiveUpdate::boot(&handover).unwrap();
    let flbs = test_flbs(&j);
    for (i, f) in flbs.iter().enumerate() {
        let r: FlbRef = f.clone();
        let obj = lu
            .luo()
            .flb_get_incoming(&r)
            .expect("get_incoming of an unregistered FLB");
        assert_eq!(obj as u64, TEST_FLB_DATA + i as u64);
        lu.luo().flb_put_incoming(&r);
    }
    assert_eq!(flb_events(&j).len(), 3, "three retrieves");
    let h = memfd_handler(&lu);
    liveupdate_test_register(&lu, &h, &flbs);
    let dev = lu.open().unwrap();
    drop(dev.retrieve_session("one").unwrap());
    drop(dev.retrieve_session("two").unwrap());
    assert_eq!(
        flb_events(&j),
        FLB_NAMES
            .iter()
            .enumerate()
            .rev()
            .map(|(i, n)| Event::FlbFinish(n.to_string(), TEST_FLB_DATA + i as u64))
            .collect::<Vec<_>>(),
        "retrieved once, finished once"
    );
}

/// B3 fixed: nobody calls `get_incoming`; finishing the dependent files still retrieves and
/// finishes each FLB exactly once (upstream underflows and never runs either).
#[test]
fn finish_without_get_incoming_runs_flb_finish_once() {
    let j = Journal::new();
    let handover = stage1(&j);
    let lu = LiveUpdate::boot(&handover).unwrap();
    let h = memfd_handler(&lu);
    liveupdate_test_register(&lu, &h, &test_flbs(&j));
    let dev = lu.open().unwrap();
    let one = dev.retrieve_session("one").unwrap();
    let two = dev.retrieve_session("two").unwrap();
    one.finish().unwrap();
    assert!(flb_events(&j).is_empty());
    two.finish().unwrap();
    let mut expected = Vec::new();
    for (i, n) in FLB_NAMES.iter().enumerate().rev() {
        expected.push(Event::FlbRetrieve(n.to_string(), TEST_FLB_DATA + i as u64));
        expected.push(Event::FlbFinish(n.to_string(), TEST_FLB_DATA + i as u64));
    }
    assert_eq!(flb_events(&j), expected);
    assert_eq!(
        luo_tests::count_logged(lu.memory(), Level::Warn, "underflow"),
        0
    );
}

#[test]
fn refcount_spans_sessions_and_handlers_sharing_an_flb() {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let (fa, fb) = (memfd_with(b"a"), memfd_with(b"b"));
    let ha = TestHandler::new("test-a", &j, &store);
    ha.accept_only(&[identity(fa.as_fd())]);
    let hb = TestHandler::new("test-b", &j, &store);
    hb.accept_only(&[identity(fb.as_fd())]);
    let (ha, hb): (HandlerRef, HandlerRef) = (ha, hb);
    lu.register_handler(ha.clone()).unwrap();
    lu.register_handler(hb.clone()).unwrap();
    let shared = TestFlb::new("shared-flb", 0, &j);
    lu.register_flb(&ha, shared.clone()).unwrap();
    lu.register_flb(&hb, shared.clone()).unwrap();
    let dev = lu.open().unwrap();
    let s1 = dev.create_session("s1").unwrap();
    let s2 = dev.create_session("s2").unwrap();
    s1.preserve_fd(fa.as_fd(), 1).unwrap();
    s2.preserve_fd(fb.as_fd(), 1).unwrap();
    assert_eq!(
        flb_events(&j),
        vec![Event::FlbPreserve("shared-flb".into())],
        "one preserve for two handlers' files"
    );
    lu.luo().reboot().unwrap();
    assert_eq!(
        flb_entries(&lu.memory().to_bytes()),
        vec![("shared-flb".to_string(), TEST_FLB_DATA, 2)]
    );
}

#[test]
fn refcount_drops_only_with_the_last_file_of_any_handler() {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let (fa, fb) = (memfd_with(b"a"), memfd_with(b"b"));
    let ha = TestHandler::new("test-a", &j, &store);
    ha.accept_only(&[identity(fa.as_fd())]);
    let hb = TestHandler::new("test-b", &j, &store);
    hb.accept_only(&[identity(fb.as_fd())]);
    let (ha, hb): (HandlerRef, HandlerRef) = (ha, hb);
    lu.register_handler(ha.clone()).unwrap();
    lu.register_handler(hb.clone()).unwrap();
    let shared = TestFlb::new("shared-flb", 0, &j);
    lu.register_flb(&ha, shared.clone()).unwrap();
    lu.register_flb(&hb, shared.clone()).unwrap();
    let dev = lu.open().unwrap();
    let s1 = dev.create_session("s1").unwrap();
    let s2 = dev.create_session("s2").unwrap();
    s1.preserve_fd(fa.as_fd(), 1).unwrap();
    s2.preserve_fd(fb.as_fd(), 1).unwrap();
    j.take();
    drop(s2);
    assert!(flb_events(&j).is_empty());
    drop(s1);
    assert_eq!(
        flb_events(&j),
        vec![Event::FlbUnpreserve("shared-flb".into())]
    );
}

#[test]
fn flb_preserve_failure_fails_the_file_and_puts_earlier_flbs_in_reverse() {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let h: HandlerRef = TestHandler::new("test-h", &j, &store);
    lu.register_handler(h.clone()).unwrap();
    let flbs: Vec<_> = (0..4)
        .map(|i| TestFlb::new(&format!("flb-{i}"), i, &j))
        .collect();
    for f in &flbs {
        lu.register_flb(&h, flb_ref(f)).unwrap();
    }
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    let base = lu.memory().outgoing_pages();
    flbs[2].fail_preserve(Some(EIO));
    let m = memfd_with(b"m");
    assert_eq!(errno(s.preserve_fd(m.as_fd(), 7)), EIO);
    assert_eq!(
        j.take(),
        vec![
            Event::FlbPreserve("flb-0".into()),
            Event::FlbPreserve("flb-1".into()),
            Event::FlbUnpreserve("flb-1".into()),
            Event::FlbUnpreserve("flb-0".into()),
        ],
        "no file preserve, FLBs 1 and 0 put newest first, FLB 3 never reached"
    );
    assert_eq!(s.session().file_count(), 0);
    assert_eq!(store.len(), 0);
    assert_eq!(lu.memory().outgoing_pages(), base, "file block given back");
    // Nothing is left behind: the same file and token work once the FLB heals.
    flbs[2].fail_preserve(None);
    s.preserve_fd(m.as_fd(), 7).unwrap();
    let ev = j.take();
    assert_eq!(ev.len(), 5);
    assert!(matches!(ev[4], Event::Preserve(ref n, _) if n == "test-h"));
}

#[test]
fn flb_max_is_63() {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let h: HandlerRef = TestHandler::new("test-h", &j, &store);
    let h2: HandlerRef = TestHandler::new("test-h2", &j, &store);
    lu.register_handler(h.clone()).unwrap();
    lu.register_handler(h2.clone()).unwrap();
    let flbs: Vec<_> = (0..64)
        .map(|i| TestFlb::new(&format!("flb-{i}"), i, &j))
        .collect();
    for f in &flbs[..63] {
        lu.register_flb(&h, flb_ref(f)).expect("within LUO_FLB_MAX");
    }
    assert_eq!(errno(lu.register_flb(&h, flb_ref(&flbs[63]))), ENOSPC);
    assert_eq!(errno(lu.register_flb(&h2, flb_ref(&flbs[63]))), ENOSPC);
    // Linking an already registered FLB to another handler adds no FLB.
    lu.register_flb(&h2, flb_ref(&flbs[0])).unwrap();
    // Dropping the last link of one FLB makes room.
    lu.luo().unregister_flb(&h, &flb_ref(&flbs[5])).unwrap();
    lu.register_flb(&h, flb_ref(&flbs[63])).unwrap();
    // All 63 fit the FLB page at reboot.
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    s.preserve_fd(memfd_with(b"").as_fd(), 1).unwrap();
    drop(dev);
    lu.luo().reboot().unwrap();
    let entries = flb_entries(&lu.memory().to_bytes());
    assert_eq!(entries.len(), 63);
    assert!(entries.iter().all(|e| e.2 == 1));
    assert!(!entries.iter().any(|e| e.0 == "flb-5"));
}

#[test]
fn get_outgoing_needs_an_object() {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let h: HandlerRef = TestHandler::new("test-h", &j, &store);
    lu.register_handler(h.clone()).unwrap();
    let plain = TestFlb::new("plain", 0, &j);
    let objy = TestFlb::with_object("objy", 1, &j);
    lu.register_flb(&h, plain.clone()).unwrap();
    lu.register_flb(&h, objy.clone()).unwrap();
    let (plain, objy): (FlbRef, FlbRef) = (plain, objy);
    // No dependent file: nothing preserved yet.
    assert_eq!(errno(lu.luo().flb_get_outgoing(&plain)), ENOENT);
    assert_eq!(errno(lu.luo().flb_get_outgoing(&objy)), ENOENT);
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    s.preserve_fd(memfd_with(b"").as_fd(), 1).unwrap();
    // Preserved, but the plain FLB set only data.
    assert_eq!(errno(lu.luo().flb_get_outgoing(&plain)), ENOENT);
    let obj = lu.luo().flb_get_outgoing(&objy).unwrap();
    assert_eq!(obj as u64, TEST_FLB_DATA + 1);
    lu.luo().flb_put_outgoing(&objy);
}

#[test]
fn get_outgoing_reference_keeps_the_flb_preserved_until_put() {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let h: HandlerRef = TestHandler::new("test-h", &j, &store);
    lu.register_handler(h.clone()).unwrap();
    let objy: FlbRef = TestFlb::with_object("objy", 0, &j);
    lu.register_flb(&h, objy.clone()).unwrap();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    s.preserve_fd(memfd_with(b"").as_fd(), 1).unwrap();
    lu.luo().flb_get_outgoing(&objy).unwrap();
    j.take();
    drop(s);
    assert!(
        !j.take().contains(&Event::FlbUnpreserve("objy".into())),
        "the get_outgoing reference is still held"
    );
    lu.luo().flb_put_outgoing(&objy);
    assert_eq!(flb_events(&j), vec![Event::FlbUnpreserve("objy".into())]);
    // A put without a get is an underflow: logged, nothing runs.
    lu.luo().flb_put_outgoing(&objy);
    assert!(flb_events(&j).is_empty());
    assert_eq!(
        luo_tests::count_logged(lu.memory(), Level::Warn, "underflow"),
        1
    );
}

/// B4 fixed: a leaked `get_outgoing` reference is not handed over, so the next kernel's FLB
/// finish still runs when its dependent files finish.
#[test]
fn leaked_get_outgoing_reference_is_not_serialized() {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let h: HandlerRef = TestHandler::new("test-h", &j, &store);
    lu.register_handler(h.clone()).unwrap();
    let objy: FlbRef = TestFlb::with_object("objy", 0, &j);
    lu.register_flb(&h, objy.clone()).unwrap();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    s.preserve_fd(memfd_with(b"").as_fd(), 1).unwrap();
    lu.luo().flb_get_outgoing(&objy).unwrap();
    lu.luo().flb_get_outgoing(&objy).unwrap();
    drop(dev);
    lu.luo().reboot().unwrap();
    assert_eq!(
        flb_entries(&lu.memory().to_bytes()),
        vec![("objy".to_string(), TEST_FLB_DATA, 1)],
        "only the file reference"
    );
    let handover = kexec(lu);
    drop(s);
    j.take();

    let lu2 = LiveUpdate::boot(&handover).unwrap();
    let h2: HandlerRef = TestHandler::new("test-h", &j, &store);
    lu2.register_handler(h2.clone()).unwrap();
    let objy2: FlbRef = TestFlb::with_object("objy", 0, &j);
    lu2.register_flb(&h2, objy2.clone()).unwrap();
    let dev2 = lu2.open().unwrap();
    drop(dev2.retrieve_session("s").unwrap());
    assert!(j
        .take()
        .contains(&Event::FlbFinish("objy".into(), TEST_FLB_DATA)));
}

#[test]
fn get_incoming_errors() {
    let j = Journal::new();
    // Cold boot: no incoming FLB data.
    let cold = LiveUpdate::new().unwrap();
    let hc = memfd_handler(&cold);
    let f: FlbRef = TestFlb::new(FLB_NAMES[0], 0, &j);
    cold.register_flb(&hc, f.clone()).unwrap();
    assert_eq!(errno(cold.luo().flb_get_incoming(&f)), ENODATA);

    let handover = stage1(&j);
    let lu = LiveUpdate::boot(&handover).unwrap();
    let h = memfd_handler(&lu);
    let flbs = test_flbs(&j);
    liveupdate_test_register(&lu, &h, &flbs);
    // An FLB the previous kernel did not hand over.
    let absent: FlbRef = TestFlb::new("absent-flb", 9, &j);
    lu.register_flb(&h, absent.clone()).unwrap();
    assert_eq!(errno(lu.luo().flb_get_incoming(&absent)), ENOENT);
    // A failed retrieve is cached: the callback runs once.
    flbs[1].fail_retrieve(Some(EIO));
    let r1: FlbRef = flbs[1].clone();
    assert_eq!(errno(lu.luo().flb_get_incoming(&r1)), EIO);
    flbs[1].fail_retrieve(None);
    assert_eq!(errno(lu.luo().flb_get_incoming(&r1)), EIO);
    let retrieves = j
        .take()
        .iter()
        .filter(|e| matches!(e, Event::FlbRetrieve(n, _) if n == FLB_NAMES[1]))
        .count();
    assert_eq!(retrieves, 1);
    // A data handle that does not check out fails the retrieve (the test FLB's own check).
    let wrong: FlbRef = TestFlb::new(FLB_NAMES[2], 5, &j);
    let lu3 = LiveUpdate::boot(&stage1(&j)).unwrap();
    let h3 = memfd_handler(&lu3);
    lu3.register_flb(&h3, wrong.clone()).unwrap();
    assert_eq!(errno(lu3.luo().flb_get_incoming(&wrong)), EINVAL);
}

#[test]
fn linking_an_flb_to_a_handler_with_live_files_is_refused() {
    // Upstream would let the next unpreserve drop a reference that was never taken.
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let h: HandlerRef = TestHandler::new("test-h", &j, &store);
    lu.register_handler(h.clone()).unwrap();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    s.preserve_fd(memfd_with(b"").as_fd(), 1).unwrap();
    let late = TestFlb::new("late", 0, &j);
    assert_eq!(
        errno(lu.register_flb(&h, late.clone())),
        luo_core::errno::EBUSY
    );
    drop(s);
    lu.register_flb(&h, late).expect("no live files any more");
    j.take();
    let s = dev.create_session("s").unwrap();
    s.preserve_fd(memfd_with(b"").as_fd(), 1).unwrap();
    assert!(j.take().contains(&Event::FlbPreserve("late".into())));
    drop(s);
    assert!(j.take().contains(&Event::FlbUnpreserve("late".into())));
}

#[test]
fn a_held_incoming_reference_delays_finish_until_put() {
    let j = Journal::new();
    let handover = stage1(&j);
    let lu = LiveUpdate::boot(&handover).unwrap();
    let h = memfd_handler(&lu);
    let flbs = test_flbs(&j);
    liveupdate_test_register(&lu, &h, &flbs);
    let held: FlbRef = flbs[0].clone();
    lu.luo().flb_get_incoming(&held).unwrap();
    let dev = lu.open().unwrap();
    drop(dev.retrieve_session("one").unwrap());
    drop(dev.retrieve_session("two").unwrap());
    let ev = flb_events(&j);
    assert!(
        !ev.contains(&Event::FlbFinish(FLB_NAMES[0].into(), TEST_FLB_DATA)),
        "{ev:?}"
    );
    assert!(ev.contains(&Event::FlbFinish(FLB_NAMES[1].into(), TEST_FLB_DATA + 1)));
    lu.luo().flb_put_incoming(&held);
    assert_eq!(
        flb_events(&j),
        vec![Event::FlbFinish(FLB_NAMES[0].into(), TEST_FLB_DATA)]
    );
}

#[test]
fn a_failed_incoming_retrieve_means_no_finish() {
    let j = Journal::new();
    let handover = stage1(&j);
    let lu = LiveUpdate::boot(&handover).unwrap();
    let h = memfd_handler(&lu);
    let flbs = test_flbs(&j);
    liveupdate_test_register(&lu, &h, &flbs);
    flbs[2].fail_retrieve(Some(EIO));
    let dev = lu.open().unwrap();
    drop(dev.retrieve_session("one").unwrap());
    drop(dev.retrieve_session("two").unwrap());
    let ev = flb_events(&j);
    assert!(ev.contains(&Event::FlbRetrieve(FLB_NAMES[2].into(), TEST_FLB_DATA + 2)));
    assert!(!ev
        .iter()
        .any(|e| matches!(e, Event::FlbFinish(n, _) if n == FLB_NAMES[2])));
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, Event::FlbFinish(..)))
            .count(),
        2,
        "the other two finish"
    );
    assert!(logged(lu.memory(), "retrieve before finish failed"));
}

/// An incoming count the handover claims at `u64::MAX`: a `get_incoming` saturates it (as the
/// kernel's `refcount_t` does) instead of overflowing, and a saturated count never drops, so
/// that FLB is never finished while the others finish as usual.
#[test]
fn a_saturated_incoming_count_never_finishes() {
    let j = Journal::new();
    let handover = stage1(&j);
    let mut bytes = read_all(&mut std::fs::File::from(handover));
    let count_at = (flbs_pa(&bytes) + 16 + 56) as usize;
    bytes[count_at..count_at + 8].copy_from_slice(&u64::MAX.to_ne_bytes());
    let lu = boot_bytes(bytes);
    let h = memfd_handler(&lu);
    let flbs = test_flbs(&j);
    liveupdate_test_register(&lu, &h, &flbs);
    let r: FlbRef = flbs[0].clone();
    assert_eq!(lu.luo().flb_get_incoming(&r).unwrap() as u64, TEST_FLB_DATA);
    assert!(logged(lu.memory(), "incoming reference count saturated"));
    lu.luo().flb_put_incoming(&r);
    let dev = lu.open().unwrap();
    drop(dev.retrieve_session("one").unwrap());
    drop(dev.retrieve_session("two").unwrap());
    let ev = flb_events(&j);
    assert!(
        !ev.iter()
            .any(|e| matches!(e, Event::FlbFinish(n, _) if n == FLB_NAMES[0])),
        "{ev:?}"
    );
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, Event::FlbFinish(..)))
            .count(),
        2,
        "the other two finish"
    );
}
