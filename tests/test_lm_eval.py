"""Evaluation with lm-evaluation-harness (lm_eval 0.4.x, the eval extra), offline: two tiny local
tasks written here (a multiple-choice one and a generate-until one, YAML over JSON Lines files), a
tiny random LLaMA and its tokenizer saved in tmp_path. Scores and per-sample log-likelihoods move
with the Aligner, equal the unpatched model's exactly under aligner.disabled, and a bank Aligner
evaluated by name equals the same Aligner loaded alone; the command line writes its results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")

import datasets  # noqa: E402
import huggingface_hub  # noqa: E402
from tiny_models import randomize_aligner, save_tiny_model  # noqa: E402

import aligner  # noqa: E402
from aligner import AlignerBank  # noqa: E402
from aligner.cli import EXIT_ERROR, main  # noqa: E402
from aligner.evaluation import evaluate, task_manager  # noqa: E402
from aligner.models import load_model  # noqa: E402

TASKS = ["tiny_mc", "tiny_gen"]
MC_ROWS = [
    {"question": "what is the capital of france", "choices": ["paris", "red", "eight"], "answer": 0},
    {"question": "how many legs does a spider have", "choices": ["blue", "eight", "no"], "answer": 1},
    {"question": "what color is the mat", "choices": ["honey", "yes", "red"], "answer": 2},
    {"question": "does the dog sat on the mat", "choices": ["yes", "no"], "answer": 0},
    {"question": "what do bees make", "choices": ["honey", "legs"], "answer": 0},
]
GEN_ROWS = [
    {"prompt": "the cat sat on the", "answer": "mat"},
    {"prompt": "bees make", "answer": "honey"},
    {"prompt": "what is the capital of france", "answer": "paris"},
]
MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}?"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA
test_split: test
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No network and no cache outside the test's folders (datasets reads its settings at import)."""
    cache = tmp_path_factory.mktemp("datasets-cache")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The task folder, the base model and two saved Aligners (a, b) with non-zero gates, and a bank
    holding both."""
    root = tmp_path_factory.mktemp("lm-eval")
    tasks = root / "tasks"
    tasks.mkdir()
    for name, rows, text in (("mc", MC_ROWS, MC_TASK), ("gen", GEN_ROWS, GEN_TASK)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (tasks / f"{name}.yaml").write_text(text.replace("DATA", str(data)))
    base = save_tiny_model(root / "base")
    model, _ = load_model(str(base))
    aligner.patch(model, num_tokens=2, start_layer=1)
    paths = {
        name: aligner.save(randomize_aligner(model, seed=seed, gate_scale=2.0), root / name)
        for name, seed in (("a", 1), ("b", 2))
    }
    bank = AlignerBank.from_aligners([paths["a"], paths["b"]]).save(root / "bank.safetensors")
    return {"tasks": tasks, "base": base, **paths, "bank": bank}


def run(model, tokenizer, files, **kwargs) -> dict:
    manager = task_manager(files["tasks"], include_defaults=False)
    return evaluate(model, tokenizer, TASKS, manager=manager, batch_size=2, log_samples=True, **kwargs)


@pytest.fixture(scope="module")
def runs(files) -> dict[str, dict]:
    """Every evaluation on ONE model object (on CPU a copy at another address may round differently):
    unpatched, with Aligner a, a under aligner.disabled, b of the bank by name, b loaded alone."""
    model, tokenizer = load_model(str(files["base"]))
    results = {"base": run(model, tokenizer, files)}
    results["a"] = run(model, tokenizer, files, aligner=files["a"])
    with aligner.disabled(model):
        results["a-disabled"] = run(model, tokenizer, files)
    results["b-bank"] = run(model, tokenizer, files, bank=files["bank"], aligner_name="b")
    results["b-attached"] = run(model, tokenizer, files, aligner_name="b")  # the bank attached above
    results["a-after-bank"] = run(model, tokenizer, files)  # the model's own Aligner again
    aligner.detach_bank(model)
    results["b"] = run(model, tokenizer, files, aligner=files["b"])
    return results


def loglikelihoods(results: dict) -> list[list[float]]:
    """Per multiple-choice sample (in document order), the log-likelihood of each choice."""
    samples = sorted(results["samples"]["tiny_mc"], key=lambda sample: sample["doc_id"])
    return [[response[0][0] for response in sample["resps"]] for sample in samples]


def generations(results: dict) -> list[str]:
    samples = sorted(results["samples"]["tiny_gen"], key=lambda sample: sample["doc_id"])
    return [sample["resps"][0][0] for sample in samples]


def scores(results: dict) -> dict[str, dict]:
    return {task: dict(results["results"][task]) for task in TASKS}


def test_the_tasks_ran_on_every_sample(runs):
    for results in runs.values():
        assert results["results"]["tiny_mc"]["sample_len"] == len(MC_ROWS)
        assert results["results"]["tiny_gen"]["sample_len"] == len(GEN_ROWS)
        assert [len(choices) for choices in loglikelihoods(results)] == [len(r["choices"]) for r in MC_ROWS]
        assert set(results["results"]["tiny_mc"]) >= {"acc,none"}
        assert set(results["results"]["tiny_gen"]) >= {"exact_match,none"}


def test_scores_move_with_the_aligner(runs, files):
    base, with_a, with_b = (loglikelihoods(runs[key]) for key in ("base", "a", "b"))
    for values in (with_a, with_b):
        for row, choices in zip(values, base, strict=True):
            for value, base_value in zip(row, choices, strict=True):
                assert abs(value - base_value) > 1e-3  # every choice's log-likelihood moved
    assert with_a != with_b
    assert generations(runs["a"]) != generations(runs["base"])
    assert runs["a"]["aligner"] == {
        "aligner": str(files["a"]),
        "bank": None,
        "aligner_name": None,
        "revision": None,
        "state": "enabled",
    }
    assert runs["base"]["aligner"]["state"] == "none"


def test_disabled_equals_the_unpatched_model_exactly(runs):
    base, disabled = runs["base"], runs["a-disabled"]
    assert loglikelihoods(disabled) == loglikelihoods(base)
    assert generations(disabled) == generations(base)
    assert scores(disabled) == scores(base)
    assert disabled["aligner"]["state"] == "disabled"


def test_a_bank_aligner_by_name_equals_it_loaded_alone(runs, files):
    by_name, alone = runs["b-bank"], runs["b"]
    assert loglikelihoods(by_name) == loglikelihoods(alone)
    assert generations(by_name) == generations(alone)
    assert scores(by_name) == scores(alone)
    assert by_name["aligner"]["aligner_name"] == "b" and by_name["aligner"]["bank"] == str(files["bank"])
    assert loglikelihoods(runs["b-attached"]) == loglikelihoods(alone)
    assert runs["b-attached"]["aligner"]["bank"].startswith("AlignerBank(2 Aligners")
    assert aligner.evaluate is evaluate
    # Outside the evaluation the model runs its own Aligner (a) again, bit for bit.
    assert loglikelihoods(runs["a-after-bank"]) == loglikelihoods(runs["a"])


def test_library_errors_come_before_the_model_is_touched(files):
    model, tokenizer = load_model(str(files["base"]))
    manager = task_manager(files["tasks"], include_defaults=False)
    cases = [
        (dict(tasks="tiny_mcq"), ValueError, "tasks: 'tiny_mcq' is neither a task.*did you mean tiny_mc"),
        (dict(tasks=" , "), ValueError, "names no task"),
        (dict(aligner=files["a"], bank=files["bank"], aligner_name="a"), ValueError, "not both"),
        (dict(bank=files["bank"]), ValueError, "bank= needs aligner_name="),
        (dict(aligner_name="a"), ValueError, "aligner_name='a' needs a bank"),
        (dict(bank=files["bank"], aligner_name="c"), ValueError, "no Aligner named 'c' in the bank"),
        (dict(aligner=files["a"], revision="v1"), ValueError, "applies to aligner= or bank= given as a"),
    ]
    for kwargs, kind, message in cases:
        kwargs = {"tasks": TASKS, **kwargs}
        with pytest.raises(kind, match=message):
            evaluate(model, tokenizer, kwargs.pop("tasks"), manager=manager, **kwargs)
        assert not hasattr(model, "aligner_state"), kwargs
    with pytest.raises(FileNotFoundError, match="include_path .*nowhere: no such folder; expected a folder"):
        task_manager(files["tasks"] / "nowhere", include_defaults=False)
    with pytest.raises(ValueError, match="no tasks to look up: give include_path"):
        task_manager(None, include_defaults=False)
    with pytest.raises(ValueError, match="give include_path= or manager=, not both"):
        evaluate(model, tokenizer, TASKS, manager=manager, include_path=files["tasks"])


# --------------------------------------------------------------------------------------------
# The command line


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_the_results(files, runs, tmp_path, capsys):
    common = [files["base"], "--tasks", ",".join(TASKS), "--include-path", files["tasks"]]
    common += ["--no-builtin-tasks", "--batch-size", "2", "--log-samples", "--json", "--no-progress"]
    output = tmp_path / "results.json"
    code, out, err = cli(capsys, "eval", *common, "--aligner", files["a"], "--output", output)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [record["task"] for record in records] == TASKS
    written = json.loads(output.read_text())
    assert written["aligner"]["aligner"] == str(files["a"]) and written["aligner"]["state"] == "enabled"
    assert loglikelihoods(written) == loglikelihoods(runs["a"])
    assert generations(written) == generations(runs["a"])
    assert records[0]["acc,none"] == written["results"]["tiny_mc"]["acc,none"]

    output = tmp_path / "bank.json"
    code, out, err = cli(
        capsys, "eval", *common, "--bank", files["bank"], "--aligner", "b", "--output", output
    )
    assert code == 0, err
    written = json.loads(output.read_text())
    assert written["aligner"]["aligner_name"] == "b"
    assert loglikelihoods(written) == loglikelihoods(runs["b"])

    code, out, err = cli(capsys, "eval", *common[:-2], "--no-progress")  # text, the base model
    assert code == 0, err
    assert out.splitlines()[0].startswith("tiny_mc: acc ") and "tiny_gen: exact_match " in out


@pytest.fixture
def no_model_loading(monkeypatch):
    import aligner.cli.loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(aligner.cli.loading, "load_base", refuse)


def test_cli_checks_come_before_the_model_loads(files, tmp_path, capsys, no_model_loading):
    base = [files["base"], "--include-path", files["tasks"], "--no-builtin-tasks"]
    cases = [
        (["--tasks", "tiny_mcq"], "--tasks: 'tiny_mcq' is neither a task, group or tag lm_eval knows here"),
        (["--tasks", "tiny_mc", "--aligner", tmp_path / "nowhere"], "--aligner"),
        (["--tasks", "tiny_mc", "--bank", files["bank"]], "--bank needs --aligner NAME"),
        (["--tasks", "tiny_mc", "--bank", files["bank"], "--aligner", "c"], "no Aligner named 'c'"),
        (
            ["--tasks", "tiny_mc", "--aligner", files["a"], "--revision", "v1"],
            "path; --revision v1 applies to Hub",
        ),
        (["--tasks", "tiny_mc", "--revision", "v1"], "--revision v1 applies to --aligner or --bank given"),
        (["--tasks", "tiny_mc", "--output", tmp_path], "is a directory"),
        (["--tasks", "tiny_mc", "--limit", "0"], "--limit must be"),
        (["--tasks", "tiny_mc", "--batch-size", "0"], "--batch-size must be >= 1"),
    ]
    for argv, message in cases:
        code, out, err = cli(capsys, "eval", *base, *argv)
        assert code == EXIT_ERROR and message in err, (argv, err)
        assert err.startswith("aligner eval: error: ") and len(err.splitlines()) == 1
    code, _, err = cli(capsys, "eval", files["base"], "--tasks", "t", "--include-path", tmp_path / "none")
    assert code == EXIT_ERROR and f"--include-path {tmp_path / 'none'}: no such folder" in err
    code, _, err = cli(capsys, "eval", files["base"], "--tasks", "t", "--no-builtin-tasks")
    assert code == EXIT_ERROR and "give --include-path when lm_eval's built-in tasks are left out" in err


def test_cli_without_lm_eval_names_the_extra(files, capsys, monkeypatch, no_model_loading):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what a missing package looks like to import
    code, _, err = cli(capsys, "eval", files["base"], "--tasks", "tiny_mc")
    assert code == EXIT_ERROR
    assert (
        "lm-evaluation-harness (lm_eval 0.4.x), which is not installed: pip install 'aligner-kernels[eval]'"
        in err
    )
    assert "[train]" not in err
