"""The request side of aligner.serving.vllm without an engine: the batch bookkeeping, request
checks, cache salts and the server middleware."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from aligner.serving import vllm as serving


def params(name=None):
    return SamplingParams(extra_args=None if name is None else {"aligner": name})


def test_batch_rows_follow_adds_removes_and_moves():
    processor = serving.AlignerRequests(SimpleNamespace(instance_id="test-rows"), "cpu", False)
    batch = processor.batch
    added = [(0, params("a"), [1], []), (1, params(), [1], []), (2, params("b"), [1], [])]
    processor.update_state(BatchUpdate(batch_size=3, removed=[], added=added, moved=[]))
    assert batch.rows == {0: "a", 1: None, 2: "b"}
    assert batch.take_changes() == {0: "a", 1: None, 2: "b"}
    processor.update_state(None)  # no change in the batch
    assert batch.take_changes() == {}
    # Row 0 finishes; the last row moves into its place (vLLM condensing its batch).
    move = (2, 0, MoveDirectionality.UNIDIRECTIONAL)
    processor.update_state(BatchUpdate(batch_size=2, removed=[0], added=[], moved=[move]))
    assert batch.rows == {0: "b", 1: None, 2: None}
    assert batch.take_changes() == {0: "b", 2: None}
    processor.update_state(
        BatchUpdate(batch_size=2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)])
    )
    assert batch.rows[0] is None and batch.rows[1] == "b"
    assert batch.take_changes() == {0: None, 1: "b"}
    assert processor.is_argmax_invariant()
    assert serving.batch_aligners(SimpleNamespace(instance_id="test-rows")) is batch


def test_requests_are_checked_against_the_served_bank(bank_file, monkeypatch):
    """As in the API server processes of `aligner serve`: the bank comes from their environment."""
    monkeypatch.setattr(serving, "_SERVED_BANKS", set())  # no engine_args in this process
    monkeypatch.setenv(serving.BANK_ENV, str(bank_file))
    assert serving.request_aligner(params("json")) == "json"
    assert serving.request_aligner(params()) is None
    with pytest.raises(ValueError, match="no Aligner named 'jsn'.*'json'"):
        serving.AlignerRequests.validate_params(params("jsn"))
    with pytest.raises(ValueError, match="must be the name of an Aligner in the bank, got 7"):
        serving.AlignerRequests.validate_params(SamplingParams(extra_args={"aligner": 7}))
    monkeypatch.delenv(serving.BANK_ENV)
    with pytest.raises(ValueError, match="serves no bank"):
        serving.request_aligner(params("json"))


def test_cache_salt_is_valid_for_vllm_and_differs_per_aligner():
    from vllm.entrypoints.generate.base.protocol import validate_cache_salt

    salts = {serving.cache_salt(name, salt) for name in ("a", "b", "a/b@c") for salt in (None, "user")}
    assert len(salts) == 6
    for salt in salts:
        validate_cache_salt(salt)


def test_middleware_moves_the_aligner_and_salts_the_request():
    seen = []

    async def app(scope, receive, send):
        message = await receive()
        seen.append((dict(scope["headers"]), message["body"]))

    async def run(body: bytes):
        chunks = [body[:5], body[5:]]

        async def receive():
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

        scope = {"type": "http", "method": "POST", "headers": [(b"content-length", str(len(body)).encode())]}
        await serving.AlignerRequestsMiddleware(app)(scope, receive, None)

    asyncio.run(run(json.dumps({"prompt": "hi", "aligner": "json"}).encode()))
    asyncio.run(
        run(json.dumps({"prompt": "hi", "vllm_xargs": {"aligner": "caps"}, "cache_salt": "u"}).encode())
    )
    asyncio.run(run(json.dumps({"prompt": "hi"}).encode()))
    asyncio.run(run(b"not json"))
    bodies = [body for _, body in seen]
    first, second, third = (json.loads(body) for body in bodies[:3])
    assert first == {
        "prompt": "hi",
        "vllm_xargs": {"aligner": "json"},
        "cache_salt": serving.cache_salt("json"),
    }
    assert second["cache_salt"] == serving.cache_salt("caps", "u")
    assert third == {"prompt": "hi"} and bodies[3] == b"not json"
    for headers, body in seen:
        assert int(headers[b"content-length"]) == len(body)
