/* cdi.h: CDI protection (high-integrity data only TP labels may write), BPF LSM backend.
 *
 * The map holds the inodes of every CDI path and, for a CDI directory, of
 * everything beneath it when the engine loaded (prima/cdi.py walks it). An
 * operation is on a CDI when the inode it touches, or one of its first
 * CWL_CDI_DEPTH ancestor directories, is in the map: so a file created in a
 * CDI directory later is covered through its directory, and a hard link made
 * elsewhere to a CDI file is covered through the inode itself.
 *
 * Map OPERATIONS stay in the main source (bcc rewrites them only there);
 * this header holds layouts, constants and the probe reads. Python reads the
 * CWL_OP_CDI_* and CWL_WHY_CDI_* values from this file (prima/cdi.py).
 */
#ifndef CWL_CDI_H
#define CWL_CDI_H

#include "cwlite.h"

#ifndef CWL_CDI_MAX
#error "CWL_CDI_MAX missing: sizes come from prima.cdi"
#endif
#ifndef CWL_OFF_DENTRY_D_PARENT
#error "CWL_OFF_DENTRY_D_PARENT missing: offsets come from cext (BTF) through ebpf.loader"
#endif

/* Ancestors looked at above the touched dentry (the engine maps every directory
 * below a CDI directory at load, so this only bounds directories made since). */
#define CWL_CDI_DEPTH 8

/* inode.i_mode file type (uapi linux/stat.h). */
#define CWL_S_IFMT 0170000
#define CWL_S_IFDIR 0040000


/* Map value: which labels may write this CDI inode. */
struct cwl_cdi {
	u64 writers; /* bit i: label id i may write (ids < 64; 0 = unlabelled never) */
	u32 index;   /* position of the CDI in the policy's [[cdis]] (for events) */
	u32 is_dir;
};

/* Operations on CDIs (struct cwl_event.op; PRIMA's ops are below 16). */
#define CWL_OP_CDI_OPEN_WRITE 16 /* open for write */
#define CWL_OP_CDI_CREATE 17  /* create, mkdir, mknod, symlink in a CDI directory */
#define CWL_OP_CDI_LINK 18    /* hard link to a CDI, or into a CDI directory */
#define CWL_OP_CDI_UNLINK 19  /* unlink, rmdir */
#define CWL_OP_CDI_RENAME 20  /* rename from, to or over a CDI */
#define CWL_OP_CDI_SETATTR 21 /* truncate, chmod, chown, utimes */

/* Why (struct cwl_event.why; PRIMA's reasons are below 16). */
#define CWL_WHY_CDI_NOT_WRITER 16 /* the task's label is not a writer of this CDI */

/* cwl_drops index (after cwlite.h's CWL_DROP_*): an inode made under a CDI directory did not
 * fit the CDI map; the ancestor walk still covers it up to CWL_CDI_DEPTH levels down. */
#define CWL_DROP_CDI 3
_Static_assert(CWL_DROP_CDI < CWL_DROP_MAX, "cwl_drops too small for CWL_DROP_CDI");

/* Generational, like PRIMA's maps (prima_decide.h): slot = cwl_gen[0]; each generation's map is
 * made, filled and frozen by the engine (d_instantiate still adds to it: programs may). */
BPF_HASH(cwl_cdi_t, struct cwl_inode_key, struct cwl_cdi, CWL_CDI_MAX);
BPF_ARRAY_OF_MAPS(cwl_cdi, "cwl_cdi_t", 2);

/* The map key of an inode: (super_block.s_dev, i_ino), as cwl_file_identity reads them. */
static __always_inline int cwl_inode_key_from_inode(const void *inode, struct cwl_inode_key *key)
{
	const void *sb = 0;

	__builtin_memset(key, 0, sizeof(*key));
	if (!inode || CWL_READ(sb, inode, CWL_OFF_INODE_I_SB) || !sb)
		return -1;
	CWL_READ(key->dev, sb, CWL_OFF_SUPER_BLOCK_S_DEV);
	CWL_READ(key->ino, inode, CWL_OFF_INODE_I_INO);
	return 0;
}

/* 1 when a task under `label` may write a CDI whose record is `c`. */
static __always_inline int cwl_cdi_writer(const struct cwl_cdi *c, u32 label)
{
	return label && label < 64 && (c->writers & (1ULL << label));
}

#endif /* CWL_CDI_H */
