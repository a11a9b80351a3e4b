"""The transformers baseline: the same requests through ``model.generate``, statically batched.

Takes the dataset flags of ``piston bench throughput`` (so both draw identical
requests), runs them in batches of ``--batch-size`` with left padding, greedy, and
exactly the asked output length (min_new_tokens = max_new_tokens, so EOS never ends a
request early), and reports requests/s, tokens/s and the roofline figure counted the
same way as Piston's: useful FLOPs only, padding and the longer outputs a batch pads
its shorter requests to are not work done.

    python benchmarks/hf_baseline.py --input-len 144 --range-ratio 0.78 --output-len 96 \
        --output-range-ratio 0 --num-prompts 64 --output-json hf.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch
from piston.bench import describe_model, engine_threads, run_metadata, write_json
from piston.bench.datasets import SampleRequest, add_dataset_args, sample_requests
from piston.bench.throughput import add_report_args, print_summary, throughput_figures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="HF folder or .gguf file "
                        "(default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda)")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                        help="dummy: random weights from config.json alone (as Piston's --load-format dummy)")
    add_dataset_args(parser, num_prompts=64)
    add_report_args(parser)
    return parser.parse_args(argv)


def load_model(path: str, dtype: torch.dtype, device: str = "cpu", load_format: str = "auto"):
    """transformers' model for a folder or a .gguf file (dequantized to ``dtype``) on
    ``device``; ``load_format="dummy"``: random weights in the folder's config's shapes,
    drawn on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if load_format == "dummy":
        config = AutoConfig.from_pretrained(path)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif path.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                     gguf_file=os.path.basename(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def generate_batch(model, batch: list[list[int]], max_new: int, pad_id: int) -> int:
    """Greedy-generate exactly ``max_new`` tokens for each left-padded prompt; returns the
    number of tokens generated (batch size x max_new)."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    input_ids, mask = input_ids.to(model.device), mask.to(model.device)
    out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=pad_id)
    return int(out.numel() - input_ids.numel())


def main(argv: list[str] | None = None) -> int:
    import transformers
    from piston.bench import roofline
    from piston.model_resolver import resolve_model
    from piston.tokenizer import load_tokenizer

    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(engine_threads())
    path = resolve_model(args.model)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    t0 = time.perf_counter()
    model = load_model(path, dtype[args.dtype], args.device, args.load_format)
    tokenizer = load_tokenizer(path)  # the tokenizer Piston uses, so the requests match
    startup_s = time.perf_counter() - t0
    requests: list[SampleRequest] = sample_requests(args, tokenizer)
    prompts = [r.prompt if isinstance(r.prompt, list) else tokenizer(r.prompt).input_ids
               for r in requests]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    with torch.inference_mode():
        generate_batch(model, prompts[:1], 2, pad_id)  # warm-up, as Piston gets one
        generated = 0
        t0 = time.perf_counter()
        for start in range(0, len(prompts), args.batch_size):
            batch = slice(start, start + args.batch_size)
            max_new = max(r.expected_output_len for r in requests[batch])
            generated += generate_batch(model, prompts[batch], max_new, pad_id)
            print(f"batch {start // args.batch_size + 1}: {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
        elapsed = time.perf_counter() - t0
    hf_config = model.config
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    ceilings = roofline.measure_ceilings(args.dtype, args.calibration_seconds, args.device)

    prompt_lens = [len(p) for p in prompts]
    output_lens = [r.expected_output_len for r in requests]
    results = throughput_figures(hf_config, args.dtype, prompt_lens, output_lens, elapsed,
                                 ceilings)
    results.update(startup_s=startup_s, batch_size=args.batch_size, generated_tokens=generated,
                   padded_output_fraction=1 - sum(output_lens) / max(generated, 1))
    info = SimpleNamespace(model=args.model or path, path=path, dtype=args.dtype,
                           hf_config=hf_config)
    report = {**run_metadata("hf_baseline", args), "model": describe_model(info),
              "transformers": transformers.__version__, "results": results}
    print_summary(f"transformers generate (batch {args.batch_size})", results)
    write_json(args.output_json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
