"""Context distillation: baking a system prompt into an Aligner (``aligner distill``).

The teacher is the base model WITH the system prompt, the student the same model WITHOUT it but
with the Aligner; the teacher is the student's model under :func:`aligner.disabled`, so there is
no second copy of the base model. First the teacher answers every instruction (its own
continuations: by default greedy, never repeating a run of three tokens, which keeps a small
model's prompted answers from looping), then the Aligner is trained with one of two losses:

- ``kl`` (default): at every position of the teacher's continuation, KL(teacher || student) over
  the whole vocabulary, teacher logits computed on the fly under ``torch.no_grad`` (caching them
  would cost vocabulary x tokens floats per example). The student learns the teacher's full
  next-token distribution, not just the one sampled token: context distillation proper.
- ``sft``: cross-entropy on the teacher's sampled tokens (the earlier ``distill``), i.e. SFT on
  the prompted model's answers.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import set_seed

from ..generation import generate
from ..hf_patch import disabled
from ..prompts import Messages, format_prompt
from .data import end_of_answer, pad_batch
from .run import TrainConfig, train_rows, train_sft
from .trainer import AlignerTrainer

LOSSES = ("kl", "sft")


def system_messages(system_prompt: str, prompt: str) -> Messages:
    """The teacher's context: the system prompt, then the instruction."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]


# TrainConfig's fields that say how the teacher answers (distill_examples' keywords of the same names)
TEACHER_OPTIONS = (
    "max_new_tokens", "temperature", "repetition_penalty", "no_repeat_ngram_size", "samples_per_prompt"
)  # fmt: skip
_DEFAULT = {item.name: item.default for item in fields(TrainConfig)}


