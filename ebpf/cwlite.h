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
 * number, and the change cookie (ctime in ns: a write(2) after measurement
 * changes it). The cookie alone is not enough: a write through a shared
 * mapping need not change it (tmpfs never, ext4/btrfs not for a page already
 * dirty), so the trust check also wants `writers` (i_writecount > 0: the file
 * is open for write, which every shared writable mapping of it holds) and the
 * taint record (prima_decide.h), and for an overlayfs inode the same of its
 * layer inode (`layer`, what is really mapped). */
struct cwl_file_id {
	u32 dev;
	u32 writers; /* 1: open for write (or mapped shared-writable) now */
	u64 ino;
	u64 ctime_ns;
	u64 layer;     /* overlayfs: the real inode (a kernel pointer) the overlay inode shows; else 0 */
	u64 taint_ns;  /* filled from the taint map by exec.bpf.c: when a write was last enabled */
	u32 layer_why; /* filled by exec.bpf.c: the layer inode's CWL_WHY_* (0: trusted or no layer) */
	u32 _pad;
};

#define CWL_OVERLAYFS_SUPER_MAGIC 0x794c7630 /* uapi linux/magic.h */

/* An inode's device and number (what the maps are keyed by) and its super block: alone, what
 * an exec needs to know it loads no entrypoint. Returns 0, or -1 when a pointer is NULL. */
static __always_inline int cwl_inode_dev_ino(const void *inode, const void **sb, u32 *dev, u64 *ino)
{
	if (!inode || CWL_READ(*sb, inode, CWL_OFF_INODE_I_SB) || !*sb)
		return -1;
	CWL_READ(*dev, *sb, CWL_OFF_SUPER_BLOCK_S_DEV);
	CWL_READ(*ino, inode, CWL_OFF_INODE_I_INO);
	return 0;
}

/* Fill `id` from an inode. Returns 0, or -1 when a pointer is NULL. */
static __always_inline int cwl_inode_identity(const void *inode, struct cwl_file_id *id)
{
	const void *sb = 0;
	unsigned long magic = 0;
	int writecount = 0;

	__builtin_memset(id, 0, sizeof(*id));
	if (cwl_inode_dev_ino(inode, &sb, &id->dev, &id->ino))
		return -1;
	/* Kernels with multigrain timestamps (6.13+) keep I_CTIME_QUERIED in
	 * bit 31 of i_ctime_nsec; a real nsec value is < 2^30 on every kernel. */
	id->ctime_ns = cwl_read_uint(inode, CWL_OFF_INODE_I_CTIME_SEC, CWL_SZ_INODE_I_CTIME_SEC) * 1000000000ULL +
		       (cwl_read_uint(inode, CWL_OFF_INODE_I_CTIME_NSEC, CWL_SZ_INODE_I_CTIME_NSEC) & 0x3fffffffULL);
	/* i_writecount: > 0 open for write (get_write_access); < 0 write-denied (an
	 * executing image, deny_write_access); 0 neither. Fail closed if unreadable. */
	if (CWL_READ(writecount, inode, CWL_OFF_INODE_I_WRITECOUNT) || writecount > 0)
		id->writers = 1;
	/* overlayfs keys its inodes by the real inode (ovl_get_inode -> iget5_locked ->
	 * ovl_inode_set: i_private = the upper inode, or the lower one when there is no
	 * upper), and maps that real file's pages (ovl_mmap swaps vm_file). */
	CWL_READ(magic, sb, CWL_OFF_SUPER_BLOCK_S_MAGIC);
	if (magic == CWL_OVERLAYFS_SUPER_MAGIC)
		CWL_READ(id->layer, inode, CWL_OFF_INODE_I_PRIVATE);
	return 0;
}

/* A `struct file *`'s inode, or NULL. */
static __always_inline const void *cwl_file_inode(const void *file)
{
	const void *inode = 0;

	if (file)
		CWL_READ(inode, file, CWL_OFF_FILE_F_INODE);
	return inode;
}

/* Fill `id` from a `struct file *`. Returns 0, or -1 when a pointer is NULL. */
static __always_inline int cwl_file_identity(const void *file, struct cwl_file_id *id)
{
	return cwl_inode_identity(cwl_file_inode(file), id);
}

