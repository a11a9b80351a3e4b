"""The EAGLE-1 head (piston.models.eagle) against transformers' modules on the same weights,
in the published checkpoint layout, and the proposer's EAGLE passes with a fake head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from piston.checkpoint.checkpoint_reader import read_hf_config
from piston.models.eagle import load_eagle_head
from piston.models.loader import load_model
from piston.step.config import ModelConfig, SpeculativeConfig
from piston.step.draft_proposer import DraftModelProposer
from piston.step.input_batch import InputBatch, ScheduledTokens
from piston.step.sampling_params import SamplingParams
from piston.step.scheduler_output import NewRequestData
from reference import reference

TOKENS = [5, 17, 300, 4021, 9, 77, 1200, 45, 8, 610, 2, 33]


def _config(path: str) -> ModelConfig:
    return ModelConfig(model=path, path=path, hf_config=read_hf_config(path), max_model_len=128)


@pytest.mark.parametrize("num_layers,fc_bias", [(1, False), (2, True)])
def test_eagle_head_matches_transformers(tiny_models, tmp_path, num_layers, fc_bias):
    target_path = tiny_models("llama")
    head_path = reference().build_eagle_head(target_path, str(tmp_path / "head"), num_layers, fc_bias, 3)
    target = load_model(_config(target_path))
    head = load_eagle_head(_config(head_path), target, "cpu")
    assert head.fc.bias is not None if fc_bias else head.fc.bias is None
    ids = torch.tensor(TOKENS)
    positions = torch.arange(len(TOKENS))
    with torch.no_grad():
        features = target(ids, positions)[:-1]  # the target's state at p, with the token at p + 1
        out = head(ids[1:], positions[:-1], features)
        logits = head.compute_logits(out)
    expected = reference().eagle_reference(target_path, head_path, TOKENS)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(logits.argmax(-1).numpy(), target.compute_logits(torch.from_numpy(expected))
                                  .argmax(-1).numpy())


def test_a_checkpoint_without_fc_is_not_an_eagle_head(tiny_models):
    path = tiny_models("llama")
    with pytest.raises(ValueError, match="not an EAGLE head"):
        load_eagle_head(_config(path), load_model(_config(path)), "cpu")


# ----- the proposer's EAGLE passes -------------------------------------------------------

VOCAB = 13
BLOCK = 4


def target_next(seq):
    return (sum(seq) * 5 + len(seq)) % VOCAB


class FakeEagle:
    """Feature of a position p: (p, token p + 1); it checks that position p gets the token
    at p + 1 and, in pass 1, the target's feature of p, later its own last output."""

    def __init__(self, batch):
        self.batch = batch
        self.last: np.ndarray | None = None

    def __call__(self, s: ScheduledTokens, hidden, index) -> np.ndarray:
        b = self.batch
        ids = b.token_ids[s.token_rows, s.positions + 1]
        feats = hidden[index] if hidden is not None else self.last[index]
        if hidden is not None:  # the target's state at position p is (row, p)
            np.testing.assert_array_equal(feats, np.stack([s.token_rows, s.positions], 1))
        else:  # the head's output at the position before
            np.testing.assert_array_equal(feats[:, 1], s.positions - 1)
        out = np.stack([s.token_rows, s.positions], 1)[s.logits_indices]
        self.last = out
        seqs = [b.token_ids[r, :p + 2].tolist() for r, p in zip(s.token_rows[s.logits_indices].tolist(),
                                                                  s.positions[s.logits_indices].tolist())]
        assert all(int(ids[i]) == seq[-1] for i, seq in zip(s.logits_indices.tolist(), seqs))
        return np.array([target_next(seq) for seq in seqs], dtype=np.int64)


