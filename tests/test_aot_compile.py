"""Ahead-of-time compilation of every kernel config for Ampere (sm_80) and Hopper (sm_90).

The launchers autotune among the configs of kernels/configs.py, so on a GPU any of them may run,
and a config that needs more shared memory than the device has fails only there, at launch
("out of resource: shared memory"). This test compiles them with ``triton.compile`` for a
``GPUTarget`` (no GPU or CUDA driver needed: Triton ships ptxas) and checks
``compiled.metadata.shared`` against the per-block limit, 163 KB on an A100 and 227 KB on an H100.

Why a subprocess: the compiles run in a process pool (one process per available core) forked
from a process that has compiled nothing yet, and with TRITON_INTERPRET removed from its
environment, so the kernel modules are real JITFunctions even when the user runs the tests
with TRITON_INTERPRET=1 (``@triton.jit`` then makes interpreted functions, which cannot be
compiled). The script prints a JSON record per case (shared bytes, seconds, or the compile
error). It is one test, not one per kernel, so that pytest-xdist runs the
sweep once. Compiled kernels land in Triton's cache (TRITON_CACHE_DIR, default ~/.triton/cache):
a rerun with unchanged kernels takes seconds.

A case is a kernel (fwd, bwd_delta, bwd_dq, bwd_dkdv, bwd_prefix, decode_split,
decode_combine), a head dim of SUPPORTED_HEAD_DIMS, a config its launcher may pick for that head
dim's bucket on that target (the *_SM90 tables on sm_90; bwd_prefix: its fixed
configs.PREFIX_REDUCTION_CONFIG; decode_combine: BLOCK_M=DECODE_BLOCK_M, 4 warps, 1 stage), a dtype
(fp16, bf16), a target and values of the compile-time switches, with DOT_PRECISION="tf32" and
BLOCK_D=block_d(HEAD_DIM).
Arguments are specialized like a real launch on 16-byte aligned tensors whose sizes and strides
are multiples of 16 (``tt.divisibility=16`` on every pointer and integer). That is what lets the
pipeliner stage loads through shared memory (cp.async / TMA), so it is the launch that uses the
most shared memory: without the hints the same kernel can report half as much.

Switches (see ``switch_variants``). The default sweep, ``cover``, compiles every (kernel, config,
head dim, dtype, target), but not every combination of switches with each: each is compiled with
the variant that holds the largest tiles, N > 1 prefix tokens with BLOCK_P=64 (in the full sweep
it uses the most shared memory of all variants, for every case), with CAUSAL=True and GROUP=1
in fp16, CAUSAL=False and GROUP=4 in bf16 (neither switch nor the dtype changes shared memory).
The smaller variants (one prefix token, no prefix, BLOCK_P=16) are compiled for the first config
of each bucket only, in fp16, for every head dim and target: to catch compile errors in their
code, not for size. ``ALIGNER_AOT_SWEEP=full`` (or ``python tests/test_aot_compile.py
--sweep=full --table``, which prints the shared-memory table) compiles every combination of
CAUSAL, prefix mode and BLOCK_P for every case, with GROUP=1: about 3.5 times the compiles.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Shared memory one block may use (the opt-in maximum the launcher gets), in bytes.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGETS = {80: "sm_80 (A100)", 90: "sm_90 (H100)"}
DTYPES = ("fp16", "bf16")
KERNELS = ("fwd", "bwd_delta", "bwd_dq", "bwd_dkdv", "bwd_prefix", "decode_split", "decode_combine")
# Prefix chunk sizes: block_p(N) for N <= 16 and for N >= 64 (the smallest and largest tiles).
BLOCK_PS = (16, 64)
GROUPS = (1, 4)
SWITCHES = ("CAUSAL", "PREFIX", "SINGLE_TOKEN", "BLOCK_P", "GROUP")
SUBPROCESS_TIMEOUT_S = {"cover": 1200, "full": 3600}


# ---------------------------------------------------------------------------------------------
# Script side: runs without TRITON_INTERPRET, imports the kernels as JITFunctions and compiles.
# ---------------------------------------------------------------------------------------------


def kernel_functions() -> dict:
    from aligner_kernels import backward, decode, forward, prefix_grad

    return {
        "fwd": forward.aligner_attention_fwd_kernel,
        "bwd_delta": backward.aligner_attention_bwd_delta_kernel,
        "bwd_dq": backward.aligner_attention_bwd_dq_kernel,
        "bwd_dkdv": backward.aligner_attention_bwd_dkdv_kernel,
        "bwd_prefix": prefix_grad.aligner_attention_bwd_prefix_kernel,  # shared with the split backward
        "decode_split": decode.aligner_attention_decode_split_kernel,
        "decode_combine": decode.aligner_attention_decode_combine_kernel,
    }


def launch_configs(kernel: str, head_dim: int, capability: int) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the launcher may run for this head dim on a GPU
    of this compute capability (80, 90): the Hopper tables on sm_90 where the kernel has one."""
    from aligner_kernels import configs

    if kernel == "bwd_prefix":  # not autotuned: see configs.PREFIX_REDUCTION_CONFIG
        config = configs.PREFIX_REDUCTION_CONFIG
        return [(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)]
    if kernel == "decode_combine":  # not autotuned (and has no BLOCK_N): see aligner_attention_decode
        return [(configs.DECODE_BLOCK_M, None, 4, 1)]
    tables = {
        "fwd": (configs.FORWARD_CONFIGS, configs.FORWARD_CONFIGS_SM90),
        "decode_split": (configs.DECODE_CONFIGS, None),
        "bwd_delta": (configs.ROWWISE_CONFIGS, None),
        "bwd_dq": (configs.BACKWARD_DQ_CONFIGS, configs.BACKWARD_DQ_CONFIGS_SM90),
        "bwd_dkdv": (configs.BACKWARD_DKDV_CONFIGS, configs.BACKWARD_DKDV_CONFIGS_SM90),
    }[kernel]
    table = configs.device_configs(*tables, divmod(capability, 10))
    return [
        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        for c in table[configs.head_dim_bucket(head_dim)]
    ]


