"""RMSNorm with the numerics of transformers' LlamaRMSNorm (float32 statistics)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, the statistics computed in float32.

    ``forward(x)`` returns the normalized tensor. ``forward(x, residual)`` first adds the
    residual and returns ``(normalized, x + residual)``: the pre-norm block pattern in one
    call, so a platform can swap in a fused kernel without touching the model: it sets
    ``kernel(x, residual, weight, eps) -> (normalized, x + residual or None)`` on a loaded
    model's norms (None runs the torch ops below).
    """

    kernel: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.kernel is not None:
            out, summed = self.kernel(x, residual, self.weight, self.eps)
            return out if residual is None else (out, summed)
        if residual is not None:
            x = x + residual
            residual = x
        input_dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        # The cast back happens before the weight multiply, exactly as in transformers.
        out = self.weight * h.to(input_dtype)
        return out if residual is None else (out, residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
