"""Install with `pip install torch==2.13.0 && pip install -e .[dev]` (see the Makefile)."""
from setuptools import find_packages, setup

setup(
    name="prefopt",
    version="0.1.0",
    description="A PyTorch Lightning research codebase for preference optimization of LLMs "
    "(DPO and reference choices, multi-reference DPO, on-policy learning, SamS).",
    python_requires=">=3.11",
    packages=find_packages(include=["lightning_modules*", "datamodules*", "callbacks*"]),
    install_requires=[
        # torch is installed first, pinned, by the Makefile; a looser range here would pull CUDA wheels.
        "torch==2.13.0",
        "lightning==2.6.6",
        "transformers==5.23.0",
        "tokenizers==0.23.3",
        "datasets==5.2.0",
        "omegaconf==2.4.0",
        "jsonargparse[signatures,omegaconf]==4.53.0",
        "tensorboard==2.21.0",
        "matplotlib==3.11.2",
        "numpy==2.4.6",
        "bitsandbytes==0.50.2",
        "accelerate==1.15.0",
        "peft==0.21.2",  # LoRA / QLoRA policies (lightning_modules/models/adapters.py)
    ],
    extras_require={
        "dev": ["pytest==9.2.0"],
        # DeepSpeed is an sdist that imports torch at build time: the Makefile installs it with
        # --no-build-isolation so the pinned CPU torch is used instead of a fresh CUDA build.
        "deepspeed": ["deepspeed==0.19.8"],
    },
)
