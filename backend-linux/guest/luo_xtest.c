// SPDX-License-Identifier: GPL-2.0
/*
 * luo_xtest: PID 1 of the extra kernel tests of the Rust LUO core (backend-linux/vm-extra.sh).
 *
 * Every boot of a run is one "step". The kernel command line says what to do:
 *
 *   luox=<mode>          chain | corrupt | b1 | bench | loop
 *   luox_plan=<a,b,...>  the core of each step's kernel: c or rust
 *   luox_step=<n>        this step (0 on the first boot)
 *
 * Step n < last creates its sessions, keeps their fds open (this process never exits), loads
 * /next/kernel + /next/initrd.img with kexec_file_load (same command line, luox_step=n+1)
 * and reboot(RB_KEXEC)s. Step n > 0 first checks what step n-1 handed over. Each step checks
 * that the running kernel has the core the plan says (/proc/kallsyms: luo_rust_early_init).
 * Results are lines starting with "LUOX"; the last line of a run is "LUOX RESULT PASS" or
 * "LUOX RESULT FAIL <why>".
 *
 * chain:   sessions with memfds (text pages, a 4 MiB patterned memfd, an empty session) cross
 *          every kexec of the plan and are verified byte for byte after each one.
 * corrupt: step 0 creates sessions; the kernel's test hook (luo_test_corrupt=<what>, Rust
 *          core, CONFIG_LIVEUPDATE_TEST) damages the outgoing state after serialization.
 *          Step 1 expects: the first open of /dev/liveupdate fails with EIO, the next one
 *          works with no incoming session, new sessions can be created.
 * b1:      step 0 creates 51 sessions (one full block of 51) and a duplicate one (EEXIST):
 *          upstream bug B1. Step 1 expects the 51 sessions (Rust sender) or, for a C sender,
 *          a Rust receiver that refuses the state (EIO) instead of panicking.
 * bench:   step 0..n-1 time create x2000 sessions and preserve x500 memfds (several rounds),
 *          then keep 2000 sessions + 500 memfds and write "luox: reboot" to /dev/kmsg just
 *          before reboot(); steps 1..n time open, retrieve, verify and finish of all of it.
 * loop:    one operation (luox_op=, see run_loop) in a loop, for the host-side sampling
 *          profiler (vm-extra.sh prof:<core>:<op>).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/liveupdate.h>
#include <linux/reboot.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/klog.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "guest_cmdline.h"

#define MAX_PLAN 16
#define BIG_SIZE (4u << 20)
#define NSMALL 3
#define BENCH_SESSIONS 2000
#define BENCH_FILES 500
#define BENCH_ROUNDS 5

static const char *mode = "";
static char plan[MAX_PLAN][8];
static int nplan, step;
static int failed;

static void say(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	printf("LUOX ");
	vprintf(fmt, ap);
	printf("\n");
	fflush(stdout);
	va_end(ap);
}

static void fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	printf("LUOX FAIL step %d: ", step);
	vprintf(fmt, ap);
	printf(" (errno %d %s)\n", errno, strerror(errno));
	fflush(stdout);
	va_end(ap);
	failed = 1;
}

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static void kmsg(const char *msg)
{
	int fd = open("/dev/kmsg", O_WRONLY);

	if (fd >= 0) {
		if (write(fd, msg, strlen(msg)) < 0)
			perror("kmsg");
		close(fd);
	}
}

static void finish_run(void)
{
	if (failed)
		say("RESULT FAIL");
	else
		say("RESULT PASS");
	sync();
	syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
		LINUX_REBOOT_CMD_RESTART, NULL);
	for (;;)
		pause();
}

/* ------------------------------------------------------------------ */
/* LUO ioctls                                                          */
/* ------------------------------------------------------------------ */

static int luo_open(void)
{
	return open("/dev/liveupdate", O_RDWR);
}

static int create_session(int luo, const char *name)
{
	struct liveupdate_ioctl_create_session a = { .size = sizeof(a) };

	snprintf((char *)a.name, sizeof(a.name), "%s", name);
	if (ioctl(luo, LIVEUPDATE_IOCTL_CREATE_SESSION, &a) < 0)
		return -errno;
	return a.fd;
}

