/* selfprotect.h: enforcement protects itself, on both backends (exec.bpf.c's "self-protection" section).
 *
 * Who is cwlite:
 *   - the daemon: the process that loaded these programs (cwl_daemon: its tgid and process group,
 *     written once at start, then frozen), and its threads (cwl_daemon_threads, kept by the daemon);
 *     its own tasks carry the reserved label CWL_LABEL_DAEMON, so the rule "only a subject's own
 *     label may ptrace it or write its memory" covers it; PRIMA treats that label as unlabelled
 *     (the daemon runs python, bcc and clang) and children of the daemon do not inherit it;
 *   - cwlite's objects: the ids of this engine's programs and of every map they use (cwl_objs, kept
 *     by the daemon; each policy generation's maps are added when they are made).
 * What is guarded:
 *   - bpf(2) commands that write or delete map entries, freeze a map, or update/detach a link, on one
 *     of cwlite's objects, by any process but the daemon: lsm denies them (-EPERM, `bpf` hook);
 *     tracepoint kills the caller (sys_enter_bpf; the command itself still runs: a tracepoint cannot
 *     fail a syscall). Both log a violation. Reads (lookups, dumps, info) stay allowed.
 *   - signals from a TP (a labelled process) to the daemon: lsm denies them (task_kill); tracepoint
 *     kills the sender (sys_enter_kill/tkill/tgkill/rt_(tg)sigqueueinfo/pidfd_send_signal; the signal
 *     is still delivered). Both log a violation.
 * The policy's generation maps are frozen by the engine (BPF_MAP_FREEZE), so bpf(2) cannot write them
 * at all, whoever asks.
 *
 * Map OPERATIONS stay in exec.bpf.c (bcc rewrites them only in the main source); this header holds
 * layouts, constants, the maps' declarations and the probe reads. Python reads every number here
 * through ebpf.abi (CWL_LABEL_DAEMON, the ops, reasons and bpf commands events carry).
 */
#ifndef CWL_SELFPROTECT_H
#define CWL_SELFPROTECT_H

#include "cwlite.h"

#if !defined(CWL_OFF_FILE_PRIVATE_DATA) || !defined(CWL_OFF_BPF_MAP_ID) || !defined(CWL_OFF_BPF_PROG_AUX) || \
	!defined(CWL_OFF_BPF_PROG_AUX_ID) || !defined(CWL_OFF_BPF_LINK_PROG)
#error "CWL_OFF_FILE_PRIVATE_DATA/BPF_MAP_ID/BPF_PROG_AUX/BPF_PROG_AUX_ID/BPF_LINK_PROG missing: offsets come from cext (BTF)"
#endif

/* The daemon's reserved label, CWL_LABEL_DAEMON, is cwlite.h's (Port Authority skips it too). */

/* Threads of the daemon the engine tracks (signals aimed at a thread id). */
#define CWL_DAEMON_THREADS_MAX 1024
/* Objects of one engine: programs, the maps they use, two generations of policy maps. */
#define CWL_OBJS_MAX 256

struct cwl_daemon {
	u32 tgid; /* 0: not recorded yet (the engine is still starting: nothing to guard) */
	u32 pgid;
};

/* cwl_objs key: (kind << 32) | kernel id. */
#define CWL_OBJ_MAP 1ULL
#define CWL_OBJ_PROG 2ULL

/* Event ops and reasons (struct cwl_event.op/why; PRIMA's are below 16, CDI's 16..23). */
#define CWL_OP_BPF 26    /* a bpf(2) write on cwlite's object: dev = command, ino = (kind << 32) | id */
#define CWL_OP_SIGNAL 25 /* a signal to the daemon: dev = signal, ino = the pid/tid/group aimed at */
#define CWL_WHY_NOT_DAEMON 24 /* only the daemon may change cwlite's maps and links */
#define CWL_WHY_TP_SIGNAL 25  /* a TP may not signal the daemon */

/* bpf(2) commands (uapi linux/bpf.h enum bpf_cmd: ABI, append-only) that change a map or a link. */
#define CWL_BPF_MAP_UPDATE_ELEM 2
#define CWL_BPF_MAP_DELETE_ELEM 3
#define CWL_BPF_MAP_LOOKUP_AND_DELETE_ELEM 21
#define CWL_BPF_MAP_FREEZE 22
#define CWL_BPF_MAP_LOOKUP_AND_DELETE_BATCH 25
#define CWL_BPF_MAP_UPDATE_BATCH 26
#define CWL_BPF_MAP_DELETE_BATCH 27
#define CWL_BPF_LINK_UPDATE 29
#define CWL_BPF_LINK_DETACH 34
/* Where the command's object fd sits in union bpf_attr (uapi): map_fd / link_fd first, except batch.map_fd. */
#define CWL_BPF_ATTR_FD 0
#define CWL_BPF_ATTR_BATCH_MAP_FD 36

/* uapi sched.h; pid_type (include/linux/pid.h: PID, TGID, PGID, SID) is unchanged since 4.19. */
#define CWL_CLONE_THREAD 0x00010000
#define CWL_PIDTYPE_PGID 2

