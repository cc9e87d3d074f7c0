#!/bin/busybox sh
# /init of the kernel-path benchmark VM (scripts/bench-kernel): the same copy-on-write disk over
# one random template, served on /dev/nbdN by rootfork (`rootfork nbd attach`, 1/2/4
# connections), by `qemu-nbd -c` over a qcow2 overlay, and by `nbd-client` connected to `nbdkit
# --filter=cow cow-block-size=4096` (1/2 connections), measured with fio (libaio, direct=1) with
# the servers interleaved, then a cold attach/detach timing of each (`attach_timer`, the same
# clock for every server). Prints `BENCH …` and `ATTACH …` lines for the host to tabulate, a
# PASS/FAIL line per run (it attached, the device read the template, fio finished with I/O done,
# the server's CPU was read) and `RESULT pass=N fail=M`.
#
# Kernel command line (set by scripts/bench-kernel): BENCH_TESTS, BENCH_SERVERS,
# BENCH_ATTACH_SERVERS (comma lists), BENCH_RUNTIME (fio seconds per run), BENCH_RUNS (rounds),
# BENCH_ATTACH_N (attach cycles per server), BENCH_SIZE_MIB (template size); BENCH_TESTS=none
# runs no fio test (attach timing only); BENCH_PROFILE=1 runs rootfork with
# ROOTFORK_PHASE_PROFILE=1 and the attach's stage events (RUST_LOG) and prints one `PROFILE` line
# per cycle: its phases (ms from the spawn), the attach's stages (att_*_us, from the attach's
# start) and the timer's `CYCLE` fields.
. /lib/guest-lib.sh
guest_setup vmbench
export ROOTFORK_HOST_ID=vmbench RUST_LOG=${RUST_LOG:-warn}
guest_insmod_nbd 16

TESTS=$(echo "${BENCH_TESTS:-randread-j1,randwrite-j1}" | tr , ' ')
[ "$TESTS" = none ] && TESTS=
if [ "${BENCH_PROFILE:-0}" = 1 ]; then
  export ROOTFORK_PHASE_PROFILE=1 RUST_LOG=warn,rootfork_kernel::attach=debug
fi
SERVERS=$(echo "${BENCH_SERVERS:-rootfork-c1,qemu-nbd,nbdkit-cow4k-c1}" | tr , ' ')
RUNTIME=${BENCH_RUNTIME:-2}
RUNS=${BENCH_RUNS:-1}
ATTACH_N=${BENCH_ATTACH_N:-5}
ATTACH_SERVERS=$(echo "${BENCH_ATTACH_SERVERS:-rootfork-c1,qemu-nbd,nbdkit-cow4k-c1}" | tr , ' ')
SIZE_MIB=${BENCH_SIZE_MIB:-64}
TPL=/tmp/t.img
CLK_TCK=100 # USER_HZ of Debian's kernels
QEMU_DEV=/dev/nbd15
NBDKIT_DEV=/dev/nbd14
W=/run/bench
# qemu-nbd -c puts its socket in /var/lock.
mkdir -p $W /var/tmp /var/lock

dd if=/dev/urandom of=$TPL bs=1048576 count="$SIZE_MIB" 2>/dev/null
dd if=$TPL of=$W/head bs=4096 count=1 2>/dev/null
echo "NOTE template ${SIZE_MIB} MiB; tests: $TESTS; servers: $SERVERS; runtime ${RUNTIME}s x $RUNS; attach n=$ATTACH_N"

# gone PID: the process has exited (absent, or a zombie nobody reaped yet).
gone() { [ ! -e /proc/$1/stat ] || grep -q ') Z' /proc/$1/stat 2>/dev/null; }
# wait_gone PID: up to 30 s.
wait_gone() { i=0; while ! gone $1 && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; gone $1; }
# cpu_ticks PID: utime+stime of the whole process (all threads), clock ticks.
cpu_ticks() { sed 's/.*) //' /proc/$1/stat | awk '{print $12 + $13}'; }
# conns SERVER: the connection count in the server's name (-cN), 1 without one.
conns() { case "$1" in *-c[0-9]*) echo "${1##*-c}";; *) echo 1;; esac; }

