#!/usr/bin/env bash
# The kernel provider against the real nbd driver: boots Debian's cloud kernel under QEMU TCG with
# an initramfs of busybox, nbd.ko and a statically linked `kernel_vm` example
# (crates/rootfork-provider/examples/kernel_vm.rs), which attaches, writes through /dev/nbdN,
# pauses, closes, resumes and checks. Prints the example's PASS/FAIL lines; exit 0 only if all
# passed. ROOTFORK_VM_SKIP_BUILD=1 reuses the last static build; ROOTFORK_VM_TIMEOUT (default 300).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
eval "$(tests/vm/assets.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
TRIPLE=x86_64-unknown-linux-gnu
BIN=$CARGO_TARGET_DIR/$TRIPLE/release/examples/kernel_vm
if [ "${ROOTFORK_VM_SKIP_BUILD:-0}" != 1 ]; then
  # An explicit --target keeps build scripts and proc-macros dynamically linked.
  RUSTFLAGS='-C target-feature=+crt-static -C relocation-model=static' cargo build -q --release --target $TRIPLE \
    -p rootfork-provider --example kernel_vm
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
T=$WORK/tree
mkdir -p "$T"/{bin,lib/modules,proc,sys,dev,tmp,run}
cp /bin/busybox "$T/bin/busybox"
strip --strip-debug -o "$T/bin/kernel_vm" "$BIN"
cp "$MODDIR/kernel/drivers/block/nbd.ko" "$T/lib/modules/"
# The shared guest helpers (setup, insmod, power-off): tests/vm/guest-lib.sh.
cp tests/vm/guest-lib.sh "$T/lib/guest-lib.sh"
cat > "$T/init" <<'EOI'
#!/bin/busybox sh
. /lib/guest-lib.sh
guest_setup kernel-vm
mount -t tmpfs tmpfs /tmp
export RUST_LOG=warn
guest_insmod_nbd 8
dd if=/dev/urandom of=/tmp/template.img bs=1048576 count=16 2>/dev/null
mkdir -p /tmp/work
/bin/kernel_vm /tmp/template.img /tmp/work
guest_poweroff
EOI
chmod +x "$T/init"
(cd "$T" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initrd.gz"
set +e
timeout "${ROOTFORK_VM_TIMEOUT:-300}" "$QEMU" -L /usr/share/seabios -L /usr/share/qemu \
  -accel tcg -M q35 -m 512 -smp 2 -display none -nodefaults -no-user-config -no-reboot \
  -serial "file:$WORK/serial.log" -kernel "$KERNEL" -initrd "$WORK/initrd.gz" \
  -append "console=ttyS0 panic=-1 quiet" >"$WORK/qemu.log" 2>&1
set -e
tr -d '\r' < "$WORK/serial.log" | grep -E '^(PASS|FAIL|RESULT|LATENCY)|nbd|panic' || true
grep -q 'RESULT pass=[1-9][0-9]* fail=0' "$WORK/serial.log" || { cat "$WORK/qemu.log"; exit 1; }