/* Kernel-internal file mode bit (include/linux/fs.h: FMODE_WRITE), unchanged since 2.6. */
#define CWL_FMODE_WRITE 0x2

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

/* The file open as descriptor `fd` in the current task (task->files->fdt->fd[fd]), or NULL. */
static __always_inline const void *cwl_fd_file(s64 fd)
{
	const void *task = (const void *)bpf_get_current_task();
	const void *files = 0, *fdt = 0, *fds = 0, *file = 0;
	u32 max_fds = 0;

	if (fd < 0 || CWL_READ(files, task, CWL_OFF_TASK_STRUCT_FILES) || !files)
		return 0;
	if (CWL_READ(fdt, files, CWL_OFF_FILES_STRUCT_FDT) || !fdt)
		return 0;
	if (CWL_READ(max_fds, fdt, CWL_OFF_FDTABLE_MAX_FDS) || fd >= max_fds)
		return 0;
	if (CWL_READ(fds, fdt, CWL_OFF_FDTABLE_FD) || !fds)
		return 0;
	bpf_probe_read_kernel(&file, sizeof(file), (const char *)fds + fd * sizeof(void *));
	return file;
}

/* The protection a mapping really gets: with personality READ_IMPLIES_EXEC
 * (uapi linux/personality.h), the kernel adds PROT_EXEC to any PROT_READ
 * mmap/mprotect (mm/mmap.c, mm/mprotect.c), so a hook must judge it as exec. */
#define CWL_READ_IMPLIES_EXEC 0x0400000
#define CWL_PROT_READ 0x1
#define CWL_PROT_EXEC 0x4
static __always_inline u64 cwl_effective_prot(u64 prot)
{
	const void *task = (const void *)bpf_get_current_task();
	u32 persona = 0;

	if ((prot & CWL_PROT_READ) && !(prot & CWL_PROT_EXEC) &&
	    CWL_READ(persona, task, CWL_OFF_TASK_STRUCT_PERSONALITY) == 0 && (persona & CWL_READ_IMPLIES_EXEC))
		prot |= CWL_PROT_EXEC;
	return prot;
}

/* 1 when the current thread is the last live one of its process (sched_process_exit). */
static __always_inline int cwl_group_dead(void)
{
	const void *task = (const void *)bpf_get_current_task();
	const void *sig = 0;
	int live = 1;

	if (CWL_READ(sig, task, CWL_OFF_TASK_STRUCT_SIGNAL) || !sig)
		return 0;
	CWL_READ(live, sig, CWL_OFF_SIGNAL_STRUCT_LIVE);
	return live == 0;
}

/* The VMA of `mm` that contains `addr`, found by walking mm->mm_mt (the maple
 * tree, kernel 6.1+) with probe reads: what bpf_find_vma does, for programs
 * that cannot pass it a callback (bcc). Node encoding (lib/maple_tree.c):
 * low 8 bits of a node pointer hold flags (the root: 0x2, like an xarray
 * node; a child: 0x4), bits 3..6 its type; leaves and
 * range nodes have 16 slots / 15 pivots, allocation-range nodes 10 / 9 (the
 * counts come from BTF sizes). The last used pivot may be 0 = the node's max.
 * Returns 1 (found, *vma set), 0 (nothing mapped at addr), -1 (cannot tell). */
#define CWL_MT_NODE_MASK 255UL
#define CWL_MT_TYPE(e) (((e) >> 3) & 0x0F)
#define CWL_MT_LEAF_64 1
#define CWL_MT_RANGE_64 2
#define CWL_MT_ARANGE_64 3
#define CWL_MT_MAX_DEPTH 8
#define CWL_MT_MAX_PIVOTS 15

