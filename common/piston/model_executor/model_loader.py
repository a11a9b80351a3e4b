"""Build a model from a ModelConfig and fill it with its checkpoint's weights."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

import torch
from torch import nn
from tqdm import tqdm

from piston.config import ModelConfig
from piston.model_executor import gguf_cache, gguf_loader, weight_loader
from piston.model_executor.layers.rotary_embedding import RotaryEmbedding
from piston.model_executor.models.registry import get_model_class

logger = logging.getLogger(__name__)


def load_hf_config(model_config: ModelConfig):
    """Fill ``model_config.hf_config`` (if unset) from the folder's config.json or the
    GGUF metadata, and return it. ``model_config.path`` must already be resolved."""
    if model_config.hf_config is None:
        path = model_config.path or model_config.model
        if path.endswith(".gguf") and gguf_cache.cached_folder(path) is None:
            model_config.hf_config = gguf_loader.load_gguf_config(path)
        else:
            if path.endswith(".gguf"):
                path = gguf_cache.cached_folder(path)
            from transformers import AutoConfig

            model_config.hf_config = AutoConfig.from_pretrained(path)
    return model_config.hf_config


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={name!r} is not a torch floating-point type; use float32, bfloat16 or float16.")
    return dtype


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


@torch.no_grad()
def _init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Small uniform values (as vLLM's dummy format): finite activations at any depth,
    norm weights 1 so hidden states keep their scale. Drawn on the parameters' device, so
    an 8B-parameter model on a GPU initializes in a second."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        gen = generators.setdefault(param.device, torch.Generator(device=param.device).manual_seed(seed))
        if param.dtype == torch.float32:
            param.uniform_(-1e-3, 1e-3, generator=gen)
        else:  # draw in float32 (bf16 uniform_ is not on every device), one tensor at a time
            param.copy_(torch.empty(param.shape, dtype=torch.float32, device=param.device)
                        .uniform_(-1e-3, 1e-3, generator=gen))


def load_model(model_config: ModelConfig, device: str | torch.device = "cpu") -> nn.Module:
    """The model for ``model_config`` on ``device``, in ``model_config.dtype``, with all weights.

    Raises ValueError for an unsupported architecture or a checkpoint that lacks some of
    the model's parameters.
    """
    start = time.perf_counter()
    hf_config = load_hf_config(model_config)
    model_cls = get_model_class(hf_config)
    path = model_config.path or model_config.model
    # Build on the meta device: no time spent on random init that the weights overwrite.
    with _default_dtype(_torch_dtype(model_config.dtype)), torch.device("meta"):
        model = model_cls(hf_config)
    model = model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_cache()  # its float32 cache was not materialized by to_empty

    if model_config.load_format == "dummy":
        _init_dummy_weights(model, model_config.seed)
        model.eval()
        logger.info("Built %s with random (dummy) weights in %.2f s: %.1fM parameters in %s on %s.",
                    model_cls.__name__, time.perf_counter() - start,
                    sum(p.numel() for p in model.parameters()) / 1e6, model_config.dtype, device)
        return model

    converted: dict[str, torch.Tensor] = {}
    source = path
    if path.endswith(".gguf") and gguf_cache.cached_folder(path) is not None:
        source = gguf_cache.cached_folder(path)
    if source.endswith(".gguf"):
        weights = gguf_cache.recording(gguf_loader.iterate_gguf_weights(path, hf_config), converted)
        total = gguf_loader.count_gguf_tensors(path)
    else:
        weights = weight_loader.iterate_safetensors(source, lazy=True)
        total = weight_loader.count_safetensors(source)
    with torch.no_grad():
        model.load_weights(tqdm(weights, total=total, desc="Loading weights", unit="tensor",
                                leave=False, disable=None))
    model.eval()
    if converted:
        gguf_cache.save(path, hf_config, converted)

    num_params = sum(p.numel() for p in model.parameters())
    num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info("Loaded %s (%s) in %.2f s: %.1fM parameters, %.2f GB in %s on %s.",
                path, model_cls.__name__, time.perf_counter() - start, num_params / 1e6,
                num_bytes / 1e9, model_config.dtype, device)
    return model
