"""aligner.training: data reading and masking, DPO log-probs, Ctrl-C and checkpoints (multi-process
training: tests/test_distributed.py), on tiny_models.save_tiny_model's random LLaMA and tokenizer.

Also holds the tiny data rows (ALPACA_ROWS, write_jsonl) that the CLI, distillation, bank and
distributed tests use.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets", reason="needs the train extra: pip install -e '.[train]'")
pytest.importorskip("matplotlib", reason="needs the train extra: pip install -e '.[train]'")

from tiny_models import save_tiny_model  # noqa: E402

import aligner  # noqa: E402
from aligner.prompts import format_prompt  # noqa: E402
from aligner.training import (  # noqa: E402
    DataError,
    TrainConfig,
    TrainingInterrupted,
    preference_examples,
    sequence_logprobs,
    sft_examples,
    train_sft,
)
from aligner.training.data import pad_batch, tokenize_pair  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from aligner.models import load_model

    return load_model(str(tiny_dir))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


ALPACA_ROWS = [
    {"instruction": "what is the capital of france", "input": "", "output": "paris"},
    {"instruction": "how many legs does a spider have", "input": "please", "output": "eight"},
    {"instruction": "what do bees make", "output": "honey"},
    {"instruction": "name a color", "input": "", "output": "red"},
]


# --------------------------------------------------------------------------------------------
# Data


def test_alpaca_and_chat_rows(tmp_path):
    alpaca = sft_examples(write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS))
    assert alpaca[1] == ([{"role": "user", "content": "how many legs does a spider have\n\nplease"}], "eight")
    chat = [
        {
            "messages": [
                {"role": "system", "content": "be good"},
                {"role": "user", "content": "name a color"},
                {"role": "assistant", "content": "blue"},
            ]
        }
    ]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(chat))
    assert sft_examples(path) == [(chat[0]["messages"][:2], "blue")]


def test_prompt_tokens_are_masked(tiny):
    _, tokenizer = tiny
    prompt = format_prompt(tokenizer, [{"role": "user", "content": "what is the capital of france"}])
    row = tokenize_pair(tokenizer, prompt, "paris", max_length=512)
    prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert row["labels"][:prompt_len] == [-100] * prompt_len
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert tokenizer.decode(row["input_ids"][prompt_len:]) == "paris<eos>"
    assert tokenize_pair(tokenizer, prompt, "paris", max_length=prompt_len) is None  # no target left
    batch = pad_batch([row, {"input_ids": [5, 6], "labels": [-100, 6]}], pad_id=0)
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (len(row["input_ids"]) - 2)
    assert (batch["labels"][1, 2:] == -100).all()


def test_safe_rlhf_rows_map_through_safer_response_id(tmp_path):
    rows = [
        {"prompt": "tell me", "response_0": "bad", "response_1": "good", "safer_response_id": 1},
        {"prompt": "tell me", "response_0": "safe", "response_1": "unsafe", "safer_response_id": 0},
    ]
    examples = preference_examples(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [(c, r) for _, c, r in examples] == [("good", "bad"), ("safe", "unsafe")]
    rows[0]["safer_response_id"] = 2
    with pytest.raises(DataError, match="row 1: 'safer_response_id' must be 0 or 1"):
        preference_examples(write_jsonl(tmp_path / "q.jsonl", rows))


@pytest.mark.parametrize(
    "text, match",
    [
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
            r"bad\.jsonl: malformed JSON at line 2",
        ),
        ("", "is empty"),
        ("\n\n", "is empty"),
        ('{"question": "a", "answer": "b"}\n', r"fields \['answer', 'question'\], expected one of"),
        ("[1, 2]", r"item 1 of the array: rows must be JSON objects, got a number \(1\)"),
        ('{"instruction": "a"}\n', "for the alpaca format, 'output' is missing"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', "row 2: field 'output' is missing"),
        ('{"instruction": 3, "output": "b"}\n', "row 1: field 'instruction' must be a string"),
    ],
)
def test_bad_data_files(tmp_path, text, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        sft_examples(path)


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match=r"data file .*nothing\.jsonl does not exist"):
        sft_examples(tmp_path / "nothing.jsonl")


# --------------------------------------------------------------------------------------------
# Training


def test_sequence_logprobs_sums_completion_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    expected = [
        logits[0, 1].log_softmax(-1)[3] + logits[0, 2].log_softmax(-1)[4],
        sum(logits[1, i].log_softmax(-1)[labels[1, i + 1]] for i in range(4)),
    ]
    torch.testing.assert_close(sequence_logprobs(logits, labels), torch.stack(expected))


class _InterruptAt:
    """A TrainerCallback stand-in that raises KeyboardInterrupt (Ctrl-C) at a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __getattr__(self, name):
        return lambda args, state, control, **kwargs: self._check(name, state)

    def _check(self, event, state):
        if event == "on_step_end" and state.global_step == self.step:
            raise KeyboardInterrupt