static int retrieve_session(int luo, const char *name)
{
	struct liveupdate_ioctl_retrieve_session a = { .size = sizeof(a) };

	snprintf((char *)a.name, sizeof(a.name), "%s", name);
	if (ioctl(luo, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &a) < 0)
		return -errno;
	return a.fd;
}

static int preserve_fd(int s, int fd, uint64_t token)
{
	struct liveupdate_session_preserve_fd a = {
		.size = sizeof(a), .fd = fd, .token = token };

	return ioctl(s, LIVEUPDATE_SESSION_PRESERVE_FD, &a) < 0 ? -errno : 0;
}

static int retrieve_fd(int s, uint64_t token)
{
	struct liveupdate_session_retrieve_fd a = {
		.size = sizeof(a), .token = token };

	if (ioctl(s, LIVEUPDATE_SESSION_RETRIEVE_FD, &a) < 0)
		return -errno;
	return a.fd;
}

static int finish_session(int s)
{
	struct liveupdate_session_finish a = { .size = sizeof(a) };

	return ioctl(s, LIVEUPDATE_SESSION_FINISH, &a) < 0 ? -errno : 0;
}

/* ------------------------------------------------------------------ */
/* memfds                                                              */
/* ------------------------------------------------------------------ */

static uint8_t pattern(uint64_t seed, size_t off)
{
	uint64_t x = seed * 0x9E3779B97F4A7C15ull + (off / 4096) * 0xBF58476D1CE4E5B9ull;

	return (uint8_t)(x >> 56) ^ (uint8_t)off;
}

/* A memfd of `size` bytes: `text` at offset 0 (if any), else the pattern of `seed`. */
static int make_memfd(size_t size, const char *text, uint64_t seed)
{
	int fd = memfd_create("luox", 0);
	uint8_t *p;

	if (fd < 0 || ftruncate(fd, size) < 0)
		return -1;
	if (!size)
		return fd;
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		return -1;
	if (text)
		snprintf((char *)p, size, "%s", text);
	else
		for (size_t i = 0; i < size; i++)
			p[i] = pattern(seed, i);
	munmap(p, size);
	return fd;
}

/* Checks a retrieved memfd: size, content, and that the file position is 0. */
static int check_memfd(int fd, size_t size, const char *text, uint64_t seed)
{
	struct stat st;
	uint8_t *p;
	int bad = 0;

	if (fstat(fd, &st) < 0 || (size_t)st.st_size != size) {
		fail("memfd size %lld, expected %zu", (long long)st.st_size, size);
		return -1;
	}
	if (lseek(fd, 0, SEEK_CUR) != 0) {
		fail("memfd position is not 0");
		return -1;
	}
	if (!size)
		return 0;
	p = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		fail("mmap retrieved memfd");
		return -1;
	}
	if (text) {
		bad = strncmp((char *)p, text, size) != 0;
	} else {
		for (size_t i = 0; i < size && !bad; i++)
			bad = p[i] != pattern(seed, i);
	}
	munmap(p, size);
	if (bad)
		fail("memfd content differs (%s)", text ? text : "pattern");
	return bad ? -1 : 0;
}

/* ------------------------------------------------------------------ */
/* Plan, kexec                                                         */
/* ------------------------------------------------------------------ */

/* "rust" if this kernel runs the Rust core: its symbol, or its boot line in the log. */
static const char *running_core(void)
{
	static char line[512], log[1 << 17];
	const char *core = "c";
	FILE *f = fopen("/proc/kallsyms", "r");
	int n;

	if (f) {
		while (fgets(line, sizeof(line), f)) {
			if (strstr(line, " luo_rust_early_init")) {
				core = "rust";
				break;
			}
		}
		fclose(f);
		return core;
	}
	n = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, log, sizeof(log) - 1);
	if (n < 0)
		return "?";
	log[n] = 0;
	return strstr(log, "luo: Rust core") ? "rust" : "c";
}