BPF_ARRAY(cwl_daemon, struct cwl_daemon, 1);
BPF_HASH(cwl_daemon_threads, u32, u8, CWL_DAEMON_THREADS_MAX);
BPF_HASH(cwl_objs, u64, u8, CWL_OBJS_MAX);

/* Where the object fd of bpf command `cmd` sits in its attr, or -1 for a command that changes nothing. */
static __always_inline int cwl_bpf_cmd_fd_offset(u32 cmd, u64 *kind)
{
	switch (cmd) {
	case CWL_BPF_MAP_UPDATE_ELEM:
	case CWL_BPF_MAP_DELETE_ELEM:
	case CWL_BPF_MAP_LOOKUP_AND_DELETE_ELEM:
	case CWL_BPF_MAP_FREEZE:
		*kind = CWL_OBJ_MAP;
		return CWL_BPF_ATTR_FD;
	case CWL_BPF_MAP_LOOKUP_AND_DELETE_BATCH:
	case CWL_BPF_MAP_UPDATE_BATCH:
	case CWL_BPF_MAP_DELETE_BATCH:
		*kind = CWL_OBJ_MAP;
		return CWL_BPF_ATTR_BATCH_MAP_FD;
	case CWL_BPF_LINK_UPDATE:
	case CWL_BPF_LINK_DETACH:
		*kind = CWL_OBJ_PROG; /* a link is judged by the program it runs */
		return CWL_BPF_ATTR_FD;
	default:
		return -1;
	}
}

/* The cwl_objs key of the BPF object behind descriptor `fd` of the current task, or 0 when it is not
 * one of `kind` (a map for CWL_OBJ_MAP; a link, judged by its program, for CWL_OBJ_PROG). The file's
 * type is told by its anon-inode name (kernel/bpf/syscall.c: "bpf-map"; "bpf_link" when made,
 * "bpf-link" when reopened by id), so a descriptor
 * of another kind is never read as a map. */
static __always_inline u64 cwl_bpf_fd_key(s64 fd, u64 kind)
{
	const void *file = cwl_fd_file(fd), *dentry = 0, *obj = 0;
	const char *name = 0;
	char n[8] = {};
	u32 id = 0;

	if (!file || CWL_READ(dentry, file, CWL_OFF_FILE_F_PATH_DENTRY) || !dentry)
		return 0;
	if (CWL_READ(name, dentry, CWL_OFF_DENTRY_D_NAME_NAME) || !name || bpf_probe_read_kernel(n, sizeof(n), name))
		return 0;
	if (CWL_READ(obj, file, CWL_OFF_FILE_PRIVATE_DATA) || !obj)
		return 0;
	if (n[0] != 'b' || n[1] != 'p' || n[2] != 'f')
		return 0;
	if (kind == CWL_OBJ_MAP && n[3] == '-' && n[4] == 'm' && n[5] == 'a' && n[6] == 'p' && n[7] == 0) {
		CWL_READ(id, obj, CWL_OFF_BPF_MAP_ID);
	} else if (kind == CWL_OBJ_PROG && (n[3] == '_' || n[3] == '-') && n[4] == 'l' && n[5] == 'i' && n[6] == 'n' &&
		   n[7] == 'k') {
		const void *prog = 0, *aux = 0;
		if (CWL_READ(prog, obj, CWL_OFF_BPF_LINK_PROG) || !prog || CWL_READ(aux, prog, CWL_OFF_BPF_PROG_AUX) || !aux)
			return 0;
		CWL_READ(id, aux, CWL_OFF_BPF_PROG_AUX_ID);
	}
	return id ? (kind << 32) | id : 0;
}

/* The process group of the current task (task->signal->pids[PIDTYPE_PGID]->numbers[0].nr). */
static __always_inline u32 cwl_current_pgid(void)
{
	const void *task = (const void *)bpf_get_current_task();
	const void *sig = 0, *pid = 0;
	u32 nr = 0;

	if (CWL_READ(sig, task, CWL_OFF_TASK_STRUCT_SIGNAL) || !sig)
		return 0;
	if (bpf_probe_read_kernel(&pid, sizeof(pid), (const char *)sig + CWL_OFF_SIGNAL_STRUCT_PIDS +
						       CWL_PIDTYPE_PGID * sizeof(void *)) || !pid)
		return 0;
	CWL_READ(nr, pid, CWL_OFF_PID_NUMBERS_NR);
	return nr;
}

/* The pid a pidfd names (struct pid: file->private_data, or the pidfs inode's i_private on 6.9+), or 0. */
static __always_inline u32 cwl_pidfd_nr(s64 fd)
{
	const void *file = cwl_fd_file(fd), *pid = 0, *inode = 0;
	u32 nr = 0;

	if (!file)
		return 0;
	if (!CWL_READ(inode, file, CWL_OFF_FILE_F_INODE) && inode)
		CWL_READ(pid, inode, CWL_OFF_INODE_I_PRIVATE);
	if (!pid)
		CWL_READ(pid, file, CWL_OFF_FILE_PRIVATE_DATA);
	if (pid)
		CWL_READ(nr, pid, CWL_OFF_PID_NUMBERS_NR);
	return nr;
}

#endif /* CWL_SELFPROTECT_H */
