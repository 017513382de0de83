/* cwlite.h: the kernel <-> Python contract shared by every cwlite BPF program.
 *
 * Kernel struct offsets never come from kernel headers: ebpf.loader passes
 * each one as -DCWL_OFF_<STRUCT>_<FIELD>=<bytes> (and CWL_SZ_... its size),
 * resolved from the running kernel's BTF by cext. Event layouts and map
 * key/value types are declared here once: fixed-width types, explicit padding,
 * no `packed`, flat (scalars and fixed arrays).
 */
#ifndef CWLITE_H
#define CWLITE_H

#ifndef CWL_OFF_FILE_F_INODE
#error "CWL_OFF_FILE_F_INODE missing: offsets come from cext (BTF) through ebpf.loader"
#endif
#ifndef CWL_OFF_INODE_I_INO
#error "CWL_OFF_INODE_I_INO missing: offsets come from cext (BTF) through ebpf.loader"
#endif
#ifndef CWL_OFF_TASK_STRUCT_MM
#error "CWL_OFF_TASK_STRUCT_MM missing: offsets come from cext (BTF) through ebpf.loader"
#endif

/* Read a kernel field of `base` at a BTF offset into `dst` (sizeof dst bytes).
 * Evaluates to 0 on success, a negative errno on fault. */
#define CWL_READ(dst, base, off) \
	bpf_probe_read_kernel(&(dst), sizeof(dst), (const void *)((const char *)(base) + (off)))

/* Read a field whose width differs between kernels (CWL_SZ_* from BTF) into a u64. */
static __always_inline u64 cwl_read_uint(const void *base, u32 off, u32 size)
{
	u64 v = 0;
	if (size == 8)
		bpf_probe_read_kernel(&v, 8, (const char *)base + off);
	else if (size == 4) {
		u32 w = 0;
		bpf_probe_read_kernel(&w, 4, (const char *)base + off);
		v = w;
	}
	return v;
}

/* A file's identity as the measurement DB's kernel view keys it: the device
 * as the kernel encodes it (super_block.s_dev: MAJOR<<20|MINOR), the inode
 * number, and the change cookie (ctime in ns; a write after measurement
 * changes it, so the file is no longer trusted until measured again). */
struct cwl_file_id {
	u32 dev;
	u32 _pad;
	u64 ino;
	u64 ctime_ns;
};

/* Fill `id` from a `struct file *`. Returns 0, or -1 when a pointer is NULL. */
static __always_inline int cwl_file_identity(const void *file, struct cwl_file_id *id)
{
	const void *inode = 0, *sb = 0;

	__builtin_memset(id, 0, sizeof(*id));
	if (!file || CWL_READ(inode, file, CWL_OFF_FILE_F_INODE) || !inode)
		return -1;
	if (CWL_READ(sb, inode, CWL_OFF_INODE_I_SB) || !sb)
		return -1;
	CWL_READ(id->dev, sb, CWL_OFF_SUPER_BLOCK_S_DEV);
	CWL_READ(id->ino, inode, CWL_OFF_INODE_I_INO);
	/* Kernels with multigrain timestamps (6.13+) keep I_CTIME_QUERIED in
	 * bit 31 of i_ctime_nsec; a real nsec value is < 2^30 on every kernel. */
	id->ctime_ns = cwl_read_uint(inode, CWL_OFF_INODE_I_CTIME_SEC, CWL_SZ_INODE_I_CTIME_SEC) * 1000000000ULL +
		       (cwl_read_uint(inode, CWL_OFF_INODE_I_CTIME_NSEC, CWL_SZ_INODE_I_CTIME_NSEC) & 0x3fffffffULL);
	return 0;
}

/* The running task's executable file (task->mm->exe_file), or NULL for kernel threads. */
static __always_inline const void *cwl_current_exe_file(void)
{
	const void *task = (const void *)bpf_get_current_task();
	const void *mm = 0, *exe = 0;

	if (CWL_READ(mm, task, CWL_OFF_TASK_STRUCT_MM) || !mm)
		return 0;
	CWL_READ(exe, mm, CWL_OFF_MM_STRUCT_EXE_FILE);
	return exe;
}

#endif /* CWLITE_H */