/* Loads /next/kernel for step+1 (dropping `drop` from the command line) and kexecs. */
static void kexec_next(const char *drop)
{
	char next[sizeof(cmdline)] = "";
	char *save, *tok, *copy = strdup(cmdline);
	int kfd, ifd;

	for (tok = strtok_r(copy, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save)) {
		if (!strncmp(tok, "luox_step=", 10))
			continue;
		if (drop && !strncmp(tok, drop, strlen(drop)))
			continue;
		strcat(next, tok);
		strcat(next, " ");
	}
	snprintf(next + strlen(next), sizeof(next) - strlen(next), "luox_step=%d", step + 1);
	kfd = open("/next/kernel", O_RDONLY);
	ifd = open("/next/initrd.img", O_RDONLY);
	if (kfd < 0 || ifd < 0) {
		fail("open /next/kernel or /next/initrd.img");
		finish_run();
	}
	if (syscall(SYS_kexec_file_load, kfd, ifd, strlen(next) + 1, next, 0) < 0) {
		fail("kexec_file_load");
		finish_run();
	}
	say("step %d: kexec into %s", step, plan[step + 1]);
	kmsg("luox: reboot\n");
	syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
		LINUX_REBOOT_CMD_KEXEC, NULL);
	fail("reboot(RB_KEXEC) returned");
	finish_run();
}

static void raise_nofile(void)
{
	struct rlimit rl = { 8192, 8192 };

	if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
		fail("setrlimit");
}

/* ------------------------------------------------------------------ */
/* chain                                                               */
/* ------------------------------------------------------------------ */

static void chain_text(char *buf, size_t len, int s, int i)
{
	snprintf(buf, len, "luox chain: step %d core %s file %d", s, plan[s], i);
}

static void chain_check(int luo, int prev)
{
	char name[64], text[128];
	int s, fd, i;

	snprintf(name, sizeof(name), "xchain-%d-small", prev);
	s = retrieve_session(luo, name);
	if (s < 0) {
		errno = -s;
		fail("retrieve %s", name);
		return;
	}
	for (i = 0; i < NSMALL; i++) {
		fd = retrieve_fd(s, 0x100 + i);
		if (fd < 0) {
			errno = -fd;
			fail("retrieve_fd %d", i);
			continue;
		}
		chain_text(text, sizeof(text), prev, i);
		check_memfd(fd, 4096, text, 0);
		close(fd);
	}
	if (finish_session(s))
		fail("finish %s", name);
	close(s);

	snprintf(name, sizeof(name), "xchain-%d-big", prev);
	s = retrieve_session(luo, name);
	if (s < 0) {
		errno = -s;
		fail("retrieve %s", name);
		return;
	}
	fd = retrieve_fd(s, ~0ull);
	if (fd < 0) {
		errno = -fd;
		fail("retrieve_fd big");
	} else {
		check_memfd(fd, BIG_SIZE, NULL, prev + 1);
		close(fd);
	}
	if (finish_session(s))
		fail("finish %s", name);
	close(s);

	snprintf(name, sizeof(name), "xchain-%d-empty", prev);
	s = retrieve_session(luo, name);
	if (s < 0) {
		errno = -s;
		fail("retrieve %s", name);
		return;
	}
	if (finish_session(s))
		fail("finish %s", name);
	close(s);

	/* Only the previous step's sessions are handed over. */
	snprintf(name, sizeof(name), "xchain-%d-small", prev - 1);
	if (retrieve_session(luo, name) != -ENOENT)
		fail("%s should not exist", name);
	if (!failed)
		say("step %d (%s): verified the sessions of step %d (%s): %d text memfds, a %u MiB memfd, an empty session",
		    step, plan[step], prev, plan[prev], NSMALL, BIG_SIZE >> 20);
}

static void chain_create(int luo)
{
	char name[64], text[128];
	int s, fd, i;

	snprintf(name, sizeof(name), "xchain-%d-small", step);
	s = create_session(luo, name);
	if (s < 0) {
		errno = -s;
		fail("create %s", name);
		return;
	}
	for (i = 0; i < NSMALL; i++) {
		chain_text(text, sizeof(text), step, i);
		fd = make_memfd(4096, text, 0);
		if (fd < 0 || preserve_fd(s, fd, 0x100 + i))
			fail("preserve text memfd %d", i);
		close(fd);
	}
	snprintf(name, sizeof(name), "xchain-%d-big", step);
	s = create_session(luo, name);
	fd = make_memfd(BIG_SIZE, NULL, step + 1);
	if (s < 0 || fd < 0 || preserve_fd(s, fd, ~0ull))
		fail("preserve big memfd");
	close(fd);
	snprintf(name, sizeof(name), "xchain-%d-empty", step);
	if (create_session(luo, name) < 0)
		fail("create %s", name);
}

