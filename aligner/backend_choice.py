"""``backend="auto"``: the faster of the fused and split backends, measured, per shape bucket.

As Triton's autotuner does for configs: the first call with a new key runs both backends on the
call's own inputs (warmup, then timed repetitions; forward and backward when a gradient is
needed) and keeps the faster. The key is (device name, dtype, head dim, GQA group, N bucket,
L_q and L_k buckets, causal, layout, gradient or not); lengths and N enter it only as powers of
two, so a training run or a decode loop measures a handful of times. Timings are kept in memory
and in a small JSON file in the user's cache directory (``$XDG_CACHE_HOME/aligner`` or
``~/.cache/aligner``), written atomically (aligner/files.py); a file that is corrupt or from
another format version is ignored with a warning and rebuilt.

Determinism: the fused backward is bitwise deterministic. The split backward's vendor part is
not, by default (SDPA's flash and memory-efficient backwards accumulate dq with atomics; cuDNN's
is not deterministic either). So while ``torch.are_deterministic_algorithms_enabled()``, a call
that needs a gradient never gets the split backend from auto (DESIGN.md section 5, table).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .files import write_atomic

CACHE_VERSION = 1
CACHE_FILE = "backend_choice.json"
CANDIDATES = ("fused", "split")
# Triton's do_bench defaults are warmup=25 ms, rep=100 ms; a choice is made once per key.
WARMUP_MS, REP_MS = 25, 100

Timer = Callable[[Callable[[], object]], float]


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/aligner``, else ``~/.cache/aligner`` (the platformdirs convention)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "aligner"


def do_bench_timer(fn: Callable[[], object]) -> float:
    """Milliseconds per call of ``fn`` on the GPU: Triton's ``do_bench`` (warmup, then repetitions
    between CUDA events, L2 cache flushed between them; the median)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def choice_key(
    q: Tensor, k: Tensor, prefix_k: Tensor | None, *, causal: bool, packed: bool,
    max_seqlen_q: int, max_seqlen_k: int, needs_grad: bool,
) -> str:  # fmt: skip
    """The cache key of a call, as one string (it is also the JSON key)."""
    device = torch.cuda.get_device_name(q.device) if q.is_cuda else q.device.type
    num_tokens = 0 if prefix_k is None else prefix_k.shape[-3]
    prefix = "none" if prefix_k is None else "per-sequence" if prefix_k.dim() == 4 else "shared"
    parts = (
        device, str(q.dtype).removeprefix("torch."), f"d{q.shape[-1]}", f"group{q.shape[-2] // k.shape[-2]}",
        f"n{_bucket(num_tokens) if num_tokens > 1 else num_tokens}",
        f"lq{_bucket(max_seqlen_q)}", f"lk{_bucket(max_seqlen_k)}", "causal" if causal else "full",
        "packed" if packed else "padded", f"prefix-{prefix}", "fwd-bwd" if needs_grad else "fwd",
    )  # fmt: skip
    return "|".join(parts)


class BackendChooser:
    """Timings per key, in memory and in ``path`` (None: memory only); ``timer(fn)`` -> ms."""

    def __init__(self, path: str | os.PathLike | None, timer: Timer = do_bench_timer) -> None:
        self.path = None if path is None else Path(path)
        self.timer = timer
        self._timings: dict[str, dict[str, float]] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, dict[str, float]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            reason = f"unreadable ({error})"
        else:
            entries = data.get("entries") if isinstance(data, dict) else None
            if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
                found = data.get("version") if isinstance(data, dict) else None
                reason = f"format version {found!r}, expected {CACHE_VERSION}"
            elif not isinstance(entries, dict) or not all(_valid_entry(e) for e in entries.values()):
                reason = "malformed entries"
            else:
                return {
                    key: {name: float(ms) for name, ms in entry.items()} for key, entry in entries.items()
                }
        warnings.warn(
            f"ignoring the backend-choice cache {self.path}: {reason}; it will be rebuilt", stacklevel=4
        )
        return {}

    def timings(self) -> dict[str, dict[str, float]]:
        """Every measured key: {backend: ms}."""
        with self._lock:
            if self._timings is None:
                self._timings = self._load()
            return dict(self._timings)

    def _save(self) -> None:
        if self.path is None:
            return
        payload = json.dumps({"version": CACHE_VERSION, "entries": self._timings}, indent=1, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, payload + "\n")
        except OSError as error:  # a read-only home: keep the choice in memory only
            warnings.warn(f"could not write the backend-choice cache {self.path}: {error}", stacklevel=4)

    def choose(self, key: str, runs: dict[str, Callable[[], object]], allowed: tuple[str, ...]) -> str:
        """The fastest of ``allowed`` for ``key``, timing each of ``runs`` (every candidate) the
        first time the key is seen."""
        timings = self.timings().get(key)
        if timings is None or not set(runs) <= set(timings):
            timings = {name: float(self.timer(run)) for name, run in runs.items()}
            with self._lock:
                self._timings[key] = timings
                self._save()
        return min(allowed, key=lambda name: (timings[name], CANDIDATES.index(name)))


