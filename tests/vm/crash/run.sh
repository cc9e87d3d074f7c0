#!/usr/bin/env bash
# Power-loss test of persisted overlays: boots Debian's cloud kernel under QEMU TCG with an
# initramfs of busybox, dm-mod.ko, dm-log-writes.ko, brd.ko, dmsetup and mke2fs (with their
# shared libraries) and the statically linked `vm_crash` test binary
# (crates/rootfork-block/tests/vm_crash.rs, built with `cargo test --no-run`); /init (init.sh)
# puts ext4 on a dm-log-writes device, runs the writer, replays the log at every flush mark and
# between marks, and reports over the serial console.
#
#   tests/vm/crash/run.sh            # build, boot, check; exit status 0 only if every check passed
#
# Environment: ROOTFORK_VM_SKIP_BUILD=1 reuses the last static build; ROOTFORK_VM_TIMEOUT
# (seconds, default 300) bounds the VM; ROOTFORK_VM_LOG keeps the serial log at that path. The
# shared steps are in tests/vm/lib.sh.
set -euo pipefail
cd "$(dirname "$0")/../../.."
eval "$(tests/vm/assets.sh)"
. tests/vm/lib.sh
vm_build_test crash-vm -p rootfork-block --test vm_crash

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
vm_tree "$WORK/tree"
for m in drivers/md/dm-mod.ko drivers/md/dm-log-writes.ko drivers/block/brd.ko; do
  cp "$MODDIR/kernel/$m" "$WORK/tree/lib/modules/"
done
vm_install_static "$WORK/tree" vm-tests/vm_crash
DMSETUP=$(command -v dmsetup || echo /usr/sbin/dmsetup)
vm_install_dynamic "$WORK/tree" /sbin/mke2fs "$DMSETUP"
vm_run crash-vm "$WORK/tree" tests/vm/crash/init.sh "${ROOTFORK_VM_TIMEOUT:-300}" ""
