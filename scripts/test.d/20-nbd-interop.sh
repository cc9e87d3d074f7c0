#!/usr/bin/env bash
# Real-client interop suite for `rootfork nbd serve`: qemu-io/qemu-img (write patterns, read back,
# compare), nbdinfo --map (holes, allocated zeroes and data, rootfork:overlay), nbdcopy round trip, nbdsh with
# libnbd's strict checking, fio --ioengine=nbd --verify=crc32c with two jobs (multi-conn), TCP,
# a clean shutdown on SIGTERM (socket and cache removed), and a persisted overlay
# (`--persist-state`) killed with SIGKILL and served again with `--reopen`.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

cargo build --release -q -p rootfork
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/rootfork"

WORK=$(mktemp -d /tmp/rootfork-interop.XXXXXX)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

PASS=0
FAIL=0
ok() { echo "  ok   $*"; PASS=$((PASS+1)); }
bad() { echo "  FAIL $*"; FAIL=$((FAIL+1)); }
check() { local what=$1; shift; if "$@" >"$WORK/check.out" 2>&1; then ok "$what"; else bad "$what"; sed 's/^/       /' "$WORK/check.out" | tail -20; fi; }

SIZE_MB=64
head -c ${SIZE_MB}M /dev/urandom >"$WORK/template.img"
cp "$WORK/template.img" "$WORK/expected.img"
SOCK="$WORK/nbd.sock"
URI="nbd+unix:///?socket=$SOCK"
mkdir -p "$WORK/tmp"

start_server() {
  TMPDIR="$WORK/tmp" "$BIN" nbd serve --template "$WORK/template.img" --socket "$SOCK" "$@" \
    >>"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 200); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
  echo "server did not start"; cat "$WORK/server.log"; exit 1
}
stop_server() {
  kill -TERM "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=
}

echo "== nbd interop: rootfork nbd serve against real clients"
TEMPLATE_SUM=$(sha256sum <"$WORK/template.img")
start_server

# --- qemu-io: write patterns (aligned and not), read them back; mirror them on expected.img.
QIO_CMDS=(
  "write -P 0xa5 0 4k"
  "write -P 0x11 1M 64k"
  "write -P 0x22 3000 5000"
  "write -P 0x33 10M 1M"
  "write -z 4M 1M"
  "write -z 12M 256k"
  "write -z -u 16M 1M"
  "discard 20M 512k"
  "write -P 0x44 $(( SIZE_MB * 1048576 - 4096 )) 4k"
)
args=(); for c in "${QIO_CMDS[@]}"; do args+=(-c "$c"); done
check "qemu-io writes (pattern, unaligned, zero, zero+unmap, discard)" qemu-io -f raw "${args[@]}" "$URI"
# discard reads back as zeroes on rootfork overlays; mirror every command on the local copy.
margs=(); for c in "${QIO_CMDS[@]}"; do margs+=(-c "${c/discard/write -z}"); done
qemu-io -f raw "${margs[@]}" "$WORK/expected.img" >/dev/null
check "qemu-io reads back patterns" qemu-io -f raw \
  -c "read -P 0xa5 0 3000" -c "read -P 0x11 1M 64k" -c "read -P 0x22 3000 5000" \
  -c "read -P 0x33 10M 1M" -c "read -P 0 4M 1M" -c "read -P 0 12M 256k" -c "read -P 0 16M 1M" -c "read -P 0 20M 512k" \
  -c "read -P 0x44 $(( SIZE_MB * 1048576 - 4096 )) 4k" "$URI"
check "qemu-img compare with the expected image" qemu-img compare -f raw -F raw "$WORK/expected.img" "$URI"
check "qemu-img info" qemu-img info -f raw "$URI"

# --- nbdinfo --map: zero+unmap and discard are holes, zeroes written without unmap (NO_HOLE) are
# allocated zeroes (type 2, zero), the rest is data; rootfork:overlay marks written ranges.
nbdinfo --map "$URI" >"$WORK/map.txt"
nbdinfo --map=rootfork:overlay "$URI" >"$WORK/overlay-map.txt"
check "nbdinfo --map reports 16M+1M as hole,zero" grep -Eq "^ *16777216 +1048576 +3 " "$WORK/map.txt"
check "nbdinfo --map reports 20M+512k as hole,zero" grep -Eq "^ *20971520 +524288 +3 " "$WORK/map.txt"
check "nbdinfo --map reports write -z 4M 1M as zero (allocated)" grep -Eq "^ *4194304 +1048576 +2 " "$WORK/map.txt"
check "nbdinfo --map reports write -z 12M 256k as zero (allocated)" grep -Eq "^ *12582912 +262144 +2 " "$WORK/map.txt"
check "nbdinfo --map reports the template as data" grep -Eq "^ *0 +4194304 +0 " "$WORK/map.txt"
check "rootfork:overlay marks written blocks" grep -Eq "^ *1048576 +65536 +1( |$)" "$WORK/overlay-map.txt"
check "rootfork:overlay marks zeroed blocks" grep -Eq "^ *4194304 +1048576 +1( |$)" "$WORK/overlay-map.txt"
check "rootfork:overlay marks template blocks" grep -Eq "^ *8192 +1040384 +0( |$)" "$WORK/overlay-map.txt"
check "nbdinfo --list" nbdinfo --list "$URI"
check "nbdinfo --can multi-conn" nbdinfo --can multi-conn "$URI"

