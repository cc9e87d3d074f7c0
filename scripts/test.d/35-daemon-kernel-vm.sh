#!/usr/bin/env bash
# The daemon's kernel-provider path on real /dev/nbdN devices: `rootfork serve` inside a QEMU TCG
# VM with Debian's kernel and nbd.ko, driven by the CLI (device list, kernel sandboxes, data
# through the device, health, NBD metrics, pause/resume, delete, SIGKILL + reclaim, SIGTERM).
# The whole harness is tests/vm/daemon/run.sh; see docs/daemon.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in cpio gzip strip busybox; do
  command -v "$tool" >/dev/null || { echo "35-daemon-kernel-vm: $tool missing (scripts/install-deps)"; exit 1; }
done
if tests/vm/daemon/run.sh; then
  echo "daemon-kernel-vm: passed"
else
  echo "daemon-kernel-vm: FAILED"
  exit 1
fi
