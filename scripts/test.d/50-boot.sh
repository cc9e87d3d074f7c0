#!/usr/bin/env bash
# Real boots: QEMU (TCG unless ROOTFORK_QEMU_ACCEL=kvm|auto) with Debian's cloud kernel. Several
# VMs boot at once from one ext4 template, each on its own rootfork socket-provider overlay served
# by rootfork's NBD server; then one is paused (diff exported) and resumed on a new overlay over
# template + diff. Asserts markers, per-overlay isolation (read back through the export with
# nbdcopy + debugfs), the template's sha256, and prints the boot times.
# Then the kernel provider against the real nbd driver inside a TCG VM (tests/boot/kernel-vm.sh).
# Knobs: ROOTFORK_BOOT_VMS (default 3), ROOTFORK_BOOT_KERNEL=0 (skip the kernel VM part),
# ROOTFORK_VM_CACHE (QEMU/kernel cache, see tests/vm/assets.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "50-boot: $*"; echo "boot: 0 passed, 1 failed"; exit 1; }
for tool in nbdcopy debugfs mkfs.ext4 cpio; do
  command -v "$tool" >/dev/null || fail "$tool missing (scripts/install-deps)"
done
eval "$(tests/vm/assets.sh)"
export QEMU KERNEL MODDIR QEMU_MODULE_DIR
ASSETS=${ROOTFORK_BOOT_ASSETS:-$PWD/build/boot}
tests/boot/build-assets.sh "$ASSETS" || fail "building the guest assets failed"
export ROOTFORK_BOOT_ASSETS=$ASSETS
start=$(date +%s)
set +e
cargo test -q -p rootfork-provider --test boot -- --ignored --nocapture 2>&1 \
  | grep -v -E ' INFO |nbd client (connected|disconnected)'
status=${PIPESTATUS[0]}
set -e
echo "50-boot: boot test $(( $(date +%s) - start )) s (including the test build)"
[ "$status" = 0 ] || fail "the boot test failed"
passed=1
# The kernel provider against the real nbd driver, inside a TCG VM (the host has no nbd module).
# Reuses the static release build the kernel suite makes in the same target dir.
if [ "${ROOTFORK_BOOT_KERNEL:-1}" != 0 ]; then
  start=$(date +%s)
  tests/boot/kernel-vm.sh || fail "the kernel provider VM test failed"
  echo "50-boot: kernel provider VM $(( $(date +%s) - start )) s (including the static build)"
  passed=2
fi
echo "boot: $passed passed, 0 failed"
