/* probe.bpf.c: what `cwlite status` loads to learn what this kernel allows.
 *
 * -DCWL_PROBE_LSM: one BPF LSM program (bprm_check_security) that allows all.
 * otherwise: a sched_process_exec tracepoint counting execs per tgid and
 * recording the exec'd image's identity (cwl_file_identity), plus a
 * cgroup_skb and a sched_cls program that are only loaded, never attached.
 */
#include "cwlite.h"

#ifdef CWL_PROBE_LSM
struct linux_binprm;
LSM_PROBE(bprm_check_security, struct linux_binprm *bprm)
{
	return 0;
}
#else
BPF_HASH(cwl_probe_execs, u32, u64, 1024);
/* The identity of the image each tgid exec'd, to check userspace's view of (dev, ino, ctime). */
BPF_HASH(cwl_probe_exe, u32, struct cwl_file_id, 1024);

TRACEPOINT_PROBE(sched, sched_process_exec)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	u64 one = 1, *n = cwl_probe_execs.lookup(&tgid);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		cwl_probe_execs.update(&tgid, &one);

	struct cwl_file_id id;
	if (cwl_file_identity(cwl_current_exe_file(), &id) == 0)
		cwl_probe_exe.update(&tgid, &id);
	return 0;
}

int cwl_probe_skb(struct __sk_buff *skb)
{
	return 1;
}
#endif
