#!/bin/sh
# PID 1 of the patched-kernel VM (`cargo xtask vm`).
#
# The root file system is the host's, read-only over 9p. This script mounts
# what programs expect, runs the command that xtask wrote into the scratch
# directory with its output on hvc0, records the exit status (and, on a
# kmemleak kernel, the leak report) there, and resets the VM, which ends QEMU.
#
# Last argument (from the kernel command line, after "--"): the scratch
# directory, a host directory shared read-write at the same path. The kernel
# may pass other words of its command line before it.

for scratch; do :; done
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
# With CONFIG_DEVTMPFS_MOUNT the kernel has mounted it already.
grep -q '^devtmpfs /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
# xtask says whether /tmp may be covered: not when the run needs host files
# there (kernel command line, kvm_userdev_tmp=tmpfs|host, passed to init's
# environment).
if [ "$kvm_userdev_tmp" = host ]; then
	mkdir -p /run/tmp
	export TMPDIR=/run/tmp
else
	mount -t tmpfs tmpfs /tmp
fi
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing
# The mount point exists on the host unless it lies under the tmpfs above.
mkdir -p "$scratch" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 scratch "$scratch"

# Boot-time objects are not the command's leaks: forget them.
kmemleak=/sys/kernel/debug/kmemleak
[ -w $kmemleak ] && echo clear > $kmemleak

echo "vm-init: running the command" > /dev/kmsg
(cd "${TMPDIR:-/tmp}" && exec sh "$scratch/.vm-cmd") </dev/null >/dev/hvc0 2>&1
status=$?
echo "vm-init: the command exited with status $status" > /dev/kmsg
echo $status > "$scratch/.vm-status"

if [ -w $kmemleak ]; then
	# kmemleak reports only objects older than 5 seconds.
	sleep 6
	echo "vm-init: kmemleak scan" > /dev/kmsg
	echo scan > $kmemleak
	cat $kmemleak > "$scratch/.vm-kmemleak"
	echo "vm-init: kmemleak scan done" > /dev/kmsg
fi

# An immediate reset, which QEMU (-no-reboot) turns into its exit. Unlike an
# orderly power-off it returns to nobody: PID 1 cannot exit (and panic) while
# devices are being torn down. Nothing is left to flush: the scratch share
# is uncached and the console is written synchronously.
echo b > /proc/sysrq-trigger
