//! The test list (data) and how a VM's serial log is judged.

use std::fs;
use std::path::Path;

use crate::guest::SELFTEST_DIR;
use crate::qemu::{Line, Run};

/// How a VM test runs.
pub(crate) enum Kind {
    /// A kselftest-harness program run once under the busybox `/init`; each of its
    /// `TEST_F`s becomes one TAP case (`<vm test>.<case>`).
    Harness { program: &'static str },
    /// The upstream two-boot flow: init.c runs `program -s 1`, `reboot(RB_KEXEC)`s into
    /// `/kernel`, then runs `program -s 2`, which must print `pass`.
    Kexec {
        program: &'static str,
        pass: &'static str,
        stage2: Stage2,
    },
    /// luod on the kernel backend across a real kexec (`xtask/scripts/luod-init.sh` as
    /// `/init`, busybox, static luod and luoctl; `luoctl update` does the kexec). The script
    /// prints init.c's stage markers, so it is judged like `Kexec`; `pass` ends stage 2.
    Luod { pass: &'static str },
    /// systemd 262's own TEST-91-LIVEUPDATE, unchanged, as its integration-test harness runs
    /// it: a Debian sid root on /dev/vda, PID 1 starts the test unit, the test `systemctl
    /// kexec`s into the kernel on the ESP (/dev/vdb1), the second boot checks what came back.
    /// Judged by the harness's rules (`/testok`, no `/failed`, exit status 123) plus ours.
    Systemd,
    /// luod under real systemd 262: the sid root of `Systemd` with static luod and luoctl, the
    /// shipped `luod.service` and `luod.socket`, and `xtask/scripts/luod-systemd-test.sh` run by
    /// its unit in both boots: luod is killed, stopped and started, and updated with `luoctl
    /// update`, with a session only luod holds. The script prints init.c's stage markers, so
    /// it is judged like `Kexec` (`pass` ends stage 2), plus its own step markers.
    LuodSystemd { pass: &'static str },
}

/// Which bzImage the outer initramfs carries as `/kernel` for the kexec.
#[derive(Clone, Copy)]
pub(crate) enum Stage2 {
    /// The kernel under test kexecs into itself (upstream vmtest.sh).
    Same,
    // A cross-core run (C core -> Rust core) adds `Core(kbuild::Core)` here; the runner
    // already takes the stage-2 kernel as a separate path.
}

/// A timed stretch between two serial markers (first occurrence of each, in order).
pub(crate) struct Span {
    pub(crate) label: &'static str,
    pub(crate) from: &'static str,
    pub(crate) to: &'static str,
}

/// A line that must appear `count` times in the log of boot number `boot` (0-based).
pub(crate) struct Expect {
    pub(crate) boot: usize,
    pub(crate) text: &'static str,
    pub(crate) count: usize,
}

pub(crate) struct VmTest {
    pub(crate) name: &'static str,
    /// Run only when named in `--tests`, not by a plain `cargo xtask vm test`.
    pub(crate) opt_in: bool,
    pub(crate) kind: Kind,
    pub(crate) spans: &'static [Span],
    pub(crate) expect: &'static [Expect],
}

/// lib/tests/liveupdate.c (CONFIG_LIVEUPDATE_TEST) registers its FLBs on every boot.
const FLB_REGISTERED: &str = "liveupdate test: Registered 3 FLBs with file handler: [memfd-v2]";
/// The built-in Rust sample: proves Rust code runs in this kernel.
const RUST_SAMPLE: &str = "rust_minimal: Rust minimal sample (init)";

/// What two-boot tests expect of lib/tests/liveupdate.c's FLBs, with `finishes` the number of
/// times each FLB's finish must run in boot 1.
const fn two_boot_flb(finishes: usize) -> [Expect; 13] {
    const fn e(boot: usize, text: &'static str, count: usize) -> Expect {
        Expect { boot, text, count }
    }
    [
        e(0, FLB_REGISTERED, 1),
        e(0, RUST_SAMPLE, 1),
        e(
            0,
            "liveupdate test: liveupdate-test-flb-v0: preserve was triggered",
            1,
        ),
        e(
            0,
            "liveupdate test: liveupdate-test-flb-v1: preserve was triggered",
            1,
        ),
        e(
            0,
            "liveupdate test: liveupdate-test-flb-v2: preserve was triggered",
            1,
        ),
        e(1, FLB_REGISTERED, 1),
        e(1, RUST_SAMPLE, 1),
        e(
            1,
            "liveupdate test: liveupdate-test-flb-v0: found flb data from the previous boot",
            1,
        ),
        e(
            1,
            "liveupdate test: liveupdate-test-flb-v1: found flb data from the previous boot",
            1,
        ),
        e(
            1,
            "liveupdate test: liveupdate-test-flb-v2: found flb data from the previous boot",
            1,
        ),
        e(
            1,
            "liveupdate test: liveupdate-test-flb-v0: finish was triggered",
            finishes,
        ),
        e(
            1,
            "liveupdate test: liveupdate-test-flb-v1: finish was triggered",
            finishes,
        ),
        e(
            1,
            "liveupdate test: liveupdate-test-flb-v2: finish was triggered",
            finishes,
        ),
    ]
}

/// Every kexec test preserves at least one memfd (the state file), so the three test FLBs
/// attached to memfd-v2 are preserved in boot 0 and retrieved and finished in boot 1.
const KEXEC_FLB: &[Expect] = &two_boot_flb(1);

/// luod_update's boots: luod's manifest memfd and the client's memfd make the test FLBs
/// preserve once in boot 1 and find their data once in boot 2, as in the kexec tests. But the
/// planted session's memfd is preserved too and, by design, never retrieved or finished in
/// boot 2 (luod does not hand it out), so the FLBs' finish must not run: 0 times.
const LUOD_FLB: &[Expect] = &two_boot_flb(0);

/// systemd_luo's boots: systemd-shutdown preserves memfds in boot 1 (the test FLBs attached
/// to memfd-v2 preserve once), and in boot 2 PID 1 retrieves every session and the units
/// finish with them before the VM powers off (the FLBs find their data once, finish once).
const SYSTEMD_FLB: &[Expect] = &two_boot_flb(1);

/// luod_systemd's boots: the four client memfds and luod's manifest make the test FLBs
/// preserve once in boot 1 and find their data once in boot 2, where every session is
/// finished (the client's by `luoctl retrieve --finish`, the manifest's by luod), so the
/// FLBs' finish runs once. Each step of the script must pass once in each boot it runs in
/// (crash and stop + start in both, ADOPT in boot 1).
const LUOD_SYSTEMD_EXPECT: &[Expect] = &{
    const FLB: [Expect; 13] = two_boot_flb(1);
    const STEPS: [(usize, &str); 5] = [
        (0, LUOD_SYSTEMD_CRASH_PASS),
        (0, LUOD_SYSTEMD_STOP_PASS),
        (0, LUOD_SYSTEMD_ADOPT_PASS),
        (1, LUOD_SYSTEMD_CRASH_PASS),
        (1, LUOD_SYSTEMD_STOP_PASS),
    ];
    let mut out = [const {
        Expect {
            boot: 0,
            text: "",
            count: 0,
        }
    }; 18];
    let mut i = 0;
    while i < FLB.len() {
        out[i] = Expect {
            boot: FLB[i].boot,
            text: FLB[i].text,
            count: FLB[i].count,
        };
        i += 1;
    }
    let mut j = 0;
    while j < STEPS.len() {
        out[i + j] = Expect {
            boot: STEPS[j].0,
            text: STEPS[j].1,
            count: 1,
        };
        j += 1;
    }
    out
};

/// What `xtask/scripts/luod-systemd-test.sh` prints (through its unit's console output, so
/// after a `luod-systemd-test.sh[pid]: ` prefix).
const LUOD_SYSTEMD_CRASH_PASS: &str = "LUOD-SYSTEMD: crash: PASS";
const LUOD_SYSTEMD_STOP_PASS: &str = "LUOD-SYSTEMD: stop and start: PASS";
const LUOD_SYSTEMD_ADOPT_PASS: &str = "LUOD-SYSTEMD: adopt: PASS";
const LUOD_SYSTEMD_FAIL: &str = "LUOD-SYSTEMD: FAIL: ";

/// The whole suite, in run order.
pub(crate) const TESTS: &[VmTest] = &[
    VmTest {
        opt_in: false,
        name: "liveupdate",
        kind: Kind::Harness {
            program: "liveupdate",
        },
        spans: &[],
        expect: &[
            Expect {
                boot: 0,
                text: FLB_REGISTERED,
                count: 1,
            },
            Expect {
                boot: 0,
                text: RUST_SAMPLE,
                count: 1,
            },
        ],
    },
    VmTest {
        opt_in: false,
        name: "luo_kexec_simple",
        kind: Kind::Kexec {
            program: "luo_kexec_simple",
            pass: "--- SIMPLE KEXEC TEST PASSED ---",
            stage2: Stage2::Same,
        },
        spans: &[],
        expect: KEXEC_FLB,
    },
    VmTest {
        opt_in: false,
        name: "luo_multi_session",
        kind: Kind::Kexec {
            program: "luo_multi_session",
            pass: "--- MULTI-SESSION KEXEC TEST PASSED ---",
            stage2: Stage2::Same,
        },
        spans: &[],
        expect: KEXEC_FLB,
    },
    VmTest {
        opt_in: false,
        name: "luo_stress_files",
        kind: Kind::Kexec {
            program: "luo_stress_files",
            pass: "--- MANY-FILES KEXEC TEST PASSED (500 files) ---",
            stage2: Stage2::Same,
        },
        spans: &[
            Span {
                label: "preserve 500 files",
                from: "[STAGE 1] Preserving 500 files...",
                to: "[STAGE 1] Successfully preserved 500 files.",
            },
            Span {
                label: "retrieve+verify 500 files",
                from: "[STAGE 2] Verifying 500 files...",
                to: "[STAGE 2] Finishing test session...",
            },
            Span {
                label: "finish session",
                from: "[STAGE 2] Finishing test session...",
                to: "[STAGE 2] Finalizing state session...",
            },
        ],
        expect: KEXEC_FLB,
    },
    VmTest {
        opt_in: false,
        name: "luo_stress_sessions",
        kind: Kind::Kexec {
            program: "luo_stress_sessions",
            pass: "--- MANY-SESSIONS KEXEC TEST PASSED (2000 sessions) ---",
            stage2: Stage2::Same,
        },
        spans: &[
            Span {
                label: "create 2000 sessions",
                from: "[STAGE 1] Creating 2000 sessions...",
                to: "[STAGE 1] Successfully created 2000 sessions.",
            },
            Span {
                label: "retrieve+finish 2000 sessions",
                from: "[STAGE 2] Retrieving and finishing 2000 sessions...",
                to: "[STAGE 2] Finalizing state session...",
            },
        ],
        expect: KEXEC_FLB,
    },
    VmTest {
        opt_in: false,
        name: "luod_update",
        kind: Kind::Luod {
            pass: "--- LUOD UPDATE TEST PASSED ---",
        },
        spans: &[
            Span {
                label: "refused update (EBUSY)",
                from: "preserved 1048576 byte(s) in \"0/vm0\"",
                to: "LUOD-VM: refused update: EBUSY, kexec_loaded 0",
            },
            Span {
                label: "luod restore + retrieve + verify + finish",
                from: S2_START,
                to: "LUOD-VM: retrieved ",
            },
        ],
        expect: LUOD_FLB,
    },
    VmTest {
        opt_in: false,
        name: "systemd_luo",
        kind: Kind::Systemd,
        spans: &[],
        expect: SYSTEMD_FLB,
    },
    VmTest {
        // Opt-in, so that the default suite stays systemd_luo's size; .ci/run runs it on both
        // cores as a stage of its own (147 s on the C core, 176 s on the Rust core, 2026-12-04).
        opt_in: true,
        name: "luod_systemd",
        kind: Kind::LuodSystemd {
            pass: "--- LUOD SYSTEMD TEST PASSED ---",
        },
        spans: &[
            Span {
                label: "boot 1: SIGKILL to restored",
                from: "LUOD-SYSTEMD: step: crash",
                to: LUOD_SYSTEMD_CRASH_PASS,
            },
            Span {
                label: "boot 1: stop + start",
                from: "LUOD-SYSTEMD: step: stop and start",
                to: LUOD_SYSTEMD_STOP_PASS,
            },
            Span {
                label: "boot 1: adopt",
                from: "LUOD-SYSTEMD: step: adopt",
                to: LUOD_SYSTEMD_ADOPT_PASS,
            },
            Span {
                label: "boot 2: SIGKILL to retrieved",
                from: "LUOD-SYSTEMD: step: crash before retrieve",
                to: "LUOD-SYSTEMD: retrieved token 1",
            },
        ],
        expect: LUOD_SYSTEMD_EXPECT,
    },
];

/// Markers of the upstream init.c flow, in the order they must appear.
pub(crate) const S1_START: &str = "INIT: Starting Stage 1";
pub(crate) const S1_DONE: &str = "INIT: Stage 1 completed successfully.";
pub(crate) const KEXEC_START: &str = "kexec_core: Starting new kernel";
pub(crate) const S2_START: &str = "INIT: Starting Stage 2";
pub(crate) const S2_DONE: &str = "INIT: Stage 2 completed successfully.";
/// First line of every kernel's log; splits a two-boot log into boots.
const BANNER: &str = "Linux version ";
/// "Run /init as init process" (initramfs) or "Run /sbin/init as init process" (a root disk).
const RUN_INIT: &str = " as init process";
/// What `xtask/scripts/luod-init.sh` prints when a check fails (then it reboots).
const SCRIPT_FAIL: &str = "LUOD-VM: FAIL: ";

/// Kernel log lines that mean something went wrong in the kernel even if the test passed.
pub(crate) const SPLATS: &[&str] = &[
    "WARNING:",
    "BUG:",
    "kernel BUG at",
    "Oops",
    "Kernel panic",
    // KASAN, KCSAN and most lockdep reports begin with "BUG:" or "WARNING:"; these are
    // the lockdep ones that do not ("RCU lockdep checking is enabled" is benign).
    "UBSAN:",
    "DEBUG_LOCKS_WARN_ON",
    "INFO: trying to register non-static key",
    "INFO: lockdep is turned off",
    "possible recursive locking",
    "possible circular locking",
    "Call Trace:",
    "general protection fault",
    "cut here",
    "soft lockup",
    "hard LOCKUP",
    "rcu_sched self-detected stall",
    "blocked for more than",
];

/// The only `liveupdate test:` messages that are not errors (lib/tests/liveupdate.c).
pub(crate) const FLB_GOOD: &[&str] = &[
    "Registered ",
    "preserve was triggered",
    "unpreserve was triggered",
    "found flb data from the previous boot",
    "finish was triggered",
];

/// What xtask/scripts/kmemleak-scan.sh prints after each scan, and kmemleak's report line.
const KMEMLEAK_SCAN: &str = "LUO-VM: kmemleak scan: ";
const KMEMLEAK_LEAK: &str = "unreferenced object 0x";

/// In how many boots of this test our own init runs the kmemleak scan: upstream's nolibc
/// init.c (the kexec selftests) has no hook for it, so those are covered by KASAN and
/// UBSAN only (docs/verification.md).
fn kmemleak_boots(kind: &Kind) -> usize {
    match kind {
        Kind::Harness { .. } => 1,
        Kind::Luod { .. } | Kind::Systemd | Kind::LuodSystemd { .. } => 2,
        Kind::Kexec { .. } => 0,
    }
}

/// `--sanitize`: every boot with our init reported its kmemleak scan, and no scan found a
/// leak.
pub(crate) fn check_kmemleak(t: &VmTest, run: &Run, diag: &mut Vec<String>) {
    let lines: Vec<&str> = run.lines.iter().map(|l| l.text.as_str()).collect();
    diag.extend(kmemleak_problems(&lines, kmemleak_boots(&t.kind)));
}

/// What is wrong in a console log whose `want` boots each scan kmemleak once: a missing or
/// extra scan, and every leak with the 20 lines of its report that follow.
pub(crate) fn kmemleak_problems(lines: &[&str], want: usize) -> Vec<String> {
    let mut out = Vec::new();
    let scans = lines.iter().filter(|l| l.contains(KMEMLEAK_SCAN)).count();
    if scans != want {
        out.push(format!("expected {want} kmemleak scan(s), saw {scans}"));
    }
    for (i, l) in lines.iter().enumerate() {
        if l.contains(KMEMLEAK_LEAK) {
            out.push(format!("kmemleak: {l}"));
            // The report's stack follows; show it.
            for l in lines.iter().skip(i + 1).take(20) {
                out.push(format!("| {l}"));
            }
        }
    }
    out
}

/// One TAP line.
pub(crate) struct Case {
    pub(crate) name: String,
    pub(crate) ok: bool,
    pub(crate) secs: Option<f64>,
    /// Extra timing details, appended to the description.
    pub(crate) detail: String,
    /// Reasons for failure (printed as TAP diagnostics).
    pub(crate) diag: Vec<String>,
}

/// Metrics of one VM run for the summary table.
pub(crate) struct Metrics {
    /// Host seconds from QEMU start to the first "Run /init" line, and the guest clock then.
    pub(crate) boot_to_init: Option<(f64, Option<f64>)>,
}

/// Is this a kernel log line (`[    1.234567] ...`)? The timestamp need not start the
/// line: the first kernel line follows SeaBIOS's output without a newline.
pub(crate) fn kernel_line(text: &str) -> Option<(f64, &str)> {
    text.match_indices('[').find_map(|(i, _)| {
        let (ts, msg) = text[i + 1..].split_once("] ")?;
        let ts = ts.trim();
        if ts.is_empty() || !ts.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return None;
        }
        Some((ts.parse().ok()?, msg))
    })
}

fn find(lines: &[Line], from: usize, text: &str) -> Option<usize> {
    lines[from.min(lines.len())..]
        .iter()
        .position(|l| l.text.contains(text))
        .map(|i| i + from)
}

/// The `TEST_F(fixture, name)` cases of a harness program, from its source, in order.
pub(crate) fn harness_cases(tree: &Path, program: &str) -> Vec<String> {
    let src = tree.join(SELFTEST_DIR).join(format!("{program}.c"));
    let text = fs::read_to_string(src).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("TEST_F("))
        .filter_map(|r| r.split_once(')').map(|(args, _)| args))
        .filter_map(|args| args.split_once(','))
        .map(|(f, n)| format!("{}.{}", f.trim(), n.trim()))
        .collect()
}

/// Checks every VM gets: it ended by itself, no kernel splat, LUO test FLB lines clean,
/// the expected lines per boot.
fn common_checks(t: &VmTest, run: &Run, boots: usize, diag: &mut Vec<String>) {
    if run.timed_out {
        diag.push("timed out (QEMU killed)".into());
    } else if !run.status.is_some_and(|s| s.success()) {
        diag.push(format!("QEMU exited with {:?}", run.status));
    }
    for l in &run.lines {
        if let Some((_, msg)) = kernel_line(&l.text) {
            if let Some(p) = SPLATS.iter().find(|p| msg.contains(*p)) {
                diag.push(format!("kernel splat ({p}): {}", l.text));
            }
            if let Some(m) = msg.split_once("liveupdate test: ").map(|(_, m)| m) {
                if !FLB_GOOD.iter().any(|g| m.contains(g)) {
                    diag.push(format!("lib/tests/liveupdate.c error: {}", l.text));
                }
            }
        }
        if l.text.starts_with("qemu stderr: ") {
            diag.push(l.text.clone());
        }
    }
    let starts = boot_starts(&run.lines);
    if starts.len() != boots {
        diag.push(format!(
            "expected {boots} kernel boot(s), saw {}",
            starts.len()
        ));
    }
    for e in t.expect {
        let Some(&b) = starts.get(e.boot) else {
            continue;
        };
        let end = starts.get(e.boot + 1).copied().unwrap_or(run.lines.len());
        let n = run.lines[b..end]
            .iter()
            .filter(|l| l.text.contains(e.text))
            .count();
        if n != e.count {
            diag.push(format!(
                "boot {}: expected {}x \"{}\", found {n}",
                e.boot + 1,
                e.count,
                e.text
            ));
        }
    }
}

fn boot_starts(lines: &[Line]) -> Vec<usize> {
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| kernel_line(&l.text).is_some_and(|(_, m)| m.starts_with(BANNER)))
        .map(|(i, _)| i)
        .collect()
}

