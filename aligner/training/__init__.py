"""Training Aligners with the Hugging Face stack: data files through ``datasets``, loops through
``transformers.Trainer`` (DDP under ``torchrun`` / ``accelerate launch``), SFT, DPO and
system-prompt (context) distillation. Needs the ``train`` extra: ``pip install -e ".[train]"``."""

from .config import TrainConfig
from .data import DataError, preference_examples, prompt_examples, sft_examples
from .distill import AlignerDistillTrainer, distill_examples, distill_kl, train_distill
from .models import ModelLoadError, generate, load_model
from .run import (
    TrainingInterrupted,
    attach_aligner,
    train_dpo_file,
    train_sft,
    train_sft_file,
    write_jsonl,
)
from .trainer import AlignerDPOTrainer, AlignerTrainer, MetricsCallback, plot_losses, sequence_logprobs

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
