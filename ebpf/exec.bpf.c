/* exec.bpf.c: PRIMA, and under BPF LSM CDI protection: one source, two backends.
 *
 * prima.engine compiles it with exactly one of
 *   -DCWL_BACKEND_LSM  kernels with `bpf` among their active LSMs: a violation
 *                      is denied with -EPERM before it happens;
 *   -DCWL_BACKEND_TP   kernels that refuse BPF LSM: a violation by a labelled
 *                      (TP) process is stopped with bpf_send_signal(SIGKILL),
 *                      taken on the way back to user space, so the new image
 *                      never runs an instruction (sched_process_exec) and a
 *                      process dies before it can use a mapping it made
 *                      (sys_enter_mmap/mprotect/pkey_mprotect/shmat).
 * In audit mode both allow and log. The decisions are prima_decide.h's; this
 * file holds the map accesses (bcc rewrites map operations only in the main
 * source, so they cannot move to a header), what both backends share, once,
 * and each backend's hooks.
 *
 * lsm hooks:
 *   bprm_check_security   every file an exec loads (a #! script, then its
 *                         interpreter): untrusted for the task's label -> deny
 *   bprm_committed_creds  the exec is past its point of no return: enter,
 *                         keep or drop the label (the same decision again; if
 *                         the file changed in between, the task is killed)
 *   mmap_file             PROT_EXEC file mappings (ld.so, dlopen, the ELF
 *                         interpreter, `ld.so /path`); anonymous and private
 *                         writable+executable mappings follow anon_exec
 *   file_mprotect         adding PROT_EXEC: the VMA's file is judged; a file
 *                         mapping with copied-on-write pages (anon_vma) or no
 *                         file follows anon_exec
 *   task_alloc            a new task (process or thread) inherits the label
 *   file_open, inode_*    CDI protection (cdi.h); d_instantiate adds what is
 *                         made under a CDI directory to the CDI map
 *
 *
 * Labels: task-local storage under lsm (nothing to clean up, no pid reuse);
 * under tracepoints cwl_task_labels (tgid -> label), copied on
 * sched_process_fork (raw: it carries the child task) and removed when the last
 * thread exits (sched_process_exit).
 */
#include "prima_decide.h"
#include "selfprotect.h"

#if defined(CWL_BACKEND_LSM) == defined(CWL_BACKEND_TP)
#error "define exactly one of CWL_BACKEND_LSM and CWL_BACKEND_TP (prima.engine does)"
#endif

#define CWL_EPERM 1

/* ---- map plumbing, shared ------------------------------------------------------------ */

static __always_inline u32 cwl_live_gen(void)
{
	u32 zero = 0, *g = cwl_gen.lookup(&zero);
	return g ? (*g & 1) : 0;
}

/* Each generation's maps sit in a slot of an array of maps (prima_decide.h): an empty slot
 * (before the first load) finds nothing. */
static __always_inline const struct cwl_label_conf *cwl_label_conf_of(u32 gen, u32 label)
{
	void *m;
	if (!label || !(m = cwl_labels.lookup(&gen)))
		return 0;
	return bpf_map_lookup_elem(m, &label);
}

static __always_inline const struct cwl_trust *cwl_trust_of(u32 gen, const struct cwl_inode_key *key)
{
	void *m = cwl_trust.lookup(&gen);
	return m ? bpf_map_lookup_elem(m, key) : 0;
}

static __always_inline const struct cwl_entry *cwl_entry_of(u32 gen, const struct cwl_inode_key *key)
{
	void *m = cwl_entry.lookup(&gen);
	return m ? bpf_map_lookup_elem(m, key) : 0;
}

static __always_inline u32 cwl_enforcing(u32 gen)
{
	u32 zero = 0;
	void *m = cwl_conf.lookup(&gen);
	struct cwl_conf *c = m ? bpf_map_lookup_elem(m, &zero) : 0;
	return c ? c->enforce : 1; /* fail closed */
}

static __always_inline const void *cwl_bprm_file(const void *bprm)
{
	const void *file = 0;
	CWL_READ(file, bprm, CWL_OFF_LINUX_BINPRM_FILE);
	return file;
}

static __always_inline void cwl_drop(u32 reason)
{
	u64 *n = cwl_drops.lookup(&reason);
	if (n)
		*n += 1;
}

/* ---- what differs: where labels live, how an event names its file, the verdict ------- */

#ifdef CWL_BACKEND_LSM
#include "cdi.h"

#define CWL_ACT_ENFORCED CWL_ACT_DENIED

struct linux_binprm;
struct file;
struct vm_area_struct;
struct inode;
struct dentry;
struct iattr;
struct task_struct;

BPF_TASK_STORAGE(cwl_task_label_ls, struct cwl_task_label);

static __always_inline const struct cwl_cdi *cwl_cdi_at(u32 gen, const struct cwl_inode_key *key)
{
	void *m = cwl_cdi.lookup(&gen);
	return m ? bpf_map_lookup_elem(m, key) : 0;
}

static __always_inline struct cwl_task_label *cwl_label_slot(struct task_struct *task, u64 flags)
{
	return cwl_task_label_ls.task_storage_get(task, 0, flags);
}

/* The label the current task holds, CWL_LABEL_DAEMON included. */
static __always_inline u32 cwl_task_label(void)
{
	struct cwl_task_label *tl = cwl_label_slot(bpf_get_current_task_btf(), 0);
	return tl ? tl->label : 0;
}

/* Give the current task `label` (0: none). 0, or -1 when the label cannot be held. */
static __always_inline int cwl_set_label(u32 label)
{
	struct cwl_task_label *slot =
		cwl_label_slot(bpf_get_current_task_btf(), label ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
	if (!slot)
		return label ? -1 : 0;
	slot->label = label;
	return 0;
}

static __always_inline const void *cwl_file_dentry(const void *file)
{
	const void *dentry = 0;
	if (file)
		CWL_READ(dentry, file, CWL_OFF_FILE_F_PATH_DENTRY);
	return dentry;
}

/* Events name what they concern by a dentry (CDI hooks have no file): its name. */
#define CWL_EVENT_OBJ(file) cwl_file_dentry(file)

static __always_inline void cwl_event_name(struct cwl_event *e, const void *dentry)
{
	const char *name = 0;
	if (dentry && !CWL_READ(name, dentry, CWL_OFF_DENTRY_D_NAME_NAME) && name)
		bpf_probe_read_kernel_str(e->name, sizeof(e->name), name);
}
#else /* CWL_BACKEND_TP */
#define CWL_ACT_ENFORCED CWL_ACT_KILLED

/* Arming (issue 21, speed): the programs that judge only what a labelled process does itself
 * (its mprotect, shmat, io_uring, signals, and every syscall through raw sys_enter, for 32-bit
 * ones) are attached only while a labelled process exists (prima.arming). The engine attaches
 * them, then sets cwl_arm[CWL_ARM_ARMED]; it clears it (and CWL_ARM_LIVE) before it detaches
 * them again. A process that enters a label while the flag is clear is held (cwl_entered).
 * cwl_arm[CWL_ARM_LIVE]: set at every label entry, cleared by the engine only when it found no
 * labelled process: the always-attached open exits skip their file lookup while it is clear. */
BPF_ARRAY(cwl_arm, u32, 3);
BPF_RINGBUF_OUTPUT(cwl_arm_req, 1); /* tgids of held processes: wakes the engine's arming thread */
/* cwl_arm[CWL_ARM_CONFINE] set (Port Authority runs its cgroup programs only on TP cgroups, issue
 * 24): the cgroup v2 ids a labelled process may run in; a label entry anywhere else is held too, and
 * the engine moves the process into one before it continues it (prima.arming `confine`). */
BPF_HASH(cwl_tp_cgroups, u64, u8, CWL_TP_CGROUPS_MAX);

static __always_inline u32 cwl_arm_flag(u32 which)
{
	u32 *v = cwl_arm.lookup(&which);
	return v ? *v : 0;
}

/* Threads of labelled processes other than their leader (tid -> tgid), so that a syscall
 * naming a thread (ptrace, process_vm_writev take a tid) finds its process's label. Added at
 * sched_process_fork, removed at the thread's exit; after an exec a process has one thread. */
BPF_HASH(cwl_task_threads, u32, u32, CWL_TASK_MAX);

static __always_inline u32 cwl_label_of_tgid(u32 tgid)
{
	struct cwl_task_label *tl = cwl_task_labels.lookup(&tgid);
	return tl ? tl->label : 0;
}

/* The label of the process that thread `pid` (a tid, as syscalls take it) belongs to. */
static __always_inline u32 cwl_label_of_pid(u32 pid)
{
	u32 label = cwl_label_of_tgid(pid), *tgid;

	if (label)
		return label;
	tgid = cwl_task_threads.lookup(&pid);
	return tgid ? cwl_label_of_tgid(*tgid) : 0;
}

/* The label the current process holds, CWL_LABEL_DAEMON included. */
static __always_inline u32 cwl_task_label(void)
{
	return cwl_label_of_tgid(bpf_get_current_pid_tgid() >> 32);
}

/* Give the current process `label` (0: none). 0, or -1 when the label cannot be held. */
static __always_inline int cwl_set_label(u32 label)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct cwl_task_label nl = {.label = label};

	if (!label) {
		cwl_task_labels.delete(&tgid);
		return 0;
	}
	return cwl_task_labels.update(&tgid, &nl) ? -1 : 0;
}

