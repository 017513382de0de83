/* exec_tp.bpf.c: PRIMA on tracepoints (the `tracepoint` backend).
 *
 * For kernels that refuse BPF LSM. A violation by a labelled (TP) process is
 * stopped with bpf_send_signal(SIGKILL) in enforce mode: the signal is taken
 * on the way back to user space, so
 *   - sched_process_exec (raw): the new image never runs an instruction;
 *   - sys_enter_mmap/mprotect/pkey_mprotect/shmat: the mapping syscall itself may
 *     still complete, but the process dies before it can use the mapping.
 * Labels live in cwl_task_labels (tgid -> label): copied to a new process on
 * sched_process_fork (raw: it carries the child task), removed when the last
 * thread exits (sched_process_exit).
 * The decisions are prima_decide.h's; only the hooks and map accesses are here.
 */
#include "prima_decide.h"

static __always_inline u32 cwl_live_gen(void)
{
	u32 zero = 0, *g = cwl_gen.lookup(&zero);
	return g ? (*g & 1) : 0;
}

static __always_inline const struct cwl_label_conf *cwl_label_conf_of(u32 gen, u32 label)
{
	if (!label)
		return 0;
	return gen ? cwl_labels1.lookup(&label) : cwl_labels0.lookup(&label);
}

static __always_inline const struct cwl_trust *cwl_trust_of(u32 gen, const struct cwl_inode_key *key)
{
	return gen ? cwl_trust1.lookup((void *)key) : cwl_trust0.lookup((void *)key);
}

static __always_inline const struct cwl_entry *cwl_entry_of(u32 gen, const struct cwl_inode_key *key)
{
	return gen ? cwl_entry1.lookup((void *)key) : cwl_entry0.lookup((void *)key);
}

static __always_inline u32 cwl_enforcing(u32 gen)
{
	struct cwl_conf *c = cwl_conf.lookup(&gen);
	return c ? c->enforce : 1; /* fail closed */
}

/* Per-CPU room to build a path (cwl_file_path wants twice the name's size). */
struct cwl_path_buf {
	char buf[2 * CWL_NAME_LEN];
};
BPF_PERCPU_ARRAY(cwl_path_scratch, struct cwl_path_buf, 1);

static __always_inline void cwl_drop(u32 reason)
{
	u64 *n = cwl_drops.lookup(&reason);
	if (n)
		*n += 1;
}

/* Reserve, fill and submit one event; a full ring buffer is counted, never silent. */
static __always_inline void cwl_emit(u32 kind, u32 op, u32 label, u32 prev, u32 action, u32 why,
				     const struct cwl_file_id *id, const struct cwl_trust *t,
				     const void *file, const char *path)
{
	struct cwl_event *e = cwl_events.ringbuf_reserve(sizeof(struct cwl_event));
	if (!e) {
		cwl_drop(CWL_DROP_RINGBUF);
		return;
	}
	cwl_fill_event(e, kind, op, label, prev, action, why, id, t);
	u32 zero = 0;
	struct cwl_path_buf *pb;
	if (path)
		bpf_probe_read_kernel_str(e->name, sizeof(e->name), path);
	else if (file && (pb = cwl_path_scratch.lookup(&zero))) {
		cwl_file_path(file, pb->buf);
		__builtin_memcpy(e->name, pb->buf, sizeof(e->name));
	}
	cwl_events.ringbuf_submit(e, 0);
}

/* A trusted load: an event only the first time this measurement is seen under this label. */
static __always_inline void cwl_trusted(u32 op, u32 label, const struct cwl_file_id *id,
					const struct cwl_trust *t, const void *file, const char *path)
{
	struct cwl_seen_key key;
	u8 one = 1;

	if (!t)
		return;
	__builtin_memset(&key, 0, sizeof(key));
	key.label = label;
	__builtin_memcpy(key.digest, t->digest, sizeof(key.digest));
	if (cwl_seen.lookup(&key))
		return;
	if (cwl_seen.update(&key, &one))
		cwl_drop(CWL_DROP_SEEN);
	cwl_emit(CWL_EV_TRUSTED_LOAD, op, label, label, CWL_ACT_ALLOWED, CWL_WHY_NONE, id, t, file, path);
}

/* A violation: always an event; in enforce mode the process is killed. */
static __always_inline void cwl_violation(u32 gen, u32 op, u32 label, u32 why, const struct cwl_file_id *id,
					  const void *file, const char *path)
{
	u32 action = CWL_ACT_ALLOWED;
	if (cwl_enforcing(gen)) {
		bpf_send_signal(CWL_SIGKILL);
		action = CWL_ACT_KILLED;
	}
	cwl_emit(CWL_EV_VIOLATION, op, label, label, action, why, id, 0, file, path);
}

