#!/usr/bin/env bash
# Install the Debian (host suite) packages the kernel pipeline needs, idempotently.
# Only packages from the system's own suites are installed; foreign-suite packages
# (rust-src, linux-source) are only downloaded and unpacked by fetch-deb.sh.
set -euo pipefail

PKGS=(
	# kernel build (GCC build; LLVM=1 is not used, bookworm clang is too old)
	make gcc libc6-dev bc flex bison libelf-dev libssl-dev xz-utils perl
	# `make headers_install` needs rsync; initramfs packing needs cpio
	rsync cpio
	# bindgen loads libclang at run time; the kernel needs >= 17.0.1, bookworm's default 14 is too old
	libclang1-19 libclang-common-19-dev
	# VM side
	qemu-system-x86 busybox-static
	# systemd_luo: the sid root (mmdebstrap), its ext4 image and the reading of /testok
	# (e2fsprogs: mke2fs -d, debugfs), the ESP disk (fdisk: sfdisk; dosfstools; mtools),
	# the guest's journal read after the run (systemd: journalctl)
	mmdebstrap e2fsprogs fdisk dosfstools mtools systemd
)
# A clang-built kernel (LUO_LLVM=-19, set by `cargo xtask vm test --sanitize`: KASAN with
# Rust needs clang): the compiler, linker and binutils of that LLVM version.
if [[ -n ${LUO_LLVM:-} ]]; then
	PKGS+=("clang${LUO_LLVM}" "lld${LUO_LLVM}" "llvm${LUO_LLVM}")
fi

missing=()
for p in "${PKGS[@]}"; do
	# dpkg-query prints "install ok installed" only for fully configured packages.
	if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]]; then
		missing+=("$p")
	fi
done

if ((${#missing[@]} == 0)); then
	exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
	echo "host-deps: missing packages: ${missing[*]}; run as root or install them" >&2
	exit 1
fi

echo "host-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# A fresh machine may have empty package lists; refresh them first so the install
# cannot fail on stale or absent indexes.
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "host-deps: done" >&2
