#!/usr/bin/env bash
# The daemon's kernel-provider path against a real /dev/nbdN: boots Debian's cloud kernel under
# QEMU TCG with an initramfs of busybox, nbd.ko, mke2fs (as mkfs.ext4, with its shared libraries)
# and a statically linked `rootfork` and `rootfork-fc-double` (the Firecracker stand-in); /init
# (init.sh) runs `rootfork serve` and drives it with the CLI, reporting over the serial console.
#
#   tests/vm/daemon/run.sh            # build, boot, check; exit status 0 only if every check passed
#
# Environment: ROOTFORK_VM_SKIP_BUILD=1 reuses the last static build (in $CARGO_TARGET_DIR);
# ROOTFORK_VM_TIMEOUT (seconds, default 420) bounds the VM; WARM_N (default 10) creates with and
# without the warm stock; ADOPT_N (default 3) SIGKILL and as many SIGTERM restarts under a
# running writer (scripts/bench-kernel-restart.sh runs 10 or more for the stall figures); ROOTFORK_VM_LOG keeps the serial log
# at that path. The shared steps are in tests/vm/lib.sh.
set -euo pipefail
cd "$(dirname "$0")/../../.."
eval "$(tests/vm/assets.sh)"
. tests/vm/lib.sh
vm_build daemon-kernel-vm -p rootfork --bin rootfork -p rootfork-fc-double --bin rootfork-fc-double

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
vm_tree "$WORK/tree"
vm_install_static "$WORK/tree" rootfork rootfork-fc-double
# The daemon builds its demo template with mkfs.ext4 -d.
vm_install_dynamic "$WORK/tree" /sbin/mke2fs
ln -s mke2fs "$WORK/tree/sbin/mkfs.ext4"
vm_run daemon-kernel-vm "$WORK/tree" tests/vm/daemon/init.sh "${ROOTFORK_VM_TIMEOUT:-420}" "WARM_N=${WARM_N:-10} ADOPT_N=${ADOPT_N:-3}"
