"""Context distillation (aligner.training.distill): the KL loss against a reference computation,
its zero when student and teacher coincide, gradients only on the Aligner with the teacher run
Aligner-free, and ``aligner distill --loss kl|sft`` end to end on a tiny random LLaMA."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets", reason="needs the train extra: pip install -e '.[train]'")
pytest.importorskip("matplotlib", reason="needs the train extra: pip install -e '.[train]'")

from test_training import write_jsonl  # noqa: E402
from tiny_models import save_tiny_model  # noqa: E402

import aligner  # noqa: E402
from aligner.cli import EXIT_ERROR, main  # noqa: E402
from aligner.generation import generate  # noqa: E402
from aligner.models import load_model  # noqa: E402
from aligner.options import OptionError  # noqa: E402
from aligner.training import TrainConfig, distill_examples, distill_kl, train_distill  # noqa: E402
from aligner.training.distill import (  # noqa: E402
    TEACHER_OPTIONS,
    AlignerDistillTrainer,
    distill_collator,
    tokenize_distill,
)

SYSTEM = "reply yes"
EXAMPLES = [
    ([{"role": "user", "content": "name a color"}], "red blue"),
    ([{"role": "user", "content": "what do bees make"}], "honey"),
    ([{"role": "user", "content": "how many legs does a spider have"}], "eight legs"),
]
FAST = ["--max-steps", "2", "--batch-size", "2", "--logging-steps", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("distill") / "model")


@pytest.fixture
def tiny(tiny_dir):
    return load_model(str(tiny_dir))


def reference_kl(student_logits, labels, teacher_logits, teacher_labels) -> torch.Tensor:
    """KL(teacher || student) per completion token, written out with loops, then averaged."""
    terms = []
    for b in range(labels.shape[0]):
        s_pos = [i for i in range(labels.shape[1] - 1) if labels[b, i + 1] != -100]
        t_pos = [i for i in range(teacher_labels.shape[1] - 1) if teacher_labels[b, i + 1] != -100]
        for i, j in zip(s_pos, t_pos, strict=True):
            p_t = torch.softmax(teacher_logits[b, j].double(), -1)
            log_p_s = torch.log_softmax(student_logits[b, i].double(), -1)
            terms.append((p_t * (p_t.log() - log_p_s)).sum())
    return torch.stack(terms).mean()


def test_kl_equals_a_reference_computation():
    torch.manual_seed(0)
    vocab = 11
    # two rows, 3 and 2 completion tokens, at different offsets in student and teacher
    labels = torch.tensor([[-100, -100, 4, 5, 6, -100], [-100, -100, -100, 7, 8, -100]])
    teacher_labels = torch.tensor([[-100, -100, -100, -100, 4, 5, 6], [-100, -100, -100, -100, 7, 8, -100]])
    student = torch.randn(2, 6, vocab)
    teacher = torch.randn(2, 7, vocab)
    got = distill_kl(student, labels, teacher, teacher_labels)
    want = reference_kl(student, labels, teacher, teacher_labels)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got > 0


def test_kl_rejects_mismatched_completions():
    labels = torch.tensor([[-100, 1, 2]])
    with pytest.raises(ValueError, match="same number of completion tokens"):
        distill_kl(torch.randn(1, 3, 5), labels, torch.randn(1, 3, 5), torch.tensor([[-100, -100, 2]]))


def test_rows_share_the_completion(tiny):
    _, tokenizer = tiny
    rows, dropped = tokenize_distill(tokenizer, EXAMPLES, SYSTEM, max_length=64)
    assert dropped == 0 and len(rows) == 3
    for row in rows:
        student = [t for t in row["labels"] if t != -100]
        teacher = [t for t in row["teacher_labels"] if t != -100]
        assert student == teacher
        assert len(row["teacher_input_ids"]) > len(row["input_ids"])  # the system prompt
        assert row["input_ids"][-len(student) :] == student
    # too short for any completion token after the teacher's prompt: dropped, not truncated into it
    rows, dropped = tokenize_distill(tokenizer, EXAMPLES, SYSTEM, max_length=len(rows[0]["input_ids"]) - 2)
    assert dropped >= 1


def _trainer(model, tokenizer, examples, system, tmp_path) -> tuple[AlignerDistillTrainer, dict]:
    config = TrainConfig(output_dir=str(tmp_path / "out"), max_steps=1, batch_size=3, progress=False)
    aligner.patch(model, num_tokens=2, start_layer=1)
    rows, _ = tokenize_distill(tokenizer, examples, system, max_length=64)
    from aligner.training.run import training_arguments

    trainer = AlignerDistillTrainer(
        model=model, args=training_arguments(config), train_dataset=rows,
        data_collator=distill_collator(tokenizer.pad_token_id),
    )  # fmt: skip
    return trainer, distill_collator(tokenizer.pad_token_id)(rows)


def test_kl_is_zero_when_student_equals_teacher(tiny, tmp_path):
    """Teacher rows identical to the student's (system prompt replaced by the student's own prompt
    layout) and a fresh Aligner (zero gates): the student IS the teacher, the KL is 0 and its
    gradient too."""
    model, tokenizer = tiny
    trainer, batch = _trainer(model, tokenizer, EXAMPLES, SYSTEM, tmp_path)
    for key in ("input_ids", "attention_mask", "labels"):
        batch[f"teacher_{key}"] = batch[key].clone()
    loss = trainer.compute_loss(model, batch)
    assert loss.abs().item() < 1e-6
    loss.backward()
    for name, param in aligner.aligner_parameters(model).items():
        assert param.grad is None or param.grad.abs().max() < 1e-6, name


def test_teacher_runs_without_the_aligner_and_only_the_aligner_trains(tiny, tmp_path):
    model, tokenizer = tiny
    trainer, batch = _trainer(model, tokenizer, EXAMPLES, SYSTEM, tmp_path)
    with torch.no_grad():
        for param in aligner.aligner_parameters(model).values():
            param.normal_(0, 0.5)
    with aligner.disabled(model), torch.no_grad():
        expected_teacher = model(
            input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]
        ).logits
    student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = distill_kl(student, batch["labels"], expected_teacher, batch["teacher_labels"])
    # the Aligner changes the teacher's inputs' logits, so a teacher run WITH it would differ
    with torch.no_grad():
        with_aligner = model(
            input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]
        ).logits
    assert not torch.allclose(with_aligner, expected_teacher, atol=1e-4)
    loss = trainer.compute_loss(model, batch)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    trainable = {id(p) for p in aligner.aligner_parameters(model).values()}
    for name, param in model.named_parameters():
        if id(param) in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None and not param.requires_grad, name


def test_train_distill_lowers_the_kl(tiny, tmp_path):
    model, tokenizer = tiny
    config = TrainConfig(
        output_dir=str(tmp_path / "out"), max_steps=8, batch_size=3, lr=0.05, logging_steps=1,
        save_steps=100, progress=False,
    )  # fmt: skip
    summary = train_distill(model, tokenizer, EXAMPLES, SYSTEM, config)
    assert summary["steps"] == 8 and summary["distill_loss"] == "kl"
    records = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert "top1_agreement" in records[0]
    assert losses[-1] < losses[0]


def test_gradient_accumulation_logs_the_mean_kl(tiny, tmp_path):
    """Two accumulated micro-batches of one identical row: step 1's logged loss is that row's KL
    for the fresh Aligner (zero gates: the model without the prompt), not twice it."""
    model, tokenizer = tiny
    rows, _ = tokenize_distill(tokenizer, EXAMPLES[:1], SYSTEM, max_length=64)
    batch = distill_collator(tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        student = model(input_ids=batch["input_ids"]).logits
        teacher = model(input_ids=batch["teacher_input_ids"]).logits
    expected = distill_kl(student, batch["labels"], teacher, batch["teacher_labels"]).item()
    config = TrainConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, batch_size=1, grad_accum=2, logging_steps=1,
        save_steps=100, progress=False,
    )  # fmt: skip
    train_distill(model, tokenizer, EXAMPLES[:1] * 2, SYSTEM, config)
    records = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if "loss" in r][0] == pytest.approx(expected, rel=1e-3, abs=2e-4)


@pytest.mark.parametrize(
    ("loss", "system", "match"),
    [("mse", SYSTEM, "loss must be one of kl, sft"), ("kl", "  ", "system prompt is empty")],
)
def test_train_distill_bad_values(tiny, tmp_path, loss, system, match):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=match):
        train_distill(model, tokenizer, EXAMPLES, system, TrainConfig(output_dir=str(tmp_path)), loss=loss)


def _new_tokens(model, tokenizer, prompts, **options) -> list[list[int]]:
    """The token ids ``generate`` produced for each prompt (pads and end of text left out)."""
    produced = []
    original = model.generate

    def recording(**kwargs):
        out = original(**kwargs)
        produced.extend(out[:, kwargs["input_ids"].shape[1] :].tolist())
        return out

    model.generate = recording
    try:
        generate(model, tokenizer, prompts, batch_size=2, progress=False, **options)
    finally:
        del model.generate
    ends = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    return [[t for t in row if t not in ends] for row in produced]


def test_generate_no_repeat_ngram_size_and_repetition_penalty(tiny):
    """The tiny random model repeats itself greedily; with no_repeat_ngram_size=1 no answer holds a
    token twice, and a strong repetition penalty changes the answers."""
    model, tokenizer = tiny
    prompts = [[{"role": "user", "content": c}] for c in ("name a color", "what do bees make")]
    plain = _new_tokens(model, tokenizer, prompts, max_new_tokens=16)
    assert any(len(set(row)) < len(row) for row in plain)  # something to prevent
    for row in _new_tokens(model, tokenizer, prompts, max_new_tokens=16, no_repeat_ngram_size=1):
        assert row and len(set(row)) == len(row)
    assert _new_tokens(model, tokenizer, prompts, max_new_tokens=16, repetition_penalty=50.0) != plain


def test_distill_examples_samples_per_prompt(tiny):
    """Several answers per prompt, in the prompts' order; identical answers to one prompt are kept
    once, and the same seed gives the same sampled answers; greedy answers would all be the same,
    so more than one needs a temperature."""
    model, tokenizer = tiny
    prompts = ["name a color", "what do bees make", "how many legs does a spider have"]
    options = dict(max_new_tokens=6, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="samples_per_prompt=3 needs temperature > 0"):
        distill_examples(model, tokenizer, prompts, SYSTEM, samples_per_prompt=3, **options)
    sampled = distill_examples(
        model, tokenizer, prompts, SYSTEM, samples_per_prompt=3, temperature=1.5, seed=1, **options
    )
    order = [prompts.index(m[0]["content"]) for m, _ in sampled]
    assert order == sorted(order) and len(sampled) > len(prompts)
    for prompt in prompts:
        answers = [a for m, a in sampled if m[0]["content"] == prompt]
        assert 1 <= len(answers) <= 3 and len(set(answers)) == len(answers)
    again = distill_examples(
        model, tokenizer, prompts, SYSTEM, samples_per_prompt=3, temperature=1.5, seed=1, **options
    )
    assert again == sampled
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 1"):
        distill_examples(model, tokenizer, prompts, SYSTEM, samples_per_prompt=0, **options)


def test_teacher_defaults_are_train_configs():
    """distill_examples' defaults are TrainConfig's fields (the flags of aligner distill)."""
    import inspect

    config = TrainConfig(output_dir="x")
    parameters = inspect.signature(distill_examples).parameters
    for name in TEACHER_OPTIONS:
        assert parameters[name].default == getattr(config, name), name


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"no_repeat_ngram_size": 1.5}, "no_repeat_ngram_size"),
        ({"samples_per_prompt": 0}, "samples_per_prompt"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_teacher_options_are_checked(values, match):
    with pytest.raises(OptionError, match=match):
        TrainConfig(output_dir="x", **values)


def test_cli_distill_teacher_options(tiny_dir, tmp_path, capsys):
    """--samples-per-prompt, --temperature, --repetition-penalty and --no-repeat-ngram-size reach
    the teacher: several sampled answers per instruction in distilled.jsonl."""
    rows = [{"instruction": "name a color"}, {"prompt": "what do bees make"}]
    data = write_jsonl(tmp_path / "i.jsonl", rows)
    out = tmp_path / "out"
    teacher = ["--samples-per-prompt", "3", "--temperature", "1.5", "--repetition-penalty", "1.3"]
    teacher += ["--no-repeat-ngram-size", "2", "--max-new-tokens", "6"]
    argv = ["distill", str(tiny_dir), "--data", str(data), "--system-prompt", SYSTEM, *teacher]
    code = main([*argv, "--output-dir", str(out), "--json", *FAST])
    assert code == 0, capsys.readouterr().err
    distilled = [json.loads(line) for line in (out / "distilled.jsonl").read_text().splitlines()]
    firsts = [row["messages"][0]["content"] for row in distilled]
    assert len(distilled) > 2 and set(firsts) == {"name a color", "what do bees make"}
    assert all(1 <= firsts.count(prompt) <= 3 for prompt in set(firsts))


@pytest.mark.parametrize("loss", ["kl", "sft"])
def test_cli_distill(tiny_dir, tmp_path, capsys, loss):
    data = write_jsonl(
        tmp_path / "i.jsonl", [{"instruction": "name a color"}, {"prompt": "what do bees make"}]
    )
    out = tmp_path / "out"
    code = main(
        [
            "distill", str(tiny_dir), "--data", str(data), "--system-prompt", SYSTEM, "--loss", loss,
            "--max-new-tokens", "4", "--output-dir", str(out), "--json", *FAST,
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["distill_loss"] == loss and summary["steps"] == 2
    assert (out / "aligner_model.safetensors").is_file() and (out / "distilled.jsonl").is_file()
    model, _ = load_model(str(tiny_dir))
    aligner.load(model, out)  # the written Aligner loads onto its base


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--loss", "mse"], "invalid choice: 'mse'"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
        (["--samples-per-prompt", "0"], "--samples-per-prompt must be an integer >= 1"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0"),
    ],
)
def test_cli_distill_bad_values(tiny_dir, tmp_path, capsys, extra, message):
    data = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "name a color"}])
    argv = ["distill", str(tiny_dir), "--data", str(data), "--system-prompt", SYSTEM]
    argv += ["--output-dir", str(tmp_path / "out"), *FAST, *extra]
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse rejects a bad choice itself
        code = exit_info.code
    assert code == EXIT_ERROR
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_distill_empty_system_prompt(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "name a color"}])
    prompt = tmp_path / "system.txt"
    prompt.write_text("  \n", encoding="utf-8")
    argv = ["distill", str(tiny_dir), "--data", str(data), "--system-prompt-file", str(prompt)]
    assert main([*argv, "--output-dir", str(tmp_path / "out"), *FAST]) == EXIT_ERROR
    assert "system prompt is empty" in capsys.readouterr().err


def test_benchmark_rule_checks():
    """The automatic checks benchmarks/bench_distill.py scores replies with."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from bench_distill import is_french, one_sentence, repeats_itself, speaks_sailor

    assert is_french("La lumière de l'hiver est blanche, et le ciel est clair.")
    assert is_french("C'est la vie: l'amusement de la cuisine.")
    assert not is_french("The sky is blue because of Rayleigh scattering.")
    assert not is_french("Café au lait is a drink that I like in the morning.")
    assert speaks_sailor("Arr, the sea be calm today") and speaks_sailor("Ahoy! A compass, ye say?")
    assert speaks_sailor("A computer, a pirate's favourite.") and speaks_sailor("Aye, it's cold.")
    assert not speaks_sailor("The ship sailed across the sea.")
    assert one_sentence("The capital of Egypt is Cairo.") and one_sentence("Is it 3.5 m long? ")
    assert not one_sentence("Cairo. It is big.") and not one_sentence("A bicycle has two wheels and")
    assert not one_sentence("1. Spring\n2. Summer.")
    assert repeats_itself("Ahoy! Ahoy! Ahoy! Ahoy!") and repeats_itself("Aye, aye, aye, aye, aye")
    assert not repeats_itself("Ahoy! A compass, ye say? Ahoy, it points north.")


def test_bench_defaults_rules():
    """The sign-off check, the cut of prompted replies into targets and the run lengths of
    benchmarks/bench_defaults.py (the benchmark itself needs SmolLM2 and an hour)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from bench_defaults import SIGNOFF, parse_args, parse_length, sentences, signs_off

    assert signs_off(f"Paris.\n\n{SIGNOFF}") and signs_off(f"Paris. {SIGNOFF}  \n")
    assert not signs_off(SIGNOFF) and not signs_off(f"{SIGNOFF}\nParis.") and not signs_off("Paris.")
    assert sentences("Arr, matey! The sea be wide. And deep.") == "Arr, matey! The sea be wide."
    assert sentences("One. Two.\nThree.") == "One. Two." and sentences("No end in sight") == ""
    assert sentences("word " * 50 + ".") == ""  # too long to be a target
    assert parse_length("120") == {"epochs": 1.0, "max_steps": 120}
    assert parse_length("3ep") == {"epochs": 3.0, "max_steps": -1}
    args = parse_args(["--behaviours", "caps", "--steps", "2"])
    assert args.behaviours == ["caps"] and args.settings[:2] == ["old-default", "recipe"]
