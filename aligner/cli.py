"""The ``aligner`` command line: train, dpo, distill, generate, chat, merge, convert, info.

Every subcommand has ``--help``. Models come from a local directory, a GGUF file
(``--gguf-file NAME`` inside the model directory, or the ``.gguf`` path itself) or a hub name
when the machine has network. Multi-process training: ``torchrun --nproc_per_node K -m aligner.cli
train ...`` or ``accelerate launch -m aligner.cli train ...`` (``Trainer`` wraps the model in DDP).
Errors are one line on stderr and a non-zero exit: 2 for bad arguments or input, 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

DPO_HELP = """Direct Preference Optimization of an Aligner on preference pairs.

Rows: {"prompt": ..., "chosen": ..., "rejected": ...}. PKU-SafeRLHF-style rows
{"prompt", "response_0", "response_1", "safer_response_id"} are read directly: chosen is
response_<safer_response_id> and rejected the other response (use better_response_id instead by
renaming it to safer_response_id). The reference policy is the same model with its Aligner
disabled (aligner.disabled), so no second copy of the base model is held in memory. Start from an
SFT Aligner with --init-aligner (otherwise the fresh Aligner equals the reference at step 0).
"""

DISTILL_HELP = """Bake a system prompt into an Aligner (context distillation).

The base model first answers every instruction WITH the system prompt (greedy, or sampled with
--temperature); the pairs are kept in OUTPUT_DIR/distilled.jsonl. The Aligner is then trained
so that the model WITHOUT the system prompt matches the prompted model on those answers:

  --loss kl   (default) KL(teacher || student) over the whole vocabulary at every answer token;
              the teacher is the same model with the Aligner disabled plus the system prompt
  --loss sft  cross-entropy on the answers' tokens only (SFT on the prompted model's answers)