static __always_inline int cwl_vma_at(const void *mm, u64 addr, const void **vma_out)
{
	u64 entry = 0, child = 0, lo = 0, hi = 0;

	*vma_out = 0;
	if (!mm || CWL_READ(entry, mm, CWL_OFF_MM_STRUCT_MM_MT_MA_ROOT))
		return -1;
	for (int depth = 0; depth < CWL_MT_MAX_DEPTH; depth++) {
		if (!entry)
			return 0;
		if (depth == 0 && ((entry & 3) != 2 || entry < 4096))
			return 0; /* the root is a single entry, not a node: it covers index 0 only */
		if (entry < 4096)
			return -1;
		u32 type = CWL_MT_TYPE(entry), poff, soff, npivots;
		const char *node = (const char *)(entry & ~CWL_MT_NODE_MASK);
		if (type == CWL_MT_LEAF_64 || type == CWL_MT_RANGE_64) {
			poff = CWL_OFF_MAPLE_RANGE_64_PIVOT;
			soff = CWL_OFF_MAPLE_RANGE_64_SLOT;
			npivots = CWL_SZ_MAPLE_RANGE_64_PIVOT / 8;
		} else if (type == CWL_MT_ARANGE_64) {
			poff = CWL_OFF_MAPLE_ARANGE_64_PIVOT;
			soff = CWL_OFF_MAPLE_ARANGE_64_SLOT;
			npivots = CWL_SZ_MAPLE_ARANGE_64_PIVOT / 8;
		} else {
			return -1;
		}
		u32 chosen = npivots; /* the last slot: pivot = node max */
		for (u32 i = 0; i < CWL_MT_MAX_PIVOTS; i++) {
			u64 pivot = 0;
			if (i >= npivots)
				break;
			if (bpf_probe_read_kernel(&pivot, sizeof(pivot), node + poff + i * 8))
				return -1;
			if (addr <= pivot || (pivot == 0 && i > 0)) {
				chosen = i;
				break;
			}
		}
		if (chosen > CWL_MT_MAX_PIVOTS || bpf_probe_read_kernel(&child, sizeof(child), node + soff + chosen * 8))
			return -1;
		if (type != CWL_MT_LEAF_64) {
			entry = child;
			continue;
		}
		if (!child || (child & 3) || child < 4096)
			return 0; /* a gap (or a reserved marker): nothing mapped */
		if (CWL_READ(lo, (const void *)child, CWL_OFF_VM_AREA_STRUCT_VM_START) ||
		    CWL_READ(hi, (const void *)child, CWL_OFF_VM_AREA_STRUCT_VM_END) || addr < lo || addr >= hi)
			return -1; /* changed under us */
		*vma_out = (const void *)child;
		return 1;
	}
	return -1;
}

/* What a mapping of the current task holds: its file (NULL = anonymous), whether
 * pages of it were copied on write (anon_vma: the task wrote to a private file
 * mapping, so what it runs there is no longer the file's bytes), its end, its vm_flags. */
struct cwl_vma_view {
	const void *file;
	const void *anon_vma;
	u64 end;
	u64 flags;
};

/* The mapping at `addr` in the current task: 1 (*v filled), 0 unmapped, -1 cannot tell. */
static __always_inline int cwl_vma_view_at(u64 addr, struct cwl_vma_view *v)
{
	const void *task = (const void *)bpf_get_current_task();
	const void *mm = 0, *vma = 0;
	int found;

	__builtin_memset(v, 0, sizeof(*v));
	if (CWL_READ(mm, task, CWL_OFF_TASK_STRUCT_MM) || !mm)
		return -1;
	found = cwl_vma_at(mm, addr, &vma);
	if (found != 1)
		return found;
	if (CWL_READ(v->file, vma, CWL_OFF_VM_AREA_STRUCT_VM_FILE) ||
	    CWL_READ(v->anon_vma, vma, CWL_OFF_VM_AREA_STRUCT_ANON_VMA) ||
	    CWL_READ(v->end, vma, CWL_OFF_VM_AREA_STRUCT_VM_END))
		return -1;
	v->flags = cwl_read_uint(vma, CWL_OFF_VM_AREA_STRUCT_VM_FLAGS, CWL_SZ_VM_AREA_STRUCT_VM_FLAGS);
	return 1;
}

/* Is the current task's stack executable (PT_GNU_STACK with PF_X, or no PT_GNU_STACK on an
 * arch whose default is an executable stack)? 1 yes, 0 no, -1 cannot tell. The stack is the
 * mapping holding mm->arg_start (the argument strings): set by setup_arg_pages, before the
 * kernel maps the image's segments, so it is right both in mmap_file during an exec and at
 * sched_process_exec. */
