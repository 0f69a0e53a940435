#!/usr/bin/env bash
# Make a usable CRIU (>= 4.0, `criu check` passes) available and print its path as the last line.
#
# Order of preference:
#   1. $CRIU, if set and usable;
#   2. `criu` on PATH, if usable;
#   3. <prefix>/bin/criu from an earlier run of this script, if usable;
#   4. otherwise install Debian trixie's criu (4.1.1) into <prefix> and use that.
#
# <prefix> is the first argument, else $CRIU_PREFIX, else /opt/fusionfs/criu.
#
# The private install never touches the system's apt state: it uses a temporary sources list for
# trixie with its own lists dir, cache dir and an empty dpkg status, downloads criu and its whole
# dependency closure with `apt-get download`, unpacks each package with `dpkg -x` into the prefix,
# and writes a wrapper <prefix>/bin/criu that starts the prefix's usr/sbin/criu through the
# prefix's own dynamic loader with `--library-path`. LD_LIBRARY_PATH is deliberately NOT used: it
# would leak into the helpers CRIU starts (ip, iptables, ...) and make them load the newer libc.
#
# Why not the distribution's package: Debian bookworm's criu 3.17 fails on recent kernels with
# "Unexpected rt vDSO area bounds". Versions below 4.0 are never accepted.
#
# Needs: root (criu check, dump and restore need it anyway), apt-get, dpkg, network access to a
# Debian mirror (DEBIAN_MIRROR, default http://deb.debian.org/debian).
set -euo pipefail

PREFIX="${1:-${CRIU_PREFIX:-/opt/fusionfs/criu}}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE="${CRIU_SUITE:-trixie}"
KEYRING="${CRIU_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}"
MIN_MAJOR=4

log() { printf 'install-criu: %s\n' "$*" >&2; }
die() { printf 'install-criu: ERROR: %s\n' "$*" >&2; exit 1; }

# usable PATH -> 0 when PATH is an executable CRIU >= 4.0 whose `criu check` passes.
usable() {
    local criu="$1" ver major out
    [[ -n "$criu" && -x "$criu" ]] || { log "${criu:-(empty)}: not an executable file"; return 1; }
    ver="$("$criu" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n1)" || return 1
    [[ -n "$ver" ]] || { log "$criu: cannot read its version"; return 1; }
    major="${ver%%.*}"
    if ! [[ "$major" =~ ^[0-9]+$ ]] || (( major < MIN_MAJOR )); then
        log "$criu: version $ver is below $MIN_MAJOR.0, not usable"
        return 1
    fi
    if ! out="$("$criu" check 2>&1)"; then
        log "$criu (version $ver): 'criu check' failed:"
        printf '%s\n' "$out" | tail -n 5 | sed 's/^/    /' >&2
        return 1
    fi
    log "$criu: version $ver, 'criu check' passed"
    return 0
}

if [[ -n "${CRIU:-}" ]] && usable "$CRIU"; then
    echo "$CRIU"; exit 0
fi
if path_criu="$(command -v criu 2>/dev/null)" && usable "$path_criu"; then
    echo "$path_criu"; exit 0
fi
if [[ -x "$PREFIX/bin/criu" ]] && usable "$PREFIX/bin/criu"; then
    echo "$PREFIX/bin/criu"; exit 0
fi

[[ "$(id -u)" == 0 ]] || die "installing CRIU needs root (and so does running it)"
command -v apt-get >/dev/null && command -v dpkg >/dev/null || die "needs apt-get and dpkg (Debian)"
[[ -r "$KEYRING" ]] || die "keyring $KEYRING not found (package debian-archive-keyring)"

ARCH="$(dpkg --print-architecture)"
case "$ARCH" in
    amd64) LOADER=lib64/ld-linux-x86-64.so.2; TRIPLET=x86_64-linux-gnu ;;
    arm64) LOADER=lib/ld-linux-aarch64.so.1; TRIPLET=aarch64-linux-gnu ;;
    *) die "unsupported architecture $ARCH (amd64 and arm64 are supported)" ;;