fn boot_metrics(run: &Run) -> Option<(f64, Option<f64>)> {
    let i = find(&run.lines, 0, RUN_INIT)?;
    let l = &run.lines[i];
    Some((l.t, kernel_line(&l.text).map(|(ts, _)| ts)))
}

fn span_between(lines: &[Line], from: &str, to: &str) -> Option<f64> {
    let a = find(lines, 0, from)?;
    let b = find(lines, a + 1, to)?;
    Some(lines[b].t - lines[a].t)
}

/// Judge a harness VM: one case per TEST_F that was selected, plus a case for the VM.
pub(crate) fn judge_harness(t: &VmTest, run: &Run, expected: &[String]) -> (Vec<Case>, Metrics) {
    let mut cases = Vec::new();
    for name in expected {
        let run_marker = format!("#  RUN           {name} ...");
        let start = find(&run.lines, 0, &run_marker);
        let result = run.lines.iter().enumerate().find_map(|(i, l)| {
            let rest = l
                .text
                .strip_prefix("not ok ")
                .map(|r| (false, r))
                .or_else(|| l.text.strip_prefix("ok ").map(|r| (true, r)))?;
            let (ok, rest) = rest;
            let (_num, desc) = rest.split_once(' ')?;
            let (tname, directive) = match desc.split_once(" # ") {
                Some((n, d)) => (n.trim(), Some(d.trim())),
                None => (desc.trim(), None),
            };
            (tname == name).then_some((i, ok, directive.map(str::to_string)))
        });
        let mut diag = Vec::new();
        let mut secs = None;
        match result {
            None => diag.push("no result line (crashed, hung, or not run)".into()),
            Some((i, ok, directive)) => {
                if let Some(s) = start {
                    secs = Some(run.lines[i].t - run.lines[s].t);
                }
                if !ok {
                    diag.push("harness reports failure".into());
                }
                if let Some(d) = directive {
                    // A SKIP means the environment is broken (e.g. no /dev/liveupdate).
                    diag.push(format!("harness directive: {d}"));
                }
                if let Some(s) = start {
                    // Show what the harness printed for this case on failure.
                    if !diag.is_empty() {
                        for l in &run.lines[s..=i] {
                            if l.text.starts_with('#') {
                                diag.push(format!("| {}", l.text));
                            }
                        }
                    }
                }
            }
        }
        cases.push(Case {
            name: format!(
                "{}.{}",
                t.name,
                name.split_once('.').map_or(name.as_str(), |(_, n)| n)
            ),
            ok: diag.is_empty(),
            secs,
            detail: String::new(),
            diag,
        });
    }
    let mut diag = Vec::new();
    common_checks(t, run, 1, &mut diag);
    if !run.lines.iter().any(|l| l.text == "LUO-VM: exit=0") {
        diag.push("the test program did not exit 0 (no \"LUO-VM: exit=0\")".into());
    }
    let boot = boot_metrics(run);
    let detail = boot.map_or(String::new(), |(h, g)| {
        format!(
            "boot to /init {h:.2} s host{}",
            g.map_or(String::new(), |g| format!(" / {g:.2} s guest"))
        )
    });
    cases.push(Case {
        name: format!(
            "{} (VM: boot, FLB registration, clean exit, no splat)",
            t.name
        ),
        ok: diag.is_empty(),
        secs: Some(run.wall.as_secs_f64()),
        detail,
        diag,
    });
    (cases, Metrics { boot_to_init: boot })
}

