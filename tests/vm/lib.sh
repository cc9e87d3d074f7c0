# Shared steps of the kernel-in-the-loop VM suites (tests/vm/kernel, tests/vm/daemon), sourced by
# their run.sh: the static release build (binaries, and test binaries via `cargo test --no-run`),
# the busybox initramfs with the guest helpers (tests/vm/guest-lib.sh, sourced by every /init),
# and booting Debian's cloud kernel under QEMU TCG with the verdict read from the serial log
# (`PASS`/`FAIL` lines and a final `RESULT pass=N fail=M`). Needs `eval "$(tests/vm/assets.sh)"`
# first (QEMU, KERNEL, MODDIR).

VM_TRIPLE=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
VM_REL=$CARGO_TARGET_DIR/$VM_TRIPLE/release
VM_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Static, and not position-independent: a static PIE relocates itself at every start (every
# pointer in its data), which under TCG was most of `rootfork nbd attach`'s start-up
# (docs/kernel.md, "The cold attach profiled"). Binaries and test binaries share the flags, so
# they share one build of the dependencies (tests/boot/kernel-vm.sh uses the same).
VM_RUSTFLAGS='-C target-feature=+crt-static -C relocation-model=static'

# vm_build NAME CARGO_BUILD_ARGS...: a statically linked release build, unless
# ROOTFORK_VM_SKIP_BUILD=1. An explicit --target keeps build scripts and proc-macros dynamic.
vm_build() {
  local name=$1; shift
  [ "${ROOTFORK_VM_SKIP_BUILD:-0}" = 1 ] && return 0
  echo "$name: building static binaries" >&2
  RUSTFLAGS="$VM_RUSTFLAGS" cargo build -q --release --target $VM_TRIPLE "$@"
}

# vm_build_test NAME CARGO_TEST_ARGS...: a statically linked release test binary
# (`cargo test --no-run --message-format=json`; CARGO_TEST_ARGS must select one test target, e.g.
# `-p rootfork-kernel --test vm_kernel`), copied to $VM_REL/vm-tests/<target name> (so
# ROOTFORK_VM_SKIP_BUILD=1 finds it) for vm_install_static TREE vm-tests/<target name>.
vm_build_test() {
  local name=$1; shift
  [ "${ROOTFORK_VM_SKIP_BUILD:-0}" = 1 ] && return 0
  echo "$name: building static test binaries" >&2
  local json exe target
  json=$(RUSTFLAGS="$VM_RUSTFLAGS" cargo test -q --no-run --release \
    --target $VM_TRIPLE --message-format=json "$@") || return 1
  # The compiler artifact of the test harness ("profile":{...,"test":true}); its "executable" is
  # the path, named <target>-<hash>. (One JSON message per line; plain grep/sed, no jq needed.)
  exe=$(echo "$json" | grep '"reason":"compiler-artifact"' | grep '"test":true' \
    | grep -o '"executable":"[^"]*"' | tail -n 1 | sed 's/^"executable":"//; s/"$//')
  target=$(basename "$exe" | sed 's/-[0-9a-f]*$//')
  [ -n "$exe" ] && [ -x "$exe" ] || { echo "$name: no test executable in cargo's output" >&2; return 1; }
  mkdir -p "$VM_REL/vm-tests"
  cp "$exe" "$VM_REL/vm-tests/$target"
}

# vm_tree TREE: the initramfs skeleton with busybox, nbd.ko and /lib/guest-lib.sh.
vm_tree() {
  mkdir -p "$1"/{bin,sbin,etc,lib/modules,proc,sys,dev,tmp,run,mnt,var/lib}
  cp /bin/busybox "$1/bin/busybox"
  cp "$VM_LIB_DIR/guest-lib.sh" "$1/lib/guest-lib.sh"
  cp "$MODDIR/kernel/drivers/block/nbd.ko" "$1/lib/modules/"
}

# vm_install_static TREE BINARY...: stripped static binaries from the release build into /bin.
vm_install_static() {
  local tree=$1; shift
  local bin
  for bin in "$@"; do
    [ -x "$VM_REL/$bin" ] || { echo "no $VM_REL/$bin (unset ROOTFORK_VM_SKIP_BUILD)" >&2; return 1; }
    strip --strip-debug -o "$tree/bin/$(basename "$bin")" "$VM_REL/$bin"
  done
}

# vm_install_dynamic TREE EXE...: host executables into /sbin with their shared libraries and
# loader (mke2fs, e2fsck), plus /etc/mke2fs.conf.
vm_install_dynamic() {
  local tree=$1; shift
  local exe lib
  for exe in "$@"; do
    cp "$exe" "$tree/sbin/"
    for lib in $(ldd "$exe" | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
      mkdir -p "$tree$(dirname "$lib")"
      cp -L "$lib" "$tree$lib"
    done
  done
  [ -e /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$tree/etc/"
  return 0
}

# vm_run NAME TREE INIT TIMEOUT_SECS KERNEL_ARGS: packs TREE with INIT as /init, boots it, prints
# the verdict lines; exit status 0 only when the VM printed RESULT with fail=0 and no FAIL line.
# ROOTFORK_VM_LOG keeps the serial log at that path; VM_MEM_MIB sets the guest's memory (default 768).
vm_run() {
  local name=$1 tree=$2 init=$3 timeout_secs=$4 args=$5
  cp "$init" "$tree/init"
  chmod +x "$tree/init"
  local initrd
  initrd=$(dirname "$tree")/initrd.gz
  (cd "$tree" && find . | cpio -o -H newc --quiet | gzip -1) > "$initrd"
  local log=${ROOTFORK_VM_LOG:-$(dirname "$tree")/serial.log}
  echo "$name: booting ($(du -h "$initrd" | cut -f1) initramfs)" >&2
  local start qrc res
  start=$(date +%s)
  set +e
  timeout "$timeout_secs" "$QEMU" -L /usr/share/seabios -L /usr/share/qemu \
    -accel tcg -M q35 -m "${VM_MEM_MIB:-768}" -smp 2 -nographic -nodefaults -no-reboot \
    -serial stdio -net none -kernel "$KERNEL" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 quiet $args" </dev/null | sed -u 's/\r$//' | tee "$log"
  qrc=${PIPESTATUS[0]}
  set -e
  echo "---" >&2
  grep -E '^(PASS|FAIL|LATENCY|RESULT|test result:)' "$log" >&2 || true
  echo "$name: VM ran $(( $(date +%s) - start ))s" >&2
  if [ "$qrc" = 124 ]; then echo "$name: FAILED (VM timed out)" >&2; return 1; fi
  res=$(grep -E '^RESULT pass=[0-9]+ fail=[0-9]+' "$log" | tail -1)
  if [ -z "$res" ]; then echo "$name: FAILED (no RESULT line; VM exit $qrc)" >&2; return 1; fi
  if grep -q '^FAIL' "$log" || ! echo "$res" | grep -q 'fail=0$'; then
    echo "$name: FAILED ($res)" >&2; return 1
  fi
  echo "$name: passed ($res)" >&2
}