#define CWL_VM_EXEC 0x4
static __always_inline int cwl_stack_exec(void)
{
	const void *task = (const void *)bpf_get_current_task();
	const void *mm = 0;
	u64 arg_start = 0;
	struct cwl_vma_view v;

	if (CWL_READ(mm, task, CWL_OFF_TASK_STRUCT_MM) || !mm || CWL_READ(arg_start, mm, CWL_OFF_MM_STRUCT_ARG_START))
		return -1;
	if (cwl_vma_view_at(arg_start, &v) != 1)
		return -1;
	return (v.flags & CWL_VM_EXEC) ? 1 : 0;
}

/* Is `task` being ptraced (task->ptrace != 0)? */
static __always_inline int cwl_task_traced(const void *task)
{
	u32 ptrace = 0;
	return task && CWL_READ(ptrace, task, CWL_OFF_TASK_STRUCT_PTRACE) == 0 && ptrace != 0;
}

/* Is `file` a /proc/<pid>/mem (or task/<tid>/mem) file open for writing? Identified by its
 * file_operations' open (fs/proc/base.c mem_open, whose address prima.engine reads from
 * /proc/kallsyms and passes as CWL_PROC_MEM_OPEN), never by a path. When it is, *tgid is the
 * process whose memory it writes (the inode's proc_inode.pid -> its task -> tgid). */
#ifndef CWL_PROC_MEM_OPEN
#error "CWL_PROC_MEM_OPEN missing: the address of mem_open comes from /proc/kallsyms through prima.engine"
#endif
static __always_inline int cwl_proc_mem_write(const void *file, u32 *tgid)
{
	const void *fop = 0, *open = 0, *inode = 0, *pid = 0, *first = 0;
	u32 mode = 0;

	*tgid = 0;
	if (!file || CWL_READ(fop, file, CWL_OFF_FILE_F_OP) || !fop || CWL_READ(open, fop, CWL_OFF_FILE_OPERATIONS_OPEN))
		return 0;
	if ((u64)open != (u64)CWL_PROC_MEM_OPEN)
		return 0;
	if (CWL_READ(mode, file, CWL_OFF_FILE_F_MODE) || !(mode & CWL_FMODE_WRITE))
		return 0;
	/* container_of(inode, struct proc_inode, vfs_inode)->pid->tasks[PIDTYPE_PID].first */
	if (CWL_READ(inode, file, CWL_OFF_FILE_F_INODE) || !inode ||
	    CWL_READ(pid, (const char *)inode - CWL_OFF_PROC_INODE_VFS_INODE, CWL_OFF_PROC_INODE_PID) || !pid ||
	    CWL_READ(first, pid, CWL_OFF_PID_TASKS) || !first)
		return 1; /* a mem file whose process is gone: nothing to write, still an attempt */
	CWL_READ(*tgid, (const char *)first - CWL_OFF_TASK_STRUCT_PID_LINKS, CWL_OFF_TASK_STRUCT_TGID);
	return 1;
}

/* AT_BASE of the current image (where the kernel mapped its ELF interpreter) into *base
 * (0: no interpreter, a static binary). Returns 0, or -1 when saved_auxv cannot be read. */
#define CWL_AT_NULL 0
#define CWL_AT_BASE 7
#define CWL_AUXV_PAIRS 32
static __always_inline int cwl_interp_base(u64 *base)
{
	const void *task = (const void *)bpf_get_current_task();
	const char *mm = 0;

	*base = 0;
	if (CWL_READ(mm, task, CWL_OFF_TASK_STRUCT_MM) || !mm)
		return -1;
	for (u32 i = 0; i < CWL_AUXV_PAIRS; i++) {
		u64 kv[2] = {0, 0};
		if ((i * 2 + 2) * 8 > CWL_SZ_MM_STRUCT_SAVED_AUXV)
			break;
		if (bpf_probe_read_kernel(kv, sizeof(kv), mm + CWL_OFF_MM_STRUCT_SAVED_AUXV + i * 16))
			return -1;
		if (kv[0] == CWL_AT_NULL)
			break;
		if (kv[0] == CWL_AT_BASE) {
			*base = kv[1];
			break;
		}
	}
	return 0;
}

/* ---- PRIMA: maps and events shared by both backends of exec.bpf.c ----
 * Python views: prima/engine.py (checked against bcc's Key/Leaf by a layout test).
 * Label ids are small integers the engine assigns (0 = unlabelled); a label's
 * trust set is one bit of a 64-bit mask (bit i = Policy.trust_sets()[i]). */

