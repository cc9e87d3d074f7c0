#!/usr/bin/env bash
# The Debian package as an operator gets it: scripts/package builds the .deb from the release
# build, then scripts/package-test installs it into a throwaway Debian 12 root (mmdebstrap) and
# checks the binary, man pages, completions, directories, the packaged daemon's READY=1 on the
# packaged config, `systemd-analyze verify` and `security` on the installed unit, and that a
# purge leaves nothing but the state directory (docs/packaging.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec scripts/package --test
