"""The CUDA platform's mixture-of-experts Triton kernels against a per-token loop and torch's path.

Uneven routing (idle experts, one expert taking most pairs, one spanning several row blocks),
widths that are not powers of two, a single decode token, and weights in transformers' layout
viewed through strides. On the CPU this runs in Triton's interpreter in float32 (IEEE
products, tight tolerance) and float16; bfloat16 only on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
# Relative to the largest output: float32 accumulation, plus the gate/up activation stored
# in the operands' dtype (as torch's path stores it) for the half types.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _problem(tokens, hidden, inter, num_experts, top_k, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    logits = torch.randn(tokens, num_experts, generator=gen)
    logits[:, 1] = logits[:, num_experts - 2] = -30.0  # two idle experts
    logits[: tokens * 3 // 4, 0] += 6.0  # expert 0 takes most tokens
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    return [t.to(device, dtype) for t in (x, w13, w2)] + [weights.to(device), ids.to(device)]


def _loop_reference(x, w13, w2, weights, ids):
    """Each token through each of its experts, in float64 on the CPU."""
    x, w13, w2, weights, ids = (t.double().cpu() if t.is_floating_point() else t.cpu()
                                for t in (x, w13, w2, weights, ids))
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e] @ x[t]
            out[t] += weights[t, j] * (w2[e] @ (F.silu(h[:inter]) * h[inter:]))
    return out


def _assert_close(got, expected, dtype):
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.double().cpu(), expected, atol=TOL[dtype] * scale, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 45, 160])  # row blocks of 16, 16 and 64
def test_fused_experts_matches_loop_and_torch_path(device, dtype, tokens):
    from piston.models.layers.fused_moe import fused_experts as torch_fused_experts
    from piston_cuda.kernels.fused_moe import fused_experts

    x, w13, w2, weights, ids = _problem(tokens, 48, 40, 8, 2, dtype, device)
    expected = _loop_reference(x, w13, w2, weights, ids)
    got = fused_experts(x, w13, w2, weights, ids)
    assert got.dtype == dtype and got.shape == x.shape
    _assert_close(got, expected, dtype)
    _assert_close(torch_fused_experts(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu()), expected, dtype)


def test_fused_moe_op_takes_strided_weights(device):
    """The custom op (what a compiled model calls), with w13 a transposed view."""
    from piston_cuda.kernels.fused_moe import fused_moe

    x, w13, w2, weights, ids = _problem(29, 40, 24, 6, 3, torch.float32, device, seed=1)
    w13_t = w13.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major experts
    got = torch.ops.piston_cuda.fused_moe(x, w13_t, w2, weights, ids)
    _assert_close(got, _loop_reference(x, w13, w2, weights, ids), torch.float32)
    assert torch.equal(fused_moe(x, w13, w2, weights, ids), fused_moe(x, w13, w2, weights, ids))


@pytest.mark.parametrize("block_m", [16, 64])
def test_moe_align_groups_every_pair_once_by_expert(device, block_m):
    from piston_cuda.kernels.fused_moe import moe_align

    gen = torch.Generator().manual_seed(3)
    num_experts, top_k = 8, 2
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(70)])
    ids[ids == 5] = 0  # expert 5 idle, expert 0 busy
    sorted_pairs, block_experts = moe_align(ids.to(device), num_experts, block_m)
    sorted_pairs, block_experts, flat = sorted_pairs.cpu(), block_experts.cpu(), ids.flatten()
    real = sorted_pairs[sorted_pairs < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))
    for b, expert in enumerate(block_experts.tolist()):
        rows = sorted_pairs[b * block_m:(b + 1) * block_m]
        rows = rows[rows < flat.numel()]
        if expert < 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat[rows.long()] == expert).all()
    assert 5 not in block_experts.tolist()
