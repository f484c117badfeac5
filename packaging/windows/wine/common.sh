# Shared by ../build_on_linux.sh (the Windows installer built on Linux) and run.sh (a program run in a
# prepared Wine prefix): the cache folder, the Debian packages, and how Wine is run headless and quiet.
# Sourced, not run.

wine_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Downloads, the Windows CPython with its packages, Inno Setup and the build prefix; reused across runs.
windows_cache=${SPECD_WINDOWS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/specd-windows-build}

debian_packages=(wine wine64 wine32:i386 libzstd1:i386 libsasl2-2:i386 libsasl2-modules-db:i386 xvfb xauth
                 gcc-mingw-w64-x86-64-win32 unzip npm fonts-wine)

export WINEDEBUG=-all WINEARCH=win64
# See README.md beside this file: the bundle's own C++ runtime first, mscms from the stand-in, OpenMP
# without NUMA. run.sh also turns the Windows App SDK bootstrapper off for the installed app.
export WINEDLLOVERRIDES="msvcp140,msvcp140_1,msvcp140_2,msvcp140_atomic_wait,concrt140=n,b;mscms=n,b"
export KMP_AFFINITY=disabled

say() { echo "[windows $SECONDS s] $*"; }
die() { echo "error: $*" >&2; exit 1; }

# Z:\ is the Linux root in every Wine prefix.
winpath() { local p; p=$(realpath -m "$1"); echo "Z:${p//\//\\}"; }

# Wine's Windows programs need an open stdin and pipes for stdout/stderr (a file or /dev/null there makes
# CPython fail with "init_sys_streams ... Invalid handle"), and a time limit (a hung wineserver never ends).
# Returns the program's exit status.
wine_quiet() {
  timeout -k 10 "${WINE_TIMEOUT:-900}" nice wine "$@" </dev/null 2>&1 | cat
  return "${PIPESTATUS[0]}"
}

has_debian_package() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

# Install what is missing (as root with apt-get), or stop with one line naming it.
need_tools() {
  local missing=() package
  command -v dpkg-query >/dev/null || die "the Windows build on Linux needs Debian's Wine (dpkg-query not found)"
  for package in "${debian_packages[@]}"; do
    has_debian_package "$package" || { [ "$package" = npm ] && command -v npm >/dev/null; } || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    die "missing Debian packages: ${missing[*]} (as root: dpkg --add-architecture i386 && apt-get install ${missing[*]})"
  fi
  say "installing Debian packages: ${missing[*]}"
  dpkg --print-foreign-architectures | grep -qx i386 || dpkg --add-architecture i386
  local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}")
  "${install[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1; "${install[@]}" >/dev/null 2>&1; } ||
    die "apt-get could not install: ${missing[*]} (run apt-get update, then apt-get install ${missing[*]})"
}

# The stand-in DLLs of README.md, built once into the cache.
standins() {
  local out=$windows_cache/standins name
  mkdir -p "$out"
  for name in icuuc bcryptprimitives mscms; do
    if [ ! -f "$out/$name.dll" ] || [ "$wine_dir/$name.c" -nt "$out/$name.dll" ]; then
      x86_64-w64-mingw32-gcc -O2 -shared -s -o "$out/$name.dll" "$wine_dir/$name.c" \
        $([ "$name" = bcryptprimitives ] && echo -ladvapi32) || die "could not build the Wine stand-in $name.dll"
    fi
  done
  echo "$out"
}

# A Wine prefix set to Windows 10 with the stand-ins in system32; made once (about a minute).
prepare_prefix() {
  export WINEPREFIX=$1
  [ -f "$WINEPREFIX/.specd-prefix" ] && return 0
  say "making the Wine prefix $WINEPREFIX"
  local dlls
  dlls=$(standins)
  rm -rf "$WINEPREFIX"
  mkdir -p "$(dirname "$WINEPREFIX")"
  timeout -k 10 600 wineboot -i </dev/null 2>&1 | cat
  wineserver -w
  wine_quiet winecfg -v win10 >/dev/null
  wineserver -w
  [ -d "$WINEPREFIX/drive_c/windows/system32" ] || die "wineboot did not make a prefix in $WINEPREFIX"
  cp "$dlls"/*.dll "$WINEPREFIX/drive_c/windows/system32/"
  touch "$WINEPREFIX/.specd-prefix"
}
