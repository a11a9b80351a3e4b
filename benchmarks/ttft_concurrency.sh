#!/usr/bin/env bash
# Time to first token at 1 and 8 concurrent streams, seen by `piston bench serve` and, when
# it is installed, by guidellm (`nox -s bench-ttft` installs it), with the server's request
# timeline laid out per stage (benchmarks/request_timeline.py).
#
#   bash benchmarks/ttft_concurrency.sh OUT_DIR [piston serve flags...]
#   bash benchmarks/ttft_concurrency.sh /tmp/before --max-prefill-tokens 0   # no prompt cap
#
# Serves the built-in default model on port ${PORT:-8000}. Each concurrency gets its own
# dataset seed, so no run hits the prefix cache with another's prompts. Writes
# bench_c{1,8}.{txt,json}, timeline_c{1,8}.txt, gl_c{1,8}.{txt,json} and server.log.
set -euo pipefail
OUT=${1:?usage: ttft_concurrency.sh OUT_DIR [piston serve flags...]}
shift
PORT=${PORT:-8000}
mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")" && pwd)

piston serve "$@" --port "$PORT" --request-timeline-file "$OUT/timeline.jsonl" > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2> /dev/null || { tail -20 "$OUT/server.log"; exit 1; }
  sleep 1
done
# Warm-up: the first requests pay for lazy initialisation.
piston bench serve --port "$PORT" --max-concurrency 1 --num-prompts 2 --input-len 128 --output-len 16 \
  --dataset-seed 99 --disable-tqdm > /dev/null

for C in 1 8; do
  N=$((C == 1 ? 8 : 32))
  piston bench serve --port "$PORT" --max-concurrency $C --num-prompts $N --input-len 128 --output-len 64 \
    --dataset-seed $C --disable-tqdm --output-json "$OUT/bench_c$C.json" > "$OUT/bench_c$C.txt"
  python "$HERE/request_timeline.py" "$OUT/timeline.jsonl" --bench "$OUT/bench_c$C.json" \
    --output-json "$OUT/timeline_c$C.json" > "$OUT/timeline_c$C.txt"
done

if command -v guidellm > /dev/null; then
  # guidellm needs a Hugging Face tokenizer folder: the default model's, from its GGUF.
  TOKENIZER="$OUT/tokenizer"
  python - "$TOKENIZER" <<'EOF'
import os, sys
from transformers import AutoTokenizer
from piston.model_resolver import default_model_path
path = default_model_path()
AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)).save_pretrained(sys.argv[1])
EOF
  for C in 1 8; do
    N=$((C == 1 ? 8 : 32))
    guidellm run --backend "kind=openai_http,target=http://127.0.0.1:$PORT,model=SmolLM2-135M-Instruct" \
      --profile "kind=concurrent,streams=$C" --constraint "kind=max_requests,count=$N" \
      --tokenizer "kind=hf_auto,model=$TOKENIZER" \
      --data "kind=synthetic_text,prompt_tokens=128,output_tokens=64" \
      --output "kind=json,path=$OUT/gl_c$C.json" --disable-console-interactive > "$OUT/gl_c$C.txt" 2>&1
  done
else
  echo "guidellm is not installed: only piston bench serve ran (nox -s bench-ttft installs it)."
fi

for C in 1 8; do
  echo "== concurrency $C: piston bench serve"
  grep -E "Output token throughput|Mean TTFT|P50 TTFT|P90 TTFT|P50 ITL" "$OUT/bench_c$C.txt"
  cat "$OUT/timeline_c$C.txt"
  if [ -f "$OUT/gl_c$C.json" ]; then
    echo "== concurrency $C: guidellm"
    python - "$OUT/gl_c$C.json" <<'EOF'
import json, sys
metrics = json.load(open(sys.argv[1]))["benchmarks"][0]["metrics"]
get = lambda key, stat: metrics[key]["successful"][stat]
print(f"TTFT median {get('time_to_first_token_ms', 'median'):.1f} ms, "
      f"p95 {metrics['time_to_first_token_ms']['successful']['percentiles']['p95']:.1f} ms; "
      f"ITL median {get('inter_token_latency_ms', 'median'):.1f} ms; "
      f"output {get('output_tokens_per_second', 'mean'):.1f} tok/s")
EOF
  fi
done