static void run_chain(void)
{
	int luo = luo_open();

	if (luo < 0) {
		fail("open /dev/liveupdate");
		finish_run();
	}
	if (step > 0)
		chain_check(luo, step - 1);
	if (step + 1 < nplan) {
		chain_create(luo);
		close(luo);
		if (failed)
			finish_run();
		kexec_next(NULL);
	}
	finish_run();
}

/* ------------------------------------------------------------------ */
/* corrupt                                                             */
/* ------------------------------------------------------------------ */

static void run_corrupt(void)
{
	int luo, s, fd, i;
	char name[64];

	if (step == 0) {
		luo = luo_open();
		if (luo < 0) {
			fail("open /dev/liveupdate");
			finish_run();
		}
		/* Three sessions; the first holds 100 files (two file blocks). */
		for (i = 0; i < 3; i++) {
			snprintf(name, sizeof(name), "xcorrupt-%d", i);
			s = create_session(luo, name);
			if (s < 0) {
				fail("create %s", name);
				continue;
			}
			for (int f = 0; f < (i == 0 ? 100 : 1); f++) {
				fd = make_memfd(4096, "corrupt me", 0);
				if (fd < 0 || preserve_fd(s, fd, f))
					fail("preserve");
				close(fd);
			}
		}
		close(luo);
		kexec_next("luo_test_corrupt=");
	}
	luo = luo_open();
	if (luo >= 0 || errno != EIO)
		fail("first open after a corrupt handover: %d, expected EIO", luo);
	else
		say("step %d: first open of /dev/liveupdate: EIO (incoming state refused)", step);
	if (luo >= 0)
		close(luo);
	luo = luo_open();
	if (luo < 0) {
		fail("second open");
		finish_run();
	}
	if (retrieve_session(luo, "xcorrupt-0") != -ENOENT)
		fail("xcorrupt-0 should not be retrievable");
	s = create_session(luo, "xcorrupt-after");
	fd = make_memfd(4096, "after", 0);
	if (s < 0 || fd < 0 || preserve_fd(s, fd, 1))
		fail("create and preserve after a refused handover");
	if (!failed)
		say("step %d: second open works, no incoming sessions, new sessions and preserves work", step);
	finish_run();
}

/* ------------------------------------------------------------------ */
/* b1                                                                  */
/* ------------------------------------------------------------------ */

static void run_b1(void)
{
	char name[64];
	int luo, s, i, found = 0;

	if (step == 0) {
		raise_nofile();
		luo = luo_open();
		if (luo < 0) {
			fail("open /dev/liveupdate");
			finish_run();
		}
		for (i = 0; i < 51; i++) {
			snprintf(name, sizeof(name), "xb1-%d", i);
			if (create_session(luo, name) < 0)
				fail("create %s", name);
		}
		s = create_session(luo, "xb1-7");
		if (s != -EEXIST)
			fail("duplicate create gave %d, expected -EEXIST", s);
		else
			say("step 0 (%s): 51 sessions, duplicate create -> EEXIST", plan[0]);
		close(luo);
		kexec_next(NULL);
	}
	luo = luo_open();
	if (luo < 0) {
		if (errno == EIO && !strcmp(plan[0], "c") && !strcmp(plan[1], "rust")) {
			say("step 1 (rust): the C core's handover has an empty block (B1): refused, open gives EIO, no panic");
			luo = luo_open();
			if (luo < 0 || create_session(luo, "xb1-after") < 0)
				fail("open/create after refusal");
			finish_run();
		}
		fail("open /dev/liveupdate");
		finish_run();
	}
	for (i = 0; i < 51; i++) {
		snprintf(name, sizeof(name), "xb1-%d", i);
		s = retrieve_session(luo, name);
		if (s >= 0) {
			found++;
			close(s);
		}
	}
	if (found != 51)
		fail("retrieved %d of 51 sessions", found);
	else
		say("step 1 (%s): all 51 sessions of the %s core arrived", plan[1], plan[0]);
	finish_run();
}

/* ------------------------------------------------------------------ */
/* bench                                                               */
/* ------------------------------------------------------------------ */

static int bench_sessions[BENCH_SESSIONS];

static void report(const char *what, double us, int n)
{
	say("BENCH core=%s step=%d %s total_us=%.0f per_op_us=%.2f n=%d",
	    plan[step], step, what, us, us / n, n);
}