/* Per-CPU room to build a path (cwl_file_path wants twice the name's size). */
struct cwl_path_buf {
	char buf[2 * CWL_NAME_LEN];
};
BPF_PERCPU_ARRAY(cwl_path_scratch, struct cwl_path_buf, 1);

/* Events name a file by its path within its filesystem. */
#define CWL_EVENT_OBJ(file) (file)

static __always_inline void cwl_event_name(struct cwl_event *e, const void *file)
{
	u32 zero = 0;
	struct cwl_path_buf *pb;
	if (file && (pb = cwl_path_scratch.lookup(&zero))) {
		cwl_file_path(file, pb->buf);
		__builtin_memcpy(e->name, pb->buf, sizeof(e->name));
	}
}
#endif

/* The label PRIMA judges the current task under: the daemon's reserved label is no TP label
 * (the daemon must run python, bcc and clang), so PRIMA sees the daemon as unlabelled. */
static __always_inline u32 cwl_current_label(void)
{
	u32 label = cwl_task_label();
	return label == CWL_LABEL_DAEMON ? 0 : label;
}

/* ---- events and verdicts, shared ----------------------------------------------------- */

/* Reserve, fill and submit one event named by `path` (exec) or else by `obj`
 * (CWL_EVENT_OBJ); `peer`: the other process of a subject event (0: none). A full ring
 * buffer is counted, never silent. */
static __always_inline void cwl_emit_peer(u32 kind, u32 op, u32 label, u32 prev, u32 action, u32 why,
					  const struct cwl_file_id *id, const struct cwl_trust *t,
					  const void *obj, const char *path, u32 peer)
{
	struct cwl_event *e = cwl_events.ringbuf_reserve(sizeof(struct cwl_event));
	if (!e) {
		cwl_drop(CWL_DROP_RINGBUF);
		return;
	}
	cwl_fill_event(e, kind, op, label, prev, action, why, id, t);
	e->peer = peer;
	if (path)
		bpf_probe_read_kernel_str(e->name, sizeof(e->name), path);
	else
		cwl_event_name(e, obj);
	cwl_events.ringbuf_submit(e, 0);
}

static __always_inline void cwl_emit(u32 kind, u32 op, u32 label, u32 prev, u32 action, u32 why,
				     const struct cwl_file_id *id, const struct cwl_trust *t,
				     const void *obj, const char *path)
{
	cwl_emit_peer(kind, op, label, prev, action, why, id, t, obj, path, 0);
}

/* A trusted load: an event only the first time this measurement is seen under this label. */
static __always_inline void cwl_trusted(u32 op, u32 label, const struct cwl_file_id *id,
					const struct cwl_trust *t, const void *obj, const char *path)
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
	cwl_emit(CWL_EV_TRUSTED_LOAD, op, label, label, CWL_ACT_ALLOWED, CWL_WHY_NONE, id, t, obj, path);
}

/* A violation: always an event. In enforce mode the lsm backend's hook returns
 * -EPERM and the tracepoint backend kills the process; audit mode returns 0. */
static __always_inline int cwl_violation(u32 gen, u32 op, u32 label, u32 why, const struct cwl_file_id *id,
					 const void *obj, const char *path)
{
	if (!cwl_enforcing(gen)) {
		cwl_emit(CWL_EV_VIOLATION, op, label, label, CWL_ACT_ALLOWED, why, id, 0, obj, path);
		return 0;
	}
#ifdef CWL_BACKEND_TP
	bpf_send_signal(CWL_SIGKILL);
#endif
	cwl_emit(CWL_EV_VIOLATION, op, label, label, CWL_ACT_ENFORCED, why, id, 0, obj, path);
	return -CWL_EPERM;
}

/* ---- content: is what a load gets still what was measured? (issue 20) ------------- */

/* When a write was last enabled on `key` (0: never since watched, or not watched). */
static __always_inline u64 cwl_taint_of(const struct cwl_inode_key *key)
{
	u64 *rec = cwl_taint.lookup((void *)key);
	return rec ? *rec : 0;
}

/* Complete an identity read by cwl_file_identity for judging: its taint and, on overlayfs,
 * the verdict on the layer file it shows (judged for any trust set: it must be the measured
 * content; the label's set is judged on the overlay file). */
static __always_inline void cwl_content(u32 gen, struct cwl_file_id *id, const struct cwl_inode_key *key)
{
	struct cwl_file_id lid;
	struct cwl_inode_key lkey;

	id->taint_ns = cwl_taint_of(key);
	if (!id->layer)
		return;
	if (cwl_inode_identity((const void *)id->layer, &lid)) {
		id->layer_why = CWL_WHY_NO_FILE;
		return;
	}
	cwl_inode_key_of(&lid, &lkey);
	lid.taint_ns = cwl_taint_of(&lkey);
	id->layer_why = cwl_judge(&lid, cwl_trust_of(gen, &lkey), ~0ULL);
}

/* `file`'s identity and map key, ready to judge. 0, or -1 when the identity cannot be read. */
static __always_inline int cwl_identify(u32 gen, const void *file, struct cwl_file_id *id, struct cwl_inode_key *key)
{
	if (cwl_file_identity(file, id))
		return -1;
	cwl_inode_key_of(id, key);
	cwl_content(gen, id, key);
	return 0;
}

/* A write became possible on `file` (opened for write; tracepoint: mapped shared from a
 * writable descriptor): a watched file (and the layer file behind an overlayfs one) records
 * when, so no TP loads it until it is measured again after this moment. */
static __always_inline void cwl_note_write(const void *file)
{
	struct cwl_file_id id;
	struct cwl_inode_key key;
	u64 now = bpf_ktime_get_ns(), *rec;

	if (cwl_file_identity(file, &id))
		return;
	cwl_inode_key_of(&id, &key);
	rec = cwl_taint.lookup(&key);
	if (rec)
		*rec = now;
	if (id.layer && cwl_inode_identity((const void *)id.layer, &id) == 0) {
		cwl_inode_key_of(&id, &key);
		rec = cwl_taint.lookup(&key);
		if (rec)
			*rec = now;
	}
}

/* A TP as a subject: process `peer` and the current process, one modifying the other (ptrace,
 * its memory; CWL_OP_TRACEME: the current process is the subject, else the actor). Logged under
 * the subject's label naming both processes (the event's pid/comm are the current process's,
 * prev_label is the actor's label, peer the other tgid). In enforce mode the lsm hook returns
 * -EPERM and the tracepoint backend kills the current process (before it returns to user space). */
