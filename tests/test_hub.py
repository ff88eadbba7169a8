"""Aligners and banks by Hugging Face Hub repo id, without a network: HF_HUB_OFFLINE=1 and a local
Hugging Face cache in tmp_path holding repositories in the cache's real layout
(``models--owner--name/{blobs,snapshots/<commit>,refs}``), which ``snapshot_download`` /
``hf_hub_download`` resolve offline. ``push_to_hub`` runs against a fake ``HfApi`` that writes the
uploaded folder to disk; what it uploads is then put in the cache and loaded back by repo id."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from unittest.mock import Mock

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants, errors
from tiny_models import randomize_aligner, save_tiny_model, tiny_model

import aligner
from aligner import AlignerBank
from aligner.hub import BANK_FILENAME, is_repo_id
from aligner.publish import model_card
from aligner.serialization import CONFIG_NAME, WEIGHTS_NAME

REPO = "user/my-aligner"
COMMITS = {"main": "a" * 40, "v1": "b" * 40}


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str, refs=("main",)) -> Path:
    """Put ``files`` into the Hugging Face cache ``cache`` as the snapshot ``commit`` of ``repo_id``, as
    huggingface_hub lays it out: content-addressed blobs, the snapshot's files as relative symlinks to
    them, and one file per ref holding the commit hash (no newline)."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def folder_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hub with an empty cache in tmp_path (constants are read at import: patched too)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def trained(seed: int, num_tokens: int = 2):
    model = aligner.patch(tiny_model(), num_tokens=num_tokens, start_layer=1)
    return randomize_aligner(model, seed=seed)


def same_aligner(a, b) -> bool:
    pa, pb = aligner.aligner_parameters(a), aligner.aligner_parameters(b)
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.fixture
def published(hub_cache, tmp_path):
    """Two Aligners of REPO: one at main, one at tag v1 (another commit)."""
    models = {}
    for seed, (ref, commit) in enumerate(COMMITS.items(), start=1):
        models[ref] = trained(seed)
        saved = aligner.save(models[ref], tmp_path / f"saved-{ref}")
        cache_repo(hub_cache, REPO, folder_files(saved), commit, refs=(ref,))
    return models


# --------------------------------------------------------------------------------------------
# Loading by repo id


def test_load_by_repo_id_and_revision(published):
    assert same_aligner(aligner.load(tiny_model(), REPO), published["main"])
    assert same_aligner(aligner.load(tiny_model(), REPO, revision="main"), published["main"])
    assert same_aligner(aligner.load(tiny_model(), REPO, revision="v1"), published["v1"])
    assert same_aligner(aligner.load(tiny_model(), REPO, revision=COMMITS["v1"]), published["v1"])
    assert not same_aligner(published["main"], published["v1"])


