/* prima_decide.h: PRIMA's decision, written once for both backends.
 *
 * exec.bpf.c includes it for both backends (-DCWL_BACKEND_TP: a violation
 * becomes bpf_send_signal(SIGKILL); -DCWL_BACKEND_LSM: it becomes -EPERM).
 * It declares the maps both use and the pure decisions over what was looked up:
 *   - is this file (dev, ino, ctime) trusted for this label's trust-set bit?
 *   - which label does a process run under after exec (entrypoint transition,
 *     keep or drop)?
 *   - is PROT_EXEC anonymous memory allowed for this label, and is a mapping's
 *     content still its file's bytes (W^X)?
 *   - may a process modify (ptrace, write the memory of) a process of a label?
 *   - may a TP use what the tracepoint backend cannot mediate (32-bit syscalls, io_uring)?
 * and fills the one event layout (struct cwl_event, cwlite.h).
 *
 * Map OPERATIONS (lookup/update/ringbuf) are not here: bcc rewrites
 * `map.lookup()` only in the main source file (and refuses them in macros),
 * so each backend's .bpf.c does its few lookups and passes the results in.
 *
 * Generations: every policy/DB-derived map has two slots (an array of maps
 * indexed by generation); cwl_gen[0] names the live one. The engine installs
 * fresh, filled, frozen maps in the idle slots, then flips cwl_gen, so a reload
 * never leaves a window where nothing (or half a DB) is enforced.
 * Label state (cwl_task_labels) and the dedupe set survive reloads.
 *
 * Sizes come from prima.engine as -D flags (Python -> C only).
 */
#ifndef CWL_PRIMA_DECIDE_H
#define CWL_PRIMA_DECIDE_H

#include "cwlite.h"

#if !defined(CWL_TRUST_MAX) || !defined(CWL_ENTRY_MAX) || !defined(CWL_LABEL_MAX) || \
	!defined(CWL_TASK_MAX) || !defined(CWL_SEEN_MAX) || !defined(CWL_RINGBUF_PAGES) || !defined(CWL_TAINT_MAX)
#error "CWL_TRUST_MAX/ENTRY_MAX/LABEL_MAX/TASK_MAX/SEEN_MAX/RINGBUF_PAGES/TAINT_MAX missing: sizes come from prima.engine"
#endif

/* ABI constants (uapi asm-generic/mman-common.h, stable on every architecture cwlite runs on). */
#define CWL_MAP_ANONYMOUS 0x20
#define CWL_SIGKILL 9

/* Policy + measurement DB, per generation. The engine makes each generation's maps itself
 * (cext.bpfmap), fills them, freezes them (BPF_MAP_FREEZE: bpf(2) can no longer write them,
 * whoever asks; programs still can) and installs them at index `generation` of these arrays of
 * maps. The *_t maps only give bcc the slots' type: no program reads them. */
BPF_HASH(cwl_trust_t, struct cwl_inode_key, struct cwl_trust, CWL_TRUST_MAX);
BPF_ARRAY_OF_MAPS(cwl_trust, "cwl_trust_t", 2);
BPF_HASH(cwl_entry_t, struct cwl_inode_key, struct cwl_entry, CWL_ENTRY_MAX);
BPF_ARRAY_OF_MAPS(cwl_entry, "cwl_entry_t", 2);
BPF_ARRAY(cwl_labels_t, struct cwl_label_conf, CWL_LABEL_MAX);
BPF_ARRAY_OF_MAPS(cwl_labels, "cwl_labels_t", 2);
BPF_ARRAY(cwl_conf_t, struct cwl_conf, 1);
BPF_ARRAY_OF_MAPS(cwl_conf, "cwl_conf_t", 2);
BPF_ARRAY(cwl_gen, u32, 1);              /* [0] = the live generation (0 or 1) */

/* Process state and bookkeeping (not generational). */
/* tgid -> label. Port Authority's net.bpf.c judges sockets by the same labels: the engine hands
 * this map to it by fd (prima.engine.Engine.label_map_fd), so its type, key, value and flags are
 * net.bpf.c's cwl_pa_label_shape too. */
BPF_HASH(cwl_task_labels, u32, struct cwl_task_label, CWL_TASK_MAX);
BPF_HASH(cwl_seen, struct cwl_seen_key, u8, CWL_SEEN_MAX);
/* Taint: (dev, ino) -> CLOCK_MONOTONIC ns of the last time a write was enabled on
 * the file (opened for write, mapped shared with a writable file), 0 = never
 * since it was watched. The engine watches every key of both generations before
 * their content is read (prima.engine Engine.watch), so the hooks only update
 * records that exist: a file is judged tainted when the record is newer than its
 * trust entry's measured_ns, which only a new measurement (and reload) moves past. */
