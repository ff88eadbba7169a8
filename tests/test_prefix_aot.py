"""Ahead-of-time compilation of the split backend's prefix kernels (kernels/prefix.py) for sm_80
and sm_90, within the shared-memory limits: their one config per head-dim bucket
(configs.SPLIT_PREFIX_CONFIGS), for every supported head dim, fp16 (and bf16 at D = 128), with N > 1
tokens in 64-token chunks (the largest tiles) on both targets and the one-token closed form on
sm_80. The dPK/dPV reduction they launch is the one the fused backward launches too
(kernels/prefix_grad.py), compiled by tests/test_aot_compile.py. Same method as that test (and
its argument typing rules): a subprocess without TRITON_INTERPRET compiles with
``triton.compile`` for a ``GPUTarget``; no GPU needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = ("aligner_prefix_fwd_kernel", "aligner_prefix_bwd_dq_kernel")


def cases() -> list[dict]:
    from aligner_kernels.configs import MANY_TOKENS, ONE_TOKEN, SUPPORTED_HEAD_DIMS

    many = [dict(PREFIX=MANY_TOKENS, BLOCK_P=64, capability=c, dtype="fp16") for c in (80, 90)]
    variants = [*many, dict(PREFIX=ONE_TOKEN, BLOCK_P=16, capability=80, dtype="fp16")]
    result = [
        dict(kernel=kernel, head_dim=head_dim, **variant)
        for kernel in KERNELS
        for head_dim in SUPPORTED_HEAD_DIMS
        for variant in variants
    ]
    result += [
        dict(kernel=kernel, head_dim=128, PREFIX=MANY_TOKENS, BLOCK_P=64, capability=c, dtype="bf16")
        for kernel in KERNELS
        for c in (80, 90)
    ]
    return result


def compile_case(case: dict) -> dict:
    import triton
    from test_aot_compile import signature_and_attrs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from aligner_kernels import prefix
    from aligner_kernels.configs import SPLIT_PREFIX_CONFIGS, block_d, head_dim_bucket

    fn = getattr(prefix, case["kernel"])
    config = SPLIT_PREFIX_CONFIGS[head_dim_bucket(case["head_dim"])]
    constexprs = {
        "GROUP": 1,
        "HEAD_DIM": case["head_dim"],
        "BLOCK_D": block_d(case["head_dim"]),
        "BLOCK_P": case["BLOCK_P"],
        "PREFIX": case["PREFIX"],
        "DOT_PRECISION": "tf32",
        "BLOCK_M": config.kwargs["BLOCK_M"],
    }
    signature, attrs = signature_and_attrs(fn, case["dtype"])
    try:
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", case["capability"], 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
        return {**case, "shared": compiled.metadata.shared, "error": None}
    except Exception as error:  # reported by the test, with the case
        return {**case, "shared": None, "error": f"{type(error).__name__}: {str(error)[:500]}"}


def main() -> None:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as pool:
        results = list(pool.map(compile_case, cases()))
    print(json.dumps(results))


def test_prefix_kernels_compile_and_fit_shared_memory():
    pytest.importorskip("triton.backends.nvidia")
    from test_aot_compile import SHARED_MEMORY_LIMIT

    tests_dir = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tests_dir), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())],
        env=env, cwd=tests_dir.parent, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, f"AOT compile script failed:\n{proc.stderr[-6000:]}"
    results = json.loads(proc.stdout)
    assert len(results) == len(cases())
    problems = [f"{r}: {r['error']}" for r in results if r["error"]]
    problems += [
        f"{r}: {r['shared']} B of shared memory > {SHARED_MEMORY_LIMIT[r['capability']]} B"
        for r in results
        if r["shared"] is not None and r["shared"] > SHARED_MEMORY_LIMIT[r["capability"]]
    ]
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    main()
