"""The draft-model proposer's passes, without a model: a fake draft model keeps a KV cache
of the tokens it was run on and checks, every time it drafts, that its cache holds exactly
the sequence it drafts for (so catch-up never skips a token nor reads a stale one), and
the scheduler's lookahead slots for the drafts' own KV."""

from __future__ import annotations

import numpy as np
import pytest
from piston.core.request import Request
from piston.core.scheduler import Scheduler
from piston.step.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from piston.step.draft_proposer import DraftModelProposer
from piston.step.input_batch import InputBatch, ScheduledTokens
from piston.step.sampling_params import SamplingParams
from piston.step.scheduler_output import NewRequestData

VOCAB = 11
BLOCK = 4


def target_next(seq: list[int]) -> int:
    return (sum(seq) * 7 + len(seq)) % VOCAB


def draft_next(seq: list[int]) -> int:
    """Agrees with the target except at every third length."""
    return target_next(seq) if len(seq) % 3 else (target_next(seq) + 1) % VOCAB


class FakeDraft:
    """KV per (row's request, position); drafts from the KV it holds."""

    def __init__(self, batch: InputBatch) -> None:
        self.batch = batch
        self.kv: dict[str, dict[int, int]] = {}
        self.passes: list[int] = []

    def __call__(self, s: ScheduledTokens) -> np.ndarray:
        b = self.batch
        self.passes.append(s.num_tokens)
        for row, pos in zip(s.token_rows.tolist(), s.positions.tolist()):
            assert pos < b.num_blocks[row] * BLOCK, "the draft wrote KV outside its request's blocks"
            self.kv.setdefault(b.req_ids[row], {})[pos] = int(b.token_ids[row, pos])
        out = []
        for i in s.sampling.tolist():
            row, last = int(s.rows[i]), int(s.num_computed[i] + s.num_scheduled[i] - 1)
            kv = self.kv[b.req_ids[row]]
            seq = b.token_ids[row, :last + 1].tolist()
            assert [kv.get(p) for p in range(last + 1)] == seq, "the draft's KV is not the sequence it drafts for"
            out.append(draft_next(seq))
        return np.array(out, dtype=np.int64)


def _add(batch: InputBatch, req_id: str, prompt: list[int], first_block: int, num_blocks: int) -> None:
    batch.add_request(NewRequestData(req_id, prompt, [], SamplingParams(temperature=0.0),
                                     [list(range(first_block, first_block + num_blocks))], 0))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("budget", [5, 64])
def test_draft_kv_follows_every_sequence(k, budget):
    """Three requests prefilled in chunks of at most 6 tokens, then decoded with drafts the
    target accepts in part, with passes cut at ``budget`` tokens: the fake asserts its KV;
    the drafts must be those the draft function gives on the true sequence."""
    batch = InputBatch(4, 64, 16)
    prompts = {"a": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3], "b": [4, 4], "c": [9, 8, 7, 6, 5, 4, 3]}
    for i, (rid, p) in enumerate(prompts.items()):
        _add(batch, rid, p, 16 * i, 16)
    fake = FakeDraft(batch)
    proposer = DraftModelProposer(SpeculativeConfig(method="draft_model", model="d", num_speculative_tokens=k),
                                  fake, BLOCK, 64, budget)
    drafts: dict[str, list[int]] = {}
    accepted = rejected = 0
    for _ in range(20):
        num_sched = {}
        for rid in prompts:
            row = batch.req_id_to_row[rid]
            left = int(batch.num_tokens[row] - batch.num_computed_tokens[row])
            num_sched[rid] = min(left, 6) if left > 1 else 1 + len(drafts.get(rid, []))
        batch.write_drafts({r: d for r, d in drafts.items() if d})
        scheduled = batch.schedule(num_sched, BLOCK)
        rows = scheduled.sample_rows
        for row in rows.tolist():
            rid = batch.req_ids[row]
            seq = batch.token_ids[row, :batch.num_tokens[row]].tolist()
            new = []
            for d in drafts.get(rid, []):
                if d != target_next(seq + new):
                    rejected += 1
                    break
                accepted += 1
                new.append(d)
            new.append(target_next(seq + new))
            batch.append_token_lists(np.array([row]), [new])
        for row, n in zip(scheduled.rows.tolist(), scheduled.num_scheduled.tolist()):
            batch.num_computed_tokens[row] = min(batch.num_computed_tokens[row] + n, batch.num_tokens[row] - 1)
        proposed = proposer.propose(batch, rows, scheduled)
        drafts = {}
        for row, d in zip(rows.tolist(), proposed):
            seq = batch.token_ids[row, :batch.num_tokens[row]].tolist()
            expect = []
            for _ in range(min(k, 64 - len(seq), 16 * BLOCK - len(seq) + 1)):
                expect.append(draft_next(seq + expect))
            assert d == expect
            drafts[batch.req_ids[row]] = d
    assert accepted > 10 and rejected > 5
    assert max(fake.passes) <= budget