/* Key of the trust and entrypoint maps: a file without its change cookie. */
struct cwl_inode_key {
	u32 dev;
	u32 _pad;
	u64 ino;
};

/* A trusted file (MeasureDB.kernel_view entry): trusted only while its ctime
 * still equals the one measured, nothing has it open for write, no write was
 * enabled on it since `measured_ns` (the taint map), and only for the labels
 * whose bit is set. */
struct cwl_trust {
	u64 ctime_ns;
	u64 sets_mask;
	u8 digest[32]; /* SHA-256 of the content: the event's measurement */
	u64 measured_ns; /* CLOCK_MONOTONIC (bpf_ktime_get_ns) before the content was read */
};

/* Per label: its trust-set bit and what the policy says about exec, JIT memory,
 * the labels it may enter, and the syscall ABIs the tracepoint backend cannot mediate. */
struct cwl_label_conf {
	u64 set_bit;       /* 1 << index of the label's trust set; 0 = trusts nothing */
	u64 enter_mask;    /* bit i: may enter label id i by exec of its entrypoint (transitions) */
	u8 on_exec_drop;   /* 1: exec of a non-entrypoint image leaves the label */
	u8 anon_exec_violation; /* 1: PROT_EXEC anonymous memory is a violation */
	u8 compat_allow;   /* 1: 32-bit syscalls (int 0x80) are allowed (tracepoint backend) */
	u8 io_uring_allow; /* 1: io_uring_setup is allowed (tracepoint backend) */
	u8 _pad[4];
};

/* Entrypoint map value: exec'ing this inode (if trusted for `label`) enters `label`. */
struct cwl_entry {
	u32 label;
	u32 _pad;
};

/* Engine-wide settings, one per generation (index = generation). */
struct cwl_conf {
	u32 enforce; /* 1: kill/deny violations; 0: audit (log only) */
	u32 _pad;
};

/* The daemon's reserved label: above every policy label id (prima.engine.LABEL_MAX);
 * selfprotect.h guards it, and neither PRIMA nor Port Authority judges it as a TP. */
#define CWL_LABEL_DAEMON 65535

/* Label of a process (tracepoint backend: keyed by tgid). */
#define CWL_TL_STACK_PENDING 1 /* lsm: the new image's stack is judged at its first mapping */
#define CWL_TL_HELD 2     /* tracepoint: entered a label while the engine was not armed: stopped until it is */
#define CWL_TL_RELEASED 4 /* tracepoint: a held process was continued by someone else than the engine */
struct cwl_task_label {
	u32 label;
	u32 flags; /* CWL_TL_* */
};

/* Tracepoint backend: cwl_arm's indexes (exec.bpf.c, prima.arming). */
#define CWL_ARM_ARMED 0 /* 1: the per-syscall programs are attached (written by the engine only) */
#define CWL_ARM_LIVE 1  /* 1: a label was entered since the engine last found no labelled process */
#define CWL_ARM_CONFINE 2 /* 1: labelled processes must run in a cgroup of cwl_tp_cgroups (Port Authority's) */
#define CWL_TP_CGROUPS_MAX 256 /* TP cgroups (one beside each cgroup a TP was started in) */

/* "First trusted load of this measurement under this label" dedupe key. */
struct cwl_seen_key {
	u32 label;
	u32 _pad;
	u8 digest[32];
};

/* Event kinds: names match controlplane.events.EventKind. */
#define CWL_EV_TRUSTED_LOAD 1
#define CWL_EV_LABEL_TRANSITION 2
#define CWL_EV_VIOLATION 3

/* Operations (Event.op): exec, interp (ELF interpreter), script (the file a
 * #! interpreter runs), mmap, mprotect, anon-exec, entrypoint (an entrypoint
 * whose file is not trusted: no transition), drop (label left on exec). */
#define CWL_OP_EXEC 1
#define CWL_OP_INTERP 2
#define CWL_OP_SCRIPT 3
#define CWL_OP_MMAP 4
#define CWL_OP_MPROTECT 5
#define CWL_OP_ANON_EXEC 6
#define CWL_OP_ENTRYPOINT 7
#define CWL_OP_DROP 8
/* A TP as a subject (its label is Event.label; the other process is the event's peer):
 * ptrace (lsm: ptrace_access_check in attach mode, which also covers /proc/PID/mem and
 * process_vm_writev; tracepoint: attach/seize/traceme), proc-mem (/proc/PID/mem opened for
 * write), vm-write (process_vm_writev), exec-stack (the new image's stack is executable),
 * compat-syscall (a 32-bit syscall), io-uring (io_uring_setup), transition (entering
 * another label). In ptrace/proc-mem/vm-write events the current process is the actor and
 * `peer` the subject; in traceme events the reverse. */
