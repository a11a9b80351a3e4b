"""Hugging Face transformers as the correctness reference: the part that needs torch.

Used in-process when torch is installed, and otherwise run as a server by another
interpreter that has torch (``python tests/reference_impl.py --serve``, driven by
tests/reference.py), so a torch-free test environment (the TPU session) still checks
against transformers.

- ``build_tiny_model(name, folder)``: a seeded random-weight HF model folder (config.json +
  model.safetensors + the SmolLM2 tokenizer), so the engine and transformers load the very
  same complete local folder.
- ``greedy(path, prompt_ids, max_new_tokens)``: new token ids and the full raw
  log-probability matrix [new tokens, vocab] of HF greedy generation, prompt run alone.
- ``prompt_logprobs(path, prompt_ids)``: teacher-forced raw log-probabilities.
- ``config(path)``: the model's config as transformers reads it, as a dict.
- ``constrained_greedy(path, prompt_ids, max_new_tokens, constraint, engine)``: HF greedy
  decoding with a grammar engine (llguidance or xgrammar, used directly, not through
  Piston) masking the logits: new token ids, and the gap between the best two allowed
  logits at each step.
- ``build_peft_adapter(model_dir, folder, rank, alpha, seed, ...)``: a seeded random PEFT
  LoRA adapter for a model, saved by peft itself, with lora_B scaled up so that it changes
  greedy output.
- ``peft_greedy(model_dir, adapter_dir, prompt_ids, max_new_tokens)``: greedy decoding by
  transformers with that adapter applied by peft (None: the base model): new token ids
  (no EOS stop) and their raw log-probabilities [new tokens, vocab].
"""

from __future__ import annotations

import functools
import json
import os
import sys

import numpy as np
import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Random weights give near-flat next-token distributions in which float32 noise can
# swap the argmax. A large init std plus a final-norm gain spreads the logits (std ~10)
# so greedy margins are wide enough to compare tokens exactly.
_INIT_STD = 0.3
_FINAL_NORM_GAIN = 4.0

_SHARED = dict(
    vocab_size=49152,  # the SmolLM2 tokenizer's, so its files can live in the same folder
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=_INIT_STD,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    dtype="float32",
)

# name -> (transformers config class name, overrides). Each one exercises a model
# feature the engine implements separately. Weights are seeded by TINY_MODEL_SEEDS.
TINY_MODEL_SPECS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=3)),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "llama3-rope-scaling": (
        "LlamaConfig",
        dict(
            hidden_size=128,
            head_dim=32,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=128,
            ),
        ),
    ),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=3)),  # q/k/v projections carry a bias
    "qwen3": ("Qwen3Config", dict(head_dim=32, num_hidden_layers=4)),  # per-head q/k RMSNorm
    # One KV head: with tensor parallelism it cannot be split, so every rank replicates it.
    "llama-mqa": ("LlamaConfig", dict(num_key_value_heads=1)),
    # 3 KV heads (and an odd MLP width) over 2 ranks: split 2 + 1, as SmolLM2's 3 KV heads are.
    "llama-uneven": ("LlamaConfig", dict(hidden_size=96, head_dim=16, num_attention_heads=6,
                                         num_key_value_heads=3, intermediate_size=130)),
    # Rows of 256 values: what the GGUF K-quants (super-blocks of 256) need (tests/gguf_models.py);
    # half the init std, so four times the width gives logits of the same spread.
    "llama-256": ("LlamaConfig", dict(hidden_size=256, intermediate_size=512, initializer_range=_INIT_STD / 2)),
    # "llama" with other weights (another seed): a second checkpoint for weight updates.
    "llama-b": ("LlamaConfig", dict(num_hidden_layers=3)),
    # Mixture-of-experts (top-2 routing): Mixtral renormalizes the top-k weights; Qwen3-MoE
    # (q/k norm) too, with a dense layer 1 (mlp_only_layers); Qwen2-MoE does not, and has a
    # gated shared expert and sparse layers 1 and 3 only (decoder_sparse_step=2). Expert widths
    # are multiples of 4: transformers' grouped GEMM on the CPU takes rows of 16 bytes only.
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=96)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(head_dim=32, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen2-moe": ("Qwen2MoeConfig", dict(num_hidden_layers=4, num_experts=6, num_experts_per_tok=2,
                                         moe_intermediate_size=40, shared_expert_intermediate_size=96,
                                         decoder_sparse_step=2)),
    # Sliding windows shorter than most reference prompts (so blocks fall out of the window):
    # Mistral's on every layer; Gemma 3's local layers around a global one, each kind with its
    # own RoPE, plus Gemma's sandwich and q/k norms, scaled embedding, GeGLU and query scale.
    "mistral-window": ("MistralConfig", dict(sliding_window=9, head_dim=16)),
    "gemma3": ("Gemma3TextConfig", dict(
        head_dim=16, num_hidden_layers=4, sliding_window=12, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    # Architectures Piston runs through the transformers fallback (--model-impl): Phi-3 (fused
    # qkv and gate_up, half the head rotated), OLMo-2 (q/k norm over all heads, norms after
    # attention and MLP), Granite (embedding, residual and attention multipliers, logits
    # divided by logits_scaling), GPT-NeoX (parallel residual, LayerNorm, a quarter rotated, no GQA).
    "phi3": ("Phi3Config", dict(partial_rotary_factor=0.5)),
    "olmo2": ("Olmo2Config", dict()),
    "granite": ("GraniteConfig", dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                                      logits_scaling=4.0)),
    "gpt-neox": ("GPTNeoXConfig", dict(num_key_value_heads=None, rotary_pct=0.25, use_parallel_residual=True)),
}
# Seeds whose greedy paths on the reference prompts have no near-ties (top-2 gap > 1e-3).
TINY_MODEL_SEEDS = {**{name: 0 for name in TINY_MODEL_SPECS}, "llama-tied": 3, "llama-b": 1}


