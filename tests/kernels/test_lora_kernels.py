"""The CUDA platform's batched multi-LoRA Triton kernels (shrink, expand) against a torch loop.

Random adapters in several slots with uneven token groups (one slot empty, one spanning two
token blocks), tokens listed out of order and tokens without an adapter, K / N / R that are
not powers of two, y a column slice of a wider tensor. On the CPU this runs in Triton's
interpreter in float32 (IEEE products, tight tolerance) and float16; bfloat16 only on a GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
# The reference takes the inputs rounded to dtype, so the kernel's error is float32 accumulation
# (and the hi/lo split of s in the expand), relative to the sum of |terms| of each output, plus
# the final rounding of y to its dtype.
SUM_TOL = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}


def _groups(sizes, num_tokens, device, seed=0):
    """token_ids (a random subset of the tokens, grouped by slot), slot_ends and the slot of each token."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_tokens, generator=gen)[:sum(sizes)]
    ends = torch.tensor(sizes).cumsum(0).to(torch.int32)
    slot_of = {}
    start = 0
    for slot, size in enumerate(sizes):
        for t in perm[start:start + size].tolist():
            slot_of[t] = slot
        start += size
    return perm.to(device), ends.to(device), slot_of


def _adapters(num, k, r, n, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(num, k, r, generator=gen) / k ** 0.5).to(device, dtype)
    b = torch.randn(num, r, n, generator=gen).to(device, dtype)
    return a, b


def _reference(x, y, a, b, slot_of):
    """float64 y + delta, and the sum of |terms| per element (the error scale)."""
    ref, scale = y.double().cpu().clone(), torch.zeros(y.shape, dtype=torch.float64)
    x, a, b = x.double().cpu(), a.double().cpu(), b.double().cpu()
    for t, slot in slot_of.items():
        s = x[t] @ a[slot]
        ref[t] += s @ b[slot]
        scale[t] = (x[t].abs() @ a[slot].abs()) @ b[slot].abs()
    return ref, scale


def _assert_close(got, expected, scale, dtype):
    err = (got.double().cpu() - expected).abs()
    bound = SUM_TOL[dtype] * scale + torch.finfo(dtype).eps * expected.abs() + 1e-7
    assert (err <= bound).all(), f"max error {err.max().item():.3g} (excess {(err - bound).max().item():.3g})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shrink_expand_matches_loop_reference(device, dtype):
    from piston_cuda.kernels.lora import lora_shrink_expand

    num_tokens, k, r, n = 60, 72, 12, 40
    sizes = [3, 0, 37, 5]  # an empty slot; slot 2 spans two 32-token blocks of the grid
    token_ids, slot_ends, slot_of = _groups(sizes, num_tokens, device)
    a, b = _adapters(5, k, r, n, dtype, device)  # one adapter more than slots
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(num_tokens, k, generator=gen).to(device, dtype)
    wide = torch.randn(num_tokens, n + 24, generator=gen).to(device, dtype)
    before = wide.clone()
    y = wide[:, 8:8 + n]  # a column slice: row stride n + 24, unit last stride
    expected, scale = _reference(x, y, a, b, slot_of)
    lora_shrink_expand(x, y, a, b, token_ids, slot_ends, max(sizes))
    _assert_close(y, expected, scale, dtype)
    untouched = [t for t in range(num_tokens) if t not in slot_of]
    assert untouched and torch.equal(wide[untouched].cpu(), before[untouched].cpu())
    assert torch.equal(wide[:, :8].cpu(), before[:, :8].cpu())
    assert torch.equal(wide[:, 8 + n:].cpu(), before[:, 8 + n:].cpu())


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shrink_rows_follow_token_ids(device, dtype, split_k):
    from piston_cuda.kernels.lora import lora_shrink

    num_tokens, k, r = 20, 200, 20  # 4 K blocks (one ragged), a 32-wide R block (masked), x strided
    sizes = [4, 9, 0, 2]
    token_ids, slot_ends, slot_of = _groups(sizes, num_tokens, device, seed=3)
    a, _ = _adapters(4, k, r, 8, dtype, device, seed=4)
    x = torch.randn(num_tokens, 2 * k, generator=torch.Generator().manual_seed(5)).to(device, dtype)[:, ::2]
    s = lora_shrink(x, a, token_ids, slot_ends, max(sizes), split_k=split_k)
    assert s.shape == (sum(sizes), r) and s.dtype == torch.float32
    xd, ad = x.double().cpu(), a.double().cpu()
    for i, t in enumerate(token_ids.tolist()):
        expected = xd[t] @ ad[slot_of[t]]
        scale = xd[t].abs() @ ad[slot_of[t]].abs()
        assert ((s[i].double().cpu() - expected).abs() <= SUM_TOL[torch.float32] * scale + 1e-7).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expand_merged_rank_over_several_blocks(device, dtype):
    """R = 3 * 24 (merged q/k/v adapters) takes two rank blocks; N = 150 two column blocks."""
    from piston_cuda.kernels.lora import lora_expand

    num_tokens, r, n = 24, 72, 150
    sizes = [7, 1, 11]
    token_ids, slot_ends, slot_of = _groups(sizes, num_tokens, device, seed=6)
    _, b = _adapters(3, 8, r, n, dtype, device, seed=7)
    gen = torch.Generator().manual_seed(8)
    s = torch.randn(sum(sizes), r, generator=gen).to(device)
    y = torch.randn(num_tokens, n, generator=gen).to(device, dtype)
    expected, scale = y.double().cpu().clone(), torch.zeros(num_tokens, n, dtype=torch.float64)
    bd = b.double().cpu()
    for i, t in enumerate(token_ids.tolist()):
        expected[t] += s[i].double().cpu() @ bd[slot_of[t]]
        scale[t] = s[i].double().cpu().abs() @ bd[slot_of[t]].abs()
    before = y.clone()
    lora_expand(s, y, b, token_ids, slot_ends, max(sizes))
    _assert_close(y, expected, scale, dtype)
    untouched = [t for t in range(num_tokens) if t not in slot_of]
    assert torch.equal(y[untouched].cpu(), before[untouched].cpu())


def test_no_lora_tokens_is_a_no_op_without_a_launch(device, monkeypatch):
    from piston_cuda.kernels import lora

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched")

    monkeypatch.setattr(lora, "_shrink_kernel", NoLaunch())
    monkeypatch.setattr(lora, "_expand_kernel", NoLaunch())
    x = torch.randn(5, 32, device=device)
    y = torch.randn(5, 48, device=device)
    before = y.clone()
    a, b = _adapters(2, 32, 16, 48, torch.float32, device)
    token_ids = torch.zeros(0, dtype=torch.int64, device=device)
    slot_ends = torch.zeros(2, dtype=torch.int32, device=device)
    lora.lora_shrink_expand(x, y, a, b, token_ids, slot_ends, 0)
    assert torch.equal(y, before)
    assert lora.lora_shrink(x, a, token_ids, slot_ends, 0).shape == (0, 16)
    lora.lora_expand(torch.zeros(0, 16, device=device), y, b, token_ids, slot_ends, 0)
    assert torch.equal(y, before)
