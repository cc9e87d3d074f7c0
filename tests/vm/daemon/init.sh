#!/bin/busybox sh
# /init of the daemon kernel-path VM: loads nbd.ko, runs `rootfork serve` and drives it with the
# CLI through the kernel provider on real /dev/nbdN devices: device list, create, data through
# the device, health, metrics, recovery of a killed connection with RECONFIGURE (through the
# daemon's `debug.fault_injection` trigger), pause/resume, delete, SIGKILL and SIGTERM restarts
# under a running writer with the kernel sandbox adopted (no EIO, data verified, the stall as
# LATENCY lines; ADOPT_N restarts of each), an adoption refused for a damaged block state,
# SIGTERM cleanup, the warm stock (`kernel.warm_slots`: stocked, taken, refilled, reclaimed after
# SIGKILL, closed at SIGTERM; create-to-ready with and without it as LATENCY lines), a Firecracker
# sandbox (rootfork-fc-double standing in for Firecracker) created, paused, resumed, adopted with
# its VM across a SIGTERM and a SIGKILL restart of the daemon (same pid), and deleted.
# Prints `PASS <name>` / `FAIL <name>: <why>` lines and a final `RESULT pass=N fail=M`, then
# powers off. The host side is run.sh.
# The shared helpers (setup, counting, RESULT, power-off) are /lib/guest-lib.sh
# (tests/vm/guest-lib.sh).
. /lib/guest-lib.sh
guest_setup vmdaemon
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
export RUST_LOG=${RUST_LOG:-info}
BOOT_ID=$(cat /proc/sys/kernel/random/boot_id)
# The Firecracker binary the daemon launches for `--vmm firecracker` sandboxes.
export ROOTFORK_FIRECRACKER_BIN=/bin/rootfork-fc-double

STATE=/var/lib/rootfork
export ROOTFORK_API=$STATE/api.sock
METRICS=127.0.0.1:9477
LOG=/tmp/serve.log
# Fault injection on (testing only): STATE/faults/kill-connection.ID kills one of a kernel
# sandbox's connections at the next health round.
CONF=/tmp/rootfork.toml
printf '[debug]\nfault_injection = true\n' > $CONF

# Run by finish before the RESULT line: stop the daemon, show its log.
before_finish() {
  [ -n "$WPID" ] && { touch /tmp/w.stop; kill "$WPID" 2>/dev/null; wait "$WPID"; }
  [ -n "$DPID" ] && kill -0 "$DPID" 2>/dev/null && { kill -TERM "$DPID"; wait "$DPID"; }
  echo "--- daemon log (last 40 lines)"; tail -n 40 $LOG
}

guest_insmod_nbd 8
pass insmod

# start_daemon: `rootfork serve` in the background; sets $DPID once the API answers.
start_daemon() {
  rootfork serve --config $CONF --state-dir $STATE --metrics $METRICS --health-interval 1 >>$LOG 2>&1 &
  DPID=$!
  i=0
  while [ $i -lt 600 ]; do
    [ -S $ROOTFORK_API ] && rootfork template list >/dev/null 2>&1 && return 0
    kill -0 $DPID 2>/dev/null || break
    sleep 0.1; i=$((i+1))
  done
  tail -n 20 $LOG
  return 1
}

# create ID [TEMPLATE]: a kernel sandbox (of the demo template by default); sets $DEV and $N
# from its output.
create() {
  DEV=; N=
  rootfork sandbox create --template "${2:-demo}" --id "$1" --provider kernel >/tmp/$1.create 2>&1 || { cat /tmp/$1.create; return 1; }
  DEV=$(awk '/^device:/ {print $2}' /tmp/$1.create)
  N=${DEV#/dev/nbd}
  case "$DEV" in /dev/nbd[0-9]*) return 0;; esac
  cat /tmp/$1.create
  return 1
}

field() { # field ID NAME: a line of `sandbox get`
  rootfork sandbox get "$1" 2>&1 | awk -v k="$2:" '$1 == k {print $2}'
}

quiescent() { # quiescent N
  d=/sys/block/nbd$1
  [ ! -s $d/pid ] && [ "$(cat $d/size)" = 0 ]
}

wait_quiescent() { # wait_quiescent N [tenths]
  i=0
  while [ $i -lt ${2:-100} ]; do quiescent $1 && return 0; sleep 0.1; i=$((i+1)); done
  return 1
}

connected_to() { # connected_to N PID: sysfs pid is the connecting thread, of process PID
  p=$(cat /sys/block/nbd$1/pid 2>/dev/null)
  [ -n "$p" ] && [ "$(awk '$1 == "Tgid:" {print $2}' /proc/$p/status 2>/dev/null)" = "$2" ] \
    && [ "$(cat /sys/block/nbd$1/size)" != 0 ]
}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# pct P FILE: nearest-rank percentile.
pct() { sort -n "$2" | awk -v p="$1" '{ v[NR] = $1 } END { r = int((p * NR + 99) / 100); if (r < 1) r = 1; print v[r] }'; }

metric() { # metric NAME{LABELS}: its value in the last scrape (0 when absent)
  v=$(grep -F "$1 " /tmp/metrics | head -n1 | awk '{print $2}')
  echo "${v:-0}"
}

scrape() { wget -q -O /tmp/metrics "http://$METRICS/metrics"; }