def test_ctrl_c_saves_a_usable_aligner(tiny_dir, tmp_path):
    from aligner.models import load_model

    model, tokenizer = load_model(str(tiny_dir))
    examples = sft_examples(write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS * 4))
    config = TrainConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=20,
        batch_size=2,
        lr=0.05,
        logging_steps=1,
        save_steps=100,
        progress=False,
        callbacks=[_InterruptAt(3)],
    )
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3") as interrupt:
        train_sft(model, tokenizer, examples, config)
    checkpoint = tmp_path / "out/checkpoint-3"  # a full checkpoint, although save_steps is 100
    assert interrupt.value.checkpoint == checkpoint
    assert {"aligner_run.json", "optimizer.pt", "trainer_state.json", "aligner_model.safetensors"} <= {
        p.name for p in checkpoint.iterdir()
    }
    fresh, _ = load_model(str(tiny_dir))
    aligner.load(fresh, tmp_path / "out")
    for name, param in aligner.aligner_parameters(fresh).items():
        torch.testing.assert_close(param, aligner.aligner_parameters(model)[name])
    assert any(
        p.abs().sum() > 0 for n, p in aligner.aligner_parameters(fresh).items() if n.startswith("gate")
    )
    records = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"step": 3, "event": "interrupted"}
    assert (tmp_path / "out/loss_curve.png").is_file()


def test_checkpoints_are_atomic_and_resumable(tiny_dir, tmp_path):
    from aligner.models import load_model

    examples = sft_examples(write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS * 2))
    out = tmp_path / "out"
    common = dict(output_dir=str(out), batch_size=2, lr=0.05, logging_steps=1, save_steps=2, progress=False)
    model, tokenizer = load_model(str(tiny_dir))
    train_sft(model, tokenizer, examples, TrainConfig(max_steps=4, **common))
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-4"]
    checkpoint = out / "checkpoint-4"
    assert {"aligner_config.json", "aligner_model.safetensors", "optimizer.pt", "trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    assert (checkpoint / "aligner_model.safetensors").stat().st_size < 4096
    model, tokenizer = load_model(str(tiny_dir))
    summary = train_sft(model, tokenizer, examples, TrainConfig(max_steps=6, resume=True, **common))
    assert summary["steps"] == 6
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 5 in steps and 6 in steps and 1 in steps  # the resumed run appended to the first run's log


def test_dpo_starts_at_log2_and_prefers_chosen(tiny_dir, tmp_path):
    from aligner.models import load_model
    from aligner.training import train_dpo_file

    rows = [{"prompt": "is the cat good", "chosen": "yes the cat is good", "rejected": "no"}] * 8
    model, tokenizer = load_model(str(tiny_dir))
    config = TrainConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=8,
        batch_size=4,
        lr=0.05,
        logging_steps=1,
        save_steps=100,
        progress=False,
        beta=0.5,
    )
    train_dpo_file(model, tokenizer, write_jsonl(tmp_path / "p.jsonl", rows), config)
    records = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    # step 1: the fresh Aligner (zero gates) IS the reference policy, so the loss is exactly log 2
    assert losses[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert losses[-1]["loss"] < losses[0]["loss"] and losses[-1]["rewards/margin"] > 0


def test_dpo_gradient_accumulation_logs_the_mean(tiny_dir, tmp_path):
    """Two accumulated micro-batches: step 1's loss is still log 2 for the fresh Aligner, not twice it
    (Trainer must divide the per-batch mean losses by the accumulation steps)."""
    from aligner.models import load_model
    from aligner.training import train_dpo_file

    rows = [{"prompt": "is the cat good", "chosen": "yes the cat is good", "rejected": "no"}] * 4
    model, tokenizer = load_model(str(tiny_dir))
    config = TrainConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, batch_size=2, grad_accum=2, logging_steps=1,
        save_steps=100, progress=False,
    )  # fmt: skip
    train_dpo_file(model, tokenizer, write_jsonl(tmp_path / "p.jsonl", rows), config)
    records = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if "loss" in r][0] == pytest.approx(math.log(2), abs=1e-4)


def test_init_aligner_refuses_a_num_tokens_or_start_layer_it_does_not_have(tiny_dir, tmp_path):
    """From Python as from the command line: ``TrainConfig(init_aligner=..., num_tokens=2)`` for a
    1-token Aligner is refused before the model is touched, never silently trained as N = 1."""
    from aligner.options import OptionError
    from aligner.training import load_model

    model, tokenizer = load_model(str(tiny_dir))
    saved = aligner.save(aligner.patch(model, num_tokens=1, start_layer=1), tmp_path / "init")
    aligner.unpatch(model)
    examples = sft_examples(write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS))
    common = dict(max_steps=1, batch_size=2, save_steps=100, progress=False, init_aligner=str(saved))
    wrong_values = {
        "num_tokens 2 conflicts with init_aligner": dict(num_tokens=2, start_layer=1),
        "that Aligner has start_layer 1": dict(num_tokens=1, start_layer=2),
    }
    for message, wrong in wrong_values.items():
        with pytest.raises(OptionError, match=message):
            train_sft(
                model, tokenizer, examples, TrainConfig(output_dir=str(tmp_path / "x"), **common, **wrong)
            )
        assert not hasattr(model, "aligner_state") and not (tmp_path / "x").exists()
    config = TrainConfig(output_dir=str(tmp_path / "ok"), num_tokens=1, start_layer=1, **common)
    assert train_sft(model, tokenizer, examples, config)["steps"] == 1
    assert aligner.read_config(tmp_path / "ok")["start_layer"] == 1
