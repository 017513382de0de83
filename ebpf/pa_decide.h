/* pa_decide.h: Port Authority's decision, written once for every hook of both backends.
 *
 * net.bpf.c includes it for the tracepoint backend's cgroup and tc programs
 * (-DCWL_BACKEND_TP) and for the lsm backend's socket hooks (-DCWL_BACKEND_LSM);
 * the -D changes only where a hook's facts come from and how a refusal is
 * returned (0 from a cgroup program, TC_ACT_SHOT, -EPERM), never the decision.
 * portauthority/rules.py answers the same question for `cwlite pa test` from the
 * policy alone; tests/kernel/test_pa_kernel.py holds the two to the same answers.
 *
 * The rule set is one map value (struct cwl_pa_set, cwlite.h) that the hook
 * looks up and passes in: bcc rewrites map operations only in the main source.
 *
 * A query (label, op, protocol, local and remote address and port) is allowed
 * when some rule of the label (any label for tc's CWL_PA_OP_PACKET) says so:
 *   bind       a listen rule for the port whose local address (if set) is the one
 *              bound; port 0 (an ephemeral port) with any rule for the protocol
 *   listen     a listen rule for the port
 *   accept, receive on a listen rule's port, packet
 *              a listen rule for the port, and the peer in its networks
 *   connect, send   a connect rule for the remote port, the peer in its networks
 *   receive    also: a connect rule for the remote port with the peer in its networks
 *              (the replies to what the label may connect to)
 * tc's packet query refuses only packets to a port some listen rule governs,
 * from a peer no such rule admits: ports no rule names stay with unlabelled processes.
 *
 * Every judgement above is made on a socket of the label (sock_create stamps it); a socket
 * Port Authority cannot judge is refused at socket() (cwl_pa_decide_socket).
 */
#ifndef CWL_PA_DECIDE_H
#define CWL_PA_DECIDE_H

#include "cwlite.h"

/* An IPv6 address that is IPv4-mapped (::ffff:a.b.c.d) is IPv4 on the wire and in every per-packet
 * view (cgroup_skb, tc, sock_rcv_skb): judge it as a.b.c.d. `*family` CWL_PA_INET6 on entry.
 * Branch-free (masks, and an empty asm so LLVM cannot turn them back into a select): a branch
 * here would double the paths the verifier walks through the rule loop after it, which 6.1's
 * LSM socket_connect program cannot afford. */
static __always_inline void cwl_pa_unmap(u8 *family, u32 *addr)
{
	u32 x = addr[0] | addr[1] | (addr[2] ^ bpf_htonl(0xffff));
	u32 mapped = ((x | (0u - x)) >> 31) ^ 1; /* 1: x == 0 */
	u32 all;

	asm volatile("" : "+r"(mapped));
	all = 0u - mapped;                       /* all ones when mapped */
	*family = (u8)(CWL_PA_INET6 - (mapped * (CWL_PA_INET6 - CWL_PA_INET)));
	addr[0] ^= (addr[0] ^ addr[3]) & all;
	addr[2] &= ~all;
	addr[3] &= ~all;
}

/* The bits by which `addr` (family `family`) falls outside network `n`: 0 = inside. */
static __always_inline u32 cwl_pa_net_diff(const struct cwl_pa_net *n, u8 family, const u32 *addr)
{
	return ((addr[0] ^ n->addr[0]) & n->mask[0]) | ((addr[1] ^ n->addr[1]) & n->mask[1]) |
	       ((addr[2] ^ n->addr[2]) & n->mask[2]) | ((addr[3] ^ n->addr[3]) & n->mask[3]) |
	       (u32)(n->family ^ family);
}

/* Is the peer of `q` one of rule `r`'s networks (no networks: any peer)? Each network is one
 * branch that returns at once: a flag carried across them would double the verifier's paths per
 * network (LLVM turns selects back into branches). */
static __always_inline int cwl_pa_peer_ok(const struct cwl_pa_rule *r, const struct cwl_pa_query *q)
{
	u32 nnets = r->nnets;

	if (nnets == 0)
		return 1;
	/* Unrolled: as a loop, clang counts min(nnets, CWL_PA_NETS) down in a register that 6.1's
	 * verifier tracks only as a range, and it then walks past the rule set (seen in the VM). */
#pragma unroll
	for (u32 i = 0; i < CWL_PA_NETS; i++) {
		if (i >= nnets)
			return 0;
		if (cwl_pa_net_diff(&r->nets[i], q->family, q->raddr) == 0)
			return 1;
	}
	return 0;
}

/* Is the local address of `q` the rule's (no address in the rule: any)? A wildcard bind
 * (0.0.0.0, ::) is not the rule's one address. */
static __always_inline int cwl_pa_local_ok(const struct cwl_pa_rule *r, const struct cwl_pa_query *q)
{
	if (!r->local_family)
		return 1;
	return ((r->local_addr[0] ^ q->laddr[0]) | (r->local_addr[1] ^ q->laddr[1]) | (r->local_addr[2] ^ q->laddr[2]) |
		(r->local_addr[3] ^ q->laddr[3]) | (u32)(r->local_family ^ q->family)) == 0;
}

