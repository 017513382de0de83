/* net.bpf.c: Port Authority, one source for both backends; the decision is pa_decide.h's.
 *
 * portauthority.engine compiles it with exactly one of -DCWL_BACKEND_TP / -DCWL_BACKEND_LSM
 * beside prima.engine's exec.bpf.c (same backend): a process's label is the one PRIMA keeps,
 * never a copy. PRIMA's label map (tracepoint: cwl_task_labels, tgid -> label; lsm: the task
 * storage cwl_task_label_ls) is handed over by fd (cwl_pa_label_src below), not found by name.
 *
 * Programs of the tracepoint backend (kernels that refuse BPF LSM):
 *   pa_sock_create  cgroup/sock_create (root cgroup): a socket made by a labelled
 *                   process carries its label (sk storage, cloned to accepted sockets)
 *   pa_bind4/6      cgroup/bind4, bind6: EPERM unless a rule opens the port
 *   pa_connect4/6   cgroup/connect4, connect6: EPERM unless a connect rule names the peer
 *   pa_sendmsg4/6   cgroup/sendmsg4, sendmsg6 (UDP with an address): as connect
 *   pa_ingress      cgroup_skb ingress (root cgroup): a packet reaching a labelled
 *                   socket is dropped unless a rule lets the label receive it
 * recvmsg4/6 cannot refuse (the kernel wants 1 from them): receiving is cgroup_skb's.
 *
 * Programs of the lsm backend (LSM_PROBE, attached by bcc at load; each keeps an earlier deny):
 *   socket_create        -EPERM for a socket no program here can judge (AF_PACKET) by a labelled
 *                        process (cwl_pa_decide_socket)
 *   socket_post_create   a labelled process's new socket carries its label (sk storage, as above)
 *   socket_bind          -EPERM unless a rule opens the port (the sockaddr the caller gave)
 *   socket_listen        -EPERM unless a listen rule names the bound port (a listen without a
 *                        bind, on a port the kernel would pick, is refused)
 *   socket_accept        -EPERM unless the label may listen on the port: the peer is not known
 *                        yet (the connection leaves the queue after the hook); every packet of
 *                        it was judged on its way in by socket_sock_rcv_skb
 *   socket_connect       -EPERM unless a connect rule names the peer
 *   socket_sendmsg       a datagram (or TCP fast open) to an address: as connect
 *   file_receive         -EPERM for a network socket passed in (SCM_RIGHTS, pidfd_getfd) to a
 *                        labelled process (cwl_pa_decide_hold)
 *   socket_sock_rcv_skb  a packet reaching a labelled socket (softirq: the label is the
 *                        socket's, stamped by the hooks above) is dropped unless a rule lets it in
 * Both backends:
 *   pa_tc_ingress   tc clsact ingress on the host's interfaces: a packet to a port a
 *                   listen rule governs, from a peer no such rule admits, is dropped
 *                   before any socket sees it (it reads no label: backend-independent)
 *
 * Tracepoint backend only (the lsm variant has no counterpart yet, see README):
 *   sys_enter_socket (syscall tracepoint, attached by bcc) a labelled process making a
 *                   socket no program here can judge (AF_PACKET) is SIGKILLed before
 *                   socket() returns to its code (cwl_pa_decide_socket)
 *   sys_enter/exit_execve(at), sys_enter/exit_recvmsg, sys_exit_pidfd_getfd (syscall tracepoints)
 *                   a process that enters a label holding an inet or packet socket (inetd,
 *                   socket activation, a leaked fd), or that takes one with pidfd_getfd or
 *                   receives one over SCM_RIGHTS, is SIGKILLed before its code runs
 *                   (cwl_pa_decide_hold): no rule judged that socket's input
 * Refusals are counted per (label, rule, op, port, reason) in cwl_pa_counts (per CPU):
 * the engine logs each interval's counts as one entry per key, so a flood makes
 * counts, not entries. A listener a rule allows (at its bind) is an event (cwl_pa_events).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include "pa_decide.h"

#if defined(CWL_BACKEND_LSM) == defined(CWL_BACKEND_TP)
#error "net.bpf.c: define exactly one of CWL_BACKEND_LSM and CWL_BACKEND_TP (portauthority.engine does)"
#endif
#if !defined(CWL_PA_COUNT_MAX) || !defined(CWL_PA_RINGBUF_PAGES) || !defined(CWL_PA_PENDING_MAX)
#error "CWL_PA_COUNT_MAX/PA_RINGBUF_PAGES/PA_PENDING_MAX missing: sizes come from portauthority.engine"
#endif

/* PRIMA's label map, the one source of a process's label, handed over by fd: the engine puts
 * prima.engine.Engine.label_map_fd into slot 0 of cwl_pa_label_src (a map-in-map slot holds a
 * reference to the map itself, so it is always the live engine's map). Not a bcc "extern"
 * table: bcc resolves those by name in a process-wide store that keeps the FIRST declaring
 * engine's fd, stale once that engine closed. cwl_pa_label_shape only gives the slot its shape,
 * which the kernel holds PRIMA's map to (bpf_map_meta_equal: type, key and value size, flags;
 * a hash's max_entries is not compared); nothing reads or writes it. Under lsm PRIMA keeps
 * labels in task storage (exec.bpf.c BPF_TASK_STORAGE: int key, BPF_F_NO_PREALLOC). */
