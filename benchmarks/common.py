"""Shared pieces of the benchmark scripts: timing, environment record, atomic result files."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from aligner.files import write_atomic

RESULTS_DIR = Path(__file__).parent / "results"


def environment() -> dict:
    """Where the numbers come from: device name, library versions, date."""
    import transformers
    import triton

    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of ``fn`` in milliseconds: CUDA events through triton's do_bench on a GPU,
    perf_counter around synchronised calls on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timed_call(fn: Callable[[], object], device: torch.device) -> tuple[float, float | None]:
    """Seconds of wall time and of this process's CPU time (all threads) that ``fn`` takes.

    On a shared CPU machine the wall time also counts the time other jobs hold the cores, so the
    ratio of two methods moves with the load; the process CPU time counts only the work done, and
    is what CPU comparisons should read (with ``OMP_NUM_THREADS=1`` it is the single thread's time).
    On a GPU only the wall time means anything (CPU time is None)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - wall, None
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory allocated while ``fn`` runs, above what was allocated before (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def benchmark_parser(description: str, output: str) -> argparse.ArgumentParser:
    """The options every benchmark script shares: device, dtype and where the results go."""
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    parser.add_argument("--output", default=output, help="results file name (without extension)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser


def run_and_record(
    run_benchmark: Callable[[argparse.Namespace], list[dict]], parser: argparse.ArgumentParser, argv=None
) -> list[dict]:
    """Parse ``argv``, run the benchmark, print its rows and write them with :func:`write_results`."""
    args = parser.parse_args(argv)
    rows = run_benchmark(args)
    for row in rows:
        print({key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()})
    json_path, md_path = write_results(args.output, rows, args.results_dir)
    print(f"wrote {json_path} and {md_path}")
    return rows


def write_results(name: str, rows: list[dict], directory: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write ``{name}.json`` (environment + rows) and ``{name}.md`` (a table), each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), "rows": rows}
    json_path = write_atomic(directory / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    md_path = write_atomic(directory / f"{name}.md", markdown_table(rows, payload["environment"]))
    return json_path, md_path


def markdown_table(rows: Sequence[dict], env: dict | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = []
    if env:
        lines.append(
            f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}; {env['date']}\n"
        )
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)