# --- nbdcopy round trip: out to a file, back in with new content, out again.
check "nbdcopy export -> file equals expected" bash -c "nbdcopy '$URI' '$WORK/out1.img' && cmp '$WORK/out1.img' '$WORK/expected.img'"
head -c ${SIZE_MB}M /dev/urandom >"$WORK/new.img"
check "nbdcopy file -> export -> file round trip" bash -c "nbdcopy --connections=2 '$WORK/new.img' '$URI' && nbdcopy '$URI' '$WORK/out2.img' && cmp '$WORK/out2.img' '$WORK/new.img'"

# --- nbdsh with strict checking on a fresh overlay: every command, structured reads, block
# status, errors.
stop_server
start_server
cat >"$WORK/strict.py" <<'PY'
import errno, nbd, os, sys
uri = os.environ["NBD_URI"]
h = nbd.NBD()
h.set_strict_mode(nbd.STRICT_COMMANDS | nbd.STRICT_FLAGS | nbd.STRICT_BOUNDS | nbd.STRICT_ZERO_SIZE | nbd.STRICT_ALIGN)
h.add_meta_context("base:allocation")
h.add_meta_context("rootfork:overlay")
h.connect_uri(uri)
size = h.get_size()
assert h.can_meta_context("base:allocation") and h.can_meta_context("rootfork:overlay")
for f in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df", "can_multi_conn", "can_cache"):
    assert getattr(h, f)(), f
