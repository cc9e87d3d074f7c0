#!/usr/bin/env bash
# The daemon through its CLI, as a new user meets it: `rootfork serve` in an empty directory
# builds the demo template, `rootfork sandbox create --template demo` serves its root disk, real
# NBD clients read it (nbdinfo, nbdcopy + debugfs), pause/resume/delete (both metadata contexts
# still see the changes after a resume: qemu-io writes, nbdinfo --map), import with --json,
# device list without the nbd module, completions, config validation, JSON logs, a clear message
# when the daemon is not running, and restarts: after kill -9 and after SIGTERM a running socket
# sandbox is served again at the same NBD URI with its flushed data, a paused one resumes with
# its data (issue #12's "done when"), and QEMU VMs the daemon started run on and are adopted;
# --delete-on-exit deletes everything.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

# ROOTFORK_BIN: test an already built binary instead of building the release one.
if [ -n "${ROOTFORK_BIN:-}" ]; then
  BIN=$ROOTFORK_BIN
else
  cargo build --release -q -p rootfork
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/rootfork"
fi

WORK=$(mktemp -d /tmp/rootfork-daemon.XXXXXX)
DPID=
QPID=
cleanup() {
  if [ -n "$QPID" ]; then kill -KILL "$QPID" 2>/dev/null || true; wait "$QPID" 2>/dev/null || true; fi
  if [ -n "$DPID" ]; then kill -TERM "$DPID" 2>/dev/null || true; wait "$DPID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

PASS=0
FAIL=0
ok() { echo "  ok   $*"; PASS=$((PASS+1)); }
bad() { echo "  FAIL $*"; FAIL=$((FAIL+1)); }
check() { local what=$1; shift; if "$@" >"$WORK/check.out" 2>&1; then ok "$what"; else bad "$what"; sed 's/^/       /' "$WORK/check.out" | tail -20; fi; }

cd "$WORK"
unset XDG_STATE_HOME ROOTFORK_API ROOTFORK_STATE_DIR || true

# No daemon yet: a clear message and a failure exit.
check "client without a daemon says so" bash -c "! '$BIN' sandbox list 2>err.txt && grep -q 'daemon is not running' err.txt"
# Config validation names the key.
printf 'bogus_key = 1\n' >bad.toml
check "unknown config key is refused by name" bash -c "! '$BIN' serve --config bad.toml 2>err.txt && grep -q bogus_key err.txt"
check "non-loopback metrics refused" bash -c "! ROOTFORK_METRICS=0.0.0.0:9 '$BIN' serve 2>err.txt && grep -q loopback err.txt"

# The README's first command, in an empty directory.
"$BIN" serve --log-format json --health-interval 1 >daemon.log 2>&1 &
DPID=$!
for _ in $(seq 200); do [ -S .rootfork/api.sock ] && break; sleep 0.05; done
check "daemon started with defaults (./.rootfork/api.sock, 0600)" bash -c "[ \"\$(stat -c %a .rootfork/api.sock)\" = 600 ]"
check "logs are JSON and say how to create a sandbox" bash -c "head -1 daemon.log | python3 -c 'import json,sys; json.loads(sys.stdin.readline())' && grep -q 'sandbox create --template demo' daemon.log"
check "demo template built" bash -c "'$BIN' template list | grep -q '^demo '"

"$BIN" sandbox create --template demo --id first >create.txt
URI=$(sed -n 's/^nbd uri: *//p' create.txt)
check "create prints the NBD URI" test -n "$URI"
check "nbdinfo sees the demo ext4" bash -c "nbdinfo '$URI' | grep -q 'ext4 filesystem'"
check "the root disk holds hello.txt" bash -c "nbdcopy '$URI' disk.img && debugfs -R 'cat /hello.txt' disk.img 2>/dev/null | grep -q 'rootfork sandbox'"

check "get --json" bash -c "'$BIN' sandbox get first --json | python3 -c 'import json,sys; s=json.load(sys.stdin); assert s[\"state\"]==\"running\" and s[\"health\"]==\"healthy\", s'"
check "duplicate id refused" bash -c "! '$BIN' sandbox create --template demo --id first 2>err.txt && grep -q ALREADY_EXISTS err.txt"
check "a larger disk with a quota: nbdinfo sees 128M, the guest gets ENOSPC past the quota" bash -c "'$BIN' sandbox create --template demo --id grown --disk-size 128M --quota 1M --json >g.json && U=\$(python3 -c 'import json; d=json.load(open(\"g.json\")); assert d[\"disk_size_bytes\"]==128<<20 and d[\"quota_bytes\"]==1<<20; print(d[\"nbd_uri\"])') && [ \"\$(nbdinfo --size \"\$U\")\" = 134217728 ] && qemu-io -f raw -c 'write -P 7 100M 2M' \"\$U\" >err.txt 2>&1; grep -q 'No space left' err.txt && '$BIN' sandbox delete grown >/dev/null"
check "--disk-size smaller than the template refused" bash -c "! '$BIN' sandbox create --template demo --id small --disk-size 4096 2>err.txt && grep -q INVALID_ARGUMENT err.txt"
check "bad id refused" bash -c "! '$BIN' sandbox create --template demo --id ../x 2>err.txt && grep -q INVALID_ARGUMENT err.txt"
check "kernel provider unavailable without the module" bash -c "[ -e /sys/module/nbd ] || { ! '$BIN' sandbox create --template demo --provider kernel 2>err.txt && grep -q UNAVAILABLE err.txt; }"
check "device list explains an absent pool" bash -c "[ -e /sys/module/nbd ] || '$BIN' device list | grep -q 'pool unavailable'"

head -c 8M /dev/urandom >img.raw
check "template import --json" bash -c "'$BIN' template import rnd img.raw --json | python3 -c 'import json,sys; t=json.load(sys.stdin); assert t[\"size_bytes\"]==8<<20, t'"
check "sandbox on the imported template reads it back" bash -c "'$BIN' sandbox create --template rnd --id second --json >s2.json && U=\$(python3 -c 'import json; print(json.load(open(\"s2.json\"))[\"nbd_uri\"])') && nbdcopy \"\$U\" back.raw && cmp img.raw back.raw"
# Changes before a pause: data and NO_HOLE zeroes (known zeroes, still allocated).
U2=$(python3 -c 'import json; print(json.load(open("s2.json"))["nbd_uri"])' || true)
check "qemu-io writes data and zeroes to the sandbox" qemu-io -f raw -c 'write -P 0x5a 1M 64k' -c 'write -z 2M 1M' "$U2"
nbdinfo --map "$U2" >map-before.txt 2>&1 || true
check "base:allocation reports the NO_HOLE zeroes as zero" grep -Eq "^ *2097152 +1048576 +2 " map-before.txt
check "pause" bash -c "'$BIN' sandbox pause second | grep -q 'state: *paused'"
check "pause twice is FAILED_PRECONDITION" bash -c "! '$BIN' sandbox pause second 2>err.txt && grep -q FAILED_PRECONDITION err.txt"
check "resume" bash -c "'$BIN' sandbox resume second | grep -q 'state: *running'"
# After the resume the sandbox's overlay is fresh, over the template + the paused diff: both
# contexts must still see the changes made before the pause.
U2=$("$BIN" sandbox get second --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nbd_uri"])' || true)
nbdinfo --map=rootfork:overlay "$U2" >overlay-after.txt 2>&1 || true
nbdinfo --map "$U2" >map-after.txt 2>&1 || true
check "after resume rootfork:overlay flags the data written before the pause" grep -Eq "^ *1048576 +65536 +1( |$)" overlay-after.txt
check "after resume rootfork:overlay flags the zeroes written before the pause" grep -Eq "^ *2097152 +1048576 +1( |$)" overlay-after.txt
check "after resume rootfork:overlay leaves the template unflagged" grep -Eq "^ *0 +1048576 +0( |$)" overlay-after.txt
check "after resume base:allocation reports the paused zero run as hole,zero" grep -Eq "^ *2097152 +1048576 +3 " map-after.txt
check "after resume the changes read back" qemu-io -f raw -c 'read -P 0x5a 1M 64k' -c 'read -P 0 2M 1M' "$U2"
check "fork a paused sandbox: two running forks read its changes, the parent resumes" bash -c "'$BIN' sandbox pause second >/dev/null && '$BIN' sandbox fork second --count 2 --json >forks.json && python3 -c 'import json; f=json.load(open(\"forks.json\")); assert [x[\"id\"] for x in f]==[\"second-fork-0\",\"second-fork-1\"] and all(x[\"state\"]==\"running\" for x in f), f' && qemu-io -f raw -c 'read -P 0x5a 1M 64k' \"\$(python3 -c 'import json; print(json.load(open(\"forks.json\"))[1][\"nbd_uri\"])')\" && ! '$BIN' sandbox fork second --count 1 2>err.txt && grep -q ALREADY_EXISTS err.txt && '$BIN' sandbox delete second-fork-0 >/dev/null && '$BIN' sandbox delete second-fork-1 >/dev/null && '$BIN' sandbox resume second | grep -q 'state: *running'"
check "template export writes the template's bytes to a raw image (zeroes as holes)" bash -c "'$BIN' template export rnd exported.raw | grep -q 'exported template rnd' && cmp img.raw exported.raw && ! '$BIN' template export rnd exported.raw 2>err.txt && grep -q 'creating' err.txt"
check "template in use cannot be deleted" bash -c "! '$BIN' template delete rnd 2>err.txt && grep -q FAILED_PRECONDITION err.txt"
check "list shows both" bash -c "[ \"\$('$BIN' sandbox list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')\" = 2 ]"
check "delete is idempotent" bash -c "'$BIN' sandbox delete second && '$BIN' sandbox delete second | grep -q 'did not exist'"
check "template delete" bash -c "'$BIN' template delete rnd | grep -q deleted"
check "completions" bash -c "'$BIN' completions bash | grep -q _rootfork"

# Restarts keep every sandbox (issue #12): a running socket sandbox is served again on the
# same socket and export after a SIGKILL or a SIGTERM; a paused one resumes with its data.
start_daemon() {
  "$BIN" serve --log-format json --health-interval 1 >"$1" 2>&1 &
  DPID=$!
  for _ in $(seq 400); do "$BIN" sandbox list >/dev/null 2>&1 && break; sleep 0.05; done
}
uri_of() { "$BIN" sandbox get "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nbd_uri"])'; }
export BIN; export -f uri_of
"$BIN" sandbox create --template demo --id keep-a >/dev/null
"$BIN" sandbox create --template demo --id keep-b >/dev/null
UA=$(uri_of keep-a || true); UB=$(uri_of keep-b || true)
check "B written and paused" bash -c "qemu-io -f raw -c 'write -P 0xb1 1M 64k' -c flush '$UB' && '$BIN' sandbox pause keep-b | grep -q 'state: *paused'"
check "A written and flushed" qemu-io -f raw -c 'write -P 0xa1 1M 64k' -c flush "$UA"

kill -KILL "$DPID"; wait "$DPID" 2>/dev/null || true; DPID=
check "after kill -9 the running sandbox's overlay is on disk (cache and block state)" bash -c "ls .rootfork/cache | grep -q '^keep-a\..*\.cache$' && ls .rootfork/cache | grep -q '^keep-a\..*\.cache\.state$'"
start_daemon daemon2.log
check "after kill -9: list --json shows A running and B paused" bash -c "'$BIN' sandbox list --json | python3 -c 'import json,sys; s={x[\"id\"]: x[\"state\"] for x in json.load(sys.stdin)}; assert s[\"keep-a\"]==\"running\" and s[\"keep-b\"]==\"paused\" and s[\"first\"]==\"running\", s'"
check "after kill -9: A is served at the same NBD URI and says it was adopted" bash -c "[ \"\$(uri_of keep-a)\" = '$UA' ] && '$BIN' sandbox get keep-a | grep -q adopted"
check "after kill -9: A's URI serves the flushed data" qemu-io -f raw -c 'read -P 0xa1 1M 64k' "$UA"
check "after kill -9: B resumes with its data" bash -c "'$BIN' sandbox resume keep-b >/dev/null && qemu-io -f raw -c 'read -P 0xb1 1M 64k' \"\$(uri_of keep-b)\""
check "after kill -9: the first sandbox still holds hello.txt" bash -c "nbdcopy \"\$(uri_of first)\" disk2.img && debugfs -R 'cat /hello.txt' disk2.img 2>/dev/null | grep -q 'rootfork sandbox'"
check "A written and flushed again, B written and paused again" bash -c "qemu-io -f raw -c 'write -P 0xa2 2M 64k' -c flush '$UA' && qemu-io -f raw -c 'write -P 0xb2 2M 64k' -c flush \"\$(uri_of keep-b)\" && '$BIN' sandbox pause keep-b >/dev/null"

# A QEMU NBD client with reconnect-delay stays connected to A through the SIGTERM restart: its
# write sent while the daemon is down waits, and lands once the next daemon serves A again.
mkfifo qio.fifo
qemu-io --image-opts "driver=nbd,server.type=unix,server.path=${UA#*socket=},export=keep-a,reconnect-delay=60" <qio.fifo >qio.out 2>&1 &
QPID=$!
exec 3>qio.fifo
echo "write -P 0xa3 3M 64k" >&3
for _ in $(seq 200); do grep -q 'wrote 65536/65536 bytes at offset 3145728' qio.out && break; sleep 0.05; done

kill -TERM "$DPID"; wait "$DPID" || true; DPID=
echo "write -P 0xa4 4M 64k" >&3
check "SIGTERM removes the API socket and the NBD sockets" bash -c "[ ! -e .rootfork/api.sock ] && [ -z \"\$(find .rootfork/nbd -mindepth 1)\" ]"
check "SIGTERM keeps the running sandboxes running in their records, their overlays on disk" bash -c "python3 -c 'import json; r=json.load(open(\".rootfork/sandboxes/keep-a.json\")); assert r[\"state\"]==\"running\" and r[\"served\"], r' && ls .rootfork/cache | grep -q '^keep-a\..*\.cache\.state$'"
check "templates survive a restart: the record names a base build in the store" python3 -c 'import json,os; b=json.load(open(".rootfork/templates/demo.json"))["build"]; assert os.path.isfile(".rootfork/store/%s/data" % b) and os.path.isfile(".rootfork/store/%s/map" % b), b'
start_daemon daemon3.log
check "after SIGTERM: list --json shows A running and B paused" bash -c "'$BIN' sandbox list --json | python3 -c 'import json,sys; s={x[\"id\"]: x[\"state\"] for x in json.load(sys.stdin)}; assert s[\"keep-a\"]==\"running\" and s[\"keep-b\"]==\"paused\" and s[\"first\"]==\"running\", s'"
check "after SIGTERM: A's same URI serves both flushed writes" bash -c "[ \"\$(uri_of keep-a)\" = '$UA' ] && qemu-io -f raw -c 'read -P 0xa1 1M 64k' -c 'read -P 0xa2 2M 64k' '$UA'"
echo "read -P 0xa3 3M 64k" >&3; echo "read -P 0xa4 4M 64k" >&3
# qemu-io may end on `quit` before printing what it was doing: wait for both reads first.
for _ in $(seq 600); do [ "$(grep -c 'read 65536/65536' qio.out)" = 2 ] && break; sleep 0.1; done
echo quit >&3; exec 3>&-
for _ in $(seq 600); do kill -0 "$QPID" 2>/dev/null || break; sleep 0.1; done
kill -KILL "$QPID" 2>/dev/null || true; wait "$QPID" 2>/dev/null || true; QPID=
check "QEMU's NBD client (reconnect-delay) carried on: its write during the restart landed, both read back" bash -c "[ \"\$(grep -c 'wrote 65536/65536' qio.out)\" = 2 ] && [ \"\$(grep -c 'read 65536/65536' qio.out)\" = 2 ] && ! grep -Eqi 'fail|error' qio.out || { cat qio.out; false; }"
check "after SIGTERM: B resumes with its data" bash -c "'$BIN' sandbox resume keep-b >/dev/null && qemu-io -f raw -c 'read -P 0xb1 1M 64k' -c 'read -P 0xb2 2M 64k' \"\$(uri_of keep-b)\""
check "after SIGTERM: the first sandbox still holds hello.txt" bash -c "nbdcopy \"\$(uri_of first)\" disk3.img && debugfs -R 'cat /hello.txt' disk3.img 2>/dev/null | grep -q 'rootfork sandbox'"
kill -TERM "$DPID"; wait "$DPID" || true
"$BIN" serve --delete-on-exit >daemon4.log 2>&1 &
DPID=$!
for _ in $(seq 400); do "$BIN" sandbox list >/dev/null 2>&1 && break; sleep 0.05; done
kill -TERM "$DPID"; wait "$DPID" || true; DPID=
check "--delete-on-exit is the throwaway mode: the sandboxes adopted at start are deleted at stop" bash -c "[ -z \"\$(find .rootfork/sandboxes .rootfork/paused .rootfork/cache .rootfork/nbd -type f -o -type s)\" ]"

# A sandbox with QEMU VMM settings: the daemon boots a TCG guest on the sandbox's disk.
cd "$ROOT"
if eval "$(tests/vm/assets.sh)" && export MODDIR QEMU QEMU_MODULE_DIR KERNEL && tests/boot/build-assets.sh "${ROOTFORK_BOOT_ASSETS:-$ROOT/build/boot}" >"$WORK/assets.log" 2>&1; then
  export QEMU QEMU_MODULE_DIR KERNEL ROOTFORK_BOOT_ASSETS=${ROOTFORK_BOOT_ASSETS:-$ROOT/build/boot}
  check "daemon boots QEMU on a sandbox's disk; a running VM pauses and resumes live; three forks of it continue apart (cargo test --test vm_boot)" \
    cargo test -q -p rootfork --test vm_boot -- --ignored
  check "QEMU VMs run through a SIGKILL and a SIGTERM restart of the daemon and are adopted by pid; an adopted VM pauses live and is killed by its delete (cargo test --test vm_adopt)" \
    cargo test -q -p rootfork --test vm_adopt -- --ignored qemu_vms_run_through_daemon_restarts_and_are_adopted
else
  bad "boot assets (tests/vm/assets.sh, tests/boot/build-assets.sh)"; tail -20 "$WORK/assets.log" || true
fi

echo "daemon suite: $PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