/// Judge a kexec VM: the markers of both stages in order, the pass line, FLB lines per
/// boot, plus the timings (stage 1, blackout, stage 2, test-specific spans).
pub(crate) fn judge_kexec(t: &VmTest, run: &Run, pass: &str) -> (Case, Metrics) {
    let mut diag = Vec::new();
    common_checks(t, run, 2, &mut diag);
    diag.extend(
        run.lines
            .iter()
            .filter(|l| l.text.starts_with(SCRIPT_FAIL))
            .map(|l| l.text.clone()),
    );
    let mut pos = 0;
    let mut at = Vec::new();
    for m in [S1_START, S1_DONE, KEXEC_START, S2_START, pass, S2_DONE] {
        match find(&run.lines, pos, m) {
            Some(i) => {
                at.push(Some(run.lines[i].t));
                pos = i + 1;
            }
            None => {
                diag.push(format!("missing (in order) \"{m}\""));
                at.push(None);
            }
        }
    }
    let mut spans = Vec::new();
    let mut push = |label: &str, a: Option<f64>, b: Option<f64>| {
        if let (Some(a), Some(b)) = (a, b) {
            spans.push((label.to_string(), b - a));
        }
    };
    push("stage 1 (kexec load + test)", at[0], at[1]);
    // Blackout: from init's reboot(RB_KEXEC) (it prints S1_DONE right before) to the new
    // kernel's init running, as the host sees the serial line.
    push("kexec blackout", at[1], at[3]);
    // The blackout in four parts: `down` = the old kernel going down (LUO freeze and
    // serialization, KHO, kexec) up to "kexec_core: Starting new kernel"; `jump` = to the
    // new kernel's banner (purgatory, decompression, and the serial line's own latency);
    // `boot` = banner to "Run /init"; `init` = init.c starting and printing its stage.
    let b2 = boot_starts(&run.lines).get(1).copied();
    let banner2 = b2.map(|i| run.lines[i].t);
    let init2 = b2
        .and_then(|i| find(&run.lines, i, RUN_INIT))
        .map(|i| run.lines[i].t);
    push("blackout.down", at[1], at[2]);
    push("blackout.jump", at[2], banner2);
    push("blackout.boot", banner2, init2);
    push("blackout.init", init2, at[3]);
    push("stage 2", at[3], at[5]);
    for s in t.spans {
        match span_between(&run.lines, s.from, s.to) {
            Some(d) => spans.push((s.label.to_string(), d)),
            None => diag.push(format!("span \"{}\": markers not found", s.label)),
        }
    }
    let detail = spans
        .iter()
        .map(|(l, d)| format!("{l} {d:.3} s"))
        .collect::<Vec<_>>()
        .join(", ");
    let case = Case {
        name: t.name.to_string(),
        ok: diag.is_empty(),
        secs: Some(run.wall.as_secs_f64()),
        detail,
        diag,
    };
    (
        case,
        Metrics {
            boot_to_init: boot_metrics(run),
        },
    )
}

