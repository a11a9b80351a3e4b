"""Write the tiny benchmark model's folder: a 19M-parameter Llama config with SmolLM2's
tokenizer and no weights, for `--load-format dummy` runs that stress the engine, not the model.

    python benchmarks/tiny_model.py /tmp/piston-tiny19m
    piston bench throughput --model /tmp/piston-tiny19m --load-format dummy \\
        --num-prompts 256 --input-len 128 --output-len 128

4 layers, hidden 256, 4 heads (2 KV heads), MLP 1536, SmolLM2's 49,152-token vocabulary with
tied embeddings: 18.8M parameters, of which the embedding is two thirds, so at 256 running
requests the lm_head and the engine's per-step work dominate, as with any small model.
"""

from __future__ import annotations

import argparse
import json
import os

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=256,
              intermediate_size=1536, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=2, hidden_act="silu", dtype="float32")


def write_tiny_model(folder: str) -> str:
    """The folder with config.json and SmolLM2's tokenizer files (fetched like the default model)."""
    from piston.model_resolver import default_model_path
    from piston.tokenizer import load_tokenizer

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    load_tokenizer(default_model_path()).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    print(write_tiny_model(parser.parse_args().folder))


if __name__ == "__main__":
    main()
