"""The ``aligner`` command line on a tiny random LLaMA and tiny data files written by the tests:
each subcommand exits 0 and writes what it promises; bad input gives one clear message, a
non-zero exit and leaves nothing half-written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets", reason="needs the train extra: pip install -e '.[train]'")
pytest.importorskip("matplotlib", reason="needs the train extra: pip install -e '.[train]'")

from test_training import ALPACA_ROWS, save_tiny_model, write_jsonl  # noqa: E402

import aligner  # noqa: E402
from aligner.cli import EXIT_ERROR, build_parser, main  # noqa: E402

FAST = ["--max-steps", "2", "--batch-size", "2", "--logging-steps", "1", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("cli") / "model")


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory) -> Path:
    """A 1-token Aligner with non-zero gates, saved for model_dir's base."""
    from transformers import AutoModelForCausalLM

    model = aligner.patch(AutoModelForCausalLM.from_pretrained(model_dir), num_tokens=1)
    torch.manual_seed(3)
    with torch.no_grad():
        for param in aligner.aligner_parameters(model).values():
            param.normal_(0, 0.5)
    return aligner.save(model, tmp_path_factory.mktemp("cli") / "aligner")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_subcommand_has_help(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    expected = {"train", "dpo", "distill", "generate", "chat", "merge", "convert", "info", "bank"}
    assert set(commands) == expected
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: aligner {command}" in capsys.readouterr().out


def test_dpo_help_documents_safe_rlhf(capsys):
    with pytest.raises(SystemExit):
        main(["dpo", "--help"])
    out = capsys.readouterr().out
    assert "safer_response_id" in out and "aligner.disabled" in out


@pytest.mark.parametrize("rows", ["alpaca", "chat"])
def test_train(model_dir, tmp_path, capsys, rows):
    data = ALPACA_ROWS
    if rows == "chat":
        data = [
            {
                "messages": [
                    {"role": "user", "content": r["instruction"]},
                    {"role": "assistant", "content": r["output"]},
                ]
            }
            for r in ALPACA_ROWS
        ]
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys,
        "train",
        model_dir,
        "--data",
        write_jsonl(tmp_path / "d.jsonl", data),
        "--output-dir",
        out,
        "--save-steps",
        "1",
        *FAST,
    )
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["trainable_parameters"] == 32 + 2 * 4
    assert (out / "aligner_model.safetensors").stat().st_size < 4096
    assert aligner.read_config(out)["num_tokens"] == 1
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2]
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1", "checkpoint-2"]


def test_dpo(model_dir, trained, tmp_path, capsys):
    rows = [{"prompt": "tell me", "response_0": "bad", "response_1": "good", "safer_response_id": 1}] * 4
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys,
        "dpo",
        model_dir,
        "--data",
        write_jsonl(tmp_path / "p.jsonl", rows),
        "--output-dir",
        out,
        "--init-aligner",
        trained,
        *FAST,
    )
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/accuracy" in records[0] and (out / "aligner_config.json").is_file()


def test_distill(model_dir, tmp_path, capsys):
    rows = [{"instruction": "name a color"}, {"prompt": "what do bees make"}]
    data = write_jsonl(
        tmp_path / "i.jsonl", [{"instruction": r.get("instruction") or r["prompt"]} for r in rows]
    )
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys,
        "distill",
        model_dir,
        "--data",
        data,
        "--system-prompt",
        "reply yes",
        "--max-new-tokens",
        "4",
        "--output-dir",
        out,
        *FAST,
    )
    assert code == 0, err
    distilled = [json.loads(line) for line in (out / "distilled.jsonl").read_text().splitlines()]
    assert len(distilled) == 2 and distilled[0]["system"] == "reply yes"
    assert distilled[0]["messages"][0] == {"role": "user", "content": "name a color"}
    assert (out / "aligner_model.safetensors").is_file()


def test_generate_and_chat(model_dir, trained, tmp_path, capsys, monkeypatch):
    output = tmp_path / "answers.jsonl"
    code, stdout, err = run_cli(
        capsys,
        "generate",
        model_dir,
        "--aligner",
        trained,
        "--prompt",
        "name a color",
        "--prompt",
        "what is the capital of france",
        "--max-new-tokens",
        "3",
        "--output",
        output,
    )
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["name a color", "what is the capital of france"]
    assert [json.loads(line) for line in output.read_text().splitlines()] == rows
    import io

    monkeypatch.setattr(
        sys, "stdin", io.StringIO("name a color\n/reset\nwhat do bees make\n/exit\nignored\n")
    )
    code, stdout, err = run_cli(capsys, "chat", model_dir, "--aligner", trained, "--max-new-tokens", "3")
    assert code == 0, err
    assert len(stdout.strip("\n").split("\n")) == 2  # two answers, then /exit


