"""End-to-end training runs: SFT, DPO and system-prompt distillation of an Aligner."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments, set_seed

from ..config import CONFIG_NAME, WEIGHTS_NAME, AlignerConfig, base_fingerprint
from ..files import append_line, write_atomic
from ..hf_patch import patch, trainable_parameters
from ..hub import resolve_aligner
from ..options import OptionError
from ..outputs import OutputDir, read_manifest
from ..prompts import DataError, Messages
from ..serialization import load, save
from .config import TrainConfig
from .data import (
    preference_collator,
    preference_examples,
    sft_collator,
    sft_examples,
    tokenize_preferences,
    tokenize_sft,
)
from .trainer import (
    METRICS_NAME,
    PLOT_NAME,
    RUN_INFO_NAME,
    AlignerDPOTrainer,
    AlignerTrainer,
    MetricsCallback,
    plot_losses,
)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training. The Aligner as it was is saved in ``output_dir`` and, once a step
    was done, a checkpoint ``checkpoint`` that ``resume`` continues from (None before the first step)."""

    def __init__(self, output_dir: Path, step: int, checkpoint: Path | None) -> None:
        if checkpoint is None:
            what = "before the first step ended: nothing to resume; start the run again over this output"
        else:
            what = f"the Aligner so far is saved in {output_dir}, and {checkpoint.name} to resume from"
        super().__init__(f"interrupted at step {step}; {what}")
        self.output_dir, self.step, self.checkpoint = output_dir, step, checkpoint


def attach_aligner(model: Any, config: TrainConfig) -> Any:
    """Patch ``model`` with a fresh Aligner drawn from ``config.seed``, or load ``config.init_aligner``
    (checked against the base, and against ``config.num_tokens`` / ``start_layer``: a value that
    differs from the saved Aligner's is refused, never silently replaced)."""
    if config.init_aligner:
        directory = resolve_aligner(config.init_aligner, argument="init_aligner")
        saved = AlignerConfig.from_pretrained(directory)
        for name in ("num_tokens", "start_layer"):
            given, has = getattr(config, name), getattr(saved, name)
            if given != has:
                raise OptionError(
                    f"{{{name}}} {given} conflicts with {{init_aligner}} {config.init_aligner}: "
                    f"that Aligner has {name} {has}; set {{{name}}} to it, or leave "
                    "{init_aligner} out to train a fresh Aligner"
                )
        return load(model, directory)
    # The prefix's N(0, 1) draw comes before the Trainer seeds its run: without this, the same seed
    # started from another random state and gave another Aligner.
    set_seed(config.seed)
    return patch(model, config=config.aligner_config())


def training_arguments(config: TrainConfig) -> TrainingArguments:
    """The transformers TrainingArguments of a run (one set-up for SFT, DPO and distillation)."""
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
        # Without an accelerator, accelerate runs a multi-process launch (torchrun) as CPU DDP only
        # when told use_cpu; otherwise every rank would train alone on the whole data set.
        use_cpu=not torch.accelerator.is_available(),
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


# --------------------------------------------------------------------------------------------
# What a run depends on, so that a checkpoint is only resumed into the same run


def base_info(model: Any) -> dict[str, Any]:
    """The base model's architecture fingerprint plus the SHA-256 of its input embeddings (first 4096
    rows, fp32): another checkpoint of the same architecture has other embeddings."""
    weight = model.get_input_embeddings().weight[:4096].detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(weight.numpy().tobytes()).hexdigest()
    return {**base_fingerprint(model.config), "embedding_sha256": digest}


def run_info(command: str, config: TrainConfig, base: dict[str, Any] | None, rows: Any) -> dict[str, Any]:
    """What ``aligner_run.json`` records: command, base model, data (SHA-256 of the tokenised rows)
    and the settings that must not change on resume. ``base`` / ``rows`` None: not compared."""
    info: dict[str, Any] = {"command": command, "config": config.fingerprint()}
    if base is not None:
        info["base"] = base
    if rows is not None:
        info["data_sha256"] = hashlib.sha256(json.dumps(list(rows), sort_keys=True).encode()).hexdigest()
    return info