def prefix_modes(params: set[str]) -> dict[str, dict]:
    """The kernel's prefix switch per mode: "many" (N > 1 tokens, the prefix loop), "one" (the
    N = 1 closed form) and, with the tri-state PREFIX switch, "none" (no prefix)."""
    from aligner_kernels import configs

    if "PREFIX" in params:
        return {
            "many": {"PREFIX": configs.MANY_TOKENS},
            "one": {"PREFIX": configs.ONE_TOKEN},
            "none": {"PREFIX": configs.NO_PREFIX},
        }
    if "SINGLE_TOKEN" in params:
        return {"many": {"SINGLE_TOKEN": False}, "one": {"SINGLE_TOKEN": True}}
    return {"many": {}}


def switch_variants(params: set[str], sweep: str, dtype: str, first_config: bool) -> list[dict]:
    """Values of the kernel's compile-time switches (those among ``params``) to compile.

    full: every combination of CAUSAL, prefix mode and, with N > 1 tokens, BLOCK_P in (64, 16);
    GROUP=1.

    cover: the largest variant, N > 1 tokens with BLOCK_P=64 (the largest prefix tiles: the most
    shared memory of all variants in every case of the full sweep), for every config, head dim,
    dtype and target; CAUSAL=True, GROUP=1 in fp16 and CAUSAL=False, GROUP=4 in bf16 (neither
    changes shared memory, nor does the dtype). The other prefix modes (one token, no prefix)
    and BLOCK_P=16 with N > 1 only with the bucket's first config in fp16 (every head dim and
    target): they hold smaller tiles, so they are compiled to catch compile errors, not for size.
    """
    modes = prefix_modes(params)
    first_dtype = dtype == DTYPES[0]
    variants = []
    if sweep == "full":
        for causal, (mode, switches) in itertools.product((True, False), modes.items()):
            for block_p in BLOCK_PS[::-1] if mode == "many" else BLOCK_PS[:1]:
                variants.append({"CAUSAL": causal, **switches, "BLOCK_P": block_p, "GROUP": GROUPS[0]})
    else:
        variants.append(
            {
                "CAUSAL": first_dtype,
                **modes["many"],
                "BLOCK_P": BLOCK_PS[-1],
                "GROUP": GROUPS[0] if first_dtype else GROUPS[-1],
            }
        )
        if first_dtype and first_config:
            variants += [
                {"CAUSAL": True, **switches, "BLOCK_P": BLOCK_PS[0], "GROUP": GROUPS[0]}
                for mode, switches in modes.items()
                if mode != "many" or "BLOCK_P" in params
            ]
    # Only the switches the kernel has; drop the duplicates that leaves.
    unique = []
    for variant in variants:
        variant = {k: v for k, v in variant.items() if k in params}
        if variant not in unique:
            unique.append(variant)
    return unique


