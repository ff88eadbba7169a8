"""The demos' answer forms (aligner/forms.py): every target a form builds passes that form's check,
and the checks refuse replies without the form."""

from __future__ import annotations

import json

import pytest

from aligner.forms import (
    CARRY_INSTRUCTIONS,
    FORMS,
    HELDOUT_INSTRUCTIONS,
    TRAIN_INSTRUCTIONS,
    first_sentence,
    messages,
)

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
    sets, the Aligner saved, metrics written. (The form is not learnt at this size; `make demo` on
    SmolLM2 is the real run.)"""
    pytest.importorskip("datasets", reason="needs the train extra: pip install -e '.[train]'")
    from tiny_models import save_tiny_model

    from aligner import demo, read_config

    model_dir = save_tiny_model(tmp_path / "model")
    argv = ["--model", model_dir, "--output-dir", tmp_path / "out", "--steps", 1, "--limit", 3,
            "--answer-tokens", 4, "--reply-tokens", 4, "--samples", 1, "--min-compliance", 0]  # fmt: skip
    assert demo.main([str(a) for a in argv]) == 0
    assert "| Aligner (N=1) |" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["compliance"]) == {"base", "prompted", "aligner"}
    for row in metrics["compliance"].values():
        assert set(row) == {"heldout", "carry"}
    assert metrics["steps"] == 1
    assert read_config(tmp_path / "out" / "aligner")["start_layer"] == 0
    # Every row is measured in its own configuration: no row's losses repeat another row's.
    losses = {name: tuple(row.values()) for name, row in metrics["heldout_loss"].items()}
    assert len(set(losses.values())) == len(losses), losses


def test_target_loss_reads_the_system_prompt(tmp_path):
    """The prompted model's loss is taken with its system prompt in the context, as its replies are
    generated: the targets' likelihood depends on it (issue 24: it used to be the base model's)."""
    from tiny_models import save_tiny_model

    from aligner.forms import load_demo_model, target_loss
    from aligner.training.data import format_prompt

    model, tokenizer = load_demo_model(save_tiny_model(tmp_path / "model"))
    instructions, targets = ["Name a colour.", "What is two plus two?"], ['{"answer": "Red."}', "Four."]
    base = target_loss(model, tokenizer, instructions, targets)
    prompted = target_loss(model, tokenizer, instructions, targets, "Reply in JSON.")
    assert prompted != base
    assert prompted == target_loss(model, tokenizer, instructions, targets, system="Reply in JSON.")
    assert "Reply in JSON." in format_prompt(tokenizer, messages(instructions[0], "Reply in JSON."))
