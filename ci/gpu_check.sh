#!/usr/bin/env bash
# The CUDA platform's check on one GPU (written for one H200, no network).
#
#   ci/gpu_check.sh                              # every stage
#   ci/gpu_check.sh install kernels bench        # some stages: install, kernels, conformance, bench
#
# Stages:
#   install      pip-installs the project (editable) against the machine's own torch and
#                Triton, offline: --no-index --no-deps --no-build-isolation. Dependencies
#                the machine lacks come from wheels in $WHEELS_DIR (default .whl/, fetched
#                elsewhere with `pip download --no-deps -r ci/gpu_wheels.txt`, which says
#                how); then every requirement of piston
#                and of piston[cuda] must be installed, and piston must import from outside
#                this tree.
#   kernels      the Triton kernel tests on the GPU, in bfloat16 and float16.
#   conformance  the conformance suite with PISTON_PLATFORM=cuda. CUDA compiles piecewise
#                and replays CUDA graphs by default, so this is the graph-captured path.
#                Needs the SmolLM2 GGUF: $PISTON_DEFAULT_MODEL, else shared/models/ or
#                models/ in this tree, else Piston's cache. Without it the stage FAILS.
#                First benchmarks/compile_drift.py measures how far compilation moves float32
#                logprobs against the references' greedy margins. Each failure's traceback is printed when it happens (ci/pytest_report_now.py)
#                and each test has CONFORMANCE_TEST_TIMEOUT seconds (default 240), so a run
#                cut short still says why. CONFORMANCE_SELECT is passed to pytest -k.
#   bench        on a Llama-3-8B-shaped model with random bfloat16 weights: `piston bench
#                throughput` (64 requests, 32 to 256 prompt and 96 output tokens) against
#                transformers' generate on the same requests, in this run; decode step
#                times (CUDA graphs and eager) against the batch-1 weight-bandwidth bound
#                at the copy bandwidth measured here; cascade attention on and off for 64
#                requests sharing a 2048-token system prompt; graph capture time and memory.
#
# Every figure is printed on a line of its own, "RESULT <name> <value>". The script exits
# non-zero if any stage failed or could not run (a stage never counts as skipped).
# Logs go to $LOG_DIR (default: a temporary folder, removed at the end).
#
# Time on one H200 (2026-12-04): install 8 s, kernels 35 s, bench 205 s; conformance about
# 25 s per test (every engine traces and compiles its model, and the first compiles cold),
# so the whole suite (63 tests) needs about 25 minutes: a 15-minute lease runs a
# CONFORMANCE_SELECT subset.
#
# Environment: PYTHON (default python3, or .venv/bin/python if present), BENCH_SHAPE=
# llama3-8b|tiny (tiny: a smoke test of this script, on any platform), PISTON_GPU_CHECK_PLATFORM
# (default cuda), WHEELS_DIR, LOG_DIR.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo "$ROOT/.venv/bin/python" || command -v python3)}
PLATFORM=${PISTON_GPU_CHECK_PLATFORM:-cuda}
BENCH_SHAPE=${BENCH_SHAPE:-llama3-8b}
WHEELS_DIR=${WHEELS_DIR:-.whl}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(install kernels conformance bench)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PYTHONUNBUFFERED=1
WORK=$(mktemp -d /tmp/piston-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
LOG_DIR=${LOG_DIR:-$WORK}
mkdir -p "$LOG_DIR"
FAILED=0
START=$SECONDS

result() { echo "RESULT $1 $2"; }
fail() { result "$1" "failed${2:+ ($2)}"; FAILED=1; }
stage_time() { result "$1_seconds" "$(( SECONDS - $2 ))"; }
has_stage() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
# pytest's summary line -> RESULT lines; fails the stage when nothing passed.
pytest_counts() {  # name logfile
    local summary
    summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error|skipped).* in [0-9.]+s" "$2" | tail -1)
    for kind in passed failed skipped error; do
        result "$1_$kind" "$(echo "$summary" | grep -oE "[0-9]+ $kind" | grep -oE "^[0-9]+" || echo 0)"
    done
    echo "$summary" | grep -qE "[0-9]+ passed"
}

for s in "${STAGES[@]}"; do
    case $s in install|kernels|conformance|bench) ;; *) echo "unknown stage: $s" >&2; exit 2 ;; esac
done

# ---- 0. Install, offline, against the machine's own torch --------------------------------------
if has_stage install; then
    t0=$SECONDS
    (
        set -e
        missing=()
        if [ -d "$WHEELS_DIR" ]; then
            for wheel in "$WHEELS_DIR"/*.whl; do
                [ -e "$wheel" ] || continue
                dist=$(basename "$wheel" | cut -d- -f1)
                "$PYTHON" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null \
                    || missing+=("$wheel")
            done
        fi
        if [ ${#missing[@]} -gt 0 ]; then
            echo "installing ${#missing[@]} missing dependencies from $WHEELS_DIR: ${missing[*]##*/}"
            "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation "${missing[@]}"
        fi
        "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e .
        cd /tmp && "$PYTHON" - <<'EOF'
