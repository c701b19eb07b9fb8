// SPDX-License-Identifier: GPL-2.0
/*
 * C glue of the Rust LUO core: the `liveupdate=` parameter, the two initcalls (the Rust
 * crate is built in, and the kernel crate's `module!` only emits device_initcall), and
 * one-line wrappers for C macros and static inline functions that bindgen cannot bind.
 *
 * Everything else (the state machine, the device, the exported in-kernel API) is Rust:
 * luo.rs and the luo-core crate (rust/luo_core).
 */

#define pr_fmt(fmt) "luo: " fmt

#include <linux/init.h>
#include <linux/io.h>
#include <linux/mm.h>
#include <linux/memory_hotplug.h>
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/string.h>

#include "luo_internal.h" /* kernel/liveupdate/, see the Makefile */
#include "luo_glue.h"

static bool luo_param_enabled;

static int __init early_liveupdate_param(char *buf)
{
	return kstrtobool(buf, &luo_param_enabled);
}
early_param("liveupdate", early_liveupdate_param);

/* Incoming state: runs even with liveupdate=off, as the C core does (KHO permitting). */
static int __init luo_rust_early_initcall(void)
{
	return luo_rust_early_init(luo_param_enabled);
}
early_initcall(luo_rust_early_initcall);

/*
 * Outgoing state and /dev/liveupdate. kernel/ is linked before mm/, so this runs before
 * mm/memfd_luo.c registers its handler from its own late_initcall.
 */
static int __init luo_rust_late_initcall(void)
{
	return luo_rust_late_init();
}
late_initcall(luo_rust_late_initcall);

bool luo_glue_try_module_get(struct module *owner)
{
	return try_module_get(owner);
}

void luo_glue_module_put(struct module *owner)
{
	module_put(owner);
}

void *luo_glue_phys_to_virt(phys_addr_t phys)
{
	return phys_to_virt(phys);
}

phys_addr_t luo_glue_virt_to_phys(void *virt)
{
	return virt_to_phys(virt);
}

/*
 * The page the previous kernel allocated with kho_alloc_preserve(PAGE_SIZE) and that KHO
 * reserved for this kernel: online, and carrying KHO's "preserved, order 0" mark in
 * page->private. That mark is private to kernel/liveupdate/kexec_handover.c (union
 * kho_page_info, KHO_PAGE_MAGIC); kho_restore_page() checks exactly this before it hands a
 * page over, and clears it when it does, so a page that passes is one nobody restored yet.
 * If KHO ever changes the encoding, every address is refused (incoming state rejected with
 * a log line), never trusted.
 */
#define LUO_KHO_PAGE_MAGIC 0x4b484f50U /* kexec_handover.c: KHO_PAGE_MAGIC, "KHOP" */

bool luo_glue_incoming_page(phys_addr_t phys)
{
	union {
		unsigned long page_private;
		struct {
			unsigned int order;
			unsigned int magic;
		};
	} info;
	struct page *page;

	BUILD_BUG_ON(sizeof(info) != sizeof(((struct page *)0)->private));
	if (!phys || offset_in_page(phys))
		return false;
	page = pfn_to_online_page(PHYS_PFN(phys));
	if (!page)
		return false;
	info.page_private = READ_ONCE(page->private);
	return info.magic == LUO_KHO_PAGE_MAGIC && info.order == 0;
}

void luo_glue_test_register(struct liveupdate_file_handler *fh)
{
	liveupdate_test_register(fh);
}

/*
 * get_user() of the ioctl's size word, as the C core reads it: one __get_user_4 (an asm
 * routine with its own calling convention), where the kernel crate's UserSliceReader goes
 * through _copy_from_user.
 */
int luo_glue_get_user_u32(u32 *out, const void __user *uptr)
{
	return get_user(*out, (const u32 __user *)uptr);
}

/*
 * After liveupdate_reboot() serialized the state, the C core keeps its serialize rwsem
 * write-held, so every later LUO operation sleeps until the kexec. Do the same, without
 * counting as a hung task: nothing wakes this task.
 */
void __noreturn luo_glue_block_forever(void)
{
	for (;;)
		schedule_timeout_idle(MAX_SCHEDULE_TIMEOUT);
}

/*
 * Test only: luo_test_corrupt=compat|count|chain|cycle|files makes liveupdate_reboot()
 * damage the outgoing state after it was serialized (testhook.rs), so that the next
 * kernel's handling of bad incoming state can be tested with a real kexec.
 */
static enum luo_test_corrupt luo_test_corrupt __ro_after_init;

#ifdef CONFIG_LIVEUPDATE_TEST
static int __init luo_test_corrupt_param(char *buf)
{
	static const char *const names[] = {
		[LUO_TEST_CORRUPT_COMPAT] = "compat",
		[LUO_TEST_CORRUPT_COUNT] = "count",
		[LUO_TEST_CORRUPT_CHAIN] = "chain",
		[LUO_TEST_CORRUPT_CYCLE] = "cycle",
		[LUO_TEST_CORRUPT_FILES] = "files",
	};
	int i;

	for (i = LUO_TEST_CORRUPT_COMPAT; i < ARRAY_SIZE(names); i++) {
		if (buf && !strcmp(buf, names[i])) {
			luo_test_corrupt = i;
			return 0;
		}
	}
	return -EINVAL;
}
early_param("luo_test_corrupt", luo_test_corrupt_param);
#endif

enum luo_test_corrupt luo_glue_test_corrupt_mode(void)
{
	return luo_test_corrupt;
}

/* An ordinary (not preserved) zeroed page, leaked: the machine is about to kexec. */
phys_addr_t luo_glue_test_unpreserved_page(void)
{
	struct page *page = alloc_page(GFP_KERNEL | __GFP_ZERO);

	return page ? page_to_phys(page) : 0;
}
