"""Attention backends of the CUDA platform behind piston's AttentionImpl interface.

``triton`` (our kernels, always available with Triton) and ``flash_attn`` (FlashAttention
3 or 2, when installed); ``selector`` picks one. Both share the metadata and cascade
decision of ``metadata``/``cascade``.
"""