# The commands that attach and detach a fresh copy-on-write disk, the same for the fio runs and
# the attach timing. attach_cmd SERVER prints a shell command whose stdout's first line is the
# device (rootfork) or that returns once the device is connected (the peers); detach_cmd prints
# the command that detaches it (empty: SIGTERM to the attach command).
attach_cmd() {
  case "$1" in
    rootfork-c*) echo "exec rootfork nbd attach --template $TPL --sandbox bench --connections $(conns "$1")" ;;
    qemu-nbd) echo "qemu-nbd -c $QEMU_DEV --pid-file $W/server.pid -f qcow2 $W/overlay.qcow2" ;;
    nbdkit-cow4k-c*) echo "nbdkit -U $W/nbdkit.sock -P $W/server.pid --filter=cow file $TPL cow-block-size=4096 && nbd-client -unix $W/nbdkit.sock $NBDKIT_DEV -b 512 -C $(conns "$1") >/dev/null" ;;
  esac
}
detach_cmd() {
  case "$1" in
    rootfork-c*) ;;
    qemu-nbd) echo "qemu-nbd -d $QEMU_DEV >/dev/null" ;;
    nbdkit-cow4k-c*) echo "nbd-client -d $NBDKIT_DEV >/dev/null 2>&1; kill \$(cat $W/server.pid)" ;;
  esac
}
# prepare SERVER: untimed set-up before an attach (qemu-nbd's qcow2 overlay over the template).
prepare() {
  rm -f $W/server.pid $W/nbdkit.sock $W/overlay.qcow2 $W/attach.out
  case "$1" in qemu-nbd) qemu-img create -q -f qcow2 -b $TPL -F raw $W/overlay.qcow2 ;; esac
}
# cleanup SERVER: after a detach, the server process is gone and its files removed.
cleanup() {
  [ -s $W/server.pid ] && wait_gone "$(cat $W/server.pid)"
  rm -f $W/server.pid $W/nbdkit.sock $W/overlay.qcow2
}

# start SERVER: attaches a fresh disk; sets DEV and SPID (the serving process) or returns 1.
start() {
  prepare "$1" || return 1
  case "$1" in
    rootfork-c*)
      sh -c "$(attach_cmd "$1")" >$W/attach.out 2>$W/attach.err &
      SPID=$!
      i=0; DEV=
      while [ -z "$DEV" ] && [ $i -lt 300 ]; do
        DEV=$(head -n1 $W/attach.out 2>/dev/null)
        [ -n "$DEV" ] || { kill -0 $SPID 2>/dev/null || break; sleep 0.1; i=$((i+1)); }
      done
      [ -n "$DEV" ] || { cat $W/attach.err; return 1; }
      ;;
    *)
      sh -c "$(attach_cmd "$1")" 2>$W/attach.err || { cat $W/attach.err; return 1; }
      SPID=$(cat $W/server.pid 2>/dev/null)
      case "$1" in qemu-nbd) DEV=$QEMU_DEV ;; *) DEV=$NBDKIT_DEV ;; esac
      [ -n "$SPID" ] || return 1
      ;;
  esac
}
# stop SERVER: detaches and waits until the server is gone.
stop() {
  case "$1" in
    rootfork-c*) kill -TERM $SPID && wait $SPID ;;
    *) sh -c "$(detach_cmd "$1")"; cleanup "$1" ;;
  esac
}

# fio_args TEST: rw, block size, queue depth, jobs and extra options of each test.
fio_args() {
  case "$1" in
    randread-j1) echo "--rw=randread --bs=4k --iodepth=32 --numjobs=1" ;;
    randread-j2) echo "--rw=randread --bs=4k --iodepth=32 --numjobs=2" ;;
    randwrite-j1) echo "--rw=randwrite --bs=4k --iodepth=32 --numjobs=1" ;;
    randwrite-j2) echo "--rw=randwrite --bs=4k --iodepth=32 --numjobs=2" ;;
    seqread) echo "--rw=read --bs=1m --iodepth=8 --numjobs=1" ;;
    randwrite-fsync32) echo "--rw=randwrite --bs=4k --iodepth=32 --numjobs=1 --fsync=32" ;;
    *) return 1 ;;
  esac
}
bs_kib() { case "$1" in seqread) echo 1024 ;; *) echo 4 ;; esac; }

# run_one TEST SERVER ROUND: one fio run on a fresh disk; prints its BENCH line.
run_one() {
  t=$1; s=$2; name="$t-$s-r$3"
  args=$(fio_args "$t") || { fail "$name" "unknown test"; return; }
  if ! start "$s"; then fail "$name" "attach failed"; stop "$s" 2>/dev/null; return; fi
  if ! dd if=$DEV bs=4096 count=1 iflag=direct 2>$W/dd.err | cmp - $W/head; then
    cat $W/dd.err; fail "$name" "$DEV does not read the template"; stop "$s"; return
  fi
  c0=$(cpu_ticks $SPID)
  # shellcheck disable=SC2086 # $args is a list of options
  fio --name=b --filename=$DEV --ioengine=libaio --direct=1 $args --group_reporting \
    --time_based --runtime="$RUNTIME" --minimal >$W/fio.out 2>$W/fio.err
  frc=$?
  c1=$(cpu_ticks $SPID)
  if ! stop "$s"; then fail "$name" "detach failed"; fi
  if [ $frc != 0 ] || [ -z "$c0" ] || [ -z "$c1" ]; then
    cat $W/fio.err; fail "$name" "fio exit $frc or no CPU reading"; return
  fi
  # Terse v3: read KiB 6, KiB/s 7, IOPS 8; write KiB 47, KiB/s 48, IOPS 49.
  line=$(awk -F';' -v bs="$(bs_kib "$t")" -v d=$((c1 - c0)) -v hz=$CLK_TCK '
    { kib = $6 + $47; reqs = kib / bs; iops = $8 + $49; mibs = ($7 + $48) / 1024
      cpu = reqs > 0 ? d * 1e6 / hz / reqs : 0
      printf "iops=%.0f mibs=%.1f reqs=%.0f cpu_ticks=%d cpu_us_per_req=%.2f", iops, mibs, reqs, d, cpu }' $W/fio.out)
  echo "BENCH test=$t server=$s round=$3 $line"
  case "$line" in
    iops=0*|*reqs=0\ *|"") fail "$name" "no I/O done: $(cat $W/fio.out)" ;;
    *) pass "$name" ;;
  esac
}

