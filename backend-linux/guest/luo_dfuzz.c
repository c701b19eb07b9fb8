// SPDX-License-Identifier: GPL-2.0
/*
 * luo_dfuzz: PID 1 of the differential fuzzer of /dev/liveupdate (`cargo xtask vm fuzz`).
 *
 * The same program runs on a kernel with the C core and on one with the Rust core; each seed
 * becomes a random but reproducible sequence of LUO operations, and every result and every
 * observation goes to a canonical trace on the second serial port (/dev/ttyS1), which the
 * host diffs between the cores. Canonical: no fd numbers, inode numbers or addresses; fds are
 * symbolic handles h<N> (numbered per sequence in creation order), inodes identity classes
 * c<N>, session names indexes n<N> into a fixed pool.
 *
 * Kernel command line:
 *   dfuzz_seeds=A-B       run seeds A .. B-1 in this VM
 *   dfuzz_ops=N           operations per sequence (default 60)
 *   dfuzz_kexec_every=K   every seed with seed % K == K - 1 is a kexec sequence: N/2
 *                         operations, reboot(RB_KEXEC) into /kernel with this initrd, N/2 more
 *                         in the next kernel (0: none)
 *   dfuzz_resume=S:L:H    set by this program on the kexec command line: go on with part 2
 *                         of seed S, whose trace so far has L lines and hash H
 *
 * The initrd is kept by the kernel (retain_initrd, /sys/firmware/initrd) and handed to the
 * next kernel as is, so a kexec chain needs no nested images.
 *
 * Trace lines: "T <seed> <step> <text>"; kernel messages of lib/tests/liveupdate.c (the test
 * FLBs, shared C code that both cores call) read from /dev/kmsg after each operation follow
 * as "T <seed> <step> k <message>"; "E <seed> <lines> <fnv1a64>" closes a seed, and
 * "DONE <A> <B>" the run. Lines the host must not diff start with "I ".
 *
 * 32-bit compat ioctls are not exercised: the guest kernel has no IA32_EMULATION.
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
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <termios.h>
#include <unistd.h>

#include "guest_cmdline.h"

#ifndef F_SEAL_EXEC
#define F_SEAL_EXEC 0x0020
#endif

#define MAXH 64
#define PAGE 4096

/* ------------------------------------------------------------------ */
/* Output                                                              */
/* ------------------------------------------------------------------ */

static int tfd = 1;		/* the trace: /dev/ttyS1, else stdout */
static uint64_t cur_seed;
static int cur_step;
static uint64_t th = 0xcbf29ce484222325ull; /* FNV-1a of the current seed's lines */
static long tlines;

static void out_raw(const char *s, size_t n)
{
	while (n) {
		ssize_t w = write(tfd, s, n);

		if (w <= 0) {
			if (w < 0 && errno == EINTR)
				continue;
			return;
		}
		s += w;
		n -= w;
	}
}

static void info(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	out_raw("I ", 2);
	out_raw(buf, n);
	/* also on the console, for the serial log */
	if (tfd != 1) {
		if (write(1, "luo_dfuzz: ", 11) < 0 || write(1, buf, n) < 0)
			return;
	}
}

/* One trace line of the current seed and step. */
static void tr(const char *fmt, ...)
{
	char body[1024], line[1100];
	va_list ap;
	int n;

	va_start(ap, fmt);
	vsnprintf(body, sizeof(body), fmt, ap);
	va_end(ap);
	n = snprintf(line, sizeof(line), "T %llu %d %s", (unsigned long long)cur_seed, cur_step,
		     body);
	if (n < 0)
		return;
	if (n > (int)sizeof(line) - 2)
		n = sizeof(line) - 2;
	/* the hash covers the line without "T " and without the newline */
	for (int i = 2; i < n; i++) {
		th ^= (uint8_t)line[i];
		th *= 0x100000001b3ull;
	}
	th ^= '\n';
	th *= 0x100000001b3ull;
	tlines++;
	line[n++] = '\n';
	out_raw(line, n);
}

static const char *en(int e)
{
	static char buf[16];
	const char *s = e ? strerrorname_np(e) : "ok";

	if (s)
		return s;
	snprintf(buf, sizeof(buf), "E%d", e);
	return buf;
}

/* ------------------------------------------------------------------ */
/* Random numbers                                                      */
/* ------------------------------------------------------------------ */

static uint64_t rs;

static uint64_t rnd(void)
{
	uint64_t z = (rs += 0x9E3779B97F4A7C15ull);

	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

static int pick(int n)
{
	return n > 0 ? (int)(rnd() % (uint64_t)n) : 0;
}

static int chance(int pct)
{
	return pick(100) < pct;
}

/* ------------------------------------------------------------------ */
/* Kernel messages of the test FLBs                                    */
/* ------------------------------------------------------------------ */

static int kfd = -1;

static void kmsg_open(void)
{
	kfd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	if (kfd >= 0)
		lseek(kfd, 0, SEEK_END);
}

/* Trace every new "liveupdate test: " record; other records are the console's business. */
static void kmsg_drain(void)
{
	char rec[2048];

	if (kfd < 0)
		return;
	for (;;) {
		ssize_t n = read(kfd, rec, sizeof(rec) - 1);
		char *msg, *p, *nl;

		if (n < 0 && errno == EPIPE) {
			tr("k (records lost)");
			continue;
		}
		if (n <= 0)
			return;
		rec[n] = 0;
		msg = strchr(rec, ';');
		if (!msg)
			continue;
		msg++;
		nl = strchr(msg, '\n');
		if (nl)
			*nl = 0;
		p = strstr(msg, "liveupdate test: ");
		if (p)
			tr("k %s", p + strlen("liveupdate test: "));
	}
}

/* ------------------------------------------------------------------ */
/* Handles                                                             */
/* ------------------------------------------------------------------ */

enum kind {
	K_NONE, K_DEV, K_SESS, K_MEMFD, K_PIPE_R, K_PIPE_W, K_SOCK, K_NULL, K_OPATH,
	K_EVENTFD, K_RFILE, K_DUP,
};

static const char *kname[] = {
	"none", "dev", "session", "memfd", "pipe_r", "pipe_w", "socket", "null", "opath",
	"eventfd", "retrieved", "dup",
};

struct handle {
	int kind;
	int fd;		/* -1 once closed by us */
	int name;	/* sessions: pool index */
	int incoming;	/* sessions: retrieved from the previous kernel */
	unsigned tokmask; /* outgoing sessions: tokens preserved in it (bit = tokens[] index) */
};

static struct handle H[MAXH];
static int nh;

/* Identity classes of inodes, in order of first appearance. */
static struct { dev_t dev; ino_t ino; } cls[MAXH * 2];
static int ncls;

static int ino_class(int fd)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -1;
	for (int i = 0; i < ncls; i++)
		if (cls[i].dev == st.st_dev && cls[i].ino == st.st_ino)
			return i;
	if (ncls == (int)(sizeof(cls) / sizeof(cls[0])))
		return -2;
	cls[ncls].dev = st.st_dev;
	cls[ncls].ino = st.st_ino;
	return ncls++;
}

