"""The same seed gives the same run (issue 23 part 1): every command that trains (train, dpo,
distill), from the command line and from Python, gives bit-identical Aligners and losses for a given
seed whatever random state the process was in before, and a run interrupted by Ctrl-C and resumed
ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets", reason="needs the train extra: pip install -e '.[train]'")
pytest.importorskip("matplotlib", reason="needs the train extra: pip install -e '.[train]'")

from test_training import ALPACA_ROWS, _InterruptAt, write_jsonl  # noqa: E402
from tiny_models import save_tiny_model  # noqa: E402

import aligner  # noqa: E402
from aligner.cli import main  # noqa: E402
from aligner.models import load_model  # noqa: E402
from aligner.serialization import WEIGHTS_NAME  # noqa: E402
from aligner.training import TrainConfig, TrainingInterrupted, sft_examples, train_sft  # noqa: E402

PREFERENCES = [
    {"prompt": "is the cat good", "chosen": "yes the cat is good", "rejected": "no"},
    {"prompt": "what do bees make", "chosen": "bees make honey", "rejected": "red"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("repro") / "model")


def digest(output_dir: Path) -> str:
    return hashlib.sha256((output_dir / WEIGHTS_NAME).read_bytes()).hexdigest()


def logged(output_dir: Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def command_line(command: str, model_dir: Path, tmp_path: Path) -> list[str]:
    if command == "dpo":
        data = ["--data", write_jsonl(tmp_path / "p.jsonl", PREFERENCES)]
    elif command == "distill":
        data = ["--data", write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS), "--system-prompt", "reply yes",
                "--max-new-tokens", "4", "--temperature", "1.0"]  # fmt: skip
    else:
        data = ["--data", write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)]
    return [command, model_dir, *data, "--max-steps", "3", "--batch-size", "2", "--logging-steps", "1",
            "--num-tokens", "2", "--no-progress"]  # fmt: skip


@pytest.mark.parametrize("command", ["train", "dpo", "distill"])
def test_the_same_seed_gives_the_same_aligner(command, model_dir, tmp_path):
    """Two runs with --seed 5 started from different random states are bit-identical (weights, the
    logged losses and gradient norms, and distill's sampled teacher answers); --seed 6 differs."""
    argv = command_line(command, model_dir, tmp_path)
    runs = {}
    for name, seed, state in (("a", 5, 1), ("b", 5, 2), ("c", 6, 1)):
        torch.manual_seed(state)  # whatever the process did before must not matter
        torch.rand(state)
        out = tmp_path / name
        assert main([str(a) for a in [*argv, "--output-dir", out, "--seed", seed]]) == 0
        runs[name] = (digest(out), logged(out), logged(out, "grad_norm"))
        if command == "distill":
            runs[name] += ((out / "distilled.jsonl").read_text(),)
    assert runs["a"] == runs["b"]
    assert runs["a"][0] != runs["c"][0]


def test_resume_after_ctrl_c_continues_as_the_uninterrupted_run(model_dir, tmp_path):
    """Ctrl-C at step 3 of 6, then ``resume=True``: the same Aligner, bit for bit, and the same losses
    at steps 4 to 6 as a run that was never interrupted (optimizer, scheduler, data order and RNG
    restored from the checkpoint)."""
    examples = sft_examples(write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS * 3))

    def config(out: str, **extra) -> TrainConfig:
        return TrainConfig(output_dir=str(tmp_path / out), max_steps=6, batch_size=2, lr=0.05,
                           lr_scheduler="cosine", logging_steps=1, save_steps=100, seed=3, num_tokens=2,
                           progress=False, **extra)  # fmt: skip

    model, tokenizer = load_model(str(model_dir))
    train_sft(model, tokenizer, examples, config("whole"))

    model, tokenizer = load_model(str(model_dir))
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3"):
        train_sft(model, tokenizer, examples, config("cut", callbacks=[_InterruptAt(3)]))
    torch.manual_seed(123)  # a resumed run starts in another process, from another random state
    model, tokenizer = load_model(str(model_dir))
    summary = train_sft(model, tokenizer, examples, config("cut", resume=True))
    assert summary["steps"] == 6

    assert digest(tmp_path / "cut") == digest(tmp_path / "whole")
    whole, cut = logged(tmp_path / "whole"), logged(tmp_path / "cut")
    assert [cut[step] for step in (4, 5, 6)] == [whole[step] for step in (4, 5, 6)]
    # (Ctrl-C at the end of step 3 comes before that step's log line: the rest is the same.)
    assert all(whole[step] == loss for step, loss in cut.items())


def test_python_entry_points_are_seeded(model_dir, tmp_path):
    """``train_sft`` from Python: the fresh Aligner itself is drawn from ``TrainConfig.seed``."""
    examples = sft_examples(write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS))
    tokens = []
    for state in (1, 2):
        torch.manual_seed(state)
        model, tokenizer = load_model(str(model_dir))
        config = TrainConfig(output_dir=str(tmp_path / f"o{state}"), max_steps=1, batch_size=2,
                             save_steps=100, seed=9, progress=False)  # fmt: skip
        train_sft(model, tokenizer, examples, config)
        tokens.append(aligner.aligner_parameters(model))
    assert tokens[0].keys() == tokens[1].keys()
    for name in tokens[0]:
        assert torch.equal(tokens[0][name], tokens[1][name]), name


def test_train_sft_shorter_than_logging_steps_logs_its_last_step(model_dir, tmp_path):
    """From Python too (not only the command line), a run shorter than ``logging_steps`` logs its
    last step's loss once and draws its loss plot."""
    examples = sft_examples(write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS))
    model, tokenizer = load_model(str(model_dir))
    out = tmp_path / "out"
    config = TrainConfig(output_dir=str(out), max_steps=2, batch_size=2, logging_steps=5, save_steps=100,
                         progress=False)  # fmt: skip
    train_sft(model, tokenizer, examples, config)
    assert list(logged(out)) == [2]
    assert (out / "loss_curve.png").stat().st_size > 1000
