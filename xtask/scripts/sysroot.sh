#!/usr/bin/env bash
# Build the Debian sid root filesystem of the `systemd_luo` VM test (docs/systemd.md):
# systemd 262 with its own integration tests, as an ext4 image that the VM boots from
# /dev/vda. xtask calls this only when the cache key (this script + the package lists it
# passes) changed; the result is cached under $LUO_CACHE/sysroot/<key>/.
#
# usage: sysroot.sh OUT_DIR "ROOT PACKAGES" "TEMPLATE PACKAGES"
#   OUT_DIR/root.ext4   the root filesystem (sparse, 2 GiB)
#   OUT_DIR/packages    dpkg -l of the root, for the record
#
# What systemd's mkosi harness builds and this reproduces (differences in docs/systemd.md):
# - the root: systemd, systemd-tests, systemd-container, ... (ROOT PACKAGES), the
#   `testuser` account (uid 4711) TEST-91's unit expects;
# - /usr/share/TEST-13-NSPAWN-container-template: the "minimal-base" image of systemd's
#   mkosi configuration (bash, coreutils, socat, ... ; a dummy /sbin/init; test-fdstore in
#   /usr/bin), which create_dummy_container (util.sh) copies for the nspawn case;
# - /efi: the EFI system partition of the second disk (/dev/vdb1), where the boot loader
#   entry that `systemctl kexec` loads lives. xtask writes that disk per run, with the
#   kernel under test.
set -euo pipefail

if (($# != 3)); then
	echo "usage: $0 OUT_DIR ROOT_PACKAGES TEMPLATE_PACKAGES" >&2
	exit 2
fi
OUT=$1 ROOT_PKGS=$2 TEMPLATE_PKGS=$3
# shellcheck source=mirror.sh
. "$(dirname "$0")/mirror.sh"
MIRROR=$(mirror_uri)
if [[ -z $MIRROR ]]; then
	echo "sysroot: cannot find a Debian mirror URI in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list" >&2
	exit 1
fi

# sid's Release file on the mirror may be past its Valid-Until date.
APTOPT=(--aptopt='Acquire::Check-Valid-Until "false"')
# Documentation and locales are not needed in a test VM; leaving them out halves the image.
DPKGOPT=(
	--dpkgopt='path-exclude=/usr/share/man/*'
	--dpkgopt='path-exclude=/usr/share/doc/*'
	--dpkgopt='path-include=/usr/share/doc/*/copyright'
	--dpkgopt='path-exclude=/usr/share/locale/*'
	--dpkgopt='path-exclude=/usr/share/info/*'
)
WORK=$(mktemp -d "${OUT%/}.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

comma() { tr -s ' \n' ',' <<<"$1" | sed 's/^,//; s/,$//'; }

echo "sysroot: container template (minbase + ${TEMPLATE_PKGS})" >&2
mmdebstrap --quiet --variant=minbase "${APTOPT[@]}" "${DPKGOPT[@]}" \
	--include="$(comma "$TEMPLATE_PKGS")" sid "$WORK/template" "$MIRROR" >&2

echo "sysroot: root (minbase + ${ROOT_PKGS})" >&2
mmdebstrap --quiet --variant=minbase "${APTOPT[@]}" "${DPKGOPT[@]}" \
	--include="$(comma "$ROOT_PKGS")" \
	--customize-hook='chroot "$1" useradd --create-home --uid 4711 --user-group testuser' \
	--customize-hook='dpkg-query --root="$1" -W -f="\${Package} \${Version}\n" > "$1/.packages"' \
	sid "$WORK/root" "$MIRROR" >&2
R=$WORK/root
T=$WORK/template
mv "$R/.packages" "$OUT/packages"

# The template as systemd's mkosi.images/minimal-base/mkosi.postinst finishes it.
rm -f "$T/sbin/init"
cat >"$T/sbin/init" <<'EOF'
#!/usr/bin/env bash
echo "Hello from dummy init, beautiful day, innit?"
ip link
EOF
chmod +x "$T/sbin/init"
[[ -e $T/etc/os-release ]] || ln -s ../usr/lib/os-release "$T/etc/os-release"
cp "$R/usr/lib/systemd/tests/unit-tests/manual/test-fdstore" "$T/usr/bin/test-fdstore"
mkdir -p "$R/usr/share"
cp -a "$T" "$R/usr/share/TEST-13-NSPAWN-container-template"

# systemd's test image carries mkosi.extra and mkosi.extra.common (drop-ins such as
# user@.service's and systemd-nspawn@.service's FileDescriptorStoreMax=, which TEST-91's
# user-manager and nspawn cases rely on); systemd-tests ships both trees.
for extra in mkosi.extra mkosi.extra.common; do
	cp -a "$R/usr/lib/systemd/tests/mkosi/$extra/." "$R/"
done

# The end-of-boot kmemleak scan of `--sanitize` runs (a no-op on other kernels), as a
# systemd-shutdown hook: it runs in both boots, right before the kexec and the poweroff.
install -D -m 0755 "$(dirname "$0")/kmemleak-scan.sh" "$R/usr/lib/systemd/system-shutdown/luo-kmemleak"

# The EFI system partition, mounted where systemd looks for it first.
mkdir -p "$R/efi"
cat >"$R/etc/fstab" <<'EOF'
# root: /dev/vda (kernel command line root=/dev/vda rw)
/dev/vdb1 /efi vfat umask=0077,nofail 0 0
EOF
# No first-boot questions, no virtual consoles (the VM has only a serial port).
echo H >"$R/etc/hostname"
: >"$R/etc/machine-id"

rm -f "$OUT/root.ext4"
mke2fs -q -t ext4 -L luo-root -d "$R" "$OUT/root.ext4.tmp" 2G
mv "$OUT/root.ext4.tmp" "$OUT/root.ext4"
echo "sysroot: $(du -h --apparent-size "$OUT/root.ext4" | cut -f1) image, $(du -sh "$OUT/root.ext4" | cut -f1) used" >&2
