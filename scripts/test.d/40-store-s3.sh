#!/usr/bin/env bash
# Template store against a real S3-compatible server: installs s3s-fs (crates.io) into
# build/tools if missing, starts it on loopback, and runs rootfork-store's S3 tests
# (crates/rootfork-store/tests/s3.rs, marked #[ignore] for plain `cargo test`) with --ignored,
# then the daemon's (crates/rootfork/tests/store_s3.rs: two `rootfork serve --store s3://…`
# hosts moving a sandbox).
# Those tests fail, not skip, if the server or its variables are missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
S3S_VERSION=0.14.1   # 0.15+ needs a newer rustc than Debian's rustup toolchain here (1.95)
TOOLS="$PWD/build/tools"
S3S="$TOOLS/bin/s3s-fs"
if [ ! -x "$S3S" ] || ! "$S3S" --version 2>/dev/null | grep -q "$S3S_VERSION"; then
  echo "40-store-s3: installing s3s-fs $S3S_VERSION into $TOOLS"
  cargo install "s3s-fs@$S3S_VERSION" --locked --features binary --root "$TOOLS" \
    --target-dir "$PWD/build/tools-target"
fi

work=$(mktemp -d)
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill -CONT "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

bucket=rootfork
mkdir -p "$work/s3/$bucket"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$S3S" --host 127.0.0.1 --port "$port" --access-key rootfork-test --secret-key rootfork-test-secret \
  "$work/s3" >"$work/s3s-fs.log" 2>&1 &
pid=$!
for _ in $(seq 200); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then echo "40-store-s3: s3s-fs exited:"; cat "$work/s3s-fs.log"; exit 1; fi
  sleep 0.05
done

export ROOTFORK_S3_ENDPOINT="http://127.0.0.1:$port"
export ROOTFORK_S3_BUCKET=$bucket
export ROOTFORK_S3_ACCESS_KEY=rootfork-test
export ROOTFORK_S3_SECRET_KEY=rootfork-test-secret
export ROOTFORK_S3_PID=$pid
export ROOTFORK_S3_ROOT="$work/s3"
export ROOTFORK_S3S_FS="$S3S"

if cargo test -p rootfork-store --test s3 -- --ignored --test-threads=1 \
  && cargo test -p rootfork --test store_s3 -- --ignored --test-threads=1; then
  echo "40-store-s3: PASS"
else
  echo "40-store-s3: FAIL (server log: last lines below)"
  tail -n 40 "$work/s3s-fs.log" || true
  exit 1
fi
