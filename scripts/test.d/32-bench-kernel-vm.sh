#!/usr/bin/env bash
# Keeps scripts/bench-kernel from rotting: its --quick mode (rootfork, qemu-nbd -c, nbd-client +
# nbdkit on /dev/nbdN inside the TCG test VM; two 2 s fio runs per server and 5 attach cycles).
# Asserts only that every server attached, served the template, ran fio and detached, and that
# the ratio line was printed with numbers; the numbers themselves are not judged here.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(mktemp)
trap 'rm -f "$out"' EXIT
if ! scripts/bench-kernel --quick | tee "$out"; then
  echo "bench-kernel-vm: FAILED"
  exit 1
fi
if tail -n 1 "$out" | grep -Eq '^kernel cpu ratio randread: [0-9]+\.[0-9]{2} randwrite: [0-9]+\.[0-9]{2} attach ratio: [0-9]+\.[0-9]{2}$'; then
  echo "bench-kernel-vm: passed"
else
  echo "bench-kernel-vm: FAILED (no ratio line with numbers)"
  exit 1
fi
