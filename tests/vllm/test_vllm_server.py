"""`aligner serve`: vLLM's OpenAI-compatible server on localhost, queried with different Aligners
at once through the openai client; one bad request fails alone."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ENGINE, hf_greedy
from transformers import AutoTokenizer

TOKENS = 12
STARTUP_SECONDS = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, bank_file, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    options = [f"--{key.replace('_', '-')}={value}" for key, value in ENGINE.items()]
    command = [
        str(Path(sys.executable).parent / "aligner"), "serve", str(model_dir), "--bank", str(bank_file),
        "--host", "127.0.0.1", "--port", str(port), *options,
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.monotonic() + STARTUP_SECONDS
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"aligner serve did not start (exit {process.poll()}):\n{log.read_text()[-4000:]}")
        time.sleep(2)
    yield url
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def test_concurrent_requests_choose_their_aligners(server, model_dir, bank_file):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="unused")
    cases = [
        ("The capital of France is", "json", "xargs"),
        ("The capital of France is", "caps", "top-level"),
        ("The capital of France is", None, None),
        ("List three fruits:", "pirate", "xargs"),
        ("List three fruits:", "no-such-aligner", "xargs"),
        ("Hello, my name is", "json", "top-level"),
    ]

    def complete(case):
        prompt, name, how = case
        extra = {}
        if how == "xargs":
            extra = {"vllm_xargs": {"aligner": name}}
        elif how == "top-level":
            extra = {"aligner": name}
        try:
            reply = client.completions.create(
                model=str(model_dir), prompt=prompt, max_tokens=TOKENS, temperature=0, extra_body=extra
            )
        except openai.BadRequestError as error:
            return error
        return reply.choices[0].text

    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(complete, cases))

    bad = replies.pop(4)
    assert isinstance(bad, Exception) and "no Aligner named 'no-such-aligner'" in str(bad)
    good = [case for i, case in enumerate(cases) if i != 4]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected = hf_greedy(model_dir, [c[0] for c in good], [c[1] for c in good], bank_file.parent, TOKENS)
    assert replies == [tokenizer.decode(ids, skip_special_tokens=True) for ids in expected]
    assert len(set(replies[:3])) == 3  # one prompt, three answers: json, caps, base