#define CWL_OP_PTRACE 9
#define CWL_OP_PROC_MEM 10
#define CWL_OP_VM_WRITE 11
#define CWL_OP_EXEC_STACK 12
#define CWL_OP_COMPAT_SYSCALL 13
#define CWL_OP_IO_URING 14
#define CWL_OP_TRANSITION 15
/* 16..23: cdi.h's CWL_OP_CDI_* */
#define CWL_OP_TRACEME 24 /* PTRACE_TRACEME: the current process is the subject, its parent the tracer */
#define CWL_OP_RELEASE 27 /* tracepoint: SIGCONT to a process held until the engine armed (the sender is the actor) */

/* What happened to the process. */
#define CWL_ACT_ALLOWED 0 /* trusted, a transition, or audit mode */
#define CWL_ACT_KILLED 1  /* tracepoint backend: SIGKILL before user code runs */
#define CWL_ACT_DENIED 2  /* lsm backend: -EPERM */

/* Why the file was not trusted (violations). */
#define CWL_WHY_NONE 0
#define CWL_WHY_UNKNOWN 1  /* (dev, ino) not in the trust map */
#define CWL_WHY_CHANGED 2  /* ctime differs: written after measurement */
#define CWL_WHY_NOT_IN_SET 3 /* trusted, but not for this label's trust set */
#define CWL_WHY_NO_FILE 4  /* could not read the file's identity (fail closed) */
#define CWL_WHY_ANON 5     /* anonymous executable memory */
#define CWL_WHY_WRITERS 6  /* open for write / mapped shared-writable now: content may differ */
#define CWL_WHY_TAINTED 7  /* opened for write or mapped shared-writable since it was measured */
#define CWL_WHY_LAYER 8    /* overlayfs: the layer file it shows is not the measured one */
#define CWL_WHY_UNDECLARED 9 /* another label's entrypoint, and the policy declares no such transition */
#define CWL_WHY_TRACED 10   /* entering a label while ptraced */
#define CWL_WHY_OUTSIDER 11 /* modified by a process outside its label (ptrace, memory writes) */
#define CWL_WHY_COMPAT 12   /* a 32-bit syscall, which the tracepoint backend cannot mediate */
#define CWL_WHY_IO_URING 13 /* io_uring, whose operations the tracepoint backend cannot mediate */
#define CWL_WHY_UNARMED 14  /* tracepoint: continued before the engine had attached its syscall programs */

/* One ring-buffer record. Fixed layout: 240 bytes. */
#define CWL_NAME_LEN 128
struct cwl_event {
	u32 kind;
	u32 op;
	u32 pid;
	u32 tgid;
	u32 label;      /* the label the decision was made for (new label on a transition) */
	u32 prev_label; /* the label before (transitions, drops) */
	u32 action;
	u32 why;
	u32 dev;
	u32 peer;       /* subject events: the other process's tgid (prev_label: its label) */
	u64 ino;
	u64 ctime_ns;
	u64 ktime_ns;
	u8 digest[32];  /* measurement for trusted loads; zero when unknown */
	char comm[16];
	char name[CWL_NAME_LEN]; /* exec: the path given to execve; else the file's dentry name */
};

/* cwl_drops indexes: every failure to record or track is counted (per CPU). */
#define CWL_DROP_RINGBUF 0 /* ring buffer full: an event was lost */
#define CWL_DROP_LABEL 1   /* label map update failed: a child could not inherit */
#define CWL_DROP_SEEN 2    /* dedupe map full (events are then repeated, not lost) */
#define CWL_DROP_MAX 4


/* The path of `file` within its filesystem (dentry names up to the mount's
 * root) into buf[0..CWL_NAME_LEN), NUL-terminated. When it does not fit (or
 * has more than CWL_PATH_DEPTH components) the leading components give way
 * to "/..." so the file's own name always stays. `buf` must hold
 * 2 * CWL_NAME_LEN bytes: each write starts below CWL_NAME_LEN and is at most
 * CWL_NAME_LEN long, which is what lets the verifier accept the variable offsets. */