# --- 1. the daemon starts, builds its demo template, sees the pool ----------------------------
t=serve
if ! start_daemon; then fail "$t-start" "the API never answered"; finish; fi
pass "$t-start"
# (Output is captured before grep: `grep -q` exiting early would break the CLI's pipe.)
rootfork template list > /tmp/templates 2>&1; grep -q '^demo ' /tmp/templates && pass "$t-demo-template" || { rootfork template list; fail "$t-demo-template" "no demo template"; }
# The template's bytes, as a raw image (the daemon keeps it as a base build in its store), and a
# checksum of that build's files, which nothing may rewrite.
TPL=/tmp/demo-template.img
rootfork template export demo $TPL > /tmp/export.out 2>&1 && pass "$t-template-export" || { cat /tmp/export.out; fail "$t-template-export" "export failed"; }
TBUILD=$(sed -n 's/.*"build": *"\([0-9a-f]*\)".*/\1/p' $STATE/templates/demo.json)
tsum() { cat $STATE/store/$TBUILD/data $STATE/store/$TBUILD/map | sha256sum | cut -d' ' -f1; }
TSUM=$(tsum)
rootfork device list --json > /tmp/devices.json 2>&1; grep -q '"available": true' /tmp/devices.json && pass "$t-device-list-available" \
  || { rootfork device list; fail "$t-device-list-available" "pool unavailable"; }
[ "$(rootfork device list | grep -c '^/dev/nbd[0-9]* *free')" = 8 ] && pass "$t-device-list-free" \
  || { rootfork device list; fail "$t-device-list-free" "not 8 free slots"; }

# --- 2. a kernel sandbox: device, sysfs, data through it, health, metrics ---------------------
t=create
if create k1; then
  pass "$t-prints-device"
  N1=$N; DEV1=$DEV
  connected_to $N1 $DPID && pass "$t-sysfs-connected" || fail "$t-sysfs-connected" "nbd$N1 pid=$(cat /sys/block/nbd$N1/pid 2>/dev/null)"
  case "$(cat /sys/block/nbd$N1/backend 2>/dev/null)" in
    "rootfork:$BOOT_ID:$(cat $STATE/nbd-instance-id):k1") pass "$t-backend-id";;
    *) fail "$t-backend-id" "backend=$(cat /sys/block/nbd$N1/backend 2>/dev/null)";;
  esac
  rootfork device list | grep "^$DEV1 " | grep -q "connected *k1" && pass "$t-device-list-connected" \
    || { rootfork device list; fail "$t-device-list-connected" "nbd$N1 not connected to k1"; }
  # The template's first MiB comes through; a pattern written at 32 MiB reads back after the
  # page cache is dropped.
  head -c 1048576 $TPL > /tmp/thead
  dd if=$DEV1 bs=4096 count=256 2>/dev/null | cmp -s - /tmp/thead && pass "$t-reads-template" || fail "$t-reads-template" "differs"
  # Informational: whether the demo template's ext4 mounts through the kernel device.
  if mount -t ext4 -o ro $DEV1 /mnt 2>/dev/null; then echo "NOTE the demo template mounts on $DEV1"; umount /mnt
  else echo "NOTE the demo template does not mount on $DEV1 (its ext4 block size is below the device's logical block size)"; fi
  dd if=/dev/urandom of=/tmp/pat bs=4096 count=256 2>/dev/null
  dd if=/tmp/pat of=$DEV1 bs=4096 seek=8192 conv=fsync,notrunc 2>/dev/null
  drop_caches
  dd if=$DEV1 bs=4096 skip=8192 count=256 2>/dev/null | cmp -s - /tmp/pat && pass "$t-pattern" || fail "$t-pattern" "read back differs"
  # Health rounds run every second: the sandbox is healthy.
  sleep 2
  h=$(field k1 health); s=$(field k1 state)
  [ "$h" = healthy ] && [ "$s" = running ] && pass "$t-healthy" || { rootfork sandbox get k1; fail "$t-healthy" "state=$s health=$h"; }
  # Metrics: the kernel sandbox's NBD requests are counted.
  # A scrape skips a sandbox whose lock is held (a health round in progress): it is counted at
  # the next one, so a few scrapes are allowed.
  i=0; while scrape && [ $i -lt 5 ]; do
    w=$(metric 'rootfork_nbd_requests_total{command="write"}')
    [ "${w%.*}" -gt 0 ] 2>/dev/null && break
    i=$((i+1)); sleep 1
  done
  if [ -s /tmp/metrics ]; then
    w=$(metric 'rootfork_nbd_requests_total{command="write"}')
    r=$(metric 'rootfork_nbd_requests_total{command="read"}')
    b=$(metric 'rootfork_nbd_request_bytes_total{command="write"}')
    [ "${w%.*}" -gt 0 ] && [ "${r%.*}" -gt 0 ] && [ "${b%.*}" -ge 1048576 ] && pass "metrics-kernel-nbd-requests" \
      || { grep nbd_request /tmp/metrics; fail "metrics-kernel-nbd-requests" "write=$w read=$r write_bytes=$b"; }
    [ "$(metric 'rootfork_pool_slots{state="connected"}')" = 1 ] && pass "metrics-pool-connected" \
      || { grep pool_slots /tmp/metrics; fail "metrics-pool-connected" "not 1 connected slot"; }
    [ "$(metric 'rootfork_sandboxes{state="running"}')" = 1 ] && pass "metrics-sandboxes" || fail "metrics-sandboxes" "not 1 running"
    [ "$(metric 'rootfork_health_checks_total{result="failed"}')" = 0 ] && pass "metrics-no-failed-checks" \
      || fail "metrics-no-failed-checks" "$(grep health_checks /tmp/metrics)"
  else
    fail metrics "scrape failed"
  fi
else
  fail "$t-prints-device" "create failed"
fi

