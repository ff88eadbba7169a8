"""The benchmark scripts at CPU size through pytest-benchmark, so that they run in CI and cannot rot.

No timing assertions: these check that every method runs and that the rows carry what the result
tables are built from. Real measurements come from the scripts themselves (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import bench_attention  # noqa: E402
import bench_decode  # noqa: E402
import bench_training  # noqa: E402
import report  # noqa: E402
from common import write_results  # noqa: E402


def test_attention_rows(benchmark, tmp_path):
    argv = ["--results-dir", str(tmp_path)] + [
            "--device", "cpu", "--dtype", "float32", "--tokens", "64", "--seqlens", "32", "--heads", "2",
            "--kv-heads", "1", "--head-dims", "32", "--num-tokens", "0", "1", "3",
            "--methods", "fused", "split", "auto", "sdpa-flash", "unfused", "peft-eager"]  # fmt: skip
    rows = benchmark.pedantic(bench_attention.main, args=(argv,), rounds=1, iterations=1)
    measured = {(row["method"], row["num_tokens"]) for row in rows if "fwd_bwd_ms" in row}
    assert {
        ("fused", 0),
        ("fused", 1),
        ("fused", 3),
        ("split", 0),
        ("split", 1),
        ("split", 3),
        ("auto", 3),
    } <= measured
    assert {("sdpa-flash", 0), ("unfused", 3)} <= measured
    assert all(row["chose_fwd_bwd"] == "reference" for row in rows if row["method"] == "auto")  # CPU
    assert all(row["fwd_bwd_ms"] > 0 and row["tflops"] > 0 for row in rows if "fwd_bwd_ms" in row)


def test_training_rows(benchmark, tmp_path):
    pytest.importorskip("peft")
    argv = ["--results-dir", str(tmp_path)] + [
            "--device", "cpu", "--dtype", "float32", "--model", "tiny", "--layers", "3", "--batch", "2",
            "--seqlen", "16", "--warmup", "0", "--rounds", "1"]  # fmt: skip
    rows = benchmark.pedantic(bench_training.main, args=(argv,), rounds=1, iterations=1)
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"floor", "aligner-1", "aligner-10", "adaption-prompt-10", "lora-8"}
    hidden, heads = 64, 4
    assert by_method["floor"]["trainable"] == hidden
    assert by_method["aligner-1"]["trainable"] == hidden + 1 * heads  # layers 2.. of 3
    assert by_method["floor"]["vs_floor"] == 1.0 and all(row["tokens_per_s"] > 0 for row in rows)


def test_decode_rows(benchmark, tmp_path):
    argv = ["--results-dir", str(tmp_path)] + [
            "--device", "cpu", "--dtype", "float32", "--model", "tiny", "--layers", "3",
            "--batches", "1", "2", "--prompt-length", "4", "--new-tokens", "3", "--rounds", "1"]  # fmt: skip
    rows = benchmark.pedantic(bench_decode.main, args=(argv,), rounds=1, iterations=1)
    assert {(row["method"], row["batch"]) for row in rows} == {
        (method, batch) for method in bench_decode.DECODE_METHODS for batch in (1, 2)
    }
    # On the CPU every row carries the tokens/s ratio by process CPU time (the load-proof one).
    base = {row["batch"]: row for row in rows if row["method"] == "base"}
    assert all(row["vs_base"] == 1.0 and row["vs_base_cpu_time"] == 1.0 for row in base.values())
    assert all(row["vs_base_cpu_time"] > 0 for row in rows)


def test_report_rewrites_only_the_generated_section(tmp_path):
    results = tmp_path / "results"
    write_results("training-test", [{"model": "tiny", "method": "floor", "step_s": 0.5}], results)
    write_results(
        "attention-test", [{"method": "aligner", "seqlen": 32, "num_tokens": 1, "tflops": 0.01}], results
    )
    document = tmp_path / "RESULTS.md"
    document.write_text(f"# history\n{report.START}\nold table\n{report.END}\ntail\n", encoding="utf-8")
    report.update_results(document, results)
    text = document.read_text(encoding="utf-8")
    assert text.startswith(f"# history\n{report.START}") and text.endswith(f"{report.END}\ntail\n")
    assert "old table" not in text and "| tiny | floor | 0.5 |" in text
    # the plot is linked relative to the document (benchmarks/RESULTS.md -> results/NAME.png)
    assert "![Attention kernels (forward+backward)](results/attention-test.png)" in text
    assert (results / "attention-test.png").read_bytes().startswith(b"\x89PNG")
    # written through aligner.files: no temporary file is left beside the document or the plot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md", "results"]
    assert not [p.name for p in results.iterdir() if p.name.startswith(".")]

    document.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no <!-- results:start -->"):
        report.update_results(document, results)
    assert document.read_text(encoding="utf-8") == "no markers\n"


def test_report_targets_benchmarks_results_md():
    """The generated tables live in benchmarks/RESULTS.md, whose markers are there; the README has none."""
    root = Path(__file__).parents[1]
    assert report.RESULTS_MD == root / "benchmarks" / "RESULTS.md"
    text = report.RESULTS_MD.read_text(encoding="utf-8")
    assert text.count(report.START) == 1 and text.count(report.END) == 1
    assert report.START not in (root / "README.md").read_text(encoding="utf-8")
