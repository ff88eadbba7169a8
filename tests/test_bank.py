"""A bank of Aligners, one per row: mixed batches equal each Aligner alone, -1 rows are the base
model bit for bit, the bank file round-trips, and bad input gets a clear error."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from tiny_models import DEFAULTS, randomize_aligner, save_tiny_model, tiny_model

import aligner
from aligner import AlignerBank

VOCAB = DEFAULTS["vocab_size"]


def base_model(**fields):
    """tiny_model with attention biases; generate runs to max_new_tokens (no EOS)."""
    model = tiny_model(attention_bias=True, **fields)
    model.generation_config.eos_token_id = None
    return model


def save_random_aligners(model, directory, count: int, num_tokens: int, start_layer: int = 1):
    """``count`` saved Aligners with random, clearly non-zero values; returns their directories."""
    model = aligner.patch(copy.deepcopy(model), num_tokens=num_tokens, start_layer=start_layer)
    return [
        aligner.save(randomize_aligner(model, seed=100 + k), directory / f"aligner{k}") for k in range(count)
    ]


def left_padded(lengths: list[int], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, longest - length :] = torch.randint(1, VOCAB, (length,), generator=gen)
        mask[row, longest - length :] = 1
    return ids, mask


def alone(model, path):
    """The model with only the Aligner saved in ``path`` (None: the base model)."""
    model = copy.deepcopy(model)
    return model if path is None else aligner.load(model, path)


def generate_logits(model, ids, mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0, **kwargs,
    )  # fmt: skip
    return out.sequences, torch.stack(out.logits, 1)


def make_bank(num_tokens: int, directory):
    model = base_model()
    paths = save_random_aligners(model, directory, 3, num_tokens)
    return model, paths, AlignerBank.from_aligners(paths)


@pytest.fixture(scope="module", params=[1, 3], ids=["N1", "N3"])
def setup(request, tmp_path_factory):
    return make_bank(request.param, tmp_path_factory.mktemp(f"bank{request.param}"))


@pytest.fixture(scope="module")
def setup1(tmp_path_factory):
    return make_bank(1, tmp_path_factory.mktemp("bank"))


def test_every_row_of_a_mixed_padded_batch_equals_its_aligner_alone(setup):
    model, paths, bank = setup
    index = torch.tensor([2, -1, 0, 1])
    lengths = [5, 9, 7, 9]
    ids, mask = left_padded(lengths)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # N > 1 needs positions from 0 (DESIGN.md)
    mixed = aligner.attach_bank(copy.deepcopy(model), bank)
    with torch.no_grad():
        logits = mixed(ids, attention_mask=mask, position_ids=positions, aligner_index=index).logits
    for row, k in enumerate(index.tolist()):
        single = alone(model, None if k < 0 else paths[k])
        with torch.no_grad():
            expected = single(ids[row : row + 1, -lengths[row] :]).logits[0]
        torch.testing.assert_close(logits[row, -lengths[row] :], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
def test_mixed_generation_equals_each_aligner_alone(setup, use_cache):
    model, paths, bank = setup
    index = torch.tensor([1, 0, -1, 2])
    lengths = [6, 8, 4, 8]
    ids, mask = left_padded(lengths, seed=5)
    mixed = aligner.attach_bank(copy.deepcopy(model), bank)
    sequences, logits = generate_logits(mixed, ids, mask, aligner_index=index, use_cache=use_cache)
    for row, k in enumerate(index.tolist()):
        single = alone(model, None if k < 0 else paths[k])
        one_sequences, one_logits = generate_logits(
            single, ids[row : row + 1, -lengths[row] :], mask[row : row + 1, -lengths[row] :]
        )
        assert torch.equal(sequences[row, -4:], one_sequences[0, -4:])
        torch.testing.assert_close(logits[row], one_logits[0], atol=1e-5, rtol=0)


def test_base_rows_are_bit_identical_to_the_unpatched_model(setup):
    model, _, bank = setup
    index = torch.tensor([-1, 0, -1, 2])
    ids, mask = left_padded([7, 9, 4, 9], seed=7)
    # The same model object before and after, frozen (as patch leaves it): on CPU, F.linear may
    # round differently for a weight that requires grad and for a copy at another address.
    model = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    base_seq, base_logits = generate_logits(model, ids, mask)
    aligner.attach_bank(model, bank)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, aligner_index=index).logits
    mixed_seq, mixed_logits = generate_logits(model, ids, mask, aligner_index=index)
    for row in (0, 2):
        assert torch.equal(logits[row], expected[row])
        assert torch.equal(mixed_seq[row], base_seq[row])
        assert torch.equal(mixed_logits[row], base_logits[row])
    assert not torch.allclose(logits[1], expected[1], atol=1e-3)  # the Aligner rows did change


def test_packed_batch_rows_equal_each_aligner_alone(setup):
    model, paths, bank = setup
    gen = torch.Generator().manual_seed(11)
    lengths = [5, 7, 4]
    index = torch.tensor([2, -1, 0])
    sequences = [torch.randint(1, VOCAB, (n,), generator=gen) for n in lengths]
    ids = torch.cat(sequences)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    mixed = aligner.attach_bank(copy.deepcopy(model), bank)
    with torch.no_grad():
        # Without a KV cache, as training runs packed batches (transformers detects packing only then).
        logits = mixed(ids, position_ids=positions, aligner_index=index, use_cache=False).logits[0]
    start = 0
    for row, k in enumerate(index.tolist()):
        with torch.no_grad():
            expected = alone(model, None if k < 0 else paths[k])(sequences[row][None]).logits[0]
        torch.testing.assert_close(logits[start : start + lengths[row]], expected, atol=1e-5, rtol=0)
        start += lengths[row]


def test_selected_runs_one_bank_aligner_on_every_row_as_if_loaded_alone(setup):
    """aligner.selected: calls without aligner_index (what an evaluation harness makes) get one bank
    Aligner on every row, bit for bit what the same model computes with that Aligner loaded."""
    model, paths, bank = setup
    model = aligner.attach_bank(copy.deepcopy(model), bank)
    ids, mask = left_padded([5, 9, 7], seed=13)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # N > 1 needs positions from 0 (DESIGN.md)

    def run(**kwargs) -> list[torch.Tensor]:
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=positions, **kwargs).logits
        return [logits, *generate_logits(model, ids, mask, **kwargs)]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    base = run()
    every_row_0 = run(aligner_index=torch.zeros(3, dtype=torch.int64))
    with aligner.selected(model, bank.names[1]):
        chosen = run()
        with aligner.selected(model, 0):  # blocks nest; an index works as well as a name
            logits, sequences, _ = run()  # per-row (B, H) gates round differently: 1e-5
            torch.testing.assert_close(logits, every_row_0[0], atol=1e-5, rtol=0)
            assert torch.equal(sequences, every_row_0[1])
        assert same(run(), chosen)
        assert same(run(aligner_index=torch.zeros(3, dtype=torch.int64)), every_row_0)  # explicit rows win
        with aligner.disabled(model):
            assert same(run(), base)
        with pytest.raises(ValueError, match=r"cannot detach the bank inside aligner.selected\(...\)"):
            aligner.detach_bank(model)
        with pytest.raises(ValueError, match="cannot attach another bank inside aligner.selected"):
            aligner.attach_bank(model, bank)
    assert same(run(), base)  # leaving the block restores the model's own (zero-gate) Aligner
    assert not torch.allclose(chosen[0], base[0], atol=1e-3)
    aligner.load(model, paths[1])  # the same model object, now with that Aligner as its own
    assert same(run(), chosen)


def test_selected_errors(setup1):
    model, _, bank = setup1
    with pytest.raises(ValueError, match="carries no Aligner"):
        with aligner.selected(copy.deepcopy(model), 0):
            pass
    patched = aligner.patch(copy.deepcopy(model), num_tokens=1, start_layer=1)
    with pytest.raises(ValueError, match=r"aligner.selected needs a bank on the model: call aligner.attach"):
        with aligner.selected(patched, 0):
            pass
    aligner.attach_bank(patched, bank)
    for choice, kind, message in [
        ("nope", ValueError, "no Aligner named 'nope' in the bank"),
        (3, ValueError, "aligner=3 is not an index of this bank of 3 Aligners"),
        (-1, ValueError, "aligner=-1 is not an index"),
        (True, TypeError, "aligner must be an Aligner's name .str. or bank index .int., got bool"),
    ]:
        with pytest.raises(kind, match=message):
            with aligner.selected(patched, choice):
                pass
    assert aligner.hf_patch.get_state(patched).selected is None


def test_only_the_selected_rows_are_projected(setup1):
    model, _, bank = setup1
    big = AlignerBank(bank.tokens.repeat(50, 1, 1), bank.gates.repeat(50, 1, 1),
                      [f"a{i}" for i in range(150)], bank.config)  # fmt: skip
    mixed = aligner.attach_bank(copy.deepcopy(model), big)
    seen = []
    k_proj = mixed.model.layers[1].self_attn.k_proj
    k_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    ids, mask = left_padded([3, 4], seed=1)
    with torch.no_grad():
        mixed(ids, attention_mask=mask, aligner_index=torch.tensor([149, 3]))
    prefix_calls = [shape for shape in seen if shape[-2] == bank.num_tokens and len(shape) == 3]
    assert prefix_calls == [torch.Size([2, bank.num_tokens, 64])]


def test_bank_round_trip_add_remove_and_select_by_name(setup1, tmp_path):
    model, paths, bank = setup1
    path = bank.save(tmp_path / "bank.safetensors")
    loaded = AlignerBank.load(path)
    assert loaded.names == ["aligner0", "aligner1", "aligner2"] and len(loaded) == 3
    assert torch.equal(loaded.tokens, bank.tokens) and torch.equal(loaded.gates, bank.gates)
    assert loaded.config == bank.config
    assert loaded.indices(["aligner2", None, "aligner0"]).tolist() == [2, -1, 0]
    # A loaded bank gives what the Aligner gives alone, selected by name.
    ids, mask = left_padded([6, 6], seed=9)
    mixed = aligner.attach_bank(copy.deepcopy(model), loaded)
    with torch.no_grad():
        logits = mixed(
            ids, attention_mask=mask, aligner_index=loaded.indices(["aligner1", "aligner1"])
        ).logits
        expected = alone(model, paths[1])(ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)

    smaller = loaded.remove("aligner1")
    assert smaller.names == ["aligner0", "aligner2"]
    assert torch.equal(smaller.tokens[1], bank.tokens[2])
    again = smaller.add(paths[1], name="back")
    assert again.names == ["aligner0", "aligner2", "back"] and torch.equal(again.gates[2], bank.gates[1])
    again.save(path)  # replaces the file atomically
    assert AlignerBank.load(path).names == ["aligner0", "aligner2", "back"]
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]  # no temporary left behind
    probe = tmp_path / "probe"
    probe.touch()
    assert os.stat(path).st_mode == os.stat(probe).st_mode  # the usual mode, not safetensors' 0600


def test_bank_errors(setup1, tmp_path):
    model, paths, bank = setup1
    mixed = aligner.attach_bank(copy.deepcopy(model), bank)
    ids, mask = left_padded([3, 3])
    with pytest.raises(ValueError, match=r"aligner_index must be in \[-1, 3\)"):
        mixed(ids, attention_mask=mask, aligner_index=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="aligner_index has 3 entries but the batch has 2"):
        mixed(ids, attention_mask=mask, aligner_index=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="1-D int64 tensor"):
        mixed(ids, attention_mask=mask, aligner_index=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="no Aligner named 'nope'"):
        bank.indices(["nope"])
    plain = aligner.patch(copy.deepcopy(model), num_tokens=bank.num_tokens, start_layer=1)
    with pytest.raises(ValueError, match="needs a bank on the model"):
        plain(ids, aligner_index=torch.tensor([0, 0]))

    other_base = base_model(num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"bank was made for .* \(differs in num_key_value_heads\)"):
        aligner.attach_bank(other_base, bank)
    other_n = aligner.patch(copy.deepcopy(model), num_tokens=bank.num_tokens + 1, start_layer=1)
    with pytest.raises(ValueError, match="the model's Aligner has num_tokens=.* but the bank has"):
        aligner.attach_bank(other_n, bank)

    n_dir = save_random_aligners(model, tmp_path / "n", 1, bank.num_tokens + 1)[0]
    layer_dir = save_random_aligners(model, tmp_path / "l", 1, bank.num_tokens, start_layer=2)[0]
    base_dir = save_random_aligners(other_base, tmp_path / "b", 1, bank.num_tokens)[0]
    with pytest.raises(
        ValueError, match=f"has num_tokens={bank.num_tokens + 1}, start_layer=1, but the bank"
    ):
        bank.add(n_dir, name="other")
    with pytest.raises(
        ValueError, match=r"has num_tokens=\d, start_layer=2, but .* has num_tokens=\d, start_layer=1"
    ):
        AlignerBank.from_aligners([paths[0], layer_dir])
    with pytest.raises(ValueError, match="differs in num_key_value_heads"):
        AlignerBank.from_aligners([paths[0], base_dir])
    with pytest.raises(ValueError, match="already holds an Aligner named 'aligner0'"):
        bank.add(paths[0])
    with pytest.raises(ValueError, match="names must be unique"):
        AlignerBank.from_aligners([paths[0], paths[1]], names=["a", "a"])
    with pytest.raises(ValueError, match="cannot be merged"):
        aligner.merge(mixed)

    with pytest.raises(FileNotFoundError, match="no bank file"):
        AlignerBank.load(tmp_path / "missing.safetensors")
    not_bank = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"tokens": torch.zeros(1)}, not_bank)
    with pytest.raises(ValueError, match="is not an Aligner bank"):
        AlignerBank.load(not_bank)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        AlignerBank.load(garbage)
    nan = AlignerBank(bank.tokens.clone(), bank.gates.clone(), bank.names, bank.config)
    nan.gates[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"bank Aligners \[1\] hold NaN"):
        nan.select(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="bank tokens has shape"):
        AlignerBank(bank.tokens[:2], bank.gates, bank.names, bank.config)


def test_bank_command_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("datasets", reason="needs the train extra: pip install -e '.[train]'")
    import io
    import sys

    from test_training import write_jsonl
    from transformers import AutoModelForCausalLM

    from aligner.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    model_dir = save_tiny_model(tmp_path / "model")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    dirs = save_random_aligners(base, tmp_path, 3, num_tokens=1)
    bank = tmp_path / "bank.safetensors"
    assert run("bank", "build", bank, dirs[0], dirs[1], "--name", "json", "--name", "caps")[0] == 0
    code, _, err = run("bank", "build", bank, dirs[0])
    assert code != 0 and "exists; pass --overwrite" in err
    assert run("bank", "add", bank, dirs[2], "--name", "answer")[0] == 0
    assert run("bank", "add", bank, dirs[2], "--name", "spare")[0] == 0
    assert run("bank", "remove", bank, "spare")[0] == 0
    code, out, _ = run("bank", "list", bank, "--json")
    assert code == 0 and json.loads(out)["names"] == ["json", "caps", "answer"]
    code, _, err = run("bank", "remove", bank, "nope")
    assert code != 0 and "no Aligner named 'nope'" in err

    rows = [
        {"prompt": "name a color", "aligner": "caps"},
        {"prompt": "what do bees make", "aligner": None},
        {"prompt": "name a color", "aligner": "answer"},
        {"prompt": "hello", "aligner": "json"},
    ]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    code, out, err = run(
        "generate", model_dir, "--bank", bank, "--data", data, "--max-new-tokens", 4, "--json"
    )
    assert code == 0, err
    answers = [json.loads(line) for line in out.splitlines()]
    assert [a["aligner"] for a in answers] == ["caps", None, "answer", "json"]
    for row, answer, directory in zip(rows[:2], answers, [dirs[1], None]):
        alone_args = [] if directory is None else ["--aligner", directory]
        code, out, err = run(
            "generate", model_dir, *alone_args, "--prompt", row["prompt"], "--max-new-tokens", 4, "--json"
        )
        assert code == 0, err
        assert json.loads(out)["answer"] == answer["answer"]  # a mixed batch answers like each alone

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "aligner": "missing"}])
    code, _, err = run("generate", model_dir, "--bank", bank, "--data", bad)
    assert code != 0 and "no Aligner named 'missing'" in err

    monkeypatch.setattr(sys, "stdin", io.StringIO("name a color\n/exit\n"))
    code, out, err = run("chat", model_dir, "--bank", bank, "--aligner", "caps", "--max-new-tokens", 4)
    assert code == 0, err
    code2, out2, _ = run(
        "generate",
        model_dir,
        "--aligner",
        dirs[1],
        "--prompt",
        "name a color",
        "--max-new-tokens",
        4,
        "--json",
    )
    assert out.strip() == json.loads(out2)["answer"]


def test_bench_bank_smoke(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import bench_bank

    argv = ["--results-dir", tmp_path, "--device", "cpu", "--dtype", "float32", "--model", "tiny",
            "--layers", 3, "--bank-size", 300, "--prompts", 3, "--prompt-length", 4, "--new-tokens", 2,
            "--rounds", 1, "--bank-file", tmp_path / "bank.safetensors"]  # fmt: skip
    rows = bench_bank.main([str(a) for a in argv])
    assert [row["method"] for row in rows] == ["base", "bank", "bank memory"]
    assert rows[2]["bank_raw_mb"] > 0 and rows[1]["tokens_per_s"] > 0
