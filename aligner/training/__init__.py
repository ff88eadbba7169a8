"""Training Aligners with the Hugging Face stack: data files through ``datasets``, loops through
``transformers.Trainer`` (DDP under ``torchrun`` / ``accelerate launch``), SFT, DPO and
system-prompt (context) distillation. Needs the ``train`` extra: ``pip install -e ".[train]"``."""

from __future__ import annotations

from ..lazy import lazy_exports

# Public name -> the submodule that defines it, imported on first use (PEP 562), so that
# ``import aligner`` and ``aligner --help`` do not pay for torch, transformers or the training stack.
# Loading, generation and prompts live outside training (``aligner generate`` does not import it);
# they stay importable from here, where they were first.
_EXPORTS = {
    "AlignerDPOTrainer": "trainer",
    "AlignerDistillTrainer": "distill",
    "AlignerTrainer": "trainer",
    "DataError": "aligner.prompts",
    "MetricsCallback": "trainer",
    "ModelLoadError": "aligner.models",
    "TrainConfig": "config",
    "TrainingInterrupted": "run",
    "attach_aligner": "run",
    "check_checkpoint": "run",
    "distill_examples": "distill",
    "distill_kl": "distill",
    "generate": "aligner.generation",
    "load_model": "aligner.models",
    "plot_losses": "trainer",
    "preference_examples": "data",
    "prompt_examples": "aligner.prompts",
    "resume_checkpoint": "run",
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
    "check_checkpoint",
    "distill_examples",
    "distill_kl",
    "generate",
    "load_model",
    "plot_losses",
    "preference_examples",
    "prompt_examples",
    "resume_checkpoint",
    "sequence_logprobs",
    "sft_examples",
    "train_distill",
    "train_dpo_file",
    "train_sft",
    "train_sft_file",
    "write_jsonl",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