#ifdef CWL_BACKEND_LSM
BPF_F_TABLE("task_storage", int, struct cwl_task_label, cwl_pa_label_shape, 0, BPF_F_NO_PREALLOC);
#else
BPF_TABLE("hash", u32, struct cwl_task_label, cwl_pa_label_shape, 1);
#endif
BPF_ARRAY_OF_MAPS(cwl_pa_label_src, "cwl_pa_label_shape", 1);

BPF_ARRAY(cwl_pa_sets, struct cwl_pa_set, 2); /* two slots: the engine fills the idle one, then flips */
BPF_ARRAY(cwl_pa_gen, u32, 1);
BPF_F_TABLE("sk_storage", int, struct cwl_pa_sock, cwl_pa_socks, 0, BPF_F_NO_PREALLOC | BPF_F_CLONE);
BPF_PERCPU_HASH(cwl_pa_counts, struct cwl_pa_count_key, u64, CWL_PA_COUNT_MAX);
BPF_PERCPU_ARRAY(cwl_pa_drops, u64, CWL_PA_DROP_MAX);
BPF_RINGBUF_OUTPUT(cwl_pa_events, CWL_PA_RINGBUF_PAGES);

static __always_inline void cwl_pa_drop(u32 reason)
{
	u64 *n = cwl_pa_drops.lookup(&reason);
	if (n)
		*n += 1;
}

/* The live rule generation (the engine counts up; its low bit picks the cwl_pa_sets slot). */
static __always_inline u32 cwl_pa_generation(void)
{
	u32 zero = 0, *g = cwl_pa_gen.lookup(&zero);
	return g ? *g : 0;
}

static __always_inline const struct cwl_pa_set *cwl_pa_live(void)
{
	u32 slot = cwl_pa_generation() & 1;
	return cwl_pa_sets.lookup(&slot);
}

/* The label Port Authority judges the current process under (the daemon's: none). */
static __always_inline u32 cwl_pa_task_label(void)
{
	u32 zero = 0;
	struct cwl_task_label *tl;
	void *labels = cwl_pa_label_src.lookup(&zero);

	if (!labels) {
#ifndef CWL_BACKEND_LSM
		cwl_pa_drop(CWL_PA_DROP_LABELS); /* no label map handed over: judged unlabelled, counted */
#endif
		/* lsm: bcc attaches the LSM programs at load, before the engine hands the map over;
		 * that is before PRIMA's first generation (before_labels), when no process holds a label */
		return 0;
	}
#ifdef CWL_BACKEND_LSM
	tl = bpf_task_storage_get(labels, bpf_get_current_task_btf(), 0, 0);
#else
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	tl = bpf_map_lookup_elem(labels, &tgid);
#endif
	if (!tl || tl->label == CWL_LABEL_DAEMON)
		return 0;
	return tl->label;
}

/* Count one refusal (or audit-mode allowance) of op `op` under its key; a full map is counted too. */
static __always_inline void cwl_pa_count(const struct cwl_pa_query *q, const struct cwl_pa_verdict *v, u8 action, u8 op)
{
	struct cwl_pa_count_key key;
	u64 zero = 0, *n;

	__builtin_memset(&key, 0, sizeof(key));
	key.label = q->label;
	key.rule = v->rule;
	key.port = (q->op == CWL_PA_OP_CONNECT || q->op == CWL_PA_OP_SEND) ? q->rport : q->lport;
	key.proto = q->proto;
	key.op = op;
	key.why = v->why;
	key.action = action;
	n = cwl_pa_counts.lookup_or_try_init(&key, &zero);
	if (n)
		*n += 1;
	else
		cwl_pa_drop(CWL_PA_DROP_COUNT);
}

/* Decide `q` (the verdict into *v); count a refusal as op `count_as` (q->op, but for the lsm
 * accept hook, which asks the listen question). 1: let it happen; 0: refuse (enforce mode). */
static __always_inline int cwl_pa_judge_as(struct cwl_pa_query *q, struct cwl_pa_verdict *v, u8 count_as)
{
	const struct cwl_pa_set *set = cwl_pa_live();
	u32 enforce = set ? set->enforce : 1;

	*v = cwl_pa_decide(set, q);
	if (v->allowed)
		return 1;
	cwl_pa_count(q, v, enforce ? CWL_ACT_DENIED : CWL_ACT_ALLOWED, count_as);
	return enforce ? 0 : 1;
}