def test_a_local_path_wins_and_a_path_object_stays_local(published, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert same_aligner(aligner.load(tiny_model(), REPO), published["main"])  # no ./user/my-aligner yet
    local = trained(seed=7)
    aligner.save(local, tmp_path / REPO)
    assert same_aligner(aligner.load(tiny_model(), REPO), local)
    with pytest.raises(ValueError, match="local path; revision='v1' applies to Hub repo ids only"):
        aligner.load(tiny_model(), REPO, revision="v1")
    with pytest.raises(FileNotFoundError, match="no Aligner directory at user/absent"):
        aligner.load(tiny_model(), Path("user/absent"))  # a Path never goes to the Hub


def test_clear_errors(published, hub_cache, tmp_path):
    model = tiny_model()
    for text in ["./nowhere", "nowhere", "a/b/c", "~/x", "bad name/x"]:
        with pytest.raises(FileNotFoundError, match=f"directory='{text}': no such local directory, and not"):
            aligner.load(model, text)
    with pytest.raises(FileNotFoundError, match="user/absent is not in the local Hugging Face cache"):
        aligner.load(model, "user/absent")
    with pytest.raises(FileNotFoundError, match="at revision 'v9' is not in the local Hugging Face cache"):
        aligner.load(model, REPO, revision="v9")
    cache_repo(hub_cache, "user/a-model", {"config.json": b"{}"}, "c" * 40)  # a repo, but not an Aligner
    with pytest.raises(FileNotFoundError, match="user/a-model holds no aligner_config.json"):
        aligner.load(model, "user/a-model")
    assert not hasattr(model, "aligner_state")  # nothing was patched by the failed loads
    other = aligner.save(aligner.patch(tiny_model(num_hidden_layers=4), num_tokens=1), tmp_path / "other")
    cache_repo(hub_cache, "user/other-base", folder_files(other), "d" * 40)
    with pytest.raises(ValueError, match="num_hidden_layers"):  # the usual checks apply to Hub Aligners
        aligner.load(model, "user/other-base")


def response(status: int) -> Mock:
    return Mock(headers={}, status_code=status)


@pytest.mark.parametrize(
    "error, kind, message",
    [
        (errors.RepositoryNotFoundError("", response=response(404)), FileNotFoundError, "Hub has no repo"),
        (errors.GatedRepoError("", response=response(403)), PermissionError, "is gated"),
        (errors.RevisionNotFoundError("", response=response(404)), FileNotFoundError, "has no revision 'v2'"),
        (errors.HfHubHTTPError("", response=response(500)), OSError, "fetching user/x at revision 'v2' from"),
    ],
    ids=["no-repo", "gated", "no-revision", "server-error"],
)
def test_online_hub_errors_name_the_argument(monkeypatch, hub_cache, error, kind, message):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(kind, match=message) as raised:
        aligner.load(tiny_model(), "user/x", revision="v2")
    assert "directory='user/x' is not a local path" in str(raised.value)
    assert raised.value.__cause__ is error


def test_repo_ids():
    assert is_repo_id("user/my-aligner") and is_repo_id("Org_1/name.v2")
    for text in ["gpt2", "a/b/c", "./x", "/abs/x", "user/", "user//x", "us er/x", "user/x--y", ""]:
        assert not is_repo_id(text), text


# --------------------------------------------------------------------------------------------
# Banks


@pytest.fixture
def bank_repo(hub_cache, tmp_path):
    model = aligner.patch(tiny_model(), num_tokens=1, start_layer=1)
    paths = [aligner.save(randomize_aligner(model, seed=s), tmp_path / f"a{s}") for s in (1, 2, 3)]
    banks = {
        "main": AlignerBank.from_aligners(paths[:2], names=["json", "caps"]),
        "v1": AlignerBank.from_aligners(paths, names=["json", "caps", "answer"]),
    }
    for ref, bank in banks.items():
        bank.save(tmp_path / ref / BANK_FILENAME)
        bank.save(tmp_path / ref / "sub" / "other.safetensors")
        files = {BANK_FILENAME: (tmp_path / ref / BANK_FILENAME).read_bytes()}
        files["sub/other.safetensors"] = (tmp_path / ref / "sub" / "other.safetensors").read_bytes()
        cache_repo(hub_cache, "user/banks", files, COMMITS[ref], refs=(ref,))
    return banks


def same_bank(a, b) -> bool:
    return a.names == b.names and torch.equal(a.tokens, b.tokens) and torch.equal(a.gates, b.gates)


def test_bank_load_by_repo_id(bank_repo, tmp_path, monkeypatch):
    assert same_bank(AlignerBank.load("user/banks"), bank_repo["main"])
    assert same_bank(AlignerBank.load("user/banks", revision="v1"), bank_repo["v1"])
    by_commit = AlignerBank.load("user/banks/sub/other.safetensors", revision=COMMITS["v1"])
    assert same_bank(by_commit, bank_repo["v1"])
    with pytest.raises(FileNotFoundError, match="user/banks is not in the local Hugging Face cache"):
        AlignerBank.load("user/banks/missing.safetensors")  # offline, so absent looks like not cached
    with pytest.raises(FileNotFoundError, match="path='nowhere.safetensors': no such local file, and not a"):
        AlignerBank.load("nowhere.safetensors")
    with pytest.raises(FileNotFoundError, match="no bank file at user/banks"):
        AlignerBank.load(Path("user/banks"))
    monkeypatch.chdir(tmp_path)
    bank_repo["v1"].save(tmp_path / "user" / "banks")  # a local file of that name wins
    assert same_bank(AlignerBank.load("user/banks"), bank_repo["v1"])


def test_bank_file_missing_in_an_online_repo(monkeypatch, hub_cache):
    def fail(*args, **kwargs):
        raise errors.RemoteEntryNotFoundError("404", response=response(404))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(FileNotFoundError, match="user/banks has no file bank.safetensors"):
        AlignerBank.load("user/banks")


def test_cli_generate_with_a_bank_from_the_hub(bank_repo, tmp_path, capsys):
    from aligner.cli import main

    base = save_tiny_model(tmp_path / "base", num_hidden_layers=3, hidden_size=64, intermediate_size=96)
    argv = ["generate", str(base), "--bank", "user/banks", "--aligner", "caps", "--prompt", "the cat"]
    assert main([*argv, "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["aligner"] == "caps"


def test_cli_generate_with_an_aligner_from_the_hub(published, tmp_path, capsys):
    from aligner.cli import main

    base = save_tiny_model(tmp_path / "base", num_hidden_layers=3, hidden_size=64, intermediate_size=96)
    argv = ["generate", str(base), "--aligner", REPO, "--prompt", "the cat", "--max-new-tokens", "2"]
    assert main(argv) == 0


def test_cli_revision_reaches_every_hub_option(published, bank_repo, tmp_path, capsys):
    """--revision picks the branch, tag or commit of --aligner, --bank and --init-aligner (generate,
    train, merge), and is refused where it would be ignored."""
    from aligner.cli import main

    base = save_tiny_model(tmp_path / "base", num_hidden_layers=3, hidden_size=64, intermediate_size=96)
    generate = ["generate", base, "--prompt", "the cat", "--max-new-tokens", "6", "--json"]

    def answer(*argv) -> str:
        assert main([str(a) for a in [*generate, *argv]]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out.splitlines()[-1])["answer"]

    def error(*argv) -> str:
        assert main([str(a) for a in argv]) == 2
        return capsys.readouterr().err

    at_v1 = answer("--aligner", tmp_path / "saved-v1")
    assert answer("--aligner", REPO, "--revision", "v1") == at_v1
    assert answer("--aligner", REPO, "--revision", COMMITS["v1"]) == at_v1
    assert answer("--aligner", REPO) == answer("--aligner", tmp_path / "saved-main") != at_v1
    # "answer" is in the bank at v1 only.
    assert "no Aligner named 'answer'" in error(*generate, "--bank", "user/banks", "--aligner", "answer")
    answer("--bank", "user/banks", "--revision", "v1", "--aligner", "answer")

    not_cached = "at revision 'v9' is not in the local Hugging Face cache"
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "the cat", "output": "sat"}) + "\n")
    train = ["train", base, "--data", data, "--output-dir", tmp_path / "out"]
    assert not_cached in error(*train, "--init-aligner", REPO, "--revision", "v9")
    assert "--num-tokens 1 conflicts with --init-aligner" in error(
        *train, "--init-aligner", REPO, "--revision", "v1", "--num-tokens", "1"
    )
    merge = ["merge", base, "--aligner", REPO, "--output-dir", tmp_path / "merged"]
    assert not_cached in error(*merge, "--revision", "v9")
    assert "only a 1-token Aligner merges" in error(*merge, "--revision", "v1")
    assert "--revision v1 applies to --init-aligner given as a Hub repo id; none was given" in error(
        *train, "--revision", "v1"
    )
    assert "--revision v1 applies to --aligner or --bank given as a Hub repo id" in error(
        *generate, "--revision", "v1"
    )
    local = error(*generate, "--aligner", tmp_path / "saved-v1", "--revision", "v1")
    assert "saved-v1' is a local path; --revision v1 applies to Hub repo ids only" in local
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()


