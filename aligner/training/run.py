"""End-to-end training runs: SFT, DPO and system-prompt distillation of an Aligner."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from ..patch import patch, trainable_parameters
from ..serialization import load, save
from .data import (
    DataError,
    Messages,
    preference_collator,
    preference_examples,
    sft_collator,
    sft_examples,
    tokenize_preferences,
    tokenize_sft,
)
from .trainer import METRICS_NAME, PLOT_NAME, AlignerDPOTrainer, AlignerTrainer, MetricsCallback, plot_losses


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the Aligner as it was has been saved to ``output_dir``."""

    def __init__(self, output_dir: Path, step: int) -> None:
        super().__init__(f"interrupted at step {step}; the Aligner so far is saved in {output_dir}")
        self.output_dir, self.step = output_dir, step


@dataclass
class TrainConfig:
    """Options shared by ``aligner train``, ``dpo`` and ``distill`` (the CLI flags of the same names)."""

    output_dir: str
    num_tokens: int = 1
    start_layer: int = 2
    lr: float = 9e-3
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    bf16: bool = False
    fp16: bool = False
    logging_steps: int = 5
    save_steps: int = 50
    save_total_limit: int = 2
    seed: int = 0
    beta: float = 0.1
    resume: str | bool | None = None
    init_aligner: str | None = None
    progress: bool = True
    callbacks: list[TrainerCallback] = field(default_factory=list)


def attach_aligner(model: Any, config: TrainConfig) -> Any:
    """Patch ``model`` with a fresh Aligner, or load ``config.init_aligner`` (checked against the base)."""
    if config.init_aligner:
        return load(model, config.init_aligner)
    return patch(model, config.num_tokens, config.start_layer)


def _arguments(config: TrainConfig) -> TrainingArguments:
    return TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        bf16=config.bf16,
        fp16=config.fp16,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=not config.progress,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def _run(trainer: AlignerTrainer, config: TrainConfig, title: str) -> dict[str, Any]:
    output = Path(config.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    metrics = output / METRICS_NAME
    if not config.resume and trainer.args.should_save and metrics.exists():
        metrics.unlink()  # a fresh run starts a fresh log; a resumed one appends
    try:
        result = trainer.train(resume_from_checkpoint=config.resume or None)
    except KeyboardInterrupt as interrupt:
        if trainer.args.should_save:
            save(model, output)
            with open(metrics, "a", encoding="utf-8") as file:
                file.write(json.dumps({"step": trainer.state.global_step, "event": "interrupted"}) + "\n")
            plot_losses(metrics, output / PLOT_NAME, title)
        raise TrainingInterrupted(output, trainer.state.global_step) from interrupt
    trainer.save_model(str(output))
    trainable, total = trainable_parameters(model)
    summary = {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "seconds": result.metrics.get("train_runtime"),
    }
    if trainer.args.should_save:
        plot_losses(metrics, output / PLOT_NAME, title)
        with open(metrics, "a", encoding="utf-8") as file:
            file.write(json.dumps({"event": "done", **summary}) + "\n")
    return summary


def _check_rows(rows: list, dropped: int, path: str | os.PathLike, max_length: int) -> None:
    if not rows:
        raise DataError(f"{path}: no usable rows: all {dropped} prompts fill --max-length {max_length}")


def train_sft(
    model: Any,
    tokenizer: Any,
    examples: list[tuple[Messages, str]],
    config: TrainConfig,
    source: str = "data",
) -> dict[str, Any]:
    """SFT of an Aligner on (prompt messages, completion) pairs; the loss covers completions only."""
    rows, dropped = tokenize_sft(tokenizer, examples, config.max_length)
    _check_rows(rows, dropped, source, config.max_length)
    attach_aligner(model, config)
    trainer = AlignerTrainer(
        model=model,
        args=_arguments(config),
        train_dataset=rows,
        data_collator=sft_collator(tokenizer.pad_token_id),
        callbacks=[MetricsCallback(Path(config.output_dir) / METRICS_NAME), *config.callbacks],
    )
    return {"dropped": dropped, **_run(trainer, config, "Aligner SFT loss")}


def train_sft_file(
    model: Any, tokenizer: Any, path: str | os.PathLike, config: TrainConfig
) -> dict[str, Any]:
    """``aligner train``: SFT on an Alpaca or chat JSON/JSONL file."""
    return train_sft(model, tokenizer, sft_examples(path), config, str(path))


def train_dpo_file(
    model: Any, tokenizer: Any, path: str | os.PathLike, config: TrainConfig
) -> dict[str, Any]:
    """``aligner dpo``: DPO on preference pairs; the reference is the model with its Aligner disabled."""
    rows, dropped = tokenize_preferences(tokenizer, preference_examples(path), config.max_length)
    _check_rows(rows, dropped, path, config.max_length)
    attach_aligner(model, config)
    trainer = AlignerDPOTrainer(
        model=model,
        args=_arguments(config),
        train_dataset=rows,
        data_collator=preference_collator(tokenizer.pad_token_id),
        callbacks=[MetricsCallback(Path(config.output_dir) / METRICS_NAME), *config.callbacks],
        beta=config.beta,
    )
    return {"dropped": dropped, **_run(trainer, config, "Aligner DPO loss")}


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write rows as JSON lines atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
