"""Piston's TPU platform plugin: JAX models, Pallas ragged paged attention, bucketed XLA programs."""
