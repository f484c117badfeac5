#!/usr/bin/env bash
# Install (or upgrade) the specd verifier as a systemd service. Safe to run again: it replaces the
# program and the unit, keeps /etc/specd/config.toml and the client keys, and restarts a running service.
# A first install creates the first client key in /etc/specd/keys.toml and prints it (once).
#
#   sudo ./install.sh                 the PyInstaller bundle: ./specd-verifier beside this script (release
#                                     archive) or dist/specd-verifier (a checkout after `make package-daemon`)
#   sudo ./install.sh --bundle DIR    a bundle elsewhere
#   sudo ./install.sh --venv DIR      a pip-installed daemon: DIR/bin/specd-verifier (pip install 'specd[daemon]')
#   --key-name NAME                   the first client key's name (default laptop-1)
#
# Then: sudo systemctl enable --now specd-verifier; logs: journalctl -u specd-verifier.
# Environment (for packagers and tests): DESTDIR (staging root), PREFIX (/opt/specd), SYSCONFDIR
# (/etc/specd), UNITDIR (/etc/systemd/system), SYSTEMCTL (systemctl; "true" skips it).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/specd}
SYSCONFDIR=${SYSCONFDIR:-/etc/specd}
UNITDIR=${UNITDIR:-/etc/systemd/system}
SYSTEMCTL=${SYSTEMCTL:-systemctl}
UNIT=specd-verifier.service

die() { echo "install.sh: $*" >&2; exit 1; }
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

