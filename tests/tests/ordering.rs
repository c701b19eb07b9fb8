//! Callback ordering (spec §3.5, §4.2-§4.5, §5.3, §6.1): preserve FIFO, unpreserve LIFO, FLBs
//! around files, freeze FIFO across sessions in creation order, rollback newest first (B13
//! fixed), can_finish FIFO before any finish, finish LIFO, and a refused finish that changes
//! nothing.

use std::os::fd::AsFd;
use std::sync::Arc;

use backend_user::{Device, HandlerRef, LiveUpdate, SessionFd};
use luo_core::errno::{EBUSY, EIO, ENOSPC};
use luo_handlers::testing::{Event, Journal, Op, Store, TestFlb, TestHandler};
use luo_tests::{errno, files, kexec, memfd_with, sessions, sessions_pa};

const H: &str = "test-h";

fn setup() -> (LiveUpdate, Arc<TestHandler>, Journal, Store) {
    let j = Journal::new();
    let store = Store::new();
    let lu = LiveUpdate::new().unwrap();
    let h = TestHandler::new(H, &j, &store);
    lu.register_handler(h.clone()).unwrap();
    (lu, h, j, store)
}

/// Preserves a fresh memfd and returns the data word the handler gave it.
fn preserve(s: &SessionFd, token: u64, j: &Journal) -> u64 {
    let m = memfd_with(&token.to_ne_bytes());
    s.preserve_fd(m.as_fd(), token).unwrap();
    match j.take().last() {
        Some(Event::Preserve(_, d)) => *d,
        other => panic!("no preserve event: {other:?}"),
    }
}

fn freeze(d: u64) -> Event {
    Event::Freeze(H.into(), d)
}
fn unfreeze(d: u64) -> Event {
    Event::Unfreeze(H.into(), d)
}
fn unpreserve(d: u64) -> Event {
    Event::Unpreserve(H.into(), d)
}
fn can_finish(d: u64, file: bool) -> Event {
    Event::CanFinish(H.into(), d, file)
}
fn finish(d: u64, status: i32) -> Event {
    Event::Finish(H.into(), d, status)
}

#[test]
fn preserve_order_is_fifo_in_the_session_and_the_handover() {
    let (lu, _h, j, _store) = setup();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    let tokens = [50u64, 10, 40, 20, 30];
    let data: Vec<u64> = tokens.iter().map(|&t| preserve(&s, t, &j)).collect();
    let mut seen = Vec::new();
    s.session().tokens(|t| seen.push(t));
    assert_eq!(seen, tokens, "preservation order, not token order");
    drop(dev);
    lu.luo().reboot().unwrap();
    assert_eq!(
        j.take(),
        data.iter().map(|&d| freeze(d)).collect::<Vec<_>>()
    );
    let bytes = lu.memory().to_bytes();
    let ss = sessions(&bytes);
    let fs: Vec<(u64, u64)> = files(&bytes, ss[0].files)
        .into_iter()
        .map(|f| (f.token, f.data))
        .collect();
    let expected: Vec<(u64, u64)> = tokens.iter().copied().zip(data.iter().copied()).collect();
    assert_eq!(fs, expected);
}

#[test]
fn outgoing_close_unpreserves_lifo() {
    let (lu, _h, j, store) = setup();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    let data: Vec<u64> = (0..4).map(|t| preserve(&s, t, &j)).collect();
    assert_eq!(store.len(), 4);
    drop(s);
    assert_eq!(
        j.take(),
        data.iter()
            .rev()
            .map(|&d| unpreserve(d))
            .collect::<Vec<_>>()
    );
    assert_eq!(store.len(), 0);
}