/* Judge a code file loaded by a process under `label`: 1 trusted, 0 violation. */
static __always_inline int cwl_check_file(u32 gen, u32 op, u32 label, const void *file)
{
	struct cwl_file_id id;
	struct cwl_inode_key key;
	const struct cwl_trust *t = 0;
	u32 why;

	if (cwl_file_identity(file, &id) == 0) {
		cwl_inode_key_of(&id, &key);
		t = cwl_trust_of(gen, &key);
		why = cwl_judge(&id, t, cwl_set_bit(cwl_label_conf_of(gen, label)));
	} else {
		why = CWL_WHY_NO_FILE;
	}
	if (why == CWL_WHY_NONE) {
		cwl_trusted(op, label, &id, t, file, 0);
		return 1;
	}
	cwl_violation(gen, op, label, why, &id, file, 0);
	return 0;
}

/* The ELF interpreter the kernel mapped for the new image (it is not mapped by
 * a syscall, so sys_enter_mmap never sees it): found at AT_BASE. */
static __always_inline void cwl_check_interp(u32 gen, u32 label)
{
	const void *file = 0;
	u64 base = 0, end = 0;

	if (cwl_interp_base(&base)) {
		cwl_violation(gen, CWL_OP_INTERP, label, CWL_WHY_NO_FILE, 0, 0, 0);
		return;
	}
	if (!base)
		return; /* static image */
	if (cwl_file_at(base, &file, &end) != 1 || !file) {
		cwl_violation(gen, CWL_OP_INTERP, label, CWL_WHY_NO_FILE, 0, 0, 0);
		return;
	}
	cwl_check_file(gen, CWL_OP_INTERP, label, file);
}

static __always_inline u32 cwl_current_label(void)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct cwl_task_label *tl = cwl_task_labels.lookup(&tgid);
	return tl ? tl->label : 0;
}

/* sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm) */
RAW_TRACEPOINT_PROBE(sched_process_exec)
{
	const void *bprm = (const void *)ctx->args[2];
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct cwl_task_label *tl = cwl_task_labels.lookup(&tgid);
	u32 cur = tl ? tl->label : 0;
	u32 gen = cwl_live_gen();
	const void *exe = cwl_current_exe_file();
	const char *path = 0;
	struct cwl_file_id id;
	struct cwl_inode_key key;
	const struct cwl_trust *t = 0;
	const struct cwl_entry *entry = 0;
	struct cwl_exec_decision d;

	if (cwl_file_identity(exe, &id) != 0) {
		if (cur) {
			CWL_READ(path, bprm, CWL_OFF_LINUX_BINPRM_FILENAME);
			cwl_violation(gen, CWL_OP_EXEC, cur, CWL_WHY_NO_FILE, &id, exe, path);
		}
		return 0;
	}
	cwl_inode_key_of(&id, &key);
	entry = cwl_entry_of(gen, &key);
	if (!entry && !cur)
		return 0; /* the hot path: an unlabelled process exec'd a non-entrypoint */
	CWL_READ(path, bprm, CWL_OFF_LINUX_BINPRM_FILENAME);
	t = cwl_trust_of(gen, &key);
	cwl_decide_exec(cur, cwl_label_conf_of(gen, cur), entry, cwl_label_conf_of(gen, entry ? entry->label : 0),
			&id, t, &d);

	switch (d.outcome) {
	case CWL_EXEC_ENTER: {
		struct cwl_task_label nl = {.label = d.label};
		if (cwl_task_labels.update(&tgid, &nl)) {
			/* Cannot hold the label: the process must not run as if it were a TP. */
			cwl_drop(CWL_DROP_LABEL);
			cwl_violation(gen, CWL_OP_ENTRYPOINT, d.label, CWL_WHY_NONE, &id, exe, path);
			return 0;
		}
		if (cur != d.label)
			cwl_emit(CWL_EV_LABEL_TRANSITION, CWL_OP_EXEC, d.label, cur, CWL_ACT_ALLOWED, CWL_WHY_NONE, &id, t, exe, path);
		cwl_trusted(CWL_OP_EXEC, d.label, &id, t, exe, path);
		cwl_check_interp(gen, d.label);
		return 0;
	}
	case CWL_EXEC_BAD_ENTRY:
		/* Unlabelled caller: nothing to kill, but the modified entrypoint is worth a record. */
		cwl_emit(CWL_EV_VIOLATION, CWL_OP_ENTRYPOINT, entry->label, 0, CWL_ACT_ALLOWED, d.why, &id, 0, exe, path);
		return 0;
	case CWL_EXEC_DROP:
		cwl_task_labels.delete(&tgid);
		cwl_emit(CWL_EV_LABEL_TRANSITION, CWL_OP_DROP, 0, cur, CWL_ACT_ALLOWED, CWL_WHY_NONE, &id, 0, exe, path);
		return 0;
	default:
		break;
	}
	if (d.why == CWL_WHY_NONE) {
		cwl_trusted(CWL_OP_EXEC, cur, &id, t, exe, path);
		cwl_check_interp(gen, cur);
	} else {
		cwl_violation(gen, CWL_OP_EXEC, cur, d.why, &id, exe, path);
	}
	return 0;
}