def test_a_request_drafts_only_as_far_as_its_blocks_reach():
    batch = InputBatch(2, 64, 16)
    _add(batch, "a", [1, 2, 3, 4, 5, 6], 0, 2)  # 8 slots: token 7 at position 6, drafts up to 7
    fake = FakeDraft(batch)
    proposer = DraftModelProposer(SpeculativeConfig(method="draft_model", model="d", num_speculative_tokens=4),
                                  fake, BLOCK, 64, 64)
    scheduled = batch.schedule({"a": 6}, BLOCK)
    batch.append_token_lists(scheduled.sample_rows, [[target_next([1, 2, 3, 4, 5, 6])]])
    (drafts,) = proposer.propose(batch, scheduled.sample_rows, scheduled)
    assert len(drafts) == 2  # positions 7 and 8; only position 7 is written (draft 1's KV)


def test_scheduler_reserves_lookahead_slots_only_when_blocks_are_spare():
    def scheduler(num_blocks):
        return Scheduler(EngineConfig(
            model_config=ModelConfig(model="fake", max_model_len=64),
            cache_config=CacheConfig(block_size=BLOCK, num_blocks=num_blocks),
            scheduler_config=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4),
            speculative_config=SpeculativeConfig(method="draft_model", model="d", num_speculative_tokens=3)))

    def request(rid):
        first = 1 if rid == "a" else 20  # different prompts: no prefix-cache hit
        return Request(rid, list(range(first, first + 8)), SamplingParams(temperature=0.0, max_tokens=8),
                       eos_token_id=None)

    sched = scheduler(16)
    sched.add_request(request("a"))
    out = sched.schedule()
    # 8 prompt tokens fill 2 blocks; the sampled token and its drafts' KV need a third.
    assert len(out.scheduled_new_reqs[0].block_ids[0]) == 3
    tight = scheduler(4)  # two requests of 2 blocks each: no block to spare for lookahead
    tight.add_request(request("a"))
    tight.add_request(request("b"))
    out = tight.schedule()
    assert [len(r.block_ids[0]) for r in out.scheduled_new_reqs] == [2, 2]


# ----- configuration --------------------------------------------------------------------

def test_draft_model_config_errors_name_the_field():
    with pytest.raises(ValueError, match="speculative_config.model is required"):
        SpeculativeConfig.from_value({"method": "draft_model"})
    with pytest.raises(ValueError, match="unknown field"):
        SpeculativeConfig.from_value({"method": "draft_model", "model": "x", "draft_model_config": {}})
    with pytest.raises(ValueError, match="speculative_config.quantization"):
        SpeculativeConfig.from_value({"method": "draft_model", "model": "x", "quantization": "fp4"})


def test_the_draft_model_config_is_resolved_and_travels_to_the_workers(tiny_models, tmp_path):
    import json
    import shutil

    from piston.engine.arg_utils import EngineArgs
    from piston.step.config_codec import decode_engine_config, encode_engine_config

    target = tiny_models("llama")
    draft = tmp_path / "draft"
    shutil.copytree(target, draft)
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3}
    engine = EngineArgs(model=target, max_model_len=512, speculative_config=spec).create_engine_config()
    again = decode_engine_config(encode_engine_config(engine)).speculative_config
    assert again.draft_model_config.num_layers == 1 and again.draft_model_config.max_model_len == 512
    assert again.draft_model_config.path == str(draft) and again.num_speculative_tokens == 3

    (draft / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 64}))
    with pytest.raises(ValueError, match="vocabulary"):
        EngineArgs(model=target, speculative_config=spec).create_engine_config()
    (draft / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 128}))
    with pytest.raises(ValueError, match="context length 128"):
        EngineArgs(model=target, max_model_len=512, speculative_config=spec).create_engine_config()
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        EngineArgs(model=target, tensor_parallel_size=2, speculative_config=spec).create_engine_config()
