"""The torch model runner shared by the CPU and CUDA platforms, and its sampler."""
