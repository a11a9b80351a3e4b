#!/usr/bin/env bash
# The one test command: unit tests and the CPU conformance suite.
# Creates .venv on first use; torch is pinned by constraints.txt (see that file).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[cpu,dev]"

.venv/bin/python -m ruff check .

export PISTON_PLATFORM=cpu
exec .venv/bin/python -m pytest tests/unit tests/conformance tests/e2e -q "$@"
