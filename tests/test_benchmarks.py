"""The benchmark scripts at CPU size through pytest-benchmark, so that they run in CI and cannot rot.

No timing assertions: these check that every method runs and that the rows carry what the README
tables are built from. Real measurements come from the scripts themselves (README, Results).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import bench_attention  # noqa: E402
import bench_decode  # noqa: E402
import bench_training  # noqa: E402


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