/* Decide `q` (the verdict into *v); count a refusal. 1: let it happen; 0: refuse (enforce mode). */
static __always_inline int cwl_pa_judge(struct cwl_pa_query *q, struct cwl_pa_verdict *v)
{
	return cwl_pa_judge_as(q, v, q->op);
}

/* Give a labelled process's socket its label (sk storage; `sk`: a cgroup program's bpf_sock, or an
 * LSM hook's struct sock as the verifier types it from BTF). */
static __always_inline void cwl_pa_stamp(void *sk, u32 label)
{
	struct cwl_pa_sock *s;

	if (!sk || !label)
		return;
	s = cwl_pa_socks.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!s) {
		cwl_pa_drop(CWL_PA_DROP_SOCK);
		return;
	}
	s->label = label;
}

/* A listener the rule set allowed: an event for the engine (logged once per label and port). */
static __always_inline void cwl_pa_listener(const struct cwl_pa_query *q, u32 rule)
{
	struct cwl_pa_event *e = cwl_pa_events.ringbuf_reserve(sizeof(struct cwl_pa_event));
	if (!e) {
		cwl_pa_drop(CWL_PA_DROP_RINGBUF);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->tgid = bpf_get_current_pid_tgid() >> 32;
	e->label = q->label;
	e->rule = rule;
	e->port = q->lport;
	e->proto = q->proto;
	e->op = q->op;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	cwl_pa_events.ringbuf_submit(e, 0);
}

/* A refusal of what a labelled process did itself (op, why: a decision other than NONE), counted
 * as `action` (the backend's: killed or denied). 1: enforce it; 0: the rule set is in audit mode
 * (counted as allowed). */
static __always_inline int cwl_pa_refuse(u32 label, u8 op, u32 why, u8 action)
{
	struct cwl_pa_query q;
	struct cwl_pa_verdict v = {.allowed = 0, .rule = 0, .why = why};
	const struct cwl_pa_set *set = cwl_pa_live();

	__builtin_memset(&q, 0, sizeof(q));
	q.label = label;
	q.op = op;
	if (set && !set->enforce) {
		cwl_pa_count(&q, &v, CWL_ACT_ALLOWED, op);
		return 0;
	}
	cwl_pa_count(&q, &v, action, op);
	return 1;
}

#define CWL_S_IFMT 0170000        /* inode.i_mode file type (uapi linux/stat.h) */
#define CWL_S_IFSOCK 0140000

/* The address family of the socket open as `file` (0: not a socket). */
static __always_inline u32 cwl_pa_file_family(const void *file)
{
	const void *inode = 0, *sock = 0, *sk = 0;
	u16 mode = 0, family = 0;

	if (!file || CWL_READ(inode, file, CWL_OFF_FILE_F_INODE) || !inode || CWL_READ(mode, inode, CWL_OFF_INODE_I_MODE))
		return 0;
	if ((mode & CWL_S_IFMT) != CWL_S_IFSOCK)
		return 0;
	if (CWL_READ(sock, file, CWL_OFF_FILE_PRIVATE_DATA) || !sock || CWL_READ(sk, sock, CWL_OFF_SOCKET_SK) || !sk)
		return 0;
	CWL_READ(family, sk, CWL_OFF_SOCK_SKC_FAMILY);
	return family;
}

#ifdef CWL_BACKEND_TP
static __always_inline u8 cwl_pa_proto_of(u32 protocol, u32 type)
{
	if (protocol == CWL_PA_TCP || protocol == CWL_PA_UDP)
		return protocol;
	return type == 1 /* SOCK_STREAM */ ? CWL_PA_TCP : type == 2 /* SOCK_DGRAM */ ? CWL_PA_UDP : protocol;
}

/* The query a sock_addr hook makes: the address the caller gave (user_*). `v6` is a constant per
 * program: a *4 program may not even read user_ip6 (the verifier refuses the access). */
static __always_inline void cwl_pa_addr_query(struct bpf_sock_addr *ctx, struct cwl_pa_query *q, u8 op, u32 label,
					      int v6)
{
	u16 port = bpf_ntohs((u16)ctx->user_port);
	u32 *addr;

	__builtin_memset(q, 0, sizeof(*q));
	q->label = label;
	q->op = op;
	q->proto = cwl_pa_proto_of(ctx->protocol, ctx->type);
	addr = op == CWL_PA_OP_BIND ? q->laddr : q->raddr;
	if (!v6) {
		q->family = CWL_PA_INET;
		addr[0] = ctx->user_ip4;
	} else {
		q->family = CWL_PA_INET6;
		addr[0] = ctx->user_ip6[0];
		addr[1] = ctx->user_ip6[1];
		addr[2] = ctx->user_ip6[2];
		addr[3] = ctx->user_ip6[3];
		cwl_pa_unmap(&q->family, addr);
	}
	if (op == CWL_PA_OP_BIND)
		q->lport = port;
	else
		q->rport = port;
}

static __always_inline int cwl_pa_addr_hook(struct bpf_sock_addr *ctx, u8 op, int v6)
{
	u32 label = cwl_pa_task_label();
	struct cwl_pa_query q;
	struct cwl_pa_verdict v;
	int ok;

	if (!label)
		return 1; /* unlabelled: unaffected */
	cwl_pa_stamp(ctx->sk, label);
	cwl_pa_addr_query(ctx, &q, op, label, v6);
	ok = cwl_pa_judge(&q, &v);
	if (ok && op == CWL_PA_OP_BIND && q.lport && v.allowed)
		cwl_pa_listener(&q, v.rule);
	return ok;
}

int pa_sock_create(struct bpf_sock *sk)
{
	cwl_pa_stamp(sk, cwl_pa_task_label());
	return 1;
}

int pa_bind4(struct bpf_sock_addr *ctx) { return cwl_pa_addr_hook(ctx, CWL_PA_OP_BIND, 0); }
int pa_bind6(struct bpf_sock_addr *ctx) { return cwl_pa_addr_hook(ctx, CWL_PA_OP_BIND, 1); }
int pa_connect4(struct bpf_sock_addr *ctx) { return cwl_pa_addr_hook(ctx, CWL_PA_OP_CONNECT, 0); }
int pa_connect6(struct bpf_sock_addr *ctx) { return cwl_pa_addr_hook(ctx, CWL_PA_OP_CONNECT, 1); }
int pa_sendmsg4(struct bpf_sock_addr *ctx) { return cwl_pa_addr_hook(ctx, CWL_PA_OP_SEND, 0); }
int pa_sendmsg6(struct bpf_sock_addr *ctx) { return cwl_pa_addr_hook(ctx, CWL_PA_OP_SEND, 1); }

/* Refuse what a labelled process did itself (op, why: a decision other than NONE) by SIGKILL before
 * it returns to user code, unless the rule set is in audit mode (as PRIMA's kills). */
static __always_inline void cwl_pa_kill(u32 label, u8 op, u32 why)
{
	if (cwl_pa_refuse(label, op, why, CWL_ACT_KILLED))
		bpf_send_signal(9 /* SIGKILL */);
}

/* The cgroups Port Authority's cgroup programs are attached to (TP cgroups: the engine moves every
 * labelled process into one before its first instruction, prima.arming `confine`). A socket's cgroup
 * programs are those of the cgroup it was made in, for its whole life. */
BPF_HASH(cwl_pa_tp_cgroups, u64, u8, CWL_TP_CGROUPS_MAX);

/* socket(2) by a labelled process: outside a TP cgroup (moved out, or forked into another cgroup
 * with clone3's CLONE_INTO_CGROUP), or of a family Port Authority cannot judge (AF_PACKET): killed
 * at sys_enter, so the call never returns to its code. */
TRACEPOINT_PROBE(syscalls, sys_enter_socket)
{
	u32 label = cwl_pa_task_label(), why;
	u64 cg;

	if (!label)
		return 0;
	cg = bpf_get_current_cgroup_id();
	if (!cwl_pa_tp_cgroups.lookup(&cg)) {
		cwl_pa_kill(label, CWL_PA_OP_SOCKET, CWL_PA_WHY_CGROUP);
		return 0;
	}
	why = cwl_pa_decide_socket(label, (u32)args->family);
	if (why != CWL_PA_WHY_NONE)
		cwl_pa_kill(label, CWL_PA_OP_SOCKET, why);
	return 0;
}

/* ---- sockets made outside the label: kept across the exec into it, or taken ------------------- */
BPF_HASH(cwl_pa_exec_from, u32, u32, CWL_PA_PENDING_MAX); /* tgid -> its label when it called execve */

/* Refuse holding a socket of `family` under `label` (cwl_pa_kill). 1: refused. */
static __always_inline int cwl_pa_check_hold(u32 label, u32 family)
{
	u32 why = cwl_pa_decide_hold(label, family);

	if (why == CWL_PA_WHY_NONE)
		return 0;
	cwl_pa_kill(label, CWL_PA_OP_HOLD, why);
	return 1;
}

static __always_inline void cwl_pa_exec_enter(void)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32, label = cwl_pa_task_label();
	if (label) {
		if (cwl_pa_exec_from.update(&tgid, &label))
			cwl_pa_drop(CWL_PA_DROP_PENDING); /* its exec will look like entering the label */
	} else
		cwl_pa_exec_from.delete(&tgid);
}

