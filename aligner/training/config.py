"""``TrainConfig``: the options of a training run, the one source of the training command-line flags
(each field's help text is in its metadata, as PEFT's configs do; ``aligner.cli`` builds the flags
from them). The Aligner's own fields (``num_tokens``, ``start_layer``) are ``AlignerConfig``'s: their
defaults, help and checks come from there (``start_layer`` 2, the paper's: steering every layer
from 0 was not better in benchmarks/RESULTS.md's measurements).

The defaults of a fresh run (``lr``, ``lr_scheduler``, ``epochs``) are the setting
that worked best for a first SFT run of a few hundred rows, measured on SmolLM2-135M-Instruct over
four behaviours of different kinds (a form, a sign-off, a persona, a language) by
``benchmarks/bench_defaults.py``; the table is in benchmarks/RESULTS.md. ``aligner dpo`` and
``aligner distill`` keep the lr, constant schedule and one epoch they were measured with
(``COMMAND_DEFAULTS``, their flags' defaults); from Python, ``TrainConfig`` has SFT's."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import SchedulerType, TrainerCallback

from ..config import AlignerConfig
from ..options import OptionError

SCHEDULERS = tuple(kind.value for kind in SchedulerType)
DEFAULTS_MEASURED = "measured on SmolLM2-135M over 4 behaviours, see benchmarks/RESULTS.md"
# The commands whose defaults differ from TrainConfig's (SFT's): the settings they were measured with
# (benchmarks/bench_trl.py, benchmarks/bench_distill.py). The command line's flags take them.
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "dpo": {"lr": 1e-3, "lr_scheduler": "constant", "epochs": 1.0},
    "distill": {"lr": 9e-3, "lr_scheduler": "constant", "epochs": 1.0},
}


def option(default: Any = None, help: str = "", *, resumable: bool = True, **metadata: Any) -> Any:
    """A ``TrainConfig`` field. ``resumable=False``: a value that must be the same to ``resume`` a run
    (it is part of the run's fingerprint). Other metadata: ``choices``, ``commands`` (the commands that
    have the flag; all by default), ``cli=False`` (no flag)."""
    kind = {"default_factory": default} if callable(default) else {"default": default}
    return field(**kind, metadata={"help": help, "fingerprint": not resumable, **metadata})


def aligner_option(name: str) -> Any:
    """A ``TrainConfig`` field that is ``AlignerConfig``'s field ``name`` (its default and help); the
    Aligner's shape cannot change on resume."""
    source = next(item for item in fields(AlignerConfig) if item.name == name)
    return option(source.default, source.metadata["help"], resumable=False)


