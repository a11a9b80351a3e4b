"""Mixture-of-experts models (Mixtral, Qwen3-MoE, Qwen2-MoE) match transformers.

- Greedy tokens of each tiny MoE model (reference_impl.TINY_MODEL_SPECS: top-2 of 4 to 8
  experts; Qwen's dense layers and Qwen2-MoE's gated shared expert) equal transformers'
  in float32 on the reference prompts, batched.
- The fused MoE layer equals a per-token, per-expert loop when the routing is uneven
  (idle experts, one expert taking most pairs), on torch's grouped GEMM and on the padded
  batched fallback.
- Both checkpoint forms load: transformers 5's ``save_pretrained`` writes the experts one
  by one (Mixtral's ``w1``/``w2``/``w3``, Qwen's ``gate_proj``/``up_proj``/``down_proj``),
  and its in-memory state dict holds them fused (``experts.gate_up_proj``/``down_proj``).
  A checkpoint that lacks an expert or disagrees with the config is a named error. Under
  tensor parallelism each rank takes its rows of every expert's width from either form.

The greedy test runs on every platform (the TPU plugin's JAX MoE: piston_tpu.moe); the
others test the torch layers and skip on the TPU platform, whose environment has no torch.
"""

from __future__ import annotations

import os

import pytest
from hf_reference import REFERENCE_PROMPTS, assert_no_near_ties, hf_greedy

from piston import SamplingParams
from piston.hal.registry import get_platform

MAX_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
# On the TPU plugin each model compiles its own programs (about 15 s each on JAX's CPU
# backend): Qwen2-MoE (shared expert, dense layers, no renormalisation) runs in the default
# suite there, Mixtral and Qwen3-MoE in the slow session.
_SLOW_ON_TPU = [pytest.mark.slow] if os.environ.get("PISTON_PLATFORM") == "tpu" else []
MOE_MODELS = [pytest.param("mixtral", marks=_SLOW_ON_TPU), pytest.param("qwen3-moe", marks=_SLOW_ON_TPU),
              "qwen2-moe"]


@pytest.fixture
def torch_layers():
    """Skips a test of the torch MoE layers on the TPU platform (JAX models, no torch)."""
    if get_platform(None).name == "tpu":
        pytest.skip("tests the torch MoE layers; the TPU platform's are JAX (piston_tpu.moe)")


@pytest.mark.parametrize("name", MOE_MODELS)
def test_moe_greedy_matches_hf(name, tiny_models, make_llm, smollm2_tokenizer):
    path = tiny_models(name)
    prompt_ids = [smollm2_tokenizer(p).input_ids for p in REFERENCE_PROMPTS]
    reference = hf_greedy(path, prompt_ids, MAX_TOKENS)
    assert_no_near_ties(reference)

    llm = make_llm(path, max_model_len=1024, kv_cache_memory="64MiB", seed=0, dtype="float32")
    outputs = llm.generate(REFERENCE_PROMPTS, GREEDY, use_tqdm=False)
    for i, (out, ids, ref) in enumerate(zip(outputs, prompt_ids, reference)):
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == ref.token_ids, f"prompt {i}: {REFERENCE_PROMPTS[i]!r:.60}"