def distill_examples(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    system_prompt: str,
    *,
    max_new_tokens: int = _DEFAULT["max_new_tokens"],
    batch_size: int = 8,
    temperature: float = _DEFAULT["temperature"],
    repetition_penalty: float = _DEFAULT["repetition_penalty"],
    no_repeat_ngram_size: int = _DEFAULT["no_repeat_ngram_size"],
    samples_per_prompt: int = _DEFAULT["samples_per_prompt"],
    seed: int | None = None,
    progress: bool = True,
) -> list[tuple[Messages, str]]:
    """The base model's answers WITH ``system_prompt`` (the teacher's continuations), paired with
    the prompts WITHOUT it: ``samples_per_prompt`` answers to each prompt, in the prompts' order;
    empty answers are dropped, and an answer identical to an earlier one to the same prompt is
    kept once. A model carrying an Aligner answers with it disabled. The generation options
    (defaults: ``TrainConfig``'s, which ``aligner distill``'s flags come from) are
    :func:`aligner.generation.generate`'s. ``seed`` (when given) makes sampled answers
    (``temperature`` > 0) the same every run."""
    if seed is not None:
        set_seed(seed)
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if samples_per_prompt > 1 and temperature == 0:
        raise ValueError(
            f"samples_per_prompt={samples_per_prompt} needs temperature > 0: greedy answers to one prompt "
            "are all the same"
        )
    with_system = [system_messages(system_prompt, p) for p in prompts for _ in range(samples_per_prompt)]
    options = dict(
        max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature,
        repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        progress=progress, desc="answering with the system prompt",
    )  # fmt: skip
    with disabled(model) if hasattr(model, "aligner_state") else contextlib.nullcontext():
        answers = generate(model, tokenizer, with_system, **options)
    examples, seen = [], set()
    for index, answer in enumerate(answers):
        prompt = prompts[index // samples_per_prompt]
        if answer and (prompt, answer) not in seen:
            seen.add((prompt, answer))
            examples.append(([{"role": "user", "content": prompt}], answer))
    return examples


def tokenize_distill(
    tokenizer: Any, examples: list[tuple[Messages, str]], system_prompt: str, max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """Rows holding the same completion tokens twice: after the student's prompt (``input_ids``,
    ``labels``) and after the teacher's, which adds ``system_prompt`` (``teacher_input_ids``,
    ``teacher_labels``); labels are -100 on prompt tokens. The completion is cut so that both
    sequences fit ``max_length``. Returns the rows and how many were dropped (no room left)."""
    rows = []
    for messages, answer in examples:
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise ValueError("distillation examples must be a single user message each")
        student = tokenizer(format_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
        teacher = tokenizer(
            format_prompt(tokenizer, system_messages(system_prompt, messages[0]["content"])),
            add_special_tokens=False,
        )["input_ids"]
        completion = tokenizer(answer + end_of_answer(tokenizer), add_special_tokens=False)["input_ids"]
        completion = completion[: max_length - max(len(student), len(teacher))]
        if not completion:
            continue
        rows.append(
            {
                "input_ids": student + completion,
                "labels": [-100] * len(student) + completion,
                "teacher_input_ids": teacher + completion,
                "teacher_labels": [-100] * len(teacher) + completion,
            }
        )
    return rows, len(examples) - len(rows)


def distill_collator(pad_id: int) -> Any:
    """Collate distillation rows: the student batch (input_ids, attention_mask, labels) and the
    teacher batch under the same names prefixed with ``teacher_``, each right-padded."""

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, Tensor]:
        batch = pad_batch(rows, pad_id)
        batch.update({f"teacher_{k}": v for k, v in pad_batch(rows, pad_id, prefix="teacher_").items()})
        return batch

    return collate


def distill_kl(
    student_logits: Tensor, labels: Tensor, teacher_logits: Tensor, teacher_labels: Tensor
) -> Tensor:
    """Mean over completion tokens of KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v)).

    student_logits (B, L_s, V) and teacher_logits (B, L_t, V) score the same completion tokens
    after different prompts; ``labels`` (B, L_s) / ``teacher_labels`` (B, L_t) mark them (-100
    elsewhere). The logits at position i predict token i + 1, so completion token j is scored at
    the position before it in each sequence. Computed in float32."""
    student_keep, teacher_keep = labels[:, 1:] != -100, teacher_labels[:, 1:] != -100
    if not torch.equal(student_keep.sum(1), teacher_keep.sum(1)):
        raise ValueError("student and teacher rows must hold the same number of completion tokens")
    student = student_logits[:, :-1][student_keep].float().log_softmax(-1)
    teacher = teacher_logits[:, :-1][teacher_keep].float().log_softmax(-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


class AlignerDistillTrainer(AlignerTrainer):
    """Context distillation with the KL loss of :func:`distill_kl`; the teacher is the same model
    with its Aligner disabled, reading the ``teacher_*`` inputs (prompt with the system prompt)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # compute_loss returns a per-batch mean: Trainer must divide it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self._agreement: list[float] = []

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Tensor | tuple[Tensor, Any]:
        student = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        base = self.accelerator.unwrap_model(model)
        with torch.no_grad(), disabled(base):
            teacher = base(
                input_ids=inputs["teacher_input_ids"], attention_mask=inputs["teacher_attention_mask"]
            ).logits
        labels, teacher_labels = inputs["labels"], inputs["teacher_labels"]
        loss = distill_kl(student, labels, teacher, teacher_labels)
        with torch.no_grad():  # how often the student's top token is the teacher's
            top_s = student[:, :-1][labels[:, 1:] != -100].argmax(-1)
            top_t = teacher[:, :-1][teacher_labels[:, 1:] != -100].argmax(-1)
            self._agreement.append((top_s == top_t).float().mean().item())
        return (loss, {"logits": student}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._agreement:
            logs["top1_agreement"] = sum(self._agreement) / len(self._agreement)
        self._agreement = []
        super().log(logs, start_time)


def train_distill(
    model: Any,
    tokenizer: Any,
    examples: list[tuple[Messages, str]],
    system_prompt: str,
    config: TrainConfig,
    *,
    loss: str = "kl",
    source: str = "data",
) -> dict[str, Any]:
    """Train an Aligner so that ``model`` without ``system_prompt`` behaves as with it, on the
    teacher's continuations ``examples`` (from :func:`distill_examples`); ``loss`` is ``"kl"``
    or ``"sft"`` (see the module docstring). Returns the run's summary (steps, loss, time, ...)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if not system_prompt.strip():
        raise ValueError("the system prompt is empty: there is nothing to distill")
    if loss == "sft":
        return {
            "distill_loss": loss,
            **train_sft(model, tokenizer, examples, config, source, command="distill"),
        }
    rows, dropped = tokenize_distill(tokenizer, examples, system_prompt, config.max_length)
    summary = train_rows(
        model, rows, dropped, config, trainer_class=AlignerDistillTrainer,
        collator=distill_collator(tokenizer.pad_token_id), source=source, title="Aligner distillation KL",
        command="distill",
    )  # fmt: skip
    return {"distill_loss": loss, **summary}