#[test]
fn flb_preserve_runs_before_the_file_and_unpreserve_after() {
    let (lu, h, j, _store) = setup();
    let hr: HandlerRef = h;
    lu.register_flb(&hr, TestFlb::new("f0", 0, &j)).unwrap();
    lu.register_flb(&hr, TestFlb::new("f1", 1, &j)).unwrap();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    let m1 = memfd_with(b"1");
    s.preserve_fd(m1.as_fd(), 1).unwrap();
    let ev = j.take();
    assert_eq!(ev.len(), 3);
    assert_eq!(ev[0], Event::FlbPreserve("f0".into()));
    assert_eq!(ev[1], Event::FlbPreserve("f1".into()));
    let Event::Preserve(_, d1) = ev[2] else {
        panic!("file preserve last: {ev:?}")
    };
    let d2 = preserve(&s, 2, &j);
    drop(s);
    assert_eq!(
        j.take(),
        vec![
            unpreserve(d2),
            unpreserve(d1),
            Event::FlbUnpreserve("f1".into()),
            Event::FlbUnpreserve("f0".into()),
        ]
    );
}

/// Sessions "zeta", "alpha", "mid", "empty", "last": created in that order, files preserved
/// interleaved in time.
fn five_sessions(dev: &Device, j: &Journal) -> (Vec<SessionFd>, Vec<Vec<u64>>) {
    let names = ["zeta", "alpha", "mid", "empty", "last"];
    let ss: Vec<SessionFd> = names
        .iter()
        .map(|n| dev.create_session(n).unwrap())
        .collect();
    let mut data = vec![Vec::new(); 5];
    for (si, t) in [
        (1, 1),
        (0, 1),
        (2, 1),
        (1, 2),
        (4, 1),
        (0, 2),
        (4, 2),
        (4, 3),
    ] {
        data[si].push(preserve(&ss[si], t, j));
    }
    (ss, data)
}

#[test]
fn freeze_is_fifo_across_sessions_in_creation_order() {
    let (lu, _h, j, _store) = setup();
    let dev = lu.open().unwrap();
    let (_ss, data) = five_sessions(&dev, &j);
    drop(dev);
    lu.luo().reboot().unwrap();
    let expected: Vec<Event> = data.iter().flatten().map(|&d| freeze(d)).collect();
    assert_eq!(j.take(), expected, "no unfreeze after a successful freeze");
    let names: Vec<String> = sessions(&lu.memory().to_bytes())
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["zeta", "alpha", "mid", "empty", "last"]);
}

#[test]
fn freeze_failure_unfreezes_newest_first_and_reboot_can_be_retried() {
    let (lu, h, j, _store) = setup();
    let dev = lu.open().unwrap();
    let (mut ss, data) = five_sessions(&dev, &j);
    // Fail the second file of the last session.
    let bad = data[4][1];
    h.fail(Op::Freeze, Some(bad), ENOSPC);
    assert_eq!(errno(lu.luo().reboot()), ENOSPC);
    let frozen: Vec<u64> = data
        .iter()
        .flatten()
        .copied()
        .take_while(|&d| d != bad)
        .collect();
    let mut expected: Vec<Event> = frozen.iter().map(|&d| freeze(d)).collect();
    expected.extend(frozen.iter().rev().map(|&d| unfreeze(d)));
    assert_eq!(j.take(), expected);
    assert!(!lu.luo().is_serialized());
    assert_eq!(
        sessions_pa(&lu.memory().to_bytes()),
        0,
        "nothing handed over"
    );
    // Everything still works: new sessions and files, closes.
    let extra = dev.create_session("extra").unwrap();
    let dx = preserve(&extra, 9, &j);
    drop(ss.remove(2));
    assert_eq!(j.take(), vec![unpreserve(data[2][0])], "\"mid\" closed");
    // The backend's reboot reports the same errno; then the retry succeeds.
    assert_eq!(errno(lu.reboot()), ENOSPC);
    j.take();
    h.heal(Op::Freeze);
    drop(dev);
    let mut all: Vec<u64> = data
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != 2)
        .flat_map(|(_, d)| d.iter().copied())
        .collect();
    all.push(dx);
    lu.luo().reboot().expect("retry");
    assert_eq!(j.take(), all.iter().map(|&d| freeze(d)).collect::<Vec<_>>());
    let names: Vec<String> = sessions(&lu.memory().to_bytes())
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["zeta", "alpha", "empty", "last", "extra"]);
}