/* Descriptors looked at when a process enters a label: the first CWL_PA_FD_SCAN one by one; past
 * them, the open_fds bitmap up to CWL_PA_FD_WORDS words (64 descriptors each), where any open one is
 * judged as a network socket (CWL_AF_UNKNOWN), as is a table larger than that: a parent can give
 * the socket any number up to RLIMIT_NOFILE, and the verifier bounds what one program may walk. */
#define CWL_PA_FD_SCAN 256
#define CWL_PA_FD_WORDS 64

/* After a successful exec (the new image, before its first instruction): did it enter a label? */
static __always_inline void cwl_pa_exec_exit(long ret)
{
	const void *task = (const void *)bpf_get_current_task(), *files = 0, *fdt = 0;
	const char *fds = 0, *open = 0;
	u32 tgid = bpf_get_current_pid_tgid() >> 32, label = cwl_pa_task_label(), before = 0, max = 0, *b;
	u64 rest;

	b = cwl_pa_exec_from.lookup(&tgid);
	if (b) {
		before = *b;
		cwl_pa_exec_from.delete(&tgid);
	}
	if (ret != 0 || !label || label == before)
		return;
	if (CWL_READ(files, task, CWL_OFF_TASK_STRUCT_FILES) || !files || CWL_READ(fdt, files, CWL_OFF_FILES_STRUCT_FDT) ||
	    !fdt || CWL_READ(max, fdt, CWL_OFF_FDTABLE_MAX_FDS) || CWL_READ(fds, fdt, CWL_OFF_FDTABLE_FD) ||
	    CWL_READ(open, fdt, CWL_OFF_FDTABLE_OPEN_FDS))
		return;
	for (u32 fd = 0; fd < CWL_PA_FD_SCAN; fd++) {
		const void *file = 0;
		if (fd >= max)
			return;
		bpf_probe_read_kernel(&file, sizeof(file), fds + fd * sizeof(void *));
		if (file && cwl_pa_check_hold(label, cwl_pa_file_family(file)))
			return;
	}
	rest = max > CWL_PA_FD_WORDS * 64;
	for (u32 w = CWL_PA_FD_SCAN / 64; w < CWL_PA_FD_WORDS; w++) {
		u64 bits = 0;
		if (w * 64 >= max)
			break;
		bpf_probe_read_kernel(&bits, sizeof(bits), open + w * 8);
		rest |= bits;
	}
	if (rest)
		cwl_pa_check_hold(label, CWL_AF_UNKNOWN);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve) { cwl_pa_exec_enter(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_enter_execveat) { cwl_pa_exec_enter(); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_execve) { cwl_pa_exec_exit(args->ret); return 0; }
TRACEPOINT_PROBE(syscalls, sys_exit_execveat) { cwl_pa_exec_exit(args->ret); return 0; }

/* recvmsg(2): the descriptors an SCM_RIGHTS message gave a labelled process, read back from its own
 * msghdr at the syscall's exit (the kernel wrote msg_controllen there). uapi layouts (64-bit):
 * struct user_msghdr has msg_control at 32 and msg_controllen at 40; struct cmsghdr is cmsg_len
 * (8 bytes), cmsg_level, cmsg_type (4 each), then the data, each message 8-byte aligned. */
#define CWL_MSGHDR_CONTROL 32
#define CWL_MSGHDR_CONTROLLEN 40
#define CWL_CMSG_HDR 16
#define CWL_SOL_SOCKET 1
#define CWL_SCM_RIGHTS 1
#define CWL_PA_CMSGS 4   /* control messages read; a further one is refused unread */
#define CWL_PA_RIGHTS 8  /* descriptors read in one SCM_RIGHTS message; more are refused unread */

BPF_HASH(cwl_pa_recvmsg, u32, u64, CWL_PA_PENDING_MAX); /* tid -> its msghdr, sys_enter to sys_exit */

static __always_inline void cwl_pa_check_rights(u32 label, const char *msg)
{
	const char *ctl = 0;
	u64 len = 0, off = 0;

	if (bpf_probe_read_user(&ctl, sizeof(ctl), msg + CWL_MSGHDR_CONTROL) || !ctl ||
	    bpf_probe_read_user(&len, sizeof(len), msg + CWL_MSGHDR_CONTROLLEN))
		return;
	for (int i = 0; i < CWL_PA_CMSGS; i++) {
		u64 clen = 0, n;
		s32 level = 0, type = 0;
		if (off + CWL_CMSG_HDR > len || bpf_probe_read_user(&clen, sizeof(clen), ctl + off) || clen < CWL_CMSG_HDR)
			return;
		bpf_probe_read_user(&level, sizeof(level), ctl + off + 8);
		bpf_probe_read_user(&type, sizeof(type), ctl + off + 12);
		if (level == CWL_SOL_SOCKET && type == CWL_SCM_RIGHTS) {
			n = (clen - CWL_CMSG_HDR) / sizeof(s32);
			for (int j = 0; j < CWL_PA_RIGHTS; j++) {
				s32 fd = -1;
				if (j >= n)
					break;
				bpf_probe_read_user(&fd, sizeof(fd), ctl + off + CWL_CMSG_HDR + j * sizeof(s32));
				if (cwl_pa_check_hold(label, cwl_pa_file_family(cwl_fd_file(fd))))
					return;
			}
			if (n > CWL_PA_RIGHTS && cwl_pa_check_hold(label, CWL_AF_UNKNOWN))
				return;
		}
		off += (clen + 7) & ~7ULL;
	}
	if (off + CWL_CMSG_HDR <= len)
		cwl_pa_check_hold(label, CWL_AF_UNKNOWN);
}

TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 msg = (u64)args->msg;

	if (cwl_pa_task_label() && cwl_pa_recvmsg.update(&tid, &msg))
		cwl_pa_drop(CWL_PA_DROP_PENDING); /* its SCM_RIGHTS descriptors go unread */
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg)
{
	u32 tid = (u32)bpf_get_current_pid_tgid(), label;
	u64 *m = cwl_pa_recvmsg.lookup(&tid), msg;

	if (!m)
		return 0;
	msg = *m;
	cwl_pa_recvmsg.delete(&tid);
	label = cwl_pa_task_label();
	if (label && args->ret >= 0)
		cwl_pa_check_rights(label, (const char *)msg);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_pidfd_getfd)
{
	u32 label = cwl_pa_task_label();
	if (label && args->ret >= 0)
		cwl_pa_check_hold(label, cwl_pa_file_family(cwl_fd_file(args->ret)));
	return 0;
}

