#!/usr/bin/env bash
# Run a Windows program in a Wine prefix prepared as for the Windows build (made first when missing):
#   packaging/windows/wine/run.sh PREFIX PROGRAM [ARGS...]
# With WINE_DISPLAY=1 it runs under a private Xvfb display (Inno Setup's setup.exe needs one even when
# silent). Prints the program's output; exits with its status. The tests use it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[ $# -ge 2 ] || die "usage: run.sh PREFIX PROGRAM [ARGS...]"
prefix=$1; shift
prepare_prefix "$prefix" >&2
# The Windows App SDK bootstrapper aborts under Wine 8 when no runtime is installed (README.md); off, the
# Windows ML projection fails to load, as on a PC without that runtime.
export WINEDLLOVERRIDES="$WINEDLLOVERRIDES;microsoft.windowsappruntime.bootstrap="
if [ "${WINE_DISPLAY:-0}" = 1 ]; then
  number=$(( 90 + RANDOM % 400 ))
  Xvfb ":$number" -screen 0 1280x800x24 -nolisten tcp >/dev/null 2>&1 &
  xvfb=$!
  trap 'kill $xvfb 2>/dev/null || true' EXIT
  export DISPLAY=":$number"
  sleep 1
else
  unset DISPLAY
fi
status=0
wine_quiet "$@" || status=$?
wineserver -w || true
exit "$status"
