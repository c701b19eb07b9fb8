#!/bin/bash
# The luod_systemd VM (docs/luod.md, "luod under systemd"): systemd 262 runs luod from the
# shipped luod.service and luod.socket (installed unchanged), and this script, run by
# luod-systemd-test.service in both boots, checks that luod survives its own death without
# losing a session. It holds no session fd itself: each `luoctl preserve` exits, so only
# luod (and systemd's fd store) keep the session.
#
# Boot 1:
#  1. `systemctl start luod.service` (socket activation through luod.socket); `luoctl
#     preserve vm0 1` (1 MiB from /dev/urandom); luod must have stored the session fd and its
#     generation in the fd store.
#  2. crash: `systemctl kill -s KILL luod.service`; systemd restarts luod (Restart=always),
#     which takes the session back from the fd store: listed, and `luoctl preserve --open vm0
#     2` adds a file to it (so it is the kernel session, handed out again).
#  3. clean stop: `systemctl stop luod.service` (SIGTERM), the store kept
#     (FileDescriptorStorePreserve=yes) while the unit is down, `systemctl start`: the same
#     checks, token 3.
#  4. adopt: `luoctl preserve --open --hold --adopt vm0 4` holds a dup of the session fd; a
#     SIGKILL brings luod back from the store (the holder's ADOPT gets EEXIST); then the
#     socket and the service are stopped, the fd store is emptied (`systemctl clean
#     --what=fdstore`) and luod started: it has nothing until the holder ADOPTs vm0.
#  5. `luoctl update` kexecs into /usr/lib/luo/vmlinuz (luod's own kexec) with the md5s.
# Boot 2 (luo_nboot=1):
#  6. luod restores vm0 from its manifest; crash again before any client retrieved it (the
#     incoming session comes back from the fd store); retrieve token 1 and check its md5;
#     stop and start, retrieve tokens 2 to 4 and check theirs, FINISH.
#
# The markers are the upstream init.c's, so xtask judges the stages like the kexec tests;
# every step prints "LUOD-SYSTEMD: ..." and a failed check "LUOD-SYSTEMD: FAIL: ...".
set -u
export PATH=/usr/bin:/usr/sbin:/bin:/sbin

say() { echo "LUOD-SYSTEMD: $*"; }

fail() {
	say "FAIL: $*"
	systemctl status --no-pager luod.service luod.socket 2>&1 | sed 's/^/LUOD-SYSTEMD: | /'
	journalctl -b --no-pager -o cat -u luod.service 2>&1 | tail -40 | sed 's/^/LUOD-SYSTEMD: | /'
	exit 1
}

prop() { systemctl show -P "$1" luod.service; }

# Wait until luod.service is active with a main pid other than $1 and answers.
wait_up() {
	local i=0 pid
	while :; do
		pid=$(prop MainPID)
		if [[ $(prop ActiveState) == active && $pid != 0 && $pid != "$1" ]] &&
			luoctl status >/dev/null 2>&1; then
			echo "$pid"
			return 0
		fi
		i=$((i + 1))
		((i <= 300)) || return 1
		sleep 0.1
	done
}

# The session vm0 is listed by luod as $1 (outgoing / incoming), luod (pid $2) holds a LUO
# session fd named "0/vm0", and the fd store holds $3 fds.
check_session() {
	local dir=$1 pid=$2 want=$3 st n
	st=$(luoctl status --json) || fail "luoctl status --json"
	say "status: $st"
	grep -q "\"direction\":\"$dir\",\"uid\":0,\"name\":\"vm0\"" <<<"$st" ||
		fail "luod does not list the $dir session vm0"
	ls -l "/proc/$pid/fd" 2>/dev/null | grep -q 'luo_session.*0/vm0' ||
		fail "luod (pid $pid) holds no LUO session fd 0/vm0: $(ls -l /proc/"$pid"/fd | grep luo)"
	n=$(prop NFileDescriptorStore)
	[[ $n == "$want" ]] || fail "the fd store holds $n fd(s), not $want"
	say "$dir session vm0 held by luod pid $pid, fd store $n fd(s)"
}

