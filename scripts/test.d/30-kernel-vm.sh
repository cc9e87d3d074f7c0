#!/usr/bin/env bash
# Kernel-in-the-loop tests: /dev/nbdN through Debian's kernel and nbd.ko inside a QEMU TCG VM
# (netlink connect, sysfs, ext4, 8 devices at once, SIGKILL + reclaim, classified refusal,
# reconnect, reclaim across pid namespaces, EBUSY, hostile lock directories, the udev rule; the
# Rust checks are rootfork-kernel's vm_kernel test, run with --ignored in the VM),
# then the timing tests (attach and reconnect latency). The whole harness is
# tests/vm/kernel/run.sh; see docs/kernel.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in cpio gzip strip busybox udevadm; do
  command -v "$tool" >/dev/null || { echo "30-kernel-vm: $tool missing (scripts/install-deps)"; exit 1; }
done
if tests/vm/kernel/run.sh; then
  echo "kernel-vm: passed"
else
  echo "kernel-vm: FAILED"
  exit 1
fi