def resume_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint ``config.resume`` names: the output directory's last checkpoint for True, the
    given directory for a path; None when not resuming."""
    if not config.resume:
        return None
    if config.resume is True:
        manifest = read_manifest(config.output_dir) if Path(config.output_dir).is_dir() else None
        steps = [
            int(name.split("-")[1])
            for name in (manifest or {"files": []})["files"]
            if re.fullmatch(r"checkpoint-\d+", name)
            and (Path(config.output_dir) / name / RUN_INFO_NAME).is_file()
        ]
        if not steps:
            raise OptionError(
                f"{{resume}}: {config.output_dir} holds no checkpoint of an aligner run to continue"
            )
        return Path(config.output_dir) / f"checkpoint-{max(steps)}"
    path = Path(config.resume)
    if not (path / "trainer_state.json").is_file():
        raise OptionError(f"{{resume}}: {path} is not a training checkpoint (no trainer_state.json in it)")
    return path


def check_resumable(checkpoint: Path, expected: dict[str, Any]) -> None:
    """Raise OptionError unless ``checkpoint`` was written by a run with the same command, base, data
    and settings as ``expected`` (a :func:`run_info`; keys absent from it are not compared)."""
    path = checkpoint / RUN_INFO_NAME
    if not path.is_file():
        raise OptionError(
            f"{{resume}}: {checkpoint} has no {RUN_INFO_NAME}, so it cannot be checked against this run"
        )
    saved = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    if saved.get("command") != expected["command"]:
        problems.append(f"it is an aligner {saved.get('command')} run, not {expected['command']}")
    if "base" in expected and saved.get("base") != expected["base"]:
        old = saved.get("base") or {}
        differing = [key for key in expected["base"] if old.get(key) != expected["base"][key]]
        problems.append(f"another base model (differs in {', '.join(differing)})")
    if "data_sha256" in expected and saved.get("data_sha256") != expected["data_sha256"]:
        problems.append("other training data")
    old_config = saved.get("config") or {}
    changed = [
        f"{{{key}}} {old_config.get(key)!r} -> {value!r}"
        for key, value in expected["config"].items()
        if old_config.get(key) != value
    ]
    if changed:
        problems.append("other settings: " + ", ".join(changed))
    if problems:
        raise OptionError(
            f"{{resume}}: {checkpoint} belongs to another run: {'; '.join(problems)}. Resume with the "
            "same base, data and settings, or start a new run in another directory (or with {overwrite})"
        )


def check_checkpoint(checkpoint: Path, command: str, config: TrainConfig) -> None:
    """Before the model loads (``aligner train --resume``): raise OptionError unless ``checkpoint`` was
    written by an ``aligner command`` run with ``config``'s settings. The base model and the data are
    compared when the run starts, once they are loaded and tokenised."""
    check_resumable(checkpoint, run_info(command, config, None, None))


# --------------------------------------------------------------------------------------------


def _run(trainer: AlignerTrainer, config: TrainConfig, title: str, command: str) -> dict[str, Any]:
    """Claim the output directory (:mod:`aligner.outputs`) for ``command`` (train, dpo or distill),
    check a resumed checkpoint, train and save. Ctrl-C saves
    the Aligner and a checkpoint of the last finished step."""
    output_dir = Path(config.output_dir)
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainer.run_info = run_info(command, config, base_info(model), trainer.train_dataset)
    checkpoint = resume_checkpoint(config)
    if checkpoint is not None:
        check_resumable(checkpoint, trainer.run_info)
    if trainer.args.should_save:
        trainer.output = OutputDir.claim(
            output_dir,
            trainer.run_info["command"],
            overwrite=config.overwrite,
            resume=bool(config.resume) and checkpoint is not None and checkpoint.parent == output_dir,
            inputs=[config.init_aligner],
        )
        trainer.output.own(METRICS_NAME, PLOT_NAME, CONFIG_NAME, WEIGHTS_NAME)
    metrics = output_dir / METRICS_NAME
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt as interrupt:
        saved = _save_on_interrupt(trainer)
        if trainer.args.should_save:
            save(model, output_dir)
            append_line(metrics, json.dumps({"step": trainer.state.global_step, "event": "interrupted"}))
            plot_losses(metrics, output_dir / PLOT_NAME, title)
        raise TrainingInterrupted(output_dir, trainer.state.global_step, saved) from interrupt
    finally:
        # Mixed precision wraps the model's forward in autocast; unwrapped, the caller's model
        # runs in its own precision again after training (else every later call stays bf16).
        trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    trainer.save_model(str(output_dir))
    trainable, total = trainable_parameters(model)
    summary = {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "seconds": result.metrics.get("train_runtime"),
    }
    if trainer.args.should_save:
        plot_losses(metrics, output_dir / PLOT_NAME, title)
        append_line(metrics, json.dumps({"event": "done", **summary}))
    return summary


def _save_on_interrupt(trainer: AlignerTrainer) -> Path | None:
    """A full checkpoint (Aligner, optimizer, scheduler, RNG, trainer state) of the last finished step,
    so that resume continues exactly there; None before the first step."""
    step = trainer.state.global_step
    if step == 0 or trainer.optimizer is None:
        return None
    checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    if not (checkpoint / RUN_INFO_NAME).is_file():
        trainer._save_checkpoint(trainer.model_wrapped, trial=None)
    return checkpoint


def _check_rows(rows: list, dropped: int, path: str | os.PathLike, max_length: int) -> None:
    if not rows:
        raise DataError(
            f"{path}: no usable rows: the prompts of all {dropped} rows fill max_length ({max_length} tokens)"
        )


def train_rows(
    model: Any,
    rows: list[dict[str, Any]],
    dropped: int,
    config: TrainConfig,
    *,
    trainer_class: type[AlignerTrainer],
    collator: Any,
    source: str,
    title: str,
    command: str,
    **trainer_options: Any,
) -> dict[str, Any]:
    """The one Trainer set-up of SFT, DPO and distillation: refuse an empty data set, attach the
    Aligner (fresh or ``config.init_aligner``), build ``trainer_class`` on the tokenised ``rows``
    and run it (:func:`_run`). Returns the run's summary with how many rows were ``dropped``."""
    _check_rows(rows, dropped, source, config.max_length)
    attach_aligner(model, config)
    trainer = trainer_class(
        model=model,
        args=training_arguments(config),
        train_dataset=rows,
        data_collator=collator,
        callbacks=[MetricsCallback(Path(config.output_dir) / METRICS_NAME), *config.callbacks],
        **trainer_options,
    )
    return {"dropped": dropped, **_run(trainer, config, title, command)}


def train_sft(
    model: Any,
    tokenizer: Any,
    examples: list[tuple[Messages, str]],
    config: TrainConfig,
    source: str = "data",
    *,
    command: str = "train",
) -> dict[str, Any]:
    """SFT of an Aligner on (prompt messages, completion) pairs; the loss covers completions only.
    ``command``: what the output directory's manifest calls the run (distillation's SFT form: distill)."""
    rows, dropped = tokenize_sft(tokenizer, examples, config.max_length)
    return train_rows(
        model, rows, dropped, config, trainer_class=AlignerTrainer,
        collator=sft_collator(tokenizer.pad_token_id), source=source, title="Aligner SFT loss",
        command=command,
    )  # fmt: skip


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
    return train_rows(
        model, rows, dropped, config, trainer_class=AlignerDPOTrainer,
        collator=preference_collator(tokenizer.pad_token_id), source=str(path), title="Aligner DPO loss",
        command="dpo", beta=config.beta,
    )  # fmt: skip


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write rows as JSON lines atomically (temporary file, then rename)."""
    return write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
