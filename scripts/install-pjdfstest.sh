#!/usr/bin/env bash
# Builds pjdfstest (the POSIX filesystem test suite; not packaged in Debian or PyPI) once, from its
# unmodified upstream source, into build/pjdfstest/ of this repo (git ignores build/). Idempotent:
# a build whose binary and tests/ are there is kept. Installs what the build and the run need
# (autoconf automake libtool gcc make; perl's `prove`). Run as root; prints the build directory
# last. The source tarball: $PJDFSTEST_SRC, else ../shared/vendor/pjdfstest-src.tar.gz.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1minstall-pjdfstest:\033[0m %s\n' "$*" >&2; }
die() { echo "install-pjdfstest: $*" >&2; exit 1; }

dest="$PWD/build/pjdfstest"
if [[ -x "$dest/pjdfstest" && -f "$dest/tests/conf" ]]; then
    echo "$dest"
    exit 0
fi

src="${PJDFSTEST_SRC:-$PWD/../shared/vendor/pjdfstest-src.tar.gz}"
[[ -f "$src" ]] || die "no pjdfstest source at $src (set PJDFSTEST_SRC to the tarball)"

need_apt=()
for pkg in autoconf automake libtool gcc make perl; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
    say "installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq -o DPkg::Lock::Timeout=600 "${need_apt[@]}" >/dev/null || die "apt-get install ${need_apt[*]} failed"
fi
command -v prove >/dev/null || die "perl's prove is not on PATH after installing perl"

say "building pjdfstest from $src into $dest"
tmp="$dest.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
tar -xzf "$src" -C "$tmp" --strip-components=1 || die "cannot unpack $src"
log="$tmp/build.log"
if ! (cd "$tmp" && autoreconf -ifs && ./configure && make pjdfstest) >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "build failed (log above: $log)"
fi
# every filesystem is told it is "FUSE" (the suite branches on the type it reads from df, and
# FUSE.FUSIONFS or FUSE.S3FS would each get a different set of tests), so figures compare
printf '\n# install-pjdfstest.sh: the same tests on every filesystem under test\nfs="FUSE"\n' >>"$tmp/tests/conf"
rm -rf "$dest"
mv "$tmp" "$dest"
echo "$dest"