def enumerate_cases(sweep: str) -> list[dict]:
    from aligner_kernels import configs

    fns = kernel_functions()
    cases = []
    for kernel, head_dim, dtype, capability in itertools.product(
        KERNELS, configs.SUPPORTED_HEAD_DIMS, DTYPES, sorted(SHARED_MEMORY_LIMIT)
    ):
        params = {p.name for p in fns[kernel].params if p.is_constexpr}
        configs_here = launch_configs(kernel, head_dim, capability)
        for index, (block_m, block_n, warps, stages) in enumerate(configs_here):
            for switches in switch_variants(params, sweep, dtype, first_config=index == 0):
                cases.append(
                    {
                        "kernel": kernel,
                        "head_dim": head_dim,
                        "dtype": dtype,
                        "capability": capability,
                        "BLOCK_M": block_m,
                        "BLOCK_N": block_n,
                        "num_warps": warps,
                        "num_stages": stages,
                        **switches,
                    }
                )
    return cases


def signature_and_attrs(fn, dtype: str) -> tuple[dict, dict]:
    """ASTSource signature from the kernel's parameter names, and tt.divisibility=16 attributes
    for every pointer and integer (an aligned launch whose sizes are multiples of 16)."""
    signature, attrs = {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            continue
        if name[0].isupper():  # pointer
            if name.startswith(("Gate", "Lse", "Delta")) or name.endswith("Partial"):
                signature[name] = "*fp32"
            elif name.startswith("CuSeq"):
                signature[name] = "*i32"
            else:
                signature[name] = "*" + dtype
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
            continue
        elif name.startswith(("stride_", "num_", "seqlen_bucket_")) or name in INTEGER_ARGUMENTS:
            signature[name] = "i32"
        else:
            raise AssertionError(f"{fn.__name__}: no type rule for argument {name!r}")
        attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


INTEGER_ARGUMENTS = ("sequences_per_program", "keys_per_split", "row_blocks")
_FNS: dict = {}


def compile_case(case: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from aligner_kernels.configs import block_d

    if not _FNS:
        _FNS.update(kernel_functions())
    fn = _FNS[case["kernel"]]
    params = {p.name for p in fn.params if p.is_constexpr}
    constexprs = {
        "HEAD_DIM": case["head_dim"],
        "BLOCK_D": block_d(case["head_dim"]),
        "DOT_PRECISION": "tf32",
        "BLOCK_M": case["BLOCK_M"],
        **({"BLOCK_N": case["BLOCK_N"]} if case["BLOCK_N"] is not None else {}),
        **{k: case[k] for k in SWITCHES if k in case},
    }
    # A new constexpr needs a value here (and, if it is a switch, a place in switch_variants).
    assert params == constexprs.keys(), f"{case['kernel']}: constexprs {sorted(params ^ constexprs.keys())}"
    signature, attrs = signature_and_attrs(fn, case["dtype"])
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", case["capability"], 32),
            options={"num_warps": case["num_warps"], "num_stages": case["num_stages"]},
        )
        result = {"shared": compiled.metadata.shared, "error": None}
    except Exception as error:  # reported by the test, with the case
        # A CompilationError quotes the kernel source between its position and its message.
        lines = [line for line in str(error).splitlines() if line.strip()] or [""]
        message = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        result = {"shared": None, "error": f"{type(error).__name__}: {message}"[:1000]}
    return {**case, **result, "seconds": round(time.perf_counter() - start, 3)}


def _cost(case: dict) -> tuple:
    # Longest first, so the pool ends with short compiles.
    return (-case["head_dim"], -case["BLOCK_M"] * (case["BLOCK_N"] or 16), case["kernel"])


def run_sweep(sweep: str, jobs: int) -> list[dict]:
    import multiprocessing

    cases = sorted(enumerate_cases(sweep), key=_cost)
    if jobs <= 1:
        results = [compile_case(c) for c in cases]
    else:
        # fork: the parent has compiled nothing yet, and the workers inherit the imported kernels.
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            results = list(pool.imap_unordered(compile_case, cases))
    return sorted(results, key=lambda r: [KERNELS.index(r["kernel"])] + [str(r[k]) for k in sorted(r)])


def config_name(r: dict) -> str:
    return f"M{r['BLOCK_M']}/N{r['BLOCK_N']}/w{r['num_warps']}/s{r['num_stages']}"


def shared_table(results: list[dict]) -> str:
    """Max shared memory (KB) over switches and dtypes per kernel / config / head dim / target."""
    cells: dict = {}
    for r in results:
        key = (KERNELS.index(r["kernel"]), r["kernel"], config_name(r), r["head_dim"])
        cell = cells.setdefault(key, {})
        value = "ERR" if r["error"] else r["shared"]
        old = cell.get(r["capability"])
        if old == "ERR" or value == "ERR":
            cell[r["capability"]] = "ERR"
        else:
            cell[r["capability"]] = max(old or 0, value)
    lines = [f"{'kernel':<11} {'config':<18} {'D':>4}  {'sm_80 KB':>9} {'sm_90 KB':>9}"]
    for (_, kernel, config, head_dim), cell in sorted(cells.items()):
        values = []
        for cap in sorted(SHARED_MEMORY_LIMIT):
            v = cell.get(cap)
            if isinstance(v, int):
                mark = "" if v <= SHARED_MEMORY_LIMIT[cap] else " !"
                values.append(f"{v / 1024:>9.1f}{mark}")
            else:
                values.append(f"{str(v):>9}")
        lines.append(f"{kernel:<11} {config:<18} {head_dim:>4}  {' '.join(values)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=("cover", "full"), default="cover")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--table", action="store_true", help="print a table instead of JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    start = time.perf_counter()
    results = run_sweep(args.sweep, args.jobs)
    elapsed = time.perf_counter() - start
    if args.table:
        print(shared_table(results))
        compile_s = sum(r["seconds"] for r in results)
        print(f"{len(results)} compiles, {elapsed:.1f} s wall with {args.jobs} jobs, "
              f"{compile_s / len(results):.2f} s per compile")  # fmt: skip
        for r in results:
            if r["error"] or r["shared"] > SHARED_MEMORY_LIMIT[r["capability"]]:  # fmt: skip
                print("FAIL", json.dumps(r))
    else:
        json.dump({"wall_seconds": elapsed, "results": results}, sys.stdout)


# ---------------------------------------------------------------------------------------------
# Test side.
# ---------------------------------------------------------------------------------------------


def _describe(r: dict) -> str:
    switches = {k: r[k] for k in SWITCHES if k in r}
    return (
        f"{TARGETS[r['capability']]} {r['kernel']} D={r['head_dim']} {r['dtype']} {config_name(r)} {switches}"
    )


# One test, not one per kernel: under pytest-xdist each worker would run its own sweep.
def test_every_launch_config_compiles_and_fits_shared_memory():
    pytest.importorskip("triton.backends.nvidia")
    from aligner_kernels.configs import SUPPORTED_HEAD_DIMS

    sweep = os.environ.get("ALIGNER_AOT_SWEEP", "cover")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), f"--sweep={sweep}"],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S[sweep],
    )
    assert proc.returncode == 0, f"AOT compile script failed:\n{proc.stderr[-6000:]}"
    results = json.loads(proc.stdout)["results"]

    compiled = {
        (r["kernel"], r["head_dim"], r["dtype"], r["capability"])
        + (r["BLOCK_M"], r["BLOCK_N"], r["num_warps"], r["num_stages"])
        for r in results
    }
    expected = {
        (kernel, head_dim, dtype, capability) + config
        for kernel, head_dim, dtype, capability in itertools.product(
            KERNELS, SUPPORTED_HEAD_DIMS, DTYPES, SHARED_MEMORY_LIMIT
        )
        for config in launch_configs(kernel, head_dim, capability)
    }
    assert compiled == expected

    problems = [f"{_describe(r)}: {r['error']}" for r in results if r["error"]]
    problems += [
        f"{_describe(r)}: {r['shared']} B of shared memory > {SHARED_MEMORY_LIMIT[r['capability']]} B"
        for r in results
        if not r["error"] and r["shared"] > SHARED_MEMORY_LIMIT[r["capability"]]
    ]
    assert not problems, (
        f"{len(problems)} of {len(results)} kernel compiles fail or do not fit:\n" + "\n".join(problems)
    )


if __name__ == "__main__":
    main()