static int new_handle(int kind, int fd)
{
	if (nh == MAXH) {
		close(fd);
		return -1;
	}
	H[nh] = (struct handle){ .kind = kind, .fd = fd, .name = -1 };
	return nh++;
}

static int prefer_incoming;	/* session picks: mostly retrieved sessions, if any */
static int kexec_seq;		/* this sequence crosses a kexec: keep sessions longer */

/* A random live handle, preferring `want` (K_NONE: any kind); -1 if none. */
static int pick_handle(int want)
{
	int cand[MAXH], n = 0;

	if (want == K_SESS && prefer_incoming && chance(85)) {
		for (int i = 0; i < nh; i++)
			if (H[i].fd >= 0 && H[i].kind == K_SESS && H[i].incoming)
				cand[n++] = i;
		if (n)
			return cand[pick(n)];
	}
	for (int i = 0; i < nh; i++)
		if (H[i].fd >= 0 && (want == K_NONE || H[i].kind == want))
			cand[n++] = i;
	if (!n && want != K_NONE)
		return pick_handle(K_NONE);
	return n ? cand[pick(n)] : -1;
}

/*
 * An fd argument for an operation: a live handle (mostly of kind `want`), a handle we closed
 * (its fd number as it was), or a number no handle has.
 */
static int last_pick;	/* the handle pick_fd chose, or -1 */

static int pick_fd(int want, char *desc, size_t len)
{
	int h, r = pick(100);

	last_pick = -1;
	if (r < 3) {
		snprintf(desc, len, "fd(-1)");
		return -1;
	}
	if (r < 5) {
		snprintf(desc, len, "fd(1000)");
		return 1000;
	}
	if (r < 10 && nh) {
		h = pick(nh);
		snprintf(desc, len, "h%d%s", h, H[h].fd < 0 ? "(closed)" : "");
		if (H[h].fd < 0)
			return 999; /* never open */
		last_pick = h;
		return H[h].fd;
	}
	h = pick_handle(chance(90) ? want : K_NONE);
	if (h < 0) {
		snprintf(desc, len, "fd(-1)");
		return -1;
	}
	snprintf(desc, len, "h%d", h);
	last_pick = h;
	return H[h].fd;
}

static unsigned long long hash_fd(int fd, off_t size)
{
	static uint8_t buf[65536];
	uint64_t x = 0xcbf29ce484222325ull;
	off_t at = 0;

	while (at < size) {
		ssize_t n = pread(fd, buf, sizeof(buf), at);

		if (n <= 0)
			return 0;
		for (ssize_t i = 0; i < n; i++) {
			x ^= buf[i];
			x *= 0x100000001b3ull;
		}
		at += n;
	}
	return x;
}

/* What can be seen of a handle's fd, canonically. */
static void observe(int h, const char *why)
{
	char raw[256], link[1024], path[64], desc[1400];
	struct stat st;
	int fd = H[h].fd, n, fdfl, fl;
	size_t o = 0;

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	n = readlink(path, raw, sizeof(raw) - 1);
	raw[n > 0 ? n : 0] = 0;
	/* "socket:[<inode>]", "pipe:[<inode>]": the number is not canonical */
	if (!strncmp(raw, "socket:[", 8) || !strncmp(raw, "pipe:[", 6))
		strcpy(strchr(raw, '[') + 1, "N]");
	/* the trace is ASCII: other bytes (session names may have any) as \xHH */
	for (size_t i = 0; raw[i]; i++) {
		unsigned char ch = raw[i];

		if (ch < 0x20 || ch >= 0x7f || ch == '\\' || ch == '"')
			o += snprintf(link + o, sizeof(link) - o, "\\x%02x", ch);
		else
			link[o++] = ch;
	}
	link[o] = 0;
	fdfl = fcntl(fd, F_GETFD);
	fl = fcntl(fd, F_GETFL);
	n = snprintf(desc, sizeof(desc), "obs %s h%d %s link=\"%s\" cloexec=%d fl=%o cls=c%d",
		     why, h, kname[H[h].kind], link, fdfl < 0 ? -1 : !!(fdfl & FD_CLOEXEC),
		     fl < 0 ? 0 : fl & ~O_LARGEFILE, ino_class(fd));
	if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
		off_t pos = lseek(fd, 0, SEEK_CUR);
		int seals = fcntl(fd, F_GET_SEALS);
		char sbuf[16];

		if (seals < 0)
			snprintf(sbuf, sizeof(sbuf), "%s", en(errno));
		else
			snprintf(sbuf, sizeof(sbuf), "%#x", seals);
		snprintf(desc + n, sizeof(desc) - n, " size=%lld pos=%lld seals=%s hash=%016llx",
			 (long long)st.st_size, (long long)pos, sbuf, hash_fd(fd, st.st_size));
	}
	tr("%s", desc);
}

/* ------------------------------------------------------------------ */
/* Session names                                                       */
/* ------------------------------------------------------------------ */

#define NNAMES 10
#define N_EMPTY 8
#define N_UNTERM 9
/* 0..7 are valid names; 7 is "s0" with bytes after its NUL (the same name as n0). */
#define NVALID 7

static void name_field(int i, uint8_t f[LIVEUPDATE_SESSION_NAME_LENGTH])
{
	memset(f, 0, LIVEUPDATE_SESSION_NAME_LENGTH);
	switch (i) {
	case 0: case 1: case 2: case 3:
		f[0] = 's';
		f[1] = '0' + i;
		break;
	case 4: case 5: /* 63 characters, differing in the last one */
		memset(f, 'L', 63);
		f[62] = '0' + (i - 4);
		break;
	case 6:
		memcpy(f, "x y/\x01\x7f\xff-", 8);
		break;
	case 7:
		memcpy(f, "s0\0junk-after-the-nul", 22);
		break;
	case N_EMPTY:
		memcpy(f + 1, "after-empty", 11);
		break;
	case N_UNTERM:
		memset(f, 'U', LIVEUPDATE_SESSION_NAME_LENGTH);
		break;
	}
}

