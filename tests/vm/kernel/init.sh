#!/bin/busybox sh
# /init of the kernel-test VM: loads nbd.ko and runs the kernel-in-the-loop checks against
# /dev/nbdN: shell checks driving the static `rootfork` CLI, then the `vm_kernel` test binary
# (crates/rootfork-kernel/tests/vm_kernel, built with `cargo test --no-run`): its pass/fail tests,
# then its timing tests. Prints `PASS <name>` / `FAIL <name>: <why>` lines, libtest's
# `test result:` lines, `LATENCY ...` lines and a final `RESULT pass=N fail=M`, then powers off.
# The host side is run.sh; the shared helpers (setup, counting, RESULT, power-off) are
# /lib/guest-lib.sh (tests/vm/guest-lib.sh).
. /lib/guest-lib.sh
guest_setup vmkernel
export RUST_LOG=${RUST_LOG:-info}
BOOT_ID=$(cat /proc/sys/kernel/random/boot_id)

guest_insmod_nbd 16
[ -e /sys/module/nbd/parameters/nbds_max ] && pass insmod || fail insmod "no nbd sysfs"

MB=1048576
# A 16 MiB template with random contents; its checksum must never change. (Reads through
# /dev/nbdN under TCG run at a few MB/s, so the checks read only the ranges that matter.)
TMB=16
dd if=/dev/urandom of=/tmp/t.img bs=$MB count=$TMB 2>/dev/null
TSUM=$(sha256sum /tmp/t.img | cut -d' ' -f1)
export ROOTFORK_VM_TEMPLATE=/tmp/t.img

# vm_kernel ARGS...: the Rust tests (they share the kernel's devices: one at a time).
vm_kernel() { /bin/vm_kernel --ignored --test-threads=1 "$@"; }
# claim_all: claims every free slot with the pool, prints `CLAIM_ALL claimed=N not_quiescent=...`
# and releases them (a probe for the shell checks, not a check itself).
claim_all() { vm_kernel --exact probe::claim_all --nocapture 2>&1 | grep -o 'CLAIM_ALL.*'; }

# start_attach NAME [args...]: starts `rootfork nbd attach` of /tmp/t.img in the background;
# sets $APID and $DEV (first stdout line) or fails the check.
start_attach() {
  name=$1; shift
  start_attach_tpl "$name" /tmp/t.img "$@"
}

# start_attach_tpl NAME TEMPLATE [args...]: start_attach of another template.
start_attach_tpl() {
  name=$1; tpl=$2; shift 2
  rootfork nbd attach --template "$tpl" --sandbox "$name" "$@" >/tmp/$name.out 2>/tmp/$name.err &
  APID=$!
  DEV=
  i=0
  while [ $i -lt 300 ]; do
    DEV=$(head -n1 /tmp/$name.out 2>/dev/null)
    [ -n "$DEV" ] && return 0
    kill -0 $APID 2>/dev/null || break
    sleep 0.1; i=$((i+1))
  done
  cat /tmp/$name.err
  return 1
}

# stop_attach PID: SIGTERM and wait for a clean exit.
stop_attach() {
  kill -TERM $1 && wait $1
}