@functools.lru_cache(maxsize=2)
def load_tokenizer(gguf_path: str):
    """The tokenizer as transformers loads it from the GGUF file (adds no BOS)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


def _randomize_norms_and_biases(model) -> None:
    """HF initialises norms to 1 and biases to 0, which would hide an engine that never
    loads them; give them random values too (seeded by the caller)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, _INIT_STD)
        base = model.base_model
        (base.norm if hasattr(base, "norm") else base.final_layer_norm).weight.mul_(_FINAL_NORM_GAIN)


def build_tiny_model(name: str, folder: str, tokenizer_gguf: str) -> str:
    """Write a seeded random-weight model ``name`` (see TINY_MODEL_SPECS) as an HF folder,
    with the tokenizer of the GGUF file ``tokenizer_gguf``."""
    import transformers

    cls_name, overrides = TINY_MODEL_SPECS[name]
    config = getattr(transformers, cls_name)(**{**_SHARED, **overrides})
    torch.manual_seed(TINY_MODEL_SEEDS[name])
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_norms_and_biases(model)
    model.generation_config.eos_token_id = _SHARED["eos_token_id"]
    model.generation_config.pad_token_id = _SHARED["pad_token_id"]
    model.save_pretrained(folder, safe_serialization=True)
    load_tokenizer(tokenizer_gguf).save_pretrained(folder)
    return str(folder)


def build_truncated_model(src: str, folder: str, num_layers: int, tokenizer_gguf: str) -> str:
    """Write the first ``num_layers`` decoder layers of the model ``src`` (an HF folder or a
    .gguf file), with its embeddings, final norm and head, as an HF folder in float32: a
    draft model that shares the source's vocabulary and partly agrees with it."""
    import copy

    import transformers

    model = load_hf_model(src)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    draft = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, _ = draft.load_state_dict(model.state_dict(), strict=False)
    assert not missing, missing
    draft.generation_config = copy.deepcopy(model.generation_config)
    draft.save_pretrained(folder, safe_serialization=True)
    load_tokenizer(tokenizer_gguf).save_pretrained(folder)
    return str(folder)


def _target_config(target: str) -> dict:
    """The target's config.json as a dict (a .gguf file's as transformers reads it)."""
    import json

    if target.endswith(".gguf"):
        return {k: v for k, v in config(target).items() if not k.startswith("_")}
    with open(os.path.join(target, "config.json")) as f:
        return json.load(f)


