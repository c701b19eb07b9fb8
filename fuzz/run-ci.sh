#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a bounded time; exits non-zero on any finding
# (a crash, a panic, a timeout or an out-of-memory). The checked-in seeds (fuzz/corpus/<target>)
# are read but never written: new corpus entries go to a temporary directory.
#
#   fuzz/run-ci.sh                       # every target, 60 s each
#   FUZZ_SECONDS=600 fuzz/run-ci.sh lifecycle
#   FUZZ_SANITIZER=address fuzz/run-ci.sh   # with AddressSanitizer (about 4x slower)
#
# The default build has no sanitizer: the code under test is safe Rust (luo-core forbids
# `unsafe`; backend-user's is confined to its syscall wrappers), and the fuzz binaries' own
# allocator keeps the two checks the sanitizer's malloc hooks gave libFuzzer (the malloc limit
# and leaks; fuzz/src/lib.rs). Debug assertions and overflow checks are on (-a).
#
# Needs a nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz (installed
# here if missing). Findings are saved by libFuzzer under fuzz/artifacts/<target>/; turn each
# into a file under tests/fuzz-regressions/<target>/ once fixed (docs/verification.md).
set -euo pipefail

cd "$(dirname "$0")"
SECONDS_EACH=${FUZZ_SECONDS:-60}
TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}
SANITIZER=${FUZZ_SANITIZER:-none}
if [ "$#" -gt 0 ]; then
    TARGETS=("$@")
else
    TARGETS=(handover_blob handover_blob_valid_root lifecycle ioctl_args)
fi

if ! cargo "+$TOOLCHAIN" fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

max_len() {
    case "$1" in
        handover_blob | handover_blob_valid_root) echo 65536 ;;
        lifecycle) echo 512 ;;
        *) echo 4096 ;;
    esac
}

cargo "+$TOOLCHAIN" fuzz build -O -a -s "$SANITIZER"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
summary=()
for t in "${TARGETS[@]}"; do
    mkdir -p "$work/$t"
    echo "=== $t: ${SECONDS_EACH}s"
    if ! cargo "+$TOOLCHAIN" fuzz run -O -a -s "$SANITIZER" "$t" "$work/$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -max_len="$(max_len "$t")" -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 >"$work/$t.log" 2>&1; then
        tail -n 60 "$work/$t.log"
        echo "FAIL: $t found an input that fails (see fuzz/artifacts/$t/)" >&2
        exit 1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$' || echo '?')
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$' || echo '?')
    cov=$(grep -o 'cov: [0-9]*' "$work/$t.log" | tail -n 1 || true)
    summary+=("$t: $runs executions, $rate exec/s, $cov, no finding")
done
printf '%s\n' "${summary[@]}"