static void bench_create(int luo, int keep)
{
	char name[64];
	double t;
	int i;

	t = now_us();
	for (i = 0; i < BENCH_SESSIONS; i++) {
		snprintf(name, sizeof(name), "xbench-%d-%d", step, i);
		bench_sessions[i] = create_session(luo, name);
		if (bench_sessions[i] < 0) {
			errno = -bench_sessions[i];
			fail("create %s", name);
			return;
		}
	}
	report("create_sessions", now_us() - t, BENCH_SESSIONS);
	if (keep)
		return;
	t = now_us();
	for (i = 0; i < BENCH_SESSIONS; i++)
		close(bench_sessions[i]);
	report("close_sessions", now_us() - t, BENCH_SESSIONS);
}

static int bench_preserve(int luo, int keep)
{
	static int fds[BENCH_FILES];
	char name[64], text[64];
	double t;
	int s, i;

	for (i = 0; i < BENCH_FILES; i++) {
		snprintf(text, sizeof(text), "bench step %d file %d", step, i);
		fds[i] = make_memfd(4096, text, 0);
		if (fds[i] < 0) {
			fail("memfd");
			return -1;
		}
	}
	snprintf(name, sizeof(name), "xbench-files-%d", step);
	s = create_session(luo, name);
	if (s < 0) {
		fail("create %s", name);
		return -1;
	}
	t = now_us();
	for (i = 0; i < BENCH_FILES; i++) {
		if (preserve_fd(s, fds[i], i)) {
			fail("preserve %d", i);
			return -1;
		}
	}
	report("preserve_memfds", now_us() - t, BENCH_FILES);
	for (i = 0; i < BENCH_FILES; i++)
		close(fds[i]);
	if (keep)
		return s;
	t = now_us();
	close(s);
	report("unpreserve_memfds", now_us() - t, BENCH_FILES);
	return -1;
}

/* Per-ioctl cost without work: a rejected command, GET_NAME, and FINISH of an empty session. */
static void bench_ioctls(int luo, int s)
{
	struct liveupdate_session_get_name gn = { .size = sizeof(gn) };
	enum { N = 20000 };
	double t;
	int i;

	t = now_us();
	for (i = 0; i < N; i++)
		if (ioctl(luo, _IO(LIVEUPDATE_IOCTL_TYPE, 0x20), &gn) != -1 || errno != EINVAL)
			fail("bad command");
	report("ioctl_rejected", now_us() - t, N);
	t = now_us();
	for (i = 0; i < N; i++)
		if (ioctl(s, LIVEUPDATE_SESSION_GET_NAME, &gn) < 0)
			fail("get_name");
	report("ioctl_get_name", now_us() - t, N);
	t = now_us();
	for (i = 0; i < N; i++)
		if (finish_session(s))
			fail("finish");
	report("ioctl_finish_empty", now_us() - t, N);
}

static void bench_retrieve(void)
{
	char name[64], text[64];
	int prev = step - 1, luo, s, fd, i;
	double t;

	t = now_us();
	luo = luo_open();
	report("first_open", now_us() - t, 1);
	if (luo < 0) {
		fail("open");
		return;
	}
	t = now_us();
	for (i = 0; i < BENCH_SESSIONS; i++) {
		snprintf(name, sizeof(name), "xbench-%d-%d", prev, i);
		bench_sessions[i] = retrieve_session(luo, name);
		if (bench_sessions[i] < 0) {
			errno = -bench_sessions[i];
			fail("retrieve %s", name);
			return;
		}
	}
	report("retrieve_sessions", now_us() - t, BENCH_SESSIONS);
	bench_ioctls(luo, bench_sessions[0]);
	t = now_us();
	for (i = 0; i < BENCH_SESSIONS; i++)
		if (finish_session(bench_sessions[i]))
			fail("finish");
	report("finish_empty_sessions", now_us() - t, BENCH_SESSIONS);
	t = now_us();
	for (i = 0; i < BENCH_SESSIONS; i++)
		close(bench_sessions[i]);
	report("close_incoming_sessions", now_us() - t, BENCH_SESSIONS);

	snprintf(name, sizeof(name), "xbench-files-%d", prev);
	s = retrieve_session(luo, name);
	if (s < 0) {
		fail("retrieve %s", name);
		return;
	}
	t = now_us();
	for (i = 0; i < BENCH_FILES; i++) {
		fd = retrieve_fd(s, i);
		if (fd < 0) {
			errno = -fd;
			fail("retrieve_fd %d", i);
			return;
		}
		bench_sessions[i] = fd;
	}
	report("retrieve_memfds", now_us() - t, BENCH_FILES);
	for (i = 0; i < BENCH_FILES; i++) {
		snprintf(text, sizeof(text), "bench step %d file %d", prev, i);
		check_memfd(bench_sessions[i], 4096, text, 0);
		close(bench_sessions[i]);
	}
	t = now_us();
	if (finish_session(s))
		fail("finish files");
	report("finish_memfds", now_us() - t, BENCH_FILES);
	close(s);
	close(luo);
}

