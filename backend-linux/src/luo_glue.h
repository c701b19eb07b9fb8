/* SPDX-License-Identifier: GPL-2.0 */
/*
 * C side of the Rust LUO core (kernel/liveupdate/luo_rust/, CONFIG_LIVEUPDATE_RUST).
 *
 * rust/bindings/bindings_helper.h includes this header when the Rust core is selected, so
 * bindgen sees every declaration below and `#[export]` checks the Rust definitions against
 * them. Two kinds of functions are declared:
 *
 * - luo_rust_*(): implemented in Rust (luo.rs), called by the initcalls in luo_glue.c.
 * - luo_glue_*(): implemented in C (luo_glue.c), called from Rust, for what is a macro or a
 *   static inline function in C (and so has no binding) or is private to another C file.
 */
#ifndef _LUO_RUST_GLUE_H
#define _LUO_RUST_GLUE_H

#include <linux/anon_inodes.h>
#include <linux/compiler.h>
#include <linux/kexec_handover.h>
#include <linux/liveupdate.h>
#include <linux/siphash.h>		/* the session tables' hash (platform/shared.rs) */
#include <linux/types.h>

struct module;

/* Implemented in Rust. */
int luo_rust_early_init(bool requested);
int luo_rust_late_init(void);

/* Implemented in C. */
bool luo_glue_try_module_get(struct module *owner);
void luo_glue_module_put(struct module *owner);
void *luo_glue_phys_to_virt(phys_addr_t phys);
phys_addr_t luo_glue_virt_to_phys(void *virt);
bool luo_glue_incoming_page(phys_addr_t phys);
void luo_glue_test_register(struct liveupdate_file_handler *fh);
void __noreturn luo_glue_block_forever(void);
int luo_glue_get_user_u32(u32 *out, const void __user *uptr);

/* Test only (CONFIG_LIVEUPDATE_TEST): the luo_test_corrupt= parameter, see testhook.rs. */
enum luo_test_corrupt {
	LUO_TEST_CORRUPT_NONE,
	LUO_TEST_CORRUPT_COMPAT,
	LUO_TEST_CORRUPT_COUNT,
	LUO_TEST_CORRUPT_CHAIN,
	LUO_TEST_CORRUPT_CYCLE,
	LUO_TEST_CORRUPT_FILES,
};
enum luo_test_corrupt luo_glue_test_corrupt_mode(void);
phys_addr_t luo_glue_test_unpreserved_page(void);

#endif /* _LUO_RUST_GLUE_H */