# --------------------------------------------------------------------------------------------
# Publishing


class FakeHfApi:
    """Records create_repo and writes what upload_folder / create_commit upload into ``remote/<repo_id>``."""

    calls: list = []
    remote: Path

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        FakeHfApi.calls.append(("upload_folder", repo_id, kwargs))
        shutil.copytree(folder_path, FakeHfApi.remote / repo_id, dirs_exist_ok=True)
        return f"commit of {repo_id}"

    def create_commit(self, *, repo_id, operations, **kwargs):
        FakeHfApi.calls.append(("create_commit", repo_id, kwargs))
        FakeHfApi.sources = [op.path_or_fileobj for op in operations]
        for op in operations:
            target = FakeHfApi.remote / repo_id / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            data = op.path_or_fileobj
            target.write_bytes(data if isinstance(data, bytes) else Path(data).read_bytes())
        return f"commit of {repo_id}"


@pytest.fixture
def fake_api(monkeypatch, tmp_path, hub_cache):  # offline too: nothing may reach the real Hub
    FakeHfApi.calls = []
    FakeHfApi.remote = tmp_path / "remote"
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def test_push_to_hub_uploads_the_aligner_and_a_card(fake_api, hub_cache):
    model = trained(seed=3)
    model.config._name_or_path = "org/tiny-llama"  # as if loaded from the Hub
    result = aligner.push_to_hub(model, REPO, private=True, token="hf_x", commit_message="first")
    assert result == f"commit of {REPO}"
    (_, _, create), (_, _, upload) = fake_api.calls
    assert create == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert upload["commit_message"] == "first" and upload["create_pr"] is False
    uploaded = fake_api.remote / REPO
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]

    card = huggingface_hub.ModelCard((uploaded / "README.md").read_text())
    assert card.data.library_name == "aligner-kernels"
    assert card.data.base_model == "org/tiny-llama"
    assert "aligner" in card.data.tags and card.data.pipeline_tag == "text-generation"
    text = card.text
    assert 'from_pretrained("org/tiny-llama")' in text and f'aligner.load(model, "{REPO}")' in text
    rows = ["| model_type | llama |", "| num_hidden_layers | 3 |", "| num_tokens | 2 |", "| start_layer | 1 "]
    assert all(row in text for row in rows)
    assert "in layers 1-2" in text and "2 learnable token(s)" in text

    # What was uploaded, served from the cache, loads back by repo id.
    cache_repo(hub_cache, REPO, folder_files(uploaded), "e" * 40)
    assert same_aligner(aligner.load(tiny_model(), REPO), model)


