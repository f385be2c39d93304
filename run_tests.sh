#!/usr/bin/env bash
# The kit's test suite on a fresh machine: bootstraps .venv (CPU torch), then runs pytest.
set -euo pipefail
cd "$(dirname "$0")"
py="$(scripts/bootstrap.sh .venv requirements-dev.txt)"
exec "$py" -m pytest -q "$@" tests
