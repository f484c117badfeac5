#!/usr/bin/env bash
# Remove the specd verifier service installed by install.sh. Safe to run again.
#
#   sudo ./uninstall.sh           stop and disable the service, remove the program and the unit; keep
#                                 /etc/specd (settings, client keys) and the model cache
#   sudo ./uninstall.sh --purge   also remove /etc/specd, /var/lib/specd and /var/cache/specd
#
# A venv given to install.sh --venv is yours: it is left in place.
# Environment: DESTDIR, PREFIX, SYSCONFDIR, UNITDIR, SYSTEMCTL, as for install.sh.
set -euo pipefail

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/specd}
SYSCONFDIR=${SYSCONFDIR:-/etc/specd}
UNITDIR=${UNITDIR:-/etc/systemd/system}
SYSTEMCTL=${SYSTEMCTL:-systemctl}
UNIT=specd-verifier.service

die() { echo "uninstall.sh: $*" >&2; exit 1; }

purge=no
for arg in "$@"; do
  case "$arg" in
    --purge) purge=yes ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done
[ -n "$DESTDIR" ] || [ "$(id -u)" = 0 ] || die "run as root: sudo $0 $*"

have_systemctl=no
command -v "$SYSTEMCTL" >/dev/null 2>&1 && have_systemctl=yes
if [ "$have_systemctl" = yes ] && [ -e "$DESTDIR$UNITDIR/$UNIT" ]; then
  "$SYSTEMCTL" disable --now "$UNIT" || echo "uninstall.sh: could not stop or disable $UNIT" >&2
fi

rm -f "$DESTDIR$UNITDIR/$UNIT"
rm -rf "$DESTDIR$UNITDIR/$UNIT.d"
rm -rf "$DESTDIR$PREFIX/specd-verifier" "$DESTDIR$PREFIX/specd-verifier.new" "$DESTDIR$PREFIX/specd-verifier.old"
rm -f "$DESTDIR$PREFIX/README.md" "$DESTDIR$PREFIX/copy-keys.sh"
rmdir "$DESTDIR$PREFIX" 2>/dev/null || true

if [ "$purge" = yes ]; then
  # DynamicUser= keeps the real directories under private/ with a symlink beside them.
  rm -rf "$DESTDIR$SYSCONFDIR" \
         "$DESTDIR/var/lib/specd" "$DESTDIR/var/lib/private/specd" \
         "$DESTDIR/var/cache/specd" "$DESTDIR/var/cache/private/specd"
fi

if [ "$have_systemctl" = yes ]; then
  "$SYSTEMCTL" daemon-reload || echo "uninstall.sh: 'systemctl daemon-reload' failed (is systemd running?)" >&2
fi

if [ "$purge" = yes ]; then
  echo "Removed specd-verifier, its settings, client keys and model cache."
else
  echo "Removed specd-verifier. Kept $SYSCONFDIR (settings, client keys) and /var/cache/specd (models): --purge removes them."
fi
