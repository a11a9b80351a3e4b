"""Compilation: trace the model once, split it at attention, compile and capture the pieces.

- ``attention_op``: the opaque ``piston::attention`` custom op the model calls under
  torch.compile (imported by the attention layer, so it stays light).
- ``piecewise``: traces the model with a dynamic ``num_tokens``, splits the FX graph at
  every attention op and compiles each piece (Inductor, or eager as a fallback).
- ``compile_cache``: compiled pieces on disk, so a second start-up skips Inductor.
- ``capture``: the capture-strategy interface, padding to capture sizes, the CPU strategy.
- ``cuda_graph``: the CUDA strategy, one CUDA graph per piece and capture size.
- ``compiled_model``: what the runner calls (``compile_model``, ``CompiledModel``) and the
  warm-up that captures graphs (``capture_graphs``).

A platform opts in through its TorchModelRunner before ``load_model``: it sets
``runner.capture_strategy`` (None runs the compiled pieces as they are) and
``runner.default_compilation_mode`` (what mode "auto" means there; "eager" unless set),
then calls ``runner.capture_model()`` from its worker's ``warm_up``.
Submodules are imported where they are used; this package imports nothing heavy.
"""