#[test]
fn freeze_failure_in_the_first_file_of_a_session_unfreezes_only_earlier_sessions() {
    let (lu, h, j, _store) = setup();
    let dev = lu.open().unwrap();
    let (_ss, data) = five_sessions(&dev, &j);
    // "mid" has one file; fail it.
    let bad = data[2][0];
    h.fail(Op::Freeze, Some(bad), EIO);
    assert_eq!(errno(lu.luo().reboot()), EIO);
    let before: Vec<u64> = data[..2].iter().flatten().copied().collect();
    let mut expected: Vec<Event> = before.iter().map(|&d| freeze(d)).collect();
    // Newest first across sessions ("alpha" then "zeta") and within each session.
    expected.extend(before.iter().rev().map(|&d| unfreeze(d)));
    assert_eq!(j.take(), expected);
}

/// An incoming session "s" with files preserved with tokens 1, 2, 3 (data returned), and an
/// FLB "f" linked to the handler in both images.
fn incoming_three() -> (
    LiveUpdate,
    Arc<TestHandler>,
    Journal,
    Device,
    SessionFd,
    Vec<u64>,
) {
    let (lu, h, j, store) = setup();
    let hr: HandlerRef = h;
    lu.register_flb(&hr, TestFlb::new("f", 0, &j)).unwrap();
    let dev = lu.open().unwrap();
    let s = dev.create_session("s").unwrap();
    let data: Vec<u64> = (1..=3).map(|t| preserve(&s, t, &j)).collect();
    drop(dev);
    let fd = kexec(lu);
    drop(s);
    j.take();
    let lu = LiveUpdate::boot(&fd).unwrap();
    let h = TestHandler::new(H, &j, &store);
    let hr: HandlerRef = h.clone();
    lu.register_handler(hr.clone()).unwrap();
    lu.register_flb(&hr, TestFlb::new("f", 0, &j)).unwrap();
    let dev = lu.open().unwrap();
    let s = dev.retrieve_session("s").unwrap();
    (lu, h, j, dev, s, data)
}

#[test]
fn can_finish_runs_fifo_over_all_files_before_finish_runs_lifo() {
    let (_lu, _h, j, _dev, s, d) = incoming_three();
    drop(s.retrieve_fd(2).unwrap());
    j.take();
    s.finish().unwrap();
    assert_eq!(
        j.take(),
        vec![
            can_finish(d[0], false),
            can_finish(d[1], true),
            can_finish(d[2], false),
            finish(d[2], 0),
            finish(d[1], 1),
            finish(d[0], 0),
            // The FLB's last dependent file is gone: retrieve on demand, then finish.
            Event::FlbRetrieve("f".into(), luo_handlers::testing::TEST_FLB_DATA),
            Event::FlbFinish("f".into(), luo_handlers::testing::TEST_FLB_DATA),
        ]
    );
}

#[test]
fn refused_finish_leaves_everything_and_can_be_retried() {
    let (_lu, h, j, _dev, s, d) = incoming_three();
    h.fail(Op::CanFinish, Some(d[1]), EBUSY);
    assert_eq!(errno(s.finish()), EBUSY);
    assert_eq!(
        j.take(),
        vec![can_finish(d[0], false), can_finish(d[1], false)],
        "stops at the first refusal, nothing finished"
    );
    assert_eq!(s.session().file_count(), 3);
    // Files are still retrievable, including the one that refused.
    drop(s.retrieve_fd(2).unwrap());
    drop(s.retrieve_fd(3).unwrap());
    j.take();
    h.heal(Op::CanFinish);
    s.finish().unwrap();
    let ev = j.take();
    assert_eq!(
        ev[..6],
        [
            can_finish(d[0], false),
            can_finish(d[1], true),
            can_finish(d[2], true),
            finish(d[2], 1),
            finish(d[1], 1),
            finish(d[0], 0),
        ]
    );
    assert_eq!(s.session().file_count(), 0);
    // A second FINISH on the empty session succeeds and calls nothing.
    s.finish().unwrap();
    assert!(j.take().is_empty());
}