def test_eagle_passes_read_the_next_token_and_the_right_features():
    batch = InputBatch(4, 64, 16)
    for i, (rid, prompt) in enumerate({"a": [1, 2, 3, 4, 5, 6, 7, 8, 9], "b": [3, 3]}.items()):
        batch.add_request(NewRequestData(rid, prompt, [], SamplingParams(temperature=0.0),
                                         [list(range(16 * i, 16 * i + 16))], 0))
    fake = FakeEagle(batch)
    proposer = DraftModelProposer(SpeculativeConfig(method="eagle", model="h", num_speculative_tokens=3),
                                  fake, BLOCK, 64, 64)
    drafts: dict[str, list[int]] = {}
    for _ in range(6):
        num_sched = {}
        for rid in ("a", "b"):
            row = batch.req_id_to_row[rid]
            left = int(batch.num_tokens[row] - batch.num_computed_tokens[row])
            num_sched[rid] = min(left, 5) if left > 1 else 1 + len(drafts.get(rid, []))
        batch.write_drafts({r: d for r, d in drafts.items() if d})
        scheduled = batch.schedule(num_sched, BLOCK)
        # The target's hidden state of each scheduled token: (row, position).
        hidden = np.stack([scheduled.token_rows, scheduled.positions], 1)
        rows = scheduled.sample_rows
        for row in rows.tolist():
            seq = batch.token_ids[row, :batch.num_tokens[row]].tolist()
            new = []
            for d in drafts.get(batch.req_ids[row], []):
                if d != target_next(seq + new):
                    break
                new.append(d)
            new.append(target_next(seq + new))
            batch.append_token_lists(np.array([row]), [new])
        for row, n in zip(scheduled.rows.tolist(), scheduled.num_scheduled.tolist()):
            batch.num_computed_tokens[row] = min(batch.num_computed_tokens[row] + n, batch.num_tokens[row] - 1)
        proposed = proposer.propose(batch, rows, scheduled, hidden)
        drafts = {batch.req_ids[r]: d for r, d in zip(rows.tolist(), proposed)}
        for r, d in zip(rows.tolist(), proposed):  # the fake head is the target: its drafts are right
            seq = batch.token_ids[r, :batch.num_tokens[r]].tolist()
            expect = []
            for _ in range(3):
                expect.append(target_next(seq + expect))
            assert d == expect


@pytest.mark.parametrize("num_layers,fc_bias", [(1, True), (2, False)])
def test_jax_eagle_head_matches_transformers(tiny_models, tmp_path, num_layers, fc_bias):
    """The TPU plugin's EAGLE head (piston_tpu.model.eagle_forward over the paged cache, with
    weights from load_eagle_params) gives transformers' features."""
    jax = pytest.importorskip("jax")
    from piston.step.rope import rope_tables
    from piston_tpu.attention import make_attention, page_table_multiple
    from piston_tpu.kv_cache import kv_cache_shape
    from piston_tpu.model import LlamaSpec, eagle_forward
    from piston_tpu.step_inputs import StepInputBuilder
    from piston_tpu.weights import load_eagle_params

    target_path = tiny_models("llama")
    head_path = reference().build_eagle_head(target_path, str(tmp_path / "head"), num_layers, fc_bias, 5)
    target = load_model(_config(target_path))
    with torch.no_grad():
        features = target(torch.tensor(TOKENS), torch.arange(len(TOKENS)))[:-1].numpy()
    head = _config(head_path)
    spec = LlamaSpec.from_model_config(head)
    params = load_eagle_params(spec, head, np.dtype(np.float32))
    assert ("fc_bias" in params) == fc_bias
    block, bucket = 16, 16
    batch = InputBatch(2, 64, 4)
    batch.add_request(NewRequestData("a", TOKENS, [], SamplingParams(temperature=0.0), [[0, 1, 2, 3]], 0))
    n = len(TOKENS) - 1
    sched = batch.schedule_spans(np.array([0]), np.array([0]), np.array([n]), np.array([True]), block)
    pages = -(-4 // page_table_multiple(block)) * page_table_multiple(block)
    step = StepInputBuilder(batch, block, 4 * block, 2, pages).build(sched, bucket, token_shift=1)
    tables = rope_tables(head.hf_config, spec.head_dim, 128)
    feats = np.zeros((bucket, spec.hidden_size), np.float32)
    feats[:n] = features
    out, _ = eagle_forward(params, (tables.cos[None], tables.sin[None]), jax.numpy.zeros(kv_cache_shape(
        spec.num_layers, 4, block, spec.num_kv_heads, spec.head_dim), np.float32), step.input_ids, step.positions,
        step.metadata, feats, np.arange(n), target.model.embed_tokens.weight.detach().numpy(), spec=spec,
        attention=make_attention("xla", spec.head_dim ** -0.5, False, block, jax.lax.Precision.HIGHEST),
        rotary_dim=tables.rotary_dim, precision=jax.lax.Precision.HIGHEST)
    expected = reference().eagle_reference(target_path, head_path, TOKENS)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=1e-4)


# ----- EAGLE-3 --------------------------------------------------------------------------

@pytest.mark.parametrize("name,norm_before_residual,own_embedding,aux_ids",
                         [("llama", False, False, None), ("qwen3", True, True, [3, 0, 1])])
