#!/usr/bin/env bash
# Kernel-in-the-loop tests: boots Debian's cloud kernel under QEMU TCG with an initramfs of
# busybox, nbd.ko, mke2fs/e2fsck/udevadm (with their shared libraries) and udev's block rules with
# dist/udev/59-rootfork-nbd.rules, a statically linked `rootfork`
# and the statically linked `vm_kernel` test binary (crates/rootfork-kernel/tests/vm_kernel,
# built with `cargo test --no-run`); /init (init.sh) runs the shell checks, the test binary's
# checks, then its timing tests, and reports over the serial console.
#
#   tests/vm/kernel/run.sh            # build, boot, check; exit status 0 only if every check passed
#
# Environment: ROOTFORK_VM_SKIP_BUILD=1 reuses the last static build; ROOTFORK_VM_TIMEOUT
# (seconds, default 600) bounds the VM; LATENCY_N (default 100) attaches for the attach timing
# and RECONNECT_N (default 30) cycles for the reconnect timing; ROOTFORK_VM_LOG keeps the serial
# log at that path. The shared steps are in tests/vm/lib.sh.
set -euo pipefail
cd "$(dirname "$0")/../../.."
eval "$(tests/vm/assets.sh)"
. tests/vm/lib.sh
vm_build kernel-vm -p rootfork --bin rootfork
vm_build_test kernel-vm -p rootfork-kernel --test vm_kernel

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
vm_tree "$WORK/tree"
vm_install_static "$WORK/tree" rootfork vm-tests/vm_kernel
vm_install_dynamic "$WORK/tree" /sbin/mke2fs /sbin/e2fsck "$(command -v udevadm)"
# udev's block rules and rootfork's rule, for `udevadm test` on a real rootfork device.
mkdir -p "$WORK/tree/usr/lib/udev/rules.d"
cp /usr/lib/udev/rules.d/60-block.rules /usr/lib/udev/rules.d/60-persistent-storage.rules \
  dist/udev/59-rootfork-nbd.rules "$WORK/tree/usr/lib/udev/rules.d/"
vm_run kernel-vm "$WORK/tree" tests/vm/kernel/init.sh "${ROOTFORK_VM_TIMEOUT:-600}" "LATENCY_N=${LATENCY_N:-100} RECONNECT_N=${RECONNECT_N:-30}"