quiescent() { # quiescent N
  d=/sys/block/nbd$1
  [ ! -s $d/pid ] && [ "$(cat $d/size)" = 0 ] && [ "$(cat $d/inflight | tr -s ' ' | sed 's/^ //')" = "0 0" ] \
    && [ -z "$(ls $d/holders)" ]
}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# --- 1. connect, sysfs, pattern, ext4, disconnect, reuse -----------------------------------
t=connect
if start_attach one; then
  N=${DEV#/dev/nbd}
  S=/sys/block/nbd$N
  if [ "$(cat $S/pid)" = "$APID" ] && [ "$(cat $S/size)" = $((TMB*MB/512)) ] \
     && case "$(cat $S/backend)" in rootfork:$BOOT_ID:*:one) true;; *) false;; esac; then
    pass "$t-sysfs"
  else
    fail "$t-sysfs" "pid=$(cat $S/pid) size=$(cat $S/size) backend=$(cat $S/backend)"
  fi
  # 512-byte logical blocks (every file system mounts); the driver gives the physical block
  # size the same value (NBD_ATTR_BLOCK_SIZE_BYTES sets both; there is no separate hint).
  [ "$(cat /sys/block/nbd$N/queue/logical_block_size)" = 512 ] && pass "$t-block-size" \
    || fail "$t-block-size" "$(cat /sys/block/nbd$N/queue/logical_block_size)"
  echo "NOTE nbd$N physical_block_size=$(cat /sys/block/nbd$N/queue/physical_block_size)"
  rootfork nbd list | grep -q "^$DEV *connected" && pass "$t-list" || { rootfork nbd list; fail "$t-list" "not connected in list"; }
  rootfork nbd list --json | grep -q '"state": "connected"' && pass "$t-list-json" || fail "$t-list-json" "no connected slot"
  # The template's bytes come through; a written pattern reads back after dropping caches.
  dd if=$DEV bs=$MB count=$TMB 2>/dev/null | cmp -s - /tmp/t.img && pass "$t-reads-template" || fail "$t-reads-template" "differs"
  dd if=/dev/urandom of=/tmp/pat bs=4096 count=256 2>/dev/null
  dd if=/tmp/t.img of=/tmp/tpat bs=4096 skip=1000 count=256 2>/dev/null
  dd if=/tmp/t.img of=/tmp/thead bs=4096 count=8 2>/dev/null
  dd if=/tmp/pat of=$DEV bs=4096 seek=1000 conv=fsync,notrunc 2>/dev/null
  drop_caches
  dd if=$DEV bs=4096 skip=1000 count=256 2>/dev/null | cmp -s - /tmp/pat && pass "$t-pattern" || fail "$t-pattern" "read back differs"
  # ext4: mkfs, mount, files, unmount, fsck, mount again and verify.
  if /sbin/mke2fs -q -F -t ext4 $DEV && mount -t ext4 $DEV /mnt; then
    for f in 1 2 3 4 5; do dd if=/dev/urandom of=/mnt/f$f bs=64k count=$((f*4)) 2>/dev/null; done
    (cd /mnt && sha256sum f* > /tmp/sums)
    umount /mnt
    drop_caches
    if /sbin/e2fsck -f -n $DEV >/tmp/fsck.out 2>&1; then pass "$t-ext4-fsck"; else cat /tmp/fsck.out; fail "$t-ext4-fsck" "e2fsck"; fi
    mount -t ext4 $DEV /mnt && (cd /mnt && sha256sum -c /tmp/sums >/dev/null) && pass "$t-ext4-files" || fail "$t-ext4-files" "checksums"
    umount /mnt
  else
    fail "$t-ext4" "mkfs or mount failed"
  fi
  if stop_attach $APID; then pass "$t-detach"; else cat /tmp/one.err; fail "$t-detach" "exit status"; fi
  quiescent $N && pass "$t-quiescent" || fail "$t-quiescent" "nbd$N: pid=$(cat $S/pid 2>/dev/null) size=$(cat $S/size)"
  [ -z "$(ls /var/tmp/rootfork)" ] && pass "$t-cache-removed" || fail "$t-cache-removed" "$(ls /var/tmp/rootfork)"
  # A new process starts its rotation at slot 0: the same slot, reused, shows a fresh overlay.
  sleep 0.3
  if start_attach two; then
    [ "$DEV" = "/dev/nbd$N" ] && pass "$t-slot-reused" || fail "$t-slot-reused" "got $DEV, expected /dev/nbd$N"
    # The old overlay's pattern at block 1000 (and its ext4 superblock) must be gone.
    dd if=$DEV bs=4096 skip=1000 count=256 2>/dev/null | cmp -s - /tmp/tpat && dd if=$DEV bs=4096 count=8 2>/dev/null | cmp -s - /tmp/thead \
      && pass "$t-reuse-is-fresh" || fail "$t-reuse-is-fresh" "old writes visible"
    stop_attach $APID || fail "$t-detach-2" "exit status"
  else
    fail "$t-reattach" "no device"
  fi
else
  fail "$t" "attach did not print a device"
fi