# --- 2b. a killed connection is replaced with RECONFIGURE by the health round ---------------
t=recover
if [ -n "$N1" ]; then
  rootfork events --sandbox k1 >/tmp/k1.events 2>&1 &
  EVPID=$!
  sleep 0.5
  mkdir -p $STATE/faults
  drop_caches
  touch $STATE/faults/kill-connection.k1
  # As soon as the kernel has seen the connection die, read through the device: with no live
  # connection the kernel holds the request (dead_conn_timeout) until the reconnect, then
  # serves it; without that it would fail with EIO.
  i=0
  while [ $i -lt 200 ] && ! dmesg | grep -q "nbd$N1: Receive control failed"; do sleep 0.05; i=$((i+1)); done
  ( s0=$(now); dd if=$DEV1 of=/tmp/during bs=4096 skip=8192 count=1 iflag=direct 2>/tmp/during.err; rc=$?
    echo "$rc $(awk -v a=$s0 -v b=$(now) 'BEGIN {printf "%.2f", b-a}') $s0" > /tmp/during.rc ) &
  DDPID=$!
  want="reconnected 1 connection(s) of $DEV1 with RECONFIGURE"
  i=0; msg=
  while [ $i -lt 100 ]; do
    msg=$(rootfork sandbox get k1 2>&1 | sed -n 's/^message: *//p')
    [ "$msg" = "$want" ] && break
    sleep 0.1; i=$((i+1))
  done
  wait $DDPID
  read ddrc ddsecs ddstart < /tmp/during.rc
  # The read was issued before the kernel took the replacement socket (dmesg and /proc/uptime
  # share the since-boot clock).
  rts=$(dmesg | grep "nbd$N1: reconnected socket" | tail -n 1 | sed 's/^\[ *\([0-9.]*\)\].*/\1/')
  [ -n "$rts" ] && awk -v a=$ddstart -v b=$rts 'BEGIN {exit !(a < b)}' && pass "$t-read-issued-while-dead" \
    || fail "$t-read-issued-while-dead" "read at ${ddstart}s, reconnect at ${rts:-never}s"
  head -c 4096 /tmp/pat > /tmp/pat1
  [ "$ddrc" = 0 ] && cmp -s /tmp/during /tmp/pat1 && pass "$t-io-in-dead-window" \
    || { cat /tmp/during.err; fail "$t-io-in-dead-window" "dd exit $ddrc"; }
  s0=$(now); dd if=$DEV1 of=/dev/null bs=4096 skip=8193 count=1 iflag=direct 2>/dev/null
  base=$(awk -v a=$s0 -v b=$(now) 'BEGIN {printf "%.2f", b-a}')
  echo "NOTE a 4 KiB O_DIRECT read issued once the kernel saw the connection dead took ${ddsecs}s (the reconnect comes at the next health round, 1 s apart); the same read afterwards ${base}s"
  [ ! -e $STATE/faults/kill-connection.k1 ] && pass "$t-trigger-consumed" || fail "$t-trigger-consumed" "trigger still there"
  [ "$msg" = "$want" ] && pass "$t-status-message" || fail "$t-status-message" "message: $msg"
  grep -q "shut down one kernel connection" $LOG && pass "$t-fault-injected" || fail "$t-fault-injected" "no log"
  grep -q "NBD connections reconnected" $LOG && pass "$t-reconnected-logged" || fail "$t-reconnected-logged" "no log"
  # The guest's data is still there and new I/O goes through the replacement connection.
  drop_caches
  dd if=$DEV1 bs=4096 skip=8192 count=256 iflag=direct 2>/dev/null | cmp -s - /tmp/pat && pass "$t-data-after" || fail "$t-data-after" "pattern differs"
  dd if=/dev/urandom of=/tmp/pat2 bs=4096 count=64 2>/dev/null
  dd if=/tmp/pat2 of=$DEV1 bs=4096 seek=4096 conv=fsync,notrunc 2>/dev/null
  drop_caches
  dd if=$DEV1 bs=4096 skip=4096 count=64 2>/dev/null | cmp -s - /tmp/pat2 && pass "$t-write-after" || fail "$t-write-after" "read back differs"
  connected_to $N1 $DPID && pass "$t-same-device" || fail "$t-same-device" "nbd$N1"
  sleep 1.5
  h=$(field k1 health); s=$(field k1 state)
  [ "$h" = healthy ] && [ "$s" = running ] && pass "$t-healthy" || { rootfork sandbox get k1; fail "$t-healthy" "state=$s health=$h"; }
  scrape && [ "$(metric 'rootfork_health_recoveries_total{result="reconnected"}')" = 1 ] \
    && [ "$(metric 'rootfork_health_recoveries_total{result="marked_failed"}')" = 0 ] && pass "$t-metric" \
    || { grep recoveries /tmp/metrics; fail "$t-metric" "recoveries"; }
  kill $EVPID 2>/dev/null; wait $EVPID 2>/dev/null
  grep -q "$want" /tmp/k1.events && pass "$t-event" || { cat /tmp/k1.events; fail "$t-event" "no health event"; }
  dmesg | grep -i "nbd$N1" | tail -n 5
fi

# --- 3. ext4 in the guest's view; pause releases the device, resume brings the data back ------
t=pause
# The demo template is ext4 with 1 KiB blocks (mke2fs's default for 64 MiB), which the kernel
# cannot mount on a device with 4 KiB logical blocks; import one with 4 KiB blocks.
mkdir -p /tmp/troot
echo "Hello from a rootfork sandbox (VM template)" > /tmp/troot/hello.txt
if /sbin/mke2fs -q -F -t ext4 -b 4096 -d /tmp/troot /tmp/ext4.img 8192 && rootfork template import ext4 /tmp/ext4.img >/tmp/import.out 2>&1; then
  pass "$t-template-import"
else
  cat /tmp/import.out; fail "$t-template-import" "import failed"
