#!/usr/bin/env bash
# Real boots: QEMU (TCG unless ROOTFORK_QEMU_ACCEL=kvm|auto) with Debian's cloud kernel. Several
# VMs boot at once from one ext4 template, each on its own rootfork socket-provider overlay served
# by rootfork's NBD server; then one is paused (diff exported) and resumed on a new overlay over
# template + diff. Asserts markers, per-overlay isolation (read back through the export with
# nbdcopy + debugfs), the template's sha256, and prints the boot times.
# Knobs: ROOTFORK_BOOT_VMS (default 3), ROOTFORK_VM_CACHE (QEMU/kernel cache, see tests/vm/assets.sh).
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
echo "50-boot: $(( $(date +%s) - start )) s (including the test build)"
[ "$status" = 0 ] || fail "the boot test failed"
echo "boot: 1 passed, 0 failed"