static __always_inline int cwl_subject_violation(u32 gen, u32 op, u32 why, u32 subject, u32 actor, u32 peer)
{
	u32 enforce = cwl_enforcing(gen);

#ifdef CWL_BACKEND_TP
	if (enforce)
		bpf_send_signal(CWL_SIGKILL);
#endif
	cwl_emit_peer(CWL_EV_VIOLATION, op, subject, actor, enforce ? CWL_ACT_ENFORCED : CWL_ACT_ALLOWED, why, 0, 0,
		      0, 0, peer);
	return enforce ? -CWL_EPERM : 0;
}

/* The current process opened `file` (a proc mem file for write, *tgid its process): under a
 * TP label its own memory is anonymous-exec territory (writes reach executable mappings
 * through FOLL_FORCE, W^X); another labelled process may be written only by its own label. */
static __always_inline int cwl_check_mem_open(const void *file)
{
	u32 target = 0, me = bpf_get_current_pid_tgid() >> 32, actor, subject;

	if (!cwl_proc_mem_write(file, &target))
		return 0;
	actor = cwl_current_label();
	u32 gen = cwl_live_gen();
	if (target == me) {
		if (!actor || cwl_decide_anon(cwl_label_conf_of(gen, actor)) == CWL_WHY_NONE)
			return 0;
		return cwl_subject_violation(gen, CWL_OP_PROC_MEM, CWL_WHY_ANON, actor, actor, me);
	}
#ifdef CWL_BACKEND_TP
	subject = cwl_label_of_pid(target);
	if (cwl_decide_modify(actor, subject) != CWL_WHY_NONE)
		return cwl_subject_violation(gen, CWL_OP_PROC_MEM, CWL_WHY_OUTSIDER, subject, actor, target);
#endif
	return 0; /* lsm: mem_open asks ptrace_access_check (PTRACE_MODE_ATTACH) about other processes */
}

/* Judge a code file loaded by a process under `label`: 0 when trusted (or in
 * audit mode), else the violation's verdict. */
static __always_inline int cwl_check_file(u32 gen, u32 op, u32 label, const void *file)
{
	struct cwl_file_id id;
	struct cwl_inode_key key;
	const struct cwl_trust *t = 0;
	u32 why;

	if (cwl_identify(gen, file, &id, &key) == 0) {
		t = cwl_trust_of(gen, &key);
		why = cwl_judge(&id, t, cwl_set_bit(cwl_label_conf_of(gen, label)));
	} else {
		why = CWL_WHY_NO_FILE;
	}
	if (why != CWL_WHY_NONE)
		return cwl_violation(gen, op, label, why, &id, CWL_EVENT_OBJ(file), 0);
	cwl_trusted(op, label, &id, t, CWL_EVENT_OBJ(file), 0);
	return 0;
}

/* ---- exec: the decision, and the label the new image runs under, shared ------------- */

/* The exec decision for the file an exec is loading (prima_decide.h), with what it was made on. */
struct cwl_exec_ctx {
	struct cwl_exec_decision d;
	struct cwl_file_id id;
	const struct cwl_trust *t;
	const struct cwl_entry *entry;
	const void *file;
	const char *path;
	u32 cur;
	u32 gen;
	int have_id;
};

/* Decide the exec of `file` (bprm's): 0 when it concerns PRIMA (a labelled task or an
 * entrypoint), else 1. The hot path (an unlabelled task, no entrypoint) reads only the file's
 * map key: no identity, no name. */
static __always_inline int cwl_exec_decide(const void *bprm, const void *file, struct cwl_exec_ctx *x)
{
	struct cwl_inode_key key;
	const void *inode = cwl_file_inode(file), *sb = 0;

	__builtin_memset(&key, 0, sizeof(key));
	x->cur = cwl_current_label();
	x->gen = cwl_live_gen();
	x->t = 0;
	x->entry = 0;
	x->file = file;
	x->path = 0;
	if (cwl_inode_dev_ino(inode, &sb, &key.dev, &key.ino) == 0)
		x->entry = cwl_entry_of(x->gen, &key);
	if (!x->entry && !x->cur)
		return 1; /* the hot path: an unlabelled task exec'd a non-entrypoint */
	x->have_id = cwl_inode_identity(inode, &x->id) == 0;
	CWL_READ(x->path, bprm, CWL_OFF_LINUX_BINPRM_FILENAME);
	if (!x->have_id)
		return 0;
	cwl_content(x->gen, &x->id, &key);
	x->t = cwl_trust_of(x->gen, &key);
	cwl_decide_exec(x->cur, cwl_label_conf_of(x->gen, x->cur), x->entry,
			cwl_label_conf_of(x->gen, x->entry ? x->entry->label : 0), &x->id, x->t,
			cwl_task_traced((const void *)bpf_get_current_task()), &x->d);
	return 0;
}

/* An executable stack under `label` (PT_GNU_STACK with PF_X): memory no measured file holds,
 * judged by the label's anon_exec rule; a stack that cannot be found is a violation (fail closed). */
static __always_inline int cwl_judge_stack(u32 gen, u32 label)
{
	int exec = cwl_stack_exec();
	u32 why;

	if (exec == 0)
		return 0;
	why = exec < 0 ? CWL_WHY_NO_FILE : cwl_decide_anon(cwl_label_conf_of(gen, label));
	return why == CWL_WHY_NONE ? 0 : cwl_violation(gen, CWL_OP_EXEC_STACK, label, why, 0, 0, 0);
}

#ifdef CWL_BACKEND_LSM
/* Under lsm the ELF interpreter is judged by mmap_file, like every other mapping; the stack is
 * made executable (setup_arg_pages) after bprm_committed_creds, so it is judged at the image's
 * first mapping (mmap_file, cwl_stack_pending). */
static __always_inline void cwl_check_image(u32 gen, u32 label)
{
	struct cwl_task_label *tl = cwl_label_slot(bpf_get_current_task_btf(), 0);
	if (tl)
		tl->flags |= CWL_TL_STACK_PENDING;
}

/* Every lsm hook is attached for the engine's whole life: nothing to arm. */
static __always_inline void cwl_entered(void)
{
}

/* A violation once the exec can no longer fail: too late for -EPERM, so in enforce mode the
 * task is killed. `logged`: bprm_check_security already logged it (audit mode adds nothing). */
static __always_inline void cwl_violation_committed(u32 gen, u32 op, u32 label, u32 why,
						    const struct cwl_file_id *id, const void *obj, const char *path,
						    int logged)
{
	u32 enforce = cwl_enforcing(gen);

	if (enforce)
		bpf_send_signal(CWL_SIGKILL);
	if (enforce || !logged)
		cwl_emit(CWL_EV_VIOLATION, op, label, label, enforce ? CWL_ACT_KILLED : CWL_ACT_ALLOWED, why, id, 0,
			 obj, path);
}
#else
/* The ELF interpreter the kernel mapped for the new image (it is not mapped by
 * a syscall, so sys_enter_mmap never sees it): found at AT_BASE. */
static __always_inline void cwl_check_interp(u32 gen, u32 label)
{
	struct cwl_vma_view v;
	u64 base = 0;

	if (cwl_interp_base(&base)) {
		cwl_violation(gen, CWL_OP_INTERP, label, CWL_WHY_NO_FILE, 0, 0, 0);
		return;
	}
	if (!base)
		return; /* static image */
	if (cwl_vma_view_at(base, &v) != 1 || !v.file) {
		cwl_violation(gen, CWL_OP_INTERP, label, CWL_WHY_NO_FILE, 0, 0, 0);
		return;
	}
	cwl_check_file(gen, CWL_OP_INTERP, label, v.file);
}

/* The new image is complete at sched_process_exec: its interpreter and its stack. */
static __always_inline void cwl_check_image(u32 gen, u32 label)
{
	cwl_check_interp(gen, label);
	cwl_judge_stack(gen, label);
}

