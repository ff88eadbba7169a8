"""The demos (benchmarks/demo.py, benchmarks/bank_demo.py) and their answer forms
(benchmarks/answer_forms.py): every target a form builds passes that form's check, the checks refuse
replies without the form, both demos run end to end at toy size, every reported number comes from
its own row's configuration, and the base model's results are cached per machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

from answer_forms import (  # noqa: E402
    CARRY_INSTRUCTIONS,
    FORMS,
    HELDOUT_INSTRUCTIONS,
    TRAIN_INSTRUCTIONS,
    first_sentence,
    messages,
)
from tiny_models import save_tiny_model  # noqa: E402

ANSWERS = [
    "The capital of Norway is Oslo.",
    'The plural of "child" is "children".',
    "A path like C:\\temp has a backslash.",
    "Ça va très bien, merci.",
]


@pytest.mark.parametrize("name", list(FORMS))
@pytest.mark.parametrize("answer", ANSWERS)
def test_every_target_has_its_form(name, answer):
    assert FORMS[name].check(FORMS[name].apply(answer))


def test_json_target_needs_no_escaped_quote():
    target = FORMS["json"].apply('The plural of "child" is "children".')
    assert '\\"' not in target
    assert json.loads(target) == {"answer": "The plural of 'child' is 'children'."}


@pytest.mark.parametrize(
    ("name", "reply"),
    [
        ("json", '{"answer": "The word "cat" rhymes."}'),  # unescaped quotes: not JSON
        ("json", '{"answer": "cut off'),
        ("json", '{"name": "Rex"}'),
        ("caps", "Mostly CAPS"),
        ("caps", "123"),
        ("prefix", "The answer: 4"),
        ("prefix", "Answer:"),
    ],
)
def test_checks_refuse_replies_without_the_form(name, reply):
    assert not FORMS[name].check(reply)


def test_first_sentence_is_cut_to_a_budget():
    assert first_sentence("Oslo. It is in Norway.") == "Oslo."
    assert first_sentence("one two three four five", max_words=3) == "one two three."
    assert first_sentence("\n\n") == ""


def test_instruction_sets_are_disjoint():
    """The held-out sets never leak into training, and no instruction is repeated."""
    sets = [TRAIN_INSTRUCTIONS, HELDOUT_INSTRUCTIONS, CARRY_INSTRUCTIONS]
    everything = [i for rows in sets for i in rows]
    assert len(set(everything)) == len(everything)


def test_demo_toy_size(tmp_path, capsys):
    """`make demo` end to end on a tiny random model: base, prompted and Aligner rows on both held-out
    sets, the Aligner saved, metrics and time per phase written. A second run takes the base
    model's results from the cache, and they are the same; with another model they are computed
    again. (The form is not learnt at this size; `make demo` on SmolLM2 is the real run.)"""
    pytest.importorskip("datasets", reason="needs the train extra: pip install -e '.[train]'")
    import demo

    from aligner import read_config

    def run(model_dir, out: str) -> dict:
        argv = ["--model", model_dir, "--output-dir", tmp_path / out, "--steps", 1, "--limit", 3,
                "--answer-tokens", 4, "--reply-tokens", 4, "--samples", 1, "--min-compliance", 0,
                "--cache-dir", tmp_path / "cache"]  # fmt: skip
        assert demo.main([str(a) for a in argv]) == 0
        assert "| Aligner (N=1) |" in capsys.readouterr().out
        return json.loads((tmp_path / out / "metrics.json").read_text())

    model_dir = save_tiny_model(tmp_path / "model")
    metrics = run(model_dir, "out")
    assert set(metrics["compliance"]) == {"base", "prompted", "aligner"}
    for row in metrics["compliance"].values():
        assert set(row) == {"heldout", "carry"}
    assert metrics["steps"] == 1
    assert read_config(tmp_path / "out" / "aligner")["start_layer"] == 0
    assert metrics["cached"] == []
    assert set(metrics["seconds"]) == {"load", "base answers", "base evaluation", "training",
                                       "Aligner evaluation", "saving"}  # fmt: skip
    # Every row is measured in its own configuration: no row's losses repeat another row's.
    losses = {name: tuple(row.values()) for name, row in metrics["heldout_loss"].items()}
    assert len(set(losses.values())) == len(losses), losses

    again = run(model_dir, "again")
    assert again["cached"] == ["answers", "evaluation", "evaluation"]
    for key in ("compliance", "heldout_loss", "samples"):
        assert again[key] == metrics[key]
    other = run(save_tiny_model(tmp_path / "other", seed=1), "other")
    assert other["cached"] == []
    assert other["heldout_loss"]["base"] != metrics["heldout_loss"]["base"]


def test_target_loss_reads_the_system_prompt(tmp_path):
    """The prompted model's loss is taken with its system prompt in the context, as its replies are
    generated: the targets' likelihood depends on it (issue 24: it used to be the base model's)."""
    from answer_forms import load_demo_model, target_loss

    from aligner.prompts import format_prompt

    model, tokenizer = load_demo_model(save_tiny_model(tmp_path / "model"))
    instructions, targets = ["Name a colour.", "What is two plus two?"], ['{"answer": "Red."}', "Four."]
    base = target_loss(model, tokenizer, instructions, targets)
    prompted = target_loss(model, tokenizer, instructions, targets, "Reply in JSON.")
    assert prompted != base
    assert prompted == target_loss(model, tokenizer, instructions, targets, system="Reply in JSON.")
    assert "Reply in JSON." in format_prompt(tokenizer, messages(instructions[0], "Reply in JSON."))


def test_bank_demo_toy_size(tmp_path, capsys):
    """The bank demo end to end on a tiny random model: three Aligners trained, a bank with random
    ones, one mixed batch printed with its form checks, metrics written. (Forms are not learnt at
    this size; `make bank-demo` on SmolLM2 is the real run.)"""
    pytest.importorskip("datasets", reason="needs the train extra: pip install -e '.[train]'")

    import bank_demo

    from aligner import AlignerBank

    model_dir = save_tiny_model(tmp_path / "model")
    argv = ["--model", model_dir, "--output-dir", tmp_path / "out", "--random-aligners", 50, "--steps", 1,
            "--limit", 3, "--answer-tokens", 4, "--reply-tokens", 4, "--min-compliance", 0,
            "--cache-dir", tmp_path / "cache"]  # fmt: skip
    assert bank_demo.main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "one batch of 3 held-out prompts" in out
    for form in ("json", "caps", "prefix"):
        assert f"[{form:>6} " in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["bank_aligners"] == 53
    assert [row["aligner"] for row in metrics["one_batch"]] == ["json", "caps", "prefix"]
    assert set(metrics["compliance"]) >= {"json", "caps", "prefix"}
    assert AlignerBank.load(tmp_path / "out" / "bank.safetensors").names[:3] == ["json", "caps", "prefix"]
