#!/usr/bin/env bash
# Build the specd-verifier onedir bundle (dist/specd-verifier) and a release archive to copy to a
# server: dist/specd-verifier-VERSION-linux-ARCH.tar.gz holding the bundle, install.sh, uninstall.sh,
# copy-keys.sh, the unit, config.toml and README.md. `make package-daemon` runs this with the project's .venv.
#
#   packaging/linux/build.sh [--no-archive]
#
# Environment: PYTHON (the interpreter whose packages go into the bundle; default .venv/bin/python),
# DISTDIR (default dist), WORKDIR (PyInstaller's scratch folder; default build/pyinstaller).
# The bundle carries that environment's torch: use a CUDA build for a GPU server.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
distdir=${DISTDIR:-$root/dist}
workdir=${WORKDIR:-$root/build/pyinstaller}
archive=yes
for arg in "$@"; do
  case "$arg" in
    --no-archive) archive=no ;;
    *) echo "build.sh: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done

"$python" -c "import PyInstaller" 2>/dev/null || {
  echo "build.sh: PyInstaller is not installed for $python: pip install 'specd[packaging]'" >&2; exit 1; }

"$python" -m PyInstaller --noconfirm --log-level WARN --distpath "$distdir" \
  --workpath "$workdir" "$root/packaging/linux/specd-verifier.spec"
echo "Bundle: $distdir/specd-verifier ($(du -sh "$distdir/specd-verifier" | cut -f1))"

if [ "$archive" = yes ]; then
  version=$("$python" -c "import importlib.metadata as m; print(m.version('specd'))")
  name="specd-verifier-$version-linux-$(uname -m)"
  stage="$workdir/$name"
  rm -rf "$stage" && mkdir -p "$stage"
  cp -R "$distdir/specd-verifier" "$stage/"
  cp "$root/packaging/linux/install.sh" "$root/packaging/linux/uninstall.sh" "$root/packaging/linux/copy-keys.sh" \
     "$root/packaging/linux/specd-verifier.service" "$root/config.toml" "$root/README.md" "$stage/"
  tar -C "$workdir" -czf "$distdir/$name.tar.gz" "$name"
  rm -rf "$stage"
  echo "Archive: $distdir/$name.tar.gz ($(du -sh "$distdir/$name.tar.gz" | cut -f1))"
fi