/* The current process has just entered a label at sched_process_exec. When the engine is not
 * armed, its per-syscall programs are not attached: the process is held before its first user
 * instruction (SIGSTOP, taken on the way back to user space) and the engine is asked to arm; it
 * attaches them, sets CWL_ARM_ARMED, then clears CWL_TL_HELD and continues the process. While
 * confining (CWL_ARM_CONFINE), a label entry outside the TP cgroups is held the same way, and the
 * engine moves the process into one before it continues it. Anyone
 * else continuing it first is a violation (signal_generate below). The engine clears
 * CWL_ARM_ARMED before it detaches and waits an RCU grace period before it looks for labelled
 * processes, so an exec that read the flag still set has inserted its label by then. */
#define CWL_SIGSTOP 19
static __always_inline void cwl_entered(void)
{
	u32 k = CWL_ARM_LIVE, one = 1, tgid = bpf_get_current_pid_tgid() >> 32, *req;
	struct cwl_task_label *tl;

	if (!cwl_arm_flag(CWL_ARM_LIVE))
		cwl_arm.update(&k, &one); /* a read first: an array lookup is inlined, an update is a call */
	if (cwl_arm_flag(CWL_ARM_ARMED)) {
		u64 cg;
		if (!cwl_arm_flag(CWL_ARM_CONFINE))
			return;
		cg = bpf_get_current_cgroup_id();
		if (cwl_tp_cgroups.lookup(&cg))
			return;
	}
	tl = cwl_task_labels.lookup(&tgid);
	if (tl)
		tl->flags |= CWL_TL_HELD;
	bpf_send_signal(CWL_SIGSTOP);
	req = cwl_arm_req.ringbuf_reserve(sizeof(u32));
	if (!req) {
		cwl_drop(CWL_DROP_RINGBUF); /* the arming thread also looks every CWL_ARM_POLL_MS */
		return;
	}
	*req = tgid;
	cwl_arm_req.ringbuf_submit(req, 0);
}

/* The tracepoint backend only ever acts after the fact: its violation already kills. */
#define cwl_violation_committed(gen, op, label, why, id, obj, path, logged) \
	cwl_violation(gen, op, label, why, id, obj, path)
#endif

/* The label the new image runs under, once the exec can no longer fail (lsm:
 * bprm_committed_creds; tracepoint: sched_process_exec): enter, keep or drop it
 * as prima_decide.h decided, with the events that say so. */
static __always_inline void cwl_commit_exec(const struct cwl_exec_ctx *x)
{
	const void *obj = CWL_EVENT_OBJ(x->file);

	switch (x->d.outcome) {
	case CWL_EXEC_ENTER:
		if (cwl_set_label(x->d.label)) {
			/* Cannot hold the label: the process must not run as if it were a TP. */
			cwl_drop(CWL_DROP_LABEL);
			cwl_violation_committed(x->gen, CWL_OP_ENTRYPOINT, x->d.label, CWL_WHY_NONE, &x->id, obj,
						x->path, 0);
			return;
		}
		cwl_entered();
		if (x->cur != x->d.label)
			cwl_emit(CWL_EV_LABEL_TRANSITION, CWL_OP_EXEC, x->d.label, x->cur, CWL_ACT_ALLOWED, CWL_WHY_NONE,
				 &x->id, x->t, obj, x->path);
		cwl_trusted(CWL_OP_EXEC, x->d.label, &x->id, x->t, obj, x->path);
		cwl_check_image(x->gen, x->d.label);
		return;
	case CWL_EXEC_DENY:
		cwl_violation_committed(x->gen, x->d.op, x->d.label, x->d.why, &x->id, obj, x->path, 1);
		return;
	case CWL_EXEC_BAD_ENTRY:
		/* Unlabelled caller: nothing to stop, but the modified entrypoint is worth a record. */
		cwl_emit(CWL_EV_VIOLATION, CWL_OP_ENTRYPOINT, x->entry ? x->entry->label : 0, 0, CWL_ACT_ALLOWED,
			 x->d.why, &x->id, 0, obj, x->path);
		return;
	case CWL_EXEC_DROP:
		cwl_set_label(0);
		cwl_emit(CWL_EV_LABEL_TRANSITION, CWL_OP_DROP, 0, x->cur, CWL_ACT_ALLOWED, CWL_WHY_NONE, &x->id, 0, obj,
			 x->path);
		return;
	default:
		break;
	}
	if (x->d.why == CWL_WHY_NONE) {
		cwl_trusted(CWL_OP_EXEC, x->cur, &x->id, x->t, obj, x->path);
		cwl_check_image(x->gen, x->cur);
	} else {
		cwl_violation_committed(x->gen, CWL_OP_EXEC, x->cur, x->d.why, &x->id, obj, x->path, 1);
	}
}

#ifdef CWL_BACKEND_LSM
/* ---- lsm hooks ----------------------------------------------------------------------- */

/* Executable memory whose content is not a measured file (JITs, copied-on-write pages). */
static __always_inline int cwl_check_anon(u32 gen, u32 op, u32 label, const void *file)
{
	u32 why = cwl_decide_anon(cwl_label_conf_of(gen, label));
	if (why == CWL_WHY_NONE)
		return 0;
	struct cwl_file_id id;
	if (!file || cwl_file_identity(file, &id) != 0)
		__builtin_memset(&id, 0, sizeof(id));
	return cwl_violation(gen, op, label, why, &id, cwl_file_dentry(file), 0);
}

/* Before anything of the new image is loaded: deny untrusted code for a labelled task.
 * Runs once per file of the exec chain (a #! script, then its interpreter). */
LSM_PROBE(bprm_check_security, struct linux_binprm *bprm, int ret)
{
	struct cwl_exec_ctx x;

	if (ret)
		return ret;
	if (cwl_exec_decide(bprm, cwl_bprm_file(bprm), &x))
		return 0;
	if (!x.have_id)
		return cwl_violation(x.gen, CWL_OP_EXEC, x.cur, CWL_WHY_NO_FILE, &x.id, 0, x.path);
	if (x.d.outcome == CWL_EXEC_SAME && x.d.why != CWL_WHY_NONE)
		return cwl_violation(x.gen, CWL_OP_EXEC, x.cur, x.d.why, &x.id, 0, x.path);
	if (x.d.outcome == CWL_EXEC_DENY)
		return cwl_violation(x.gen, x.d.op, x.d.label, x.d.why, &x.id, 0, x.path);
	return 0; /* trusted, an entrypoint, a drop: the label changes at commit */
}

/* After the point of no return (begin_new_exec): the label the new image runs under. */
LSM_PROBE(bprm_committed_creds, struct linux_binprm *bprm)
{
	struct cwl_exec_ctx x;

	if (!cwl_exec_decide(bprm, cwl_bprm_file(bprm), &x) && x.have_id)
		cwl_commit_exec(&x);
	return 0;
}

