#!/usr/bin/env bash
# One-time (idempotent) set-up of a fresh Debian/Ubuntu machine for fusionfs + snapstore, as root:
# FUSE 3 (fuse3, libfuse3-dev, pkg-config), a Python virtualenv in .venv with the project and its
# test dependencies, and a CRIU >= 4.0 (scripts/install-criu.sh puts Debian trixie's in a private
# prefix when none is usable), and pjdfstest built into build/pjdfstest (scripts/install-pjdfstest.sh).
# Prints what it does; fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "setup: run as root (FUSE mounts and CRIU need it): sudo $0" >&2
    exit 1
fi

need_apt=()
for pkg in fuse3 libfuse3-dev pkg-config; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v gcc >/dev/null || need_apt+=(gcc python3-dev)
if ((${#need_apt[@]})); then
    say "installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    say "creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
say "installing fusionfs + snapstore, test and benchmark (matplotlib) dependencies into .venv"
if ! { .venv/bin/python -m pip install -q --upgrade pip &&
       .venv/bin/python -m pip install -q -e '.[test,bench]'; } >.venv/pip.log 2>&1; then
    cat .venv/pip.log >&2
    echo "setup: pip install failed (log above)" >&2
    exit 1
fi

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

say "ready: activate with 'source .venv/bin/activate'"