def build_eagle_head(target: str, folder: str, num_layers: int, fc_bias: bool, seed: int) -> str:
    """Write a seeded random EAGLE-1 head for the model ``target`` (a folder or .gguf) in the published
    layout: a Llama config.json of ``num_layers`` layers and safetensors with ``fc.*`` and
    ``layers.N.*`` (no input norm in layer 0, no final norm, no embedding or head)."""
    import json

    from safetensors.torch import save_file

    config = _target_config(target)
    config.update(num_hidden_layers=num_layers, architectures=["LlamaForCausalLM"])
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.08):
        return (torch.randn(*shape, generator=gen) * std).contiguous()

    tensors = {"fc.weight": rand(h, 2 * h)}
    if fc_bias:
        tensors["fc.bias"] = rand(h)
    for i in range(num_layers):
        p = f"layers.{i}."
        tensors.update({p + "self_attn.q_proj.weight": rand(heads * head_dim, h),
                        p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, h),
                        p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, h),
                        p + "self_attn.o_proj.weight": rand(h, heads * head_dim),
                        p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
                        p + "mlp.down_proj.weight": rand(h, inter),
                        p + "post_attention_layernorm.weight": 1 + rand(h, std=0.1)})
        if i:
            tensors[p + "input_layernorm.weight"] = 1 + rand(h, std=0.1)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


def eagle_reference(target: str, head: str, token_ids: list[int]) -> np.ndarray:
    """An EAGLE-1 head's features for ``token_ids`` [T] by transformers' modules: position p
    reads the embedding of token p + 1 and the target's last hidden state at p (T - 1
    positions). Returns [T - 1, hidden] float32."""
    import json

    import transformers
    from safetensors.torch import load_file

    model = load_hf_model(target)
    config = transformers.LlamaConfig(**{k: v for k, v in json.loads(open(os.path.join(head, "config.json")).read())
                                         .items() if k != "architectures"})
    eagle = transformers.LlamaModel(config).to(torch.float32).eval()
    weights = load_file(os.path.join(head, "model.safetensors"))
    fc = torch.nn.Linear(2 * config.hidden_size, config.hidden_size, bias="fc.bias" in weights)
    fc.load_state_dict({k[3:]: v for k, v in weights.items() if k.startswith("fc.")})
    missing, _ = eagle.load_state_dict({k: v for k, v in weights.items() if not k.startswith("fc.")}, strict=False)
    assert set(missing) == {"embed_tokens.weight", "norm.weight", "layers.0.input_layernorm.weight"}, missing
    eagle.layers[0].input_layernorm = torch.nn.Identity()
    eagle.norm = torch.nn.Identity()
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        features = model.model(input_ids=ids).last_hidden_state[:, :-1]
        x = fc(torch.cat([model.model.embed_tokens(ids[:, 1:]), features], dim=-1))
        out = eagle(inputs_embeds=x, position_ids=torch.arange(len(token_ids) - 1)[None]).last_hidden_state
    return out[0].float().numpy()


def build_eagle3_head(target: str, folder: str, draft_vocab: int, norm_before_residual: bool,
                      own_embedding: bool, aux_ids: list[int] | None, seed: int) -> str:
    """Write a seeded random EAGLE-3 head for ``target`` in the published layout: a Llama
    config.json (1 layer, ``draft_vocab_size``) and safetensors with ``midlayer.*`` (q/k/v
    reading 2h values, ``hidden_norm``), ``fc.weight`` [h, 3h], ``norm.weight``,
    ``lm_head.weight`` [draft_vocab, h], ``d2t`` and ``t2d`` (a random draft vocabulary)."""
    import json

    from safetensors.torch import save_file

    config = _target_config(target)
    config.update(num_hidden_layers=1, architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=draft_vocab,
                  norm_before_residual=norm_before_residual)
    if aux_ids is not None:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux_ids, "use_aux_hidden_state": True}
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.08):
        return (torch.randn(*shape, generator=gen) * std).contiguous()

    chosen = torch.sort(torch.randperm(vocab, generator=gen)[:draft_vocab]).values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[chosen] = True
    tensors = {"fc.weight": rand(h, 3 * h), "norm.weight": 1 + rand(h, std=0.1), "lm_head.weight": rand(draft_vocab, h),
               "d2t": (chosen - torch.arange(draft_vocab)).to(torch.int64), "t2d": t2d,
               "midlayer.self_attn.q_proj.weight": rand(heads * head_dim, 2 * h),
               "midlayer.self_attn.k_proj.weight": rand(kv_heads * head_dim, 2 * h),
               "midlayer.self_attn.v_proj.weight": rand(kv_heads * head_dim, 2 * h),
               "midlayer.self_attn.o_proj.weight": rand(h, heads * head_dim),
               "midlayer.mlp.gate_proj.weight": rand(inter, h), "midlayer.mlp.up_proj.weight": rand(inter, h),
               "midlayer.mlp.down_proj.weight": rand(h, inter),
               "midlayer.input_layernorm.weight": 1 + rand(h, std=0.1),
               "midlayer.hidden_norm.weight": 1 + rand(h, std=0.1),
               "midlayer.post_attention_layernorm.weight": 1 + rand(h, std=0.1)}
    if own_embedding:
        tensors["embed_tokens.weight"] = rand(vocab, h, std=0.5)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