/*
 * What the previous kernel's part of a kexec sequence left open (dfuzz_in=): per valid name,
 * 0x100 if a session of that name was open at the reboot, plus its preserved tokens' bits.
 * Part 2 aims its retrieves at these; it is the model's view, the same on both cores.
 */
static unsigned incoming_in[8];
static int have_in;

static int pick_in_name(void)
{
	int cand[8], n = 0;

	for (int i = 0; i < NVALID; i++)
		if (incoming_in[i] & 0x100)
			cand[n++] = i;
	return n ? cand[pick(n)] : pick(NVALID);
}

static int pick_token(int session_handle)
{
	unsigned m = 0;
	int cand[16], n = 0;

	if (session_handle >= 0 && H[session_handle].kind == K_SESS &&
	    H[session_handle].incoming && H[session_handle].name >= 0)
		m = incoming_in[H[session_handle].name == 7 ? 0 : H[session_handle].name] & 0xff;
	for (int i = 0; i < 8; i++)
		if (m & (1u << i))
			cand[n++] = i;
	return n && chance(80) ? cand[pick(n)] : pick(8);
}

static const uint64_t tokens[] = {
	0, 1, 2, 3, 42, 0x8000000000000000ull, 0xffffffffffffffffull, 0x100,
};
#define NTOK (int)(sizeof(tokens) / sizeof(tokens[0]))

/* ------------------------------------------------------------------ */
/* ioctl arguments                                                     */
/* ------------------------------------------------------------------ */

/*
 * arena: page 0 read-write, page 1 read-only (filled before it is protected), page 2
 * PROT_NONE. An argument is placed at the start of page 0 ("rw"), of page 1 ("ro": the reply
 * faults), or so that its end touches page 2 ("edge": bytes past the struct fault).
 */
static uint8_t *arena;

enum place { P_RW, P_RO, P_EDGE, P_NULL };
static const char *pname[] = { "rw", "ro", "edge", "null" };

struct argspec {
	uint32_t size;	/* the size word */
	int place;
	int tail;	/* bytes after the struct: 0 none, 1 zero, 2 non-zero */
	uint32_t extra;	/* tail length */
	int off;	/* "rw": bytes past the page start (a misaligned argument) */
};

/* Random size/placement variants around the struct size `sz`, mostly valid. */
static struct argspec pick_arg(uint32_t sz)
{
	struct argspec a = { .size = sz, .place = P_RW };
	int r = pick(100);

	if (r < 70) {
		if (chance(10))
			a.off = 1 + pick(7);
		return a;
	}
	if (r < 74) {
		a.size = sz - 1 - pick(sz);	/* too small, down to 0 */
	} else if (r < 80) {
		a.extra = 8 << pick(4);
		a.size = sz + a.extra;
		a.tail = 1;
	} else if (r < 85) {
		a.extra = 8 << pick(4);
		a.size = sz + a.extra;
		a.tail = 2;
	} else if (r < 88) {
		a.size = chance(50) ? 0x7fffffff : 0xffffffff;
		a.tail = 1;
		a.extra = 64;
	} else if (r < 93) {
		a.place = P_RO;
	} else if (r < 97) {
		/* `extra` bytes mapped after the struct (zero, or one not), then the fault */
		a.place = P_EDGE;
		a.extra = 1 + pick(12);
		a.size = sz + a.extra + 8;
		a.tail = chance(50) ? 1 : 2;
	} else {
		a.place = P_NULL;
	}
	return a;
}

static void desc_arg(const struct argspec *a, uint32_t sz, char *buf, size_t len)
{
	if (a->size == sz && a->place == P_RW && !a->off)
		snprintf(buf, len, "arg=std");
	else
		snprintf(buf, len, "arg=size:%d%+lld,%s+%d,tail:%d/%u", (int)sz,
			 (long long)a->size - sz, pname[a->place], a->off, a->tail, a->extra);
}

/*
 * Issues ioctl(fd, cmd) with the struct `s` (sz bytes) laid out as `a` says. On return `s`
 * holds what the kernel left in the argument; *changed tells whether the kernel wrote bytes
 * other than the ones `out_lo..out_hi` (the output fields) or past the struct.
 */
static int do_ioctl(int fd, unsigned long cmd, void *s, uint32_t sz, const struct argspec *a,
		    int out_lo, int out_hi, int *changed)
{
	uint8_t before[PAGE], *p;
	size_t span = sz + (a->tail ? (a->extra > 256 ? 256 : a->extra) : 0);
	int r, e;

	memcpy(s, &a->size, 4);
	*changed = 0;
	mprotect(arena + PAGE, PAGE, PROT_READ | PROT_WRITE);
	memset(arena, 0, 2 * PAGE);
	switch (a->place) {
	case P_RO:
		p = arena + PAGE;
		break;
	case P_EDGE:
		p = arena + 2 * PAGE - span;
		break;
	default:
		p = arena + a->off;
	}
	memcpy(p, s, sz);
	if (a->tail == 2)
		p[sz + pick(span - sz)] = 0x5a;
	memcpy(before, p, span);
	if (a->place == P_RO)
		mprotect(arena + PAGE, PAGE, PROT_READ);
	r = ioctl(fd, cmd, a->place == P_NULL ? NULL : p);
	e = r < 0 ? errno : 0;
	for (size_t i = 0; i < span; i++)
		if (p[i] != before[i] && !((int)i >= out_lo && (int)i < out_hi))
			*changed = 1;
	memcpy(s, p, sz);
	errno = e;
	return r;
}

/* ------------------------------------------------------------------ */
/* Operations                                                          */
/* ------------------------------------------------------------------ */

static void op_open_dev(void)
{
	int fd = open("/dev/liveupdate", chance(80) ? O_RDWR : O_RDONLY);

	if (fd < 0) {
		tr("open_dev = %s", en(errno));
		return;
	}
	int h = new_handle(K_DEV, fd);

	tr("open_dev = h%d", h);
}

static void op_close(int h)
{
	int r;

	if (h < 0)
		return;
	r = close(H[h].fd);
	tr("close h%d %s = %s", h, kname[H[h].kind], r < 0 ? en(errno) : "ok");
	H[h].fd = -1;
}

static void op_preserve_to(int sh, int fh, int tok);
static void op_retrieve_fd_from(int sh, int tok);

static void op_preserve(void)
{
	op_preserve_to(-1, -1, 0);
}

static void op_retrieve_fd(void)
{
	op_retrieve_fd_from(-1, 0);
}