def test_eagle3_head_matches_a_reference(name, tiny_models, tmp_path, norm_before_residual, own_embedding, aux_ids):
    """Piston's EAGLE-3 head (piston.models.eagle3), fed the target's aux layers by the target
    model itself, against a plain-torch reference over transformers' hidden states: the same
    outputs, and the same target-vocabulary tokens through the draft vocabulary's d2t."""
    from piston.models.eagle3 import load_eagle3_head

    target_path = tiny_models(name)  # llama: 3 layers, vLLM's default aux layers (2, 1, 0)
    head_path = reference().build_eagle3_head(target_path, str(tmp_path / "head"), 512, norm_before_residual,
                                             own_embedding, aux_ids, 7)
    target = load_model(_config(target_path))
    head = load_eagle3_head(_config(head_path), target, "cpu")
    assert target.model.aux_layers == (tuple(aux_ids) if aux_ids else (2, 1, 0))
    ids = torch.tensor(TOKENS)
    positions = torch.arange(len(TOKENS))
    with torch.no_grad():
        target(ids, positions)
        out = head(ids[1:], positions[:-1], target.model.aux_hidden_states[:-1])
        tokens = head.compute_logits(out).argmax(-1)
    expected_tokens, expected = reference().eagle3_reference(target_path, head_path, TOKENS)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4, rtol=1e-4)
    assert tokens.tolist() == expected_tokens


def test_jax_eagle3_head_matches_a_reference(tiny_models, tmp_path):
    """The TPU plugin's EAGLE-3 path: the target's JAX forward keeps its aux layers' inputs,
    fc fuses them, eagle3_forward and eagle3_tokens give the reference's outputs and tokens."""
    jax = pytest.importorskip("jax")
    from piston.step.rope import rope_tables
    from piston_tpu.attention import make_attention, page_table_multiple
    from piston_tpu.kv_cache import kv_cache_shape
    from piston_tpu.model import LlamaSpec, _linear, eagle3_forward, eagle3_tokens, forward
    from piston_tpu.step_inputs import StepInputBuilder
    from piston_tpu.weights import load_eagle3_params, load_params

    hp = jax.lax.Precision.HIGHEST
    target_path = tiny_models("llama")
    head_path = reference().build_eagle3_head(target_path, str(tmp_path / "head"), 512, True, False, [1, 0, 2], 9)
    target_mc, head_mc = _config(target_path), _config(head_path)
    tspec = LlamaSpec.from_model_config(target_mc)
    hspec = LlamaSpec.from_model_config(head_mc, "LlamaForCausalLM")
    tparams = load_params(tspec, target_mc, np.dtype(np.float32))
    hparams = load_eagle3_params(hspec, head_mc, np.dtype(np.float32))
    block, bucket, n = 16, 16, len(TOKENS)
    pages = -(-4 // page_table_multiple(block)) * page_table_multiple(block)
    batch = InputBatch(2, 64, 4)
    batch.add_request(NewRequestData("a", TOKENS, [], SamplingParams(temperature=0.0), [[0, 1, 2, 3]], 0))
    builder = StepInputBuilder(batch, block, 4 * block, 2, pages)
    attention = make_attention("xla", tspec.head_dim ** -0.5, False, block, hp)
    tables = rope_tables(target_mc.hf_config, tspec.head_dim, 128)
    rope = (tables.cos[None], tables.sin[None])  # [kinds, positions, rotary_dim / 2]

    def cache(spec):
        return jax.numpy.zeros(kv_cache_shape(spec.num_layers, 4, block, spec.num_kv_heads, spec.head_dim),
                               np.float32)

    step = builder.build(batch.schedule_spans(np.array([0]), np.array([0]), np.array([n]), np.array([True]), block),
                         bucket)
    *_, aux = forward(tparams, rope, cache(tspec), step.input_ids, step.positions, step.metadata, np.arange(2),
                      spec=tspec, attention=attention, rotary_dim=tables.rotary_dim, precision=hp,
                      aux_layers=(1, 0, 2))
    features = np.zeros((bucket, hspec.hidden_size), np.float32)
    features[:n - 1] = np.asarray(_linear(aux[:n - 1], hparams["fc"], hp))
    step = builder.build(batch.schedule_spans(np.array([0]), np.array([0]), np.array([n - 1]), np.array([True]),
                                              block), bucket, token_shift=1)
    out, _ = eagle3_forward(hparams, rope, cache(hspec), step.input_ids, step.positions, step.metadata, features,
                            np.arange(n - 1), tparams["embed"], spec=hspec, attention=attention,
                            rotary_dim=tables.rotary_dim, precision=hp, norm_before_residual=True)
    expected_tokens, expected = reference().eagle3_reference(target_path, head_path, TOKENS)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=1e-4)
    assert np.asarray(eagle3_tokens(hparams, out, hspec.rms_norm_eps, hp)).tolist() == expected_tokens