# percentile P FILE: the P-th percentile (nearest rank) of the numbers in FILE.
percentile() {
  sort -n "$2" | awk -v p="$1" '{ v[NR] = $1 } END { r = int((p * NR + 99) / 100); if (r < 1) r = 1; print v[r] }'
}

# --- fio runs: every test, every server, interleaved; the server order rotates per test ------
round=1
while [ $round -le "$RUNS" ]; do
  shift_by=0
  for t in $TESTS; do
    order=$(echo $SERVERS | awk -v k=$shift_by '{ for (i = 0; i < NF; i++) printf "%s ", $(((i + k) % NF) + 1) }')
    for s in $order; do run_one "$t" "$s" $round; done
    shift_by=$((shift_by + 1))
  done
  round=$((round + 1))
done

# --- attach/detach timing: ATTACH_N cycles of each server, interleaved --------------------
for s in $ATTACH_SERVERS; do rm -f $W/att-$s $W/det-$s; done
cycle=1
while [ "$cycle" -le "$ATTACH_N" ]; do
  for s in $ATTACH_SERVERS; do
    prepare "$s" || { fail "attach-$s-$cycle" "prepare"; continue; }
    case "$s" in
      rootfork-c*) dev_arg= ;;
      qemu-nbd) dev_arg="--device $QEMU_DEV" ;;
      *) dev_arg="--device $NBDKIT_DEV" ;;
    esac
    dcmd=$(detach_cmd "$s")
    # shellcheck disable=SC2086 # $dev_arg is empty or two words
    if if [ -n "$dcmd" ]; then
         attach_timer --attach "$(attach_cmd "$s")" $dev_arg --detach "$dcmd" --stdout $W/timer.out
       else
         attach_timer --attach "$(attach_cmd "$s")" $dev_arg --stdout $W/timer.out
       fi >$W/cycle 2>$W/cycle.err; then
      sed -n 's/.*attach_us=\([0-9]*\).*/\1/p' $W/cycle >>$W/att-$s
      sed -n 's/.*detach_us=\([0-9]*\).*/\1/p' $W/cycle >>$W/det-$s
      [ -n "$ROOTFORK_PHASE_PROFILE" ] && echo "PROFILE server=$s cycle=$cycle $(grep -h '^PHASES' $W/cycle.err) $(sed -n 's/.*stage="\([a-z_]*\)" elapsed_us=\([0-9]*\).*/att_\1_us=\2/p' $W/cycle.err | tr '\n' ' ')$(cat $W/cycle)"
    else
      cat $W/cycle.err; fail "attach-$s-$cycle" "attach_timer"
      # Whatever the failed cycle left attached is detached before the next.
      [ -n "$dcmd" ] && sh -c "$dcmd" 2>/dev/null
    fi
    cleanup "$s"
  done
  cycle=$((cycle + 1))
done
for s in $ATTACH_SERVERS; do
  n=$(wc -l < $W/att-$s 2>/dev/null || echo 0)
  if [ "$n" -gt 0 ]; then
    echo "ATTACH server=$s n=$n attach_p50_us=$(percentile 50 $W/att-$s) attach_p95_us=$(percentile 95 $W/att-$s) detach_p50_us=$(percentile 50 $W/det-$s) detach_p95_us=$(percentile 95 $W/det-$s)"
    [ "$n" = "$ATTACH_N" ] && pass "attach-$s" || fail "attach-$s" "$n of $ATTACH_N cycles"
  else
    fail "attach-$s" "no cycle worked"
  fi
done

# Every device is free again.
ok=1
for d in /sys/block/nbd*; do [ -s $d/pid ] && { ok=0; echo "${d##*/} still connected"; }; done
[ $ok = 1 ] && pass all-detached || fail all-detached "see above"
finish
