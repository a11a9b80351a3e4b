"""The transformers fallback: a decoder-only causal LM Piston has no model of its own for,
run by transformers' modelling code with Piston's paged attention plugged in.

transformers lets a model's attention modules call any function registered in its
``AttentionInterface``; the model is built with ``attn_implementation="piston"``, whose
function hands q/k/v (after the rotary embedding) to a Piston ``Attention`` layer kept on
each attention module. That layer writes the paged KV cache and attends per sequence, so
continuous batching, prefix caching and chunked prefill work as for Piston's own models,
and under torch.compile the graph splits at its opaque op. transformers builds no mask for
an implementation that has no entry in its ``AttentionMaskInterface``, so none is made.

A step's flattened tokens run as one batch row: ``input_ids`` and ``position_ids`` [1, T].
Checkpoint tensors keep their Hugging Face names (transformers' own renamings, such as
GPT-NeoX's ``embed_out`` -> ``lm_head``, are applied). Torch only: the TPU platform's JAX
models cannot run it.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any, Callable, Iterable

import torch
from torch import nn

from piston.attention.layer import Attention
from piston.distributed.parallel_state import get_tp_size
from piston.models.weight_loader import materialize
from piston.step.config import hf_head_dim, hf_num_kv_heads

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "piston"
_registered = False


def piston_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over Piston's ``Attention`` layer.

    q [1, heads, T, head_dim], k/v [1, kv_heads, T, head_dim] -> ([1, T, heads, head_dim], None).
    The mask is ignored (there is none: Piston's attention masks causally per sequence).
    """
    layer = getattr(module, "piston_attn", None)
    if layer is None:
        raise RuntimeError(f"{type(module).__name__} has no Piston attention layer; build the model through "
                           "TransformersForCausalLM, which gives each attention module one.")
    _, heads, t, head_dim = query.shape
    if (heads, key.shape[1], head_dim) != (layer.num_heads, layer.num_kv_heads, layer.head_dim):
        raise RuntimeError(f"layer {layer.layer_idx}: transformers passes {heads} query and {key.shape[1]} KV heads "
                           f"of size {head_dim}; the KV cache was sized for {layer.num_heads}, "
                           f"{layer.num_kv_heads} and {layer.head_dim} (from the config).")
    if not torch.compiler.is_compiling():  # constants of the module: checked in eager calls only
        _check_call(module, layer, scaling, kwargs)
    q = query[0].transpose(0, 1).reshape(t, heads * head_dim)
    k = key[0].transpose(0, 1).reshape(t, layer.num_kv_heads * head_dim)
    v = value[0].transpose(0, 1).reshape(t, layer.num_kv_heads * head_dim)
    return layer(q, k, v).view(1, t, heads, head_dim), None


def _check_call(module: nn.Module, layer: Attention, scaling: float | None, kwargs: dict) -> None:
    """The call's arguments agree with what the layer was built with."""
    if scaling is not None and abs(scaling - layer.scale) > 1e-6 * layer.scale:
        raise RuntimeError(f"layer {layer.layer_idx}: transformers scales attention by {scaling}, the Piston layer "
                           f"was built with {layer.scale}.")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise RuntimeError("attention logit soft-capping and attention sinks are not supported by Piston's attention.")
    window = kwargs.get("sliding_window")
    max_len = getattr(getattr(module, "config", None), "max_position_embeddings", None)
    if window is not None and max_len is not None and window >= max_len:
        window = None  # covers the whole context
    if window != getattr(layer, "sliding_window", None):
        raise RuntimeError(f"layer {layer.layer_idx}: transformers asks for a sliding window of {window}, the "
                           f"Piston layer was built with {getattr(layer, 'sliding_window', None)}.")