/* A new task (fork, clone, thread) runs under its creator's label. */
LSM_PROBE(task_alloc, struct task_struct *task, unsigned long clone_flags, int ret)
{
	struct cwl_task_label *slot;
	u32 label;

	if (ret)
		return ret;
	label = cwl_task_label();
	if (!label || (label == CWL_LABEL_DAEMON && !(clone_flags & CWL_CLONE_THREAD)))
		return 0; /* the daemon's threads are the daemon; its child processes are not */
	slot = cwl_label_slot(task, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (slot) {
		slot->label = label;
		return 0;
	}
	/* The child would run unlabelled: refuse the fork (fail closed). */
	cwl_drop(CWL_DROP_LABEL);
	return cwl_violation(cwl_live_gen(), CWL_OP_EXEC, label, CWL_WHY_NONE, 0, 0, 0);
}

/* A mapping the current task makes executable: judged as the file it maps, or by the label's
 * anon_exec rule when its pages are not the file's (no file, private writable, copied-on-write). */
static __always_inline int cwl_check_mapping(u32 op, unsigned long prot, const void *file, int not_the_file)
{
	if (!(prot & CWL_PROT_EXEC))
		return 0;
	u32 label = cwl_current_label();
	if (!label)
		return 0;
	u32 gen = cwl_live_gen();
	if (!file || not_the_file)
		return cwl_check_anon(gen, op == CWL_OP_MMAP ? CWL_OP_ANON_EXEC : op, label, file);
	return cwl_check_file(gen, op, label, file);
}

/* The first mapping of a new image (bprm_committed_creds marked it): its stack, which
 * setup_arg_pages made executable or not just before the kernel maps the image's segments. */
static __always_inline int cwl_stack_pending(void)
{
	struct cwl_task_label *tl = cwl_label_slot(bpf_get_current_task_btf(), 0);

	if (!tl || !(tl->flags & CWL_TL_STACK_PENDING))
		return 0;
	tl->flags &= ~CWL_TL_STACK_PENDING;
	return cwl_judge_stack(cwl_live_gen(), tl->label);
}

LSM_PROBE(mmap_file, struct file *file, unsigned long reqprot, unsigned long prot, unsigned long flags, int ret)
{
	if (ret)
		return ret;
	ret = cwl_stack_pending();
	if (ret)
		return ret;
	/* writable and executable: what runs is what the task writes, not the measured file */
	return cwl_check_mapping(CWL_OP_MMAP, prot, file, cwl_mapping_not_the_file(prot, 0));
}

LSM_PROBE(file_mprotect, struct vm_area_struct *vma, unsigned long reqprot, unsigned long prot, int ret)
{
	const void *file = 0, *anon = 0;

	if (ret)
		return ret;
	CWL_READ(file, vma, CWL_OFF_VM_AREA_STRUCT_VM_FILE);
	CWL_READ(anon, vma, CWL_OFF_VM_AREA_STRUCT_ANON_VMA); /* pages copied on write */
	return cwl_check_mapping(CWL_OP_MPROTECT, prot, file, cwl_mapping_not_the_file(prot, anon != 0));
}

/* ---- a TP as a subject: only its own label may modify it ------------------------------ */

#define CWL_PTRACE_MODE_ATTACH 0x02 /* include/linux/ptrace.h */

static __always_inline u32 cwl_label_of_task(struct task_struct *task)
{
	struct cwl_task_label *tl = cwl_label_slot(task, 0);
	return tl ? tl->label : 0;
}

/* The current task would modify `child`: ptrace attach/seize, /proc/PID/mem (mem_open ->
 * mm_access) and process_vm_readv/writev ask in PTRACE_MODE_ATTACH; reads of /proc/PID/stat,
 * maps, environ (PTRACE_MODE_READ) stay allowed. The kernel never asks about a task's own
 * thread group (its own /proc/self/mem is file_open's, cwl_check_mem_open). */
LSM_PROBE(ptrace_access_check, struct task_struct *child, unsigned int mode, int ret)
{
	u32 subject, actor, tgid = 0;

	if (ret)
		return ret;
	if (!(mode & CWL_PTRACE_MODE_ATTACH))
		return 0;
	subject = cwl_label_of_task(child);
	actor = cwl_current_label();
	if (cwl_decide_modify(actor, subject) == CWL_WHY_NONE)
		return 0;
	CWL_READ(tgid, child, CWL_OFF_TASK_STRUCT_TGID);
	return cwl_subject_violation(cwl_live_gen(), CWL_OP_PTRACE, CWL_WHY_OUTSIDER, subject, actor, tgid);
}

/* PTRACE_TRACEME: the current task would be traced by `parent`. */
LSM_PROBE(ptrace_traceme, struct task_struct *parent, int ret)
{
	u32 subject, actor, tgid = 0;

	if (ret)
		return ret;
	subject = cwl_current_label();
	actor = cwl_label_of_task(parent);
	if (cwl_decide_modify(actor, subject) == CWL_WHY_NONE)
		return 0;
	CWL_READ(tgid, parent, CWL_OFF_TASK_STRUCT_TGID);
	return cwl_subject_violation(cwl_live_gen(), CWL_OP_TRACEME, CWL_WHY_OUTSIDER, subject, actor, tgid);
}

/* ---- CDI protection ------------------------------------------------------------------ */

/* The CDI record governing `dentry`: its own inode or its nearest ancestor directory in the live map. */
static __always_inline const struct cwl_cdi *cwl_cdi_of(u32 gen, const void *dentry, struct cwl_inode_key *hit)
{
	const void *d = dentry;

	for (int i = 0; i <= CWL_CDI_DEPTH; i++) {
		const void *inode = 0, *parent = 0;
		if (!d)
			return 0;
		CWL_READ(inode, d, CWL_OFF_DENTRY_D_INODE);
		if (inode && cwl_inode_key_from_inode(inode, hit) == 0) {
			const struct cwl_cdi *c = cwl_cdi_at(gen, hit);
			if (c)
				return c;
		}
		if (CWL_READ(parent, d, CWL_OFF_DENTRY_D_PARENT) || parent == d)
			return 0;
		d = parent;
	}
	return 0;
}

/* 0 when the current task may change what `dentry` names, else the violation's verdict. */
static __always_inline int cwl_cdi_guard(u32 op, const void *dentry)
{
	struct cwl_inode_key hit;
	struct cwl_file_id id;
	u32 gen = cwl_live_gen();
	const struct cwl_cdi *c = cwl_cdi_of(gen, dentry, &hit);
	u32 label;

	if (!c)
		return 0;
	label = cwl_current_label();
	if (cwl_cdi_writer(c, label))
		return 0;
	__builtin_memset(&id, 0, sizeof(id));
	id.dev = hit.dev;
	id.ino = hit.ino;
	return cwl_violation(gen, op, label, CWL_WHY_CDI_NOT_WRITER, &id, dentry, 0);
}

/* A name made under a CDI directory (or a lookup there): its inode joins the CDI itself, so it
 * stays covered at any depth and through links made to it later anywhere. The engine's next
 * walk of the directory finds it on disk; a full map leaves the ancestor walk (counted). */
LSM_PROBE(d_instantiate, struct dentry *dentry, struct inode *inode)
{
	const void *parent = 0, *pinode = 0;
	struct cwl_inode_key pkey, key;
	struct cwl_cdi rec;
	u32 gen;
	u16 mode = 0;

	if (!inode || !dentry || CWL_READ(parent, dentry, CWL_OFF_DENTRY_D_PARENT) || !parent || parent == dentry)
		return 0;
	if (CWL_READ(pinode, parent, CWL_OFF_DENTRY_D_INODE) || cwl_inode_key_from_inode(pinode, &pkey))
		return 0;
	gen = cwl_live_gen();
	const struct cwl_cdi *dir = cwl_cdi_at(gen, &pkey);
	if (!dir || !dir->is_dir || cwl_inode_key_from_inode(inode, &key) || cwl_cdi_at(gen, &key))
		return 0;
	rec = *dir;
	CWL_READ(mode, inode, CWL_OFF_INODE_I_MODE);
	rec.is_dir = (mode & CWL_S_IFMT) == CWL_S_IFDIR;
	void *m = cwl_cdi.lookup(&gen);
	if (!m || bpf_map_update_elem(m, &key, &rec, BPF_ANY))
		cwl_drop(CWL_DROP_CDI);
	return 0;
}

/* Open for write: a CDI only for its writers; a measured file is tainted (no TP loads it
 * until measured again). This also covers shared writable mappings, which need a file
 * opened for write (do_mmap clears VM_MAYWRITE without FMODE_WRITE), so mmap_file and
 * file_mprotect need no taint of their own. */
LSM_PROBE(file_open, struct file *file, int ret)
{
	u32 mode = 0;

	if (ret)
		return ret;
	CWL_READ(mode, file, CWL_OFF_FILE_F_MODE);
	if (!(mode & CWL_FMODE_WRITE))
		return 0;
	cwl_note_write(file); /* taint first: even an open refused below was asked for */
	ret = cwl_check_mem_open(file); /* a TP's own /proc/PID/mem (W^X) */
	return ret ? ret : cwl_cdi_guard(CWL_OP_CDI_OPEN_WRITE, cwl_file_dentry(file));
}

LSM_PROBE(inode_create, struct inode *dir, struct dentry *dentry, unsigned short mode, int ret)
{
	return ret ? ret : cwl_cdi_guard(CWL_OP_CDI_CREATE, dentry);
}

LSM_PROBE(inode_mkdir, struct inode *dir, struct dentry *dentry, unsigned short mode, int ret)
{
	return ret ? ret : cwl_cdi_guard(CWL_OP_CDI_CREATE, dentry);
}

LSM_PROBE(inode_mknod, struct inode *dir, struct dentry *dentry, unsigned short mode, unsigned int dev, int ret)
{
	return ret ? ret : cwl_cdi_guard(CWL_OP_CDI_CREATE, dentry);
}

LSM_PROBE(inode_symlink, struct inode *dir, struct dentry *dentry, const char *old_name, int ret)
{
	return ret ? ret : cwl_cdi_guard(CWL_OP_CDI_CREATE, dentry);
}

/* A second name for a CDI (e.g. in /tmp) would escape the directory walk: guard both names. */
LSM_PROBE(inode_link, struct dentry *old_dentry, struct inode *dir, struct dentry *new_dentry, int ret)
{
	if (ret)
		return ret;
	ret = cwl_cdi_guard(CWL_OP_CDI_LINK, old_dentry);
	return ret ? ret : cwl_cdi_guard(CWL_OP_CDI_LINK, new_dentry);
}

LSM_PROBE(inode_unlink, struct inode *dir, struct dentry *dentry, int ret)
{
	return ret ? ret : cwl_cdi_guard(CWL_OP_CDI_UNLINK, dentry);
}

LSM_PROBE(inode_rmdir, struct inode *dir, struct dentry *dentry, int ret)
{
	return ret ? ret : cwl_cdi_guard(CWL_OP_CDI_UNLINK, dentry);
}

/* From a CDI (moving it out), to a CDI directory, or over a CDI file. */
LSM_PROBE(inode_rename, struct inode *old_dir, struct dentry *old_dentry, struct inode *new_dir,
	  struct dentry *new_dentry, int ret)
{
	if (ret)
		return ret;
	ret = cwl_cdi_guard(CWL_OP_CDI_RENAME, old_dentry);
	return ret ? ret : cwl_cdi_guard(CWL_OP_CDI_RENAME, new_dentry);
}

/* truncate/ftruncate/O_TRUNC, chmod, chown, utimes. Kernels 6.3+ pass the mount's idmap first. */
#ifdef CWL_LSM_SETATTR_IDMAP
LSM_PROBE(inode_setattr, void *idmap, struct dentry *dentry, struct iattr *attr, int ret)
#else
LSM_PROBE(inode_setattr, struct dentry *dentry, struct iattr *attr, int ret)
#endif
{
	return ret ? ret : cwl_cdi_guard(CWL_OP_CDI_SETATTR, dentry);
}
#else /* CWL_BACKEND_TP */
/* ---- tracepoint hooks ---------------------------------------------------------------- */

/* sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm):
 * the new image is in place (mm->exe_file) and has not run an instruction. */
RAW_TRACEPOINT_PROBE(sched_process_exec)
{
	struct cwl_exec_ctx x;

	if (cwl_exec_decide((const void *)ctx->args[2], cwl_current_exe_file(), &x))
		return 0;
	if (!x.have_id)
		cwl_violation(x.gen, CWL_OP_EXEC, x.cur, CWL_WHY_NO_FILE, &x.id, x.file, x.path);
	else
		cwl_commit_exec(&x);
	return 0;
}

/* sched_process_fork(struct task_struct *parent, struct task_struct *child): a new process inherits. */
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
	const void *child = (const void *)ctx->args[1];
	u32 tgid = bpf_get_current_pid_tgid() >> 32, child_tgid = 0;
	struct cwl_task_label *tl = cwl_task_labels.lookup(&tgid);

	if (!tl || tl->label == CWL_LABEL_DAEMON)
		return 0; /* the daemon's children are not the daemon */
	CWL_READ(child_tgid, child, CWL_OFF_TASK_STRUCT_TGID);
	if (!child_tgid)
		return 0;
	if (child_tgid == tgid) {
		/* a thread: shares the process's entry; its tid must still lead to it */
		u32 tid = 0;
		CWL_READ(tid, child, CWL_OFF_TASK_STRUCT_PID);
		if (tid && cwl_task_threads.update(&tid, &tgid)) {
			cwl_drop(CWL_DROP_LABEL);
			cwl_violation(cwl_live_gen(), CWL_OP_EXEC, tl->label, CWL_WHY_NONE, 0, 0, 0);
		}
		return 0;
	}
	struct cwl_task_label nl = {.label = tl->label};
	if (cwl_task_labels.update(&child_tgid, &nl)) {
		/* The child would run unlabelled: fail closed by killing the parent (the fork's caller). */
		cwl_drop(CWL_DROP_LABEL);
		cwl_violation(cwl_live_gen(), CWL_OP_EXEC, tl->label, CWL_WHY_NONE, 0, 0, 0);
	}
	return 0;
}