Instructions: JSON/JSONL rows with "instruction" (+ optional "input") or "prompt".
"""


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="base model: local directory, .gguf file, or hub name (needs network)")
    parser.add_argument(
        "--gguf-file", help="GGUF file name inside the model directory (transformers' gguf_file=)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype to load the base model in (default float32)",
    )


def _training_arguments(parser: argparse.ArgumentParser, lr: float = 9e-3) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--output-dir",
        required=True,
        help="where the Aligner, metrics.jsonl, loss_curve.png and checkpoints go",
    )
    group.add_argument("--num-tokens", type=int, default=1, help="Aligner prefix tokens N (default 1)")
    group.add_argument("--start-layer", type=int, default=2, help="first layer with an Aligner (default 2)")
    group.add_argument("--init-aligner", help="start from this saved Aligner instead of a fresh one")
    group.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    group.add_argument(
        "--lr-scheduler", default="constant", help="transformers scheduler name (default constant)"
    )
    group.add_argument("--warmup-steps", type=int, default=0)
    group.add_argument("--epochs", type=float, default=1.0, help="training epochs (default 1)")
    group.add_argument(
        "--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)"
    )
    group.add_argument("--batch-size", type=int, default=8, help="per-device batch size (default 8)")
    group.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    group.add_argument(
        "--max-length", type=int, default=512, help="tokens per example, prompt included (default 512)"
    )
    precision = group.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    precision.add_argument("--fp16", action="store_true", help="float16 mixed precision (CUDA)")
    group.add_argument("--logging-steps", type=int, default=5)
    group.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps (default 50)")
    group.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (default 2)")
    group.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="resume from OUTPUT_DIR's last checkpoint, or from the given checkpoint directory",
    )
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def _generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aligner", help="saved Aligner directory to apply (none: the base model)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--system", help="system prompt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aligner", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="supervised fine-tuning of an Aligner",
        description=(
            "Supervised fine-tuning of an Aligner on JSON/JSONL rows in Alpaca format (instruction, optional "
            "input, output) or chat format (messages; the last one, the assistant's, is the target). Prompt "
            "tokens are masked out of the loss."
        ),
    )
    _model_arguments(train)
    train.add_argument("--data", required=True, help="training data (.json or .jsonl)")
    _training_arguments(train)

    dpo = commands.add_parser(
        "dpo",
        help="DPO of an Aligner on preference pairs",
        description=DPO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_arguments(dpo)
    dpo.add_argument("--data", required=True, help="preference pairs (.json or .jsonl)")
    dpo.add_argument("--beta", type=float, default=0.1, help="DPO temperature beta (default 0.1)")
    _training_arguments(dpo, lr=1e-3)

    distill = commands.add_parser(
        "distill",
        help="bake a system prompt into an Aligner",
        description=DISTILL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_arguments(distill)
    distill.add_argument("--data", required=True, help="instructions (.json or .jsonl)")
    source = distill.add_mutually_exclusive_group(required=True)
    source.add_argument("--system-prompt", help="the system prompt to bake in")
    source.add_argument("--system-prompt-file", help="file holding the system prompt")
    distill.add_argument(
        "--max-new-tokens", type=int, default=128, help="answer length when generating targets"
    )
    distill.add_argument(
        "--loss", default="kl", choices=["kl", "sft"], help="distillation loss (default kl; see above)"
    )
    distill.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature of the teacher's answers (default 0: greedy)",
    )
    _training_arguments(distill)

    gen = commands.add_parser(
        "generate",
        help="answer prompts",
        description="Answer prompts with the base model "
        "or the base model plus an Aligner; prints JSON lines {prompt, answer}.",
    )
    _model_arguments(gen)
    _generation_arguments(gen)
    gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    gen.add_argument("--data", help="prompts file (rows with instruction or prompt)")
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--output", help="also write the JSON lines to this file")

    chat = commands.add_parser(
        "chat",
        help="interactive chat",
        description="Interactive chat on stdin; /reset clears the history, /exit or end of input quits.",
    )
    _model_arguments(chat)
    _generation_arguments(chat)

    merge = commands.add_parser(
        "merge",
        help="fold a 1-token Aligner into the model's o_proj biases",
        description="Fold a 1-token Aligner into o_proj biases and save a plain "
        "transformers model (config attention_bias=True, zero q/k/v biases) that "
        "from_pretrained loads without this package.",
    )
    _model_arguments(merge)
    merge.add_argument("--aligner", required=True, help="saved 1-token Aligner directory")
    merge.add_argument("--output-dir", required=True, help="where the merged model (and tokenizer) go")

    convert = commands.add_parser(
        "convert",
        help="convert one of the paper's .pth checkpoints",
        description="Convert one of the paper's Lit-LLaMA Aligner checkpoints (.pth) "
        "into this project's format (read with torch.load(weights_only=True)).",
    )
    convert.add_argument("checkpoint", help="the .pth file")
    convert.add_argument("--output-dir", required=True)

    info = commands.add_parser(
        "info",
        help="describe a saved Aligner or a model",
        description="For a saved Aligner: its base, tokens, layers and parameter count. "
        "For a model: its layers, heads and what an Aligner on it costs.",
    )
    info.add_argument("path", help="saved Aligner directory, or a model (directory, .gguf, hub name)")
    info.add_argument("--gguf-file")
    info.add_argument("--num-tokens", type=int, default=1)
    info.add_argument("--start-layer", type=int, default=2)
    return parser


# --------------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Any:
    from .training import TrainConfig

    for name in ("num_tokens", "batch_size", "grad_accum", "max_length", "logging_steps", "save_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    return TrainConfig(
        output_dir=args.output_dir,
        num_tokens=args.num_tokens,
        start_layer=args.start_layer,
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        lr_scheduler=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        bf16=args.bf16,
        fp16=args.fp16,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        beta=getattr(args, "beta", 0.1),
        resume=args.resume,
        init_aligner=args.init_aligner,
        progress=not args.no_progress,
    )


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from .training import load_model

    return load_model(args.model, gguf_file=args.gguf_file, dtype=args.dtype)


def _report(summary: dict[str, Any], output_dir: str) -> None:
    print(json.dumps({"output_dir": output_dir, **summary}))


def cmd_train(args: argparse.Namespace) -> None:
    from .training import sft_examples, train_sft

    config = _config(args)
    examples = sft_examples(args.data)  # check the data before loading the model
    model, tokenizer = _load(args)
    _report(train_sft(model, tokenizer, examples, config, args.data), args.output_dir)


def cmd_dpo(args: argparse.Namespace) -> None:
    from .training import preference_examples, train_dpo_file

    config = _config(args)
    preference_examples(args.data)
    model, tokenizer = _load(args)
    _report(train_dpo_file(model, tokenizer, args.data, config), args.output_dir)


def cmd_distill(args: argparse.Namespace) -> None:
    from .training import distill_examples, prompt_examples, train_distill, write_jsonl

    config = _config(args)
    if args.system_prompt_file:
        path = Path(args.system_prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--system-prompt-file {path} does not exist")
        system = path.read_text(encoding="utf-8").strip()
    else:
        system = args.system_prompt.strip()
    if not system:
        raise ValueError("the system prompt is empty: give the text to bake in with --system-prompt")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    prompts = prompt_examples(args.data)
    model, tokenizer = _load(args)
    examples = distill_examples(
        model,
        tokenizer,
        prompts,
        system,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        progress=not args.no_progress,
    )
    if not examples:
        raise ValueError(f"the model gave no answer to any instruction in {args.data}")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    rows = [{"system": system, "messages": [*p, {"role": "assistant", "content": a}]} for p, a in examples]
    write_jsonl(Path(args.output_dir) / "distilled.jsonl", rows)
    summary = train_distill(model, tokenizer, examples, system, config, loss=args.loss, source=args.data)
    _report(summary, args.output_dir)


def _with_aligner(args: argparse.Namespace) -> tuple[Any, Any]:
    from . import load

    model, tokenizer = _load(args)
    if args.aligner:
        load(model, args.aligner)
    return model, tokenizer


def cmd_generate(args: argparse.Namespace) -> None:
    from .training import generate, prompt_examples, write_jsonl

    prompts = list(args.prompt)
    if args.data:
        prompts += prompt_examples(args.data)
    if not prompts:
        raise ValueError("nothing to answer: give --prompt TEXT (repeatable) or --data FILE")
    model, tokenizer = _with_aligner(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    answers = generate(
        model,
        tokenizer,
        [[*system, {"role": "user", "content": p}] for p in prompts],
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
    )
    rows = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    if args.output:
        write_jsonl(args.output, rows)


def cmd_chat(args: argparse.Namespace) -> None:
    from .training import generate

    model, tokenizer = _with_aligner(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        answer = generate(
            model,
            tokenizer,
            [[*system, *history]],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            progress=False,
        )[0]
        history.append({"role": "assistant", "content": answer})
        print(f"aligner> {answer}" if interactive else answer, flush=True)


def cmd_merge(args: argparse.Namespace) -> None:
    import torch
    from torch import nn

    from . import merge, read_config, unpatch
    from .patch import attention_layers

    config = read_config(args.aligner)
    if config["num_tokens"] != 1:
        raise ValueError(
            f"--aligner {args.aligner} has {config['num_tokens']} tokens; only a 1-token Aligner merges"
        )
    model, tokenizer = _with_aligner(args)
    if not hasattr(model.config, "attention_bias"):
        raise ValueError(
            f"model type {model.config.model_type!r} has no attention_bias setting, so a merged o_proj bias "
            "could not be saved as a plain transformers model"
        )
    layers = dict(model.aligner_state.layers)
    merge(model)
    biases = {index: attn.o_proj.bias.detach().clone() for index, attn in layers.items()}
    unpatch(model)  # restores the original biases; the merged ones are re-added below as plain parameters
    with torch.no_grad():
        for index, attn in attention_layers(model).items():
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                linear = getattr(attn, name)
                if linear.bias is None:
                    linear.bias = nn.Parameter(
                        torch.zeros(
                            linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device
                        )
                    )
            if index in biases:
                attn.o_proj.bias.copy_(biases[index])
    model.config.attention_bias = True
    out = Path(args.output_dir)
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(json.dumps({"output_dir": str(out), "merged_layers": sorted(biases)}))


def cmd_convert(args: argparse.Namespace) -> None:
    from . import aligner_parameter_count, convert_official

    out = convert_official(args.checkpoint, args.output_dir)
    print(json.dumps({"output_dir": str(out), "parameters": aligner_parameter_count(out)}))


def cmd_info(args: argparse.Namespace) -> None:
    from . import aligner_parameter_count, read_config

    path = Path(args.path)
    if (path / "aligner_config.json").is_file():
        config = read_config(path)
        base = config["base"]
        layers = list(range(config["start_layer"], base["num_hidden_layers"]))
        info = {
            "aligner": str(path),
            "base": base,
            "num_tokens": config["num_tokens"],
            "start_layer": config["start_layer"],
            "layers": layers,
            "parameters": aligner_parameter_count(path),
        }
    else:
        from transformers import AutoConfig

        from .training.models import resolve_model

        source, gguf = resolve_model(args.path, args.gguf_file)
        try:
            config = AutoConfig.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}))
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{args.path} is neither a saved Aligner nor a loadable model: {error}"
            ) from error
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        if not 0 <= args.start_layer < layers:
            raise ValueError(f"--start-layer must be in [0, {layers}), got {args.start_layer}")
        count = args.num_tokens * config.hidden_size + (layers - args.start_layer) * heads
        info = {
            "model": args.path,
            "model_type": config.model_type,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", heads),
            "aligner_parameters": {
                "num_tokens": args.num_tokens,
                "start_layer": args.start_layer,
                "count": count,
            },
        }
    print(json.dumps(info, indent=2))


COMMANDS = {
    "train": cmd_train,
    "dpo": cmd_dpo,
    "distill": cmd_distill,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "merge": cmd_merge,
    "convert": cmd_convert,
    "info": cmd_info,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``aligner`` command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt as interrupt:
        print(f"aligner {args.command}: {interrupt or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ImportError as error:
        print(
            f"aligner {args.command}: {error} (install the extra: pip install 'aligner-kernels[train]')",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except (OSError, ValueError) as error:
        print(f"aligner {args.command}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