/* sched_process_fork(struct task_struct *parent, struct task_struct *child): a new process inherits. */
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
	const void *child = (const void *)ctx->args[1];
	u32 tgid = bpf_get_current_pid_tgid() >> 32, child_tgid = 0;
	struct cwl_task_label *tl = cwl_task_labels.lookup(&tgid);

	if (!tl)
		return 0;
	CWL_READ(child_tgid, child, CWL_OFF_TASK_STRUCT_TGID);
	if (!child_tgid || child_tgid == tgid)
		return 0; /* a thread: shares the process's entry */
	struct cwl_task_label nl = {.label = tl->label};
	if (cwl_task_labels.update(&child_tgid, &nl)) {
		/* The child would run unlabelled: fail closed by killing the parent (the fork's caller). */
		cwl_drop(CWL_DROP_LABEL);
		cwl_violation(cwl_live_gen(), CWL_OP_EXEC, tl->label, CWL_WHY_NONE, 0, 0, 0);
	}
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (cwl_group_dead())
		cwl_task_labels.delete(&tgid);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
	if (!(cwl_effective_prot(args->prot) & CWL_PROT_EXEC))
		return 0;
	u32 label = cwl_current_label();
	if (!label)
		return 0;
	u32 gen = cwl_live_gen();
	if (args->flags & CWL_MAP_ANONYMOUS) {
		u32 why = cwl_decide_anon(cwl_label_conf_of(gen, label));
		if (why != CWL_WHY_NONE)
			cwl_violation(gen, CWL_OP_ANON_EXEC, label, why, 0, 0, 0);
		return 0;
	}
	cwl_check_file(gen, CWL_OP_MMAP, label, cwl_fd_file((s64)(int)args->fd));
	return 0;
}

/* shmat(SHM_EXEC): System V shared memory mapped executable is anonymous memory to PRIMA. */
#define CWL_SHM_EXEC 0100000
TRACEPOINT_PROBE(syscalls, sys_enter_shmat)
{
	if (!(args->shmflg & CWL_SHM_EXEC))
		return 0;
	u32 label = cwl_current_label();
	if (!label)
		return 0;
	u32 gen = cwl_live_gen();
	u32 why = cwl_decide_anon(cwl_label_conf_of(gen, label));
	if (why != CWL_WHY_NONE)
		cwl_violation(gen, CWL_OP_ANON_EXEC, label, why, 0, 0, 0);
	return 0;
}

/* mprotect adding PROT_EXEC: every mapping in [start, start+len) is judged,
 * found by walking the maple tree (cwl_vma_at): a file mapping as a load of
 * that file, an anonymous one by the label's anon-exec rule. A range over more
 * than CWL_MPROTECT_VMAS mappings, or a walk that cannot tell, is a violation. */
#define CWL_MPROTECT_VMAS 8
static __always_inline int cwl_on_mprotect(u64 start, u64 len, unsigned long prot)
{
	if (!(cwl_effective_prot(prot) & CWL_PROT_EXEC))
		return 0;
	u32 label = cwl_current_label();
	if (!label)
		return 0;
	u32 gen = cwl_live_gen();
	u64 addr = start, stop = start + len;
	for (int i = 0; i < CWL_MPROTECT_VMAS; i++) {
		const void *file = 0;
		u64 end = 0;
		int found = cwl_file_at(addr, &file, &end);
		if (found == 0)
			return 0; /* a hole: mprotect fails with ENOMEM before changing anything */
		if (found < 0) {
			cwl_violation(gen, CWL_OP_MPROTECT, label, CWL_WHY_NO_FILE, 0, 0, 0);
			return 0;
		}
		if (file) {
			if (!cwl_check_file(gen, CWL_OP_MPROTECT, label, file))
				return 0;
		} else if (cwl_decide_anon(cwl_label_conf_of(gen, label)) != CWL_WHY_NONE) {
			cwl_violation(gen, CWL_OP_MPROTECT, label, CWL_WHY_ANON, 0, 0, 0);
			return 0;
		}
		if (end >= stop || end <= addr)
			return 0;
		addr = end;
	}
	cwl_violation(gen, CWL_OP_MPROTECT, label, CWL_WHY_NO_FILE, 0, 0, 0);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_mprotect)
{
	return cwl_on_mprotect(args->start, args->len, args->prot);
}

TRACEPOINT_PROBE(syscalls, sys_enter_pkey_mprotect)
{
	return cwl_on_mprotect(args->start, args->len, args->prot);
}
