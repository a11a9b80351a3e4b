#!/usr/bin/env bash
# The CUDA platform's check on one GPU (written for one H100, under 8 minutes; no network).
#
#   ci/gpu_check.sh                      # every stage
#   ci/gpu_check.sh kernels bench        # only some stages: kernels, conformance, bench
#
# Expects torch (CUDA build) and triton installed, and piston importable (installed with
# `pip install -e .` or run from this tree). Installs nothing. Every result is printed on a
# line of its own, "RESULT <name> <value>", and the script exits non-zero if any stage failed.
#
# Conformance needs the SmolLM2 GGUF (its tokenizer serves the tiny models too). It is
# taken from $PISTON_DEFAULT_MODEL, else shared/models/ or models/ in this tree, else
# Piston's cache; without it the conformance stage is reported as skipped.
#
# Environment: PYTHON (default .venv/bin/python if present, else python3),
# BENCH_SHAPE=llama3-8b|tiny (tiny: a smoke test of this script, on any platform),
# PISTON_GPU_CHECK_PLATFORM (default cuda).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
PLATFORM=${PISTON_GPU_CHECK_PLATFORM:-cuda}
BENCH_SHAPE=${BENCH_SHAPE:-llama3-8b}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(kernels conformance bench)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1
export PYTHONPATH="$PWD/common:$PWD/platforms/cpu:$PWD/platforms/cuda:$PWD/platforms/tpu${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d /tmp/piston-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
FAILED=0
START=$SECONDS

result() { echo "RESULT $1 $2"; }
stage_time() { result "$1_seconds" "$(( SECONDS - $2 ))"; }
has_stage() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

# ---- environment -----------------------------------------------------------------------
"$PYTHON" - <<'EOF' || { echo "RESULT environment failed"; exit 1; }
import torch, triton
print(f"RESULT torch {torch.__version__}")
print(f"RESULT triton {triton.__version__}")
if torch.cuda.is_available():
    print(f"RESULT gpu {torch.cuda.get_device_name(0).replace(' ', '_')}")
EOF

# ---- 1. Triton kernel tests on the GPU (bfloat16 and float16) ----------------------------------
if has_stage kernels; then
    t0=$SECONDS
    if timeout 150 "$PYTHON" -m pytest tests/kernels -q -p no:cacheprovider; then
        result kernel_tests passed
    else
        result kernel_tests failed; FAILED=1
    fi
    stage_time kernel_tests "$t0"
fi

# ---- 2. The conformance suite on the CUDA platform ------------------------------------------
if has_stage conformance; then
    t0=$SECONDS
    GGUF=""
    for candidate in "${PISTON_DEFAULT_MODEL:-}" shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \
            models/SmolLM2-135M-Instruct.Q4_1.gguf \
            "$("$PYTHON" -c 'from piston.model_resolver import cache_dir, DEFAULT_MODEL_FILE as f; import os; print(os.path.join(cache_dir(), "models", f))' 2>/dev/null)"; do
        if [ -n "$candidate" ] && [ -f "$candidate" ]; then GGUF=$(realpath "$candidate"); break; fi
    done
    if [ -z "$GGUF" ]; then
        result conformance_cuda "skipped (no SmolLM2 GGUF: set PISTON_DEFAULT_MODEL or put it in shared/models/)"
    elif PISTON_PLATFORM=$PLATFORM PISTON_DEFAULT_MODEL=$GGUF \
            timeout 220 "$PYTHON" -m pytest tests/conformance -q -p no:cacheprovider -x; then
        result conformance_cuda passed
    else
        result conformance_cuda failed; FAILED=1
    fi
    stage_time conformance_cuda "$t0"
fi

# ---- 3. Throughput on a Llama-3-8B-shaped model with random bfloat16 weights ------------------
if has_stage bench; then
    t0=$SECONDS
    MODEL="$WORK/$BENCH_SHAPE"
    # config.json only (load_format=dummy) and a word-level tokenizer over the whole vocabulary.
    "$PYTHON" -c 'import sys; sys.path.insert(0, "benchmarks"); from gpu_decode_bench import write_model
write_model(sys.argv[1], sys.argv[2])' "$MODEL" "$BENCH_SHAPE"
    if [ "$BENCH_SHAPE" = "llama3-8b" ]; then
        BENCH_ARGS=(--num-prompts 256 --input-len 512 --output-len 128 --max-model-len 2048
                    --max-num-seqs 256 --max-num-batched-tokens 8192)
    else
        BENCH_ARGS=(--num-prompts 8 --input-len 32 --output-len 8 --max-model-len 256 --kv-cache-memory 64MiB)
    fi
    if timeout 180 "$PYTHON" -m piston.entrypoints.cli bench throughput \
            --model "$MODEL" --load-format dummy --dtype bfloat16 --platform "$PLATFORM" --disable-tqdm \
            --calibration-seconds 1 --output-json "$WORK/throughput.json" "${BENCH_ARGS[@]}"; then
        "$PYTHON" - "$WORK/throughput.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
for key in ("output_tokens_per_s", "total_tokens_per_s", "requests_per_s", "elapsed_s", "startup_s"):
    if r.get(key) is not None:
        print(f"RESULT throughput_{key} {r[key]:.1f}")
EOF
    else
        result throughput failed; FAILED=1
    fi
    stage_time throughput "$t0"
fi

# ---- 4. Decode step time: piecewise CUDA graphs vs --enforce-eager --------------------------
if has_stage bench; then
    t0=$SECONDS
    if ! timeout 500 "$PYTHON" benchmarks/gpu_decode_bench.py --model "$MODEL" --shape "$BENCH_SHAPE" \
            --platform "$PLATFORM" --batch-sizes 1,8,64,256 --steps 32 --repeats 1 --timeout 240; then
        result decode_bench failed; FAILED=1
    fi
    stage_time decode_bench "$t0"
fi

result total_seconds "$(( SECONDS - START ))"
if [ "$FAILED" -ne 0 ]; then result gpu_check failed; exit 1; fi
result gpu_check passed