def _naive_moe(x, router_logits, w13, w2, top_k, renormalize):
    """Each token through each of its top-k experts, one at a time, in float64."""
    import torch
    import torch.nn.functional as F

    probs = torch.softmax(router_logits.double(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    x, w13, w2 = x.double(), w13.double(), w2.double()
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = int(ids[t, j])
            h = w13[e] @ x[t]
            out[t] += weights[t, j] * (w2[e] @ (F.silu(h[:inter]) * h[inter:]))
    return out, ids


@pytest.mark.parametrize("hidden,inter", [(64, 24), (40, 45)])  # (40, 45): rows not 16-byte multiples
def test_fused_moe_matches_per_expert_loop_with_idle_experts(hidden, inter, torch_layers):
    import torch
    from piston.models.layers.fused_moe import FusedMoE

    num_experts, top_k, tokens = 8, 2, 37
    gen = torch.Generator().manual_seed(0)
    layer = FusedMoE(num_experts, top_k, hidden, inter, renormalize=True)
    with torch.no_grad():
        layer.w13.weight.copy_(torch.randn(layer.w13.weight.shape, generator=gen) / hidden ** 0.5)
        layer.w2.weight.copy_(torch.randn(layer.w2.weight.shape, generator=gen) / inter ** 0.5)
    x = torch.randn(tokens, hidden, generator=gen)
    logits = torch.randn(tokens, num_experts, generator=gen)
    logits[:, [1, 5, 6]] = -30.0  # never chosen
    logits[:30, 2] += 8.0  # expert 2 takes most tokens
    expected, ids = _naive_moe(x, logits, layer.w13.weight, layer.w2.weight, top_k, True)
    counts = torch.bincount(ids.flatten(), minlength=num_experts)
    assert counts[[1, 5, 6]].sum() == 0 and counts[2] >= 30 and (counts > 0).sum() >= 3
    with torch.no_grad():
        got = layer(x, logits)
        no_renorm = FusedMoE(num_experts, top_k, hidden, inter, renormalize=False)
        no_renorm.load_state_dict(layer.state_dict())
        got_plain = no_renorm(x, logits)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    plain, _ = _naive_moe(x, logits, layer.w13.weight, layer.w2.weight, top_k, False)
    torch.testing.assert_close(got_plain.double(), plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got_plain, got)  # the renormalization matters here


def _load_into_new_model(path, weights):
    from piston.models.registry import get_model_class
    from piston.step.hf_config import load_hf_config

    config = load_hf_config(path)
    model = get_model_class(config)(config)
    model.load_weights(weights)
    return model.eval()


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe"])
def test_moe_loads_per_expert_and_fused_checkpoints(name, tiny_models, torch_layers):
    """The saved folder holds the experts one by one; transformers' in-memory state dict holds
    them fused. Both fill the same weights, and the logits equal transformers'."""
    import torch
    from piston.models.weight_loader import iterate_safetensors
    from reference_impl import load_hf_model

    path = tiny_models(name)
    hf = load_hf_model(path)
    state = hf.state_dict()
    assert any(n.endswith("experts.gate_up_proj") for n in state)
    assert not any(n.endswith("experts.gate_up_proj") for n, _ in iterate_safetensors(path, lazy=True))
    per_expert = _load_into_new_model(path, iterate_safetensors(path, lazy=True))  # lazy slices, as the engine
    fused = _load_into_new_model(path, state.items())
    for (n, a), (_, b) in zip(per_expert.named_parameters(), fused.named_parameters()):
        assert torch.equal(a, b), n
    ids = torch.randint(0, hf.config.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids[None]).logits[0]
        got = fused.compute_logits(fused(ids, torch.arange(len(ids))))
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)  # logits of about +-50


def test_moe_checkpoint_errors_name_the_weights(tiny_models, torch_layers):
    from reference_impl import load_hf_model

    path = tiny_models("qwen2-moe")
    state = load_hf_model(path).state_dict()
    per_expert = {}
    for n, t in state.items():  # the saved form of layer 1's experts, the rest fused
        if n == "model.layers.1.mlp.experts.gate_up_proj":
            for e in range(t.shape[0]):
                gate, up = t[e].chunk(2)
                per_expert[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"] = gate
                per_expert[f"model.layers.1.mlp.experts.{e}.up_proj.weight"] = up
        elif n == "model.layers.1.mlp.experts.down_proj":
            per_expert.update({f"model.layers.1.mlp.experts.{e}.down_proj.weight": t[e] for e in range(t.shape[0])})
        else:
            per_expert[n] = t
    _load_into_new_model(path, per_expert.items())  # the two forms mixed: complete

    missing = {n: t for n, t in per_expert.items() if n != "model.layers.1.mlp.experts.3.up_proj.weight"}
    with pytest.raises(ValueError, match=r"does not provide 1 .*model\.layers\.1\.mlp\.experts\.w13\.weight"):
        _load_into_new_model(path, missing.items())
    extra = {**per_expert, "model.layers.1.mlp.experts.6.down_proj.weight": per_expert[
        "model.layers.1.mlp.experts.0.down_proj.weight"]}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.w2: .*expert 6.*config has 6 experts"):
        _load_into_new_model(path, extra.items())
    wide = {**per_expert, "model.layers.3.mlp.experts.gate_up_proj": state[
        "model.layers.3.mlp.experts.gate_up_proj"][:, :-2]}
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.experts\.w13: .*fused tensor has shape"):
        _load_into_new_model(path, wide.items())


def test_expert_weights_split_unevenly_over_ranks(monkeypatch, torch_layers):
    """Each rank of 2 keeps its rows of an expert width of 45 (23 + 22), from either form."""
    import torch
    from piston.models.layers import fused_moe

    num_experts, hidden, inter = 3, 16, 45
    gen = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(num_experts, 2 * inter, hidden, generator=gen), \
        torch.randn(num_experts, hidden, inter, generator=gen)
    shards = []
    for rank in range(2):
        monkeypatch.setattr(fused_moe, "get_tp_rank", lambda rank=rank: rank)
        monkeypatch.setattr(fused_moe, "get_tp_size", lambda: 2)
        forms = []
        for fused in (True, False):
            w13 = fused_moe.ExpertWeight(num_experts, hidden, inter, True, "w13")
            w2 = fused_moe.ExpertWeight(num_experts, hidden, inter, False, "w2")
            if fused:
                w13.load("weight", gate_up, fused_moe.FUSED)
                w2.load("weight", down, fused_moe.FUSED)
            else:
                for e in range(num_experts):
                    w13.load("weight", gate_up[e, :inter], (e, 0))
                    w13.load("weight", gate_up[e, inter:], (e, 1))
                    w2.load("weight", down[e], e)
            forms.append((w13.weight.detach().clone(), w2.weight.detach().clone()))
        assert all(torch.equal(a, b) for a, b in zip(*forms))
        shards.append(forms[0])
    (g0, d0), (g1, d1) = shards
    assert g0.shape == (num_experts, 46, hidden) and g1.shape == (num_experts, 44, hidden)
    assert torch.equal(torch.cat([g0[:, :23], g1[:, :22]], dim=1), gate_up[:, :inter])
    assert torch.equal(torch.cat([g0[:, 23:], g1[:, 22:]], dim=1), gate_up[:, inter:])
    assert torch.equal(torch.cat([d0, d1], dim=2), down)