def _valid_entry(entry) -> bool:
    return isinstance(entry, dict) and all(
        name in CANDIDATES and isinstance(ms, (int, float)) and not isinstance(ms, bool)
        for name, ms in entry.items()
    )


@functools.cache
def default_chooser() -> BackendChooser:
    """The process's chooser: the cache file in :func:`cache_dir`, timed with :func:`do_bench_timer`."""
    return BackendChooser(cache_dir() / CACHE_FILE)


def allowed_backends(needs_grad: bool) -> tuple[str, ...]:
    """The candidates auto may pick: fused only when determinism is asked and a backward will run."""
    if needs_grad and torch.are_deterministic_algorithms_enabled():
        return ("fused",)
    return CANDIDATES


def choose(
    q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None, gate: Tensor | None, *,
    causal: bool, scale: float, cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None,
    max_seqlen_q: int, max_seqlen_k: int, needs_grad: bool, run: Callable[..., Tensor],
    chooser: BackendChooser | None = None,
) -> str:  # fmt: skip
    """ "fused" or "split" for a call of :func:`aligner.aligner_attention` whose inputs both take.

    ``run(backend, q, k, v, prefix_k, prefix_v, gate, **options)`` runs one candidate on validated
    inputs (the op passes its own runner, so this module never calls back into the public API).
    The measurement runs on detached copies of the inputs (forward, and backward with a random
    dO when ``needs_grad``), so it leaves no trace in the caller's graph. While ``torch.compile``
    traces, auto is fused (one opaque op); while a CUDA graph is captured nothing is measured: a
    cached choice is used, else fused.
    """
    if torch.compiler.is_compiling():  # keep the traced code free of file and timing work
        return "fused"
    allowed = allowed_backends(needs_grad)
    if allowed == ("fused",):
        return "fused"
    chooser = chooser or default_chooser()
    key = choice_key(
        q, k, prefix_k, causal=causal, packed=cu_seqlens_q is not None,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, needs_grad=needs_grad,
    )  # fmt: skip
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        known = chooser.timings().get(key)
        return "fused" if known is None else min(allowed, key=lambda name: known[name])

    tensors = [x if x is None else x.detach().requires_grad_(needs_grad and x.is_floating_point())
               for x in (q, k, v, prefix_k, prefix_v, gate)]  # fmt: skip
    options = dict(
        causal=causal, scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip
    # A generator of its own: the measurement must not advance the caller's random stream.
    generator = torch.Generator(device=q.device).manual_seed(0)
    dout = torch.randn(q.shape, generator=generator, device=q.device, dtype=q.dtype) if needs_grad else None
    leaves = [x for x in tensors if x is not None]

    def candidate(backend: str) -> None:
        with torch.enable_grad() if needs_grad else torch.no_grad():
            out = run(backend, *tensors, **options)
            if needs_grad:
                torch.autograd.grad(out, leaves, dout)

    runs = {name: functools.partial(candidate, backend=name) for name in CANDIDATES}
    return chooser.choose(key, runs, allowed)
