#!/usr/bin/env bash
# The daemon's kernel-provider path against a real /dev/nbdN: boots Debian's cloud kernel under
# QEMU TCG with an initramfs of busybox, nbd.ko, mke2fs (as mkfs.ext4, with its shared libraries)
# and a statically linked `rootfork`; /init (init.sh) runs `rootfork serve` and drives it with the
# CLI, reporting over the serial console.
#
#   tests/vm/daemon/run.sh            # build, boot, check; exit status 0 only if every check passed
#
# Environment: ROOTFORK_VM_SKIP_BUILD=1 reuses the last static build (in $CARGO_TARGET_DIR);
# ROOTFORK_VM_TIMEOUT (seconds, default 300) bounds the VM; ROOTFORK_VM_LOG keeps the serial log
# at that path.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$ROOT"
eval "$(tests/vm/assets.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
TRIPLE=x86_64-unknown-linux-gnu
REL=$CARGO_TARGET_DIR/$TRIPLE/release
if [ "${ROOTFORK_VM_SKIP_BUILD:-0}" != 1 ]; then
  echo "daemon-kernel-vm: building the static rootfork binary" >&2
  # An explicit --target keeps build scripts and proc-macros dynamically linked.
  RUSTFLAGS='-C target-feature=+crt-static' cargo build -q --release --target $TRIPLE -p rootfork --bin rootfork
fi
[ -x "$REL/rootfork" ] || { echo "daemon-kernel-vm: no $REL/rootfork (unset ROOTFORK_VM_SKIP_BUILD)" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
TREE=$WORK/tree
mkdir -p "$TREE"/{bin,sbin,etc,lib/modules,proc,sys,dev,tmp,run,mnt,var/lib}
cp /bin/busybox "$TREE/bin/busybox"
strip --strip-debug -o "$TREE/bin/rootfork" "$REL/rootfork"
cp "$MODDIR/kernel/drivers/block/nbd.ko" "$TREE/lib/modules/"
# The daemon builds its demo template with mkfs.ext4 -d; mke2fs is dynamically linked: copy it
# with its libraries and loader.
for exe in /sbin/mke2fs; do
  cp "$exe" "$TREE/sbin/"
  for lib in $(ldd "$exe" | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
    mkdir -p "$TREE$(dirname "$lib")"
    cp -L "$lib" "$TREE$lib"
  done
done
ln -s mke2fs "$TREE/sbin/mkfs.ext4"
[ -e /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$TREE/etc/"
cp tests/vm/daemon/init.sh "$TREE/init"
chmod +x "$TREE/init"
(cd "$TREE" && find . | cpio -o -H newc --quiet | gzip -1) > "$WORK/initrd.gz"

LOG=${ROOTFORK_VM_LOG:-$WORK/serial.log}
echo "daemon-kernel-vm: booting ($(du -h "$WORK/initrd.gz" | cut -f1) initramfs)" >&2
start=$(date +%s)
set +e
timeout "${ROOTFORK_VM_TIMEOUT:-300}" "$QEMU" -L /usr/share/seabios -L /usr/share/qemu \
  -accel tcg -M q35 -m 768 -smp 2 -nographic -nodefaults -no-reboot \
  -serial stdio -net none -kernel "$KERNEL" -initrd "$WORK/initrd.gz" \
  -append "console=ttyS0 panic=-1 quiet" </dev/null | sed -u 's/\r$//' | tee "$LOG"
qrc=${PIPESTATUS[0]}
set -e
echo "---" >&2
grep -E '^(PASS|FAIL|RESULT)' "$LOG" >&2 || true
echo "daemon-kernel-vm: VM ran $(( $(date +%s) - start ))s" >&2
if [ "$qrc" = 124 ]; then echo "daemon-kernel-vm: FAILED (VM timed out)" >&2; exit 1; fi
res=$(grep -E '^RESULT pass=[0-9]+ fail=[0-9]+' "$LOG" | tail -1)
if [ -z "$res" ]; then echo "daemon-kernel-vm: FAILED (no RESULT line; VM exit $qrc)" >&2; exit 1; fi
if grep -q '^FAIL' "$LOG" || ! echo "$res" | grep -q 'fail=0$'; then
  echo "daemon-kernel-vm: FAILED ($res)" >&2; exit 1
fi
echo "daemon-kernel-vm: passed ($res)" >&2