fi
if create k2 ext4; then
  N2=$N; DEV2=$DEV
  if mount -t ext4 $DEV2 /mnt; then
    grep -q "Hello from a rootfork sandbox" /mnt/hello.txt && pass "$t-template-file" || fail "$t-template-file" "hello.txt"
    dd if=/dev/urandom of=/mnt/guest.bin bs=64k count=16 2>/dev/null
    echo "written in k2" > /mnt/note.txt
    (cd /mnt && sha256sum guest.bin note.txt hello.txt > /tmp/k2sums)
    umount /mnt
  else
    fail "$t-mount" "mount -t ext4 $DEV2"
  fi
  if rootfork sandbox pause k2 >/tmp/k2.pause 2>&1; then
    [ "$(field k2 state)" = paused ] && pass "$t-paused" || fail "$t-paused" "state $(field k2 state)"
    wait_quiescent $N2 && pass "$t-releases-device" || fail "$t-releases-device" "nbd$N2 pid=$(cat /sys/block/nbd$N2/pid 2>/dev/null)"
  else
    cat /tmp/k2.pause; fail "$t-paused" "pause failed"
  fi
  if rootfork sandbox resume k2 >/tmp/k2.resume 2>&1; then
    DEV2=$(awk '/^device:/ {print $2}' /tmp/k2.resume); N2=${DEV2#/dev/nbd}
    case "$DEV2" in /dev/nbd[0-9]*) pass "$t-resume-device";; *) cat /tmp/k2.resume; fail "$t-resume-device" "no device";; esac
    connected_to $N2 $DPID && pass "$t-resume-connected" || fail "$t-resume-connected" "nbd$N2"
    drop_caches
    if mount -t ext4 $DEV2 /mnt; then
      (cd /mnt && sha256sum -c /tmp/k2sums >/dev/null 2>&1) && pass "$t-data-survives" || fail "$t-data-survives" "checksums differ"
      umount /mnt
    else
      fail "$t-data-survives" "mount after resume"
    fi
  else
    cat /tmp/k2.resume; fail "$t-resume-device" "resume failed"
  fi
else
  fail "$t-create" "create failed"
fi

# --- 4. delete releases every device, nothing left behind --------------------------------------
t=delete
ok=1
for id in k1 k2; do rootfork sandbox delete $id >/dev/null 2>&1 || ok=0; done
[ $ok = 1 ] && pass "$t-ok" || fail "$t-ok" "delete failed"
ok=1
for n in $N1 $N2; do wait_quiescent $n 50 || { ok=0; echo "nbd$n: pid=$(cat /sys/block/nbd$n/pid 2>/dev/null) size=$(cat /sys/block/nbd$n/size)"; }; done
[ $ok = 1 ] && pass "$t-quiescent" || fail "$t-quiescent" "see above"
[ -z "$(ls $STATE/cache)$(ls $STATE/paused)" ] && pass "$t-no-files" || fail "$t-no-files" "$(ls $STATE/cache $STATE/paused)"
[ "$(rootfork device list | grep -c '^/dev/nbd[0-9]* *\(free\|cooling\)')" = 8 ] && pass "$t-slots-free" \
  || { rootfork device list; fail "$t-slots-free" "not every slot free"; }
[ "$(field k1 state)" = deleted ] && pass "$t-tombstone" || fail "$t-tombstone" "k1 is $(field k1 state)"
[ -n "$TBUILD" ] && [ "$(tsum)" = "$TSUM" ] && pass "$t-template-unchanged" || fail "$t-template-unchanged" "checksum of build $TBUILD"