bundle="" venv="" key_name=laptop-1
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) [ $# -ge 2 ] || die "--bundle needs a folder"; bundle=$2; shift 2 ;;
    --venv) [ $# -ge 2 ] || die "--venv needs a folder"; venv=${2%/}; shift 2 ;;
    --key-name) [ $# -ge 2 ] || die "--key-name needs a name"; key_name=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$DESTDIR" ] || [ "$(id -u)" = 0 ] || die "run as root: sudo $0 $*"
{ echo "$key_name" | grep -Eqx '[A-Za-z0-9][A-Za-z0-9_.-]{0,63}' && [ "$key_name" != default ]; } || \
  die "--key-name: use 1-64 letters, digits, '.', '_' or '-' (and not 'default', the name of SPECD_API_KEY)"

# The files that come with this script: a release archive has them beside it, a checkout above it.
first() { for f in "$@"; do [ -e "$f" ] && { echo "$f"; return; }; done; echo "$1"; }
unit_src=$(first "$here/$UNIT")
copy_keys_src=$(first "$here/copy-keys.sh")
config_src=$(first "$here/config.toml" "$here/../../config.toml")
readme_src=$(first "$here/README.md" "$here/../../README.md")
[ -f "$unit_src" ] || die "$unit_src is missing"
[ -f "$copy_keys_src" ] || die "$copy_keys_src is missing"
[ -f "$config_src" ] || die "config.toml is missing (looked beside this script and in the checkout)"

if [ -n "$venv" ]; then
  case "$venv/" in
    /home/*|/root/*|/run/user/*)
      die "the service cannot see $venv (its unit has ProtectHome=yes): create the venv elsewhere, e.g. python3 -m venv /opt/specd/venv" ;;
  esac
  [ -x "$DESTDIR$venv/bin/specd-verifier" ] || \
    die "$venv/bin/specd-verifier not found: create the venv and pip install 'specd[daemon]' into it first"
else
  [ -n "$bundle" ] || bundle=$(first "$here/specd-verifier" "$here/../../dist/specd-verifier")
  [ -x "$bundle/specd-verifier" ] || \
    die "no bundle at $bundle (expected $bundle/specd-verifier): run 'make package-daemon' or pass --bundle DIR"
fi

upgrade=no
[ -e "$DESTDIR$UNITDIR/$UNIT" ] && upgrade=yes

# The program: copied beside the old one, then swapped in, owned by root and read-only to others.
install -d -m 0755 "$DESTDIR$PREFIX"
if [ -z "$venv" ]; then
  target="$DESTDIR$PREFIX/specd-verifier"
  rm -rf "$target.new"
  cp -R "$bundle" "$target.new"
  chmod -R u+rwX,go+rX,go-w "$target.new"
  rm -rf "$target.old"
  [ ! -e "$target" ] || mv "$target" "$target.old"
  mv "$target.new" "$target"
  rm -rf "$target.old"
fi
[ ! -f "$readme_src" ] || install -m 0644 "$readme_src" "$DESTDIR$PREFIX/README.md"
install -m 0755 "$copy_keys_src" "$DESTDIR$PREFIX/copy-keys.sh"

# The unit, with this installation's paths; a pip install runs the venv's entry point instead (drop-in).
install -d -m 0755 "$DESTDIR$UNITDIR"
sed -e "s#/opt/specd#$PREFIX#g" -e "s#/etc/specd#$SYSCONFDIR#g" "$unit_src" > "$DESTDIR$UNITDIR/$UNIT.tmp"
chmod 0644 "$DESTDIR$UNITDIR/$UNIT.tmp"
mv "$DESTDIR$UNITDIR/$UNIT.tmp" "$DESTDIR$UNITDIR/$UNIT"
dropin="$DESTDIR$UNITDIR/$UNIT.d/venv.conf"
if [ -n "$venv" ]; then
  install -d -m 0755 "$(dirname "$dropin")"
  cat > "$dropin" <<EOF
# Written by install.sh --venv: run the pip-installed daemon from $venv instead of the bundle.
[Service]
ExecStart=
ExecStart=$venv/bin/specd-verifier --config $SYSCONFDIR/config.toml --keys-file /var/lib/specd/keys.toml
# The venv is read-only to the service: do not try to write bytecode caches into it.
Environment=PYTHONDONTWRITEBYTECODE=1
EOF
  chmod 0644 "$dropin"
else
  rm -f "$dropin"
  rmdir "$(dirname "$dropin")" 2>/dev/null || true
fi

# Settings and the client keys: written once, never overwritten.
install -d -m 0755 "$DESTDIR$SYSCONFDIR"
if [ ! -e "$DESTDIR$SYSCONFDIR/config.toml" ]; then
  install -m 0644 "$config_src" "$DESTDIR$SYSCONFDIR/config.toml"
  echo "Wrote $SYSCONFDIR/config.toml (defaults; edit [server] host and [models] target for your server)"
fi
if [ -n "$venv" ]; then program="$venv/bin/specd-verifier"; else program="$PREFIX/specd-verifier/specd-verifier"; fi
keys_cmd="sudo $program keys"
keys_conf="--config $SYSCONFDIR/config.toml"
envfile="$DESTDIR$SYSCONFDIR/verifier.env"
keysfile="$DESTDIR$SYSCONFDIR/keys.toml"
new_key=""
if [ ! -e "$keysfile" ] && [ ! -e "$envfile" ]; then
  # The format `specd-verifier keys` writes (daemon/client_keys.py): only the key's SHA-256 is kept.
  new_key="specd-$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
  (umask 077 && cat > "$keysfile" <<EOF
# specd client keys: one named key per client. Manage with \`specd-verifier keys add|list|revoke|set-limits\`.
# Only SHA-256 hashes are stored; the verifier re-reads this file when it changes and on SIGHUP.
# Keep it private to its owner (mode 0600): the verifier refuses a file readable by others.

[keys.$key_name]
sha256 = "$(printf %s "$new_key" | sha256sum | cut -d' ' -f1)"
created = $(date -u +%Y-%m-%dT%H:%M:%SZ)
max_sessions = 0
tokens_per_minute = 0
EOF
  )
fi
for secret in "$envfile" "$keysfile"; do
  [ -e "$secret" ] || continue
  chmod 0600 "$secret"
  [ "$(id -u)" != 0 ] || chown root:root "$secret"
done
# What each key used, recorded by the service in its state directory, for `keys list`.
[ -e "$DESTDIR$SYSCONFDIR/keys-usage.json" ] || [ -L "$DESTDIR$SYSCONFDIR/keys-usage.json" ] || \
  ln -s /var/lib/specd/keys-usage.json "$DESTDIR$SYSCONFDIR/keys-usage.json"

if command -v "$SYSTEMCTL" >/dev/null 2>&1; then
  "$SYSTEMCTL" daemon-reload || echo "install.sh: 'systemctl daemon-reload' failed (is systemd running?)" >&2
  if [ "$upgrade" = yes ]; then
    "$SYSTEMCTL" try-restart "$UNIT" || echo "install.sh: could not restart $UNIT" >&2
  fi
else
  echo "install.sh: systemctl not found; run 'systemctl daemon-reload' on the target system" >&2
fi

echo "Installed specd-verifier ($([ -n "$venv" ] && echo "venv $venv" || echo "$PREFIX/specd-verifier"))."
echo "Start it:  sudo systemctl enable --now specd-verifier"
echo "Logs:      journalctl -u specd-verifier -f"
if [ -n "$new_key" ]; then
  echo
  echo "Created the first client key, '$key_name', in $SYSCONFDIR/keys.toml. It is shown only now: give it to that"
  echo "laptop as SPECD_API_KEY (or in the tray app's settings):"
  echo
  echo "    $new_key"
  echo
fi
echo "Client keys, one per laptop (a running service applies changes at 'sudo systemctl reload specd-verifier'):"
echo "  $keys_cmd add NAME $keys_conf         prints the new key, once"
echo "  $keys_cmd list $keys_conf             created, last used, tokens used, limits"
echo "  $keys_cmd revoke NAME $keys_conf      refused from then on, its sessions closed"
echo "  $keys_cmd set-limits NAME --max-sessions N --tokens-per-minute N $keys_conf"
