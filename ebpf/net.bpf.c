/* net.bpf.c: Port Authority, one source; the decision is pa_decide.h's.
 *
 * portauthority.engine compiles it with -DCWL_BACKEND_TP beside prima.engine's
 * exec.bpf.c: a process's label is the one PRIMA keeps, never a copy. PRIMA's label
 * map is handed over by fd (cwl_pa_label_src below), not found by name. Programs
 * (tracepoint backend: kernels that refuse BPF LSM):
 *   pa_sock_create  cgroup/sock_create (root cgroup): a socket made by a labelled
 *                   process carries its label (sk storage, cloned to accepted sockets)
 *   pa_bind4/6      cgroup/bind4, bind6: EPERM unless a rule opens the port
 *   pa_connect4/6   cgroup/connect4, connect6: EPERM unless a connect rule names the peer
 *   pa_sendmsg4/6   cgroup/sendmsg4, sendmsg6 (UDP with an address): as connect
 *   pa_ingress      cgroup_skb ingress (root cgroup): a packet reaching a labelled
 *                   socket is dropped unless a rule lets the label receive it
 *   pa_tc_ingress   tc clsact ingress on the host's interfaces: a packet to a port a
 *                   listen rule governs, from a peer no such rule admits, is dropped
 *                   before any socket sees it
 * Refusals are counted per (label, rule, op, port, reason) in cwl_pa_counts (per CPU):
 * the engine logs each interval's counts as one entry per key, so a flood makes
 * counts, not entries. A listener a rule allows is an event (cwl_pa_events).
 * recvmsg4/6 cannot refuse (the kernel wants 1 from them): receiving is cgroup_skb's.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include "pa_decide.h"

#if !defined(CWL_BACKEND_TP)
#error "net.bpf.c: -DCWL_BACKEND_TP (portauthority.engine) is the one backend built so far"
#endif
#if !defined(CWL_PA_COUNT_MAX) || !defined(CWL_PA_RINGBUF_PAGES)
#error "CWL_PA_COUNT_MAX/PA_RINGBUF_PAGES missing: sizes come from portauthority.engine"
#endif

/* PRIMA's label map, the one source of a process's label, handed over by fd: the engine puts
 * prima.engine.Engine.label_map_fd into slot 0 of cwl_pa_label_src (a map-in-map slot holds a
 * reference to the map itself, so it is always the live engine's map). Not a bcc "extern"
 * table: bcc resolves those by name in a process-wide store that keeps the FIRST declaring
 * engine's fd, stale once that engine closed. cwl_pa_label_shape only gives the slot its shape,
 * which the kernel holds PRIMA's map to (bpf_map_meta_equal: type, key and value size, flags;
 * a hash's max_entries is not compared); nothing reads or writes it. */
BPF_TABLE("hash", u32, struct cwl_task_label, cwl_pa_label_shape, 1);
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
	u32 tgid = bpf_get_current_pid_tgid() >> 32, zero = 0;
	struct cwl_task_label *tl;
	void *labels = cwl_pa_label_src.lookup(&zero);

	if (!labels) {
		cwl_pa_drop(CWL_PA_DROP_LABELS); /* no label map handed over: judged unlabelled, counted */
		return 0;
	}
	tl = bpf_map_lookup_elem(labels, &tgid);
	if (!tl || tl->label == CWL_LABEL_DAEMON)
		return 0;
	return tl->label;
}

/* Count one refusal (or audit-mode allowance) under its key; a full map is counted too. */
static __always_inline void cwl_pa_count(const struct cwl_pa_query *q, const struct cwl_pa_verdict *v, u8 action)
{
	struct cwl_pa_count_key key;
	u64 zero = 0, *n;

	__builtin_memset(&key, 0, sizeof(key));
	key.label = q->label;
	key.rule = v->rule;
	key.port = (q->op == CWL_PA_OP_CONNECT || q->op == CWL_PA_OP_SEND) ? q->rport : q->lport;
	key.proto = q->proto;
	key.op = q->op;
	key.why = v->why;
	key.action = action;
	n = cwl_pa_counts.lookup_or_try_init(&key, &zero);
	if (n)
		*n += 1;
	else
		cwl_pa_drop(CWL_PA_DROP_COUNT);
}

/* Decide `q` (the verdict into *v); count a refusal. 1: let it happen; 0: refuse (enforce mode). */
static __always_inline int cwl_pa_judge(struct cwl_pa_query *q, struct cwl_pa_verdict *v)
{
	const struct cwl_pa_set *set = cwl_pa_live();
	u32 enforce = set ? set->enforce : 1;

	*v = cwl_pa_decide(set, q);
	if (v->allowed)
		return 1;
	cwl_pa_count(q, v, enforce ? CWL_ACT_DENIED : CWL_ACT_ALLOWED);
	return enforce ? 0 : 1;
}

/* Give a labelled process's socket its label (sk storage). */
static __always_inline void cwl_pa_stamp(struct bpf_sock *sk, u32 label)
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
	}
	if (op == CWL_PA_OP_BIND)
		q->lport = port;
	else
		q->rport = port;
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
