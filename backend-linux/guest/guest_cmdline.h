/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The kernel command line for the guest programs (luo_xtest.c, luo_dfuzz.c): read once, then
 * looked up by parameter name. Header-only (static functions): each guest is one gcc call.
 */
#ifndef LUO_GUEST_CMDLINE_H
#define LUO_GUEST_CMDLINE_H

#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* " " + /proc/cmdline, so that every parameter is preceded by a space. */
static char cmdline[4096];

/* Reads /proc/cmdline (after /proc is mounted); 0, or -1 if it cannot be read. */
static int read_cmdline(void)
{
	int fd = open("/proc/cmdline", O_RDONLY);
	ssize_t n = fd < 0 ? -1 : read(fd, cmdline + 1, sizeof(cmdline) - 2);

	if (fd >= 0)
		close(fd);
	if (n <= 0)
		return -1;
	cmdline[0] = ' ';
	return 0;
}

/* The value of "name=value" on the command line, or NULL (a static buffer: copy to keep). */
static const char *param(const char *name)
{
	static char val[256];
	char key[64];
	char *p;

	snprintf(key, sizeof(key), " %s=", name);
	p = strstr(cmdline, key);
	if (!p)
		return NULL;
	p += strlen(key);
	snprintf(val, sizeof(val), "%.*s", (int)strcspn(p, " \n"), p);
	return val;
}

#endif