def test_push_to_hub_card_options(fake_api, tmp_path):
    model = trained(seed=4)
    model.config._name_or_path = str(tmp_path)  # a local base: no base_model metadata, a placeholder
    aligner.push_to_hub(model, "user/a")
    card = huggingface_hub.ModelCard((fake_api.remote / "user/a/README.md").read_text())
    assert card.data.base_model is None
    assert 'from_pretrained("BASE_MODEL")' in card.text and f"(`{tmp_path}`)" in card.text
    aligner.push_to_hub(model, "user/b", base_model="org/named-base", revision="dev", create_pr=True)
    card = huggingface_hub.ModelCard((fake_api.remote / "user/b/README.md").read_text())
    assert card.data.base_model == "org/named-base"
    assert fake_api.calls[-1][2]["revision"] == "dev" and fake_api.calls[-1][2]["create_pr"] is True
    aligner.push_to_hub(model, "user/c", card="# mine\n")
    assert (fake_api.remote / "user/c/README.md").read_text() == "# mine\n"
    aligner.push_to_hub(model, "user/d", card=False)
    assert not (fake_api.remote / "user/d/README.md").exists()
    calls = len(fake_api.calls)
    with pytest.raises(ValueError, match="repo_id='my-aligner' is not a Hugging Face Hub repo id"):
        aligner.push_to_hub(model, "my-aligner")
    with pytest.raises(ValueError, match="carries no Aligner"):
        aligner.push_to_hub(tiny_model(), "user/e")
    assert len(fake_api.calls) == calls  # nothing was sent


