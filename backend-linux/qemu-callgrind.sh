#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0
# Counts what QEMU itself executes (host instructions, per QEMU function) while the guest runs
# one operation in a loop: vm-extra.sh loop:<core>:<op> with QEMU under callgrind, its
# instrumentation switched on and off exactly around the guest's loop (luox_gate: the guest
# waits for a console line before and after it). The wall clock under TCG can disagree with
# the guest's instruction count; this says where QEMU's time went (e.g. jump-cache misses:
# qht_lookup_custom, get_page_addr_code_hostp).
#
# usage: backend-linux/qemu-callgrind.sh [--no-debug] <c|rust> <op> [n]
#   n defaults to 20000; kernels as for vm-extra.sh (LUOX_BZIMAGE_C / LUOX_BZIMAGE_RUST).
#   Needs valgrind. Prints the total and the top of callgrind_annotate; the profile stays in
#   $LUO_CACHE/callgrind/<core>-<op>-<n>/cg.out. Boots are slow under valgrind (minutes).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
debug=()
if [ "${1:-}" = --no-debug ]; then debug=(--no-debug); shift; fi
[ $# -ge 2 ] || { sed -n '3,14p' "$0"; exit 2; }
core=$1 op=$2 n=${3:-20000}
command -v valgrind >/dev/null || { echo "qemu-callgrind: needs valgrind" >&2; exit 2; }
out=${LUO_CACHE:-/var/cache/luo}/callgrind/$core-$op-$n
rm -rf "$out"
mkdir -p "$out"
mkfifo "$out/console"
exec 3<>"$out/console" # held open read-write: QEMU's stdin never sees EOF
start=$(date +%s)
LUOX_STDIN=$out/console LUOX_APPEND="no_timer_check luox_gate=1" LUO_CACHE=$out/cache LUOX_N=$n \
    LUOX_QEMU_PREFIX="valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$out/cg.out" \
    "$here/vm-extra.sh" "${debug[@]}" --timeout 3600 "loop:$core:$op" >"$out/tap.txt" 2>&1 &
vm=$!
log=
while [ -z "$log" ]; do
    kill -0 $vm 2>/dev/null || { cat "$out/tap.txt"; exit 1; }
    log=$(ls -t "$out"/cache/logs/*/"loop_${core}_$op.log" 2>/dev/null | head -1 || true)
    sleep 0.2
done
wait_for() { # line
    while ! grep -aq "$1" "$log"; do
        kill -0 $vm 2>/dev/null || { cat "$out/tap.txt"; exit 1; }
        sleep 0.1
    done
}
wait_for "LOOP GATE BEGIN"
callgrind_control -i on >/dev/null
callgrind_control -z >/dev/null
echo >&3
wait_for "LOOP GATE END"
callgrind_control -i off >/dev/null
echo >&3
wait $vm || true
grep -a "Collected" "$log" | sed "s/^==[0-9]*== /# $core $op x$n: host instructions /"
callgrind_annotate "$out/cg.out" 2>/dev/null | sed -n '/file:function/,$p' | sed -n '2,25p'
echo "# profile: $out/cg.out ($(( $(date +%s) - start )) s)"
