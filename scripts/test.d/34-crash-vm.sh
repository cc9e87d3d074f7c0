#!/usr/bin/env bash
# Power-loss test of persisted overlays inside a QEMU TCG VM: ext4 on dm-log-writes, the log
# replayed at every flush and between flushes, the overlay reopened from its checkpoint and
# checked (crates/rootfork-block/tests/vm_crash.rs). The whole harness is tests/vm/crash/run.sh;
# see docs/overlay.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in cpio gzip strip busybox dmsetup; do
  command -v "$tool" >/dev/null || [ "$tool" = dmsetup -a -x /usr/sbin/dmsetup ] \
    || { echo "34-crash-vm: $tool missing (scripts/install-deps)"; exit 1; }
done
if tests/vm/crash/run.sh; then
  echo "crash-vm: passed"
else
  echo "crash-vm: FAILED"
  exit 1
fi
