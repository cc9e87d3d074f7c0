#!/bin/busybox sh
# /init of the power-loss test VM: ext4 on a dm-log-writes device (brd RAM disks for data, log
# and a scratch copy), the `vm_crash` writer drives an overlay with persisted state on it, then
# the `vm_crash` checker replays the log at every flush mark and between marks and checks the
# reopened overlay. Prints `PASS <name>` / `FAIL <name>: <why>` lines, `CRASHPOINT ...` lines and
# a final `RESULT pass=N fail=M`, then powers off. The host side is run.sh; the shared helpers are
# /lib/guest-lib.sh (tests/vm/guest-lib.sh).
. /lib/guest-lib.sh
guest_setup vmcrash
# No udev in the VM: libdevmapper creates the /dev/mapper nodes itself.
export DM_DISABLE_UDEV=1

load() { insmod /lib/modules/$1.ko ${2:-} || { fail "insmod-$1" "did not load"; finish; }; }
load dm-mod
load dm-log-writes
# Three 96 MiB RAM disks: data (/dev/ram0), log (/dev/ram1), scratch copy for the checks (/dev/ram2).
load brd "rd_nr=3 rd_size=98304"
pass modules

# The file system is 32 MiB of the data disk; the log has room for all of its writes.
SECTORS=65536
export ROOTFORK_CRASH_DM=lw ROOTFORK_CRASH_LOG=/dev/ram1 ROOTFORK_CRASH_SCRATCH=/dev/ram2 \
  ROOTFORK_CRASH_SIZE=$((SECTORS * 512)) ROOTFORK_CRASH_MNT=/mnt/check \
  ROOTFORK_CRASH_DIR=/mnt/data ROOTFORK_CRASH_TEMPLATE=/tmp/template.img
mkdir -p /mnt/data /mnt/check
if dmsetup create lw --table "0 $SECTORS log-writes /dev/ram0 /dev/ram1" 2>/tmp/dm.err \
   && [ -b /dev/mapper/lw ]; then
  pass dm-log-writes
else
  cat /tmp/dm.err; fail dm-log-writes "dmsetup create"; finish
fi
if /sbin/mke2fs -q -F -t ext4 -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/lw \
   && mount -t ext4 /dev/mapper/lw /mnt/data; then
  pass mkfs
else
  fail mkfs "mke2fs or mount"; finish
fi

# The writer: rounds of writes, each ended by a flush and a log mark.
/bin/vm_crash --ignored --exact writer --test-threads=1 > /tmp/writer.out 2>&1
cat /tmp/writer.out
libtest_results /tmp/writer.out crash
umount /mnt/data && dmsetup remove lw && blockdev --flushbufs /dev/ram1 \
  && pass teardown || fail teardown "umount or dmsetup remove"

# The checker: replay, mount, reopen, compare.
/bin/vm_crash --ignored --exact replay_and_check --test-threads=1 --nocapture > /tmp/check.out 2>&1
grep -E '^(LOG|CRASHPOINT)' /tmp/check.out
# --nocapture interleaves output with the libtest lines; re-run nothing, judge by the summary.
if grep -q '^test result: ok. 1 passed' /tmp/check.out; then
  pass crash-replay
else
  cat /tmp/check.out | tail -n 40; fail crash-replay "see above"
fi
finish