/* The target of a device or session ioctl: mostly the right kind, sometimes any fd. */
static int ioctl_target(int want, char *desc, size_t len)
{
	return pick_fd(want, desc, len);
}

static int new_session_result(const char *what, int r, int e, int name, int changed,
			      struct liveupdate_ioctl_create_session *c, int incoming)
{
	if (r < 0) {
		tr("%s = %s%s", what, en(e), changed ? " (arg written)" : "");
		return -1;
	}
	if (fcntl(c->fd, F_GETFD) < 0) {
		tr("%s = ok but fd is not open", what);
		return -1;
	}
	int h = new_handle(K_SESS, c->fd);

	if (h < 0) {
		tr("%s = ok (handle table full)", what);
		return -1;
	}
	H[h].name = name;
	H[h].incoming = incoming;
	tr("%s = h%d%s", what, h, changed ? " (arg written)" : "");
	observe(h, "new");
	return h;
}

static int op_create_or_retrieve(int retrieve, int force_name)
{
	struct liveupdate_ioctl_create_session c = { 0 };
	char what[200], td[32], ad[64];
	int fd, name, r, e, changed, nh_new;
	struct argspec a;

	fd = ioctl_target(K_DEV, td, sizeof(td));
	r = pick(100);
	name = r < 88 ? (retrieve && have_in && chance(80) ? pick_in_name() : pick(NVALID)) :
		r < 92 ? 7 : r < 96 ? N_EMPTY : N_UNTERM;
	if (force_name >= 0)
		name = force_name;
	name_field(name, c.name);
	c.fd = -7;
	a = pick_arg(sizeof(c));
	desc_arg(&a, sizeof(c), ad, sizeof(ad));
	snprintf(what, sizeof(what), "%s %s n%d %s", retrieve ? "retrieve_session" : "create",
		 td, name, ad);
	r = do_ioctl(fd, retrieve ? LIVEUPDATE_IOCTL_RETRIEVE_SESSION :
		     LIVEUPDATE_IOCTL_CREATE_SESSION, &c, sizeof(c), &a, 4, 8, &changed);
	e = errno;
	nh_new = new_session_result(what, r, e, name, changed, &c, retrieve);
	kmsg_drain();
	/*
	 * A RETRIEVE_SESSION whose reply faulted: retrieve the session again at once, and if
	 * that works finish and close it, so both cores go on from the same state whatever they
	 * did with the session (the C core finishes it on the spot: B6 in docs/decisions.md).
	 */
	if (retrieve && a.place == P_RO && r < 0 && e == EFAULT && name < NVALID + 1) {
		struct liveupdate_ioctl_create_session c2 = { .size = sizeof(c2) };
		struct liveupdate_session_finish f = { .size = sizeof(f) };
		int fr, cr;

		name_field(name, c2.name);
		if (ioctl(fd, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &c2) < 0) {
			tr("b6probe n%d = %s", name, en(errno));
		} else {
			fr = ioctl(c2.fd, LIVEUPDATE_SESSION_FINISH, &f) < 0 ? errno : 0;
			cr = close(c2.fd) < 0 ? errno : 0;
			tr("b6probe n%d = ok finish=%s close=%s", name, en(fr), en(cr));
		}
		kmsg_drain();
	}
	return nh_new;
}

/* PRESERVE_FD; with sh, fh >= 0 of these handles with token `tok` and a standard argument. */
static void op_preserve_to(int sh, int fh, int tok)
{
	struct liveupdate_session_preserve_fd p = { 0 };
	char sd[32], fd_d[32], ad[64];
	int s, r, changed;
	struct argspec a;
	static const int kinds[] = { K_MEMFD, K_MEMFD, K_MEMFD, K_MEMFD, K_MEMFD, K_MEMFD,
				     K_MEMFD, K_MEMFD, K_RFILE, K_RFILE, K_DUP, K_PIPE_R,
				     K_SOCK, K_NULL, K_OPATH, K_SESS, K_DEV, K_EVENTFD };

	if (sh >= 0 && fh >= 0) {
		s = H[sh].fd;
		snprintf(sd, sizeof(sd), "h%d", sh);
		p.fd = H[fh].fd;
		snprintf(fd_d, sizeof(fd_d), "h%d", fh);
		a = (struct argspec){ .size = sizeof(p), .place = P_RW };
	} else {
		s = ioctl_target(K_SESS, sd, sizeof(sd));
		sh = last_pick;
		p.fd = pick_fd(kinds[pick(sizeof(kinds) / sizeof(kinds[0]))], fd_d,
			       sizeof(fd_d));
		tok = pick(NTOK);
		a = pick_arg(sizeof(p));
	}
	p.token = tokens[tok];
	desc_arg(&a, sizeof(p), ad, sizeof(ad));
	r = do_ioctl(s, LIVEUPDATE_SESSION_PRESERVE_FD, &p, sizeof(p), &a, 0, 0, &changed);
	if (r == 0 && sh >= 0)
		H[sh].tokmask |= 1u << tok;
	tr("preserve %s %s t%d %s = %s%s", sd, fd_d, tok, ad, r < 0 ? en(errno) : "ok",
	   changed ? " (arg written)" : "");
	kmsg_drain();
}

/* RETRIEVE_FD; with sh >= 0 from that handle, token `tok`, a standard argument. */
static void op_retrieve_fd_from(int sh, int tok)
{
	struct liveupdate_session_retrieve_fd p = { 0 };
	char sd[32], ad[64];
	int s, r, changed, h;
	struct argspec a;

	if (sh >= 0) {
		s = H[sh].fd;
		snprintf(sd, sizeof(sd), "h%d", sh);
		a = (struct argspec){ .size = sizeof(p), .place = P_RW };
	} else {
		s = ioctl_target(K_SESS, sd, sizeof(sd));
		tok = pick_token(last_pick);
		a = pick_arg(sizeof(p));
	}
	p.token = tokens[tok];
	p.fd = -7;
	desc_arg(&a, sizeof(p), ad, sizeof(ad));
	r = do_ioctl(s, LIVEUPDATE_SESSION_RETRIEVE_FD, &p, sizeof(p), &a, 4, 8, &changed);
	if (r < 0) {
		tr("retrieve_fd %s t%d %s = %s%s", sd, tok, ad, en(errno),
		   changed ? " (arg written)" : "");
	} else if (fcntl(p.fd, F_GETFD) < 0) {
		tr("retrieve_fd %s t%d %s = ok but fd is not open", sd, tok, ad);
	} else {
		h = new_handle(K_RFILE, p.fd);
		tr("retrieve_fd %s t%d %s = h%d%s", sd, tok, ad, h,
		   changed ? " (arg written)" : "");
		if (h >= 0)
			observe(h, "new");
	}
	kmsg_drain();
}

