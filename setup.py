from setuptools import find_packages, setup

setup(
    name="aligner-kernels",
    version="0.1.0",
    description="Aligner: one shared set of learnable tokens steering every layer through a gated, "
    "fused flash-attention prefix (Triton kernels + PyTorch library).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["aligner", "aligner.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.5",
        "triton>=3.2",
        "transformers>=4.48",
        "safetensors>=0.4",
        "numpy>=1.24",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6.100", "ruff>=0.6"],
        "bench": ["pytest-benchmark>=4", "peft>=0.13", "matplotlib>=3.7"],
    },
    license="Apache-2.0",
)
