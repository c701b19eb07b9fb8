#!/bin/sh
# PID 1 of the busybox VM (packed as /init): mount the usual filesystems, run one program
# and power off. The program and its arguments come from the kernel command line
# (everything after `--` is handed to init as arguments), so one image serves any
# program in it. The LUO-VM: lines are parsed by `cargo xtask vm test`.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t debugfs debugfs /sys/kernel/debug
mount -t tmpfs tmpfs /tmp
echo "LUO-VM: kernel $(uname -r), $(ls -l /dev/liveupdate 2>&1)"
# The serial port carries both the kernel console and the program's output, and a
# printk can land in the middle of a half-written TAP line. Keep info-level messages
# (the FLB preserve/unpreserve chatter) off the console while the program runs;
# warnings, errors and splats (level <= 4) still show up live.
dmesg -n 5
prog=$1
shift
echo "LUO-VM: run $prog $*"
cd /
"/bin/$prog" "$@"
echo "LUO-VM: exit=$?"
kmemleak-scan
# `poweroff -f` only halts without ACPI (tinyconfig); a reboot makes QEMU exit because
# it runs with -no-reboot.
reboot -f
