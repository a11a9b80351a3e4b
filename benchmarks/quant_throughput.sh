#!/usr/bin/env bash
# The 64-request workload of compare.sh, served packed (--quantization gguf) and in float32
# (--quantization none), alternating in one run: output tokens/s of each, and their ratio.
#
#   bash benchmarks/quant_throughput.sh            # ROUNDS=2 rounds of both (default)
#
# Settings (environment): MODEL (default: the built-in SmolLM2 Q4_1 GGUF), ROUNDS (2),
# OUT_DIR (benchmarks/results). Extra flags go to both `piston bench throughput` runs.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
OUT_DIR=${OUT_DIR:-benchmarks/results}
mkdir -p "$OUT_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
DATASET=(--dataset random --input-len 144 --range-ratio 0.78 --output-len 96 --output-range-ratio 0
         --num-prompts 64 --dataset-seed 0)
MODEL_ARGS=()
[ -n "${MODEL:-}" ] && MODEL_ARGS=(--model "$MODEL")
FILES=()
for round in $(seq "${ROUNDS:-2}"); do
    for quant in gguf none; do
        out="$OUT_DIR/quant-$STAMP-$round-$quant.json"
        echo "== round $round: --quantization $quant"
        "$PY" -m piston.entrypoints.cli bench throughput "${MODEL_ARGS[@]}" --dtype float32 \
            --quantization "$quant" "${DATASET[@]}" --disable-tqdm --calibration-seconds 0.5 \
            --output-json "$out" "$@" | grep -E "Output token throughput|Peak RSS engine" || true
        FILES+=("$out")
    done
done
"$PY" - "${FILES[@]}" <<'PY'
import json, statistics, sys
runs = {"gguf": [], "none": []}
for path in sys.argv[1:]:
    report = json.load(open(path))
    quant = "gguf" if path.endswith("-gguf.json") else "none"
    runs[quant].append(report["results"]["output_tokens_per_s"])
packed, dense = statistics.median(runs["gguf"]), statistics.median(runs["none"])
print(f"== output tokens/s, median of {len(runs['gguf'])} rounds: packed {packed:.1f} "
      f"({', '.join(f'{v:.1f}' for v in runs['gguf'])}), float32 {dense:.1f} "
      f"({', '.join(f'{v:.1f}' for v in runs['none'])}); packed / float32 = {packed / dense:.3f}")
PY