esac

WORK="$(mktemp -d /tmp/install-criu.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/debs" "$WORK/parts" \
    "$WORK/prefs"
printf 'deb [signed-by=%s] %s %s main\n' "$KEYRING" "$MIRROR" "$SUITE" >"$WORK/sources.list"

APT_OPTS=(
    -o "Dir::Etc::SourceList=$WORK/sources.list"
    -o "Dir::Etc::SourceParts=$WORK/parts"
    -o "Dir::Etc::Preferences=$WORK/prefs/none"
    -o "Dir::Etc::PreferencesParts=$WORK/prefs"
    -o "Dir::State::Lists=$WORK/lists"
    -o "Dir::Cache=$WORK/cache"
    -o "Dir::State::status=/dev/null"
    -o "APT::Architecture=$ARCH"
    -o "APT::Architectures=$ARCH"
    -o "APT::Sandbox::User=root"
    -o "Debug::NoLocking=1"
)

log "fetching the $SUITE package lists ($ARCH) into a private apt state"
apt-get "${APT_OPTS[@]}" -qq update >&2 || die "apt-get update for $SUITE failed"

# criu's dependency closure (Depends and PreDepends only); virtual packages come as <name>.
mapfile -t PKGS < <(
    apt-cache "${APT_OPTS[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances criu |
        grep -E '^[a-z0-9]' | sed 's/:.*$//' | sort -u
)
(( ${#PKGS[@]} > 0 )) || die "apt-cache found no dependency list for criu in $SUITE"
log "downloading ${#PKGS[@]} packages: ${PKGS[*]}"
(cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" -qq download "${PKGS[@]}" >&2) ||
    die "apt-get download failed"

# Unpack into a fresh staging dir, then swap it in, so a failed run never leaves a half prefix.
STAGE="$PREFIX.new.$$"
rm -rf "$STAGE"
mkdir -p "$STAGE"
for deb in "$WORK"/debs/*.deb; do
    dpkg -x "$deb" "$STAGE"
done
[[ -x "$STAGE/usr/sbin/criu" ]] || die "the criu package had no usr/sbin/criu"

# Debian trixie is merged-/usr: the loader may sit under usr/ only.
if [[ ! -e "$STAGE/$LOADER" && -e "$STAGE/usr/$LOADER" ]]; then
    LOADER="usr/$LOADER"
fi
[[ -e "$STAGE/$LOADER" ]] || die "no dynamic loader $LOADER in the unpacked packages"

LIBPATH="\$P/lib/$TRIPLET:\$P/usr/lib/$TRIPLET:\$P/lib:\$P/usr/lib"
mkdir -p "$STAGE/bin"
cat >"$STAGE/bin/criu" <<EOF
#!/bin/sh
# Generated by scripts/install-criu.sh: Debian $SUITE's criu with its own libraries ($ARCH).
# Runs through the prefix's dynamic loader with --library-path (not LD_LIBRARY_PATH, which would
# leak the newer libc into the ip/iptables helpers CRIU starts).
P="\$(cd "\$(dirname "\$0")/.." && pwd -P)"
exec "\$P/$LOADER" --library-path "$LIBPATH" "\$P/usr/sbin/criu" "\$@"
EOF
chmod 755 "$STAGE/bin/criu"

# crit (the image decoder) is a Python script in the separate 'crit' package; not installed here.
rm -rf "$PREFIX.old.$$"
if [[ -e "$PREFIX" ]]; then mv "$PREFIX" "$PREFIX.old.$$"; fi
mkdir -p "$(dirname "$PREFIX")"
mv "$STAGE" "$PREFIX"
rm -rf "$PREFIX.old.$$"

# The wrapper computes its prefix at run time, so moving the staging dir is safe.
if ! usable "$PREFIX/bin/criu"; then
    "$PREFIX/bin/criu" check >&2 || true
    die "installed $PREFIX/bin/criu but 'criu check' does not pass on this machine"
fi
echo "$PREFIX/bin/criu"