/// Judge the luod_systemd VM: as a kexec test (both stages in order, the pass line, FLB and
/// step lines per boot, no splat), and no check of the script failed.
pub(crate) fn judge_luod_systemd(t: &VmTest, run: &Run, pass: &str) -> (Case, Metrics) {
    let (mut case, m) = judge_kexec(t, run, pass);
    case.diag.extend(
        run.lines
            .iter()
            .filter_map(|l| l.text.split_once(LUOD_SYSTEMD_FAIL))
            .map(|(_, why)| format!("{LUOD_SYSTEMD_FAIL}{why}")),
    );
    case.ok = case.diag.is_empty();
    (case, m)
}

/// What systemd's harness reads from the disk after the VM is gone.
pub(crate) struct SystemdDisk {
    /// `/testok`: written by the second boot's test script when every check passed.
    pub(crate) testok: bool,
    /// `/failed`, if present: its contents (the harness fails on any).
    pub(crate) failed: Option<String>,
    /// The journal on the disk, one text per boot.
    pub(crate) journal: Vec<String>,
}

/// The test script's first line in each boot (its `set -x` trace goes to the console through
/// the harness's StandardOutput=journal+console), and the kexec request in the first.
pub(crate) const SYSTEMD_UNIT_START: &str = "]: + set -o pipefail";
pub(crate) const SYSTEMD_KEXEC: &str = "]: + systemctl kexec ";
/// The harness's exit status 123 is the manager's exit code when the VM powers off: the test
/// sets it at its very end (`systemctl --no-block exit 123`, after `touch /testok`), and PID 1
/// then starts exit.target; a failed test unit instead runs FailureAction=exit with the
/// unit's own status. So: the request on the console in boot 2, PID 1 acting on it in the
/// journal, and no failed test unit in either boot.
const SYSTEMD_EXIT_REQUEST: &str = "]: + systemctl --no-block exit 123";
const SYSTEMD_EXIT_JOB: &str = "exit.target: Trying to enqueue job exit.target/start";
const SYSTEMD_UNIT_FAILED: &str = "TEST-91-LIVEUPDATE.service: Failed with result";