def register_attention() -> None:
    """Register ``piston_attention`` as transformers' attention implementation "piston"."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_IMPLEMENTATION, piston_attention)
        _registered = True


def transformers_config(hf_config: Any) -> Any:
    """A transformers config object for ``hf_config``, of the fallback's own (building the
    model sets its attention implementation and dtype); a PlainConfig from another process
    is rebuilt through its model type's config class."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if isinstance(hf_config, PretrainedConfig):
        return copy.deepcopy(hf_config)
    values = hf_config.to_dict()
    model_type = values.get("model_type", "")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"model_type {model_type!r} (architectures {values.get('architectures')}) is unknown to "
                         "transformers, so the transformers fallback cannot build it.")
    return CONFIG_MAPPING[model_type].from_dict(values)


def causal_lm_class(config: Any) -> type[nn.Module]:
    """The transformers class that runs ``config`` as a decoder-only causal LM.

    Raises ValueError naming the architecture when it is none, or when the class does not
    route attention through transformers' attention interface (which the fallback needs).
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "")
    described = f"Model architecture {names or '(none given)'} (model_type {model_type!r})"
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{described} is an encoder-decoder model; the transformers fallback runs decoder-only "
                         "causal LMs.")
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    name = next((n for n in names if n in causal), None)
    if name is None and not names:
        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ValueError(f"{described} is not a decoder-only causal LM that transformers knows "
                         "(AutoModelForCausalLM has no class for it), so the transformers fallback cannot run it.")
    if config.get_text_config(decoder=True) is not config:
        raise ValueError(f"{described} is a multimodal model; the transformers fallback runs text-only decoders.")
    if not cls.is_backend_compatible():
        raise ValueError(f"{described}: transformers' {cls.__name__} does not route its attention through "
                         "transformers' attention interface (_supports_attention_backend), so Piston's paged "
                         "attention cannot be plugged in.")
    return cls


class TransformersForCausalLM(nn.Module):
    """A transformers causal LM over a step's flattened tokens, with Piston's attention.

    The same interface as LlamaForCausalLM: ``forward(input_ids [T], positions [T]) ->
    hidden [T, hidden]`` (the base model's last hidden state, after its final norm) and
    ``compute_logits(hidden [N, hidden]) -> [N, vocab]`` float32 (the LM head, then the
    logit scaling or soft-capping the architecture applies).

    One tensor-parallel rank only; packed (GGUF, int8) weights, LoRA adapters and EAGLE heads
    need Piston's own model classes and are refused.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        if get_tp_size() > 1:
            raise ValueError(f"tensor_parallel_size={get_tp_size()}: the transformers fallback runs on one rank; "
                             "use tensor_parallel_size=1.")
        register_attention()
        config = transformers_config(config)
        cls = causal_lm_class(config)
        self.architecture = cls.__name__
        self.config = config
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError(f"{self.architecture} soft-caps its attention logits "
                             f"(attn_logit_softcapping={config.attn_logit_softcapping}), which Piston's attention "
                             "does not do.")
        # Built in the caller's default dtype and device (the loader's meta device: no init cost).
        self.hf_model = cls._from_config(config, attn_implementation=ATTN_IMPLEMENTATION,
                                         dtype=torch.get_default_dtype()).eval()  # no dropout, from the start
        self.vocab_size = config.vocab_size
        self._attach_attention_layers()
        self._rename: Callable[[str], str] | None = None

    def _attach_attention_layers(self) -> None:
        """One Piston Attention layer per transformers attention module (``piston_attn``),
        with the config's head counts (those the runner sizes the KV cache by)."""
        config = self.config
        heads, kv_heads = config.num_attention_heads, hf_num_kv_heads(config)
        found: dict[int, str] = {}
        # transformers' attention modules are named *Attention and know their layer's index.
        modules = [(name, m) for name, m in self.hf_model.named_modules()
                   if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)]
        for name, module in modules:
            idx = module.layer_idx
            if idx in found:
                raise ValueError(f"{self.architecture}: attention modules {found[idx]} and {name} share layer_idx "
                                 f"{idx}; the transformers fallback needs one attention module per layer.")
            if not getattr(module, "is_causal", True):
                raise ValueError(f"{self.architecture}: {name} is not causal; the transformers fallback runs "
                                 "decoder-only causal LMs.")
            head_dim = getattr(module, "head_dim", None) or hf_head_dim(config)
            if head_dim != hf_head_dim(config):
                raise ValueError(f"{self.architecture}: {name} has head_dim {head_dim}, the config "
                                 f"{hf_head_dim(config)}; the KV cache would have the wrong shape.")
            window = self._sliding_window(module, idx)
            extra = {"sliding_window": window} if window is not None else {}
            scale = float(getattr(module, "scaling", head_dim ** -0.5))
            module.piston_attn = Attention(heads, head_dim, kv_heads, scale, idx, **extra)
            found[idx] = name
        if sorted(found) != list(range(config.num_hidden_layers)):
            raise ValueError(f"{self.architecture}: found softmax attention in layers {sorted(found)} of "
                             f"{config.num_hidden_layers}; the transformers fallback needs it in every layer (no "
                             "state-space or linear-attention layers).")

    def _sliding_window(self, module: nn.Module, idx: int) -> int | None:
        """The layer's sliding window, None for full attention (or a window that covers the
        whole context)."""
        config = self.config
        types = getattr(config, "layer_types", None)
        if hasattr(module, "sliding_window"):  # set per layer (Qwen2, Gemma 2); else read from the config
            window = module.sliding_window
        elif types is not None:
            window = config.sliding_window if types[idx] == "sliding_attention" else None
        else:
            window = getattr(config, "sliding_window", None)
        max_len = getattr(config, "max_position_embeddings", None)
        if not window or (max_len and window >= max_len):
            return None
        return int(window)

    @property
    def model(self) -> nn.Module:
        # Piston's LoRA layers and EAGLE heads reach into a native model's decoder as
        # ``model.model``: the fallback has none to offer, and says so.
        raise ValueError(f"{self.architecture} runs through the transformers fallback, which LoRA adapters and "
                         "EAGLE heads cannot attach to (they need Piston's own model of the architecture); serve "
                         "it without them.")

    # ----- the runner's interface ------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.hf_model.base_model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        return out.last_hidden_state[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.hf_model.get_output_embeddings()(hidden_states).float()
        return self._transform_logits(logits)[..., :self.vocab_size]

    def _transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What transformers' ForCausalLM forwards do to the LM head's output."""
        config = self.config
        scaling = getattr(config, "logits_scaling", None)  # Granite
        if scaling is not None:
            logits = logits / scaling
        scale = getattr(self.hf_model, "logit_scale", None)  # Cohere
        if isinstance(scale, (int, float)):
            logits = logits * scale
        cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def use_packed_weights(self, packed_names: Iterable[str], int8: bool = False) -> int:
        raise ValueError(f"quantization={'int8' if int8 else 'gguf'}: {self.architecture} runs through the "
                         "transformers fallback, which holds float weights only; use quantization='none' (a GGUF "
                         "file is then dequantized to the model's dtype).")

    def build_cache(self) -> None:
        """After ``to_empty`` (the loader builds on the meta device) or a sleep that kept no
        copy: recompute the buffers no checkpoint holds (rotary inv_freq, position ids) as
        transformers initializes them, and tie the LM head to the embedding again."""
        model = self.hf_model
        with torch.no_grad():
            for module in model.modules():
                if module._buffers and not isinstance(module, Attention):
                    model._init_weights(module)
        model.tie_weights()

    # ----- weights ---------------------------------------------------------------------

    def _renamer(self) -> Callable[[str], str]:
        """Checkpoint name -> parameter name, by transformers' renamings for the architecture."""
        if self._rename is None:
            self._rename = _checkpoint_renamer(self.hf_model)
        return self._rename

    def load_weights(self, weights: Iterable[tuple[str, Any]], partial: bool = False) -> int:
        """Copy Hugging Face-named tensors into the model; returns how many were copied.

        The contract of LlamaForCausalLM.load_weights: ValueError naming a parameter the
        checkpoint left unfilled or a tensor whose shape does not match; unknown names are
        logged and skipped (with ``partial``, a weight update of any subset, they are an
        error). A full load then checks that the logits equal transformers' own forward's
        on a few tokens (ValueError if not: the architecture transforms its logits in a way
        ``compute_logits`` does not know).
        """
        targets = self.hf_model.state_dict(keep_vars=True)  # tied aliases and persistent buffers included
        canonical = {id(t): n for n, t in [*self.hf_model.named_buffers(), *self.hf_model.named_parameters()]}
        ignored = [re.compile(p) for p in getattr(self.hf_model, "_keys_to_ignore_on_load_unexpected", None) or []]
        rename = self._renamer()
        if partial:  # every name is checked before any tensor is copied
            weights = list(weights)
            unknown = [n for n, _ in weights if rename(n) not in targets]
            if unknown:
                raise ValueError(f"{len(unknown)} weights have no place in this {self.architecture} "
                                 f"(e.g. {', '.join(unknown[:5])}); use the checkpoint's Hugging Face names.")
        filled: set[str] = set()
        unexpected = []
        count = 0
        for name, tensor in weights:
            target = rename(name)
            dst = targets.get(target)
            if dst is None:
                if not any(p.search(name) for p in ignored) and "rotary_emb.inv_freq" not in name:
                    unexpected.append(name)
                continue
            tensor = materialize(tensor)
            if dst.shape != tensor.shape:
                raise ValueError(f"Checkpoint tensor {name} has shape {tuple(tensor.shape)}, but the model expects "
                                 f"{tuple(dst.shape)}: the config does not match the weights.")
            dst.data.copy_(tensor)
            filled.add(canonical[id(dst)])
            count += 1
        if unexpected:
            logger.warning("Skipped %d checkpoint tensors the model has no place for: %s",
                           len(unexpected), ", ".join(unexpected[:5]))
        if partial:
            return count
        missing = [n for n, _ in self.hf_model.named_parameters() if n not in filled]
        if missing:
            raise ValueError(f"The checkpoint does not provide {len(missing)} of the model's parameters "
                             f"(e.g. {', '.join(missing[:5])}); is it a {self.architecture} checkpoint? (The "
                             "transformers fallback renames tensors as transformers does, but does not convert "
                             "them, e.g. into fused MoE experts.)")
        self._check_logits()
        return count

    @torch.no_grad()
    def _check_logits(self) -> None:
        """``compute_logits(forward(...))`` against transformers' ForCausalLM forward on four
        tokens (outside a forward context attention needs no KV cache)."""
        device = next(self.parameters()).device
        ids = torch.arange(1, 5, device=device) % self.vocab_size
        positions = torch.arange(4, device=device)
        ours = self.compute_logits(self.forward(ids, positions))
        theirs = self.hf_model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0]
        theirs = theirs.float()[..., :self.vocab_size]
        scale = float(theirs.abs().max())
        diff = float((ours - theirs).abs().max())
        if not diff <= 1e-2 * scale + 1e-5:
            raise ValueError(f"{self.architecture}: the transformers fallback's logits differ from transformers' own "
                             f"forward by up to {diff:.3g} (largest logit {scale:.3g}); the architecture transforms "
                             "its logits in a way the fallback does not apply.")


def _checkpoint_renamer(hf_model: nn.Module) -> Callable[[str], str]:
    """transformers' checkpoint-key renamings for ``hf_model`` (e.g. legacy ``gamma`` ->
    ``weight``, a base model's keys without its prefix) as a function of one name."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # another transformers release: names are taken as they are
        return lambda name: name
    renamings = [t for t in get_model_conversion_mapping(hf_model) if isinstance(t, WeightRenaming)]
    keys = dict.fromkeys(hf_model.state_dict(keep_vars=True), True)
    prefix = hf_model.base_model_prefix

    def rename(name: str) -> str:
        if name in keys:
            return name
        return rename_source_key(name, renamings, [], base_model_prefix=prefix, meta_state_dict=keys)[0]

    return rename