BPF_HASH(cwl_taint, struct cwl_inode_key, u64, CWL_TAINT_MAX);
BPF_PERCPU_ARRAY(cwl_drops, u64, CWL_DROP_MAX);
BPF_RINGBUF_OUTPUT(cwl_events, CWL_RINGBUF_PAGES);

static __always_inline void cwl_inode_key_of(const struct cwl_file_id *id, struct cwl_inode_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->dev = id->dev;
	key->ino = id->ino;
}

/* Why the file `id` is NOT trusted for a label whose trust-set bit is `set_bit`,
 * given its trust-map record `t` (NULL: not in the DB's kernel view).
 * CWL_WHY_NONE means trusted: the bytes a load gets are the measured ones only
 * if the change cookie is the measured one, nothing can write the file now, no
 * write was enabled on it since it was measured, and (overlayfs) the same holds
 * for the layer file it shows. */
static __always_inline u32 cwl_judge(const struct cwl_file_id *id, const struct cwl_trust *t, u64 set_bit)
{
	if (!t)
		return CWL_WHY_UNKNOWN;
	if (t->ctime_ns != id->ctime_ns)
		return CWL_WHY_CHANGED;
	if (id->writers)
		return CWL_WHY_WRITERS;
	if (id->taint_ns > t->measured_ns)
		return CWL_WHY_TAINTED;
	if (id->layer_why)
		return CWL_WHY_LAYER;
	if (!set_bit || !(t->sets_mask & set_bit))
		return CWL_WHY_NOT_IN_SET;
	return CWL_WHY_NONE;
}

/* The label's trust-set bit; a label the live generation does not know trusts nothing (fail closed). */
static __always_inline u64 cwl_set_bit(const struct cwl_label_conf *lc)
{
	return lc ? lc->set_bit : 0;
}

/* Label change on exec. */
#define CWL_EXEC_SAME 0  /* label unchanged (maybe 0): judge the image for it if labelled */
#define CWL_EXEC_ENTER 1 /* trusted entrypoint: the process enters `label` */
#define CWL_EXEC_DROP 2  /* policy on_exec = drop: the process leaves its label */
#define CWL_EXEC_BAD_ENTRY 3 /* an entrypoint whose file is not trusted: no transition */
#define CWL_EXEC_DENY 4  /* a violation under `label` (op, why): an undeclared or untrusted label
			  * hop, or a traced process entering a label; the label does not change */

struct cwl_exec_decision {
	u32 outcome; /* CWL_EXEC_* */
	u32 label;   /* label the new image runs under (DENY: the label the violation is under) */
	u32 why;     /* CWL_WHY_* of the image for `label` (or of the entrypoint for BAD_ENTRY) */
	u32 op;      /* DENY: CWL_OP_TRANSITION, or CWL_OP_EXEC (traced) */
};

/* Decide the label of a process that just exec'd an image.
 *   cur: its label before exec (0: unlabelled), cur_conf: that label's conf
 *   entry: the entrypoint record of the image (NULL: not an entrypoint),
 *   entry_conf: the conf of the label the entrypoint gives,
 *   id/t: the image's identity and trust record,
 *   traced: the process is ptraced.
 * An entrypoint gives its label only when its file is trusted for that label.
 * A TP enters another label only along a declared transition, and only through an
 * entrypoint its own label trusts (else DENY); a traced process never enters a label
 * it is not already in (its tracer could change the new TP before it runs: DENY).
 * Otherwise a labelled process keeps (default) or drops its label, and a kept
 * label must trust the new image. */
