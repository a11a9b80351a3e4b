"""Piston's CUDA platform plugin (the reference platform): torch models on NVIDIA GPUs,
paged attention with Triton kernels or FlashAttention, cascade attention for shared
prefixes, and NCCL for tensor parallelism."""