import importlib.metadata as md
import re

missing = []
for dist in ("pytest", "jsonschema"):  # what the conformance tests import beyond piston[cuda]
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        missing.append(dist)
for req in md.requires("piston"):
    name, _, marker = req.partition(";")
    if "extra" in marker and "cuda" not in marker:
        continue
    dist = re.split(r"[<>=!~\[ ]", name.strip(), maxsplit=1)[0]
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        missing.append(dist)
assert not missing, f"not installed: {missing}"
import piston, piston_cuda  # noqa: E401,F401 - from the installed package, not this tree

print(f"piston {md.version('piston')} at {piston.__file__}")
EOF
    ) > "$LOG_DIR/install.log" 2>&1
    if [ $? -eq 0 ]; then result install passed; else tail -20 "$LOG_DIR/install.log"; fail install; fi
    stage_time install "$t0"
fi
if ! has_stage install; then
    # Not installed: run from this tree.
    export PYTHONPATH="$ROOT/common:$ROOT/platforms/cpu:$ROOT/platforms/cuda:$ROOT/platforms/tpu${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- environment -----------------------------------------------------------------------
"$PYTHON" - <<'EOF' || { result environment failed; exit 1; }
import torch, triton, transformers
print(f"RESULT torch {torch.__version__}")
print(f"RESULT triton {triton.__version__}")
print(f"RESULT transformers {transformers.__version__}")
if torch.cuda.is_available():
    print(f"RESULT gpu {torch.cuda.get_device_name(0).replace(' ', '_')}")
EOF

# ---- 1. Triton kernel tests on the GPU (bfloat16 and float16) ----------------------------------
if has_stage kernels; then
    t0=$SECONDS
    timeout 240 "$PYTHON" -m pytest tests/kernels -q -rs -p no:cacheprovider 2>&1 | tee "$LOG_DIR/kernels.log" | tail -25
    status=${PIPESTATUS[0]}
    if pytest_counts kernel_tests "$LOG_DIR/kernels.log" && [ "$status" -eq 0 ]; then
        result kernel_tests passed
    else
        fail kernel_tests "exit $status"
    fi
    stage_time kernel_tests "$t0"
fi

# ---- 2. The conformance suite on the CUDA platform (compiled, CUDA graphs) -------------------
if has_stage conformance; then
    t0=$SECONDS
    GGUF=""
    for candidate in "${PISTON_DEFAULT_MODEL:-}" shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \
            models/SmolLM2-135M-Instruct.Q4_1.gguf \
            "$("$PYTHON" -c 'from piston.model_resolver import cache_dir, DEFAULT_MODEL_FILE as f; import os; print(os.path.join(cache_dir(), "models", f))' 2>/dev/null)"; do
        if [ -n "$candidate" ] && [ -f "$candidate" ]; then GGUF=$(realpath "$candidate"); break; fi
    done
    if [ -z "$GGUF" ]; then
        fail conformance_cuda "no SmolLM2 GGUF: set PISTON_DEFAULT_MODEL or put it in shared/models/"
    else
        # How far compilation moves float32 logprobs on this GPU, against the greedy margins.
        timeout 240 "$PYTHON" benchmarks/compile_drift.py --model "$GGUF" --platform "$PLATFORM" \
            > "$LOG_DIR/compile_drift.log" 2>&1 || fail compile_drift
        grep -E "^RESULT|diverges" "$LOG_DIR/compile_drift.log"
        EXTRA=()
        "$PYTHON" -c "import pytest_timeout" 2>/dev/null && EXTRA+=(--timeout "${CONFORMANCE_TEST_TIMEOUT:-240}")
        [ -n "${CONFORMANCE_SELECT:-}" ] && EXTRA+=(-k "$CONFORMANCE_SELECT")
        PYTHONPATH="$ROOT/ci${PYTHONPATH:+:$PYTHONPATH}" PISTON_PLATFORM=$PLATFORM PISTON_DEFAULT_MODEL=$GGUF \
            timeout "${CONFORMANCE_TIMEOUT:-1800}" "$PYTHON" -m pytest tests/conformance -v -rs -p no:cacheprovider \
            -p pytest_report_now --durations 15 "${EXTRA[@]}" 2>&1 \
            | tee "$LOG_DIR/conformance.log" | grep -E "PASSED|FAILED|ERROR|SKIPPED|^=|^-----|^E |slowest|^[0-9.]+s " | tail -150
        status=${PIPESTATUS[0]}
        if pytest_counts conformance_cuda "$LOG_DIR/conformance.log" && [ "$status" -eq 0 ]; then
            result conformance_cuda passed
        else
            fail conformance_cuda "exit $status"
        fi
    fi
    stage_time conformance_cuda "$t0"
fi

# ---- 3. Benchmarks on a Llama-3-8B-shaped model with random bfloat16 weights ------------------
if has_stage bench; then
    MODEL="$WORK/$BENCH_SHAPE"
    # config.json only (load_format=dummy) and a word-level tokenizer over the whole vocabulary.
    "$PYTHON" -c 'import sys; sys.path.insert(0, "benchmarks"); from gpu_decode_bench import write_model
