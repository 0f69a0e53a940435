#!/usr/bin/env bash
# One-time (idempotent) set-up of a fresh Debian/Ubuntu machine for fusionfs + snapstore, as root:
# FUSE 3 (fuse3, libfuse3-dev, pkg-config); the programs the compatibility tests run on the mount
# (git, sqlite3, tar, rsync, fio; Snakemake 9 from PyPI; pjdfstest built into build/pjdfstest by
# scripts/install-pjdfstest.sh); the S3 servers of the test matrix besides moto (Ceph RGW from
# Debian; Node.js with s3rver 3.7.1 in benchmarks/node_modules: nothing is installed at test
# time); Slurm and munge from Debian for the preemption tests (tests/slurmcluster.py starts
# them); a Python virtualenv in .venv with the project and its test dependencies; and a CRIU >= 4.0
# (scripts/install-criu.sh puts Debian trixie's in a private prefix when none is usable); podman,
# runc and mmdebstrap, and the task image of containers/Containerfile (scripts/build-task-image.sh,
# cached in podman's storage by a hash of its inputs).
# Prints what it does; fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }

# the Debian packages among the arguments that are not installed, one a line
missing_debs() {
    local pkg
    for pkg; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            printf '%s\n' "$pkg"
    done
}

# apt_install WHAT OPTIONS PKG...: install the Debian packages PKG (none: nothing to do) with
# apt-get's OPTIONS (zero or more words), saying what for; waits for another apt-get (unattended
# upgrades, a parallel set-up) instead of failing, and shows apt's output only if it fails
apt_install() {
    local what=$1 options=$2 apt_log
    shift 2
    (($#)) || return 0
    say "installing Debian packages$what: $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt_log=$(mktemp)
    # shellcheck disable=SC2086  # OPTIONS is meant to split into words
    if ! apt-get -o DPkg::Lock::Timeout=300 install -y -qq $options "$@" >"$apt_log" 2>&1; then
        tail -n 30 "$apt_log" >&2
        echo "setup: apt-get install $* failed (log above)" >&2
        exit 1
    fi
    rm -f "$apt_log"
}

if [[ $(id -u) -ne 0 ]]; then
    echo "setup: run as root (FUSE mounts and CRIU need it): sudo $0" >&2
    exit 1
fi

mapfile -t need_apt < <(missing_debs fuse3 libfuse3-dev pkg-config git sqlite3 tar rsync fio)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v gcc >/dev/null || need_apt+=(gcc python3-dev)
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
apt_install "" "" "${need_apt[@]}"

# Ceph RGW (a single-node cluster the tests start themselves: tests/rgw.py); about 36 s and 106
# packages on a fresh Debian bookworm, nothing when present. No services are started.
mapfile -t need_apt < <(missing_debs ceph-mon ceph-osd ceph-mgr radosgw)
apt_install " for the test servers" --no-install-recommends "${need_apt[@]}"

# Slurm with munge (a single-node cluster the tests start themselves: tests/slurmcluster.py);
# about 11 s on Debian bookworm (Slurm 22.05), nothing when present. No services are started.
mapfile -t need_apt < <(missing_debs slurm-wlm munge)
apt_install " for the Slurm tests" --no-install-recommends "${need_apt[@]}"

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    say "creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
say "installing fusionfs + snapstore, test, benchmark (matplotlib) and compatibility (Snakemake) dependencies into .venv"
if ! { .venv/bin/python -m pip install -q --upgrade pip &&
       .venv/bin/python -m pip install -q -e '.[test,bench,compat]'; } >.venv/pip.log 2>&1; then
    cat .venv/pip.log >&2
    echo "setup: pip install failed (log above)" >&2
    exit 1
fi

say "installing s3rver 3.7.1 (npm) into benchmarks/node_modules"
if ! s3rver_entry=$(.venv/bin/python -c '
import sys
from benchmarks.s3rver import S3rverError, ensure_installed
try:
    print(ensure_installed())
except S3rverError as err:
    sys.exit(f"setup: {err}")
'); then
    echo "setup: could not install s3rver (message above)" >&2
    exit 1
fi
say "s3rver: $s3rver_entry ($(node --version))"

say "looking for a usable CRIU (>= 4.0)"
# .venv/bin/criu is our own wrapper from an earlier run: never let the search find it (with the
# venv activated it is first on PATH, and a wrapper that runs itself would loop forever)
venv_bin="$PWD/.venv/bin"
search_path=$(printf '%s' "$PATH" | tr ':' '\n' | { grep -vxF -e "$venv_bin" -e ".venv/bin" || true; } | paste -sd: -)
search_criu="${CRIU:-}"
[[ "$search_criu" == "$venv_bin/criu" || "$search_criu" == ".venv/bin/criu" ]] && search_criu=""
CRIU_PATH=$(PATH="$search_path" CRIU="$search_criu" bash scripts/install-criu.sh | tail -n 1)
if [[ "$(readlink -f "$CRIU_PATH")" == "$(readlink -f "$venv_bin/criu")" ]]; then
    echo "setup: the CRIU found is .venv/bin/criu itself; set CRIU=/path/to/criu" >&2
    exit 1
fi
rm -f .venv/bin/criu
printf '#!/bin/sh\nexec %q "$@"\n' "$CRIU_PATH" > .venv/bin/criu
chmod 755 .venv/bin/criu
say "CRIU: $CRIU_PATH (.venv/bin/criu runs it)"

# fusectl lets tests abort a hung FUSE connection instead of waiting on it
if [[ -d /sys/fs/fuse/connections ]] && ! mountpoint -q /sys/fs/fuse/connections; then
    mount -t fusectl fusectl /sys/fs/fuse/connections 2>/dev/null || true
fi
say "pjdfstest (tests/compat/test_pjdfstest.py): built once into build/pjdfstest"
bash scripts/install-pjdfstest.sh >/dev/null

# Task containers (tests/snap/test_container.py, containers/): rootful podman with runc (crun
# refuses this machine's cgroup v1 hybrid layout) and mmdebstrap to build the task image from
# Debian packages (no container registry is reachable). --no-install-recommends keeps Debian's
# criu 3.17 (too old) out. About 25 s on a fresh machine, nothing when present.
mapfile -t need_apt < <(missing_debs podman runc mmdebstrap)
apt_install " for task containers" --no-install-recommends "${need_apt[@]}"
say "task image (containers/Containerfile): built once per set of inputs by scripts/build-task-image.sh"
say "task image: $(bash scripts/build-task-image.sh | tail -n 1)"

say "ready: activate with 'source .venv/bin/activate'"