#define CWL_TCP_ESTABLISHED 1 /* include/net/tcp_states.h; a connected UDP socket has it too */

/* cgroup_skb ingress: the skb starts at its IP header. 1 pass, 0 drop.
 * The per-packet path: an unlabelled process's socket passes after one sk-storage lookup; a
 * connected socket (TCP established, connected UDP) whose input was allowed under the live rule
 * generation passes without a parse (its peer and local address cannot change, so neither can the
 * decision until the rules do). Listeners and unconnected UDP sockets are judged per packet. */
int pa_ingress(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct cwl_pa_sock *s;
	struct cwl_pa_query q;
	struct cwl_pa_verdict v;
	u32 gen;
	int ok;

	if (!sk || !(sk = bpf_sk_fullsock(sk)))
		return 1;
	s = cwl_pa_socks.sk_storage_get(sk, 0, 0);
	if (!s || !s->label)
		return 1; /* an unlabelled process's socket */
	gen = cwl_pa_generation() + 1;
	if (gen && s->allowed_gen == gen)
		return 1;
	__builtin_memset(&q, 0, sizeof(q));
	q.label = s->label;
	q.op = CWL_PA_OP_RECEIVE;
	if (cwl_pa_parse(skb, 0, bpf_ntohs(skb->protocol), &q))
		q.proto = 0; /* unreadable: judged as a protocol no rule names */
	ok = cwl_pa_judge(&q, &v);
	if (v.allowed && sk->state == CWL_TCP_ESTABLISHED)
		s->allowed_gen = gen; /* never on a listener: accepted sockets clone its storage */
	return ok;
}

