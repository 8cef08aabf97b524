"""Video and image decoding backends: PyAV (CPU) and NVIDIA DALI (GPU)."""
