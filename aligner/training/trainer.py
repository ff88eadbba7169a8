"""Hugging Face ``Trainer`` subclasses for Aligners: SFT and DPO, plus the output callbacks.

``Trainer`` does the loop, gradient accumulation, mixed precision, the DDP wrapping under
``torchrun`` / ``accelerate launch``, LR schedules, optimizer/scheduler/RNG checkpointing and
resuming. What is specific to an Aligner:

- the model's weights are the Aligner's few thousand parameters: ``save_model`` writes them with
  :func:`aligner.save` (a few KB) instead of the whole base model, and resuming loads them with
  :func:`aligner.load`;
- checkpoints are written into a staging directory and renamed into place, so an interrupted
  save never leaves a ``checkpoint-N`` that resuming would pick up half-written; each is recorded
  in the output directory's manifest (:mod:`aligner.outputs`) and carries ``aligner_run.json``, what
  the run depends on, which resuming checks;
- DPO's reference policy is the same model with the Aligner switched off
  (:func:`aligner.disabled`): no second copy of the base model. TRL's ``DPOTrainer`` can only
  do that for PEFT models (it disables their adapters); for any other model it loads a second
  copy from the hub / disk, so the DPO loss is computed here in ``compute_loss``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..files import append_line, write_atomic
from ..hf_patch import disabled
from ..outputs import OutputDir
from ..serialization import is_sharded, load, save

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss_curve.png"
RUN_INFO_NAME = "aligner_run.json"


class QuietProgressCallback(ProgressCallback):
    """Trainer's progress bar without its printing of every log dict to stdout (the logs go to
    ``metrics.jsonl`` and to whatever callback the caller adds)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        pass


class AlignerTrainer(Trainer):
    """``Trainer`` that saves and resumes only the Aligner, with atomically renamed checkpoints.

    ``output``: the :class:`~aligner.outputs.OutputDir` of the run (None on the processes that do not
    write), which records every checkpoint; only checkpoints it lists are rotated away. ``run_info``:
    what the run depends on (base model, data, settings), written into every checkpoint as
    ``aligner_run.json`` so that resuming can check it. Both are set by the run before training.
    Nothing is printed to stdout: the logs go to the callbacks (``metrics.jsonl``, the caller's).
    """

    _staging: Path | None = None
    output: OutputDir | None = None
    run_info: dict | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.remove_callback(PrinterCallback)
        self.remove_callback(ProgressCallback)
        if not self.args.disable_tqdm:
            self.add_callback(QuietProgressCallback)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        model = self.accelerator.unwrap_model(self.model)
        # Gathering FSDP2 shards is a collective: were only the main process to save, it would wait
        # forever for the others. Sharded, every rank saves (the same bytes, each file atomically).
        if self.args.should_save or is_sharded(model):
            save(model, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load(
            self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint
        )

    def _get_output_dir(self, trial: Any) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = f".staging-{name}"
        if self.output is not None:
            self.output.own(staging, name)
        self._staging = run_dir / staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged, final = run_dir / staging / name, run_dir / name
            if self.run_info is not None:
                write_atomic(staged / RUN_INFO_NAME, json.dumps(self.run_info, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)
            if self.output is not None:
                self.output.remove(staging)
                self._rotate()
        self.accelerator.wait_for_everyone()

    def _rotate(self) -> None:
        limit = self.args.save_total_limit
        checkpoints = sorted(
            (name for name in self.output.files if re.fullmatch(r"checkpoint-\d+", name)),
            key=lambda name: int(name.split("-")[-1]),
        )
        for old in checkpoints[:-limit] if limit else []:
            self.output.remove(old)


def sequence_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of log p(label) over the completion tokens (labels != -100) of each sequence."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    keep = labels != -100
    picked = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(-1)


class AlignerDPOTrainer(AlignerTrainer):
    """DPO (Rafailov et al. 2023, sigmoid loss) with the Aligner-less model as the reference policy.

    Batches hold B chosen sequences followed by B rejected ones (``preference_collator``).
    """

    def __init__(self, *args: Any, beta: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.beta = beta
        # compute_loss returns a per-batch mean: Trainer must divide it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self._stats: dict[str, list[float]] = {}

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Tensor | tuple[Tensor, Any]:
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        policy = sequence_logprobs(model(input_ids=ids, attention_mask=mask).logits, labels)
        base = self.accelerator.unwrap_model(model)
        with torch.no_grad(), disabled(base):
            reference = sequence_logprobs(base(input_ids=ids, attention_mask=mask).logits, labels)
        chosen, rejected = (policy - reference).chunk(2)
        margin = self.beta * (chosen - rejected)
        loss = -F.logsigmoid(margin).mean()
        for key, value in (
            ("rewards/chosen", self.beta * chosen),
            ("rewards/rejected", self.beta * rejected),
            ("rewards/margin", margin),
            ("rewards/accuracy", (margin > 0).float()),
        ):
            self._stats.setdefault(key, []).append(value.detach().mean().item())
        return (loss, {"margin": margin}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for key, values in self._stats.items():
            logs[key] = sum(values) / len(values)
        self._stats = {}
        super().log(logs, start_time)


class MetricsCallback(TrainerCallback):
    """Appends every log (loss, learning rate, ...) to ``metrics.jsonl`` as one JSON object a line,
    flushed at once; on the main process only. The last step is always logged, so that a run
    shorter than ``logging_steps`` still has a loss (and a loss plot)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_log = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
            append_line(self.path, json.dumps(record))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (an empty list if there is none). A line that is not
    JSON (torn by a crash mid-append) is skipped with a warning: the other records still count."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{number}: not JSON (torn by a crash?), skipped", stacklevel=2)
    return records


def plot_losses(
    metrics_path: str | os.PathLike, out_path: str | os.PathLike, title: str = "training loss"
) -> Path | None:
    """Write the loss curve of ``metrics.jsonl`` as a PNG (matplotlib, Agg backend); None without losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not records:
        return None
    out_path = Path(out_path)
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([r["step"] for r in records], [r["loss"] for r in records], marker=".")
    evals = [r for r in read_metrics(metrics_path) if "eval_loss" in r]
    if evals:
        axis.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o", label="held-out")
        axis.legend()
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png")
    plt.close(figure)
    return write_atomic(out_path, image.getvalue())