#define CWL_PATH_DEPTH 12
static __always_inline void cwl_file_path(const void *file, char *buf)
{
	const char *names[CWL_PATH_DEPTH];
	const void *d = 0;
	u32 n = 0, keep = 0, total = 0, off = 0, cut = 0;

	buf[0] = 0;
	if (!file || CWL_READ(d, file, CWL_OFF_FILE_F_PATH_DENTRY) || !d)
		return;
#pragma unroll
	for (int i = 0; i < CWL_PATH_DEPTH; i++) {
		const void *parent = 0;
		const char *name = 0;
		if (CWL_READ(parent, d, CWL_OFF_DENTRY_D_PARENT) || CWL_READ(name, d, CWL_OFF_DENTRY_D_NAME_NAME))
			break;
		if (!parent || parent == d)
			break; /* the filesystem's root */
		names[i] = name;
		n = i + 1;
		d = parent;
	}
	if (n == CWL_PATH_DEPTH)
		cut = 1; /* maybe deeper: mark the path as shortened */
	/* Pass 1: how many components, from the file upwards, fit with room for "/..." */
#pragma unroll
	for (int i = 0; i < CWL_PATH_DEPTH; i++) {
		if (i >= n)
			break;
		long len = bpf_probe_read_kernel_str(buf + CWL_NAME_LEN, CWL_NAME_LEN, names[i]);
		if (len <= 1)
			break;
		if (total + len + 4 >= CWL_NAME_LEN && i > 0) {
			cut = 1;
			break;
		}
		total += len; /* '/' + name (len counts the NUL) */
		keep = i + 1;
	}
	if (cut && keep < n + 1) {
		buf[0] = '/';
		buf[1] = '.';
		buf[2] = '.';
		buf[3] = '.';
		off = 4;
	}
	/* Pass 2: write the kept components, outermost first. */
#pragma unroll
	for (int i = CWL_PATH_DEPTH - 1; i >= 0; i--) {
		if (i >= keep)
			continue;
		off &= CWL_NAME_LEN - 1;
		buf[off] = '/';
		off = (off + 1) & (CWL_NAME_LEN - 1);
		long len = bpf_probe_read_kernel_str(buf + off, CWL_NAME_LEN, names[i]);
		if (len <= 1)
			break;
		off += len - 1; /* over the NUL, which the next '/' replaces */
		if (off >= CWL_NAME_LEN - 1)
			break;
	}
	buf[CWL_NAME_LEN - 1] = 0;
}

/* ---- Port Authority: the rule set, sockets' labels, counts and events (pa_decide.h, net.bpf.c) ----
 * Python views: portauthority/engine.py (checked against bcc's Key/Leaf by a layout test).
 * Addresses are in network byte order (IPv4: the first 4 bytes), ports in host order. */
#define CWL_PA_RULES 32 /* rules in one rule set */
#define CWL_PA_NETS 8   /* peer networks in one rule */

/* A rule's kind (the policy's `op`). */
#define CWL_PA_RULE_LISTEN 1  /* bind/listen/accept/receive on local `port` */
#define CWL_PA_RULE_CONNECT 2 /* connect/send to a peer's `port`, receive its replies */

/* What was attempted (a count's and an event's op). */
#define CWL_PA_OP_BIND 1
#define CWL_PA_OP_LISTEN 2
#define CWL_PA_OP_ACCEPT 3
#define CWL_PA_OP_CONNECT 4
#define CWL_PA_OP_SEND 5    /* UDP sendmsg to an address */
#define CWL_PA_OP_RECEIVE 6 /* a packet reaching a labelled socket */
#define CWL_PA_OP_PACKET 7  /* tc ingress: a packet to a Port Authority port */
#define CWL_PA_OP_SOCKET 8  /* a labelled process makes a socket no rule can judge (AF_PACKET) */
#define CWL_PA_OP_HOLD 9    /* a labelled process holds a network socket made outside its label */

