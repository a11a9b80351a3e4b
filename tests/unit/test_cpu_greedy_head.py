"""The greedy LM head (csrc/greedy_head.cpp, piston_cpu.greedy_head): each row's argmax of
x @ W.T without every logit, from an int8 screen under an error bound and a float32 rescoring
of the candidates. Against torch's argmax of the float32 (and float64) logits: random
weights of several shapes, equal logits, rows the screen cannot narrow, rows that are not
finite; then on a model's head, and in the engine against the engine without it."""

from __future__ import annotations

import pytest
import torch
from piston_cpu import kernels

_ops = kernels.load()
pytestmark = pytest.mark.skipif(_ops is None, reason="Piston's CPU kernels are unavailable here")

# The vectorized screen where this build has AVX-512 VNNI; the scalar one everywhere.
PATHS = [True] + ([False] if _ops is not None and _ops.greedy_head_fast() else [])
# x as one byte an input or two.
PLANES = [1, 2]


@pytest.fixture(scope="module")
def ops():
    return _ops


def _clear_argmax(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 argmax per row, and whether the row's best logit is ahead of the next by
    more than float32 rounding could move them (only those rows have one right answer)."""
    logits = x.double() @ w.double().T
    top = logits.topk(2, dim=-1)
    scale = x.double().abs() @ w.double().abs().T
    gap = top.values[:, 0] - top.values[:, 1]
    return top.indices[:, 0], gap > 1e-5 * scale.max(dim=-1).values


@pytest.mark.parametrize("planes", PLANES)
@pytest.mark.parametrize("force_scalar", PATHS)
@pytest.mark.parametrize("vocab,hidden,rows,dist", [
    (1000, 64, 7, "uniform"),  # the engine's dummy weights' distribution
    (77, 13, 3, "normal"),  # vocabulary not a multiple of 64, inputs not a multiple of 4
    (64, 4, 1, "normal"),
    (3000, 576, 13, "normal"),  # SmolLM2's hidden size; 13 rows: two tiles of 6 and one row
    (4099, 100, 40, "heavy"),  # heavy-tailed x: a few inputs set the int8 scale
])
def test_matches_the_argmax_of_the_logits(ops, force_scalar, planes, vocab, hidden, rows, dist):
    torch.manual_seed(vocab + rows)
    if dist == "uniform":
        w = torch.empty(vocab, hidden).uniform_(-1e-3, 1e-3)
    else:
        w = torch.randn(vocab, hidden) * 0.05
    x = torch.randn(rows, hidden)
    if dist == "heavy":
        x = x * torch.distributions.Exponential(0.3).sample((rows, hidden))
    prepared = ops.greedy_head_prepare(w)
    stats = torch.zeros(3, dtype=torch.int64)
    got = ops.greedy_head_argmax(x, w, prepared, stats, planes=planes, force_scalar=force_scalar)
    want, clear = _clear_argmax(x, w)
    assert clear.sum() >= rows - 1  # the test has something to check
    assert torch.equal(got[clear], want[clear])
    assert torch.equal(got, (x @ w.T).argmax(-1)) or not clear.all()
    assert stats[0] == rows and stats[2] == 0  # no row needed every logit
    assert rows <= stats[1] <= rows * min(vocab, 64)  # the screen ruled out most of the vocabulary
    if planes == 2 and dist == "heavy":  # outliers in x: two bytes narrow it much more than one
        one = torch.zeros(3, dtype=torch.int64)
        ops.greedy_head_argmax(x, w, prepared, one, planes=1, force_scalar=force_scalar)
        assert one[1] > 2 * stats[1]


@pytest.mark.parametrize("planes", PLANES)
@pytest.mark.parametrize("force_scalar", PATHS)
def test_equal_logits_resolve_to_the_lowest_index(ops, force_scalar, planes):
    """As torch.argmax: duplicated best rows anywhere in the vocabulary give the first; and
    that holds across the threads' ranges (rows 5 and 2900)."""
    torch.manual_seed(1)
    w = torch.randn(3000, 32) * 0.1
    x = torch.randn(4, 32)
    w[2900] = w[5] = 0.5 * x[0]
    w[2000] = w[1999] = 0.5 * x[1]
    got = ops.greedy_head_argmax(x, w, ops.greedy_head_prepare(w), planes=planes, force_scalar=force_scalar)
    assert got[:2].tolist() == [5, 1999]
    assert torch.equal(got, (x @ w.T).argmax(-1))


@pytest.mark.parametrize("planes", PLANES)
@pytest.mark.parametrize("force_scalar", PATHS)
def test_rows_the_screen_cannot_narrow_are_computed_in_full(ops, force_scalar, planes):
    """Identical vocabulary rows but one, ahead by less than the int8 bound: every token is a
    candidate, more than a row keeps, so the row takes every float32 logit. A zero x (all
    logits 0) and a non-finite x do the same, with torch.argmax's answer (its first NaN);
    without compute_full those rows come back as -1."""
    torch.manual_seed(2)
    x = torch.randn(4, 64)
    w = torch.full((3000, 64), 0.5)
    w[777, 0] += 1e-3 * float(torch.sign(x[0, 0]))
    x[1] = 0.0
    x[2, 5] = float("nan")
    x[3, 7] = float("inf")
    stats = torch.zeros(3, dtype=torch.int64)
    prepared = ops.greedy_head_prepare(w)
    got = ops.greedy_head_argmax(x, w, prepared, stats, planes=planes, force_scalar=force_scalar)
    assert got[0] == 777 and got[1] == 0
    assert torch.equal(got[2:], (x[2:] @ w.T).argmax(-1))
    assert stats.tolist()[0] == 4 and stats.tolist()[2] == 4
    left = ops.greedy_head_argmax(x, w, prepared, planes=planes, compute_full=False, force_scalar=force_scalar)
    assert left.tolist() == [-1] * 4


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_1", "Q6_K", "F16"])
def test_a_packed_head_rescores_its_decoded_rows(ops, fmt):
    """A GGUF head: the copy made from its decoded values, the candidates decoded one row at a
    time; the same tokens as the float32 kernel on the decoded weight, and the clear rows'
    float64 argmax."""
    import numpy as np
    from gguf_models import random_packed
    from piston.checkpoint.packed import FORMATS

    rng = np.random.default_rng(5)
    hidden = 256  # a K-quant block
    segment = torch.from_numpy(np.ascontiguousarray(random_packed(fmt, 1000, hidden, rng).data))
    code = FORMATS[fmt].code
    dense = ops.qdequantize([segment], [code], hidden)
    prepared = ops.greedy_head_prepare(dense)
    x = torch.randn(9, hidden)
    want, clear = _clear_argmax(x, dense)
    for planes in PLANES:
        got = ops.greedy_head_argmax(x, segment, prepared, planes=planes, code=code)
        assert torch.equal(got, ops.greedy_head_argmax(x, dense, prepared, planes=planes))
        assert torch.equal(got[clear], want[clear]) and clear.sum() >= 8
    with pytest.raises(RuntimeError, match="must be contiguous uint8"):
        ops.greedy_head_argmax(x, dense, prepared, code=code)


def test_checks_its_inputs(ops):
    torch.manual_seed(4)
    w = torch.randn(100, 16)
    prepared = ops.greedy_head_prepare(w)
    q, scales, corr, l1 = prepared
    assert q.shape == (2, 4, 64, 4) and q.dtype == torch.int8 and scales.shape == corr.shape == l1.shape == (128,)
    assert torch.all((q[1, 2, 3] - w[67, 8:12] / scales[67]).abs() <= 0.501)  # row 67, inputs 8-11
    assert not scales[100:].any() and torch.all(l1[:100].double() >= w.double().abs().sum(-1))
    with pytest.raises(RuntimeError, match="does not match x's 17 inputs"):
        ops.greedy_head_argmax(torch.randn(2, 17), torch.randn(100, 17), prepared)
    with pytest.raises(RuntimeError, match="the int8 copy has 128 rows, the weight 200"):
        ops.greedy_head_argmax(torch.randn(2, 16), torch.randn(200, 16), prepared)
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.greedy_head_argmax(torch.randn(2, 16).double(), w, prepared)
    with pytest.raises(RuntimeError, match="stats must be int64"):
        ops.greedy_head_argmax(torch.randn(2, 16), w, prepared, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="planes is 1 .int8 x. or 2 .int16 x., not 3"):
        ops.greedy_head_argmax(torch.randn(2, 16), w, prepared, planes=3)
    w[3, 3] = float("inf")
    with pytest.raises(RuntimeError, match="not finite"):
        ops.greedy_head_prepare(w)
    assert ops.greedy_head_argmax(torch.randn(0, 16), torch.randn(100, 16), prepared).shape == (0,)


def test_a_models_head(ops, random_llama, monkeypatch):
    """greedy_tokens equals the argmax of compute_logits on an untied head; None before the
    copy is made, after the weight is replaced, and after release; a model whose logits
    are more than the product (a softcap) offers no head."""
    from piston_cpu import greedy_head

    monkeypatch.setenv("PISTON_CPU_GREEDY_HEAD", "1")
    model = random_llama
    heads = greedy_head.GreedyHeads(ops)
    heads.install(model)
    assert model.lm_head.greedy_kernel is heads.heads[0]
    hidden = torch.randn(9, 96)
    with torch.inference_mode():
        assert model.greedy_tokens(hidden) is None  # not prepared yet
        assert heads.prepare() == 1
        assert torch.equal(model.greedy_tokens(hidden), model.compute_logits(hidden).argmax(-1))
        assert heads.stats()["rows"] == 9
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * -1, requires_grad=False)
        assert model.greedy_tokens(hidden) is None  # a replaced weight: the logits, until prepared again
        heads.prepare()
        assert torch.equal(model.greedy_tokens(hidden), model.compute_logits(hidden).argmax(-1))
        heads.release()
        assert model.greedy_tokens(hidden) is None

    class Capped(type(model)):
        def compute_logits(self, hidden_states):
            return 30 * torch.tanh(super().compute_logits(hidden_states) / 30)

    assert Capped(model.config).logits_head() is None
    monkeypatch.setenv("PISTON_CPU_GREEDY_HEAD", "0")
    assert not greedy_head.GreedyHeads(ops).enabled
    monkeypatch.setenv("PISTON_CPU_GREEDY_HEAD", "sometimes")
    with pytest.raises(ValueError, match="PISTON_CPU_GREEDY_HEAD='sometimes'"):
        greedy_head.GreedyHeads(ops)


