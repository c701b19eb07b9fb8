#!/usr/bin/env bash
# Extra VM tests of the Rust LUO core that the upstream selftests cannot express: kexec
# chains that cross cores, bad incoming state, upstream bug B1, and a benchmark of both
# cores. The guest side is backend-linux/guest/luo_xtest.c (PID 1, see its header).
#
# usage: backend-linux/vm-extra.sh [--no-debug] [--timeout SECS] TEST...
#   chain:c,rust,c  chain:rust,c,rust  chain:<any plan>   memfds in named sessions verified
#                                                         after every kexec of the plan
#   corrupt:compat|count|chain|cycle|files                Rust -> Rust, the first kernel's
#                                                         test hook damages the handover
#   b1:c,c  b1:c,rust  b1:rust,rust                       upstream bug B1
#   bench                                                 both cores, 4 kexecs each (repeated
#                                                         LUOX_BENCH_RUNS times, default 1)
#   all                                                   every test above (bench excluded)
#   prof:<c|rust>:<op>                                    sampling profile of one operation in
#                                                         a loop (ops: luo_xtest.c run_loop;
#                                                         size LUOX_N, default 200000; one
#                                                         sample per LUOX_INTERVAL ms, default
#                                                         1; LUOX_STACK bytes of stack scanned
#                                                         for callers; gdbprof.py);
#                                                         LUOX_TRACE=<symbol> counts the
#                                                         instructions of one call instead
#                                                         (LUOX_TRACE_CALLS=N: N calls, summed)
#   loop:<c|rust>:<op>                                    the same loop, unobserved: its wall
#                                                         time per operation
#
# Kernels come from `cargo xtask vm build --core c|rust` (same cache, same patch series and
# config fragments as `cargo xtask vm test`); --no-debug builds them without
# config/debug.config (lockdep), as the benchmark should. LUOX_BZIMAGE_C / LUOX_BZIMAGE_RUST
# point at already built kernels instead (inside their intact O= directories). Prints one TAP line per test;
# serial logs go to $LUO_CACHE/logs/extra-<date>/.
#
# Also: LUOX_ICOUNT=<shift> runs QEMU with -icount (the guest clock counts instructions);
# LUOX_QEMU_PREFIX (a command QEMU runs under), LUOX_STDIN (QEMU's stdin, the guest console)
# and LUOX_APPEND (more kernel parameters) are what qemu-callgrind.sh uses.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
cache=${LUO_CACHE:-/var/cache/luo}
debug_flag=()
timeout=180
tests=()
while [ $# -gt 0 ]; do
    case $1 in
        --no-debug) debug_flag=(--no-debug) ;;
        --timeout) timeout=$2; shift ;;
        -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
        all) tests+=(chain:c,rust,c chain:rust,c,rust corrupt:compat corrupt:count corrupt:chain
                     corrupt:cycle corrupt:files b1:c,c b1:c,rust b1:rust,rust) ;;
        *) tests+=("$1") ;;
    esac
    shift