def eagle3_reference(target: str, head: str, token_ids: list[int]) -> tuple[list[int], np.ndarray]:
    """An EAGLE-3 head's first pass over ``token_ids`` [T] in plain torch: position p reads
    token p + 1 and the target's hidden states entering its three aux layers at p
    (transformers' ``hidden_states[j]``). Returns (the greedy target-vocabulary token at each
    of the T - 1 positions, the head's outputs before its final norm [T - 1, hidden])."""
    import json

    from safetensors.torch import load_file
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    model = load_hf_model(target)
    config_dict = json.loads(open(os.path.join(head, "config.json")).read())
    w = load_file(os.path.join(head, "model.safetensors"))
    eps = config_dict["rms_norm_eps"]
    n_layers = model.config.num_hidden_layers
    ids_aux = (config_dict.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") or [
        2, n_layers // 2, n_layers - 3]

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    ids = torch.tensor([token_ids])
    t = len(token_ids) - 1
    with torch.no_grad():
        hs = model.model(input_ids=ids, output_hidden_states=True).hidden_states
        feat = torch.cat([hs[i][0, :-1] for i in ids_aux], dim=-1) @ w["fc.weight"].T
        embed = w["embed_tokens.weight"] if "embed_tokens.weight" in w else model.model.embed_tokens.weight
        e = rms(embed[ids[0, 1:]], w["midlayer.input_layernorm.weight"])
        if config_dict["norm_before_residual"]:
            hn = rms(feat, w["midlayer.hidden_norm.weight"])
            res = hn
        else:
            res, hn = feat, rms(feat, w["midlayer.hidden_norm.weight"])
        x = torch.cat([e, hn], dim=-1)
        heads, kvh = config_dict["num_attention_heads"], config_dict["num_key_value_heads"]
        d = config_dict.get("head_dim") or config_dict["hidden_size"] // heads
        q = (x @ w["midlayer.self_attn.q_proj.weight"].T).view(t, heads, d).transpose(0, 1)[None]
        k = (x @ w["midlayer.self_attn.k_proj.weight"].T).view(t, kvh, d).transpose(0, 1)[None]
        v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(t, kvh, d).transpose(0, 1)[None]
        cos, sin = LlamaRotaryEmbedding(model.config)(x[None], torch.arange(t)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(heads // kvh, dim=1), v.repeat_interleave(heads // kvh, dim=1)
        scores = (q @ k.transpose(-1, -2)) * d ** -0.5 + torch.triu(torch.full((t, t), float("-inf")), 1)
        o = (scores.softmax(-1) @ v)[0].transpose(0, 1).reshape(t, heads * d) @ w["midlayer.self_attn.o_proj.weight"].T
        res = o + res
        hm = rms(res, w["midlayer.post_attention_layernorm.weight"])
        gate, up = hm @ w["midlayer.mlp.gate_proj.weight"].T, hm @ w["midlayer.mlp.up_proj.weight"].T
        m = (torch.nn.functional.silu(gate) * up) @ w["midlayer.mlp.down_proj.weight"].T
        out = m + res
        draft = (rms(out, w["norm.weight"]) @ w["lm_head.weight"].T).argmax(-1)
    return (draft + w["d2t"][draft]).tolist(), out.float().numpy()


@functools.lru_cache(maxsize=4)
def load_hf_model(model_dir_or_gguf: str):
    """A float32 transformers model from an HF folder or a .gguf file (cached)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    path = model_dir_or_gguf
    if path.endswith(".gguf"):
        path, kwargs["gguf_file"] = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.eval()


def greedy(path: str, prompt: list[int], max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """HF greedy generation of one prompt: new token ids (EOS included when generated) and
    their raw log-probabilities [new tokens, vocab] (float32)."""
    from transformers import GenerationConfig

    model = load_hf_model(path)
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                              pad_token_id=pad if pad is not None else eos, output_logits=True,
                              return_dict_in_generate=True)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), generation_config=config)
    new_ids = out.sequences[0, len(prompt):].tolist()
    full = torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1)
    assert full.shape[0] == len(new_ids)
    return new_ids, full.numpy()


def _guidance_grammar(constraint: dict) -> str:
    """An llguidance grammar for {"json"|"regex"|"choice"|"grammar": value}; JSON laid out
    with no free whitespace, ", " and ": " (as Piston's engines lay it out)."""
    from llguidance import LLMatcher, grammar_from

    [(kind, value)] = constraint.items()
    if kind == "json":
        layout = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        return LLMatcher.grammar_from_json_schema(json.dumps(value), defaults=layout)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        return grammar_from("choice", json.dumps(value))
    return grammar_from("grammar", value)


def constrained_greedy(path: str, prompt: list[int], max_new_tokens: int, constraint: dict,
                       engine: str = "guidance") -> tuple[list[int], np.ndarray]:
    """Greedy generation with the grammar's disallowed tokens masked out of the logits, one
    token at a time, the grammar engine (``guidance``: llguidance, or ``xgrammar``) used
    directly: new ids (the EOS that ends the grammar included) and, per step, the gap
    between the two best allowed logits (for near-tie checks)."""
    model = load_hf_model(path)
    hf_tokenizer = load_tokenizer(path) if path.endswith(".gguf") else _folder_tokenizer(path)
    vocab = model.config.vocab_size
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    allowed_next, accept = (_xgrammar_matcher if engine == "xgrammar" else _guidance_matcher)(
        hf_tokenizer, vocab, constraint)
    ids, gaps, past, step_input = [], [], None, torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = model(step_input, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1].float().numpy()
            masked = np.where(allowed_next(), logits, -np.inf)
            top2 = np.sort(masked)[-2:]
            token = int(np.argmax(masked))
            ids.append(token)
            gaps.append(float(top2[1] - top2[0]) if np.isfinite(top2[0]) else np.inf)
            if token == eos:
                break
            accept(token)
            step_input = torch.tensor([[token]])
    return ids, np.array(gaps, dtype=np.float32)


PEFT_LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _fresh_hf_model(model_dir_or_gguf: str):
    """A float32 transformers model of its own (peft wraps models in place, so never the
    cached ``load_hf_model`` one), whose generate() does not stop at EOS."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    path = model_dir_or_gguf
    if path.endswith(".gguf"):
        path, kwargs["gguf_file"] = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    # generate() fills the settings a GenerationConfig leaves None from the model's own.
    model.generation_config.eos_token_id = None
    return model


def build_peft_adapter(model_dir: str, folder: str, rank: int, alpha: float, seed: int,
                       target_modules: list[str] | None = None, use_rslora: bool = False,
                       scale_b: float = 20.0) -> str:
    """Write a seeded random PEFT LoRA adapter for the model ``model_dir`` (an HF folder or a
    .gguf file) with ``PeftModel.save_pretrained``: rank ``rank``, ``lora_alpha=alpha``, on
    ``target_modules`` (default: q/k/v/o and gate/up/down). Every lora_A and lora_B gets
    nn.Linear's default init (uniform +-1/sqrt(fan_in)) from a generator seeded by ``seed``
    (peft's own random init, init_lora_weights=False, is reseeded so the adapter does not
    depend on peft's init order), then lora_B is multiplied by ``scale_b``: a trained-looking
    adapter is far too weak to move a random model's greedy tokens, this one does."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules or PEFT_LORA_MODULES),
                        init_lora_weights=False, use_rslora=use_rslora, lora_dropout=0.0, bias="none")
    model = get_peft_model(_fresh_hf_model(model_dir), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                bound = 1.0 / param.shape[1] ** 0.5
                param.copy_((torch.rand(param.shape, generator=gen) * 2 - 1) * bound)
                if ".lora_B." in name:
                    param.mul_(scale_b)
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


@functools.lru_cache(maxsize=4)
def _peft_model(model_dir_or_gguf: str, adapter_dir: str | None):
    """The base model with the adapter applied by peft (not merged), or the base alone."""
    model = _fresh_hf_model(model_dir_or_gguf)
    if adapter_dir is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).eval()


def peft_greedy(model_dir: str, adapter_dir: str | None, prompt: list[int],
                max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding of one prompt by transformers with the PEFT adapter ``adapter_dir``
    (None: the base model), float32, exactly ``max_new_tokens`` tokens (EOS does not stop
    it): new token ids and their raw log-probabilities [max_new_tokens, vocab]."""
    from transformers import GenerationConfig

    model = _peft_model(model_dir, adapter_dir)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                              pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ids = torch.tensor([list(prompt)])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    new_ids = out.sequences[0, len(prompt):].tolist()
    assert len(new_ids) == max_new_tokens, f"generation stopped after {len(new_ids)} tokens"
    return new_ids, torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1).numpy()


def _unpack(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    return np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:vocab].astype(bool)


def _guidance_matcher(hf_tokenizer, vocab: int, constraint: dict):
    import llguidance
    import llguidance.hf
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab),
                                   _guidance_grammar(constraint))
    assert not matcher.is_error(), matcher.get_error()
    bitmask = allocate_token_bitmask(1, vocab)

    def allowed_next():
        fill_next_token_bitmask(matcher, bitmask, 0)
        return _unpack(bitmask[0], vocab)

    def accept(token):
        assert matcher.consume_token(token), matcher.get_error()

    return allowed_next, accept


def _xgrammar_matcher(hf_tokenizer, vocab: int, constraint: dict):
    """xgrammar with JSON laid out as above (any_whitespace=False: ", " and ": ")."""
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab))
    [(kind, value)] = constraint.items()
    if kind == "json":
        compiled = compiler.compile_json_schema(json.dumps(value), any_whitespace=False)
    elif kind == "regex":
        compiled = compiler.compile_regex(value)
    elif kind == "choice":
        compiled = compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in value))
    else:
        compiled = compiler.compile_grammar(value)
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)

    def allowed_next():
        matcher.fill_next_token_bitmask(bitmask, 0)
        return _unpack(bitmask[0].numpy(), vocab)

    def accept(token):
        assert matcher.accept_token(token)

    return allowed_next, accept


@functools.lru_cache(maxsize=2)
def _folder_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def prompt_logprobs(path: str, prompt: list[int]) -> np.ndarray:
    """Teacher-forced raw log-probabilities: row i is the distribution of prompt token i+1."""
    model = load_hf_model(path)
    with torch.inference_mode():
        logits = model(torch.tensor([list(prompt)])).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def config(path: str) -> dict:
    """The model's config as transformers reads it (HF folder or .gguf file)."""
    return load_hf_model(path).config.to_dict()


def serve() -> None:
    """JSON lines on stdin -> JSON lines on stdout; arrays go through .npy files.

    Request: {"call": name, "args": [...], "out": path-or-null}; a returned array is saved
    to ``out`` and the reply says so. Reply: {"result": ...} or {"error": text}.
    """
    calls = {"build_tiny_model": build_tiny_model, "build_truncated_model": build_truncated_model,
             "build_eagle_head": build_eagle_head, "eagle_reference": eagle_reference,
             "build_eagle3_head": build_eagle3_head, "eagle3_reference": eagle3_reference, "greedy": greedy,
             "prompt_logprobs": prompt_logprobs,
             "config": config, "constrained_greedy": constrained_greedy,
             "build_peft_adapter": build_peft_adapter, "peft_greedy": peft_greedy}
    reply_stream = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the protocol
    for line in sys.stdin:
        request = json.loads(line)
        try:
            result = calls[request["call"]](*request["args"])
            if isinstance(result, tuple):
                ids, array = result
                np.save(request["out"], array)
                result = ids
            elif isinstance(result, np.ndarray):
                np.save(request["out"], result)
                result = None
            reply = {"result": result}
        except Exception as e:  # handed back to the test that asked
            reply = {"error": f"{type(e).__name__}: {e}"}
        reply_stream.write(json.dumps(reply) + "\n")
        reply_stream.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    serve()