write_model(sys.argv[1], sys.argv[2])' "$MODEL" "$BENCH_SHAPE" || fail bench_model
    if [ "$BENCH_SHAPE" = "llama3-8b" ]; then
        # The 64-request workload of benchmarks/RESULTS.md: prompts of 32 to 256 tokens, 96 out.
        DATASET=(--num-prompts 64 --input-len 144 --range-ratio 0.78 --output-len 96 --output-range-ratio 0)
        ENGINE=(--max-model-len 2048 --max-num-seqs 64 --max-num-batched-tokens 8192)
        DECODE=(--batch-sizes 1,8,64 --steps 64 --repeats 2 --prefix-len 2048 --prefix-prompts 64
                --prefix-output-len 128)
        DTYPE=bfloat16
    else
        DATASET=(--num-prompts 8 --input-len 32 --output-len 8 --range-ratio 0)
        ENGINE=(--max-model-len 256 --kv-cache-memory 64MiB)
        DECODE=(--batch-sizes 1,4 --steps 4 --repeats 1 --prefix-len 64 --prefix-prompts 4
                --prefix-output-len 8 --kv-cache-memory 64MiB)
        DTYPE=${BENCH_DTYPE:-bfloat16}
    fi
    [ "$PLATFORM" = cuda ] || DECODE+=(--hbm-tbps 0.03)
    HF_DEVICE=$([ "$PLATFORM" = cuda ] && echo cuda || echo cpu)

    # 3a. Throughput: Piston, then transformers on the same requests.
    t0=$SECONDS
    if timeout 300 "$PYTHON" -m piston.entrypoints.cli bench throughput \
            --model "$MODEL" --load-format dummy --dtype "$DTYPE" --platform "$PLATFORM" --disable-tqdm \
            --calibration-seconds 1 --output-json "$WORK/throughput.json" "${DATASET[@]}" "${ENGINE[@]}" \
            > "$LOG_DIR/throughput.log" 2>&1; then
        grep -E "Compiled|Captured|CUDA graphs hold|Memory profile|ready" "$LOG_DIR/throughput.log"
        "$PYTHON" - "$WORK/throughput.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
for key in ("output_tokens_per_s", "total_tokens_per_s", "requests_per_s", "elapsed_s", "startup_s",
            "roofline_fraction", "peak_flops_per_s", "bandwidth_bytes_per_s"):
    if isinstance(r.get(key), (int, float)):
        print(f"RESULT throughput_{key} {r[key]:.4g}")
EOF
        sed -nE 's/.*Captured .* in ([0-9.]+) s.*/RESULT graph_capture_seconds \1/p' "$LOG_DIR/throughput.log"
        sed -nE 's/.*CUDA graphs hold ([0-9.]+) GiB.*/RESULT graph_memory_gib \1/p' "$LOG_DIR/throughput.log"
        sed -nE 's/.*Compiled the model in ([0-9.]+) s.*/RESULT compile_seconds \1/p' "$LOG_DIR/throughput.log"
    else
        tail -40 "$LOG_DIR/throughput.log"; fail throughput
    fi
    stage_time throughput "$t0"
    t0=$SECONDS
    if timeout 240 "$PYTHON" benchmarks/hf_baseline.py --model "$MODEL" --load-format dummy --dtype "$DTYPE" \
            --device "$HF_DEVICE" --batch-size 64 --calibration-seconds 1 --output-json "$WORK/hf.json" \
            "${DATASET[@]}" > "$LOG_DIR/hf_baseline.log" 2>&1; then
        "$PYTHON" - "$WORK/throughput.json" "$WORK/hf.json" <<'EOF'
import json, sys
piston = json.load(open(sys.argv[1]))["results"]["output_tokens_per_s"]
hf = json.load(open(sys.argv[2]))["results"]["output_tokens_per_s"]
print(f"RESULT hf_output_tokens_per_s {hf:.4g}")
print(f"RESULT throughput_vs_transformers {piston / hf:.2f}")
EOF
    else
        tail -40 "$LOG_DIR/hf_baseline.log"; fail hf_baseline
    fi
    stage_time hf_baseline "$t0"

    # 3b. Decode step times (graphs, eager) against the bound; cascade on and off.
    t0=$SECONDS
    if ! timeout 500 "$PYTHON" benchmarks/gpu_decode_bench.py --model "$MODEL" --shape "$BENCH_SHAPE" \
            --platform "$PLATFORM" --dtype "$DTYPE" --modes graphs,nocascade,eager --timeout 200 \
            --output-json "$LOG_DIR/decode.json" "${DECODE[@]}" 2>&1 | tee "$LOG_DIR/decode.log"; then
        fail decode_bench
    fi
    stage_time decode_bench "$t0"
fi

result total_seconds "$(( SECONDS - START ))"
if [ "$FAILED" -ne 0 ]; then result gpu_check failed; exit 1; fi
result gpu_check passed