/* `allowed` is the verdict; `rule` and `why` are data for the count, never branched on: the
 * verifier then need not tell apart the loop states that differ only in them (a rule set of
 * CWL_PA_RULES rules stays far below its complexity limit). */
struct cwl_pa_verdict {
	u32 allowed;
	u32 rule; /* 1-based index of the deciding rule (allowed) or of the closest one (refused); 0: none */
	u32 why;  /* CWL_PA_WHY_*: NONE when allowed */
};

/* The decision for query `q` under rule set `set` (NULL: no rule set loaded, refuse). */
static __always_inline struct cwl_pa_verdict cwl_pa_decide(const struct cwl_pa_set *set, const struct cwl_pa_query *q)
{
	struct cwl_pa_verdict v = {.allowed = 0, .rule = 0, .why = CWL_PA_WHY_NO_RULE};
	u64 bit = q->label < 64 ? (1ULL << q->label) : 0;
	u32 n, packet = q->op == CWL_PA_OP_PACKET;

	if (q->proto != CWL_PA_TCP && q->proto != CWL_PA_UDP) {
		v.allowed = packet; /* tc guards TCP and UDP ports only */
		v.why = packet ? CWL_PA_WHY_NONE : CWL_PA_WHY_PROTO;
		return v;
	}
	if (!set)
		return v;
	n = set->nrules;
	if (packet)
		v.why = CWL_PA_WHY_NONE; /* not governed until a listen rule names the port */
	for (int i = 0; i < CWL_PA_RULES; i++) {
		const struct cwl_pa_rule *r = &set->rules[i];
		if (i >= n)
			break;
		if (r->proto != q->proto || (!packet && !(r->labels & bit)))
			continue;
		if (r->kind == CWL_PA_RULE_LISTEN) {
			if (q->op == CWL_PA_OP_BIND && q->lport == 0)
				goto allow;
			if (r->port != q->lport || q->op == CWL_PA_OP_CONNECT || q->op == CWL_PA_OP_SEND)
				continue;
			if (q->op == CWL_PA_OP_BIND) {
				if (cwl_pa_local_ok(r, q))
					goto allow;
				v.rule = i + 1;
				v.why = CWL_PA_WHY_ADDRESS;
				continue;
			}
			if (q->op == CWL_PA_OP_LISTEN)
				goto allow;
		} else {
			if (q->op == CWL_PA_OP_BIND && q->lport == 0)
				goto allow;
			if (r->port != q->rport || (q->op != CWL_PA_OP_CONNECT && q->op != CWL_PA_OP_SEND &&
						    q->op != CWL_PA_OP_RECEIVE))
				continue;
		}
		/* accept, receive, packet, connect, send: the peer decides */
		if (cwl_pa_peer_ok(r, q)) {
allow:
			v.allowed = 1;
			v.rule = i + 1;
			v.why = CWL_PA_WHY_NONE;
			return v;
		}
		v.rule = i + 1;
		v.why = CWL_PA_WHY_PEER;
	}
	/* tc: a packet no listen rule governs passes (why still NONE); branch-free, see above */
	v.allowed = packet & ((v.why - 1) >> 31);
	return v;
}

/* May a process of `label` make a socket of family `family`? An AF_PACKET socket sees every
 * packet on the host and no program of Port Authority judges its input (cgroup sock_create,
 * sock_addr and cgroup_skb run for inet sockets only): a labelled process may not have one.
 * Inet sockets, raw ones included, are stamped and judged packet by packet; AF_UNIX and
 * netlink carry no network input. CWL_PA_WHY_NONE: allowed. */
static __always_inline u32 cwl_pa_decide_socket(u32 label, u32 family)
{
	return label && family == CWL_AF_PACKET ? CWL_PA_WHY_PROTO : CWL_PA_WHY_NONE;
}

/* May a process of `label` hold a socket of family `family` that was made outside the label (one it
 * kept across the exec into the label, took with pidfd_getfd or received over SCM_RIGHTS)? No program judged what such an
 * inet or packet socket already holds or will carry (its sk storage has no label: input to it
 * passes as an unlabelled process's). AF_UNIX and netlink carry no network input. */
static __always_inline u32 cwl_pa_decide_hold(u32 label, u32 family)
{
	if (!label || (family != CWL_AF_INET && family != CWL_AF_INET6 && family != CWL_AF_PACKET &&
		       family != CWL_AF_UNKNOWN))
		return CWL_PA_WHY_NONE;
	return CWL_PA_WHY_FOREIGN;
}

/* ---- packets: what cgroup_skb (L3 at offset 0) and tc (L2 first) read, once ----------- */

#define CWL_ETH_HLEN 14
#define CWL_ETH_P_IP 0x0800
#define CWL_ETH_P_IPV6 0x86DD

