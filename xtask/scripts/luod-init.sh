#!/bin/sh
# PID 1 of the luod_update VM (packed as /init, busybox + static luod and luoctl): luod on
# the real kernel backend across a real kexec. docs/luod.md, "The kernel VM test".
#
# Boot 1: luod starts; `luoctl preserve` (the VMM) preserves 1 MiB of random bytes as token 1
# of "vm0"; a listener refuses the barrier with EBUSY, so the first `luoctl update` must fail
# with EBUSY, leave no kernel loaded and keep the session; then a ready listener, and
# `luoctl update` kexecs (kexec_file_load of /kernel + /initrd.img with this command line
# plus `luo_nboot=1 luod_sum=<md5 of the bytes>`, the barrier, reboot(LINUX_REBOOT_CMD_KEXEC)).
# Boot 2 (luo_nboot=1): luod restores from its manifest; `luoctl retrieve vm0 1 --finish`
# must give back the same bytes, and luod must report generation 1.
#
# The markers are the upstream init.c's, so `cargo xtask vm test` judges this VM like the
# kexec selftests (stage order, blackout, FLB lines per boot, no splat).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp

fail() {
    echo "LUOD-VM: FAIL: $*"
    for f in /tmp/*.log; do
        [ -f "$f" ] && sed "s|^|LUOD-VM: $f: |" "$f"
    done
    reboot -f
    sleep 10
}

# Wait until file $1 contains $2 (at most 10 s).
wait_for() {
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        [ $i -le 200 ] || fail "timed out waiting for \"$2\" in $1"
        sleep 0.05
    done
}

start_luod() {
    luod --backend kernel >/tmp/luod.log 2>&1 &
    i=0
    while [ ! -S /run/luod.sock ]; do
        i=$((i + 1))
        [ $i -le 200 ] || fail "luod did not create /run/luod.sock"
        sleep 0.05
    done
    echo "LUOD-VM: luod up: $(luoctl status | head -1)"
}

nboot=0
sum=
for a in $(cat /proc/cmdline); do
    case $a in
        luo_nboot=*) nboot=${a#luo_nboot=} ;;
        luod_sum=*) sum=${a#luod_sum=} ;;
    esac
done

if [ "$nboot" = 0 ]; then
    echo "INIT: Starting Stage 1"
    # The planted session: before luod runs, another program (here a first luod on another
    # socket, with `luoctl --hold` keeping a dup of the session fd) creates "0/planted",
    # lets go of the device and stays alive holding the session, so that it crosses the
    # kexec. luod never listed it in a manifest, so after the reboot it must not hand it out.
    luod --backend kernel --socket /run/planter.sock >/tmp/planter.log 2>&1 &
    planter=$!
    i=0
    while [ ! -S /run/planter.sock ]; do
        i=$((i + 1))
        [ $i -le 200 ] || fail "the planter luod did not create /run/planter.sock"
        sleep 0.05
    done
    echo planted >/tmp/planted
    luoctl --socket /run/planter.sock preserve planted 1 --file /tmp/planted --hold \
        >/tmp/holder.log 2>&1 &
    wait_for /tmp/holder.log preserved
    kill $planter
    wait $planter
    echo "LUOD-VM: planted: $(cat /tmp/holder.log), held by pid $!"
    start_luod
    head -c 1048576 /dev/urandom >/tmp/pattern
    sum=$(md5sum </tmp/pattern | cut -d' ' -f1)
    luoctl preserve vm0 1 --file /tmp/pattern || fail "luoctl preserve"

    # An update the VMM refuses: EBUSY, nothing loaded, nothing lost.
    luoctl listen --label vmm --refuse EBUSY >/tmp/refuser.log 2>&1 &
    refuser=$!
    wait_for /tmp/refuser.log listening
    if luoctl update --kernel /kernel --initrd /initrd.img --reuse-cmdline \
        --append "luo_nboot=1 luod_sum=$sum" >/tmp/refused.log 2>&1; then
        fail "the refused update succeeded"
    fi
    cat /tmp/refused.log
    grep -q EBUSY /tmp/refused.log || fail "the refused update did not fail with EBUSY"
    loaded=$(cat /sys/kernel/kexec_loaded 2>/dev/null || echo "?")
    [ "$loaded" = 0 ] || fail "kexec_loaded is $loaded after the refused update"
    wait_for /tmp/refuser.log aborted
    kill $refuser
    echo "LUOD-VM: refused update: EBUSY, kexec_loaded 0"
    luoctl status

    # The real update, with a VMM that reaches the barrier. First the end-of-boot leak
    # scan (--sanitize kernels; before the blackout timing starts).
    kmemleak-scan
    luoctl listen --label vmm >/tmp/listener.log 2>&1 &
    wait_for /tmp/listener.log listening
    echo "INIT: Stage 1 completed successfully."
    luoctl update --kernel /kernel --initrd /initrd.img --reuse-cmdline \
        --append "luo_nboot=1 luod_sum=$sum"
    fail "luoctl update returned (status $?)"
fi

echo "INIT: Starting Stage 2"
[ -n "$sum" ] || fail "no luod_sum= on the command line"
start_luod
luoctl status
luoctl retrieve vm0 1 --finish --out /tmp/got || fail "luoctl retrieve vm0 1 --finish"
got=$(md5sum </tmp/got | cut -d' ' -f1)
echo "LUOD-VM: retrieved $(wc -c </tmp/got) bytes, md5 $got (preserved: $sum)"
[ "$got" = "$sum" ] || fail "retrieved bytes differ"
luoctl status --json >/tmp/status.json || fail "luoctl status --json"
cat /tmp/status.json
grep -q '"generation": *1[,}]' /tmp/status.json || fail "luod is not at generation 1"
grep -q planted /tmp/status.json && fail "luod lists the planted session"
if luoctl retrieve planted 1 >/tmp/planted.log 2>&1; then
    fail "luod handed out the planted session"
fi
cat /tmp/planted.log
grep -q ENOENT /tmp/planted.log || fail "retrieving the planted session did not fail with ENOENT"
echo "LUOD-VM: planted session not handed out (ENOENT)"
echo "--- LUOD UPDATE TEST PASSED ---"
echo "INIT: Stage 2 completed successfully."
kmemleak-scan
reboot -f
