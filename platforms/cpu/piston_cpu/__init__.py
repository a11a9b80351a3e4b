"""Piston's CPU platform plugin: torch models, SDPA paged attention, eager execution."""