def test_merge_writes_a_plain_model_with_the_same_outputs(model_dir, trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    code, _, err = run_cli(capsys, "merge", model_dir, "--aligner", trained, "--output-dir", out)
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(out)
    patched = aligner.load(AutoModelForCausalLM.from_pretrained(model_dir), trained)
    ids = torch.randint(1, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, patched(ids).logits, rtol=1e-4, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits
    assert not torch.allclose(base, merged(ids).logits, atol=1e-3)
    assert not (tmp_path / ".merged.tmp").exists()


def test_convert_and_info(tmp_path, model_dir, capsys):
    checkpoint = {"global_value_embedding.weight": torch.randn(1, 32, dtype=torch.bfloat16)}
    for layer in (2, 3):
        checkpoint[f"transformer.h.{layer}.attn.gating_factor"] = torch.randn(1, 4, 1, 1)
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    code, stdout, err = run_cli(capsys, "convert", tmp_path / "ckpt.pth", "--output-dir", tmp_path / "conv")
    assert code == 0, err
    assert json.loads(stdout)["parameters"] == 32 + 2 * 4
    code, stdout, _ = run_cli(capsys, "info", tmp_path / "conv")
    info = json.loads(stdout)
    assert code == 0 and info["layers"] == [2, 3] and info["parameters"] == 40
    code, stdout, _ = run_cli(capsys, "info", model_dir, "--num-tokens", "10")
    info = json.loads(stdout)
    assert (
        code == 0
        and info["aligner_parameters"]["count"] == 10 * 32 + 2 * 4
        and info["num_key_value_heads"] == 2
    )


# --------------------------------------------------------------------------------------------
# Bad input: one clear message, a non-zero exit, nothing written


def _bad(capsys, tmp_path, *argv) -> str:
    """Run a failing command: exit 2, exactly one 'aligner CMD: error: ...' line on stderr (besides
    transformers' own progress bars), and no file created or changed under tmp_path."""
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code, _, err = run_cli(capsys, *argv)
    assert code == EXIT_ERROR
    messages = [line for line in err.splitlines() if line.startswith(f"aligner {argv[0]}: ")]
    assert len(messages) == 1, err
    assert not (tmp_path / "out").exists()
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    return messages[0]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"data file .*missing\.jsonl does not exist"),
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n',
            r"bad\.jsonl: malformed JSON at line 2",
        ),
        ("", r"bad\.jsonl is empty"),
        ('{"question": "a", "reply": "b"}\n', r"bad\.jsonl: rows have fields \['question', 'reply'\]"),
    ],
)
def test_bad_training_data(model_dir, tmp_path, capsys, content, message):
    import re

    path = tmp_path / ("missing.jsonl" if content is None else "bad.jsonl")
    if content is not None:
        path.write_text(content)
    err = _bad(capsys, tmp_path, "train", model_dir, "--data", path, "--output-dir", tmp_path / "out", *FAST)
    assert re.search(message, err), err


def test_aligner_for_another_base_is_refused(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    other_dir = save_tiny_model(tmp_path / "other", layers=3, hidden=48)
    other = aligner.save(
        aligner.patch(AutoModelForCausalLM.from_pretrained(other_dir)), tmp_path / "other-aligner"
    )
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    err = _bad(
        capsys,
        tmp_path,
        "train",
        model_dir,
        "--data",
        data,
        "--output-dir",
        tmp_path / "out",
        "--init-aligner",
        other,
        *FAST,
    )
    assert "was made for" in err and "differs in" in err
    err = _bad(capsys, tmp_path, "generate", model_dir, "--aligner", other, "--prompt", "hi")
    assert "was made for" in err


def test_other_bad_arguments(model_dir, trained, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    err = _bad(
        capsys, tmp_path, "train", tmp_path / "no-model", "--data", data, "--output-dir", tmp_path / "out"
    )
    assert "no-model does not exist" in err
    err = _bad(capsys, tmp_path, "convert", tmp_path / "none.pth", "--output-dir", tmp_path / "out")
    assert "no checkpoint at" in err
    err = _bad(
        capsys,
        tmp_path,
        "train",
        model_dir,
        "--data",
        data,
        "--output-dir",
        tmp_path / "out",
        "--batch-size",
        "0",
    )
    assert "--batch-size must be >= 1" in err
    err = _bad(capsys, tmp_path, "generate", model_dir)
    assert "nothing to answer" in err