#else /* CWL_BACKEND_LSM */
struct socket;
struct file;
struct sock;
struct sk_buff;
struct msghdr;

#define CWL_EPERM 1
/* Socket address ABI (uapi linux/socket.h, linux/in.h, linux/in6.h): families; sockaddr_in has its
 * port at 2 and address at 4 (16 bytes), sockaddr_in6 its port at 2 and address at 8 (24 bytes). */
#define CWL_AF_UNSPEC 0
#define CWL_AF_INET 2
#define CWL_AF_INET6 10

#if CWL_SZ_SOCK_SKC_FAMILY != 2 || CWL_SZ_SOCK_SKC_NUM != 2 || CWL_SZ_SOCK_SK_PROTOCOL != 2 || \
	CWL_SZ_SK_BUFF_NETWORK_HEADER != 2 || CWL_SZ_SK_BUFF_PROTOCOL != 2
#error "net.bpf.c (lsm): sock family/num/protocol or sk_buff network_header/protocol is not 16 bits in this kernel's BTF"
#endif

/* sock->sk, loaded directly at cext's BTF offset: the verifier types the result from BTF (struct
 * sock), so bpf_sk_storage_get takes it (a probe read would give a number it refuses). */
static __always_inline struct sock *cwl_pa_sock_of(struct socket *sock)
{
	return sock ? *(struct sock **)((const char *)sock + CWL_OFF_SOCKET_SK) : 0;
}

/* A socket's family, protocol and local end (port 0 before a bind) into q. 0, or -1 for a socket
 * that is not IPv4/IPv6 (AF_UNIX, netlink, ...: not Port Authority's). */
