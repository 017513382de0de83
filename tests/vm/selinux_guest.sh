#!/bin/sh
# Guest side of tests/vm/test_selinux_vm.py: load the linked policy, label a CDI on
# a tmpfs, and write it from the TP domain and from user_t under enforcing.
# $1: the results dir (policy.33 in, results out). Each step's outcome is a line in $1/result.
R=$1
out() { echo "$1" >> "$R/result"; }
: > "$R/result"
echo 0 > /proc/sys/kernel/printk_ratelimit   # every AVC reaches dmesg (no auditd in the guest)
mount -t selinuxfs selinuxfs /sys/fs/selinux 2>/dev/null
# one write(2): selinuxfs refuses a policy split over several writes
/usr/bin/python3 -c "import os, sys; d = open(sys.argv[1], 'rb').read(); fd = os.open('/sys/fs/selinux/load', os.O_WRONLY); sys.exit(os.write(fd, d) != len(d))" "$R/policy.33"
out "load=$?"
out "self=$(cat /proc/self/attr/current)"
mkdir -p /run/cwl && mount -t tmpfs tmpfs /run/cwl && mkdir /run/cwl/tp
echo base > /run/cwl/cdi
cp /bin/busybox /run/cwl/sh && cp /bin/busybox /run/cwl/tp/sh
# busybox is static: no library has to be labelled. Only the TP's entrypoint type enters the TP domain.
chcon system_u:object_r:tmp_t:s0 /run/cwl /run/cwl/tp
chcon system_u:object_r:cwlite_cdi0_t:s0 /run/cwl/cdi
chcon system_u:object_r:shell_exec_t:s0 /run/cwl/sh
chcon system_u:object_r:cwlite_tp_build_exec_t:s0 /run/cwl/tp/sh
out "labels=$(ls -Z /run/cwl/cdi /run/cwl/tp/sh | tr '\n' ' ')"

# Enter each domain while permissive (kernel_t may not transition), then enforce before the write.
attempt() {  # $1 name, $2 context, $3 program
	# The child resolves nothing on the unlabelled 9p root: relative paths from /run/cwl, and a
	# shell-builtin wait instead of sleep (busybox would re-exec itself through /proc).
	(cd /run/cwl && exec runcon "$2" "$3" -c 'i=0; while [ $i -lt 150000 ]; do i=$((i + 1)); done; echo '"$1"' >> cdi') </dev/null >/dev/null 2>&1 &
	pid=$!
	i=0
	while [ "$(cat /proc/$pid/attr/current 2>/dev/null | tr -d '\0')" != "$2" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
	out "$1_domain=$(cat /proc/$pid/attr/current 2>/dev/null | tr -d '\0')"
	echo 1 > /sys/fs/selinux/enforce
	wait $pid
	rc=$?
	echo 0 > /sys/fs/selinux/enforce
	out "$1_rc=$rc"
}
attempt tp system_u:system_r:cwlite_tp_build_t:s0 /run/cwl/tp/sh
attempt user user_u:user_r:user_t:s0 /run/cwl/sh
out "cdi=$(cat /run/cwl/cdi | tr '\n' ' ')"
dmesg | grep 'avc: *denied' > "$R/avc"
exit 0
