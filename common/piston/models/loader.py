"""Build a torch model from a ModelConfig and fill it with its checkpoint's weights.

Quantized weights (``model_config.quantization``, piston.checkpoint.packed): with "gguf"
the layers whose GGUF tensors are in a packed format hold them packed; with "int8" every
linear layer quantizes its float weight at load. Either way the choice is made on the
meta model, so no float copy of a packed weight is ever allocated.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator

import torch
from torch import nn
from tqdm import tqdm

from piston.checkpoint.checkpoint_reader import CheckpointReader, read_hf_config
from piston.checkpoint.packed import PackedArray, resolve_quantization
from piston.models import weight_loader
from piston.models.layers.quantized import describe_packed
from piston.models.layers.rotary_embedding import RotaryEmbedding
from piston.models.registry import resolve_model_class
from piston.step.config import ModelConfig

logger = logging.getLogger(__name__)


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


def _checkpoint_weights(reader: CheckpointReader) -> tuple[Iterator[tuple[str, Any]], int]:
    """The checkpoint's tensors and their count. A safetensors folder yields lazy slices,
    so a tensor-parallel rank reads only its own shard; a GGUF file yields its dequantized
    arrays as tensors (no copy), and its packed ones as PackedArrays."""
    if reader.folder is not None:
        return weight_loader.iterate_safetensors(reader.folder, lazy=True), reader.count()
    return ((name, a if isinstance(a, PackedArray) else torch.from_numpy(a)) for name, a in reader.tensors()), \
        reader.count()


def load_model(model_config: ModelConfig, device: str | torch.device = "cpu",
               model_cls: type[nn.Module] | None = None) -> nn.Module:
    """The model for ``model_config`` on ``device``, in ``model_config.dtype``, with all weights
    (``model_cls``: instead of the class its architecture names, e.g. an EAGLE head).

    Raises ValueError for an unsupported architecture or a checkpoint that lacks some of
    the model's parameters.
    """
    start = time.perf_counter()
    if model_config.hf_config is None:
        model_config.hf_config = read_hf_config(model_config.path or model_config.model)
    hf_config = model_config.hf_config
    model_cls = model_cls or resolve_model_class(hf_config, model_config.model_impl)
    path = model_config.path or model_config.model
    quantization = resolve_quantization(model_config.quantization or "none", path)
    dummy = model_config.load_format == "dummy"
    reader = None if dummy else CheckpointReader(path, hf_config, packed=quantization == "gguf")
    # Build on the meta device: no time spent on random init that the weights overwrite.
    with _default_dtype(_torch_dtype(model_config.dtype)), torch.device("meta"):
        model = model_cls(hf_config)
        if reader is not None and quantization in ("gguf", "int8"):
            model.use_packed_weights(reader.packed_formats(), int8=quantization == "int8")
    # to_empty() but with torch.empty: empty_like of a meta tensor runs torch's Python meta
    # reference, whose first call imports sympy (0.4 s of every start).
    model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    _build_caches(model)

    if reader is None:
        _init_dummy_weights(model, model_config.seed)
        model.eval()
        logger.info("Built %s with random (dummy) weights in %.2f s: %.1fM parameters in %s on %s.",
                    model_cls.__name__, time.perf_counter() - start,
                    sum(p.numel() for p in model.parameters()) / 1e6, model_config.dtype, device)
        return model

    _fill_from_checkpoint(model, reader)
    model.eval()
    num_params = sum(p.numel() for p in model.parameters())
    num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    packed = describe_packed(model)
    logger.info("Loaded %s (%s) in %.2f s: %.1fM float parameters, %.2f GB in %s on %s%s.",
                path, model_cls.__name__, time.perf_counter() - start, num_params / 1e6, num_bytes / 1e9,
                model_config.dtype, device, "" if packed.startswith("0 ") else f"; {packed}")
    return model


def _build_caches(model: nn.Module) -> None:
    """Rebuild what no checkpoint holds, after to_empty or a sleep that kept no copy: the
    rotary tables, and the model's own (``build_cache``: the transformers fallback's)."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_cache()
    if hasattr(model, "build_cache"):
        model.build_cache()


def _fill_from_checkpoint(model: nn.Module, reader: CheckpointReader) -> None:
    weights, total = _checkpoint_weights(reader)
    with torch.no_grad():
        model.load_weights(tqdm(weights, total=total, desc="Loading weights", unit="tensor",
                                leave=False, disable=None))
    del weights
    if reader.packed:
        reader.close()  # unmap the file: the packed weights were copied out of it


def reload_weights(model: nn.Module, model_config: ModelConfig) -> None:
    """Fill ``model`` (built by ``load_model`` from ``model_config``) with its checkpoint's
    weights again, in place (or its dummy weights, seeded as at load); rebuilds the rotary
    tables too (they may have been released with the weights)."""
    start = time.perf_counter()
    _build_caches(model)
    if model_config.load_format == "dummy":
        _init_dummy_weights(model, model_config.seed)
    else:
        path = model_config.path or model_config.model
        quantization = resolve_quantization(model_config.quantization or "none", path)
        _fill_from_checkpoint(model, CheckpointReader(path, model_config.hf_config, packed=quantization == "gguf"))
    logger.info("Reloaded the weights of %s in %.2f s.", model_config.path or model_config.model,
                time.perf_counter() - start)
