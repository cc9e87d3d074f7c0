# Shared part of the test VMs' /init scripts (tests/vm/kernel, tests/vm/daemon, tests/boot),
# copied into the initramfs as /lib/guest-lib.sh by the host side and sourced by each /init:
# busybox setup and the /proc, /sys, /dev, /run mounts; loading nbd.ko; `PASS`/`FAIL` counting;
# turning a Rust test binary's libtest output into PASS/FAIL lines; the final
# `RESULT pass=N fail=M` line and power-off. (busybox sh: POSIX shell, no bashisms.)

# guest_setup HOSTNAME: busybox applets, PATH, the pseudo file systems, tmpfs on /run, the
# host name, and the kernel's messages at warning level on the console (they explain failures).
guest_setup() {
  /bin/busybox --install -s /bin
  export PATH=/bin:/sbin:/usr/bin:/usr/sbin
  mount -t proc proc /proc
  mount -t sysfs sys /sys
  mount -t devtmpfs dev /dev
  mkdir -p /run /tmp /var/tmp /var/lib /mnt
  mount -t tmpfs tmpfs /run
  echo "$1" > /proc/sys/kernel/hostname
  echo 4 > /proc/sys/kernel/printk
}

PASS=0; FAIL=0
now() { cut -d' ' -f1 /proc/uptime; }
pass() { echo "PASS $1 (t=$(now)s)"; PASS=$((PASS+1)); }
fail() { echo "FAIL $1: $2 (t=$(now)s)"; FAIL=$((FAIL+1)); }
check() { # check NAME WHY COMMAND...: PASS if the command succeeds
  n=$1; why=$2; shift 2
  if "$@"; then pass "$n"; else fail "$n" "$why"; fi
}

# guest_poweroff: flush and power off (the VM runs with -no-reboot).
guest_poweroff() {
  sync
  poweroff -f
}

# finish: runs the init's `before_finish` function if it defines one (stop daemons, print logs),
# prints `RESULT pass=N fail=M`, powers off.
finish() {
  command -v before_finish >/dev/null 2>&1 && before_finish
  echo "RESULT pass=$PASS fail=$FAIL"
  guest_poweroff
}

# guest_insmod_nbd NBDS_MAX: loads /lib/modules/nbd.ko or fails `insmod` and finishes.
guest_insmod_nbd() {
  insmod /lib/modules/nbd.ko nbds_max="$1" || { fail insmod "nbd.ko did not load"; finish; }
}

# libtest_results OUT PREFIX: one PASS/FAIL line per `test NAME ... ok|FAILED` line of a libtest
# run's captured output OUT (run with the default capture, so those lines are whole), named
# PREFIX-NAME; then checks the run's `test result:` line: a missing one (the binary crashed) is a
# FAIL, and so is a failed run in which no test line said FAILED.
libtest_results() {
  out=$1; prefix=$2; failed=0
  while read -r _ name _ res _; do
    case "$res" in
      ok) pass "$prefix-$name" ;;
      FAILED) fail "$prefix-$name" "test failed (its output is above)"; failed=1 ;;
    esac
  done <<EOT
$(grep -E '^test [^ ]+ \.\.\. (ok|FAILED)$' "$out")
EOT
  summary=$(grep -E '^test result: ' "$out" | tail -n 1)
  if [ -z "$summary" ]; then
    fail "$prefix" "no libtest summary (the test binary crashed?)"
  else
    case "$summary" in
      "test result: ok."*) ;;
      *) [ $failed = 1 ] || fail "$prefix" "$summary" ;;
    esac
  fi
}
