"""The paper's comparison (its Tables 1-3 claim) at small scale, on a model that runs on a CPU.

Same task, data and budget for every method: the ``make demo`` form-adaptation task (the base
model's own answers wrapped as ``{"answer": ...}``; the training and held-out instructions of
benchmarks/answer_forms.py) on SmolLM2-135M-Instruct, the same number of steps, batch size and
transformers ``Trainer`` loop. Methods:

- Aligner, N = 1 and N = 10 (start layer 2);
- LLaMA-Adapter: PEFT ``AdaptionPrompt``, 10 tokens in each of the same 28 layers;
- LoRA: PEFT, r = 8 on q_proj and v_proj.

Reported per method: trainable parameters, held-out loss of the targets, held-out form
compliance (greedy replies), seconds per training step. Writes
``benchmarks/results/compare_methods.json`` and ``compare_methods.md``.

    python benchmarks/compare_methods.py [--steps 80] [--methods aligner-1 lora ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from answer_forms import (
    FORMS,
    HELDOUT_INSTRUCTIONS,
    SMOLLM2_GGUF,
    TRAIN_INSTRUCTIONS,
    base_answers,
    compliance,
    messages,
    smollm2_directory,
    target_loss,
)
from transformers import Trainer, TrainingArguments

from aligner.files import write_atomic
from aligner.training import generate, load_model
from aligner.training.data import format_prompt, sft_collator, tokenize_pair
from aligner.training.trainer import AlignerTrainer

try:  # as a module of the benchmarks package, or as a script
    from .models import with_method
except ImportError:
    from models import with_method

RESULTS = Path(__file__).parent / "results"
METHODS = ("aligner-1", "aligner-10", "adaption-prompt-10", "lora-8")
DEFAULT_LR = {"aligner-1": 9e-3, "aligner-10": 9e-3, "adaption-prompt-10": 9e-3, "lora-8": 1e-3}


def prepare(method: str, base: Any) -> tuple[Any, type[Trainer]]:
    """A fresh copy of the base model carrying ``method``'s trainable parameters, and its Trainer class."""
    return with_method(base, method), AlignerTrainer if method.startswith("aligner-") else Trainer


def run_method(
    method: str, base: Any, tokenizer: Any, task: dict[str, Any], args: argparse.Namespace
) -> dict:
    model, trainer_class = prepare(method, base)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = [
        tokenize_pair(tokenizer, format_prompt(tokenizer, messages(i)), t, 256)
        for i, t in zip(task["train_instructions"], task["train_targets"])
    ]
    lr = args.lr or DEFAULT_LR[method]
    training_args = TrainingArguments(
        output_dir=str(args.work_dir / method),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=lr,
        lr_scheduler_type=args.lr_scheduler,
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        seed=args.seed,
        dataloader_pin_memory=False,
        disable_tqdm=False,
    )
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=rows,
        data_collator=sft_collator(tokenizer.pad_token_id),
    )
    result = trainer.train()
    model.eval()
    replies = generate(
        model,
        tokenizer,
        [messages(i) for i in task["held_instructions"]],
        max_new_tokens=args.reply_tokens,
        batch_size=20,
        desc=f"held-out replies ({method})",
    )
    return {
        "method": method,
        "trainable_parameters": trainable,
        "lr": lr,
        "heldout_loss": target_loss(model, tokenizer, task["held_instructions"], task["held_targets"]),
        "compliance": compliance(FORMS["json"], replies),
        "seconds_per_step": result.metrics["train_runtime"] / max(result.global_step, 1),
        "final_train_loss": result.training_loss,
        "samples": replies[:3],
    }


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    names = {
        "aligner-1": "Aligner N=1",
        "aligner-10": "Aligner N=10",
        "adaption-prompt-10": "LLaMA-Adapter (PEFT AdaptionPrompt, 10 tokens)",
        "lora-8": "LoRA r=8 (q, v)",
    }
    lines = [
        f'SmolLM2-135M-Instruct ({SMOLLM2_GGUF}), form adaptation to {{"answer": ...}}: '
        f"{meta['train']} training / {meta['held']} held-out instructions, {meta['steps']} steps "
        f"({meta['lr_scheduler']} schedule), "
        f"batch {meta['batch_size']}, {meta['device']}.",
        "",
        "| method | trainable params | held-out loss | held-out compliance | s/step | lr |",
        "|---|---|---|---|---|---|",
    ]
    for row in results:
        if "error" in row:
            lines.append(f"| {names[row['method']]} | failed: {row['error']} | | | | |")
            continue
        lines.append(
            f"| {names[row['method']]} | {row['trainable_parameters']:,} | {row['heldout_loss']:.3f} | "
            f"{row['compliance']:.0%} | {row['seconds_per_step']:.2f} | {row['lr']:g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr-scheduler", default="cosine")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--lr", type=float, help="one learning rate for all (default: per method, see DEFAULT_LR)"
    )
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/aligner-compare"))
    args = parser.parse_args(argv)
    args.reply_tokens = args.answer_tokens + 16
    torch.manual_seed(args.seed)

    base, tokenizer = load_model(str(smollm2_directory()), gguf_file=SMOLLM2_GGUF)
    instructions = TRAIN_INSTRUCTIONS + HELDOUT_INSTRUCTIONS
    answers = base_answers(base, tokenizer, instructions, args.answer_tokens, batch_size=20)
    keep = [i for i, answer in enumerate(answers) if answer]  # drop empty answers
    num_train = len(TRAIN_INSTRUCTIONS)
    task = {
        "train_instructions": [instructions[i] for i in keep if i < num_train],
        "train_targets": [FORMS["json"].apply(answers[i]) for i in keep if i < num_train],
        "held_instructions": [instructions[i] for i in keep if i >= num_train],
        "held_targets": [FORMS["json"].apply(answers[i]) for i in keep if i >= num_train],
    }
    meta = {
        "steps": args.steps,
        "lr_scheduler": args.lr_scheduler,
        "batch_size": args.batch_size,
        "train": len(task["train_targets"]),
        "held": len(task["held_targets"]),
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }
    results = []
    for method in args.methods:
        start = time.time()
        try:
            row = run_method(method, base, tokenizer, task, args)
        except (
            Exception
        ) as error:  # one failing method (e.g. a PEFT/transformers mismatch) is reported, not fatal
            traceback.print_exc()
            row = {"method": method, "error": f"{type(error).__name__}: {str(error)[:200]}"}
        row["wall_seconds"] = time.time() - start
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        write_atomic(
            args.out / "compare_methods.json", json.dumps({"meta": meta, "results": results}, indent=2)
        )
        write_atomic(args.out / "compare_methods.md", markdown(results, meta))
    print(markdown(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