md5() { md5sum <"$1" | cut -d' ' -f1; }

# Wait until file $1 contains the fixed string $2 (at most 30 s).
wait_log() {
	local i=0
	while ! grep -qF -- "$2" "$1" 2>/dev/null; do
		i=$((i + 1))
		((i <= 300)) || fail "timed out waiting for \"$2\" in $1: $(cat "$1")"
		sleep 0.1
	done
}

nboot=0
sums=
for a in $(</proc/cmdline); do
	case $a in
	luo_nboot=*) nboot=${a#luo_nboot=} ;;
	luod_sums=*) sums=${a#luod_sums=} ;;
	esac
done
[[ -e /dev/liveupdate ]] || fail "no /dev/liveupdate"

if [[ $nboot == 0 ]]; then
	echo "INIT: Starting Stage 1"
	systemctl start luod.service || fail "systemctl start luod.service"
	pid=$(wait_up 0) || fail "luod.service did not come up"
	say "luod up (pid $pid): $(luoctl status | head -1)"
	say "activated by $(prop TriggeredBy)"
	for t in 1 2 3; do head -c 1048576 /dev/urandom >"/tmp/p$t"; done
	luoctl preserve vm0 1 --file /tmp/p1 || fail "luoctl preserve vm0 1"
	# The session fd and luod's generation memfd.
	check_session outgoing "$pid" 2

	say "step: crash (systemctl kill -s KILL luod.service)"
	systemctl kill -s KILL luod.service || fail "systemctl kill"
	new=$(wait_up "$pid") || fail "luod was not restarted after SIGKILL"
	say "luod restarted after SIGKILL: pid $pid -> $new, NRestarts $(prop NRestarts)"
	check_session outgoing "$new" 2
	luoctl preserve vm0 2 --open --file /tmp/p2 || fail "luoctl preserve --open vm0 2 after the crash"
	say "crash: PASS"
	pid=$new

	say "step: stop and start (systemctl stop luod.service; systemctl start luod.service)"
	systemctl stop luod.service || fail "systemctl stop"
	state=$(prop ActiveState)
	[[ $state == inactive ]] || fail "luod.service is $state after stop"
	n=$(prop NFileDescriptorStore)
	say "stopped: $state, fd store $n fd(s), result $(prop Result)"
	[[ $n == 2 ]] || fail "the stopped unit's fd store holds $n fd(s), not 2"
	journalctl -b --no-pager -o cat -u luod.service | grep 'stopping on SIGTERM' | sed 's/^/LUOD-SYSTEMD: luod: /'
	systemctl start luod.service || fail "systemctl start after stop"
	new=$(wait_up "$pid") || fail "luod.service did not come up after stop and start"
	check_session outgoing "$new" 2
	luoctl preserve vm0 3 --open --file /tmp/p3 || fail "luoctl preserve --open vm0 3 after stop and start"
	say "stop and start: PASS"
	journalctl -b --no-pager -o cat -u luod.service | grep 'restored' | sed 's/^/LUOD-SYSTEMD: luod: /'

	say "step: adopt (a client holds vm0; luod restarted without the fd store)"
	head -c 1048576 /dev/urandom >/tmp/p4
	luoctl preserve vm0 4 --open --hold --adopt --file /tmp/p4 >/tmp/holder.log 2>&1 &
	wait_log /tmp/holder.log 'under token 4'
	systemctl kill -s KILL luod.service || fail "systemctl kill"
	new=$(wait_up "$pid") || fail "luod was not restarted after SIGKILL"
	pid=$new
	wait_log /tmp/holder.log "luod pid $pid has \"vm0\" already"
	say "holder: $(tail -1 /tmp/holder.log)"
	# Without the store (and with the socket closed, so that nothing activates luod
	# meanwhile), only the holder keeps the session alive in the kernel.
	systemctl stop luod.socket luod.service || fail "systemctl stop luod.socket luod.service"
	# `systemctl clean` goes through the system bus (other verbs use PID 1's private socket),
	# which nothing else in this boot needs.
	systemctl start dbus.service || fail "systemctl start dbus.service"
	systemctl clean --what=fdstore luod.service || fail "systemctl clean --what=fdstore"
	n=$(prop NFileDescriptorStore)
	[[ $n == 0 ]] || fail "the fd store holds $n fd(s) after systemctl clean"
	systemctl start luod.service || fail "systemctl start after clean"
	new=$(wait_up "$pid") || fail "luod.service did not come up after clean"
	wait_log /tmp/holder.log "adopted: luod pid $new holds \"vm0\" again"
	say "holder: $(tail -1 /tmp/holder.log)"
	journalctl -b --no-pager -o cat -u luod.service | grep "luod\[$new\]" | sed 's/^/LUOD-SYSTEMD: luod: /'
	check_session outgoing "$new" 2
	say "adopt: PASS"

	sums="$(md5 /tmp/p1),$(md5 /tmp/p2),$(md5 /tmp/p3),$(md5 /tmp/p4)"
	say "step: update (luoctl update kexecs into /usr/lib/luo/vmlinuz), md5s $sums"
	# --sanitize kernels: the end-of-boot leak scan (luod's kexec skips systemd-shutdown,
	# whose hook runs it at the poweroff of boot 2).
	/usr/lib/systemd/system-shutdown/luo-kmemleak
	echo "INIT: Stage 1 completed successfully."
	luoctl update --kernel /usr/lib/luo/vmlinuz --reuse-cmdline \
		--append "luo_nboot=1 luod_sums=$sums" ||
		fail "luoctl update"
	sleep 60
	fail "luoctl update did not kexec"
fi

echo "INIT: Starting Stage 2"
[[ -n $sums ]] || fail "no luod_sums= on the command line"
IFS=, read -r s1 s2 s3 s4 <<<"$sums"
systemctl start luod.service || fail "systemctl start luod.service"
pid=$(wait_up 0) || fail "luod.service did not come up"
say "luod up (pid $pid): $(luoctl status | head -1)"
luoctl status --json | grep -q '"generation":1,' || fail "luod is not at generation 1"
# The incoming session fd and the generation memfd.
check_session incoming "$pid" 2

say "step: crash before retrieve (systemctl kill -s KILL luod.service)"
systemctl kill -s KILL luod.service || fail "systemctl kill"
new=$(wait_up "$pid") || fail "luod was not restarted after SIGKILL"
say "luod restarted after SIGKILL: pid $pid -> $new"
check_session incoming "$new" 2
luoctl status --json | grep -q '"generation":1,' || fail "the restarted luod is not at generation 1"
luoctl retrieve vm0 1 --out /tmp/g1 || fail "luoctl retrieve vm0 1 after the crash"
got=$(md5 /tmp/g1)
say "retrieved token 1: $(wc -c </tmp/g1) bytes, md5 $got (preserved: $s1)"
[[ $got == "$s1" ]] || fail "token 1: retrieved bytes differ"
say "crash: PASS"
pid=$new

say "step: stop and start"
systemctl stop luod.service || fail "systemctl stop"
systemctl start luod.service || fail "systemctl start after stop"
new=$(wait_up "$pid") || fail "luod.service did not come up after stop and start"
check_session incoming "$new" 2
luoctl retrieve vm0 2 --out /tmp/g2 || fail "luoctl retrieve vm0 2 after stop and start"
luoctl retrieve vm0 3 --out /tmp/g3 || fail "luoctl retrieve vm0 3"
luoctl retrieve vm0 4 --out /tmp/g4 --finish || fail "luoctl retrieve vm0 4 --finish"
for t in 2 3 4; do
	want=s$t
	got=$(md5 "/tmp/g$t")
	say "retrieved token $t: $(wc -c <"/tmp/g$t") bytes, md5 $got (preserved: ${!want})"
	[[ $got == "${!want}" ]] || fail "token $t: retrieved bytes differ"
done
say "stop and start: PASS"
journalctl -b --no-pager -o cat -u luod.service | grep -E 'restored|stopping' | sed 's/^/LUOD-SYSTEMD: luod: /'
echo "--- LUOD SYSTEMD TEST PASSED ---"
echo "INIT: Stage 2 completed successfully."
exit 0