static __always_inline void cwl_decide_exec(u32 cur, const struct cwl_label_conf *cur_conf,
					    const struct cwl_entry *entry, const struct cwl_label_conf *entry_conf,
					    const struct cwl_file_id *id, const struct cwl_trust *t, int traced,
					    struct cwl_exec_decision *d)
{
	__builtin_memset(d, 0, sizeof(*d));
	d->label = cur;
	if (entry && entry->label && entry->label != cur) {
		u32 why = CWL_WHY_NONE;
		if (cur) {
			u64 declared = cur_conf ? cur_conf->enter_mask & (1ULL << (entry->label & 63)) : 0;
			why = declared ? cwl_judge(id, t, cwl_set_bit(cur_conf)) : CWL_WHY_UNDECLARED;
		}
		if (why != CWL_WHY_NONE) {
			d->outcome = CWL_EXEC_DENY;
			d->op = CWL_OP_TRANSITION;
			d->why = why;
			return;
		}
		if (traced && cwl_judge(id, t, cwl_set_bit(entry_conf)) == CWL_WHY_NONE) {
			d->outcome = CWL_EXEC_DENY;
			d->op = CWL_OP_EXEC;
			d->why = CWL_WHY_TRACED;
			d->label = cur ? cur : entry->label;
			return;
		}
	}
	if (entry && entry->label) {
		u32 why = cwl_judge(id, t, cwl_set_bit(entry_conf));
		if (why == CWL_WHY_NONE) {
			d->outcome = CWL_EXEC_ENTER;
			d->label = entry->label;
			return;
		}
		if (!cur) {
			d->outcome = CWL_EXEC_BAD_ENTRY;
			d->why = why;
			return;
		}
	}
	if (!cur)
		return;
	if (cur_conf && cur_conf->on_exec_drop) {
		d->outcome = CWL_EXEC_DROP;
		d->label = 0;
		return;
	}
	d->why = cwl_judge(id, t, cwl_set_bit(cur_conf));
}

/* PROT_EXEC anonymous memory (JITs): CWL_WHY_NONE when the label allows it. */
static __always_inline u32 cwl_decide_anon(const struct cwl_label_conf *lc)
{
	return (!lc || lc->anon_exec_violation) ? CWL_WHY_ANON : CWL_WHY_NONE;
}

/* W^X: is what an executable file mapping would run NOT the file's measured bytes, so that
 * it is judged as anonymous memory (cwl_decide_anon) instead of as the file? True when the
 * mapping would be writable and executable at once (PROT_WRITE with PROT_EXEC: pages written
 * later would sit in an already-executable mapping, shared or private), or when pages of a
 * private mapping were already copied on write (`cow`: vma->anon_vma is set). */
#define CWL_PROT_WRITE 0x2
static __always_inline int cwl_mapping_not_the_file(u64 prot, int cow)
{
	return ((prot & CWL_PROT_WRITE) && (prot & CWL_PROT_EXEC)) || cow;
}

/* May a process under label `actor` modify (ptrace-attach, write the memory of) a process
 * under label `subject`? A TP is a high-integrity subject: only its own label may. Generic
 * over every label, reserved ones included. CWL_WHY_NONE when allowed. */
static __always_inline u32 cwl_decide_modify(u32 actor, u32 subject)
{
	return (subject && actor != subject) ? CWL_WHY_OUTSIDER : CWL_WHY_NONE;
}

/* A 32-bit syscall (int 0x80) by a TP: the tracepoint backend's syscall tracepoints do not
 * see them (kernel/trace/trace_syscalls.c ignores compat syscalls on x86), so they are a
 * violation unless the label allows them. */
static __always_inline u32 cwl_decide_compat(const struct cwl_label_conf *lc)
{
	return (lc && lc->compat_allow) ? CWL_WHY_NONE : CWL_WHY_COMPAT;
}

/* io_uring_setup by a TP: io_uring's operations (openat, write, ...) run without syscalls,
 * so the tracepoint backend sees none of them; a violation unless the label allows it. */
static __always_inline u32 cwl_decide_io_uring(const struct cwl_label_conf *lc)
{
	return (lc && lc->io_uring_allow) ? CWL_WHY_NONE : CWL_WHY_IO_URING;
}

/* Fill everything of an event but `name` (the caller knows which name fits). */
static __always_inline void cwl_fill_event(struct cwl_event *e, u32 kind, u32 op, u32 label, u32 prev,
					   u32 action, u32 why, const struct cwl_file_id *id,
					   const struct cwl_trust *t)
{
	u64 pid_tgid = bpf_get_current_pid_tgid();

	__builtin_memset(e, 0, sizeof(*e));
	e->kind = kind;
	e->op = op;
	e->pid = (u32)pid_tgid;
	e->tgid = pid_tgid >> 32;
	e->label = label;
	e->prev_label = prev;
	e->action = action;
	e->why = why;
	if (id) {
		e->dev = id->dev;
		e->ino = id->ino;
		e->ctime_ns = id->ctime_ns;
	}
	e->ktime_ns = bpf_ktime_get_ns();
	if (t && why == CWL_WHY_NONE)
		__builtin_memcpy(e->digest, t->digest, sizeof(e->digest));
	bpf_get_current_comm(e->comm, sizeof(e->comm));
}

#endif /* CWL_PRIMA_DECIDE_H */
