"""What a command shows: its results on stdout (text lines, or JSON lines with --json), the training
logs as they come (a Trainer callback), progress bars on stderr (or none with --no-progress), and
without a third-party warning that says nothing about the command."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any


class Console:
    """Where a command's results go: human-readable lines, or one JSON object a line (--json)."""

    def __init__(self, json_lines: bool) -> None:
        self.json_lines = json_lines

    def emit(self, record: dict[str, Any], text: str) -> None:
        print(json.dumps(record, ensure_ascii=False) if self.json_lines else text, flush=True)


def number(value: Any) -> str:
    """A number as the text output shows it: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def console_callback(console: Console) -> Any:
    """A transformers ``TrainerCallback`` that writes each training log to ``console`` (built here, so
    that transformers' Trainer module is imported by the commands that train only)."""
    from transformers import TrainerCallback

    class ConsoleCallback(TrainerCallback):
        """Each training log as a line on stdout (the main process only)."""

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
        ) -> None:
            if not state.is_world_process_zero or not logs:
                return
            logs = {key: value for key, value in logs.items() if key != "total_flos"}
            steps = (
                f"{state.global_step}/{state.max_steps}" if state.max_steps > 0 else str(state.global_step)
            )
            text = f"step {steps}  " + "  ".join(f"{key} {number(value)}" for key, value in logs.items())
            console.emit({"event": "log", "step": state.global_step, **logs}, text)

    return ConsoleCallback()


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled`` False, silence every progress bar (transformers, huggingface_hub, transformers'
    GGUF reader and, once imported, datasets) for the duration of the command, then restore what was set
    before. datasets is not imported for this (a second, and generate and chat do not need it): where
    a command imports it later, the code that runs it silences its bars (the training data reader,
    ``aligner.evaluate``)."""
    if enabled:
        yield
        return
    datasets = sys.modules.get("datasets")
    import huggingface_hub.utils as hub
    from transformers.utils import logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_loading
    except ImportError:  # no GGUF support installed: no GGUF bars either
        gguf_loading = None

    before = (
        logging.is_progress_bar_enabled(),
        datasets is not None and datasets.is_progress_bar_enabled(),
        hub.are_progress_bars_disabled(),
    )
    logging.disable_progress_bar()
    if datasets is not None:
        datasets.disable_progress_bars()
    hub.disable_progress_bars()
    # The GGUF reader calls tqdm directly, with no switch of its own: its tqdm is swapped for the
    # command's duration.
    gguf_tqdm = getattr(gguf_loading, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_loading.tqdm = lambda *args, **kwargs: gguf_tqdm(*args, **{**kwargs, "disable": True})
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_loading.tqdm = gguf_tqdm
        if before[0]:
            logging.enable_progress_bar()
        if before[1]:
            datasets.enable_progress_bars()
        if not before[2]:
            hub.enable_progress_bars()


# --------------------------------------------------------------------------------------------
# Warnings that say nothing about what a command does

# bitsandbytes, which transformers' Trainer imports through peft, warns on every import on CPUs with
# AVX512-BF16 that its optional 4-bit kernel package is missing. The command line loads bases in full
# precision only (no 4-bit layers), so the warning says nothing about what a command does.
_BITSANDBYTES_LOGGER = "bitsandbytes.backends.cpu.ops"
_BITSANDBYTES_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_bitsandbytes_kernel_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BITSANDBYTES_WARNING)


@contextlib.contextmanager
def without_bitsandbytes_kernel_warning() -> Iterator[None]:
    """Filter bitsandbytes' warning about its optional CPU kernel package out for the duration."""
    logger = logging.getLogger(_BITSANDBYTES_LOGGER)
    logger.addFilter(_not_bitsandbytes_kernel_warning)
    try:
        yield
    finally:
        logger.removeFilter(_not_bitsandbytes_kernel_warning)
