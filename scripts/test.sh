#!/usr/bin/env bash
# The test command: set-up (scripts/setup.sh), the style and type checks (scripts/check.sh: ruff
# and mypy; any finding fails the run before the tests), then the whole suite with real FUSE,
# real CRIU and a real S3 server process (moto's server mode, started by the tests' fixtures on
# loopback).
# Extra arguments go to pytest, e.g. `sudo scripts/test.sh tests/store -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/check.sh
export PATH="$PWD/.venv/bin:$PATH"
export CRIU="$PWD/.venv/bin/criu"
set +e
.venv/bin/python -m pytest -p no:cacheprovider "${@:-tests}"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "test: pytest collected no tests" >&2
    exit 1
fi
exit $rc
