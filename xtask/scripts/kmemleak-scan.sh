#!/bin/sh
# Report the kernel objects kmemleak finds unreferenced, now. Every VM test whose init we
# write runs this at the end of each boot (vm-init.sh, luod-init.sh, and in the systemd VM
# as a systemd-shutdown hook: /usr/lib/systemd/system-shutdown/luo-kmemleak); the report
# goes to the console, where `cargo xtask vm test --sanitize` fails the run on any
# "unreferenced object" (docs/verification.md). A no-op on kernels without
# CONFIG_DEBUG_KMEMLEAK.
f=/sys/kernel/debug/kmemleak
# A systemd-shutdown hook inherits systemd-shutdown's stdout, which is not the console (PID 1
# keeps its stdio on /dev/null); the report must reach the serial console, where xtask reads
# it.
[ -c /dev/console ] && exec >/dev/console 2>&1
[ -e $f ] || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
[ -e $f ] || exit 0
# kmemleak reports an object only once it is older than its minimum age (5 s), so that
# allocations still on their way into a data structure are not mistaken for leaks.
sleep 6
echo scan >$f
n=$(grep -c 'unreferenced object' $f)
echo "LUO-VM: kmemleak scan: $n unreferenced object(s)"
cat $f
exit 0