def test_model_card_tags_from_trl(tmp_path):
    model = trained(seed=5)
    model.add_model_tags(["trl", "dpo"])  # what TRL's trainers do
    config = json.loads((aligner.save(model, tmp_path) / CONFIG_NAME).read_text())
    card = huggingface_hub.ModelCard(model_card(config, REPO, tags=model.model_tags))
    assert card.data.tags == ["aligner", "dpo", "trl"]
    assert card.data.library_name == "aligner-kernels"


# --------------------------------------------------------------------------------------------
# Publishing banks


@pytest.fixture
def bank_file(tmp_path):
    model = aligner.patch(tiny_model(), num_tokens=1, start_layer=1)
    paths = [aligner.save(randomize_aligner(model, seed=s), tmp_path / f"b{s}") for s in (1, 2)]
    return AlignerBank.from_aligners(paths, names=["json", "caps"]).save(tmp_path / "mine.safetensors")


def test_push_bank_to_hub_uploads_the_file_as_it_is_and_a_card(fake_api, hub_cache, bank_file):
    result = aligner.push_bank_to_hub(bank_file, "user/bank", private=True, base_model="org/tiny-llama")
    assert result == "commit of user/bank"
    (_, _, create), (kind, _, commit) = fake_api.calls
    assert create == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert kind == "create_commit" and commit["commit_message"] == "Upload Aligner bank"
    assert fake_api.sources[0] == str(bank_file)  # the file itself, not a copy
    uploaded = fake_api.remote / "user/bank"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", BANK_FILENAME]
    assert (uploaded / BANK_FILENAME).read_bytes() == bank_file.read_bytes()

    card = huggingface_hub.ModelCard((uploaded / "README.md").read_text())
    assert card.data.library_name == "aligner-kernels" and card.data.base_model == "org/tiny-llama"
    assert card.data.tags == ["aligner", "aligner-bank"]
    text = card.text
    assert "A bank of 2 Aligners for [org/tiny-llama]" in text and "in layers\n1-2" in text
    assert 'AlignerBank.load("user/bank")' in text and "bank.indices(['json', None])" in text
    assert "0. `json`\n1. `caps`" in text and "| num_hidden_layers | 3 |" in text

    # What was uploaded, served from the cache, loads back by repo id.
    cache_repo(hub_cache, "user/bank", folder_files(uploaded), "f" * 40)
    assert same_bank(AlignerBank.load("user/bank"), AlignerBank.load(bank_file))


