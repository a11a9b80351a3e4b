"""The CPU platform's C++ mixture-of-experts kernel (moe_kernels.cpp) against torch's path."""

import pytest
import torch
from piston_cpu import kernels

pytestmark = pytest.mark.skipif(kernels.unavailable_reason() is not None,
                                reason=f"CPU kernels: {kernels.unavailable_reason()}")


@pytest.fixture(scope="module")
def ops():
    module = kernels.load()
    assert module is not None, "the CPU kernels should build on this machine"
    return module


@pytest.mark.parametrize("counts", [[3, 0, 17, 1, 0, 5, 2], [0, 0, 1, 0, 0, 0, 0], [40, 0, 0, 0, 0, 0, 1]])
@pytest.mark.parametrize("out_features,in_features", [(96, 64), (13, 22)])
def test_moe_grouped_linear_matches_a_loop_over_experts(ops, counts, out_features, in_features):
    gen = torch.Generator().manual_seed(sum(counts))
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), in_features, generator=gen)
    w = torch.randn(len(counts), out_features, in_features, generator=gen)
    expected = torch.cat([x[int(e) - c:int(e)] @ w[g].T for g, (c, e) in enumerate(zip(counts, ends))])
    torch.testing.assert_close(ops.moe_grouped_linear(x, w, ends), expected, atol=2e-4, rtol=1e-5)
    with pytest.raises(RuntimeError, match="ends"):
        ops.moe_grouped_linear(x, w, ends - 1)


@pytest.mark.parametrize("tokens", [1, 5, 200])  # the kernel at decode sizes, torch's grouped GEMM past them
def test_fused_moe_kernel_matches_torch_path(ops, tokens):
    from piston.models.layers.fused_moe import FusedMoE
    from piston_cpu.layer_kernels import install

    gen = torch.Generator().manual_seed(tokens)
    layer = FusedMoE(8, 2, 64, 48, renormalize=False)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    x, logits = torch.randn(tokens, 64, generator=gen), torch.randn(tokens, 8, generator=gen)
    with torch.no_grad():
        expected = layer(x, logits)
        assert install(layer, ops) == 1 and layer.kernel is not None
        torch.testing.assert_close(layer(x, logits), expected, atol=1e-5, rtol=1e-5)
