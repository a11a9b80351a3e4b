"""Piston's TPU platform plugin (JAX + Pallas; its model runner is not built yet)."""
