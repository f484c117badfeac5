#!/bin/sh
# Give the service its client keys: copy-keys.sh SOURCE COPY [MAINPID]
#
# The keys file (SOURCE, /etc/specd/keys.toml: root's, mode 0600, edited with `specd-verifier keys`) cannot be
# read by the service's dynamic user, so systemd runs this as root (the "+" of ExecStartPre=/ExecReload=) to
# copy it into the state directory, owned by that user and private to it. With MAINPID (ExecReload=) the
# running verifier is then told to re-read it (SIGHUP); its other sessions go on.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 SOURCE COPY [MAINPID]" >&2; exit 2; }
source=$1 copy=$2
dir=$(dirname "$copy")
if [ -e "$source" ]; then
  install -m 0600 -o "$(stat -L -c %u "$dir")" -g "$(stat -L -c %g "$dir")" "$source" "$dir/.keys.toml.new"
  mv -f "$dir/.keys.toml.new" "$copy"
else
  rm -f "$copy"
fi
if [ $# -ge 3 ] && [ -n "$3" ]; then
  kill -HUP "$3"
fi
