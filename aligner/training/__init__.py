"""Training Aligners with the Hugging Face stack: data files through ``datasets``, loops through
``transformers.Trainer`` (DDP under ``torchrun`` / ``accelerate launch``), SFT, DPO and
system-prompt (context) distillation. Needs the ``train`` extra: ``pip install -e ".[train]"``."""

from __future__ import annotations

from ..lazy import lazy_exports

# Public name -> the submodule that defines it, imported on first use (PEP 562), so that
# ``import aligner`` and ``aligner --help`` do not pay for torch, transformers or the training stack.
_EXPORTS = {
    "AlignerDPOTrainer": "trainer",
    "AlignerDistillTrainer": "distill",
    "AlignerTrainer": "trainer",
    "DataError": "data",
    "MetricsCallback": "trainer",
    "ModelLoadError": "models",
    "TrainConfig": "config",
    "TrainingInterrupted": "run",
    "attach_aligner": "run",
    "distill_examples": "distill",
    "distill_kl": "distill",
    "generate": "models",
    "load_model": "models",
    "plot_losses": "trainer",
    "preference_examples": "data",
    "prompt_examples": "data",
    "sequence_logprobs": "trainer",
    "sft_examples": "data",
    "train_distill": "distill",
    "train_dpo_file": "run",
    "train_sft": "run",
    "train_sft_file": "run",
    "write_jsonl": "run",
}

__all__ = [
    "AlignerDPOTrainer",
    "AlignerDistillTrainer",
    "AlignerTrainer",
    "DataError",
    "MetricsCallback",
    "ModelLoadError",
    "TrainConfig",
    "TrainingInterrupted",
    "attach_aligner",
    "distill_examples",
    "distill_kl",
    "generate",
    "load_model",
    "plot_losses",
    "preference_examples",
    "prompt_examples",
    "sequence_logprobs",
    "sft_examples",
    "train_distill",
    "train_dpo_file",
    "train_sft",
    "train_sft_file",
    "write_jsonl",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