static void run_bench(void)
{
	int luo, r;

	raise_nofile();
	if (step > 0)
		bench_retrieve();
	if (step + 1 >= nplan || failed)
		finish_run();
	luo = luo_open();
	if (luo < 0) {
		fail("open");
		finish_run();
	}
	for (r = 0; r < BENCH_ROUNDS; r++) {
		bench_create(luo, 0);
		bench_preserve(luo, 0);
	}
	bench_create(luo, 1);
	bench_preserve(luo, 1);
	close(luo);
	if (failed)
		finish_run();
	kexec_next(NULL);
}

/* ------------------------------------------------------------------ */
/* loop (profiling)                                                    */
/* ------------------------------------------------------------------ */

/*
 * One operation in a loop between "LUOX LOOP BEGIN" and "LUOX LOOP END" lines, for the
 * host-side sampler (vm-extra.sh prof:<core>:<op>). luox_n sets the size:
 *
 *   null                              luox_n ioctls on /dev/null: the control, no LUO code
 *   rejected, getname, create_close   luox_n ioctls (or create + close pairs)
 *   close_many                        luox_n rounds of: create 2000 sessions named as the
 *                                     bench names them, close them in creation order (a
 *                                     close in a full table; a trace sees the first one)
 *   close_incoming                    2000 sessions cross a kexec; the loop retrieves them all
 *                                     and closes them in that order (luox_n is ignored; a
 *                                     trace sees the first close, in a full incoming table)
 *   finish                            luox_n FINISHes of one empty incoming session
 *   preserve                          luox_n rounds of: create a session, preserve 500 memfds,
 *                                     close it
 *   retrieve_memfds, finish_memfds    luox_n memfds in sessions of 1000 cross a kexec; the
 *                                     loop retrieves (or finishes) all of them
 *   reboot                            luox_n sessions and luox_n / 4 memfds, then
 *                                     reboot(RB_KEXEC); the sampler stops at "Starting new
 *                                     kernel"
 *
 * The ops that need incoming state run on a plan of two kernels: step 0 prepares it and
 * kexecs. With luox_gate, the loop waits for a console line before it begins and after it
 * ends (see wait_console).
 */
#define LOOP_PER_SESSION 1000

static void loop_memfds(int luo, long n)
{
	char name[64], text[64];
	long i;
	int s = -1;

	for (i = 0; i < n && !failed; i++) {
		int fd;

		if (i % LOOP_PER_SESSION == 0) {
			snprintf(name, sizeof(name), "loop-%ld", i / LOOP_PER_SESSION);
			s = create_session(luo, name);
			if (s < 0) {
				errno = -s;
				fail("create %s", name);
				return;
			}
		}
		snprintf(text, sizeof(text), "loop file %ld", i);
		fd = make_memfd(4096, text, 0);
		if (fd < 0 || preserve_fd(s, fd, i)) {
			fail("preserve memfd %ld", i);
			return;
		}
		close(fd);
	}
}

static int loop_sessions[1024];

static void loop_retrieve_sessions(int luo, long n)
{
	char name[64];
	long i;

	for (i = 0; i * LOOP_PER_SESSION < n && i < 1024; i++) {
		snprintf(name, sizeof(name), "loop-%ld", i);
		loop_sessions[i] = retrieve_session(luo, name);
		if (loop_sessions[i] < 0) {
			errno = -loop_sessions[i];
			fail("retrieve %s", name);
		}
	}
}

