#!/usr/bin/env bash
# Fetches (once) what the in-VM tests need: QEMU's system emulator unpacked from Debian's packages
# (installing qemu-system-x86 would replace the machine's newer qemu-utils), and Debian's cloud
# kernel with its modules (nbd.ko, virtio). Prints shell assignments for QEMU, QEMU_MODULE_DIR,
# KERNEL and MODDIR; use as: eval "$(tests/vm/assets.sh)".
# Cache directory: $ROOTFORK_VM_CACHE (default: <repo>/build/vm).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${ROOTFORK_VM_CACHE:-$ROOT/build/vm}
mkdir -p "$CACHE"
cd "$CACHE"
if [ ! -x qroot/usr/bin/qemu-system-x86_64 ] || ! ls kroot/boot/vmlinuz-* >/dev/null 2>&1; then
  rm -rf qroot kroot debs && mkdir -p debs
  KPKG=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
  [ -n "$KPKG" ] || { echo "assets.sh: cannot resolve linux-image-cloud-amd64 (apt-get update?)" >&2; exit 1; }
  (cd debs && apt-get download qemu-system-x86 qemu-system-common "$KPKG" >&2)
  dpkg-deb -x debs/qemu-system-x86_*.deb qroot
  dpkg-deb -x debs/qemu-system-common_*.deb qroot
  dpkg-deb -x debs/"$KPKG"_*.deb kroot
  rm -rf debs
fi
echo "QEMU=$CACHE/qroot/usr/bin/qemu-system-x86_64"
echo "QEMU_MODULE_DIR=$CACHE/qroot/usr/lib/x86_64-linux-gnu/qemu"
echo "export QEMU_MODULE_DIR"
echo "KERNEL=$(ls "$CACHE"/kroot/boot/vmlinuz-* | head -1)"
echo "MODDIR=$(ls -d "$CACHE"/kroot/lib/modules/* | head -1)"