def test_a_head_takes_one_byte_of_x_while_its_rows_stay_narrow(ops, random_llama, monkeypatch):
    """Starts with int16 x, tries int8 after FIRST_TRY calls and keeps it on flat hidden
    states; rows with an outlier channel widen the screen, so it goes back to int16 and
    waits twice as long before the next try; the tokens are the argmax throughout, rows the
    screen leaves alone included (computed through the head's own GEMM)."""
    from piston_cpu import greedy_head

    monkeypatch.setenv("PISTON_CPU_GREEDY_HEAD", "1")
    model = random_llama
    with torch.no_grad():
        model.lm_head.weight[:, 7] = 0.0  # channel 7 sets x's scale but no logit
    heads = greedy_head.GreedyHeads(ops)
    heads.install(model)
    heads.prepare()
    head = heads.heads[0]
    torch.manual_seed(3)
    flat = torch.randn(16, 96)
    spiky = flat.clone()
    spiky[:, 7] = 400.0  # one channel 400x the others: one byte's steps swamp the rest
    widths = []
    with torch.inference_mode():
        for x in [flat] * 6 + [spiky] + [flat] * 9:
            widths.append(head.planes)
            assert torch.equal(model.greedy_tokens(x), model.compute_logits(x).argmax(-1))
        assert widths[:greedy_head.FIRST_TRY] == [2] * greedy_head.FIRST_TRY
        assert widths[greedy_head.FIRST_TRY:7] == [1] * (7 - greedy_head.FIRST_TRY)  # the spiky call ran int8
        assert widths[7:7 + 2 * greedy_head.FIRST_TRY] == [2] * (2 * greedy_head.FIRST_TRY)
        assert widths[-1] == 1
        odd = flat.clone()
        odd[3, 5] = float("inf")  # a row the screen leaves to the head's GEMM
        assert torch.equal(model.greedy_tokens(odd), model.compute_logits(odd).argmax(-1))
        assert heads.stats()["full_rows"] == 1