# --- 5. restarts under a running writer: SIGKILL and SIGTERM, the sandbox is adopted -----------
# A kernel sandbox's device stays connected while the daemon is gone (the kernel holds its I/O
# for dead_conn_timeout); the next start reopens its overlay and hands the device new sockets
# with RECONFIGURE. A writer does 4 KiB O_DIRECT writes, cycling over 256 blocks, through
# ADOPT_N SIGKILL restarts and ADOPT_N SIGTERM restarts: none may fail, every write lands, and
# the longest gap between two completed writes around each restart is the stall (LATENCY lines).
# The request timeout is 2 s here: a request in flight when the daemon dies is re-sent by the
# kernel only when it times out.
t=adopt
ADOPT_N=${ADOPT_N:-3}
RCONF=/tmp/rootfork-restart.toml
printf '[debug]\nfault_injection = true\n[kernel]\nrequest_timeout_secs = 2\n' > $RCONF
WBASE=4096 # the writer's first block (16 MiB into the disk)
# writer DEV J: writes block J mod 256 with the (J/256)th pass's pattern (/tmp/wa, /tmp/wb
# alternately), logging "J uptime" after each completed write, until /tmp/w.stop exists.
writer() {
  j=$2
  while [ ! -e /tmp/w.stop ]; do
    b=$((j % 256)); src=/tmp/wa; [ $((j / 256 % 2)) = 1 ] && src=/tmp/wb
    if dd if=$src of=$1 bs=4096 skip=$b seek=$((WBASE + b)) count=1 oflag=direct conv=notrunc 2>/tmp/w.dderr; then
      read up idle < /proc/uptime; echo "$j $up" >> /tmp/w.log
    else
      echo "write $j failed: $(cat /tmp/w.dderr)" >> /tmp/w.fail
      return 1
    fi
    j=$((j+1))
  done
}
last_write() { tail -n 1 /tmp/w.log | cut -d' ' -f1; }
last_write_at() { tail -n 1 /tmp/w.log | cut -d' ' -f2; }
# start_writer DEV: from the write after the last logged one; sets $WPID.
start_writer() { rm -f /tmp/w.stop; j0=$(($(last_write) + 1)); writer $1 $j0 & WPID=$!; }
stop_writer() { touch /tmp/w.stop; wait $WPID; WPID=; }
# progress_after T: waits (up to 60 s) for a write completed after uptime T.
progress_after() {
  i=0
  while [ $i -lt 600 ]; do
    awk -v a=$(last_write_at) -v b=$1 'BEGIN {exit !(a > b)}' && return 0
    [ -s /tmp/w.fail ] && return 1
    sleep 0.1; i=$((i+1))
  done
  return 1
}
# stall T0 T1: the longest gap (ms) between consecutive completed writes overlapping [T0, T1].
stall() {
  awk -v a=$1 -v b=$2 'NR > 1 && $2 >= a && prev <= b { g = $2 - prev; if (g > m) m = g } { prev = $2 } END { printf "%d\n", m * 1000 }' /tmp/w.log
}
# restarts SIG NAME: ADOPT_N restarts of the daemon with SIG under the writer; stalls to /tmp/NAME.ms.
restarts() {
  rm -f /tmp/$2.ms; k=1
  while [ $k -le $ADOPT_N ]; do
    t0=$(now)
    kill -$1 $DPID; wait $DPID 2>/dev/null; DPID=
    start_daemon || { echo "restart $k: the daemon did not come back"; return 1; }
    t1=$(now)
    progress_after $t1 || { echo "restart $k: no write completed after the restart"; return 1; }
    stall $t0 $t1 >> /tmp/$2.ms
    k=$((k+1))
  done
}
# writer_region_ok DEV: the writer's 256 blocks hold what its last logged write implies.
writer_region_ok() {
  J=$(last_write); P=$((J / 256)); r=$((J % 256))
  cur=/tmp/wa; prev=/tmp/wb; [ $((P % 2)) = 1 ] && { cur=/tmp/wb; prev=/tmp/wa; }
  dd if=$cur bs=4096 count=$((r + 1)) 2>/dev/null > /tmp/wexp
  dd if=$prev bs=4096 skip=$((r + 1)) 2>/dev/null >> /tmp/wexp
  drop_caches
  dd if=$1 bs=4096 skip=$WBASE count=256 iflag=direct 2>/dev/null | cmp -s - /tmp/wexp
}
# same_device: nbd$N3 was never disconnected (sysfs `pid` is the thread that sent CONNECT, in the
# first daemon; RECONFIGURE keeps it) and the daemon now running holds it for k3.
same_device() {
  [ "$(cat /sys/block/nbd$N3/pid 2>/dev/null)" = "$PID3" ] && [ "$(cat /sys/block/nbd$N3/size)" != 0 ] || return 1
  rootfork device list > /tmp/dl 2>&1; grep "^$DEV3 " /tmp/dl | grep -q "connected *k3"
}
kill -TERM $DPID; wait $DPID; DPID=
CONF=$RCONF
if start_daemon && create k3; then
  N3=$N; DEV3=$DEV; PID3=$(cat /sys/block/nbd$N3/pid)
  dd if=/dev/urandom of=/tmp/wa bs=4096 count=256 2>/dev/null
  dd if=/dev/urandom of=/tmp/wb bs=4096 count=256 2>/dev/null
  # The region starts as the pass before the first (/tmp/wb), so every block is known.
  dd if=/tmp/wb of=$DEV3 bs=4096 seek=$WBASE conv=fsync,notrunc 2>/dev/null
  echo "-1 $(now)" > /tmp/w.log; rm -f /tmp/w.fail
  for sig in KILL TERM; do
    start_writer $DEV3
    progress_after $(now) || fail "$t-$sig-writer-runs" "no write completed"
    n0=$(last_write)
    if restarts $sig $sig; then pass "$t-$sig-restarts"; else fail "$t-$sig-restarts" "see above"; fi
    stop_writer
    [ ! -s /tmp/w.fail ] && pass "$t-$sig-no-eio" || fail "$t-$sig-no-eio" "$(cat /tmp/w.fail)"
    echo "NOTE $sig: $(( $(last_write) - n0 )) writes over $ADOPT_N restarts"
    same_device && pass "$t-$sig-same-device" || { cat /tmp/dl; fail "$t-$sig-same-device" "nbd$N3 pid=$(cat /sys/block/nbd$N3/pid 2>/dev/null), first $PID3"; }
    writer_region_ok $DEV3 && pass "$t-$sig-data" || fail "$t-$sig-data" "the writer's region differs after write $(last_write)"
    m=$(rootfork sandbox get k3 2>&1 | sed -n 's/^message: *//p')
    s=$(field k3 state)
    case "$s $m" in "running adopted after a daemon restart"*) pass "$t-$sig-status";; *) fail "$t-$sig-status" "state $s, message: $m";; esac
    if [ -s /tmp/$sig.ms ]; then
      echo "LATENCY kernel_restart_stall $sig n=$(wc -l < /tmp/$sig.ms) p50_ms=$(pct 50 /tmp/$sig.ms) max_ms=$(pct 100 /tmp/$sig.ms)"
    fi
  done
  # The peer of the stalls, same run: the gap between two writes when nothing restarts (p50 over
  # every gap, the restarts' among them).
  awk 'NR > 2 { printf "%d\n", ($2 - prev) * 1000 } { prev = $2 }' /tmp/w.log > /tmp/gaps.ms
  g50=$(pct 50 /tmp/gaps.ms)
  echo "LATENCY kernel_write_gap n=$(wc -l < /tmp/gaps.ms) p50_ms=$g50"
  for sig in KILL TERM; do
    [ -s /tmp/$sig.ms ] && echo "LATENCY kernel_restart_stall $sig p50 / write gap p50: $(awk -v a=$(pct 50 /tmp/$sig.ms) -v b=$g50 'BEGIN { if (b < 1) b = 1; printf "%.1f", a / b }')"
  done
  grep -q "adopted a connected nbd device" $LOG && pass "$t-logged" || fail "$t-logged" "no log line"
  grep -q "reclaimed an nbd slot" $LOG && fail "$t-not-reclaimed" "the start-up reclaim took an adopted device" || pass "$t-not-reclaimed"
  scrape && [ "$(metric 'rootfork_adoptions_total{result="adopted",reason="none"}')" = 1 ] && pass "$t-metric" \
    || { grep adoptions /tmp/metrics; fail "$t-metric" "no adoption counted"; }
  # A device whose overlay cannot be reopened: FAILED with its files kept, the device released.
  kill -KILL $DPID; wait $DPID 2>/dev/null; DPID=
  for f in $STATE/cache/k3.*.cache.state; do : > $f; done
  if start_daemon; then
    [ "$(field k3 state)" = failed ] && pass "$t-damaged-failed" || fail "$t-damaged-failed" "state $(field k3 state)"
    wait_quiescent $N3 100 && pass "$t-damaged-device-released" || fail "$t-damaged-device-released" "nbd$N3 pid=$(cat /sys/block/nbd$N3/pid 2>/dev/null)"
    [ -n "$(ls $STATE/cache)" ] && pass "$t-damaged-files-kept" || fail "$t-damaged-files-kept" "no files"
    rootfork sandbox delete k3 >/dev/null 2>&1 && [ -z "$(ls $STATE/cache)" ] && pass "$t-damaged-delete" || fail "$t-damaged-delete" "$(ls $STATE/cache)"
    # A new kernel sandbox works and starts fresh.
    if create k4; then
      dd if=$TPL bs=4096 skip=8192 count=256 2>/dev/null > /tmp/tmid
      dd if=$DEV bs=4096 skip=8192 count=256 2>/dev/null | cmp -s - /tmp/tmid && pass "$t-new-sandbox-reads-template" || fail "$t-new-sandbox-reads-template" "differs"
      rootfork sandbox delete k4 >/dev/null 2>&1 || fail "$t-new-sandbox-delete" "delete"
    else
      fail "$t-new-sandbox" "create after restart failed"
    fi
  else
    fail "$t-damaged-restart" "the daemon did not come back"
  fi