/* Why it was refused (0: allowed). */
#define CWL_PA_WHY_NONE 0
#define CWL_PA_WHY_NO_RULE 1 /* no rule of this label for this protocol and port */
#define CWL_PA_WHY_PEER 2    /* rules for the port, none for this peer */
#define CWL_PA_WHY_ADDRESS 3 /* a rule for the port, but another local address */
#define CWL_PA_WHY_PROTO 4   /* neither TCP nor UDP (a labelled socket receives only what rules name) */
#define CWL_PA_WHY_FOREIGN 5 /* made outside the label: kept across the exec into it, taken, or received */
#define CWL_PA_WHY_CGROUP 6  /* made outside a TP cgroup, where Port Authority's cgroup programs do not run */

/* IP protocol numbers (uapi linux/in.h) and address families as rules store them. */
#define CWL_PA_TCP 6
#define CWL_PA_UDP 17
#define CWL_PA_INET 4
#define CWL_PA_INET6 6

/* Socket address families (uapi linux/socket.h). */
#define CWL_AF_INET 2
#define CWL_AF_INET6 10
#define CWL_AF_PACKET 17
#define CWL_AF_UNKNOWN 0xffff /* a descriptor Port Authority could not look at: judged as a network socket */

/* A peer network: an address is inside when (address & mask) == addr, word by word
 * (the engine writes the mask of the prefix length: the check stays branch-free). */
struct cwl_pa_net {
	u8 family; /* CWL_PA_INET / CWL_PA_INET6 */
	u8 prefix; /* prefix length in bits (for people; the mask decides) */
	u8 _pad[2];
	u32 addr[4];
	u32 mask[4];
};

struct cwl_pa_rule {
	u64 labels;     /* bit i: label id i (prima.engine's ids) */
	u16 port;
	u8 proto;       /* CWL_PA_TCP / CWL_PA_UDP */
	u8 kind;        /* CWL_PA_RULE_* */
	u8 nnets;       /* peers used; 0 = any peer */
	u8 local_family; /* 0: any local address */
	u8 _pad[2];
	u32 local_addr[4];
	struct cwl_pa_net nets[CWL_PA_NETS];
};

/* One rule set (a map value of its own: the engine writes the idle slot, then flips cwl_pa_gen). */
struct cwl_pa_set {
	u32 nrules;
	u32 enforce;    /* 1: deny/drop; 0: audit (count, allow) */
	struct cwl_pa_rule rules[CWL_PA_RULES];
};

/* What a hook asks the decision. */
struct cwl_pa_query {
	u32 label;
	u8 op;          /* CWL_PA_OP_* */
	u8 proto;
	u8 family;      /* CWL_PA_INET / CWL_PA_INET6 */
	u8 _pad;
	u16 lport;      /* local port */
	u16 rport;      /* remote port */
	u32 laddr[4];
	u32 raddr[4];
};

/* A socket's label (sk storage, cloned to accepted sockets). */
struct cwl_pa_sock {
	u32 label;
	u32 allowed_gen; /* connected socket: rule generation + 1 under which its input was allowed; 0: never */
};

/* Count key: refusals (and audit-mode allowances) per label, rule, op, port and reason. */
struct cwl_pa_count_key {
	u32 label;
	u32 rule;       /* 1-based index of the rule that came closest (0: none) */
	u16 port;       /* the port the rule is about: local for bind/listen/receive/packet, remote for connect/send */
	u8 proto;
	u8 op;
	u8 why;
	u8 action;      /* CWL_ACT_DENIED or CWL_ACT_ALLOWED (audit) */
	u8 _pad[2];
};

/* A listener a rule allowed (ring buffer): logged once per (label, port) by the engine. */
struct cwl_pa_event {
	u32 tgid;
	u32 label;
	u32 rule;
	u16 port;
	u8 proto;
	u8 op;
	char comm[16];
};

/* cwl_pa_drops indexes: what could not be counted or sent is itself counted. */
#define CWL_PA_DROP_COUNT 0   /* count map full: a refusal went uncounted by key */
#define CWL_PA_DROP_RINGBUF 1 /* ring buffer full: a listener event was lost */
#define CWL_PA_DROP_SOCK 2    /* sk storage could not hold a labelled socket's label */
#define CWL_PA_DROP_LABELS 3  /* no label map in cwl_pa_label_src: a process judged unlabelled */
#define CWL_PA_DROP_PENDING 4 /* a syscall's state (execve's label, recvmsg's msghdr) found no room */
#define CWL_PA_DROP_MAX 5

#endif /* CWLITE_H */