# --- 1b. a detach while another opener holds the device: the slot stays out until it closes ---
t=holder
if start_attach held; then
  N=${DEV#/dev/nbd}
  exec 3<$DEV
  kill -TERM $APID
  sleep 2
  # DISCONNECT is done, but the kernel keeps the device configured while fd 3 is open.
  [ -s /sys/block/nbd$N/pid ] && pass "$t-teardown-waits-for-opener" || fail "$t-teardown-waits-for-opener" "already torn down"
  # The slot is not handed out meanwhile (its owner still holds the claim while it waits).
  claim_all > /tmp/claimheld
  grep -q 'claimed=15 ' /tmp/claimheld && pass "$t-not-reused-while-open" || { cat /tmp/claimheld; fail "$t-not-reused-while-open" "slot handed out"; }
  exec 3<&-
  if wait $APID; then pass "$t-detach-after-close"; else cat /tmp/held.err; fail "$t-detach-after-close" "exit status"; fi
  grep -q "teardown still running" /tmp/held.err && pass "$t-wait-logged" || { cat /tmp/held.err; fail "$t-wait-logged" "no log"; }
  quiescent $N && pass "$t-quiescent" || fail "$t-quiescent" "nbd$N"
else
  fail "$t" "attach did not print a device"
fi

# --- 1c. ext4 with 1, 2 and 4 KiB blocks on /dev/nbdN ---------------------------------------
# Each template is a 64 MiB regular file made with `mke2fs -b N` (1 KiB is mkfs.ext4's default
# below 512 MiB); attached, mounted, a file written, unmounted, checked with `e2fsck -f -n`,
# mounted again to read the file back, detached.
# fs_template BYTES PATH: a 64 MiB ext4 image with BYTES-byte blocks.
fs_template() {
  rm -f "$2"
  dd if=/dev/zero of="$2" bs=$MB count=0 seek=64 2>/dev/null && /sbin/mke2fs -q -F -t ext4 -b "$1" "$2"
}
for BS in 1024 2048 4096; do
  t=fs$BS
  if ! fs_template $BS /tmp/fs.img; then fail "$t-mkfs" "mke2fs -b $BS"; continue; fi
  if start_attach_tpl fs$BS /tmp/fs.img; then
    if mount -t ext4 $DEV /mnt 2>/tmp/mount.err; then
      pass "$t-mount"
      dd if=/dev/urandom of=/mnt/data bs=64k count=16 2>/dev/null
      (cd /mnt && sha256sum data > /tmp/fssum)
      umount /mnt
      drop_caches
      if /sbin/e2fsck -f -n $DEV >/tmp/fsck.out 2>&1; then pass "$t-fsck"; else cat /tmp/fsck.out; fail "$t-fsck" "e2fsck"; fi
      mount -t ext4 $DEV /mnt && (cd /mnt && sha256sum -c /tmp/fssum >/dev/null) && pass "$t-file" || fail "$t-file" "checksum"
      umount /mnt
    else
      cat /tmp/mount.err; dmesg | tail -n 3; fail "$t-mount" "mount"
    fi
    if stop_attach $APID; then pass "$t-detach"; else cat /tmp/fs$BS.err; fail "$t-detach" "exit status"; fi
  else
    fail "$t" "attach did not print a device"
  fi
done
# The issue's failure, kept as a check that --block-size still reaches the kernel: a 4096-byte
# logical block size refuses ext4 with 1 KiB blocks ("bad block size 1024").
t=fs1024-on-4096
if fs_template 1024 /tmp/fs.img && start_attach_tpl fs4k /tmp/fs.img --block-size 4096; then
  [ "$(cat /sys/block/${DEV#/dev/}/queue/logical_block_size)" = 4096 ] && pass "$t-block-size" || fail "$t-block-size" "not 4096"
  if mount -t ext4 $DEV /mnt 2>/dev/null; then umount /mnt; fail "$t-refused" "mounted"
  elif dmesg | tail -n 20 | grep -q "bad block size 1024"; then pass "$t-refused"
  else dmesg | tail -n 5; fail "$t-refused" "refused, but not for its block size"; fi
  stop_attach $APID || fail "$t-detach" "exit status"
else
  fail "$t" "template or attach"
fi
# The issue's case as a new user meets it: a 64 MiB template made with a plain `mkfs.ext4` (no
# -b: 1 KiB blocks below 512 MiB, checked in the superblock's s_log_block_size) mounts, and two
# attachments of it stay isolated: each sees only its own file.
plain_template() {
  rm -f "$1"
  dd if=/dev/zero of="$1" bs=$MB count=0 seek=64 2>/dev/null && /sbin/mke2fs -q -F -t ext4 "$1"
}
t=fs1024-isolated
PA=; PB=
if plain_template /tmp/fs.img; then
  # s_log_block_size: 4 bytes little-endian at 1024 + 24; 0 means 1024-byte blocks.
  [ "$(dd if=/tmp/fs.img bs=1 skip=1048 count=4 2>/dev/null | od -An -tu4 | tr -d ' ')" = 0 ] \
    && pass "$t-plain-mkfs-is-1k" || fail "$t-plain-mkfs-is-1k" "the plain mkfs.ext4 template does not have 1 KiB blocks"
fi
if [ -s /tmp/fs.img ] && start_attach_tpl fsa /tmp/fs.img && DA=$DEV && PA=$APID \
   && start_attach_tpl fsb /tmp/fs.img && DB=$DEV && PB=$APID; then
  FSUM=$(sha256sum /tmp/fs.img | cut -d' ' -f1)
  mkdir -p /mnt/a /mnt/b
  if mount -t ext4 $DA /mnt/a && mount -t ext4 $DB /mnt/b; then
    echo a > /mnt/a/only-a; echo b > /mnt/b/only-b; sync
    umount /mnt/a; umount /mnt/b
    drop_caches
    mount -t ext4 $DA /mnt/a && mount -t ext4 $DB /mnt/b \
      && [ "$(cat /mnt/a/only-a)" = a ] && [ ! -e /mnt/a/only-b ] \
      && [ "$(cat /mnt/b/only-b)" = b ] && [ ! -e /mnt/b/only-a ] \
      && pass "$t" || { ls /mnt/a /mnt/b; fail "$t" "a file is missing or visible to the other"; }
    umount /mnt/a; umount /mnt/b
    /sbin/e2fsck -f -n $DA >/tmp/fsck.out 2>&1 && /sbin/e2fsck -f -n $DB >>/tmp/fsck.out 2>&1 \
      && pass "$t-fsck" || { cat /tmp/fsck.out; fail "$t-fsck" "e2fsck"; }
  else
    fail "$t" "mount"; umount /mnt/a 2>/dev/null
  fi
  [ "$(sha256sum /tmp/fs.img | cut -d' ' -f1)" = "$FSUM" ] && pass "$t-template-unchanged" || fail "$t-template-unchanged" "checksum"
  ok=1; stop_attach $PA || ok=0; stop_attach $PB || ok=0
  [ $ok = 1 ] && pass "$t-detached" || fail "$t-detached" "exit status"
else
  fail "$t" "template or attach"
  [ -n "$PA" ] && stop_attach $PA
fi
rm -f /tmp/fs.img

# --- 2. eight devices on one template at once (1-4 connections each), isolated ----------------------------------------
t=eight
PIDS=""; DEVS=""
ok=1
for i in 1 2 3 4 5 6 7 8; do
  # 1 to 4 sockets per device (NBD multi-connection).
  if start_attach m$i --connections $(( (i % 4) + 1 )); then PIDS="$PIDS $APID"; DEVS="$DEVS $DEV"; else ok=0; fi
done
[ $ok = 1 ] && [ "$(echo $DEVS | tr ' ' '\n' | sort -u | wc -l)" = 8 ] && pass "$t-attached" || fail "$t-attached" "devices: $DEVS"
# Each device writes its own 256 KiB at 4 MiB; the 256 KiB around it must stay the template's.
dd if=/tmp/t.img of=/tmp/tb bs=256k skip=15 count=1 2>/dev/null
dd if=/tmp/t.img of=/tmp/ta bs=256k skip=17 count=1 2>/dev/null
i=0; WP=""
for D in $DEVS; do
  i=$((i+1))
  yes "device $i " | head -c 262144 > /tmp/p$i
  dd if=/tmp/p$i of=$D bs=256k seek=16 conv=fsync,notrunc 2>/dev/null &
  WP="$WP $!"
done
wait $WP
drop_caches
i=0; iso=1
for D in $DEVS; do
  i=$((i+1))
  dd if=$D bs=256k skip=16 count=1 2>/dev/null | cmp -s - /tmp/p$i || { iso=0; echo "$D: own write missing"; }
  dd if=$D bs=256k skip=15 count=1 2>/dev/null | cmp -s - /tmp/tb || { iso=0; echo "$D: before differs"; }
  dd if=$D bs=256k skip=17 count=1 2>/dev/null | cmp -s - /tmp/ta || { iso=0; echo "$D: after differs"; }
done
[ $iso = 1 ] && pass "$t-isolated" || fail "$t-isolated" "see above"
ok=1
for p in $PIDS; do stop_attach $p || ok=0; done
[ $ok = 1 ] && pass "$t-detached" || fail "$t-detached" "exit status"
ok=1
for D in $DEVS; do quiescent ${D#/dev/nbd} || { ok=0; echo "$D not quiescent"; }; done
[ $ok = 1 ] && pass "$t-quiescent" || fail "$t-quiescent" "see above"
[ "$(sha256sum /tmp/t.img | cut -d' ' -f1)" = "$TSUM" ] && pass "$t-template-unchanged" || fail "$t-template-unchanged" "checksum"

# --- 3. the attach process killed with SIGKILL mid-I/O; a new start reclaims -------------------
t=sigkill
if start_attach victim --timeout 3; then
  VPID=$APID; VDEV=$DEV; VN=${DEV#/dev/nbd}
  CACHE=$(ls /var/tmp/rootfork/*victim* 2>/dev/null)
  dd if=/dev/urandom of=$VDEV bs=64k count=250 oflag=direct 2>/dev/null &
  DD=$!
  sleep 1
  kill -KILL $VPID; wait $VPID 2>/dev/null
  # The writer fails (EIO) once the kernel gives up on the dead connection.
  i=0; while kill -0 $DD 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
  kill -0 $DD 2>/dev/null && { kill -KILL $DD; fail "$t-writer-ends" "dd still running"; } || pass "$t-writer-ends"
  wait $DD 2>/dev/null
  [ -s /sys/block/nbd$VN/pid ] && pass "$t-left-connected" || fail "$t-left-connected" "the kernel already dropped it"
  rootfork nbd list | grep -q "^$VDEV *orphaned" && pass "$t-listed-orphaned" || { rootfork nbd list; fail "$t-listed-orphaned" "not orphaned"; }
  [ -n "$CACHE" ] && [ -e "$CACHE" ] && pass "$t-cache-leaked" || fail "$t-cache-leaked" "no leaked cache to reclaim ($CACHE)"
  # The pool's quiescence check keeps the orphan out of every claim.
  claim_all | tee /tmp/claimall
  grep -q '"pid":[1-9]' /tmp/claimall && pass "$t-quiescence-check-caught-it" || fail "$t-quiescence-check-caught-it" "no pid skip"
  # A new start reclaims it.
  if start_attach after; then
    quiescent $VN || [ "$DEV" = "$VDEV" ] && pass "$t-reclaimed" || fail "$t-reclaimed" "nbd$VN still connected"
    grep -q "reclaimed" /tmp/after.err && pass "$t-reclaim-logged" || { cat /tmp/after.err; fail "$t-reclaim-logged" "no log"; }
    [ ! -e "$CACHE" ] && pass "$t-cache-removed" || fail "$t-cache-removed" "$CACHE"
    dd if=$DEV bs=4096 skip=1000 count=256 2>/dev/null | cmp -s - /tmp/tpat && pass "$t-new-attach-works" || fail "$t-new-attach-works" "differs"
    stop_attach $APID || fail "$t-detach" "exit status"
  else
    fail "$t-restart" "no device"
  fi
else
  fail "$t" "attach did not print a device"
fi

# --- 3b. identity and reclaim across pid namespaces ------------------------------------------
# child_of PID: the pid of PID's first child (busybox has no pgrep), or nothing.
child_of() {
  for st in /proc/[0-9]*/status; do
    if grep -q "^PPid:[[:space:]]*$1\$" "$st" 2>/dev/null; then
      basename "$(dirname "$st")"; return 0
    fi
  done
}
# start_ns_attach NAME [args...]: start_attach in new pid and mount namespaces (the attach is pid
# 1 there, as in a container); sets $APID (unshare), $CPID (the attach, as this namespace sees it)
# and $DEV.
start_ns_attach() {
  name=$1; shift
  unshare -p -f --mount-proc rootfork nbd attach --template /tmp/t.img --sandbox "$name" "$@" \
    >/tmp/$name.out 2>/tmp/$name.err &
  APID=$!; DEV=; CPID=
  i=0
  while [ $i -lt 300 ]; do
    DEV=$(head -n1 /tmp/$name.out 2>/dev/null)
    [ -n "$DEV" ] && break
    kill -0 $APID 2>/dev/null || break
    sleep 0.1; i=$((i+1))
  done
  CPID=$(child_of $APID)
  [ -n "$DEV" ] && [ -n "$CPID" ] && return 0
  cat /tmp/$name.err
  return 1
}
# orphaned_count: slots `rootfork nbd list` shows as orphaned.
orphaned_count() { rootfork nbd list | grep -c ' orphaned ' || true; }

# More SIGKILLed attaches, each pid 1 in its own pid namespace, than there are slots (16): each
# start reclaims the previous one's orphan (another instance's, its connections dead and no
# dead_conn_timeout), the pool never runs dry, and no cache name clashes.
t=ns-sigkill
ok=1; n=0; insts=""
for i in $(seq 1 20); do
  if start_ns_attach ns$i; then
    n=$((n+1))
    insts="$insts $(cut -d: -f3 /sys/block/${DEV#/dev/}/backend)"
    kill -KILL $CPID; wait $APID 2>/dev/null
  else
    ok=0; echo "ns$i: no device"; kill -KILL $APID 2>/dev/null; wait $APID 2>/dev/null
  fi
done
[ $ok = 1 ] && [ $n = 20 ] && pass "$t-20-attaches" || fail "$t-20-attaches" "$n of 20 attached"
[ "$(echo $insts | tr ' ' '\n' | sort -u | wc -l)" = 20 ] && pass "$t-distinct-instances" || fail "$t-distinct-instances" "$insts"
[ "$(orphaned_count)" -le 1 ] && pass "$t-orphans-reclaimed" || { rootfork nbd list; fail "$t-orphans-reclaimed" "more than the last one orphaned"; }
rootfork nbd reclaim --cache-dir /var/tmp/rootfork > /tmp/reclaim.out 2>&1 || { cat /tmp/reclaim.out; fail "$t-reclaim-cmd" "exit status"; }
ok=1
for d in /sys/block/nbd*; do quiescent ${d#/sys/block/nbd} || { ok=0; echo "$d not quiescent"; }; done
[ $ok = 1 ] && pass "$t-all-quiescent" || fail "$t-all-quiescent" "see above"
[ -z "$(ls /var/tmp/rootfork)" ] && pass "$t-caches-removed" || fail "$t-caches-removed" "$(ls /var/tmp/rootfork)"

# A live attach in another pid namespace is never disconnected by anyone else's reclaim, not even
# --force: its claim lock is held.
t=ns-live
if start_ns_attach live; then
  LDEV=$DEV; LPID=$APID; LCPID=$CPID
  rootfork nbd reclaim --force >/tmp/reclaim.out 2>&1
  if start_attach other; then stop_attach $APID; else fail "$t-other-attach" "no device"; fi
  [ -s /sys/block/${LDEV#/dev/}/pid ] && dd if=$LDEV bs=4096 skip=1000 count=256 2>/dev/null | cmp -s - /tmp/tpat \
    && pass "$t-untouched" || { cat /tmp/reclaim.out; fail "$t-untouched" "disconnected or unreadable"; }
  # SIGTERM to pid 1 of the namespace (blocked and sigwait'ed, so it is delivered).
  kill -TERM $LCPID
  i=0; while kill -0 $LPID 2>/dev/null && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
  if kill -0 $LPID 2>/dev/null; then
    kill -KILL $LCPID $LPID; fail "$t-detached" "still running 20 s after SIGTERM"
  else
    wait $LPID
    quiescent ${LDEV#/dev/nbd} && pass "$t-detached" || fail "$t-detached" "$LDEV"
  fi
else
  fail "$t" "no device"
fi

# Another instance's orphan with a dead_conn_timeout is left until it passes; its own instance
# (a restarted daemon) takes it at once.
t=own-instance
if start_ns_attach own --instance restarted-daemon --dead-conn-timeout 120; then
  ODEV=$DEV
  kill -KILL $CPID; wait $APID 2>/dev/null
  rootfork nbd reclaim > /tmp/reclaim.out 2>&1
  grep -q "left connected: DeadConnTimeout" /tmp/reclaim.out && [ -s /sys/block/${ODEV#/dev/}/pid ] \
    && pass "$t-others-wait" || { cat /tmp/reclaim.out; fail "$t-others-wait" "taken before its dead_conn_timeout"; }
  rootfork nbd reclaim --instance restarted-daemon > /tmp/reclaim.out 2>&1
  grep -q "disconnected" /tmp/reclaim.out && quiescent ${ODEV#/dev/nbd} \
    && pass "$t-own-at-once" || { cat /tmp/reclaim.out; fail "$t-own-at-once" "not reclaimed"; }
  rm -f /var/tmp/rootfork/*restarted-daemon*
else
  fail "$t" "no device"
fi

# --- 3c. an idle opener on every free slot but one: CONNECT's EBUSY moves on to that one --------
t=ebusy
SP=""; FREE=9
for d in /sys/block/nbd*; do
  n=${d#/sys/block/nbd}
  [ "$n" = $FREE ] && continue
  sleep 999 </dev/nbd$n &
  SP="$SP $!"
done
sleep 0.5
if start_attach busy; then
  [ "$DEV" = /dev/nbd$FREE ] && pass "$t-next-slot" || fail "$t-next-slot" "got $DEV"
  grep -q "EBUSY" /tmp/busy.err && pass "$t-logged" || { cat /tmp/busy.err; fail "$t-logged" "no EBUSY log"; }
  stop_attach $APID || fail "$t-detach" "exit status"
else
  fail "$t-next-slot" "attach failed"
fi
kill $SP; wait $SP 2>/dev/null

# --- 3d. hostile lock and cache directories ---------------------------------------------------
t=hostile
echo precious > /tmp/victim
rm -f /run/rootfork/nbd/nbd0.lock
ln -s /tmp/victim /run/rootfork/nbd/nbd0.lock
if rootfork nbd attach --template /tmp/t.img --sandbox evil >/tmp/evil.out 2>/tmp/evil.err; then
  fail "$t-symlink-refused" "attached"
else
  grep -q "refusing lock file /run/rootfork/nbd/nbd0.lock: it is a symbolic link" /tmp/evil.err \
    && pass "$t-symlink-refused" || { cat /tmp/evil.err; fail "$t-symlink-refused" "other error"; }
fi
[ "$(cat /tmp/victim)" = precious ] && pass "$t-target-unchanged" || fail "$t-target-unchanged" "$(cat /tmp/victim)"
rm -f /run/rootfork/nbd/nbd0.lock
chmod 777 /run/rootfork/nbd
rootfork nbd attach --template /tmp/t.img --sandbox evil >/tmp/evil.out 2>/tmp/evil.err \
  && fail "$t-shared-dir-refused" "attached" \
  || { grep -q "refusing directory /run/rootfork/nbd" /tmp/evil.err && pass "$t-shared-dir-refused" || { cat /tmp/evil.err; fail "$t-shared-dir-refused" "other error"; }; }
chmod 700 /run/rootfork/nbd
ls /run/rootfork/nbd | grep -qv '\.lock$' && fail "$t-nothing-left" "$(ls /run/rootfork/nbd)" || pass "$t-nothing-left"

# --- 3e. the udev rule (dist/udev/59-rootfork-nbd.rules) on a real rootfork device -------------
# `udevadm test` runs the rules in-process (there is no udevd here) with Debian's 60-block and
# 60-persistent-storage rules beside rootfork's. udevadm 252 does not report the inotify watch, so
# `OPTIONS:="nowatch"` is not observed here; the probe and link suppression is.
t=udev
RULE=/usr/lib/udev/rules.d/59-rootfork-nbd.rules
if fs_template 4096 /tmp/fs.img && start_attach_tpl udev /tmp/fs.img; then
  U=/sys/block/${DEV#/dev/}
  udevadm test --action=change $U > /tmp/udev.out 2>&1
  grep -q "Reading rules file: $RULE" /tmp/udev.out && pass "$t-rule-read" || { cat /tmp/udev.out; fail "$t-rule-read" "not read"; }
  grep "59-rootfork-nbd.rules" /tmp/udev.out | grep -qiE "invalid|ignoring|unknown|error" \
    && { grep "59-rootfork-nbd.rules" /tmp/udev.out; fail "$t-rule-valid" "udevadm complains"; } || pass "$t-rule-valid"
  grep -q "^ROOTFORK_NBD=1" /tmp/udev.out && pass "$t-matches-rootfork" || { cat /tmp/udev.out; fail "$t-matches-rootfork" "no ROOTFORK_NBD"; }
  ! grep -q "^ID_FS_TYPE=" /tmp/udev.out && ! grep -q "builtin command 'blkid'" /tmp/udev.out && ! grep -q "^DEVLINKS=.*by-uuid" /tmp/udev.out \
    && pass "$t-no-probe" || { cat /tmp/udev.out; fail "$t-no-probe" "probed"; }
  # Without the rule the same device is probed (so the check above can fail).
  mv $RULE /tmp/rule.off
  udevadm test --action=change $U > /tmp/udev-off.out 2>&1
  mv /tmp/rule.off $RULE
  grep -q "^ID_FS_TYPE=ext4" /tmp/udev-off.out && pass "$t-probed-without-rule" || { cat /tmp/udev-off.out; fail "$t-probed-without-rule" "no ID_FS_TYPE"; }
  # Other nbd devices (no rootfork backend identifier) are left to the usual rules.
  for d in /sys/block/nbd*; do [ -s $d/pid ] || { IDLE=$d; break; }; done
  udevadm test --action=change $IDLE > /tmp/udev-idle.out 2>&1
  ! grep -q "^ROOTFORK_NBD=" /tmp/udev-idle.out && grep -q "builtin command 'blkid'" /tmp/udev-idle.out \
    && pass "$t-others-untouched" || { cat /tmp/udev-idle.out; fail "$t-others-untouched" "matched $IDLE"; }
  stop_attach $APID || fail "$t-detach" "exit status"
else
  fail "$t" "template or attach"
fi
rm -f /tmp/fs.img

# --- 4. the vm_kernel checks: an invalid connect is classified and releases the slot; STATUS and
# RECONFIGURE; a dead kernel connection (detected, I/O while dead, RECONFIGURE reconnect, data,
# stats) for 1 connection with and without dead_conn_timeout and 2 connections, a request in
# flight at the kill, a spare socket, kill/reconnect churn, close with every connection dead.
# One PASS/FAIL line per test (libtest's captured output keeps its `test ... ok` lines whole;
# --show-output prints what the passing tests printed). Shown as it runs: a hang names its test.
vm_kernel --skip probe:: --skip timing:: --show-output 2>&1 | tee /tmp/vm_kernel.out
libtest_results /tmp/vm_kernel.out vm_kernel

# --- 5. every slot quiescent, nothing claimed -------------------------------------------------
ok=1
for d in /sys/block/nbd*; do n=${d#/sys/block/nbd}; quiescent $n || { ok=0; echo "nbd$n not quiescent"; }; done
[ $ok = 1 ] && pass all-quiescent || fail all-quiescent "see above"

# --- 6. timing: attach latency (cold, close, warm), reconnect cycles and the cost of 512-byte
# logical blocks against 4096, apart from the checks. They print `LATENCY ...` lines and check
# only that the runs worked.
vm_kernel timing:: --show-output 2>&1 | tee /tmp/vm_timing.out
libtest_results /tmp/vm_timing.out vm_kernel

finish
