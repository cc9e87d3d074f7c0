#!/usr/bin/env bash
# Builds the boot test's guest side into OUT (default: <repo>/build/boot):
#   template.ext4   a 64 MiB ext4 root: busybox-static and an /init that writes /hello-<vmid>
#                   (vmid = rootfork.vmid= on the kernel command line), syncs, prints each hello
#                   file's content and a marker line listing them, and powers off; with
#                   rootfork.counter=N it runs the pause/resume/fork counter instead (see /init);
#   initrd.cpio.gz  busybox + the cloud kernel's virtio modules; mounts /dev/vda and switches root.
# Needs MODDIR (from `eval "$(tests/vm/assets.sh)"`), busybox-static, cpio, e2fsprogs.
set -euo pipefail
OUT=${1:-$(cd "$(dirname "$0")/../.." && pwd)/build/boot}
: "${MODDIR:?set MODDIR (eval \"\$(tests/vm/assets.sh)\")}"
BUSYBOX=${BUSYBOX:-/bin/busybox}
[ -x "$BUSYBOX" ] || { echo "build-assets: no $BUSYBOX (install busybox-static)" >&2; exit 1; }
# ldd fails on a static binary; a dynamic busybox would not run in the initramfs.
if ldd "$BUSYBOX" >/dev/null 2>&1; then
  echo "build-assets: $BUSYBOX is dynamically linked (install busybox-static)" >&2; exit 1
fi
rm -rf "$OUT/work" && mkdir -p "$OUT/work"
W=$OUT/work

# --- initramfs: load virtio (modules in the cloud kernel), mount the root disk, switch root.
MODS="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk"
mkdir -p "$W"/initrd/{bin,dev,proc,sys,newroot,lib/modules}
cp "$BUSYBOX" "$W/initrd/bin/busybox"
for m in $MODS; do
  f=$(find "$MODDIR" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -1)
  [ -n "$f" ] || { echo "build-assets: module $m not found under $MODDIR" >&2; exit 1; }
  case "$f" in *.ko) cp "$f" "$W/initrd/lib/modules/$m.ko" ;;
               *.xz) xz -dc "$f" > "$W/initrd/lib/modules/$m.ko" ;;
               *.zst) zstd -qdc "$f" > "$W/initrd/lib/modules/$m.ko" ;; esac
done
cat > "$W/initrd/init" <<EOI
#!/bin/busybox sh
B=/bin/busybox
\$B mount -t proc proc /proc; \$B mount -t sysfs sysfs /sys; \$B mount -t devtmpfs devtmpfs /dev
for m in $MODS; do \$B insmod /lib/modules/\$m.ko 2>/dev/null || echo "initrd: insmod \$m failed"; done
i=0; while [ ! -b /dev/vda ] && [ \$i -lt 500 ]; do \$B usleep 10000; i=\$((i+1)); done
\$B mount -t ext4 -o rw /dev/vda /newroot || { echo "ROOTFORK-BOOT-FAIL mount"; \$B poweroff -f; }
\$B umount /proc /sys; \$B mount --move /dev /newroot/dev
exec \$B switch_root /newroot /init
EOI
chmod +x "$W/initrd/init"
(cd "$W/initrd" && find . | cpio -o -H newc --quiet | gzip -1 > "$OUT/initrd.cpio.gz")

# --- template root filesystem.
mkdir -p "$W"/root/{bin,dev,proc,sys,tmp}
cp "$BUSYBOX" "$W/root/bin/busybox"
cat > "$W/root/init" <<'EOI'
#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
VMID=$($B sed -n 's/.*rootfork.vmid=\([A-Za-z0-9_-]*\).*/\1/p' /proc/cmdline)
# rootfork.counter=N: the pause/resume guest. Appends "count I" to /counter.log and to
# /by-<disk serial>.log (the daemon gives each sandbox's disk its id as serial, read from the
# device each time: a fork restored from its parent's memory reads its own), then prints
# "ROOTFORK-COUNT I boot=<boot id> disk=<serial>" on the console, every 100 ms, I = 1..N; then
# syncs, prints ROOTFORK-COUNTER-DONE with the file's line count and powers off. A resume that
# lost the guest's memory would show a new boot id or a count starting again at 1.
N=$($B sed -n 's/.*rootfork.counter=\([0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$N" ]; then
  $B mount -t sysfs sysfs /sys
  BOOT=$($B cat /proc/sys/kernel/random/boot_id)
  i=0
  while [ "$i" -lt "$N" ]; do
    i=$((i+1))
    DISK=$($B cat /sys/block/vda/serial 2>/dev/null)
    echo "count $i" >> /counter.log
    echo "count $i" >> "/by-${DISK:-none}.log"
    echo "ROOTFORK-COUNT $i boot=$BOOT disk=${DISK:-none}"
    $B usleep 100000
  done
  $B sync
  echo "ROOTFORK-COUNTER-DONE lines=$($B wc -l < /counter.log) boot=$BOOT"
  $B mount -o remount,ro / 2>/dev/null; $B sync
  $B poweroff -f
fi
[ -n "$VMID" ] || VMID=unnamed
echo "written by $VMID" > "/hello-$VMID"
$B sync
FILES=$(cd / && $B ls -1 | $B grep '^hello-' | $B tr '\n' ' ')
for f in /hello-*; do echo "ROOTFORK-FILE $f: $($B cat "$f")"; done
echo "ROOTFORK-BOOT-OK vmid=$VMID files=[$FILES] uptime=$($B cut -d' ' -f1 /proc/uptime)"
$B mount -o remount,ro / 2>/dev/null; $B sync
$B poweroff -f
EOI
chmod +x "$W/root/init"
rm -f "$OUT/template.ext4"
truncate -s 64M "$OUT/template.ext4"
mkfs.ext4 -q -F -E root_owner=0:0 -d "$W/root" "$OUT/template.ext4"
chmod 0444 "$OUT/template.ext4"
rm -rf "$W"
echo "build-assets: $OUT/template.ext4 $OUT/initrd.cpio.gz"
