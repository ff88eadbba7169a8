"""Evaluating an Aligner with EleutherAI's lm-evaluation-harness (``lm_eval`` 0.4.x, the ``eval`` extra).

lm_eval's ``HFLM`` takes a model already built (``HFLM(pretrained=model, tokenizer=tokenizer)``) and
calls ``model(input_ids)`` and ``model.generate(...)`` on it, so a patched model is evaluated as it
is: with its Aligner; under :func:`aligner.disabled`, as the base model; and a bank Aligner by name
through :func:`aligner.selected`, which makes every one of those calls use that Aligner. Nothing of
lm_eval is reimplemented here: this module resolves the Aligner, checks the task names before any
work and calls ``lm_eval.simple_evaluate``.

Tasks are lm_eval's registered names, or task YAML files of your own: give their folder as
``include_path`` (or a file's path as the task). A task file can read a local JSON Lines file::

    task: my_task
    dataset_path: json
    dataset_kwargs:
      data_files: {test: /data/my_task.jsonl}
    test_split: test
    output_type: multiple_choice        # or generate_until, loglikelihood, ...
    ...
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

EXTRA = "pip install 'aligner-kernels[eval]'"
SUPPORTED = (0, 4)  # lm_eval's major, minor version


def require_lm_eval() -> ModuleType:
    """``lm_eval``, or an ImportError that names the extra to install (and the version supported)."""
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(
            f"evaluation needs lm-evaluation-harness (lm_eval 0.4.x), which is not installed: {EXTRA}"
        ) from error
    version = getattr(lm_eval, "__version__", "0")
    if tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) != SUPPORTED:
        raise ImportError(f"lm_eval {version} is installed, but aligner supports lm_eval 0.4.x: {EXTRA}")
    return lm_eval


def task_names(tasks: str | Sequence[str]) -> list[str]:
    """``tasks`` as a list: a string is split at commas (``"t1,t2"``, as lm_eval's command line)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    bad = [item for item in items if not isinstance(item, str)]
    if bad:
        raise TypeError(f"tasks must be task names (str), got {type(bad[0]).__name__} {bad[0]!r}")
    names = [item.strip() for item in items if item.strip()]
    if not names:
        raise ValueError(f"tasks={tasks!r} names no task: give lm_eval task names or task YAML files")
    return names


def task_manager(
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    include_defaults: bool = True,
    argument: str = "include_path",
) -> Any:
    """lm_eval's ``TaskManager`` over the folders of task YAML files ``include_path`` and, with
    ``include_defaults``, lm_eval's built-in tasks (indexing those takes about 10 s)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is None:
        folders = []
    elif isinstance(include_path, (str, os.PathLike)):
        folders = [Path(include_path)]
    else:
        folders = [Path(folder) for folder in include_path]
    for folder in folders:
        if not folder.is_dir():
            what = "a file" if folder.exists() else "no such folder"
            raise FileNotFoundError(f"{argument} {folder}: {what}; expected a folder of task YAML files")
    if not folders and not include_defaults:
        raise ValueError(f"no tasks to look up: give {argument} when lm_eval's built-in tasks are left out")
    paths = [str(folder) for folder in folders] or None
    return TaskManager(include_path=paths, include_defaults=include_defaults)


def check_tasks(
    manager: Any, tasks: str | Sequence[str], argument: str = "tasks", include: str = "include_path"
) -> list[str]:
    """The task names, each a task, group or tag that ``manager`` knows or a task YAML file; else an
    error naming it and the closest known names (``argument`` and ``include`` name the arguments)."""
    names = task_names(tasks)
    known = set(manager.all_tasks)
    for name in names:
        if name in known or (Path(name).suffix in (".yaml", ".yml") and Path(name).is_file()):
            continue
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(
            f"{argument}: {name!r} is neither a task, group or tag lm_eval knows here ({len(known)} known) "
            f"nor a task YAML file; {hint}a task of your own: give the folder of its YAML file as {include}"
        )
    return names


# HFLM warns that arguments "may be ignored" whenever it is handed a built model, which is exactly how
# it is used here (and the only argument passed, batch_size, is not ignored).
_HFLM_LOGGER = "lm_eval.models.huggingface"
_HFLM_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")


def _not_built_model_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_HFLM_WARNINGS)


@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """Without HFLM's warnings about a built model and, unless ``progress``, without lm_eval's progress
    bars: lm_eval passes ``disable=`` itself, so its modules' ``tqdm`` is swapped for the duration;
    the bars of datasets, which loads the tasks' data, are switched off and back on."""
    import datasets
    import tqdm

    logger = logging.getLogger(_HFLM_LOGGER)
    logger.addFilter(_not_built_model_warning)
    swapped = []
    datasets_bars = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
        for name, module in list(sys.modules.items()):
            bar = getattr(module, "tqdm", None) if name.startswith("lm_eval") else None
            if isinstance(bar, type) and issubclass(bar, tqdm.std.tqdm):
                swapped.append((module, bar))
                module.tqdm = lambda *args, _bar=bar, **kwargs: _bar(*args, **{**kwargs, "disable": True})
    try:
        yield
    finally:
        for module, bar in swapped:
            module.tqdm = bar
        if not progress and datasets_bars:
            datasets.enable_progress_bars()
        logger.removeFilter(_not_built_model_warning)


def _aligner_state(model: Any) -> str:
    state = getattr(model, "aligner_state", None)
    if state is None:
        return "none"
    if state.merged_biases is not None:
        return "merged"
    return "enabled" if state.enabled else "disabled"


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str],
    *,
    aligner: str | os.PathLike | None = None,
    bank: Any = None,
    aligner_name: str | None = None,
    revision: str | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    include_defaults: bool = True,
    manager: Any = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 1,
    log_samples: bool = False,
    progress: bool = True,
    model_options: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any] | None:
    """Evaluate ``model`` (a causal LM, patched or not) on lm_eval ``tasks`` and return the results
    dict of ``lm_eval.simple_evaluate`` (``results``, ``configs``, ``samples`` with ``log_samples``,
    ...; None on processes other than rank 0, as lm_eval), with an ``"aligner"`` entry added that
    records what was evaluated.

    The model is evaluated as it is (inside ``aligner.disabled(model)``: the base model), or first:

    - ``aligner``: a saved Aligner directory or Hub repo id, loaded into ``model`` (:func:`aligner.load`:
      the model is patched if needed, an Aligner it carries is overwritten);
    - ``bank`` (an :class:`aligner.AlignerBank`, a bank file or a Hub reference) and ``aligner_name``:
      the bank is attached (:func:`aligner.attach_bank`) and every call lm_eval makes runs the
      Aligner ``aligner_name`` (:func:`aligner.selected`); ``aligner_name`` alone uses the bank already
      attached to the model.

    ``revision``: the branch, tag or commit of a Hub ``aligner`` or ``bank``. ``tasks``: lm_eval task,
    group or tag names (a string is split at commas) or task YAML files, looked up in ``manager`` (an
    lm_eval ``TaskManager``), else in one made over ``include_path`` (folders of task YAML files) and,
    with ``include_defaults``, lm_eval's built-in tasks. Every task name is checked before the model is
    touched. ``batch_size`` and ``model_options`` (e.g. ``max_length``) go to lm_eval's ``HFLM``;
    ``limit``, ``num_fewshot``, ``log_samples`` and ``options`` to ``lm_eval.simple_evaluate``.
    ``progress=False``: no progress bars from lm_eval.
    """
    require_lm_eval()
    from .bank import AlignerBank, attach_bank, selected
    from .serialization import load

    if aligner is not None and (bank is not None or aligner_name is not None):
        raise ValueError(
            "give aligner= (a saved Aligner) or bank= with aligner_name= (an Aligner of a bank), not both"
        )
    if bank is not None and aligner_name is None:
        raise ValueError(
            "bank= needs aligner_name=, the name of the bank's Aligner to evaluate (the rows of lm_eval's "
            "batches carry no aligner_index)"
        )
    if aligner_name is not None and not isinstance(aligner_name, str):
        raise TypeError(f"aligner_name must be a str, got {type(aligner_name).__name__}")
    hub_source = isinstance(aligner, str) or isinstance(bank, str)
    if revision is not None and not hub_source:
        raise ValueError(
            f"revision={revision!r} applies to aligner= or bank= given as a Hugging Face Hub repo id"
        )
    if manager is None:
        manager = task_manager(include_path, include_defaults=include_defaults)
    elif include_path is not None:
        raise ValueError("give include_path= or manager=, not both (manager already has its include path)")
    names = check_tasks(manager, tasks)

    given_bank = bank
    if aligner is not None:
        load(model, aligner, revision=revision)
    elif aligner_name is not None:
        if bank is None:
            bank = getattr(getattr(model, "aligner_state", None), "bank", None)
            if bank is None:
                raise ValueError(
                    f"aligner_name={aligner_name!r} needs a bank: pass bank=, or attach one first "
                    "(aligner.attach_bank)"
                )
        elif not isinstance(bank, AlignerBank):
            bank = AlignerBank.load(bank, revision=revision)
        bank.index(aligner_name)  # an unknown name fails before the bank is attached
        if getattr(getattr(model, "aligner_state", None), "bank", None) is not bank:
            attach_bank(model, bank)

    from lm_eval.evaluator import simple_evaluate  # imported before _quiet swaps its modules' bars
    from lm_eval.models.huggingface import HFLM

    training = model.training
    selection = selected(model, aligner_name) if aligner_name is not None else contextlib.nullcontext()
    try:
        with selection, _quiet(progress):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **(model_options or {}))
            results = simple_evaluate(
                model=lm,
                tasks=names,
                task_manager=manager,
                limit=limit,
                num_fewshot=num_fewshot,
                log_samples=log_samples,
                **options,
            )
    finally:
        model.train(training)  # HFLM puts the model in eval mode
    if results is None:
        return None
    # The bank as given (a path or repo reference), else the AlignerBank's description.
    described = repr(bank) if given_bank is None or given_bank is bank else str(given_bank)
    results["aligner"] = {
        "aligner": None if aligner is None else str(aligner),
        "bank": None if bank is None else described,
        "aligner_name": aligner_name,
        "revision": revision,
        "state": _aligner_state(model),
    }
    return results
