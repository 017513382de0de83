/* prima_decide.h: PRIMA's decision, written once for both backends.
 *
 * exec.bpf.c includes it for both backends (-DCWL_BACKEND_TP: a violation
 * becomes bpf_send_signal(SIGKILL); -DCWL_BACKEND_LSM: it becomes -EPERM).
 * It declares the maps both use and the pure decisions over what was looked up:
 *   - is this file (dev, ino, ctime) trusted for this label's trust-set bit?
 *   - which label does a process run under after exec (entrypoint transition,
 *     keep or drop)?
 *   - is PROT_EXEC anonymous memory allowed for this label?
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
	!defined(CWL_TASK_MAX) || !defined(CWL_SEEN_MAX) || !defined(CWL_RINGBUF_PAGES)
#error "CWL_TRUST_MAX/ENTRY_MAX/LABEL_MAX/TASK_MAX/SEEN_MAX/RINGBUF_PAGES missing: sizes come from prima.engine"
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
BPF_HASH(cwl_task_labels, u32, struct cwl_task_label, CWL_TASK_MAX); /* tgid -> label */
BPF_HASH(cwl_seen, struct cwl_seen_key, u8, CWL_SEEN_MAX);
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
 * CWL_WHY_NONE means trusted. */
static __always_inline u32 cwl_judge(const struct cwl_file_id *id, const struct cwl_trust *t, u64 set_bit)
{
	if (!t)
		return CWL_WHY_UNKNOWN;
	if (t->ctime_ns != id->ctime_ns)
		return CWL_WHY_CHANGED;
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

struct cwl_exec_decision {
	u32 outcome; /* CWL_EXEC_* */
	u32 label;   /* label the new image runs under */
	u32 why;     /* CWL_WHY_* of the image for `label` (or of the entrypoint for BAD_ENTRY) */
	u32 _pad;
};

/* Decide the label of a process that just exec'd an image.
 *   cur: its label before exec (0: unlabelled), cur_conf: that label's conf
 *   entry: the entrypoint record of the image (NULL: not an entrypoint),
 *   entry_conf: the conf of the label the entrypoint gives,
 *   id/t: the image's identity and trust record.
 * An entrypoint gives its label only when its file is trusted for that label;
 * otherwise a labelled process keeps (default) or drops its label, and a kept
 * label must trust the new image. */
static __always_inline void cwl_decide_exec(u32 cur, const struct cwl_label_conf *cur_conf,
					    const struct cwl_entry *entry, const struct cwl_label_conf *entry_conf,
					    const struct cwl_file_id *id, const struct cwl_trust *t,
					    struct cwl_exec_decision *d)
{
	__builtin_memset(d, 0, sizeof(*d));
	d->label = cur;
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