static void op_finish(void)
{
	struct liveupdate_session_finish f = { 0 };
	char sd[32], ad[64];
	int s, r, changed;
	struct argspec a;

	s = ioctl_target(K_SESS, sd, sizeof(sd));
	f.reserved = chance(10) ? 1u << pick(32) : 0;
	a = pick_arg(sizeof(f));
	desc_arg(&a, sizeof(f), ad, sizeof(ad));
	r = do_ioctl(s, LIVEUPDATE_SESSION_FINISH, &f, sizeof(f), &a, 0, 0, &changed);
	tr("finish %s res=%#x %s = %s%s", sd, f.reserved, ad, r < 0 ? en(errno) : "ok",
	   changed ? " (arg written)" : "");
	kmsg_drain();
}

static void op_get_name(void)
{
	struct liveupdate_session_get_name g = { 0 };
	char sd[32], ad[64], name[200], tail[16];
	int s, r, changed, len, junk, i, k, end, zero = 1, echo = -1;
	struct argspec a;

	s = ioctl_target(K_SESS, sd, sizeof(sd));
	g.reserved = chance(8) ? 1u << pick(32) : 0;
	junk = chance(50);
	if (junk)
		for (i = 0; i < LIVEUPDATE_SESSION_NAME_LENGTH; i++)
			g.name[i] = 0xa0 + (i & 15);
	a = pick_arg(sizeof(g));
	desc_arg(&a, sizeof(g), ad, sizeof(ad));
	r = do_ioctl(s, LIVEUPDATE_SESSION_GET_NAME, &g, sizeof(g), &a, 8, 8 + 64, &changed);
	if (r < 0) {
		tr("get_name %s res=%#x junk=%d %s = %s%s", sd, g.reserved, junk, ad, en(errno),
		   changed ? " (arg written)" : "");
		kmsg_drain();
		return;
	}
	len = strnlen((char *)g.name, sizeof(g.name));
	for (i = 0; i < len && i < 64; i++)
		snprintf(name + 2 * i, 3, "%02x", g.name[i]);
	name[2 * i] = 0;
	/*
	 * The bytes after the NUL: "zero", the caller's bytes ("echo"), or anything else. With
	 * a short size the kernel writes only `size` bytes; the rest is ours either way.
	 */
	/*
	 * "zero", or "echo@<k>": zero up to offset k and the caller's bytes from there on
	 * (upstream's strscpy copies a word at a time and clears the rest of the NUL's word),
	 * or "other".
	 */
	end = LIVEUPDATE_SESSION_NAME_LENGTH;
	if ((int)a.size - 8 < end)
		end = (int)a.size - 8;
	for (i = len + 1; i < end; i++)
		if (g.name[i])
			zero = 0;
	for (k = len + 1; !zero && k <= end && echo < 0; k++) {
		int ok = 1;

		for (i = len + 1; i < end && ok; i++)
			ok = i < k ? !g.name[i] : g.name[i] == (junk ? 0xa0 + (i & 15) : 0);
		if (ok)
			echo = k;
	}
	if (zero)
		snprintf(tail, sizeof(tail), "zero");
	else if (echo >= 0)
		snprintf(tail, sizeof(tail), "echo@%d", echo);
	else
		snprintf(tail, sizeof(tail), "other");
	tr("get_name %s res=%#x junk=%d %s = ok name=%s%s tail=%s%s", sd, g.reserved, junk, ad,
	   name, len == 64 ? "(unterminated)" : "", tail, changed ? " (arg written)" : "");
	kmsg_drain();
}

/* A raw command word: LUO's type or not, numbers around the valid ones, any dir/size. */
static void op_raw_ioctl(void)
{
	static const uint32_t nrs[] = { 0, 1, 2, 3, 0x3f, 0x40, 0x41, 0x42, 0x43, 0x44, 0x80,
					0xff };
	static const uint32_t types[] = { LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_IOCTL_TYPE, 0xBB, 0 };
	uint8_t buf[128] = { 0 };
	char td[32];
	uint32_t cmd, nr = nrs[pick(sizeof(nrs) / sizeof(nrs[0]))];
	int fd, r, changed;
	struct argspec a = { .size = 72, .place = P_RW };

	fd = ioctl_target(chance(50) ? K_DEV : K_SESS, td, sizeof(td));
	cmd = (types[pick(4)] << 8) | nr;
	if (chance(40))
		cmd |= (uint32_t)pick(4) << 30 | (uint32_t)pick(128) << 16;
	a.size = chance(50) ? 72 : pick(100);
	r = do_ioctl(fd, cmd, buf, 72, &a, 4, 8, &changed);
	tr("raw_ioctl %s cmd=%#x size=%u = %s%s", td, cmd, a.size, r < 0 ? en(errno) : "ok",
	   changed ? " (arg written)" : "");
	kmsg_drain();
	/* a valid command that happened to succeed made an fd: track it */
	if (r == 0 && (cmd == LIVEUPDATE_IOCTL_CREATE_SESSION ||
		       cmd == LIVEUPDATE_IOCTL_RETRIEVE_SESSION ||
		       cmd == LIVEUPDATE_SESSION_RETRIEVE_FD)) {
		int nfd;

		memcpy(&nfd, buf + 4, 4);
		if (fcntl(nfd, F_GETFD) >= 0)
			new_handle(cmd == LIVEUPDATE_SESSION_RETRIEVE_FD ? K_RFILE : K_SESS, nfd);
	}
}

static void fill_pattern(int fd, size_t size, uint64_t seed)
{
	uint8_t buf[4096];

	for (size_t at = 0; at < size; at += sizeof(buf)) {
		size_t n = size - at < sizeof(buf) ? size - at : sizeof(buf);

		for (size_t i = 0; i < n; i++)
			buf[i] = (uint8_t)((seed >> ((i & 7) * 8)) ^ (at + i) * 7);
		if (pwrite(fd, buf, n, at) < 0)
			return;
	}
}