static void loop_retrieve_fds(long n)
{
	long i;

	for (i = 0; i < n && !failed; i++) {
		int fd = retrieve_fd(loop_sessions[i / LOOP_PER_SESSION], i);

		if (fd < 0) {
			errno = -fd;
			fail("retrieve_fd %ld", i);
		}
		close(fd);
	}
}

/*
 * luox_gate: says `what` and waits for a line on the console, so that a host-side tool
 * (a profiler of QEMU itself) can bracket exactly the loop.
 */
static void wait_console(const char *what)
{
	char c;

	say("%s", what);
	while (read(0, &c, 1) == 1 && c != '\n')
		;
}

static void run_loop(void)
{
	const char *v = param("luox_op");
	const char *op = v ? strdup(v) : "";
	int two_steps = !strcmp(op, "finish") || !strcmp(op, "retrieve_memfds") ||
			!strcmp(op, "finish_memfds") || !strcmp(op, "reboot") ||
			!strcmp(op, "close_incoming");
	int luo, nullfd, gate, s = 0, memfds[BENCH_FILES];
	long n, i;
	double t;

	v = param("luox_n");
	n = v ? atol(v) : 100000;
	if (!strcmp(op, "reboot") || !strcmp(op, "preserve")) {
		struct rlimit rl = { n + 4096, n + 4096 };

		if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
			fail("setrlimit");
	}
	if (!strcmp(op, "close_many") || !strcmp(op, "close_incoming"))
		raise_nofile();
	if (two_steps && step > 0 && !strcmp(op, "reboot"))
		finish_run(); /* the sampler stopped at the kexec */
	luo = luo_open();
	if (luo < 0) {
		fail("open");
		finish_run();
	}
	if (two_steps && step == 0) {
		if (!strcmp(op, "finish")) {
			if (create_session(luo, "loop") < 0)
				fail("create");
		} else if (!strcmp(op, "close_incoming")) {
			char name[64];

			for (i = 0; i < BENCH_SESSIONS && !failed; i++) {
				snprintf(name, sizeof(name), "xbench-%d-%ld", step, i);
				if (create_session(luo, name) < 0)
					fail("create %s", name);
			}
		} else if (!strcmp(op, "reboot")) {
			for (i = 0; i < n && !failed; i++) {
				char name[64];

				snprintf(name, sizeof(name), "loop-s-%ld", i);
				if (create_session(luo, name) < 0)
					fail("create %s", name);
			}
			loop_memfds(luo, n / 4);
			say("LOOP BEGIN %s n=%ld", op, n);
		} else {
			loop_memfds(luo, n);
		}
		if (failed)
			finish_run();
		kexec_next(NULL);
	}
	if (!strcmp(op, "finish")) {
		s = retrieve_session(luo, "loop");
	} else if (!strcmp(op, "close_incoming")) {
		char name[64];

		for (i = 0; i < BENCH_SESSIONS && !failed; i++) {
			snprintf(name, sizeof(name), "xbench-0-%ld", i);
			bench_sessions[i] = retrieve_session(luo, name);
			if (bench_sessions[i] < 0)
				fail("retrieve %s", name);
		}
		n = 1;
	} else if (!strcmp(op, "getname")) {
		s = create_session(luo, "loop");
	} else if (!strcmp(op, "retrieve_memfds") || !strcmp(op, "finish_memfds")) {
		loop_retrieve_sessions(luo, n);
		if (!strcmp(op, "finish_memfds"))
			loop_retrieve_fds(n);
		s = failed ? -EIO : 0;
	} else if (!strcmp(op, "preserve")) {
		for (i = 0; i < BENCH_FILES; i++)
			if ((memfds[i] = make_memfd(4096, "loop", 0)) < 0)
				fail("memfd");
		s = failed ? -EIO : 0;
	}
	if (s < 0) {
		errno = -s;
		fail("setup for %s", op);
		finish_run();
	}
	nullfd = open("/dev/null", O_RDONLY);
	if (nullfd < 0)
		fail("open /dev/null");
	gate = param("luox_gate") != NULL;
	if (gate)
		wait_console("LOOP GATE BEGIN");
	say("LOOP BEGIN %s n=%ld", op, n);
	t = now_us();
	if (!strcmp(op, "retrieve_memfds")) {
		loop_retrieve_fds(n);
	} else if (!strcmp(op, "finish_memfds")) {
		for (i = 0; i * LOOP_PER_SESSION < n && i < 1024; i++)
			if (finish_session(loop_sessions[i]))
				fail("finish loop-%ld", i);
	}
	for (i = 0; i < n && !failed && !two_steps; i++) {
		if (!strcmp(op, "null")) {
			/* The control: an ioctl that LUO never sees (/dev/null has none), the same
			 * C code on both kernels. */
			if (ioctl(nullfd, _IO(LIVEUPDATE_IOCTL_TYPE, 0x20)) != -1 || errno != ENOTTY)
				fail("ioctl on /dev/null");
		} else if (!strcmp(op, "rejected")) {
			struct liveupdate_session_get_name gn = { .size = sizeof(gn) };

			if (ioctl(luo, _IO(LIVEUPDATE_IOCTL_TYPE, 0x20), &gn) != -1 || errno != EINVAL)
				fail("bad command");
		} else if (!strcmp(op, "getname")) {
			struct liveupdate_session_get_name gn = { .size = sizeof(gn) };

			if (ioctl(s, LIVEUPDATE_SESSION_GET_NAME, &gn) < 0)
				fail("get_name");
		} else if (!strcmp(op, "create_close")) {
			int fd = create_session(luo, "loop");

			if (fd < 0) {
				errno = -fd;
				fail("create");
			}
			close(fd);
		} else if (!strcmp(op, "close_many")) {
			char name[64];
			int k;

			for (k = 0; k < BENCH_SESSIONS && !failed; k++) {
				snprintf(name, sizeof(name), "xbench-%d-%d", step, k);
				bench_sessions[k] = create_session(luo, name);
				if (bench_sessions[k] < 0)
					fail("create %s", name);
			}
			for (k = 0; k < BENCH_SESSIONS && !failed; k++)
				close(bench_sessions[k]);
		} else if (!strcmp(op, "preserve")) {
			int fd = create_session(luo, "loop");

			for (int f = 0; f < BENCH_FILES && !failed; f++)
				if (preserve_fd(fd, memfds[f], f))
					fail("preserve");
			close(fd);
		} else {
			fail("unknown luox_op '%s'", op);
		}
	}
	for (i = 0; i < n && !failed && !strcmp(op, "finish"); i++)
		if (finish_session(s))
			fail("finish");
	if (!strcmp(op, "close_incoming")) {
		/* A second for a tracer to attach (prof: it waits for LOOP BEGIN): these closes
		 * happen once, and take milliseconds. */
		sleep(1);
		t = now_us();
		for (i = 0; i < BENCH_SESSIONS && !failed; i++)
			close(bench_sessions[i]);
	}
	say("LOOP END %s n=%ld per_op_us=%.3f", op, n, (now_us() - t) / n);
	if (gate)
		wait_console("LOOP GATE END");
	finish_run();
}

