"""Structured outputs in the engine: the request fields, compiling off the busy loop,
the waiting state, the per-step bitmask and the matcher's progress (fake grammar engine);
then both real engines on the SmolLM2 tokenizer."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_scheduler import EOS, make_config, make_request

from piston.core.scheduler import Scheduler
from piston.engine.structured_outputs import StructuredOutputs
from piston.entrypoints.openai.protocol import ChatCompletionRequest
from piston.step.plain_config import PlainConfig
from piston.step.runner_output import ModelRunnerOutput
from piston.step.sampling_params import StructuredOutputsParams
from piston.step.engine_messages import INVALID_REQUEST_ERROR
from piston.structured_output.backend import GrammarBackend, GrammarMatcher
from piston.structured_output.manager import StructuredOutputManager, bitmask_width

ALLOWED = (5, 6, EOS)  # the fake grammar: one or more 5s and 6s, then EOS


def _request_ids(outputs) -> set[str]:
    return {o.request_id for o in outputs}


# ----- the request fields ---------------------------------------------------------------

def test_params_need_exactly_one_constraint_and_check_it():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", grammar="root ::= \"a\"")
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{nope")
    with pytest.raises(ValueError, match="non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="non-empty string"):
        StructuredOutputsParams(regex=" ")
    # A schema given as text or as an object is one constraint (one cache entry).
    assert StructuredOutputsParams(json='{"type": "object", "required": []}').key == \
        StructuredOutputsParams(json={"required": [], "type": "object"}).key


def test_constraints_have_a_size_limit():
    from piston.structured_output.selection import MAX_CONSTRAINT_CHARS, validate

    with pytest.raises(ValueError, match="characters long; the limit is"):
        validate(StructuredOutputsParams(regex="a" * (MAX_CONSTRAINT_CHARS + 1)), "guidance")
    validate(StructuredOutputsParams(regex="a" * 1000), "guidance")


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


@pytest.mark.parametrize("fields, expected", [
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "array"},
                                                                 "strict": True}}},
     StructuredOutputsParams(json={"type": "array"})),
    ({"structured_outputs": {"regex": "a+"}}, StructuredOutputsParams(regex="a+")),
    ({"structured_outputs": {"json": {"type": "integer"}}}, StructuredOutputsParams(json={"type": "integer"})),
    ({"guided_json": '{"type": "string"}'}, StructuredOutputsParams(json={"type": "string"})),
    ({"guided_regex": "b"}, StructuredOutputsParams(regex="b")),
    ({"guided_choice": ["x", "y"]}, StructuredOutputsParams(choice=["x", "y"])),
    ({"guided_grammar": 'root ::= "z"'}, StructuredOutputsParams(grammar='root ::= "z"')),
    ({"response_format": {"type": "text"}}, None),
])
def test_every_api_field_becomes_the_same_constraint(fields, expected):
    assert _chat(**fields).to_sampling_params().structured_outputs == expected


def test_two_constraint_fields_are_refused():
    with pytest.raises(ValueError, match="one output constraint"):
        _chat(guided_regex="a", response_format={"type": "json_object"}).to_sampling_params()


# ----- the engine side, with a fake grammar engine ----------------------------------------

class FakeMatcher(GrammarMatcher):
    def __init__(self) -> None:
        self.accepted: list[int] = []

    def accept_tokens(self, token_ids):
        for t in token_ids:
            if t not in ALLOWED or (t == EOS and not self.can_stop()):
                return False
            self.accepted.append(t)
        return True

    def can_stop(self):
        return bool(self.accepted)

    def fill_bitmask(self, bitmask, row):
        bitmask[row] = 0
        for t in ALLOWED if self.can_stop() else ALLOWED[:2]:
            bitmask[row, t // 32] |= np.int32(1 << (t % 32))

    def is_terminated(self):
        return EOS in self.accepted


class FakeBackend(GrammarBackend):
    name = "fake"

    def __init__(self) -> None:
        super().__init__(None, 64)
        self.compiles: list[tuple[str, str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def compile(self, params):
        self.gate.wait(10)
        self.compiles.append(params.key)
        if params.regex == "bad":
            raise ValueError("structured_outputs.regex is invalid: bad")
        return params.key

    def matcher(self, compiled):
        return FakeMatcher()


def _engine(budget: int = 64):
    """A Scheduler, and StructuredOutputs with the fake grammar engine."""
    config = make_config(num_blocks=64, block_size=4, budget=budget)
    config.model_config.hf_config = PlainConfig({"vocab_size": 64})
    scheduler = Scheduler(config)
    structured = StructuredOutputs(config)
    structured.manager._backend = FakeBackend()
    return scheduler, structured


@pytest.fixture
def engine():
    return _engine()


def _run_step(scheduler, structured, token: int = 5):
    """One EngineCore step: schedule, the bitmask, a fake runner sampling ``token`` for
    every request that samples, the scheduler's update, the matchers' advance."""
    out = scheduler.schedule()
    structured.attach_bitmask(out, scheduler)
    req_ids = list(out.num_scheduled_tokens)
    sampled = [[token] if scheduler.requests[r].num_computed_tokens == scheduler.requests[r].num_tokens else []
               for r in req_ids]
    outputs = scheduler.update_from_output(out, ModelRunnerOutput(req_ids, sampled))
    structured.advance(outputs, scheduler)
    return out, outputs


def _admit_all(scheduler, structured) -> list:
    outputs = []
    while structured.waiting:
        structured.manager.wait_any(5)
        outputs += structured.admit_ready(scheduler)
    return outputs


def _constrained(req_id, regex="x", **params):
    return make_request(req_id, prompt_len=6, structured_outputs=StructuredOutputsParams(regex=regex), **params)


def test_a_compiling_grammar_keeps_its_request_out_of_the_scheduler(engine):
    scheduler, structured = engine
    backend = structured.manager.backend
    backend.gate.clear()  # the compile blocks
    assert structured.add(_constrained("c"))
    plain = make_request("p", prompt_len=6)
    assert not structured.add(plain)
    scheduler.add_request(plain)
    # The unconstrained request runs; the constrained one waits in its own state.
    for _ in range(3):
        assert structured.admit_ready(scheduler) == []
        out, _ = _run_step(scheduler, structured)
        assert set(out.num_scheduled_tokens) == {"p"}
    assert "c" in structured.waiting and "c" not in scheduler.requests
    backend.gate.set()
    _admit_all(scheduler, structured)
    assert "c" in scheduler.requests


def test_grammars_compile_once_per_constraint(engine):
    scheduler, structured = engine
    for i in range(4):
        structured.add(_constrained(f"r{i}"))
    structured.add(_constrained("other", regex="y"))
    _admit_all(scheduler, structured)
    assert sorted(structured.manager.backend.compiles) == [("regex", "x"), ("regex", "y")]


def test_a_grammar_that_fails_to_compile_fails_its_request_alone(engine):
    scheduler, structured = engine
    structured.add(_constrained("bad", regex="bad"))
    structured.add(_constrained("good"))
    [failed] = _admit_all(scheduler, structured)
    assert failed.request_id == "bad" and failed.finish_reason == "error" and "invalid: bad" in failed.error
    assert "good" in scheduler.requests and "bad" not in structured.manager.matchers


def test_bitmask_rows_go_to_sampling_constrained_requests_only(engine):
    scheduler, structured = engine
    structured.add(_constrained("c", max_tokens=8))
    _admit_all(scheduler, structured)
    scheduler.add_request(make_request("p", prompt_len=6))
    matcher = structured.manager.matchers["c"]
    out, _ = _run_step(scheduler, structured)
    assert out.grammar_req_ids == ["c"]
    mask = np.frombuffer(out.grammar_bitmask, np.int32).reshape(1, bitmask_width(64))
    assert set(np.nonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))[0]) == {5, 6}  # no EOS yet
    _run_step(scheduler, structured)
    assert matcher.accepted == [5, 5] == scheduler.requests["c"].output_token_ids


def test_chunked_prefill_gets_no_mask_until_the_request_samples():
    scheduler, structured = _engine(budget=4)  # a 6-token prompt: chunks of 4, then 2 and a sample
    structured.add(_constrained("c"))
    _admit_all(scheduler, structured)
    masked = [_run_step(scheduler, structured)[0].grammar_req_ids for _ in range(3)]
    assert masked == [[], ["c"], ["c"]]


def test_a_token_the_grammar_rejects_fails_the_request(engine):
    scheduler, structured = engine
    structured.add(_constrained("c"))
    _admit_all(scheduler, structured)
    _, [out] = _run_step(scheduler, structured, token=7)
    assert out.finish_reason == "error" and out.error.startswith(INVALID_REQUEST_ERROR)
    assert "allows no next token" in out.error
    assert "c" not in structured.manager.matchers and not scheduler.has_unfinished_requests()


def test_a_complete_grammar_ends_its_request_when_min_tokens_bans_the_stop_token(engine):
    # The grammar allows only EOS, min_tokens bans it: nothing is allowed, and the sampler's
    # pick (7 here) is rejected. The grammar outranks min_tokens: the request ends with
    # "stop", and the rejected token is not in its output.
    scheduler, structured = engine
    structured.add(_constrained("c", min_tokens=5, max_tokens=10))
    _admit_all(scheduler, structured)
    _run_step(scheduler, structured, token=6)
    _, [out] = _run_step(scheduler, structured, token=7)
    assert out.finish_reason == "stop" and out.error is None and out.new_token_ids == []
    assert structured.manager.matchers == {} and not scheduler.has_unfinished_requests()


def test_the_stop_token_ends_the_grammar_even_when_eos_is_ignored(engine):
    scheduler, structured = engine
    structured.add(_constrained("c", ignore_eos=True, max_tokens=20))
    _admit_all(scheduler, structured)
    _run_step(scheduler, structured, token=6)
    _, [out] = _run_step(scheduler, structured, token=EOS)
    assert out.finish_reason == "stop"  # nothing may follow a finished grammar
    assert not scheduler.has_unfinished_requests()


def test_preemption_keeps_the_matcher_in_step(engine):
    scheduler, structured = engine
    structured.add(_constrained("c", max_tokens=6))
    _admit_all(scheduler, structured)
    request, matcher = scheduler.requests["c"], structured.manager.matchers["c"]
    _run_step(scheduler, structured)
    _run_step(scheduler, structured, token=6)
    scheduler._preempt(request)  # as when the KV cache runs out; it is recomputed next step
    while True:
        _, [out] = _run_step(scheduler, structured)
        if out.finish_reason is not None:
            break
        assert matcher.accepted == request.output_token_ids
    # Every sampled token once, replayed ones not again; the last ended the request (length).
    assert out.finish_reason == "length" and matcher.accepted == [5, 6, 5, 5, 5]


# ----- the real engines -------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["guidance", "xgrammar"])
def test_real_engines_agree_on_a_choice_grammar(backend, smollm2_path):
    if backend == "xgrammar":
        pytest.importorskip("xgrammar")
    from piston.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    manager = StructuredOutputManager(backend, 49152, lambda: tokenizer)
    manager.submit("r", StructuredOutputsParams(choice=["yes", "no"]))
    manager.wait_any(30)
    assert manager.ready("r") is True
    ids, mask = manager.bitmask(["r", "unconstrained"])
    assert ids == ["r"]
    allowed = set(np.nonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))[0])
    assert {tokenizer.encode("yes", add_special_tokens=False)[0],
            tokenizer.encode("no", add_special_tokens=False)[0]} <= allowed
    assert all(tokenizer.decode([t]) in ("y", "ye", "yes", "n", "no") for t in allowed)
    assert manager.accept("r", tokenizer.encode("yes", add_special_tokens=False))
    ids, mask = manager.bitmask(["r"])
    allowed = set(np.nonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))[0])
    assert allowed == {tokenizer.eos_token_id}  # complete: only the stop token may follow
    assert manager.accept("r", [tokenizer.eos_token_id]) and manager.matchers["r"].is_terminated()
    manager.shutdown()
