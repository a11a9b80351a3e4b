#!/usr/bin/env bash
# The one test command: lint, then unit, kernel (Triton interpreter), conformance and e2e
# tests on the CPU platform, then the conformance suite on the TPU plugin.
# Creates .venv on first use; torch is pinned by constraints.txt (see that file).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# cuda: Triton for the interpret-mode kernel tests; tpu: JAX for the TPU plugin's unit
# tests; ray: the Ray executor's tests; reference: torch for the transformers reference.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[cpu,cuda,tpu,ray,dev,reference]"

.venv/bin/python -m ruff check .

PISTON_PLATFORM=cpu .venv/bin/python -m pytest tests/unit tests/kernels tests/conformance tests/e2e -q "$@"

# The unchanged conformance suite on the TPU plugin (JAX's CPU backend, Pallas interpret
# mode), in its own nox environment without torch; the transformers references run in
# .venv's interpreter, which has it.
PISTON_REFERENCE_PYTHON="$PWD/.venv/bin/python" .venv/bin/nox -s conformance-tpu
