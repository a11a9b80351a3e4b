"""The torch models (Llama family), their layers and weight loading, shared by the CPU and
CUDA platforms. A step's tokens arrive flattened; attention goes through the platform's
backend (piston.attention)."""
