"""Reading checkpoints without torch: safetensors folders and GGUF files, as numpy arrays.

Every platform loads weights through here (the torch models wrap the arrays as tensors
without a copy; the JAX models stack them by layer), so a platform that does not use
torch never imports it.
"""