static int op_new_fd(int memfd_only)
{
	static const size_t sizes[] = { 0, 1, 100, 4096, 4097, 12288, 65536 + 3, 1 << 20 };
	int r = memfd_only ? 0 : pick(100), fd = -1, kind = K_MEMFD, p[2], h;
	char what[160];

	if (r < 60) {
		size_t size = sizes[pick(sizeof(sizes) / sizeof(sizes[0]))];
		int flags = (chance(30) ? MFD_CLOEXEC : 0) | (chance(40) ? MFD_ALLOW_SEALING : 0);
		unsigned seals = 0;
		off_t pos = 0;

		if (size == 1 << 20 && chance(70))
			size = 8192;
		fd = memfd_create(chance(50) ? "dfuzz" : "", flags);
		if (fd < 0) {
			tr("memfd = %s", en(errno));
			return -1;
		}
		if (size) {
			if (chance(70))
				fill_pattern(fd, size, rnd());
			else if (ftruncate(fd, size) < 0)
				size = 0;
		}
		if (chance(40))
			pos = lseek(fd, pick(size + 2), SEEK_SET);
		if ((flags & MFD_ALLOW_SEALING) && chance(60)) {
			static const unsigned s[] = { F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW,
						      F_SEAL_WRITE, F_SEAL_FUTURE_WRITE,
						      F_SEAL_EXEC };
			for (int i = 0; i < 6; i++)
				if (chance(35))
					seals |= s[i];
			if (fcntl(fd, F_ADD_SEALS, seals) < 0)
				seals = ~0u;
		}
		snprintf(what, sizeof(what), "memfd size=%zu flags=%#x pos=%lld seals=%#x", size,
			 flags, (long long)pos, seals);
	} else if (r < 70) {
		if (pipe(p) < 0)
			return -1;
		h = new_handle(K_PIPE_R, p[0]);
		int h2 = new_handle(K_PIPE_W, p[1]);

		tr("pipe = h%d h%d", h, h2);
		return h;
	} else if (r < 76) {
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, p) < 0) {
			tr("socketpair = %s", en(errno));
			return -1;
		}
		close(p[1]);
		fd = p[0];
		kind = K_SOCK;
		snprintf(what, sizeof(what), "socket");
	} else if (r < 82) {
		fd = open("/dev/null", O_RDWR);
		kind = K_NULL;
		snprintf(what, sizeof(what), "devnull");
	} else if (r < 88) {
		fd = open("/dev/null", O_PATH);
		kind = K_OPATH;
		snprintf(what, sizeof(what), "opath");
	} else if (r < 92) {
		fd = eventfd(0, 0);
		kind = K_EVENTFD;
		snprintf(what, sizeof(what), "eventfd");
	} else {
		h = pick_handle(chance(70) ? K_MEMFD : K_NONE);
		if (h < 0)
			return -1;
		fd = dup(H[h].fd);
		kind = K_DUP;
		snprintf(what, sizeof(what), "dup h%d", h);
	}
	if (fd < 0) {
		tr("%s = %s", what, en(errno));
		return -1;
	}
	h = new_handle(kind, fd);
	tr("%s = h%d", what, h);
	if (h >= 0 && chance(30))
		observe(h, "new");
	return h;
}

/*
 * An operation that needs a new fd with the fd table full (RLIMIT_NOFILE at the lowest free
 * fd): every fd-making command reserves its fd first, so EMFILE comes before anything else.
 */
static void op_emfile(void)
{
	struct rlimit old, tight;
	int lowest = dup(0);

	if (lowest < 0 || getrlimit(RLIMIT_NOFILE, &old) < 0)
		return;
	close(lowest);
	tight = old;
	tight.rlim_cur = lowest;
	if (setrlimit(RLIMIT_NOFILE, &tight) < 0)
		return;
	tr("rlimit nofile full");
	switch (pick(4)) {
	case 0:
		op_create_or_retrieve(0, -1);
		break;
	case 1:
		op_create_or_retrieve(1, -1);
		break;
	case 2:
		op_retrieve_fd();
		break;
	default:
		op_open_dev();
		break;
	}
	setrlimit(RLIMIT_NOFILE, &old);
}

/* Changes to a memfd: preserved ones are frozen in size (shmem_freeze) until unpreserved. */
static void op_mutate(void)
{
	int h = pick_handle(chance(70) ? K_MEMFD : K_RFILE), r;
	char what[64];

	if (h < 0)
		return;
	switch (pick(4)) {
	case 0:
		r = ftruncate(H[h].fd, pick(3) * 4096 + pick(2)) < 0 ? errno : 0;
		snprintf(what, sizeof(what), "ftruncate");
		break;
	case 1: {
		char b[32];

		memset(b, 'a' + pick(26), sizeof(b));
		r = pwrite(H[h].fd, b, sizeof(b), pick(8192)) < 0 ? errno : 0;
		snprintf(what, sizeof(what), "pwrite");
		break;
	}
	case 2:
		r = lseek(H[h].fd, pick(9000), SEEK_SET) < 0 ? errno : 0;
		snprintf(what, sizeof(what), "lseek");
		break;
	default:
		r = fcntl(H[h].fd, F_ADD_SEALS, F_SEAL_GROW) < 0 ? errno : 0;
		snprintf(what, sizeof(what), "seal_grow");
		break;
	}
	tr("mutate h%d %s = %s", h, what, en(r));
}

/* ------------------------------------------------------------------ */
/* Sequences                                                           */
/* ------------------------------------------------------------------ */

static int has(int kind)
{
	for (int i = 0; i < nh; i++)
		if (H[i].fd >= 0 && H[i].kind == kind)
			return 1;
	return 0;
}

/*
 * Mostly, an operation that needs a device, a session or a memfd and has none makes one
 * instead (so sequences get deep); sometimes it goes ahead at whatever fd there is.
 */
static int ready(int kind, int part)
{
	if (has(kind) || chance(15))
		return 1;
	if (kind == K_DEV || !has(K_DEV))
		op_open_dev();
	else if (kind == K_SESS)
		op_create_or_retrieve(part >= 2 && chance(70), -1);
	else
		op_new_fd(1);
	return 0;
}

