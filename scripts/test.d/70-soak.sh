#!/usr/bin/env bash
# The soak test's short CI variant (issue "Hardening under faults and load", item 7): the release
# daemon on a small tmpfs near its fd limit with 32 fio --verify sandboxes, killed clients, a slow
# reader, a pipeliner, connection storms, ENOSPC and pause/resume for 45 s, then the leak, RSS and
# SIGTERM checks and the three NBD fuzz targets for 100000 executions each (scripts/soak, which
# prints `soak: N passed, M failed`). The full run (300 s) and its results: docs/daemon.md#soak.
# Needs root (tmpfs mount), fio, nbdcopy and a C++ compiler (libFuzzer). ROOTFORK_BIN=path tests
# an already built binary; SOAK_SEED fixes the seed.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
if [ -n "${ROOTFORK_BIN:-}" ]; then
  BIN=$ROOTFORK_BIN
else
  cargo build --release -q -p rootfork
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/rootfork"
fi
# The soak bounds itself (--timeout); the outer timeout is a last resort if it cannot.
exec timeout --signal=TERM --kill-after=30 600 \
  scripts/soak --duration "${SOAK_DURATION:-45}" --sandboxes "${SOAK_SANDBOXES:-32}" \
  --fuzz-runs "${SOAK_FUZZ_RUNS:-100000}" --bin "$BIN" --timeout 540
