#!/usr/bin/env bash
# Sets up what is missing (scripts/setup_env.py), then runs the tests; arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$("${PYTHON:-python3}" scripts/setup_env.py test export)
exec "$PY" -m pytest tests -q "$@"