static void one_op(int part)
{
	int r = pick(100);

	if (part >= 2 && r < 40) {
		/* the next kernel: mostly about what came in */
		if (r < 15) {
			if (ready(K_DEV, part))
				op_create_or_retrieve(1, -1);
		} else if (r < 37) {
			prefer_incoming = 1;
			if (ready(K_SESS, part))
				op_retrieve_fd();
		} else {
			prefer_incoming = 1;
			if (ready(K_SESS, part))
				op_finish();
		}
		prefer_incoming = 0;
		return;
	}
	r = pick(100);
	if (r < 2)
		op_open_dev();
	else if (r < 3)
		op_close(pick_handle(K_DEV));
	else if (r < 15) {
		if (ready(K_DEV, part))
			op_create_or_retrieve(0, -1);
	} else if (r < 19) {
		if (ready(K_DEV, part))
			op_create_or_retrieve(1, -1);
	} else if (r < 33)
		op_new_fd(chance(40));
	else if (r < 58) {
		if (ready(K_SESS, part) && ready(K_MEMFD, part))
			op_preserve();
	} else if (r < 63) {
		if (ready(K_SESS, part))
			op_retrieve_fd();
	} else if (r < 67) {
		if (part == 1 || chance(30))
			if (ready(K_SESS, part))
				op_finish();
	} else if (r < 72) {
		if (ready(K_SESS, part))
			op_get_name();
	} else if (r < 75) {
		if (!kexec_seq || chance(30))
			op_close(pick_handle(K_SESS));
	} else if (r < 80) {
		int h = pick_handle(K_NONE);

		if (h >= 0 && (H[h].kind != K_SESS || !kexec_seq || chance(30)))
			op_close(h);
	}
	else if (r < 85)
		op_mutate();
	else if (r < 88)
		op_raw_ioctl();
	else if (r < 90)
		op_emfile();
	else {
		int h = pick_handle(K_NONE);

		if (h >= 0)
			observe(h, "now");
	}
}

static void reset_handles(void)
{
	nh = 0;
	ncls = 0;
}

/* Closes every handle, newest last, and records what happened. */
static void close_all(void)
{
	for (int h = 0; h < nh; h++) {
		if (H[h].fd < 0)
			continue;
		if (H[h].kind == K_RFILE || H[h].kind == K_MEMFD)
			observe(h, "end");
		op_close(h);
		kmsg_drain();
	}
}

/*
 * After a sequence nothing may be left: every incoming session is retrieved, finished and
 * closed (they would otherwise stay until the next kexec), and every valid name can be
 * created again (a leaked outgoing session would give EEXIST).
 */
static void drain_and_probe(void)
{
	struct liveupdate_ioctl_create_session c;
	struct liveupdate_session_finish f = { .size = sizeof(f) };
	int dev = open("/dev/liveupdate", O_RDWR), fds[NVALID];

	if (dev < 0) {
		tr("probe open = %s", en(errno));
		return;
	}
	for (int i = 0; i < NVALID; i++) {
		c = (struct liveupdate_ioctl_create_session){ .size = sizeof(c) };
		name_field(i, c.name);
		if (ioctl(dev, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &c) < 0) {
			if (errno != ENOENT)
				tr("probe retrieve n%d = %s", i, en(errno));
			continue;
		}
		int fr = ioctl(c.fd, LIVEUPDATE_SESSION_FINISH, &f) < 0 ? errno : 0;
		int cr = close(c.fd) < 0 ? errno : 0;

		tr("probe retrieve n%d = ok finish=%s close=%s", i, en(fr), en(cr));
		kmsg_drain();
	}
	for (int i = 0; i < NVALID; i++) {
		c = (struct liveupdate_ioctl_create_session){ .size = sizeof(c) };
		name_field(i, c.name);
		fds[i] = ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &c) < 0 ? -errno : c.fd;
		if (fds[i] < 0)
			tr("probe create n%d = %s", i, en(-fds[i]));
	}
	for (int i = 0; i < NVALID; i++)
		if (fds[i] >= 0 && close(fds[i]) < 0)
			tr("probe close n%d = %s", i, en(errno));
	close(dev);
	kmsg_drain();
	tr("probe done");
}

static void end_seed(void)
{
	char line[96];
	int n = snprintf(line, sizeof(line), "E %llu %ld %016llx\n", (unsigned long long)cur_seed,
			 tlines, (unsigned long long)th);

	out_raw(line, n);
}

static void begin_seed(uint64_t seed, int part, long lines, uint64_t hash)
{
	cur_seed = seed;
	rs = seed * 0xD1B54A32D192ED03ull + (uint64_t)part * 0x8CB92BA72F3D8DD7ull + 1;
	tlines = lines;
	th = hash;
	reset_handles();
	if (part == 1) {
		have_in = 0;
		memset(incoming_in, 0, sizeof(incoming_in));
	}
}

/*
 * On a kmemleak kernel (`cargo xtask vm fuzz --sanitize`), the objects kmemleak finds
 * unreferenced at the end of the last boot, on the console as xtask/scripts/kmemleak-scan.sh
 * reports them (the host fails the run on any). A no-op without /sys/kernel/debug/kmemleak.
 */
static void kmemleak_scan(void)
{
	static char rep[1 << 16];
	const char *f = "/sys/kernel/debug/kmemleak";
	int fd, objs = 0;
	size_t len = 0;
	ssize_t n;

	mount("debugfs", "/sys/kernel/debug", "debugfs", 0, NULL);
	fd = open(f, O_RDWR);
	if (fd < 0) {
		info("kmemleak: none (%s: %s)", f, strerror(errno));
		return;
	}
	/* An object is reported only once older than kmemleak's minimum age (5 s). */
	sleep(6);
	if (write(fd, "scan", 4) != 4) {
		info("kmemleak: scan failed: %s", strerror(errno));
		close(fd);
		return;
	}
	lseek(fd, 0, SEEK_SET);
	while (len < sizeof(rep) - 1 && (n = read(fd, rep + len, sizeof(rep) - 1 - len)) > 0)
		len += n;
	close(fd);
	rep[len] = 0;
	for (const char *p = rep; (p = strstr(p, "unreferenced object 0x")); p++)
		objs++;
	/* To the console (this program's stdout), where xtask reads the VM suite's scans too. */
	dprintf(1, "LUO-VM: kmemleak scan: %d unreferenced object(s)\n", objs);
	for (char *l = rep, *e; *l; l = e) {
		e = strchrnul(l, '\n');
		if (e > l)
			dprintf(1, "LUO-VM: %.*s\n", (int)(e - l), l);
		if (*e)
			e++;
	}
}

static void power_off(void)
{
	sync();
	syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_RESTART,
		NULL);
	for (;;)
		pause();
}

/* Copies the retained initrd into a memfd for kexec_file_load. */
static int initrd_copy(void)
{
	static char buf[1 << 16];
	int in = open("/sys/firmware/initrd", O_RDONLY), out;
	ssize_t n;

	if (in < 0)
		return -1;
	out = memfd_create("initrd", MFD_CLOEXEC);
	while (out >= 0 && (n = read(in, buf, sizeof(buf))) > 0)
		if (write(out, buf, n) != n) {
			close(out);
			out = -1;
		}
	close(in);
	return out;
}

/*
 * Loads /kernel with our initrd and `dfuzz_resume=` for part `next` of this sequence, and
 * kexecs; returns only on failure.
 */