/// Judge the systemd VM as systemd's integration-test harness does (the exit status 123
/// that SuccessActionExitStatus= sets, `/testok` on the disk, nothing in `/failed`), plus
/// our checks: two boots, no kernel splat, the FLB lines, and the blackout as systemd sees
/// it (from `systemctl kexec` to the second boot's start of the test unit).
pub(crate) fn judge_systemd(t: &VmTest, run: &Run, disk: &SystemdDisk) -> (Case, Metrics) {
    let mut diag = Vec::new();
    common_checks(t, run, 2, &mut diag);
    if !disk.testok {
        diag.push("no /testok on the disk: the second boot's checks did not all pass".into());
    }
    if let Some(f) = &disk.failed {
        diag.push(format!("/failed on the disk: {}", f.trim()));
    }
    // The exit status (123, see SYSTEMD_EXIT_REQUEST).
    let starts = boot_starts(&run.lines);
    if starts
        .get(1)
        .and_then(|&b| find(&run.lines, b, SYSTEMD_EXIT_REQUEST))
        .is_none()
    {
        diag.push(format!(
            "boot 2: no \"{SYSTEMD_EXIT_REQUEST}\" on the console"
        ));
    }
    match disk.journal.as_slice() {
        [.., last] if last.contains(SYSTEMD_EXIT_JOB) => {}
        [.., _] => diag.push(format!(
            "journal of the last boot: no \"{SYSTEMD_EXIT_JOB}\""
        )),
        [] => diag.push("no journal on the disk".into()),
    }
    if disk.journal.len() != 2 {
        diag.push(format!(
            "the journal holds {} boot(s), not 2",
            disk.journal.len()
        ));
    }
    for (n, j) in disk.journal.iter().enumerate() {
        if let Some(l) = j.lines().find(|l| l.contains(SYSTEMD_UNIT_FAILED)) {
            diag.push(format!("journal of boot {}: {}", n + 1, l.trim()));
        }
    }
    let unit1 = find(&run.lines, 0, SYSTEMD_UNIT_START);
    let kexec = unit1.and_then(|i| find(&run.lines, i, SYSTEMD_KEXEC));
    let unit2 = starts
        .get(1)
        .and_then(|&b| find(&run.lines, b, SYSTEMD_UNIT_START));
    for (what, at) in [
        ("the test unit's start in boot 1", unit1),
        ("`systemctl kexec` in boot 1", kexec),
        ("the test unit's start in boot 2", unit2),
    ] {
        if at.is_none() {
            diag.push(format!("missing: {what}"));
        }
    }
    let t_of = |i: Option<usize>| i.map(|i| run.lines[i].t);
    let mut spans = Vec::new();
    let mut push = |label: &str, a: Option<f64>, b: Option<f64>| {
        if let (Some(a), Some(b)) = (a, b) {
            spans.push(format!("{label} {:.3} s", b - a));
        }
    };
    let banner1 = starts.first().map(|&i| run.lines[i].t);
    let banner2 = starts.get(1).map(|&i| run.lines[i].t);
    let down = starts
        .get(1)
        .and_then(|&b| {
            run.lines[..b]
                .iter()
                .rposition(|l| l.text.contains(KEXEC_START))
        })
        .map(|i| run.lines[i].t);
    push("boot 1 to the test unit", banner1, t_of(unit1));
    push("test, boot 1", t_of(unit1), t_of(kexec));
    push("kexec blackout", t_of(kexec), t_of(unit2));
    push("blackout.down", t_of(kexec), down);
    push("blackout.jump", down, banner2);
    push("blackout.boot", banner2, t_of(unit2));
    push("test, boot 2", t_of(unit2), run.lines.last().map(|l| l.t));
    let case = Case {
        name: t.name.to_string(),
        ok: diag.is_empty(),
        secs: Some(run.wall.as_secs_f64()),
        detail: spans.join(", "),
        diag,
    };
    (
        case,
        Metrics {
            boot_to_init: boot_metrics(run),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(lines: &[&str]) -> Run {
        Run {
            lines: lines
                .iter()
                .enumerate()
                .map(|(i, l)| Line {
                    t: i as f64 / 10.0,
                    text: l.to_string(),
                })
                .collect(),
            status: None,
            timed_out: false,
            wall: std::time::Duration::from_secs(1),
        }
    }

    #[test]
    fn a_kmemleak_report_or_a_missing_scan_fails_with_its_stack() {
        let clean = [
            "[  9.1] x",
            "LUO-VM: kmemleak scan: 0 unreferenced object(s)",
        ];
        assert!(kmemleak_problems(&clean, 1).is_empty());
        // Each boot must scan: one scan for two boots is a problem, and so is a second one.
        assert_eq!(kmemleak_problems(&clean, 2).len(), 1);
        assert_eq!(kmemleak_problems(&clean, 0).len(), 1);
        let leak = [
            "LUO-VM: kmemleak scan: 1 unreferenced object(s)",
            "LUO-VM: unreferenced object 0xffff888004a1b000 (size 64):",
            "LUO-VM:   backtrace (crc 0):",
            "LUO-VM:     luo_session_create+0x1c/0x90",
        ];
        let p = kmemleak_problems(&leak, 1);
        assert!(p[0].starts_with("kmemleak: ") && p[0].contains("0xffff888004a1b000"));
        assert!(p.iter().any(|l| l.contains("luo_session_create")));
    }

    #[test]
    fn kernel_timestamps() {
        assert_eq!(kernel_line("[    1.500000] x: y"), Some((1.5, "x: y")));
        assert_eq!(kernel_line("# [STAGE 1] x"), None);
        assert_eq!(
            kernel_line("ROM..[    0.000000] Linux"),
            Some((0.0, "Linux"))
        );
    }

    #[test]
    fn harness_results_and_timings() {
        let t = &TESTS[0];
        let r = run(&[
            "[    0.1] Linux version 7.3.4",
            "#  RUN           f.a ...",
            "ok 1 f.a",
            "#  RUN           f.b ...",
            "#      SKIP      no device",
            "ok 2 f.b # SKIP no device",
            "LUO-VM: exit=0",
        ]);
        let want = vec!["f.a".to_string(), "f.b".to_string(), "f.c".to_string()];
        let (cases, _) = judge_harness(t, &r, &want);
        assert!(cases[0].ok);
        assert_eq!(cases[0].secs.map(|s| (s * 10.0).round()), Some(1.0));
        assert!(!cases[1].ok, "a SKIP is a failure here");
        assert!(!cases[2].ok, "a case without result line fails");
        // The VM case fails too: no FLB line, QEMU status unknown.
        assert!(!cases[3].ok);
    }

    #[test]
    fn splats_and_flb_errors_are_reported() {
        let t = &TESTS[0];
        let r = run(&[
            "[    0.1] Linux version 7.3.4",
            "[    0.2] rcu: RCU lockdep checking is enabled.",
            "[    0.3] WARNING: lib/x.c:1 at f+0x1/0x2",
            "[    0.4] liveupdate test: liveupdate-test-flb-v0: ERROR - incorrect data handle",
        ]);
        let mut diag = Vec::new();
        common_checks(t, &r, 1, &mut diag);
        assert!(diag.iter().any(|d| d.contains("WARNING:")));
        assert!(diag.iter().any(|d| d.contains("incorrect data handle")));
        assert!(!diag.iter().any(|d| d.contains("RCU lockdep")));
    }

    #[test]
    fn systemd_is_judged_by_the_disk_the_exit_and_the_journal() {
        let t = TESTS
            .iter()
            .find(|t| matches!(t.kind, Kind::Systemd))
            .expect("systemd_luo is in the suite");
        let mut lines = vec![
            "[    0.0] Linux version 7.3.4".to_string(),
            format!("[    1.0] {FLB_REGISTERED}"),
            format!("[    1.0] {RUST_SAMPLE}"),
            "[    5.0] TEST-91-LIVEUPDATE.sh[140]: + set -o pipefail".to_string(),
            "[    6.0] TEST-91-LIVEUPDATE.sh[140]: + systemctl kexec '--kernel-cmdline=x'"
                .to_string(),
            "[    7.0] kexec_core: Starting new kernel".to_string(),
            "[    0.0] Linux version 7.3.4".to_string(),
            format!("[    1.0] {FLB_REGISTERED}"),
            format!("[    1.0] {RUST_SAMPLE}"),
            "[    5.0] TEST-91-LIVEUPDATE.sh[140]: + set -o pipefail".to_string(),
        ];
        for v in 0..3 {
            let flb = format!("liveupdate test: liveupdate-test-flb-v{v}");
            lines.insert(4, format!("[    6.0] {flb}: preserve was triggered"));
            lines.push(format!(
                "[    6.0] {flb}: found flb data from the previous boot"
            ));
            lines.push(format!("[    9.0] {flb}: finish was triggered"));
        }
        lines.push("[    9.0] TEST-91-LIVEUPDATE.sh[140]: + systemctl --no-block exit 123".into());
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let mut r = run(&refs);
        r.status = std::process::Command::new("true").status().ok();
        let good = || SystemdDisk {
            testok: true,
            failed: None,
            journal: vec![
                "boot 1".into(),
                format!("systemd[1]: {SYSTEMD_EXIT_JOB}/replace-irreversibly"),
            ],
        };
        let (case, _) = judge_systemd(t, &r, &good());
        assert!(case.ok, "{:?}", case.diag);

        let no_testok = SystemdDisk {
            testok: false,
            ..good()
        };
        assert!(!judge_systemd(t, &r, &no_testok).0.ok);
        let failed = SystemdDisk {
            failed: Some("TEST-91 failed".into()),
            ..good()
        };
        assert!(!judge_systemd(t, &r, &failed).0.ok);
        let mut unit_failed = good();
        unit_failed.journal[0] = format!("systemd[1]: {SYSTEMD_UNIT_FAILED} 'exit-code'.");
        assert!(!judge_systemd(t, &r, &unit_failed).0.ok);
        let mut no_exit_job = good();
        no_exit_job.journal[1] = "boot 2".into();
        assert!(!judge_systemd(t, &r, &no_exit_job).0.ok);
        // No exit request on the console in boot 2.
        let mut r2 = run(&refs[..refs.len() - 1]);
        r2.status = r.status;
        assert!(!judge_systemd(t, &r2, &good()).0.ok);
    }

    #[test]
    fn luod_systemd_needs_its_steps_its_pass_line_and_no_failure() {
        let t = TESTS
            .iter()
            .find(|t| matches!(t.kind, Kind::LuodSystemd { .. }))
            .expect("luod_systemd is in the suite");
        let Kind::LuodSystemd { pass } = t.kind else {
            unreachable!()
        };
        let unit = |m: &str| format!("[   90.0] luod-systemd-test.sh[120]: {m}");
        let boot = |n: usize, lines: &mut Vec<String>| {
            lines.push("[    0.0] Linux version 7.3.4".into());
            lines.push(format!("[    1.0] {FLB_REGISTERED}"));
            lines.push(format!("[    1.0] {RUST_SAMPLE}"));
            lines.push(unit(if n == 0 { S1_START } else { S2_START }));
            lines.push(unit(if n == 0 {
                "LUOD-SYSTEMD: step: crash (systemctl kill -s KILL luod.service)"
            } else {
                "LUOD-SYSTEMD: step: crash before retrieve (systemctl kill -s KILL luod.service)"
            }));
            if n == 1 {
                lines.push(unit("LUOD-SYSTEMD: retrieved token 1: 1048576 bytes"));
            }
            lines.push(unit(LUOD_SYSTEMD_CRASH_PASS));
            lines.push(unit("LUOD-SYSTEMD: step: stop and start"));
            lines.push(unit(LUOD_SYSTEMD_STOP_PASS));
            if n == 0 {
                lines.push(unit("LUOD-SYSTEMD: step: adopt"));
                lines.push(unit(LUOD_SYSTEMD_ADOPT_PASS));
            }
            for v in 0..3 {
                let flb = format!("liveupdate test: liveupdate-test-flb-v{v}");
                if n == 0 {
                    lines.push(format!("[   95.0] {flb}: preserve was triggered"));
                } else {
                    lines.push(format!(
                        "[    2.0] {flb}: found flb data from the previous boot"
                    ));
                    lines.push(format!("[   95.0] {flb}: finish was triggered"));
                }
            }
            if n == 0 {
                lines.push(unit(S1_DONE));
                lines.push("[  100.0] kexec_core: Starting new kernel".into());
            } else {
                lines.push(unit(pass));
                lines.push(unit(S2_DONE));
            }
        };
        let mut lines = Vec::new();
        boot(0, &mut lines);
        boot(1, &mut lines);
        let judge = |lines: &[String]| {
            let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
            let mut r = run(&refs);
            r.status = std::process::Command::new("true").status().ok();
            judge_luod_systemd(t, &r, pass).0
        };
        let good = judge(&lines);
        assert!(good.ok, "{:?}", good.diag);
        assert!(
            good.detail.contains("boot 1: SIGKILL to restored"),
            "{}",
            good.detail
        );

        let without = |needle: &str| -> Vec<String> {
            lines
                .iter()
                .filter(|l| !l.contains(needle))
                .cloned()
                .collect()
        };
        // No pass line: fails, naming it.
        let c = judge(&without(pass));
        assert!(
            !c.ok && c.diag.iter().any(|d| d.contains(pass)),
            "{:?}",
            c.diag
        );
        // A step that did not pass in one boot.
        let mut one_crash = lines.clone();
        let i = one_crash
            .iter()
            .rposition(|l| l.contains(LUOD_SYSTEMD_CRASH_PASS))
            .unwrap();
        one_crash.remove(i);
        let c = judge(&one_crash);
        assert!(
            !c.ok
                && c.diag
                    .iter()
                    .any(|d| d.contains("boot 2") && d.contains("crash")),
            "{:?}",
            c.diag
        );
        // A failed check, even with everything else in place.
        let mut failed = lines.clone();
        failed.insert(
            6,
            unit("LUOD-SYSTEMD: FAIL: the fd store holds 1 fd(s), not 2"),
        );
        let c = judge(&failed);
        assert!(
            !c.ok && c.diag.iter().any(|d| d.contains("fd store holds 1")),
            "{:?}",
            c.diag
        );
        // A kernel splat.
        let mut splat = lines.clone();
        splat.insert(
            5,
            "[   91.0] WARNING: kernel/liveupdate/luo_session.c:1".into(),
        );
        assert!(!judge(&splat).ok);
    }

    #[test]
    fn kexec_markers_must_come_in_order() {
        let t = &TESTS[1];
        let Kind::Kexec { pass, .. } = t.kind else {
            panic!("TESTS[1] is a kexec test");
        };
        let r = run(&[
            "[    0.1] Linux version 7.3.4",
            S1_START,
            S1_DONE,
            "[    1.0] kexec_core: Starting new kernel",
            "[    0.0] Linux version 7.3.4",
            pass,
            S2_START,
            S2_DONE,
        ]);
        let (case, _) = judge_kexec(t, &r, pass);
        assert!(case
            .diag
            .iter()
            .any(|d| d.contains(S2_DONE) || d.contains(pass)));
    }
}