done
[ ${#tests[@]} -gt 0 ] || { sed -n '2,32p' "$0"; exit 2; }

out=$cache/logs/extra-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"

declare -A bz kdir
build_core() {
    local core=$1 log=$out/build-$1.log
    local given=LUOX_BZIMAGE_${core^^}
    if [ -n "${!given:-}" ]; then # a kernel built elsewhere (its O= dir must be intact)
        bz[$core]=${!given}
        kdir[$core]=$(dirname "$(dirname "$(dirname "$(dirname "${bz[$core]}")")")")
        echo "# $core core: ${bz[$core]} (from $given)" >&2
        return
    fi
    if ! (cd "$repo" && cargo xtask vm build --core "$core" "${debug_flag[@]}") >"$log" 2>&1; then
        echo "Bail out! cargo xtask vm build --core $core failed (see $log)"
        tail -20 "$log" >&2
        exit 2
    fi
    bz[$core]=$(sed -n 's/^bzImage: //p' "$log")
    kdir[$core]=$(dirname "$(dirname "$(dirname "$(dirname "${bz[$core]}")")")")
    echo "# $core core: ${bz[$core]}" >&2
}
need_c=0 need_rust=0
for t in "${tests[@]}"; do
    case $t in
        bench) need_c=1; need_rust=1 ;;
        prof:c:*|loop:c:*) need_c=1 ;;
        prof:rust:*|loop:rust:*) need_rust=1 ;;
        corrupt:*) need_rust=1 ;;
        *:*) if [[ ,${t#*:}, == *,c,* ]]; then need_c=1; fi
             if [[ ,${t#*:}, == *,rust,* ]]; then need_rust=1; fi ;;
    esac
done
[ $need_c = 1 ] && build_core c
[ $need_rust = 1 ] && build_core rust
any=${kdir[rust]:-${kdir[c]}}
gen_init_cpio=$any/usr/gen_init_cpio

gcc -static -O2 -Wall -Wno-unused-result -isystem "$any/usr/include" \
    -o "$out/luo_xtest" "$here/guest/luo_xtest.c"

# initrd for plan[i..]: /init, and (unless last) /next/kernel + /next/initrd.img.
mk_initrd() {
    local name=$1 i=$2; shift 2
    local plan=("$@") list=$out/$name-$i.list img=$out/$name-$i.cpio
    {
        echo "dir /dev 0755 0 0"
        echo "dir /proc 0755 0 0"
        echo "nod /dev/console 0600 0 0 c 5 1"
        echo "file /init $out/luo_xtest 0755 0 0"
        if [ $((i + 1)) -lt ${#plan[@]} ]; then
            local next
            next=$(mk_initrd "$name" $((i + 1)) "${plan[@]}")
            echo "dir /next 0755 0 0"
            echo "file /next/kernel ${bz[${plan[$((i + 1))]}]} 0644 0 0"
            echo "file /next/initrd.img $next 0644 0 0"
        fi
    } >"$list"
    "$gen_init_cpio" "$list" >"$img"
    echo "$img"
}

# Lines that mean the kernel itself went wrong (xtask's list, xtask/src/suite.rs SPLATS),
# and lib/tests/liveupdate.c messages that are not its success messages.
splats='WARNING:|BUG:|kernel BUG at|Oops|Kernel panic|UBSAN:|DEBUG_LOCKS_WARN_ON|INFO: trying to register non-static key|INFO: lockdep is turned off|possible recursive locking|possible circular locking|Call Trace:|general protection fault|cut here|soft lockup|hard LOCKUP|rcu_sched self-detected stall|blocked for more than'
flb_bad() { grep -a "liveupdate test: " "$1" | grep -avE "Registered |preserve was triggered|unpreserve was triggered|found flb data from the previous boot|finish was triggered"; }

# For the timed runs (bench, loop, prof): a steady clock and nothing else running. Under a
# loaded TCG host the guest often fails to calibrate the TSC and falls back to jiffies (4 ms
# steps in CLOCK_MONOTONIC and printk). TCG's TSC is the host's, so give its rate and keep it
# as the clocksource. Under -icount the TSC counts virtual nanoseconds, 2^shift per
# instruction: at 2^shift GHz the guest's clock reads instructions (1 ns = 1 instruction).
khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
[ -z "${LUOX_ICOUNT:-}" ] || khz=$((1000000 << LUOX_ICOUNT))
clock="tsc_early_khz=$khz tsc=reliable"
# No PS/2 probing either: i8042 finds its mouse asynchronously, late in boot, spending about
# ten million instructions in udelay(); under -icount it landed in a reboot window (23x).
clock+=" i8042.noaux i8042.nokbd"

n=0 failed=0
run_vm() { # name plan extra-append -> log path
    local name=$1 plan=$2 extra=$3
    local -a p
    IFS=, read -r -a p <<<"$plan"
    local img log=$out/$name.log
    img=$(mk_initrd "$name" 0 "${p[@]}")
    local smp=2
    # One vCPU for the loops, so every sample (and all the time) is the loop's.
    [[ $name != loop_* ]] || smp=1
    local -a qemu=(timeout "$timeout" ${LUOX_QEMU_PREFIX:-} qemu-system-x86_64 -m 1G -smp $smp -no-reboot -nographic
        -nodefaults -accel tcg -serial stdio ${LUOX_ICOUNT:+-icount shift=$LUOX_ICOUNT,sleep=off}
        -append "console=ttyS0 liveupdate=on panic=-1 luox=${name%%_*} luox_plan=$plan luox_step=0 $extra${LUOX_APPEND:+ $LUOX_APPEND}"
        -kernel "${bz[${p[0]}]}" -initrd "$img")
    if [ -z "${gdb_sock:-}" ]; then
        "${qemu[@]}" <"${LUOX_STDIN:-/dev/null}" >"$log" 2>&1 || true
    else
        "${qemu[@]}" -gdb "unix:$gdb_sock,server=on,wait=off" </dev/null >"$log" 2>&1 &
        local pid=$!
        python3 "$here/gdbprof.py" --sock "$gdb_sock" --log "$log" --timeout "$timeout" --interval "${LUOX_INTERVAL:-1}" --stack "${LUOX_STACK:-0}" --top "${LUOX_TOP:-30}" \
            --end "${end_marker:-LUOX LOOP END}" ${LUOX_TRACE:+--trace "$LUOX_TRACE"} \
            ${LUOX_TRACE_UNTIL:+--trace-until "$LUOX_TRACE_UNTIL"} ${LUOX_TRACE_CALLS:+--trace-calls "$LUOX_TRACE_CALLS"} \
            --system-map "${kdir[${p[-1]}]}/System.map" >"$out/$name.prof" || true
        wait $pid || true
    fi
    echo "$log"
}

report() { # ok|fail name detail log
    n=$((n + 1))
    if [ "$1" = ok ]; then
        echo "ok $n - $2${3:+ ($3)}"
    else
        failed=$((failed + 1))
        echo "not ok $n - $2${3:+ ($3)}"
        echo "# log: $4"
        { grep -aE "LUOX FAIL|$splats" "$4"; flb_bad "$4"; } | head -10 | sed 's/^/#   /'
    fi
}

judge_pass() { # name log [allowed-splat-regex]
    local name=$1 log=$2
    if ! grep -q "LUOX RESULT PASS" "$log"; then
        report fail "$name" "no LUOX RESULT PASS" "$log"
    elif grep -aEq "$splats" "$log"; then
        report fail "$name" "kernel splat" "$log"
    elif flb_bad "$log" >/dev/null; then
        report fail "$name" "lib/tests/liveupdate.c error" "$log"
    else
        report ok "$name" "$(grep -c 'Linux version' "$log") boots" "$log"
    fi
}

bench_summary() { # logs...
    python3 - "$@" <<'EOF'
import re, sys, statistics as st
rows = {}
for log in sys.argv[1:]:
    text = open(log, errors="replace").read()
    for m in re.finditer(r"LUOX BENCH core=(\w+) step=(\d+) (\w+) total_us=(\d+) per_op_us=([\d.]+) n=(\d+)", text):
        rows.setdefault((m[1], m[3]), []).append(float(m[4]))
    # reboot(): from the "luox: reboot" kmsg marker to "kexec_core: Starting new kernel",
    # both kernel timestamps of the same boot.
    core = re.search(r"luox_plan=(\w+)", text)[1]
    for m in re.finditer(r"\[\s*([\d.]+)\] luox: reboot\s*\n(?:.*\n)*?.*?\[\s*([\d.]+)\] kexec_core: Starting new kernel", text):
        rows.setdefault((core, "reboot_to_kexec"), []).append((float(m[2]) - float(m[1])) * 1e6)
ops = ["create_sessions", "close_sessions", "preserve_memfds", "unpreserve_memfds",
       "reboot_to_kexec", "first_open", "retrieve_sessions", "finish_empty_sessions",
       "close_incoming_sessions", "retrieve_memfds", "finish_memfds",
       "ioctl_rejected", "ioctl_get_name", "ioctl_finish_empty"]
n = {"create_sessions": 2000, "close_sessions": 2000, "preserve_memfds": 500,
     "unpreserve_memfds": 500, "reboot_to_kexec": 1, "first_open": 1,
     "retrieve_sessions": 2000, "finish_empty_sessions": 2000, "close_incoming_sessions": 2000,
     "retrieve_memfds": 500, "finish_memfds": 500,
     "ioctl_rejected": 20000, "ioctl_get_name": 20000, "ioctl_finish_empty": 20000}
print("# %-24s %12s %12s %8s %s" % ("operation (median ms)", "C core", "Rust core", "Rust/C", "samples C/Rust"))
for op in ops:
    c, r = rows.get(("c", op), []), rows.get(("rust", op), [])
    if not c and not r:
        continue
    mc = st.median(c) / 1e3 if c else float("nan")
    mr = st.median(r) / 1e3 if r else float("nan")
    print("# %-24s %12.3f %12.3f %8.2f %d/%d" % (f"{op} x{n[op]}", mc, mr, mr / mc if c and r else float("nan"), len(c), len(r)))
EOF
}

for t in "${tests[@]}"; do
    case $t in
        chain:*)
            plan=${t#chain:}
            log=$(run_vm "chain_${plan//,/-}" "$plan" "")
            judge_pass "chain $plan: memfds verified after every kexec" "$log"
            ;;
        corrupt:*)
            what=${t#corrupt:}
            log=$(run_vm "corrupt_$what" rust,rust "luo_test_corrupt=$what")
            refused=$(grep -c "luo: refusing incoming live update state" "$log" || true)
            if ! grep -q "luo: test: corrupted the outgoing state" "$log"; then
                report fail "corrupt $what: Rust -> Rust" "the test hook did not run" "$log"
            elif [ "$refused" != 1 ]; then
                report fail "corrupt $what: Rust -> Rust" "$refused refusal lines, expected 1" "$log"
            else
                judge_pass "corrupt $what: Rust -> Rust, refused at boot, open EIO, no panic ($(grep -o 'refusing incoming live update state: .*' "$log" | head -1 | tr -d '\r'))" "$log"
            fi
            ;;
        b1:c,c)
            log=$(run_vm "b1_c-c" c,c "")
            if grep -q "Kernel panic" "$log" && grep -q "The incoming tree failed to initialize properly" "$log"; then
                report ok "b1 c,c: the C core panics the next kernel (upstream B1 reproduced)" "" "$log"
            else
                report fail "b1 c,c: expected the upstream panic" "" "$log"
            fi
            ;;
        b1:*)
            plan=${t#b1:}
            log=$(run_vm "b1_${plan//,/-}" "$plan" "")
            judge_pass "b1 $plan: 51 sessions + duplicate create, then kexec: no panic" "$log"
            ;;
        bench)
            logs=()
            # LUOX_BENCH_RUNS runs, the cores interleaved so that host load hits both alike.
            for r in $(seq "${LUOX_BENCH_RUNS:-1}"); do
                for core in ${LUOX_BENCH_CORES:-c rust}; do
                    logs+=("$(run_vm "bench_${core}_$r" "$core,$core,$core,$core" "$clock")")
                    judge_pass "bench $core core, run $r (4 boots, 3 handovers)" "${logs[-1]}"
                done
            done
            bench_summary "${logs[@]}" | tee "$out/bench.txt"
            ;;
        prof:*:*|loop:*:*)
            IFS=: read -r mode core op <<<"$t"
            plan=$core
            case $op in finish|retrieve_memfds|finish_memfds|reboot|close_incoming) plan=$core,$core ;; esac
            end_marker="LUOX LOOP END"
            [ "$op" = reboot ] && end_marker="kexec_core: Starting new kernel"
            sock=
            [ "$mode" = prof ] && sock=$out/gdb.sock
            log=$(gdb_sock=$sock run_vm "loop_${core}_$op" "$plan" "luox_op=$op luox_n=${LUOX_N:-200000} nokaslr $clock")
            judge_pass "$mode $core $op: $(grep -ao 'per_op_us=[0-9.]*' "$log" | tail -1)" "$log"
            [ "$mode" = loop ] || sed "s/^/# /" "$out/loop_${core}_$op.prof"
            ;;
        *) echo "Bail out! unknown test $t"; exit 2 ;;
    esac
done
echo "1..$n"
echo "# logs: $out"
[ $failed = 0 ]