static void kexec_resume(int next_part)
{
	char next[sizeof(cmdline)] = "", *save, *tok, *copy = strdup(cmdline);
	int kf, inf, r;

	for (tok = strtok_r(copy, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save)) {
		if (!strncmp(tok, "dfuzz_resume=", 13) || !strncmp(tok, "dfuzz_in=", 9))
			continue;
		strncat(next, tok, sizeof(next) - strlen(next) - 2);
		strcat(next, " ");
	}
	free(copy);
	snprintf(next + strlen(next), sizeof(next) - strlen(next),
		 "dfuzz_resume=%llu:%d:%ld:%llx", (unsigned long long)cur_seed, next_part, tlines,
		 (unsigned long long)th);
	{
		unsigned in[8] = { 0 };

		for (int h = 0; h < nh; h++)
			if (H[h].fd >= 0 && H[h].kind == K_SESS && !H[h].incoming &&
			    H[h].name >= 0 && H[h].name <= 7) {
				int n = H[h].name == 7 ? 0 : H[h].name;

				in[n] |= 0x100 | H[h].tokmask;
			}
		strcat(next, " dfuzz_in=");
		for (int i = 0; i < NVALID; i++)
			snprintf(next + strlen(next), sizeof(next) - strlen(next), "%03x", in[i]);
	}
	kf = open("/kernel", O_RDONLY | O_CLOEXEC);
	inf = initrd_copy();
	if (kf < 0 || inf < 0) {
		info("FAIL no /kernel or no retained initrd");
		power_off();
	}
	if (syscall(SYS_kexec_file_load, kf, inf, strlen(next) + 1, next, 0) < 0) {
		info("FAIL kexec_file_load: %s", en(errno));
		power_off();
	}
	close(kf);
	close(inf);
	info("kexec seed %llu", (unsigned long long)cur_seed);
	r = syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_KEXEC,
		    NULL);
	tr("kexec = %s", r < 0 ? en(errno) : "returned");
}

static void run_part(int part, int ops)
{
	for (int i = 0; i < ops; i++) {
		cur_step++;
		one_op(part);
	}
}

/*
 * Seed `s` from its part `part` on (1 on a cold start, 2 or 3 after a kexec). A kexec
 * sequence (seed % every == every - 1) has two parts, or three for every other one (the
 * second kernel retrieves and preserves anew, and kexecs again); each part but the last ends
 * with the kexec. Part p's operations are steps (p-1)*(per+1)+1 ...
 */
static void run_seq(uint64_t s, long every, long ops, int part, long lines, uint64_t hash)
{
	int parts = every > 0 && s % every == (uint64_t)every - 1 ? 2 + (int)((s / every) % 2) : 1;
	long per = ops / parts;

	begin_seed(s, part, lines, hash);
	kexec_seq = parts > 1;
	cur_step = (part - 1) * (per + 1);
	if (part > 1)
		tr("boot part %d", part);
	if (chance(90))
		op_open_dev();
	if (part > 1) {
		/*
		 * Most of what came in is retrieved at once, and most of its files, the rest
		 * later or never.
		 */
		for (int i = 0; i < NVALID; i++) {
			if (!(incoming_in[i] & 0x100) || !chance(60))
				continue;
			int sh = op_create_or_retrieve(1, i);

			for (int t = 0; sh >= 0 && t < NTOK; t++)
				if ((incoming_in[i] & (1u << t)) && chance(70))
					op_retrieve_fd_from(sh, t);
		}
	}
	if (part < parts) {
		/* a kexec follows: sessions with files to hand over */
		for (int n = 1 + pick(3); n > 0; n--) {
			int sh = op_create_or_retrieve(0, pick(NVALID));

			for (int f = pick(5); sh >= 0 && f > 0; f--) {
				int fh = op_new_fd(1);

				if (fh >= 0)
					op_preserve_to(sh, fh, pick(NTOK));
			}
		}
	}
	for (;;) {
		run_part(part, part == parts ? ops - per * (parts - 1) : per);
		if (part == parts)
			break;
		cur_step++;
		kexec_resume(part + 1);
		/* the reboot was refused: go on in this kernel */
		part++;
	}
	close_all();
	drain_and_probe();
	end_seed();
}

int main(void)
{
	unsigned long long a = 0, b = 0, a0, rseed;
	int rpart;
	long ops = 60, every = 0, rlines;
	unsigned long long rhash;
	const char *v;
	int fd;

	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	fd = open("/dev/ttyS1", O_WRONLY | O_NOCTTY);
	if (fd >= 0) {
		struct termios t;

		if (tcgetattr(fd, &t) == 0) {
			cfmakeraw(&t);
			tcsetattr(fd, TCSANOW, &t);
		}
		tfd = fd;
	}
	if (read_cmdline()) {
		info("FAIL read /proc/cmdline");
		power_off();
	}
	v = param("dfuzz_seeds");
	if (!v || sscanf(v, "%llu-%llu", &a, &b) != 2 || b < a) {
		info("FAIL no dfuzz_seeds=A-B");
		power_off();
	}
	a0 = a;
	v = param("dfuzz_ops");
	if (v)
		ops = atol(v);
	v = param("dfuzz_kexec_every");
	if (v)
		every = atol(v);
	arena = mmap(NULL, 3 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (arena == MAP_FAILED) {
		info("FAIL mmap");
		power_off();
	}
	mprotect(arena + 2 * PAGE, PAGE, PROT_NONE);
	kmsg_open();

	v = param("dfuzz_resume");
	if (v && sscanf(v, "%llu:%d:%ld:%llx", &rseed, &rpart, &rlines, &rhash) == 4) {
		info("resume seed %llu part %d", rseed, rpart);
		v = param("dfuzz_in");
		for (int i = 0; v && i < NVALID && strlen(v) >= 3 * (size_t)(i + 1); i++) {
			char d[4] = { v[3 * i], v[3 * i + 1], v[3 * i + 2], 0 };

			incoming_in[i] = strtoul(d, NULL, 16);
			have_in = 1;
		}
		run_seq(rseed, every, ops, rpart, rlines, rhash);
		a = rseed + 1;
	}
	for (uint64_t s = a; s < b; s++)
		run_seq(s, every, ops, 1, 0, 0xcbf29ce484222325ull);
	{
		char line[64];
		int m = snprintf(line, sizeof(line), "DONE %llu %llu\n", a0, b);

		out_raw(line, m);
	}
	info("done");
	kmemleak_scan();
	power_off();
	return 0;
}