int main(void)
{
	const char *v;
	char *p, *save;

	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	mount("proc", "/proc", "proc", 0, NULL);
	if (read_cmdline()) {
		fail("read /proc/cmdline");
		finish_run();
	}
	v = param("luox");
	mode = v ? strdup(v) : "";
	v = param("luox_step");
	step = v ? atoi(v) : 0;
	v = param("luox_plan");
	if (v) {
		char *copy = strdup(v);

		for (p = strtok_r(copy, ",", &save); p && nplan < MAX_PLAN;
		     p = strtok_r(NULL, ",", &save))
			snprintf(plan[nplan++], sizeof(plan[0]), "%s", p);
	}
	if (step >= nplan) {
		fail("step %d outside the plan (%d kernels)", step, nplan);
		finish_run();
	}
	say("step %d of %d: mode %s, plan core %s, running core %s", step, nplan, mode,
	    plan[step], running_core());
	if (strcmp(plan[step], running_core()))
		fail("the running kernel has the %s core, the plan says %s", running_core(),
		     plan[step]);
	if (!strcmp(mode, "chain"))
		run_chain();
	else if (!strcmp(mode, "corrupt"))
		run_corrupt();
	else if (!strcmp(mode, "b1"))
		run_b1();
	else if (!strcmp(mode, "bench"))
		run_bench();
	else if (!strcmp(mode, "loop"))
		run_loop();
	fail("unknown mode '%s'", mode);
	finish_run();
	return 0;
}