def test_push_bank_to_hub_options_and_errors(fake_api, hub_cache, bank_file, tmp_path):
    bank = AlignerBank.load(bank_file)
    big = AlignerBank(bank.tokens.repeat(75, 1, 1), bank.gates.repeat(75, 1, 1),
                      [f"a{i}" for i in range(150)], bank.config)  # fmt: skip
    aligner.push_bank_to_hub(big, "user/big", path_in_repo="banks/big.safetensors", revision="dev")
    assert fake_api.calls[-1][2]["revision"] == "dev"
    uploaded = fake_api.remote / "user/big"
    card = (uploaded / "README.md").read_text()
    assert 'AlignerBank.load("user/big/banks/big.safetensors")' in card
    assert 'from_pretrained("BASE_MODEL")' in card
    assert "99. `a99`\n\n... and 50 more" in card and "`a100`" not in card
    files = {"banks/big.safetensors": (uploaded / "banks/big.safetensors").read_bytes()}
    cache_repo(hub_cache, "user/big", files, "9" * 40)
    assert same_bank(AlignerBank.load("user/big/banks/big.safetensors"), big)

    aligner.push_bank_to_hub(bank, "user/c", card="# mine\n")
    assert (fake_api.remote / "user/c/README.md").read_text() == "# mine\n"
    aligner.push_bank_to_hub(bank, "user/d", card=False)
    assert sorted(p.name for p in (fake_api.remote / "user/d").iterdir()) == [BANK_FILENAME]

    calls = len(fake_api.calls)
    expected = "must be a relative path in the repository ending in .safetensors"
    for path in ("../x.safetensors", "/x.safetensors", "x.bin", ""):
        with pytest.raises(ValueError, match=expected):
            aligner.push_bank_to_hub(bank, "user/e", path_in_repo=path)
    with pytest.raises(ValueError, match="repo_id='bank' is not a Hugging Face Hub repo id"):
        aligner.push_bank_to_hub(bank, "bank")
    with pytest.raises(FileNotFoundError, match="no such bank file"):
        aligner.push_bank_to_hub(tmp_path / "none.safetensors", "user/e")
    with pytest.raises(ValueError, match="is not an Aligner bank"):
        aligner.push_bank_to_hub(tmp_path / "b1" / WEIGHTS_NAME, "user/e")  # an Aligner's weights
    with pytest.raises(TypeError, match="bank must be an AlignerBank or the path of a bank file, got dict"):
        aligner.push_bank_to_hub({}, "user/e")
    assert len(fake_api.calls) == calls  # nothing was sent


def test_cli_push(fake_api, bank_file, tmp_path, capsys):
    from aligner.cli import main

    def run(*argv) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, err = run("push", bank_file, "user/bank", "--base-model", "org/tiny-llama", "--json")
    assert code == 0, err
    assert json.loads(out) == {
        "repo_id": "user/bank", "kind": "bank", "source": str(bank_file), "url": "commit of user/bank"
    }  # fmt: skip
    assert (fake_api.remote / "user/bank" / BANK_FILENAME).read_bytes() == bank_file.read_bytes()
    saved = tmp_path / "b1"
    code, out, err = run("push", saved, "user/one", "--private", "--commit-message", "first")
    assert code == 0, err
    assert out.strip() == f"pushed the Aligner {saved} to user/one: commit of user/one"
    assert fake_api.calls[-2][2]["private"] is True and fake_api.calls[-1][2]["commit_message"] == "first"
    uploaded = fake_api.remote / "user/one"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    assert (uploaded / WEIGHTS_NAME).read_bytes() == (saved / WEIGHTS_NAME).read_bytes()
    code, _, err = run("push", saved, "user/two", "--no-card")
    assert code == 0 and not (fake_api.remote / "user/two/README.md").exists()

    calls = len(fake_api.calls)
    (tmp_path / "empty").mkdir()
    for argv, message in [
        ((tmp_path / "none", "user/x"), "none: no such file or directory; expected a saved Aligner"),
        ((tmp_path / "empty", "user/x"), "empty: not a saved Aligner nor a bank; expected"),
        ((saved / WEIGHTS_NAME, "user/x"), "not a saved Aligner nor a bank"),
        ((saved, "x"), "REPO_ID 'x' is not a Hugging Face Hub repo id (owner/name)"),
        ((saved, "user/x", "--path-in-repo", "a.safetensors"), "--path-in-repo applies to a bank"),
    ]:
        code, _, err = run("push", *argv)
        assert code == 2 and message in err, (argv, err)
    assert len(fake_api.calls) == calls  # nothing was sent