static __always_inline int cwl_pa_sock_query(struct sock *sk, struct cwl_pa_query *q)
{
	u16 family = 0, proto = 0, num = 0;

	if (!sk || CWL_READ(family, sk, CWL_OFF_SOCK_SKC_FAMILY) || CWL_READ(proto, sk, CWL_OFF_SOCK_SK_PROTOCOL))
		return -1;
	if (family == CWL_AF_INET) {
		q->family = CWL_PA_INET;
		CWL_READ(q->laddr[0], sk, CWL_OFF_SOCK_SKC_RCV_SADDR);
	} else if (family == CWL_AF_INET6) {
		q->family = CWL_PA_INET6;
		bpf_probe_read_kernel(q->laddr, 16, (const char *)sk + CWL_OFF_SOCK_SKC_V6_RCV_SADDR);
	} else {
		return -1;
	}
	CWL_READ(num, sk, CWL_OFF_SOCK_SKC_NUM);
	q->proto = proto;
	q->lport = num;
	return 0;
}

/* The address a caller gave (the kernel's copy of its sockaddr) into q's local (bind) or remote end.
 * 1: judge it; 0: nothing for Port Authority (AF_UNSPEC on connect is a disconnect; other families
 * and short addresses the kernel refuses itself). */
static __always_inline int cwl_pa_sockaddr(const void *sa, int len, struct cwl_pa_query *q, int local)
{
	u16 fam = 0, port = 0;
	u32 *addr = local ? q->laddr : q->raddr;
	u8 b[24]; /* the address in one read (fewer helper calls: far fewer verifier states); every
		   * caller's address is the kernel's sockaddr_storage copy, so 24 bytes are there */

	if (!sa || len < 2 || bpf_probe_read_kernel(b, sizeof(b), sa))
		return 0;
	__builtin_memcpy(&fam, b, 2);
	__builtin_memcpy(&port, b + 2, 2);
	if (fam == CWL_AF_UNSPEC && local && q->family == CWL_PA_INET)
		fam = CWL_AF_INET; /* inet_bind takes AF_UNSPEC (with INADDR_ANY) as AF_INET */
	if (fam == CWL_AF_INET && len >= 16) {
		q->family = CWL_PA_INET;
		__builtin_memset(addr, 0, 16);
		__builtin_memcpy(addr, b + 4, 4);
	} else if (fam == CWL_AF_INET6 && len >= 24) {
		q->family = CWL_PA_INET6;
		__builtin_memcpy(addr, b + 8, 16);
		cwl_pa_unmap(&q->family, addr);
	} else {
		return 0;
	}
	if (local)
		q->lport = bpf_ntohs(port);
	else
		q->rport = bpf_ntohs(port);
	return 1;
}

/* A socket call of a process under `label` (0: unlabelled, unaffected): stamp its socket with the
 * label, then judge `op`. bind, connect and sendmsg are judged by the address the caller gave
 * (`sa`); listen and accept by the socket's own bound port (accept asks the listen question and
 * is counted as accept; stamping the listener gives the accepting label to the connections it
 * makes later: sk storage is cloned). A listener allowed at its bind is an event, as on the
 * tracepoint backend. 0 or -EPERM. */
static __always_inline int cwl_pa_lsm(u32 label, struct socket *sock, const void *sa, int len, u8 op)
{
	struct sock *sk;
	struct cwl_pa_query q;
	struct cwl_pa_verdict v;
	int ok;

	if (!label)
		return 0;
	sk = cwl_pa_sock_of(sock);
	__builtin_memset(&q, 0, sizeof(q));
	if (cwl_pa_sock_query(sk, &q))
		return 0;
	cwl_pa_stamp(sk, label);
	q.label = label;
	q.op = op == CWL_PA_OP_ACCEPT ? CWL_PA_OP_LISTEN : op;
	if (op != CWL_PA_OP_LISTEN && op != CWL_PA_OP_ACCEPT && !cwl_pa_sockaddr(sa, len, &q, op == CWL_PA_OP_BIND))
		return 0;
	ok = cwl_pa_judge_as(&q, &v, op);
	if (ok && op == CWL_PA_OP_BIND && q.lport && v.allowed)
		cwl_pa_listener(&q, v.rule);
	return ok ? 0 : -CWL_EPERM;
}

LSM_PROBE(socket_post_create, struct socket *sock, int family, int type, int protocol, int kern, int ret)
{
	if (ret)
		return ret;
	if (!kern) /* a kernel socket made on the process's behalf is not its own */
		cwl_pa_stamp(cwl_pa_sock_of(sock), cwl_pa_task_label());
	return 0;
}

/* socket(2) of a family Port Authority cannot judge (AF_PACKET) by a labelled process: -EPERM
 * before the socket exists (cwl_pa_decide_socket, as sys_enter_socket on the tracepoint side). */