else
  fail "$t" "daemon or create failed"
fi

# --- 5b. Firecracker from the daemon: the double started with Firecracker's arguments -----------
# Its report (JSON lines on its stdout: STATE/vm/fc/rf-N/vmm.log) says which API calls it got
# and what it opened; `resolved` is the opened descriptor's /proc/self/fd link.
fc_pid() { rootfork sandbox get fc1 2>&1 | sed -n 's/^vm: *firecracker pid \([0-9]*\).*/\1/p'; }
# pid_runs PID: the process exists and is not a zombie (an orphaned VMM is reaped by this init).
pid_runs() { [ -n "$1" ] && [ -r /proc/$1/stat ] && ! grep -q ') Z ' /proc/$1/stat; }
newest_fc_log() { echo "$STATE/vm/fc/rf-$(ls $STATE/vm/fc | sed -n 's/^rf-//p' | sort -n | tail -n1)/vmm.log"; }
fc_calls() { grep '"event":"request"' "$1" | sed -n 's/.*"method":"\([A-Z]*\)".*"path":"\([^"]*\)".*/\1 \2/p' | tr '\n' ';'; }
t=firecracker
echo "not a kernel: the double only opens it" > /tmp/vmlinux
if [ -n "$DPID" ] && rootfork sandbox create --template demo --id fc1 --provider kernel --vmm firecracker \
    --kernel /tmp/vmlinux --memory-mib 128 >/tmp/fc1.create 2>&1; then
  pass "$t-create"
  FDEV=$(awk '/^device:/ {print $2}' /tmp/fc1.create)
  FR1=$(newest_fc_log)
  c=$(fc_calls $FR1)
  [ "$c" = "PUT /boot-source;PUT /drives/rootfs;PUT /machine-config;PUT /entropy;PUT /actions;" ] && pass "$t-boot-calls" || fail "$t-boot-calls" "$c"
  grep '"event":"open"' $FR1 | grep '"drive_id":"rootfs"' > /tmp/fc1.opens
  [ "$(wc -l < /tmp/fc1.opens)" = 1 ] && grep -q '"path":"/fc-vm/rootfs.ext4"' /tmp/fc1.opens && grep -q "\"resolved\":\"$FDEV\"" /tmp/fc1.opens \
    && pass "$t-drive-is-the-device" || fail "$t-drive-is-the-device" "device $FDEV, opens: $(cat /tmp/fc1.opens)"
  if rootfork sandbox pause fc1 >/tmp/fc1.pause 2>&1; then
    pass "$t-pause"
    c=$(fc_calls $FR1)
    [ "$c" = "PUT /boot-source;PUT /drives/rootfs;PUT /machine-config;PUT /entropy;PUT /actions;PATCH /vm;PUT /snapshot/create;" ] && pass "$t-pause-calls" || fail "$t-pause-calls" "$c"
    ls $STATE/paused/fc1.*.fcstate $STATE/paused/fc1.*.fcmem >/dev/null 2>&1 && pass "$t-snapshot-files" || fail "$t-snapshot-files" "$(ls $STATE/paused)"
    if rootfork sandbox resume fc1 >/tmp/fc1.resume 2>&1; then
      pass "$t-resume"
      FDEV2=$(awk '/^device:/ {print $2}' /tmp/fc1.resume)
      FR2=$(newest_fc_log)
      [ "$FR2" != "$FR1" ] && pass "$t-resume-new-process" || fail "$t-resume-new-process" "$FR2"
      c=$(fc_calls $FR2)
      [ "$c" = "PUT /snapshot/load;PATCH /vm;" ] && pass "$t-resume-calls" || fail "$t-resume-calls" "$c"
      grep '"event":"open"' $FR2 | grep '"drive_id":"rootfs"' > /tmp/fc2.opens
      grep -q '"path":"/fc-vm/rootfs.ext4"' /tmp/fc2.opens && grep -q "\"resolved\":\"$FDEV2\"" /tmp/fc2.opens \
        && pass "$t-resumed-drive-is-the-new-device" || fail "$t-resumed-drive-is-the-new-device" "device $FDEV2, opens: $(cat /tmp/fc2.opens)"
      ls $STATE/paused/fc1.*.fc* >/dev/null 2>&1 && fail "$t-snapshot-used-up" "$(ls $STATE/paused)" || pass "$t-snapshot-used-up"
      # The resumed VM runs on through a SIGTERM and a SIGKILL restart of the daemon and is
      # adopted by pid and start time: the same pid, running, on the same device.
      FP=$(fc_pid)
      for sig in TERM KILL; do
        kill -$sig $DPID; wait $DPID 2>/dev/null; DPID=
        pid_runs "$FP" && pass "$t-$sig-vm-runs-on" || fail "$t-$sig-vm-runs-on" "pid '$FP' is gone"
        if start_daemon; then
          s=$(field fc1 state); fp=$(fc_pid)
          [ "$s" = running ] && [ -n "$fp" ] && [ "$fp" = "$FP" ] && [ "$(field fc1 device)" = "$FDEV2" ] \
            && pass "$t-$sig-adopted" \
            || fail "$t-$sig-adopted" "state $s, pid '$fp' (was '$FP'): $(rootfork sandbox get fc1 2>&1 | sed -n 's/^message: *//p')"
        else
          fail "$t-$sig-restart" "the daemon did not come back"
        fi
      done
    else
      cat /tmp/fc1.resume; fail "$t-resume" "resume failed"
    fi
  else
    cat /tmp/fc1.pause; fail "$t-pause" "pause failed"
  fi
  grep -h '"event":"open"' $STATE/vm/fc/rf-*/vmm.log | grep -q "\"resolved\":\"$STATE/store/" && fail "$t-template-never-opened" "a VMM opened a build of the store" || pass "$t-template-never-opened"
  FN=${FDEV2#/dev/nbd}
  if rootfork sandbox delete fc1 >/dev/null 2>&1; then
    pass "$t-delete"
    [ -n "$FN" ] && wait_quiescent $FN 50 && pass "$t-delete-released" || fail "$t-delete-released" "nbd$FN"
    pgrep -f rootfork-fc-double >/dev/null 2>&1 && fail "$t-vmm-stopped" "$(pgrep -fl rootfork-fc-double)" || pass "$t-vmm-stopped"
    [ -n "$FP" ] && pid_runs "$FP" && fail "$t-adopted-vm-killed" "pid $FP still runs" || pass "$t-adopted-vm-killed"
  else
    fail "$t-delete" "delete failed"
  fi
else
  cat /tmp/fc1.create 2>/dev/null; fail "$t-create" "create failed"
fi

# --- 6. SIGTERM with no sandbox running: the daemon exits and removes its socket ---------------
t=sigterm
if [ -n "$DPID" ]; then
  kill -TERM $DPID
  i=0; while kill -0 $DPID 2>/dev/null && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
  if kill -0 $DPID 2>/dev/null; then
    fail "$t-exits" "still running after 20 s"; kill -KILL $DPID
  else
    wait $DPID && pass "$t-exits" || fail "$t-exits" "exit status $?"
  fi
  DPID=
  [ ! -e $ROOTFORK_API ] && pass "$t-socket-removed" || fail "$t-socket-removed" "$ROOTFORK_API"
fi

# --- 6b. the warm stock (kernel.warm_slots): create-to-ready with and without it, same run -----
# WARM_N creates of the demo template on a daemon without a stock, then on one with
# `warm_slots = 2` (waiting for the stock to be refilled before each create, so each takes a
# stocked device). The daemon's own create-to-ready (`ready in:`) is collected; the p50/p95 are
# printed as LATENCY lines, only correctness is checked. Then: a stocked daemon killed with
# SIGKILL leaves its devices to the next start's reclaim; a stocked daemon stopped with SIGTERM
# closes them.
t=warm
WARM_N=${WARM_N:-10}
WCONF=/tmp/rootfork-warm.toml
# (Without fault injection: with it on the daemon stocks nothing, every create attaches cold.)
printf '[kernel]\nwarm_slots = 2\n' > $WCONF
# warm_count: devices `device list` shows as warm.
warm_count() { rootfork device list > /tmp/wlist 2>&1; grep -c '^/dev/nbd[0-9]* *warm' /tmp/wlist; }
# wait_warm N: until at least N devices are warm (up to 30 s).
wait_warm() { w=0; while [ "$(warm_count)" -lt $1 ] && [ $w -lt 300 ]; do sleep 0.1; w=$((w+1)); done; [ "$(warm_count)" -ge $1 ]; }
# ready_ms ID: the create's `ready in:` milliseconds.
ready_ms() { awk '/^ready in:/ {print $3}' /tmp/$1.create; }
# create_series NAME [WAIT]: WARM_N creates and deletes, `ready in` values to /tmp/NAME.ms;
# with WAIT, waits for WAIT warm devices before each create.
create_series() {
  rm -f /tmp/$1.ms; ok=1
  k=1 # (not i: the helpers' loops use i)
  while [ $k -le $WARM_N ]; do
    [ -n "$2" ] && { wait_warm $2 || { ok=0; echo "stock not refilled ($(warm_count) warm)"; }; }
    if create $1$k; then
      ready_ms $1$k >> /tmp/$1.ms
      rootfork sandbox delete $1$k >/dev/null 2>&1 || ok=0
    else
      ok=0
    fi
    k=$((k+1))
  done
  [ $ok = 1 ]
}
if start_daemon; then
  create_series cold && pass "$t-cold-creates" || fail "$t-cold-creates" "a create failed"
  [ "$(warm_count)" = 0 ] && pass "$t-none-without-config" || fail "$t-none-without-config" "$(warm_count) warm"
  kill -TERM $DPID; wait $DPID; DPID=
else
  fail "$t-start-cold" "daemon"
fi
SAVED_CONF=$CONF; CONF=$WCONF
if start_daemon; then
  # Two templates (demo, ext4) of different sizes: two devices of each.
  wait_warm 4 && pass "$t-stocked" || { rootfork device list; fail "$t-stocked" "$(warm_count) warm devices"; }
  if scrape; then
    [ "$(metric 'rootfork_pool_slots{state="warm"}')" = 4 ] && pass "$t-metric-slots" \
      || { grep pool_slots /tmp/metrics; fail "$t-metric-slots" "not 4 warm"; }
    grep -q 'kernel_warm_slots' /tmp/metrics && pass "$t-metric-stock" || fail "$t-metric-stock" "no kernel_warm_slots resource"
  else
    fail "$t-metrics" "scrape failed"
  fi
  # A create takes a stocked device: the device is one that was warm, renamed to the sandbox,
  # reads the template (not the zeroes served before the bind) and keeps a write.
  WARM_DEVS=$(grep '^/dev/nbd[0-9]* *warm' /tmp/wlist | awk '{print $1}')
  if create kw; then
    echo "$WARM_DEVS" | grep -qx "$DEV" && pass "$t-took-stocked-device" || fail "$t-took-stocked-device" "$DEV not in: $WARM_DEVS"
    rootfork device list | grep "^$DEV " | grep -q "connected *kw" && pass "$t-renamed" || { rootfork device list; fail "$t-renamed" "$DEV not connected to kw"; }
    dd if=$DEV bs=4096 count=256 2>/dev/null | cmp -s - /tmp/thead && pass "$t-reads-template" || fail "$t-reads-template" "differs"
    dd if=/tmp/pat of=$DEV bs=4096 seek=8192 conv=fsync,notrunc 2>/dev/null
    drop_caches
    dd if=$DEV bs=4096 skip=8192 count=256 2>/dev/null | cmp -s - /tmp/pat && pass "$t-pattern" || fail "$t-pattern" "read back differs"
    wait_warm 4 && pass "$t-refilled" || fail "$t-refilled" "$(warm_count) warm"
    rootfork sandbox delete kw >/dev/null 2>&1 && pass "$t-delete" || fail "$t-delete" "delete"
  else
    fail "$t-create" "create failed"
  fi
  create_series hot 4 && pass "$t-warm-creates" || fail "$t-warm-creates" "a create failed"
  # SIGKILL with a full stock: the next start reclaims the stocked devices.
  kill -KILL $DPID; wait $DPID 2>/dev/null; DPID=
  n=0; for d in /sys/block/nbd*; do [ -s $d/pid ] && n=$((n+1)); done
  [ $n -ge 4 ] && pass "$t-left-connected" || fail "$t-left-connected" "$n connected"
  CONF=$SAVED_CONF
  if start_daemon; then
    ok=1
    for d in /sys/block/nbd*; do wait_quiescent ${d#/sys/block/nbd} 100 || { ok=0; echo "${d##*/} still connected"; }; done
    [ $ok = 1 ] && pass "$t-reclaimed" || fail "$t-reclaimed" "see above"
    kill -TERM $DPID; wait $DPID; DPID=
  else
    fail "$t-restart" "daemon"
  fi
  # SIGTERM with a full stock: the daemon closes it.
  CONF=$WCONF
  if start_daemon && wait_warm 4; then
    kill -TERM $DPID; wait $DPID && pass "$t-sigterm-exits" || fail "$t-sigterm-exits" "exit status"; DPID=
    ok=1
    for d in /sys/block/nbd*; do wait_quiescent ${d#/sys/block/nbd} 50 || { ok=0; echo "${d##*/} still connected"; }; done
    [ $ok = 1 ] && pass "$t-sigterm-closed" || fail "$t-sigterm-closed" "see above"
  else
    fail "$t-sigterm" "daemon or stock"
  fi
else
  fail "$t-start" "daemon with warm_slots"
fi
CONF=$SAVED_CONF
if [ -s /tmp/cold.ms ] && [ -s /tmp/hot.ms ]; then
  c50=$(pct 50 /tmp/cold.ms); c95=$(pct 95 /tmp/cold.ms); w50=$(pct 50 /tmp/hot.ms); w95=$(pct 95 /tmp/hot.ms)
  echo "LATENCY create_to_ready cold n=$(wc -l < /tmp/cold.ms) p50_ms=$c50 p95_ms=$c95"
  echo "LATENCY create_to_ready warm n=$(wc -l < /tmp/hot.ms) p50_ms=$w50 p95_ms=$w95"
  echo "LATENCY create_to_ready warm/cold p50 ratio $(awk -v a=$w50 -v b=$c50 'BEGIN {printf "%.2f", a / b}')"
fi

# --- 7. every slot quiescent ------------------------------------------------------------------
ok=1
for d in /sys/block/nbd*; do n=${d#/sys/block/nbd}; quiescent $n || { ok=0; echo "nbd$n not quiescent"; }; done
[ $ok = 1 ] && pass all-quiescent || fail all-quiescent "see above"

finish
