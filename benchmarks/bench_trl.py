"""What a training step costs through TRL's trainers against aligner's own, on the same data, in one run.

The demo's task on SmolLM2-135M-Instruct (CPU): the 234 training instructions with the base model's
own answers (from the demos' per-machine cache, or generated) as ``{"answer": ...}``; for DPO that
form is "chosen" and the plain answer "rejected". A fresh 1-token Aligner on every layer, batch 8,
``--steps`` steps per row; reported per row: the median seconds of a step after the first, wall time
and this process's CPU time, and the ratio to aligner's own trainer of the same kind.

Rows: ``aligner train`` (:func:`aligner.training.train_sft`), TRL ``SFTTrainer`` in float32 and with
its defaults (bf16 autocast), ``aligner dpo`` (:func:`aligner.training.train_dpo_file`, reference =
the model with its Aligner disabled), TRL ``DPOTrainer`` with ``aligner.disabled_model`` as its
reference (no second copy) in float32 and with its defaults (bf16 autocast, gradient checkpointing).

    python benchmarks/bench_trl.py --steps 6
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from answer_forms import (
    CACHE_DIR,
    FORMS,
    START_LAYER,
    TRAIN_INSTRUCTIONS,
    BaseModelCache,
    cached_answers,
    load_demo_model,
    messages,
)
from transformers import TrainerCallback

import aligner
from aligner.training import TrainConfig, train_dpo_file, train_sft, write_jsonl

try:
    from .common import benchmark_parser, run_and_record
except ImportError:
    from common import benchmark_parser, run_and_record

BATCH = 8


class StepClock(TrainerCallback):
    """Wall and process CPU time of every optimizer step."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])

    def row(self, name: str) -> dict[str, Any]:
        """Medians over the steps after the first (which pays for warm-up)."""
        return {
            "method": name,
            "steps": len(self.wall),
            "step_s": statistics.median(self.wall[1:]),
            "step_cpu_s": statistics.median(self.cpu[1:]),
        }


def trl_config(kind: Any, out: str, steps: int, defaults: bool) -> Any:
    """TRL's config for a CPU run: its defaults (bf16 autocast, DPO's gradient checkpointing), or the
    same precision as aligner's own trainer (float32, no checkpointing)."""
    options = dict(
        output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=3e-2,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=steps, disable_tqdm=True,
    )  # fmt: skip
    if not defaults:
        options.update(bf16=False, gradient_checkpointing=False)
    return kind(**options)


def run_benchmark(args: Any) -> list[dict[str, Any]]:
    import datasets
    import trl

    model, tokenizer = load_demo_model(None)
    # The demos' answers (all sets, 32 new tokens, batches of 30: their defaults, so the cache holds them).
    cache = BaseModelCache(CACHE_DIR, model)
    answers = cached_answers(cache, model, tokenizer, limit=None, tokens=32, batch_size=30)
    train = [i for i in TRAIN_INSTRUCTIONS if answers[i]]
    sft_rows = [(messages(i), FORMS["json"].apply(answers[i])) for i in train]
    pairs = [{"prompt": i, "chosen": FORMS["json"].apply(answers[i]), "rejected": answers[i]} for i in train]
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-trl-"))

    def ours(name: str, command: str) -> None:
        clock = StepClock()
        config = TrainConfig(
            output_dir=str(work / name), num_tokens=1, start_layer=START_LAYER, lr=3e-2, max_steps=args.steps,
            batch_size=BATCH, save_steps=10**6, logging_steps=args.steps, progress=False, callbacks=[clock],
        )  # fmt: skip
        if command == "train":
            train_sft(model, tokenizer, sft_rows, config)
        else:
            train_dpo_file(model, tokenizer, write_jsonl(work / "pairs.jsonl", pairs), config)
        aligner.unpatch(model)
        rows.append(clock.row(name))

    def theirs(name: str, kind: str, defaults: bool) -> None:
        clock = StepClock()
        aligner.patch(model, num_tokens=1, start_layer=START_LAYER)
        torch.manual_seed(0)
        if kind == "sft":
            data = [{"prompt": p, "completion": [{"role": "assistant", "content": c}]} for p, c in sft_rows]
            trainer = trl.SFTTrainer(
                model=model, args=trl_config(trl.SFTConfig, str(work / name), args.steps, defaults),
                train_dataset=datasets.Dataset.from_list(data), processing_class=tokenizer, callbacks=[clock],
            )  # fmt: skip
        else:
            data = [
                {"prompt": messages(p["prompt"]), **{key: [{"role": "assistant", "content": p[key]}]
                                                     for key in ("chosen", "rejected")}}
                for p in pairs
            ]  # fmt: skip
            trainer = trl.DPOTrainer(
                model=model, ref_model=aligner.disabled_model(model),
                args=trl_config(trl.DPOConfig, str(work / name), args.steps, defaults),
                train_dataset=datasets.Dataset.from_list(data), processing_class=tokenizer, callbacks=[clock],
            )  # fmt: skip
        trainer.train()
        trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
        aligner.unpatch(model)
        rows.append(clock.row(name))

    ours("aligner train", "train")
    theirs("TRL SFTTrainer, float32", "sft", defaults=False)
    theirs("TRL SFTTrainer, defaults (bf16)", "sft", defaults=True)
    ours("aligner dpo", "dpo")
    theirs("TRL DPOTrainer + disabled_model, float32", "dpo", defaults=False)
    theirs("TRL DPOTrainer + disabled_model, defaults (bf16, checkpointing)", "dpo", defaults=True)
    for row in rows:
        own = "aligner dpo" if "dpo" in row["method"].lower() else "aligner train"
        base = next(r for r in rows if r["method"] == own)
        row["vs_aligner_cpu"] = round(row["step_cpu_s"] / base["step_cpu_s"], 3)
    return rows


if __name__ == "__main__":
    parser = benchmark_parser(__doc__, "trl-cpu-smollm2")
    parser.add_argument(
        "--steps", type=int, default=6, help="optimizer steps per row (the first is not timed)"
    )
    run_and_record(run_benchmark, parser)