@dataclass
class TrainConfig:
    """Options of ``aligner train``, ``dpo`` and ``distill`` (their command-line flags are these fields)."""

    output_dir: str = option(
        help="where the Aligner, metrics.jsonl, loss_curve.png and checkpoints go (new or empty; "
        "aligner_output.json in it lists what aligner wrote)",
        required=True,
    )
    overwrite: bool = option(
        False,
        "replace an earlier aligner output in the output directory (files aligner did not write are kept)",
    )
    resume: str | bool | None = option(
        None,
        "continue the run in the output directory from its last checkpoint, or from the given checkpoint "
        "directory (same base model, data and settings required)",
    )
    num_tokens: int = aligner_option("num_tokens")
    start_layer: int = aligner_option("start_layer")
    init_aligner: str | None = option(
        None, "start from this saved Aligner instead of a fresh one", resumable=False
    )
    lr: float = option(
        3e-2,
        "learning rate; train: 3e-2, which with the cosine schedule did as well as or better than 9e-3 "
        f"constant, {DEFAULTS_MEASURED}; dpo 1e-3 and distill 9e-3, with a constant schedule and one "
        "epoch, the settings they were measured with",
        resumable=False,
    )
    lr_scheduler: str = option(
        "cosine",
        "learning-rate schedule (train: cosine, to 0 at the last step; dpo and distill: constant)",
        resumable=False,
        choices=SCHEDULERS,
    )
    warmup_steps: int = option(0, "learning-rate warm-up steps", resumable=False)
    weight_decay: float = option(0.0, "AdamW weight decay", resumable=False)
    epochs: float = option(
        7.0,
        "training epochs; train: 7, 210 steps for 234 rows at batch 8, the length of the README's recipe "
        f"(2 epochs left the form, the persona and the language short of it), {DEFAULTS_MEASURED}; dpo "
        "and distill: 1",
    )
    max_steps: int = option(-1, "stop after this many optimizer steps (overrides the epochs; -1: no limit)")
    batch_size: int = option(8, "per-device batch size", resumable=False)
    grad_accum: int = option(1, "gradient accumulation steps", resumable=False)
    max_length: int = option(512, "tokens per example, prompt included", resumable=False)
    bf16: bool = option(False, "bfloat16 mixed precision", resumable=False)
    fp16: bool = option(False, "float16 mixed precision (CUDA)", resumable=False)
    logging_steps: int = option(5, "log the loss every this many steps")
    save_steps: int = option(50, "write a checkpoint every this many steps")
    save_total_limit: int = option(2, "checkpoints kept (the oldest are deleted)")
    seed: int = option(0, "random seed", resumable=False)
    beta: float = option(0.1, "DPO temperature beta", resumable=False, commands=("dpo",))
    # distill: how the prompted model (the teacher) answers the instructions
    max_new_tokens: int = option(
        128, "length of the teacher's answers (tokens)", resumable=False, commands=("distill",)
    )
    temperature: float = option(
        0.0,
        "sampling temperature of the teacher's answers; 0: greedy",
        resumable=False,
        commands=("distill",),
    )
    repetition_penalty: float = option(
        1.0,
        "repetition penalty of the teacher's answers (> 1 discourages repeated tokens; 1: off)",
        resumable=False,
        commands=("distill",),
    )
    no_repeat_ngram_size: int = option(
        3,
        "the teacher's answers never repeat an n-gram of this many tokens (0: off)",
        resumable=False,
        commands=("distill",),
    )
    samples_per_prompt: int = option(
        1,
        "teacher answers per instruction (with --temperature > 0; identical answers to one instruction "
        "are kept once)",
        resumable=False,
        commands=("distill",),
    )
    progress: bool = option(True, "progress bars (on stderr)")
    callbacks: list[TrainerCallback] = option(list, "extra transformers TrainerCallbacks", cli=False)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise OptionError("{output_dir} is required: where the Aligner and its checkpoints go")
        self.aligner_config()  # num_tokens and start_layer
        positive = ("batch_size", "grad_accum", "max_length", "logging_steps", "save_steps")
        positive += ("max_new_tokens", "samples_per_prompt")
        for name in (*positive, "save_total_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{{{name}}} must be an integer >= 1, got {value!r}")
        warmup = self.warmup_steps
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise OptionError(f"{{warmup_steps}} must be an integer >= 0, got {warmup!r}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps == 0:
            raise OptionError(
                f"{{max_steps}} must be >= 1 (or -1 to train {{epochs}} epochs), got {self.max_steps!r}"
            )
        if self.max_steps < -1:
            raise OptionError(
                f"{{max_steps}} must be >= 1 (or -1 to train {{epochs}} epochs), got {self.max_steps}"
            )
        for name in ("lr", "epochs", "beta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise OptionError(f"{{{name}}} must be a finite number > 0, got {value!r}")
        temperature = self.temperature
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise OptionError(f"{{temperature}} must be >= 0 and finite (0: greedy), got {temperature!r}")
        if self.samples_per_prompt > 1 and temperature == 0:
            raise OptionError(
                "{samples_per_prompt} > 1 needs {temperature} > 0: greedy answers to one instruction are "
                "all the same"
            )
        ngram = self.no_repeat_ngram_size
        if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 0:
            raise OptionError(f"{{no_repeat_ngram_size}} must be an integer >= 0 (0: off), got {ngram!r}")
        penalty = self.repetition_penalty
        if not isinstance(penalty, (int, float)) or not math.isfinite(penalty) or penalty <= 0:
            raise OptionError(f"{{repetition_penalty}} must be a finite number > 0 (1: off), got {penalty!r}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise OptionError(f"{{weight_decay}} must be a finite number >= 0, got {self.weight_decay!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise OptionError(
                f"{{lr_scheduler}} must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}"
            )
        if self.bf16 and self.fp16:
            raise OptionError("{bf16} and {fp16} exclude each other: choose one mixed precision")
        if self.overwrite and self.resume:
            raise OptionError("{overwrite} and {resume} exclude each other: start over or continue, not both")

    def aligner_config(self) -> AlignerConfig:
        """The Aligner a fresh run patches in (``init_aligner`` brings its own)."""
        return AlignerConfig(num_tokens=self.num_tokens, start_layer=self.start_layer)

    def fingerprint(self) -> dict[str, Any]:
        """The values that must be the same for a run to be resumed."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["fingerprint"]}
