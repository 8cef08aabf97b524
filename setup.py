"""megatron_mfm: Many-for-Many video DiT pretraining on megatron-core."""

from setuptools import find_packages, setup

PRETRAINED = ["diffusers>=0.30", "transformers>=4.56", "sentencepiece"]

setup(
    name="megatron_mfm",
    version="0.1.0",
    description="Megatron-Core pretraining of the Many-for-Many (MfM) video diffusion transformer",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_mfm", "megatron_mfm.*"]),
    install_requires=[
        # torch is deliberately unpinned here: the Makefile installs the CPU build on CPU
        # machines, GPU machines bring their own CUDA build.
        "torch>=2.5",
        "megatron-core==0.16.1",
        "psutil",  # megatron-core 0.16.1 needs it to save checkpoints but does not declare it
        "safetensors>=0.4",
        "numpy",
        "einops",
        "pyyaml",
        "av",  # PyAV: mp4 writing (samples) and CPU video decoding
        "pillow",
        "tqdm",
        "tensorboard",
        "wandb",  # offline unless configured
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]==2.20.2"],
        "dali": ["nvidia-dali-cuda130"],
        # the real frozen encoders (CogVideoX VAE, T5 + sentencepiece tokenizer, Depth-Anything-V2)
        "pretrained": PRETRAINED,
        # the tests build tiny random versions of the pretrained encoders and compare against them,
        # and check DALI's CPU decoder (VP9) against PyAV (the CUDA-13 wheel runs on CPU-only machines)
        "dev": ["pytest>=8", "pytest-timeout", *PRETRAINED, "nvidia-dali-cuda130"],
    },
)