assert h.get_structured_replies_negotiated()
buf = os.urandom(65536)
h.pwrite(buf, 1 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 1 << 20) == buf
h.zero(65536, 2 << 20)
h.zero(65536, 3 << 20, nbd.CMD_FLAG_FAST_ZERO)
h.zero(65536, 4 << 20, nbd.CMD_FLAG_NO_HOLE)
# The overlay zeroes a range cheaply even when it must stay allocated: FAST_ZERO|NO_HOLE works
# (as against qemu-nbd) and reads back as zeroes.
h.pwrite(b"\xff" * 65536, 5 << 20)
h.zero(65536, 5 << 20, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(65536, 5 << 20) == bytes(65536)
h.trim(65536, 6 << 20)
h.cache(1 << 20, 0)
h.flush()
# Structured read with holes: chunks must cover the range exactly once.
seen = []
def chunk(sub, off, status, err):
    seen.append((off, len(sub), status))
    return 0
data = h.pread_structured(3 * 65536, (2 << 20) - 65536, chunk)
assert data[65536:131072] == bytes(65536)
assert any(s == nbd.READ_HOLE for _, _, s in seen), seen
assert sum(n for _, n, _ in seen) == 3 * 65536
df = []
h.pread_structured(65536, 2 << 20, lambda b, o, s, e: df.append(s) or 0, nbd.CMD_FLAG_DF)
assert df == [nbd.READ_DATA], df
# Block status for both contexts.
got = {}
def extent(meta, off, entries, err):
    got.setdefault(meta, []).append((off, list(entries)))
    return 0
h.block_status(8 << 20, 0, extent)
alloc = got["base:allocation"][0][1]
assert alloc[:4] == [2 << 20, 0, 65536, 3], alloc       # data, then the punched zeroes
over = got["rootfork:overlay"][0][1]
assert over[0] == 1 << 20 and over[1] == 0, over            # template up to 1M
got.clear()
h.block_status(1 << 20, 0, extent, nbd.CMD_FLAG_REQ_ONE)
assert all(len(v[0][1]) == 2 for v in got.values()), got
got.clear()
h.block_status(65536, 2 << 20, extent)
assert got["base:allocation"][0][1][:2] == [65536, 3], got
# With strict checks off, the server itself must reject bad requests with the right errno.
h.set_strict_mode(0)
for call, want in ((lambda: h.pread(4096, size), errno.EINVAL),
                   (lambda: h.pwrite(b"x" * 4096, size), errno.ENOSPC),
                   (lambda: h.pread(64 << 20, 0), errno.EOVERFLOW)):
    try:
        call()
        raise SystemExit("expected an error")
    except nbd.Error as e:
        assert e.errnum == want, (e, want)
assert h.pread(512, 0) is not None
h.shutdown()
print("strict ok")
PY
# nbdsh runs "python3 -m nbd": make sure that is the system Python with the nbd module.
check "nbdsh strict mode: all commands, holes, DF, block status, errors" \
  env PATH="/usr/bin:$PATH" NBD_URI="$URI" nbdsh -c "exec(open('$WORK/strict.py').read())"

# --- fio with crc32c verification, two jobs (two connections) on disjoint halves.
fio_json() { sed -n '/^{/,$p'; }
FIO_OUT="$WORK/fio.json"
if fio --name=verify --verify_state_save=0 --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=16 \
      --numjobs=2 --size=16M --offset_increment=16M --verify=crc32c --verify_fatal=1 \
      --do_verify=1 --group_reporting=0 --output-format=json 2>"$WORK/fio.err" | fio_json >"$FIO_OUT"; then
  errs=$(/usr/bin/python3 -c "import json,sys; d=json.load(open('$FIO_OUT')); print(sum(j['error'] for j in d['jobs']), len(d['jobs']), min(j['read']['io_bytes'] for j in d['jobs']))")
  read -r nerr njobs rbytes <<<"$errs"
  if [ "$nerr" = 0 ] && [ "$njobs" = 2 ] && [ "$rbytes" -ge $((16<<20)) ]; then ok "fio randwrite + crc32c verify, 2 jobs"; else bad "fio verify: errors=$nerr jobs=$njobs verified_bytes=$rbytes"; fi
else
  bad "fio verify run failed"; tail -20 "$WORK/fio.err"
fi
check "fio randread 2 jobs" bash -c "fio --name=rr --ioengine=nbd --uri='$URI' --rw=randread --bs=4k --iodepth=32 --numjobs=2 --size=32M --runtime=2 --time_based --output-format=json 2>/dev/null | sed -n '/^{/,\$p' | /usr/bin/python3 -c 'import json,sys; d=json.load(sys.stdin); assert all(j[\"error\"]==0 and j[\"read\"][\"io_bytes\"]>0 for j in d[\"jobs\"])'"

# --- shutdown on SIGTERM removes the socket and the cache.
kill -TERM "$SERVER_PID"
if wait "$SERVER_PID"; then ok "server exits 0 on SIGTERM"; else bad "server exit status"; fi
SERVER_PID=
if [ ! -e "$SOCK" ]; then ok "socket removed"; else bad "socket left behind"; fi
if [ -z "$(ls -A "$WORK/tmp")" ]; then ok "overlay cache removed"; else bad "cache left: $(ls -A "$WORK/tmp")"; fi
if [ "$(sha256sum <"$WORK/template.img")" = "$TEMPLATE_SUM" ]; then ok "template untouched by writes"; else bad "template changed"; fi
check "one log line per connect and disconnect" bash -c "[ \$(grep -c 'nbd client connected' '$WORK/server.log') -ge 10 ] && [ \$(grep -c 'nbd client connected' '$WORK/server.log') = \$(grep -c 'nbd client disconnected' '$WORK/server.log') ]"

# --- TCP and read-only mode.
PORT=$(( 20000 + RANDOM % 20000 ))
start_server --tcp 127.0.0.1:$PORT --read-only --export tmpl
check "TCP listener (nbdinfo over nbd://)" nbdinfo "nbd://127.0.0.1:$PORT/tmpl"
check "read-only export refuses writes" bash -c "! qemu-io -f raw -c 'write 0 4k' 'nbd+unix:///tmpl?socket=$SOCK' 2>&1 | grep -q '^wrote'"
check "read-only export reads the template" bash -c "nbdcopy 'nbd+unix:///tmpl?socket=$SOCK' '$WORK/ro.img' && cmp '$WORK/ro.img' '$WORK/template.img'"
stop_server

# --- --persist-state: killed with SIGKILL, `--reopen` serves every acknowledged write again.
PCACHE="$WORK/persist.cache"
start_server --cache "$PCACHE" --persist-state
check "persisted overlay takes writes" qemu-io -f raw -c 'write -P 0x5a 1M 256k' \
  -c 'write -P 0x33 3M 5k' -c 'write -z 4M 64k' -c 'discard 8M 64k' "$URI"
kill -KILL "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=
rm -f "$SOCK"
start_server --cache "$PCACHE" --reopen
check "after SIGKILL, --reopen reads every acknowledged write" qemu-io -f raw \
  -c 'read -P 0x5a 1M 256k' -c 'read -P 0x33 3M 5k' -c 'read -P 0 4M 64k' -c 'read -P 0 8M 64k' "$URI"
check "after SIGKILL, unwritten ranges read as the template" bash -c "nbdcopy '$URI' '$WORK/reopened.img' \
  && cmp -n 1048576 '$WORK/reopened.img' '$WORK/template.img' \
  && cmp -i 16777216 '$WORK/reopened.img' '$WORK/template.img'"
check "the reopen used the live copy" grep -q 'copy=Live' "$WORK/server.log"
stop_server
check "--cache and its state file are kept at exit" test -e "$PCACHE" -a -e "$PCACHE.state"

echo "nbd interop: $PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
