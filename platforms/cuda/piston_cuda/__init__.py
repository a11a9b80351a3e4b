"""Piston's CUDA platform plugin (reference platform; its model runner is not built yet)."""
