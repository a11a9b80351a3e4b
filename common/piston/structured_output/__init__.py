"""Structured outputs: grammars (JSON schema, regex, choice, EBNF/Lark) that constrain decoding.

Grammars are compiled and matched in the EngineCore process, following the scheduler's
accepted tokens; each step ships a packed token bitmask for the constrained rows, which
each platform's sampler applies with one vector operation. Two engines sit behind one
small interface (``backend``): xgrammar and llguidance (no torch needed, so the TPU
platform's torch-free engine can use it).
"""
