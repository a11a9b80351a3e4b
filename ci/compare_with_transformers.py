"""Print Piston's and transformers' greedy continuations of one prompt on the same weights.

    python ci/compare_with_transformers.py "Once upon a time" --max-tokens 20 [--model PATH]

Exits 0 when the token ids are identical, 1 otherwise. Without --model it uses the
built-in default (SmolLM2-135M-Instruct GGUF), which transformers loads through its
own GGUF reader (needs the dev extra's accelerate).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import AutoModelForCausalLM

from piston import LLM, SamplingParams
from piston.model_resolver import resolve_model


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompt")
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    llm = LLM(args.model)
    [out] = llm.generate(args.prompt, SamplingParams(temperature=0, max_tokens=args.max_tokens),
                         use_tqdm=False)
    ids = out.prompt_token_ids
    path = resolve_model(args.model)
    if path.endswith(".gguf"):
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=args.max_tokens, do_sample=False)[0, len(ids):]
    tok = llm.get_tokenizer()
    ref_ids = ref.tolist()
    print(f"piston:       {out.outputs[0].text!r}")
    print(f"transformers: {tok.decode(ref_ids, skip_special_tokens=True)!r}")
    same = list(out.outputs[0].token_ids) == ref_ids
    print("identical token ids" if same else f"DIFFERENT: {out.outputs[0].token_ids} vs {ref_ids}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