@pytest.mark.parametrize("weights", ["float32", "packed"])
def test_engine_with_the_greedy_head_matches_it_without(weights, tiny_models, make_llm, monkeypatch, tmp_path):
    """Greedy tokens through the head (PISTON_CPU_GREEDY_HEAD=1: the scalar screen where the
    CPU lacks VNNI) equal those from the logits, with a float32 head and a Q8_0 one (a GGUF
    file); steps that ask for logprobs take the logits; after a sleep and a wake-up the copy
    is made again."""
    from gguf_models import write_gguf
    from piston import SamplingParams

    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Hi",
               "List three primary colors, then explain why the sky is blue in two sentences:"]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    kwargs = dict(max_model_len=512, kv_cache_memory="64MiB", seed=0, dtype="float32", max_num_batched_tokens=32)
    path = tiny_models("llama")
    if weights == "packed":
        kwargs["tokenizer"] = path
        path = write_gguf(path, str(tmp_path / "tiny.gguf"), lambda n: "F32" if "norm" in n else "Q8_0")
    monkeypatch.setenv("PISTON_CPU_GREEDY_HEAD", "1")
    llm = make_llm(path, **kwargs)
    fast = llm.generate(prompts, greedy, use_tqdm=False)
    served = llm.collective_rpc("kernel_info")[0]["greedy_head"]
    assert served["rows"] >= 12 * len(prompts) - len(prompts) and served["full_rows"] == 0
    with_logprobs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                         logprobs=2), use_tqdm=False)
    assert llm.collective_rpc("kernel_info")[0]["greedy_head"]["rows"] == served["rows"]
    llm.sleep(level=1)
    llm.wake_up()
    again = llm.generate(prompts, greedy, use_tqdm=False)
    assert llm.collective_rpc("kernel_info")[0]["greedy_head"]["rows"] > served["rows"]
    monkeypatch.setenv("PISTON_CPU_GREEDY_HEAD", "0")
    llm = make_llm(path, **kwargs)
    slow = llm.generate(prompts, greedy, use_tqdm=False)
    assert llm.collective_rpc("kernel_info")[0]["greedy_head"]["rows"] == 0
    for a, b, c, d in zip(fast, again, slow, with_logprobs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids == d.outputs[0].token_ids