/* sched_process_exit(struct task_struct *p, ...), for every exiting thread: a raw tracepoint (no
 * perf record is built). A lookup first: a delete takes the bucket lock even for an absent key,
 * and almost every thread that exits is unlabelled. */
RAW_TRACEPOINT_PROBE(sched_process_exit)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();
	u32 tgid = pid_tgid >> 32, tid = (u32)pid_tgid;
	if (tid != tgid && cwl_task_threads.lookup(&tid))
		cwl_task_threads.delete(&tid);
	if (cwl_task_labels.lookup(&tgid) && cwl_group_dead())
		cwl_task_labels.delete(&tgid);
	return 0;
}

/* Kernel-internal file mode bit (include/linux/fs.h: FMODE_WRITE), unchanged since 2.6. */
#define CWL_FMODE_WRITE 0x2
#define CWL_MAP_SHARED 0x1 /* also set in MAP_SHARED_VALIDATE (0x3) */

TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
	/* A shared mapping of a file open for write (any process): writes through it change
	 * the content without changing the ctime (tmpfs never; ext4/btrfs not for a page
	 * already dirty), and a later mprotect(PROT_WRITE) needs the same FMODE_WRITE file.
	 * The tracepoint backend hooks no open(): a write(2) changes the ctime instead. */
	if ((args->flags & (CWL_MAP_SHARED | CWL_MAP_ANONYMOUS)) == CWL_MAP_SHARED) {
		const void *file = cwl_fd_file((s64)(int)args->fd);
		u32 mode = 0;
		if (file && CWL_READ(mode, file, CWL_OFF_FILE_F_MODE) == 0 && (mode & CWL_FMODE_WRITE))
			cwl_note_write(file);
	}
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
	const void *file = cwl_fd_file((s64)(int)args->fd);
	if (cwl_mapping_not_the_file(cwl_effective_prot(args->prot), 0)) {
		/* writable and executable: what runs is what the task writes, not the measured file */
		u32 why = cwl_decide_anon(cwl_label_conf_of(gen, label));
		if (why != CWL_WHY_NONE)
			cwl_violation(gen, CWL_OP_ANON_EXEC, label, why, 0, file, 0);
		return 0;
	}
	cwl_check_file(gen, CWL_OP_MMAP, label, file);
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
		struct cwl_vma_view v;
		int found = cwl_vma_view_at(addr, &v);
		if (found == 0)
			return 0; /* a hole: mprotect fails with ENOMEM before changing anything */
		if (found < 0) {
			cwl_violation(gen, CWL_OP_MPROTECT, label, CWL_WHY_NO_FILE, 0, 0, 0);
			return 0;
		}
		if (v.file && !cwl_mapping_not_the_file(cwl_effective_prot(prot), v.anon_vma != 0)) {
			if (cwl_check_file(gen, CWL_OP_MPROTECT, label, v.file))
				return 0; /* killed: the rest of the range does not matter */
		} else if (cwl_decide_anon(cwl_label_conf_of(gen, label)) != CWL_WHY_NONE) {
			/* no file, or pages that are (or will be, W+X) the task's own writes */
			cwl_violation(gen, CWL_OP_MPROTECT, label, CWL_WHY_ANON, 0, v.file, 0);
			return 0;
		}
		if (v.end >= stop || v.end <= addr)
			return 0;
		addr = v.end;
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