LSM_PROBE(socket_create, int family, int type, int protocol, int kern, int ret)
{
	u32 label, why;

	if (ret || kern)
		return ret;
	label = cwl_pa_task_label();
	why = cwl_pa_decide_socket(label, (u32)family);
	if (why != CWL_PA_WHY_NONE && cwl_pa_refuse(label, CWL_PA_OP_SOCKET, why, CWL_ACT_DENIED))
		return -CWL_EPERM;
	return 0;
}

/* A descriptor arriving from another process (SCM_RIGHTS, pidfd_getfd: security_file_receive): a
 * network socket made outside the label is refused (cwl_pa_decide_hold), as the tracepoint side's
 * recvmsg/pidfd_getfd exits do. */
LSM_PROBE(file_receive, struct file *file, int ret)
{
	u32 label, why;

	if (ret)
		return ret;
	label = cwl_pa_task_label();
	if (!label)
		return 0;
	why = cwl_pa_decide_hold(label, cwl_pa_file_family(file));
	if (why != CWL_PA_WHY_NONE && cwl_pa_refuse(label, CWL_PA_OP_HOLD, why, CWL_ACT_DENIED))
		return -CWL_EPERM;
	return 0;
}

LSM_PROBE(socket_bind, struct socket *sock, void *address, int addrlen, int ret)
{
	return ret ? ret : cwl_pa_lsm(cwl_pa_task_label(), sock, address, addrlen, CWL_PA_OP_BIND);
}

LSM_PROBE(socket_connect, struct socket *sock, void *address, int addrlen, int ret)
{
	return ret ? ret : cwl_pa_lsm(cwl_pa_task_label(), sock, address, addrlen, CWL_PA_OP_CONNECT);
}

/* A datagram (or a TCP fast open, which skips socket_connect) to an address: as connect. */
LSM_PROBE(socket_sendmsg, struct socket *sock, struct msghdr *msg, int size, int ret)
{
	const void *name = 0;
	int namelen = 0;
	u32 label;

	if (ret)
		return ret;
	label = cwl_pa_task_label();
	if (!label || !msg || CWL_READ(name, msg, CWL_OFF_MSGHDR_MSG_NAME) || !name ||
	    CWL_READ(namelen, msg, CWL_OFF_MSGHDR_MSG_NAMELEN))
		return 0; /* unlabelled, or a connected socket: judged at its connect */
	return cwl_pa_lsm(label, sock, name, namelen, CWL_PA_OP_SEND);
}

LSM_PROBE(socket_listen, struct socket *sock, int backlog, int ret)
{
	return ret ? ret : cwl_pa_lsm(cwl_pa_task_label(), sock, 0, 0, CWL_PA_OP_LISTEN);
}

LSM_PROBE(socket_accept, struct socket *sock, struct socket *newsock, int ret)
{
	return ret ? ret : cwl_pa_lsm(cwl_pa_task_label(), sock, 0, 0, CWL_PA_OP_ACCEPT);
}

/* A packet about to be queued on `sk` (softirq, from sk_filter): the label is the socket's. */
LSM_PROBE(socket_sock_rcv_skb, struct sock *sk, struct sk_buff *skb, int ret)
{
	struct cwl_pa_sock *s;
	const char *head = 0;
	u16 nh = 0, proto = 0;
	struct cwl_pa_query q;
	struct cwl_pa_verdict v;

	if (ret)
		return ret;
	s = cwl_pa_socks.sk_storage_get(sk, 0, 0);
	if (!s || !s->label)
		return 0; /* an unlabelled process's socket */
	__builtin_memset(&q, 0, sizeof(q));
	q.label = s->label;
	q.op = CWL_PA_OP_RECEIVE;
	if (!skb || CWL_READ(head, skb, CWL_OFF_SK_BUFF_HEAD) || !head || CWL_READ(nh, skb, CWL_OFF_SK_BUFF_NETWORK_HEADER) ||
	    CWL_READ(proto, skb, CWL_OFF_SK_BUFF_PROTOCOL) || cwl_pa_parse_kmem(head + nh, bpf_ntohs(proto), &q))
		q.proto = 0; /* unreadable: judged as a protocol no rule names */
	return cwl_pa_judge(&q, &v) ? 0 : -CWL_EPERM;
}
#endif

/* tc clsact ingress: Ethernet first. TC_ACT_OK or TC_ACT_SHOT. */
int pa_tc_ingress(struct __sk_buff *skb)
{
	struct cwl_pa_query q;
	struct cwl_pa_verdict v;

	__builtin_memset(&q, 0, sizeof(q));
	q.op = CWL_PA_OP_PACKET;
	if (cwl_pa_parse(skb, CWL_ETH_HLEN, bpf_ntohs(skb->protocol), &q))
		return TC_ACT_OK; /* no IP: no port to guard */
	return cwl_pa_judge(&q, &v) ? TC_ACT_OK : TC_ACT_SHOT;
}
