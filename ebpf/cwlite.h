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

#endif /* CWLITE_H */