/* ---- tracepoint backend: a TP as a subject, and what syscall tracepoints cannot see -----
 *
 * Per-syscall tracepoints (their programs run only for their own syscall):
 *   sys_exit_ptrace            a successful ptrace: the tracer's tracees and a PTRACE_TRACEME'd
 *                              task's tracer must share the tracee's label (checked after the
 *                              fact, so the label a concurrent exec just gave is seen; the
 *                              tracer dies before its next instruction)
 *   sys_exit_open/openat/openat2  a /proc/PID/mem file opened for write (cwl_check_mem_open)
 *   sys_enter_process_vm_writev   into a process of another label
 *   sys_enter_io_uring_setup   by a TP
 * and one raw tracepoint, sys_enter, whose program runs for every syscall of every process:
 * 32-bit (int 0x80) and x32 syscalls, which per-syscall tracepoints never see (x86's
 * trace_syscalls.c ignores compat syscalls): a TP's are a violation unless allowed; an
 * outsider's 32-bit ptrace attach or process_vm_writev into a TP is one too.
 * Raw sys_enter, io_uring_setup (and mprotect, pkey_mprotect, shmat and the signal syscalls)
 * are attached only while a labelled process exists (cwl_arm above, prima.arming); ptrace,
 * process_vm_writev and the open exits guard TPs against any process and stay attached. */
#define CWL_TS_COMPAT 0x0002          /* arch/x86/include/asm/thread_info.h: a 32-bit syscall is running */
#define CWL_X32_SYSCALL_BIT 0x40000000 /* arch/x86/include/uapi/asm/unistd.h */
#define CWL_NR32_PTRACE 26            /* arch/x86/entry/syscalls/syscall_32.tbl */
#define CWL_NR32_PROCESS_VM_WRITEV 348
#define CWL_PTRACE_ATTACH 16          /* include/uapi/linux/ptrace.h */
#define CWL_PTRACE_SEIZE 0x4206

/* Runs on every syscall while armed: a plain load through the BTF task pointer (the verifier
 * checks the offset against task_struct's BTF), about 30 ns cheaper here than a probe read. */
#if CWL_SZ_TASK_STRUCT_THREAD_INFO_STATUS != 4
#error "task_struct.thread_info.status is not 32-bit on this kernel"
#endif
static __always_inline int cwl_in_compat_syscall(void)
{
	const char *task = (const char *)bpf_get_current_task_btf();
	return (*(const volatile u32 *)(task + CWL_OFF_TASK_STRUCT_THREAD_INFO_STATUS) & CWL_TS_COMPAT) != 0;
}

/* The current process would modify process `pid` (a tid, as syscalls name it) by `op`. */
static __always_inline void cwl_check_modify_pid(u32 op, u32 pid)
{
	u32 actor = cwl_current_label(), subject = cwl_label_of_pid(pid);

	if (cwl_decide_modify(actor, subject) != CWL_WHY_NONE)
		cwl_subject_violation(cwl_live_gen(), op, CWL_WHY_OUTSIDER, subject, actor, pid);
}

/* process_vm_writev(pid, ...) into a process of another label: the writer is killed here, at
 * sys_enter; the syscall still runs, but pinning the target's pages stops at the pending fatal
 * signal (mm/gup.c __get_user_pages: -EINTR before the first page), so nothing is written. */
TRACEPOINT_PROBE(syscalls, sys_enter_process_vm_writev)
{
	cwl_check_modify_pid(CWL_OP_VM_WRITE, (u32)args->pid);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_io_uring_setup)
{
	u32 label = cwl_current_label();
	if (label) {
		u32 gen = cwl_live_gen();
		if (cwl_decide_io_uring(cwl_label_conf_of(gen, label)) != CWL_WHY_NONE)
			cwl_violation(gen, CWL_OP_IO_URING, label, CWL_WHY_IO_URING, 0, 0, 0);
	}
	return 0;
}

/* sys_enter(struct pt_regs *regs, long id): the hot path reads one field and returns. */
RAW_TRACEPOINT_PROBE(sys_enter)
{
	const void *regs = (const void *)ctx->args[0];
	u64 id = ctx->args[1], a = 0, b = 0;

	if (!cwl_in_compat_syscall() && !(id & CWL_X32_SYSCALL_BIT))
		return 0;
	u32 label = cwl_current_label();
	if (label) {
		u32 gen = cwl_live_gen();
		if (cwl_decide_compat(cwl_label_conf_of(gen, label)) != CWL_WHY_NONE)
			cwl_violation(gen, CWL_OP_COMPAT_SYSCALL, label, CWL_WHY_COMPAT, 0, 0, 0);
	}
	/* an outsider's 32-bit attack (ebx, ecx: the first two arguments) */
	if (id == CWL_NR32_PROCESS_VM_WRITEV && !CWL_READ(a, regs, CWL_OFF_PT_REGS_BX))
		cwl_check_modify_pid(CWL_OP_VM_WRITE, (u32)a);
	else if (id == CWL_NR32_PTRACE && !CWL_READ(a, regs, CWL_OFF_PT_REGS_BX) && !CWL_READ(b, regs, CWL_OFF_PT_REGS_CX) &&
		 ((u32)a == CWL_PTRACE_ATTACH || (u32)a == CWL_PTRACE_SEIZE))
		cwl_check_modify_pid(CWL_OP_PTRACE, (u32)b);
	return 0;
}

/* After a successful ptrace call by the current task. */
#define CWL_PTRACED_MAX 8
static __always_inline void cwl_check_ptrace_exit(void)
{
	const char *task = (const char *)bpf_get_current_task();
	const char *head = task + CWL_OFF_TASK_STRUCT_PTRACED;
	const char *node = 0;
	u32 me = cwl_current_label(), gen = cwl_live_gen();

	/* its tracees (task->ptraced, linked through tracee->ptrace_entry; the newest first) */
	if (CWL_READ(node, head, 0))
		return;
	for (int i = 0; i < CWL_PTRACED_MAX; i++) {
		u32 tgid = 0, subject;
		if (!node || node == head)
			break;
		CWL_READ(tgid, node - CWL_OFF_TASK_STRUCT_PTRACE_ENTRY, CWL_OFF_TASK_STRUCT_TGID);
		subject = cwl_label_of_tgid(tgid);
		if (cwl_decide_modify(me, subject) != CWL_WHY_NONE) {
			cwl_subject_violation(gen, CWL_OP_PTRACE, CWL_WHY_OUTSIDER, subject, me, tgid);
			return;
		}
		if (CWL_READ(node, node, 0))
			break;
	}
	/* PTRACE_TRACEME: its own tracer (task->parent while traced) */
	if (me && cwl_task_traced(task)) {
		const void *tracer = 0;
		u32 tgid = 0, actor;
		CWL_READ(tracer, task, CWL_OFF_TASK_STRUCT_PARENT);
		if (tracer)
			CWL_READ(tgid, tracer, CWL_OFF_TASK_STRUCT_TGID);
		actor = cwl_label_of_tgid(tgid);
		if (cwl_decide_modify(actor, me) != CWL_WHY_NONE)
			cwl_subject_violation(gen, CWL_OP_TRACEME, CWL_WHY_OUTSIDER, me, actor, tgid);
	}
}

TRACEPOINT_PROBE(syscalls, sys_exit_ptrace)
{
	if (args->ret == 0)
		cwl_check_ptrace_exit();
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_open)
{
	if (args->ret >= 0 && cwl_arm_flag(CWL_ARM_LIVE))
		cwl_check_mem_open(cwl_fd_file(args->ret));
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
	if (args->ret >= 0 && cwl_arm_flag(CWL_ARM_LIVE))
		cwl_check_mem_open(cwl_fd_file(args->ret));
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat2)
{
	if (args->ret >= 0 && cwl_arm_flag(CWL_ARM_LIVE))
		cwl_check_mem_open(cwl_fd_file(args->ret));
	return 0;
}
#endif

