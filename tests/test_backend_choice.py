"""backend="auto": the measured choice between fused and split (with a fake timer), its cache file
(atomic, versioned, rebuilt when corrupt), the determinism rule and ALIGNER_BACKEND."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
from attention_cases import make_inputs

import aligner.attention
from aligner import aligner_attention, backend_choice
from aligner.backend_choice import CACHE_VERSION, BackendChooser, choice_key


class FakeTimer:
    """Returns the given milliseconds per backend; counts calls. The run is executed once, so the
    candidates the chooser builds are checked to work."""

    def __init__(self, fused: float, split: float, execute: bool = False) -> None:
        self.times = {"fused": fused, "split": split}
        self.calls: list[str] = []
        self.execute = execute

    def __call__(self, run) -> float:
        name = run.keywords["backend"]
        self.calls.append(name)
        if self.execute:
            run()
        return self.times[name]


def _runs():
    """Candidate runs as the chooser builds them: partials naming their backend."""
    return {
        name: functools.partial(lambda backend: backend, backend=name) for name in backend_choice.CANDIDATES
    }


@pytest.fixture
def cache_file(tmp_path):
    return tmp_path / "cache" / "backend_choice.json"


def test_chooser_takes_the_faster_and_times_once(cache_file):
    timer = FakeTimer(fused=2.0, split=1.0)
    chooser = BackendChooser(cache_file, timer)
    assert chooser.choose("key-a", _runs(), ("fused", "split")) == "split"
    assert chooser.choose("key-a", _runs(), ("fused", "split")) == "split"
    assert timer.calls == ["fused", "split"]  # measured once
    timer.times = {"fused": 1.0, "split": 3.0}
    assert chooser.choose("key-b", _runs(), ("fused", "split")) == "fused"
    assert timer.calls == ["fused", "split"] * 2


def test_restricted_choice_uses_the_same_timings(cache_file):
    chooser = BackendChooser(cache_file, FakeTimer(fused=5.0, split=1.0))
    assert chooser.choose("key", _runs(), ("fused",)) == "fused"
    assert chooser.choose("key", _runs(), ("fused", "split")) == "split"


def test_cache_file_is_versioned_json_and_reused_by_a_new_process(cache_file):
    BackendChooser(cache_file, FakeTimer(fused=2.0, split=1.0)).choose("key", _runs(), ("fused", "split"))
    data = json.loads(cache_file.read_text())
    assert data == {"version": CACHE_VERSION, "entries": {"key": {"fused": 2.0, "split": 1.0}}}
    fresh_timer = FakeTimer(fused=0.0, split=9.0)
    assert BackendChooser(cache_file, fresh_timer).choose("key", _runs(), ("fused", "split")) == "split"
    assert fresh_timer.calls == []


def test_cache_is_written_atomically(cache_file, monkeypatch):
    """A failed write (here: the rename) leaves the previous file whole and no temporary behind."""
    BackendChooser(cache_file, FakeTimer(fused=2.0, split=1.0)).choose("old", _runs(), ("fused", "split"))
    before = cache_file.read_bytes()
    writes = []
    real_write = backend_choice.write_atomic
    monkeypatch.setattr(backend_choice, "write_atomic", lambda *a: writes.append(a) or real_write(*a))

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    chooser = BackendChooser(cache_file, FakeTimer(fused=1.0, split=2.0))
    with pytest.warns(UserWarning, match="could not write the backend-choice cache.*disk full"):
        assert chooser.choose("new", _runs(), ("fused", "split")) == "fused"
    assert len(writes) == 1  # through the project's one atomic-write routine
    assert cache_file.read_bytes() == before
    assert sorted(p.name for p in cache_file.parent.iterdir()) == [cache_file.name]
    assert chooser.choose("new", _runs(), ("fused", "split")) == "fused"  # kept in memory


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{not json", "unreadable"),
        (
            json.dumps({"version": CACHE_VERSION - 1, "entries": {"key": {"fused": 9.0, "split": 1.0}}}),
            "version 0",
        ),
        (json.dumps({"entries": {}}), "version None"),
        (json.dumps([1, 2]), "version None"),
        (json.dumps({"version": CACHE_VERSION, "entries": {"key": {"fused": "fast"}}}), "malformed"),
        (json.dumps({"version": CACHE_VERSION, "entries": {"key": {"flash": 1.0}}}), "malformed"),
    ],
    ids=["corrupt", "old-version", "no-version", "not-an-object", "bad-time", "unknown-backend"],
)
def test_corrupt_or_old_cache_is_ignored_with_a_warning_and_rebuilt(cache_file, content, reason):
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text(content)
    timer = FakeTimer(fused=1.0, split=2.0)
    chooser = BackendChooser(cache_file, timer)
    with pytest.warns(UserWarning, match=f"ignoring the backend-choice cache.*{reason}.*rebuilt"):
        assert chooser.choose("key", _runs(), ("fused", "split")) == "fused"
    assert timer.calls == ["fused", "split"]  # measured again, not read from the bad file
    data = json.loads(cache_file.read_text())
    assert data == {"version": CACHE_VERSION, "entries": {"key": {"fused": 1.0, "split": 2.0}}}


def test_cache_dir_follows_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert backend_choice.cache_dir() == tmp_path / "xdg" / "aligner"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert backend_choice.cache_dir() == tmp_path / "home" / ".cache" / "aligner"


def test_key_buckets():
    (q, k, _, pk, *_), _ = make_inputs(seqlen_q=100, num_tokens=3)
    q, k, pk = (x.detach().cpu() for x in (q, k, pk))  # the key names the device: "cpu" here

    def key(**overrides):
        options = dict(causal=True, packed=False, max_seqlen_q=100, max_seqlen_k=100, needs_grad=True)
        return choice_key(q, k, overrides.pop("prefix_k", pk), **{**options, **overrides})

    assert key() == key(max_seqlen_q=120, max_seqlen_k=128)  # one length bucket (128)
    assert key() != key(max_seqlen_q=200, max_seqlen_k=200)
    assert key() == key(prefix_k=torch.zeros(4, *pk.shape[1:]))  # N 3 and 4: bucket 4
    assert key(prefix_k=pk[:1]) != key(prefix_k=pk[:2])  # N = 1 (closed form) is its own bucket
    assert key(prefix_k=None) != key()
    assert key() != key(prefix_k=pk.expand(2, *pk.shape))  # per-sequence prefix
    for other in (dict(causal=False), dict(packed=True), dict(needs_grad=False)):
        assert key() != key(**other)
    assert key().startswith("cpu|float32|d32|group2|n4|lq128|lk128|causal|padded|prefix-shared|fwd-bwd")


@pytest.fixture
def deterministic():
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _choose(inputs, chooser, needs_grad=True, **varlen):
    q = inputs[0]
    return backend_choice.choose(
        *inputs, causal=True, scale=q.shape[-1] ** -0.5, cu_seqlens_q=None, cu_seqlens_k=None,
        max_seqlen_q=q.shape[1], max_seqlen_k=q.shape[1], needs_grad=needs_grad, chooser=chooser,
        run=aligner.attention.run_backend,
    )  # fmt: skip


def test_choose_times_both_backends_on_the_inputs(cache_file):
    """The candidates run the real backends (forward and backward) on detached copies."""
    inputs, _ = make_inputs(num_tokens=2, seqlen_q=16, heads=2, kv_heads=1)
    timer = FakeTimer(fused=3.0, split=1.0, execute=True)
    chooser = BackendChooser(cache_file, timer)
    assert _choose(inputs, chooser) == "split"
    assert timer.calls == ["fused", "split"]
    assert all(x.grad is None for x in inputs)  # nothing reached the caller's leaves
    assert _choose(inputs, chooser) == "split" and len(timer.calls) == 2


def test_determinism_excludes_split_when_a_gradient_is_needed(cache_file, deterministic):
    inputs, _ = make_inputs(num_tokens=2, seqlen_q=16, heads=2, kv_heads=1)
    timer = FakeTimer(fused=9.0, split=1.0)
    chooser = BackendChooser(cache_file, timer)
    assert backend_choice.allowed_backends(needs_grad=True) == ("fused",)
    assert _choose(inputs, chooser) == "fused"
    assert timer.calls == []
    assert backend_choice.allowed_backends(needs_grad=False) == ("fused", "split")  # no backward to fear


def test_determinism_overrides_a_cached_split_choice(cache_file, deterministic):
    inputs, _ = make_inputs(num_tokens=2, seqlen_q=16, heads=2, kv_heads=1)
    q, k, _, pk, *_ = inputs
    key = choice_key(q, k, pk, causal=True, packed=False, max_seqlen_q=16, max_seqlen_k=16, needs_grad=True)
    chooser = BackendChooser(cache_file, FakeTimer(fused=9.0, split=1.0))
    torch.use_deterministic_algorithms(False)
    assert chooser.choose(key, _runs(), backend_choice.allowed_backends(True)) == "split"
    torch.use_deterministic_algorithms(True)
    assert _choose(inputs, chooser) == "fused"


@pytest.fixture
def dispatched(monkeypatch):
    """Which backend aligner_attention ran: the fused op, the split form or the reference."""
    ran = []
    real = {
        "split_attention": aligner.attention.split_attention,
        "_fused": aligner.attention._fused,
        "aligner_attention_reference": aligner.attention.aligner_attention_reference,
    }
    names = {"split_attention": "split", "_fused": "fused", "aligner_attention_reference": "reference"}
    for attribute, fn in real.items():

        def spy(*args, _fn=fn, _name=names[attribute], **kwargs):
            ran.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(aligner.attention, attribute, spy)
    return ran


@pytest.mark.parametrize("backend", ["fused", "split", "reference"])
def test_environment_variable_forces_a_backend(backend, monkeypatch, dispatched):
    monkeypatch.setenv("ALIGNER_BACKEND", backend)
    inputs, _ = make_inputs(num_tokens=2, seqlen_q=16, heads=2, kv_heads=1)
    aligner_attention(*inputs)
    assert dispatched == [backend]


def test_auto_is_the_reference_on_cpu(monkeypatch, dispatched):
    monkeypatch.delenv("ALIGNER_BACKEND", raising=False)
    monkeypatch.setattr(backend_choice, "choose", lambda *a, **k: pytest.fail("auto measured on CPU"))
    inputs, _ = make_inputs(num_tokens=2, seqlen_q=16, heads=2, kv_heads=1)
    aligner_attention(*[x.cpu() for x in inputs])
    assert dispatched == ["reference"]


@pytest.mark.parametrize("choice", ["fused", "split"])
def test_auto_runs_the_chosen_backend(choice, monkeypatch, dispatched):
    """On a GPU auto asks the chooser; its answer is what runs (the GPU check is emulated by
    letting the kernels take CPU tensors)."""
    monkeypatch.setattr(aligner.attention, "_use_kernels", lambda backend, q: True)
    monkeypatch.setattr(backend_choice, "choose", lambda *a, **k: choice)
    inputs, _ = make_inputs(num_tokens=2, seqlen_q=16, heads=2, kv_heads=1)
    aligner_attention(*inputs, backend="auto")
    assert dispatched == [choice]


def test_auto_does_not_ask_when_split_cannot_take_the_inputs(monkeypatch, dispatched):
    monkeypatch.setattr(aligner.attention, "_use_kernels", lambda backend, q: True)
    monkeypatch.setattr(backend_choice, "choose", lambda *a, **k: pytest.fail("measured an unusable split"))
    inputs, varlen = make_inputs(num_tokens=2, seqlens=[(5, 5), (9, 9)], heads=2, kv_heads=1)
    aligner_attention(*inputs, backend="auto", **varlen)
    assert dispatched == ["fused"]
