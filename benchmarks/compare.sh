#!/usr/bin/env bash
# Piston vs transformers on the same requests: runs `piston bench throughput`, then
# benchmarks/hf_baseline.py, and prints Piston's output and total tokens/s as a multiple
# of the baseline's, with both roofline figures (fraction of the measured matmul peak).
#
#   bash benchmarks/compare.sh                          # the defaults below
#   NUM_PROMPTS=16 bash benchmarks/compare.sh --max-num-seqs 32   # extra flags go to Piston
#
# Settings (environment): MODEL (default: the built-in SmolLM2-135M-Instruct), DTYPE
# (float32), INPUT_LEN (144) and RANGE_RATIO (0.78): prompts of 32-256 tokens, OUTPUT_LEN
# (96, exact, ignore_eos), NUM_PROMPTS (64), HF_BATCH_SIZE (16), OUT_DIR (results/).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
DTYPE=${DTYPE:-float32}
OUT_DIR=${OUT_DIR:-benchmarks/results}
mkdir -p "$OUT_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
PISTON_JSON="$OUT_DIR/compare-$STAMP-piston.json"
HF_JSON="$OUT_DIR/compare-$STAMP-hf.json"

DATASET=(--dataset random --input-len "${INPUT_LEN:-144}" --range-ratio "${RANGE_RATIO:-0.78}"
         --output-len "${OUTPUT_LEN:-96}" --output-range-ratio 0
         --num-prompts "${NUM_PROMPTS:-64}" --dataset-seed 0)
MODEL_ARGS=()
[ -n "${MODEL:-}" ] && MODEL_ARGS=(--model "$MODEL")

echo "== piston bench throughput"
"$PY" -m piston.entrypoints.cli bench throughput "${MODEL_ARGS[@]}" --dtype "$DTYPE" \
    "${DATASET[@]}" --disable-tqdm --output-json "$PISTON_JSON" "$@"
echo "== transformers generate (batch ${HF_BATCH_SIZE:-16})"
"$PY" benchmarks/hf_baseline.py "${MODEL_ARGS[@]}" --dtype "$DTYPE" "${DATASET[@]}" \
    --batch-size "${HF_BATCH_SIZE:-16}" --output-json "$HF_JSON"

"$PY" - "$PISTON_JSON" "$HF_JSON" <<'PY'
import json, sys
p, h = (json.load(open(f))["results"] for f in sys.argv[1:3])
print("== Piston vs transformers (same requests, same machine, same run)")
for key, label in (("output_tokens_per_s", "output tok/s"), ("total_tokens_per_s", "total tok/s"),
                   ("requests_per_s", "requests/s")):
    print(f"{label:>14}: piston {p[key]:9.1f}   transformers {h[key]:9.1f}   "
          f"ratio {p[key] / h[key]:6.2f}x")
print(f"{'roofline':>14}: piston {100 * p['roofline_fraction']:8.2f}%   transformers "
      f"{100 * h['roofline_fraction']:8.2f}%   of a measured matmul peak of "
      f"{p['peak_flops_per_s'] / 1e9:.0f} / {h['peak_flops_per_s'] / 1e9:.0f} GFLOP/s")
print(f"results: {sys.argv[1]} {sys.argv[2]}")
PY