/* ---- self-protection (selfprotect.h): cwlite's maps, links and daemon, both backends -------
 * Kept apart from PRIMA's hooks: the daemon and cwlite's objects are what the engine recorded in
 * cwl_daemon / cwl_daemon_threads / cwl_objs. Always enforced, audit mode or not: these guard the
 * enforcement itself, not the policy. */

static __always_inline const struct cwl_daemon *cwl_the_daemon(void)
{
	u32 zero = 0;
	const struct cwl_daemon *d = cwl_daemon.lookup(&zero);
	return d && d->tgid ? d : 0;
}

/* 1 when the current task is the daemon, or no daemon is recorded yet (the engine is starting). */
static __always_inline int cwl_is_daemon(void)
{
	const struct cwl_daemon *d = cwl_the_daemon();
	return !d || d->tgid == (u32)(bpf_get_current_pid_tgid() >> 32);
}

/* 1 when a signal aimed at `pid` (a kill(2) target: a pid, 0 = the caller's group, -1 = every
 * process, -pgid = a group) reaches the daemon. */
static __always_inline int cwl_hits_daemon(const struct cwl_daemon *d, s64 pid)
{
	u32 tid;

	if (pid == -1)
		return 1;
	if (pid == 0)
		return cwl_current_pgid() == d->pgid;
	if (pid < 0)
		return (u32)(-pid) == d->pgid;
	tid = (u32)pid;
	return tid == d->tgid || cwl_daemon_threads.lookup(&tid) != 0;
}

/* A violation against cwlite itself: logged (dev/ino carry what and whom, see selfprotect.h);
 * the tracepoint backend kills the caller, the lsm backend's hook returns -EPERM. */
static __always_inline int cwl_self_violation(u32 op, u32 why, u32 what, u64 whom)
{
	struct cwl_file_id fid;
	u32 label = cwl_task_label();

	__builtin_memset(&fid, 0, sizeof(fid));
	fid.dev = what;
	fid.ino = whom;
#ifdef CWL_BACKEND_TP
	bpf_send_signal(CWL_SIGKILL);
#endif
	cwl_emit(CWL_EV_VIOLATION, op, label, label, CWL_ACT_ENFORCED, why, &fid, 0, 0, 0);
	return -CWL_EPERM;
}

/* bpf(2) command `cmd` with its attr at `attr` (user memory under tracepoints, the kernel's copy
 * under lsm): 0 when it may go on, else the violation's verdict. */
static __always_inline int cwl_guard_bpf(u32 cmd, const void *attr, int user_attr)
{
	u64 kind = 0, key;
	u32 fd = 0;
	int off = cwl_bpf_cmd_fd_offset(cmd, &kind);

	if (off < 0 || cwl_is_daemon())
		return 0;
	if (user_attr ? bpf_probe_read_user(&fd, sizeof(fd), (const char *)attr + off)
		      : bpf_probe_read_kernel(&fd, sizeof(fd), (const char *)attr + off))
		return 0;
	key = cwl_bpf_fd_key(fd, kind);
	if (!key || !cwl_objs.lookup(&key))
		return 0;
	return cwl_self_violation(CWL_OP_BPF, CWL_WHY_NOT_DAEMON, cmd, key);
}

/* A signal `sig` aimed at `pid` (kill(2) semantics): 0 when allowed, else the violation's verdict.
 * Only TPs are refused: root's SIGTERM is how the daemon is stopped (and logs daemon-stop). */
static __always_inline int cwl_guard_signal(s64 pid, int sig)
{
	u32 label;
	const struct cwl_daemon *d;

	if (!sig)
		return 0; /* an existence probe */
	label = cwl_task_label();
	if (!label || label == CWL_LABEL_DAEMON || !(d = cwl_the_daemon()) || !cwl_hits_daemon(d, pid))
		return 0;
	return cwl_self_violation(CWL_OP_SIGNAL, CWL_WHY_TP_SIGNAL, sig, (u64)pid);
}

#ifdef CWL_BACKEND_LSM
/* Every bpf(2) command, after the kernel copied its attr. The daemon's threads get its reserved
 * label here (those made later inherit it at task_alloc). 6.16+ pass `kernel` as a 4th argument. */
#ifdef CWL_LSM_BPF_KERNEL_ARG
LSM_PROBE(bpf, int cmd, void *attr, unsigned int size, bool kernel, int ret)
#else
LSM_PROBE(bpf, int cmd, void *attr, unsigned int size, int ret)
#endif
{
	if (ret)
		return ret;
	if (cwl_the_daemon() && cwl_is_daemon() && cwl_task_label() != CWL_LABEL_DAEMON)
		cwl_set_label(CWL_LABEL_DAEMON);
	return cwl_guard_bpf((u32)cmd, attr, 0);
}

/* Every signal sent by kill/tkill/tgkill/rt_(tg)sigqueueinfo/pidfd_send_signal, to a task `p`. */
LSM_PROBE(task_kill, struct task_struct *p, void *info, int sig, const void *cred, int ret)
{
	u32 tgid = 0;

	if (ret)
		return ret;
	CWL_READ(tgid, p, CWL_OFF_TASK_STRUCT_TGID);
	return cwl_guard_signal(tgid, sig);
}
#else /* CWL_BACKEND_TP */
TRACEPOINT_PROBE(syscalls, sys_enter_bpf)
{
	cwl_guard_bpf((u32)args->cmd, (const void *)args->uattr, 1);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_kill)
{
	cwl_guard_signal(args->pid, args->sig);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_tkill)
{
	cwl_guard_signal(args->pid, args->sig);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_tgkill)
{
	cwl_guard_signal(args->tgid, args->sig);
	return 0;
}

/* bcc declares these tracepoints' arguments from their format, where `siginfo_t *` names a type
 * the headers bcc sees do not define: only the pointer is there, never read. */
#define siginfo_t void
TRACEPOINT_PROBE(syscalls, sys_enter_rt_sigqueueinfo)
{
	cwl_guard_signal(args->pid, args->sig);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_rt_tgsigqueueinfo)
{
	cwl_guard_signal(args->tgid, args->sig);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_pidfd_send_signal)
{
	u32 nr;

	if (args->sig && cwl_current_label() && (nr = cwl_pidfd_nr(args->pidfd)))
		cwl_guard_signal(nr, args->sig);
	return 0;
}
#undef siginfo_t

/* signal_generate(sig, info, task, group, result), in the sender's context: a SIGCONT (or the
 * kernel's to an orphaned stopped group) has already woken its target when this runs. A process
 * held for arming (cwl_entered) continued by anyone but the engine runs before the per-syscall
 * programs are attached: a violation naming both (the sender is killed); the engine kills the
 * released process when it arms. */
#define CWL_SIGCONT 18
/* signal_generate(int sig, struct kernel_siginfo *info, struct task_struct *task, int group, int result):
 * a raw tracepoint (every signal of the system passes here; no perf record is built). */
RAW_TRACEPOINT_PROBE(signal_generate)
{
	u32 tgid = 0; /* a held process has one thread: it exec'd and has not run since */
	struct cwl_task_label *tl;

	if ((int)ctx->args[0] != CWL_SIGCONT || CWL_READ(tgid, (const void *)ctx->args[2], CWL_OFF_TASK_STRUCT_PID) ||
	    !(tl = cwl_task_labels.lookup(&tgid)) || !(tl->flags & CWL_TL_HELD) || cwl_is_daemon())
		return 0;
	tl->flags |= CWL_TL_RELEASED;
	cwl_subject_violation(cwl_live_gen(), CWL_OP_RELEASE, CWL_WHY_UNARMED, tl->label, cwl_current_label(), tgid);
	return 0;
}
#endif