/* `len` packet bytes at `off` of `pkt` into `to`: a program's __sk_buff through bpf_skb_load_bytes
 * (tc, cgroup_skb), or, when `kmem` (a constant per caller: the other branch is compiled away),
 * kernel memory from the IP header an LSM hook's struct sk_buff points to. */
static __always_inline int cwl_pa_load(void *pkt, u32 off, void *to, u32 len, int kmem)
{
	if (kmem)
		return bpf_probe_read_kernel(to, len, (const char *)pkt + off);
	return bpf_skb_load_bytes(pkt, off, to, len);
}

/* IPv6 extension headers walked to the transport header (RFC 8200 4.1): hop-by-hop options (0),
 * routing (43) and destination options (60), each (hdr ext len + 1) * 8 bytes, and the fragment
 * header (44, 8 bytes) of a first fragment. cgroup_skb and the LSM hook see reassembled packets;
 * tc sees fragments, and a later one (its offset is not 0) has no transport header. */
#define CWL_PA_IPV6_EXT_MAX 4
#define CWL_IPV6_HOPOPTS 0
#define CWL_IPV6_ROUTING 43
#define CWL_IPV6_FRAGMENT 44
#define CWL_IPV6_DSTOPTS 60
#define CWL_IP_OFFSET 0x1fff /* IPv4 fragment offset (8-byte units) in the flags/offset word */

/* Fill q's family, protocol, addresses and ports from the IP packet at `off` of `pkt` (see
 * cwl_pa_load for `kmem`). 0, or -1 when it is no IPv4/IPv6 packet cwlite can read (then the
 * caller passes it). A fragment after the first (IPv4 or IPv6) has no ports: they stay 0, and an
 * IPv6 one keeps proto = 44. An IPv6 packet whose chain of extension headers is longer than
 * CWL_PA_IPV6_EXT_MAX keeps proto = the header the walk stopped at (no rule names it). */
static __always_inline int cwl_pa_parse_from(void *pkt, u32 off, u32 ethertype, struct cwl_pa_query *q, int kmem)
{
	u8 ip[40]; /* the fixed header in one load: IPv4's first 20 bytes, IPv6's 40 */
	u16 ports[2] = {0, 0};
	u32 l4;

	if (ethertype == CWL_ETH_P_IP) {
		if (cwl_pa_load(pkt, off, ip, 20, kmem) || (ip[0] >> 4) != 4)
			return -1;
		q->family = CWL_PA_INET;
		q->proto = ip[9];
		__builtin_memcpy(q->raddr, ip + 12, 4);
		__builtin_memcpy(q->laddr, ip + 16, 4);
		if (((ip[6] << 8) | ip[7]) & CWL_IP_OFFSET)
			return 0; /* a later fragment: its first bytes are data, not ports */
		l4 = off + (ip[0] & 0x0f) * 4;
	} else if (ethertype == CWL_ETH_P_IPV6) {
		u8 next;
		if (cwl_pa_load(pkt, off, ip, 40, kmem))
			return -1;
		next = ip[6];
		__builtin_memcpy(q->raddr, ip + 8, 16);
		__builtin_memcpy(q->laddr, ip + 24, 16);
		q->family = CWL_PA_INET6;
		l4 = off + 40;
		for (int i = 0; i < CWL_PA_IPV6_EXT_MAX; i++) {
			u8 h[4] = {0, 0, 0, 0};
			if (next != CWL_IPV6_HOPOPTS && next != CWL_IPV6_ROUTING && next != CWL_IPV6_DSTOPTS &&
			    next != CWL_IPV6_FRAGMENT)
				break;
			if (cwl_pa_load(pkt, l4, h, 4, kmem))
				return -1;
			if (next == CWL_IPV6_FRAGMENT) {
				if (((h[2] << 8) | h[3]) & 0xfff8)
					break; /* a later fragment: no transport header */
				l4 += 8;
			} else {
				l4 += (h[1] + 1) * 8;
			}
			next = h[0];
		}
		q->proto = next;
	} else {
		return -1;
	}
	if (q->proto == CWL_PA_TCP || q->proto == CWL_PA_UDP) {
		if (cwl_pa_load(pkt, l4, ports, 4, kmem))
			return -1;
		q->rport = bpf_ntohs(ports[0]);
		q->lport = bpf_ntohs(ports[1]);
	}
	return 0;
}

/* The IP packet at `off` of a tc or cgroup_skb program's `skb` (see cwl_pa_parse_from). */
static __always_inline int cwl_pa_parse(struct __sk_buff *skb, u32 off, u32 ethertype, struct cwl_pa_query *q)
{
	return cwl_pa_parse_from(skb, off, ethertype, q, 0);
}

/* The IP packet whose header is at kernel address `l3` (an LSM hook's struct sk_buff: head +
 * network_header; see cwl_pa_parse_from). */
static __always_inline int cwl_pa_parse_kmem(const char *l3, u32 ethertype, struct cwl_pa_query *q)
{
	return cwl_pa_parse_from((void *)l3, 0, ethertype, q, 1);
}

#endif /* CWL_PA_DECIDE_H */
