#!/usr/bin/env bash
# Compiles luo-core exactly as Kbuild compiles an in-kernel Rust library crate (the kernel's own
# `core`, its vendored zerocopy 0.8.54 without the "derive" feature, target.json, the kernel's
# lint flags, --sysroot=/dev/null), against a configured and built kernel tree from the
# pipeline. Proves the no_std/no-alloc core builds inside the kernel unchanged.
#
# usage: backend-linux/check-core.sh [KERNEL_BUILD_DIR]   (default: newest under /var/cache/luo/build)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
kout=${1:-$(ls -dt "${LUO_CACHE:-/var/cache/luo}"/build/*/ 2>/dev/null | head -1)}
[ -n "$kout" ] && [ -f "$kout/rust/libzerocopy.rmeta" ] || {
    echo "check-core: no built kernel tree with Rust (run: cargo xtask vm test --core c)" >&2
    exit 2
}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cd "$kout"
RUSTC_BOOTSTRAP=1 "${RUSTC:-rustc}" --edition=2021 -Astable_features -Dnon_ascii_idents \
    -Dunsafe_op_in_unsafe_fn -Dmissing_docs -Drust_2018_idioms -Dunreachable_pub -Dwarnings \
    -Cpanic=abort -Cembed-bitcode=n -Clto=n -Cforce-unwind-tables=n -Ccodegen-units=1 \
    -Csymbol-mangling-version=v0 -Crelocation-model=static -Zfunction-sections=n \
    --target=./scripts/target.json -Ctarget-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2 \
    -Zcf-protection=branch -Cjump-tables=n -Ctarget-cpu=x86-64 -Ztune-cpu=generic -Cno-redzone=y \
    -Ccode-model=kernel -Copt-level=s -Cdebug-assertions=n -Coverflow-checks=y \
    @./include/generated/rustc_cfg \
    --emit=obj="$out/luo_core.o" --emit=metadata="$out/libluo_core.rmeta" --crate-type rlib \
    -L./rust --extern zerocopy --extern zerocopy_derive --crate-name luo_core \
    "$here/luo-core/src/lib.rs" --sysroot=/dev/null -Zunstable-options
echo "check-core: luo-core builds as a kernel crate against $kout ($(stat -c %s "$out/luo_core.o") bytes of object code)"