#[test]
fn incoming_sessions_and_files_keep_handover_order() {
    let (lu, _h, j, store) = setup();
    let dev = lu.open().unwrap();
    let (ss, data) = five_sessions(&dev, &j);
    drop(dev);
    let fd = kexec(lu);
    drop(ss);
    j.take();
    let lu = LiveUpdate::boot(&fd).unwrap();
    lu.register_handler(TestHandler::new(H, &j, &store))
        .unwrap();
    let dev = lu.open().unwrap();
    for (name, d) in ["zeta", "alpha", "mid", "empty", "last"].iter().zip(&data) {
        let s = dev.retrieve_session(name).unwrap();
        let mut tokens = Vec::new();
        s.session().tokens(|t| tokens.push(t));
        assert_eq!(tokens.len(), d.len(), "{name}");
        s.finish().unwrap();
        let finished: Vec<u64> = j
            .take()
            .into_iter()
            .filter_map(|e| match e {
                Event::Finish(_, x, _) => Some(x),
                _ => None,
            })
            .collect();
        assert_eq!(
            finished,
            d.iter().rev().copied().collect::<Vec<_>>(),
            "{name}"
        );
    }
}

/// Closed sessions leave holes in the creation order, compacted away once more than half of
/// the slots are empty: what is left keeps its order in the handover, in the freeze order and
/// in the rollback order, and sessions created afterwards come last.
#[test]
fn creation_order_survives_closes_and_compaction() {
    let (lu, h, j, _store) = setup();
    let dev = lu.open().unwrap();
    let mut ss: Vec<Option<SessionFd>> = (0..40)
        .map(|i| Some(dev.create_session(&format!("s{i:02}")).unwrap()))
        .collect();
    let with_files: Vec<usize> = (0..40).step_by(5).collect();
    let data: Vec<u64> = with_files
        .iter()
        .map(|&i| preserve(ss[i].as_ref().unwrap(), 1, &j))
        .collect();
    // 24 of the 40 close (none with a file): the slots are compacted on the way.
    for (i, s) in ss.iter_mut().enumerate() {
        if i % 4 != 0 && i % 5 != 0 {
            drop(s.take());
        }
    }
    for i in 40..45 {
        ss.push(Some(dev.create_session(&format!("s{i:02}")).unwrap()));
    }
    let live: Vec<String> = (0..45)
        .filter(|&i| ss[i].is_some())
        .map(|i| format!("s{i:02}"))
        .collect();
    assert_eq!(live.len(), 21);
    j.take();
    // The last file fails to freeze: the others unfreeze newest first.
    let (bad, before) = data.split_last().unwrap();
    h.fail(Op::Freeze, Some(*bad), EIO);
    assert_eq!(errno(lu.luo().reboot()), EIO);
    let mut expected: Vec<Event> = before.iter().map(|&d| freeze(d)).collect();
    expected.extend(before.iter().rev().map(|&d| unfreeze(d)));
    assert_eq!(j.take(), expected);
    h.heal(Op::Freeze);
    drop(dev);
    lu.luo().reboot().unwrap();
    assert_eq!(
        j.take(),
        data.iter().map(|&d| freeze(d)).collect::<Vec<_>>()
    );
    let names: Vec<String> = sessions(&lu.memory().to_bytes())
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, live);
}

/// A retried reboot rewrites every byte of every entry it writes: a short name in the slot a
/// long one filled during the failed attempt leaves no stale bytes after its NUL.
#[test]
fn a_retried_reboot_leaves_no_stale_bytes_in_entries() {
    let (lu, h, j, _store) = setup();
    let dev = lu.open().unwrap();
    let long = dev.create_session(&"L".repeat(63)).unwrap();
    let short = dev.create_session("s").unwrap();
    let bad = preserve(&short, 1, &j);
    h.fail(Op::Freeze, Some(bad), EIO);
    // The long name's entry is written, then the short session's file fails to freeze.
    assert_eq!(errno(lu.luo().reboot()), EIO);
    h.heal(Op::Freeze);
    drop(long);
    drop(dev);
    lu.luo().reboot().unwrap();
    let b = lu.memory().to_bytes();
    let s = sessions(&b);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].name, "s");
    let at = s[0].at as usize;
    assert!(
        b[at + 1..at + 64].iter().all(|&x| x == 0),
        "stale bytes after the name: {:?}",
        &b[at..at + 64]
    );
}
