#!/usr/bin/env bash
# Style and type checks, configured in pyproject.toml: ruff's lint rules, ruff's formatting (a
# check only: nothing is rewritten) and mypy on fusionfs, snapstore and benchmarks. All three
# run; the script fails if any of them found something. scripts/test.sh runs it before pytest.
# Needs the test extra in .venv (scripts/setup.sh installs it).
set -uo pipefail
cd "$(dirname "$0")/.."
failed=()
run() {
    printf '\033[1mcheck:\033[0m %s\n' "$*"
    "$@" || failed+=("$*")
}
run .venv/bin/ruff check .
run .venv/bin/ruff format --check .
run .venv/bin/mypy
if ((${#failed[@]})); then
    printf 'check: failed: %s\n' "${failed[@]}" >&2
    exit 1
fi
