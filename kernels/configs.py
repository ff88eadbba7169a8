"""Block sizes, autotune configs and launch helpers shared by the forward and backward launchers."""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

from .interpreted import language_restored

# Kernels exist for these head dims; the library falls back to the reference for the others.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 96, 128, 256)
# The prefix is streamed in chunks of at most this many tokens (its own online softmax).
MAX_BLOCK_P = 64

# Small tiles under the interpreter: several blocks per tiny test shape, so the block loops,
# causal phases and masks are all exercised on CPU.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim bucket. Every entry fits the shared
# memory of an A100 (163 KB) and an H100 (227 KB) in fp16/bf16 (checked ahead of time by
# tests/test_aot_compile.py). Large tiles with 8 warps suit Hopper, the smaller ones Ampere.
FORWARD_CONFIGS = {
    64: [_config(128, 64, 4, 3), _config(128, 128, 8, 3), _config(64, 64, 4, 4)],
    128: [_config(128, 64, 8, 3), _config(128, 32, 4, 3), _config(64, 64, 4, 3)],
    256: [_config(64, 32, 4, 2), _config(64, 64, 8, 2)],
}
# dQ: BLOCK_M queries per program stream BLOCK_N keys. dK/dV: BLOCK_N keys per program stream
# BLOCK_M queries. The backward holds more tiles at once, so tiles are smaller.
BACKWARD_DQ_CONFIGS = {
    64: [_config(128, 64, 8, 2), _config(64, 64, 4, 3)],
    128: [_config(128, 64, 8, 2), _config(64, 64, 4, 2)],
    256: [_config(64, 32, 4, 1), _config(32, 32, 4, 2)],
}
BACKWARD_DKDV_CONFIGS = {
    64: [_config(64, 128, 8, 2), _config(64, 64, 4, 3)],
    128: [_config(64, 128, 8, 2), _config(32, 64, 4, 2)],
    256: [_config(32, 64, 4, 1), _config(32, 32, 4, 2)],
}


def _hopper_first(hopper: dict, ampere: dict) -> dict:
    """Per bucket: the Hopper candidates, then the Ampere ones not among them."""

    def name(c: triton.Config) -> tuple:
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)

    table = {}
    for bucket, configs in ampere.items():
        first = hopper.get(bucket, [])
        table[bucket] = first + [c for c in configs if name(c) not in {name(h) for h in first}]
    return table


# Hopper (sm_90) tables, chosen on an H100/H200 instead of the ones above. Its larger shared memory
# (227 KB) and register file hold the larger tiles that Triton's fused-attention tutorial and
# FlashAttention-3 use there: 128 x 128 forward tiles with 8 warps (BLOCK_N = 128), and in the
# backward long key tiles against short query tiles (dK/dV) and the reverse (dQ), deeply pipelined.
# They come first, for ALIGNER_AUTOTUNE=0, which runs the first config: with the Ampere-first list
# an H100 ran N = 0 fwd+bwd 1.64x behind SDPA at 2 x 4k, against 1.36-1.43x autotuned at 8 x 2k
# and 2 x 8k (shared/gpu/README.md; other shapes, so only a hint that the first config matters).
# The Ampere configs follow, so autotuning on Hopper chooses among a superset of what it had.
# Not timed on a GPU yet: the next H100 run of bench_attention.py tells which ones win. The dQ
# config at D = 128 with 64-token prefix chunks needs 224 of the 227 KB (tests/test_aot_compile.py).
FORWARD_CONFIGS_SM90 = _hopper_first(
    {64: [_config(128, 128, 8, 3)], 128: [_config(128, 128, 8, 2)]}, FORWARD_CONFIGS
)
BACKWARD_DQ_CONFIGS_SM90 = _hopper_first(
    {64: [_config(128, 32, 4, 5)], 128: [_config(128, 32, 4, 5)]}, BACKWARD_DQ_CONFIGS
)
BACKWARD_DKDV_CONFIGS_SM90 = _hopper_first(
    {64: [_config(32, 128, 4, 5)], 128: [_config(32, 128, 4, 5)]}, BACKWARD_DKDV_CONFIGS
)
# Split-KV decoding (kernels/decode.py): BLOCK_M is the GQA group's query rows, padded to the 16
# rows tl.dot needs (the interpreter's BLOCK_M too); a decode step is bound by reading the cache,
# so the configs differ in the key tile.
DECODE_BLOCK_M = 16
DECODE_CONFIGS = {
    64: [_config(DECODE_BLOCK_M, 64, 4, 3), _config(DECODE_BLOCK_M, 128, 4, 3)],
    128: [_config(DECODE_BLOCK_M, 64, 4, 3), _config(DECODE_BLOCK_M, 128, 4, 2)],
    256: [_config(DECODE_BLOCK_M, 32, 4, 3), _config(DECODE_BLOCK_M, 64, 4, 2)],
}
# Row-wise kernels (Delta): only BLOCK_M matters; BLOCK_N is unused.
ROWWISE_CONFIGS = {
    64: [_config(64, 16, 4, 2), _config(128, 16, 8, 2)],
    128: [_config(64, 16, 4, 2), _config(128, 16, 8, 2)],
    256: [_config(32, 16, 4, 1), _config(64, 16, 8, 1)],
}
# The prefix-gradient reduction is not autotuned (its grid depends on BLOCK_M through the split
# count): one config for every head dim, compiled for each by tests/test_aot_compile.py (D = 256 is
# the tightest fit).
PREFIX_REDUCTION_CONFIG = _config(64, 16, 4, 2)
# The split backend's prefix kernels (kernels/prefix.py): row-wise like Delta, with the prefix tile
# held as well; not autotuned (the forward may write in place), one config per head-dim bucket.
SPLIT_PREFIX_CONFIGS = {64: _config(64, 16, 4, 2), 128: _config(64, 16, 4, 2), 256: _config(32, 16, 4, 1)}
# The smallest BLOCK_M any launcher may run the row-wise kernels with (buffers of per-block
# partials are sized by it).
SMALLEST_BLOCK_M = min(
    INTERPRETER_CONFIG["BLOCK_M"],
    *(c.kwargs["BLOCK_M"] for cs in ROWWISE_CONFIGS.values() for c in cs),
    *(c.kwargs["BLOCK_M"] for c in SPLIT_PREFIX_CONFIGS.values()),
)

# The kernels' compile-time PREFIX switch: no prefix (plain flash attention: a layer without an
# Aligner, or a merged one), one token (closed form: softmax = 1, an epilogue add), N tokens.
NO_PREFIX, ONE_TOKEN, MANY_TOKENS = 0, 1, 2


def prefix_variant(num_prefix: int) -> int:
    return NO_PREFIX if num_prefix == 0 else ONE_TOKEN if num_prefix == 1 else MANY_TOKENS


def head_dim_bucket(head_dim: int) -> int:
    """The config bucket of a head dim: the padded width its tiles have in registers."""
    return max(64, triton.next_power_of_2(head_dim))


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (tl.arange) and at least 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(head_dim))


def block_p(num_prefix: int) -> int:
    """Prefix chunk: all N tokens at once when N <= 64, else chunks of 64; at least 16 for tl.dot
    (and 16 when there is no prefix: the chunk is then never used)."""
    return min(MAX_BLOCK_P, max(16, triton.next_power_of_2(num_prefix)))


def seqlen_bucket(length: int) -> int:
    """The autotune key of a sequence length: the next power of two. A decode loop or padding-free
    training sees a new longest length at almost every step; keyed on raw lengths, the autotuner
    would benchmark every config again each time. The kernels read the true lengths from
    cu_seqlens, so any length inside a bucket runs correctly with the bucket's config."""
    return triton.next_power_of_2(max(1, length))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs (CPU tests, debugging) get true fp32 products instead of TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def compute_capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def device_configs(configs_by_bucket: dict, sm90_configs: dict | None, capability: tuple[int, int]) -> dict:
    """The config table a GPU of this compute capability tunes over: ``sm90_configs`` on Hopper
    (sm_90) when given, else ``configs_by_bucket`` (Ampere, Ada, and the GPUs not tuned for yet)."""
    return sm90_configs if sm90_configs is not None and capability[0] == 9 else configs_by_bucket


def launcher(
    kernel, configs_by_bucket: dict, key: list[str], interpreting: bool, sm90_configs: dict | None = None
):
    """Return ``launch(grid, head_dim, *args, **kwargs)`` running ``kernel`` with the head-dim
    bucket's autotuned config on a GPU, or the fixed small interpreter config when ``kernel`` is
    interpreted. The configs come from ``sm90_configs`` on a Hopper GPU when given, else from
    ``configs_by_bucket`` (:func:`device_configs`; the device is that of the first argument).
    ``key`` names the arguments the tuning is cached on; sequence lengths enter it only as
    :func:`seqlen_bucket` values (the ``seqlen_bucket_q/k`` arguments).

    ``ALIGNER_AUTOTUNE=0`` skips autotuning and takes each bucket's first config (one compile
    per variant instead of one per config: quick test runs)."""

    def autotuned(table: dict | None) -> dict:
        if interpreting or table is None:
            return {}
        return {
            bucket: triton.autotune(configs=configs, key=key)(kernel) for bucket, configs in table.items()
        }

    tuned, tuned_sm90 = autotuned(configs_by_bucket), autotuned(sm90_configs)

    def launch(grid, head_dim: int, *args, **kwargs):
        if interpreting:
            with language_restored():
                return kernel[grid](*args, **kwargs, **INTERPRETER_CONFIG)
        bucket = head_dim_bucket(head_dim)
        device = args[0].device
        table = device_configs(
            configs_by_bucket,
            sm90_configs,
            compute_capability(torch.cuda.current_device() if device.index is None else device.index),
        )
        if os.environ.get("ALIGNER_AUTOTUNE", "1") == "0":
            config = table[bucket][0]
            return kernel[grid](
                *args, **kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
            )
        return (tuned_sm90 if table is sm90_configs else tuned)[bucket][grid](*args, **kwargs)

    # For tests and inspection.
    launch.kernel, launch.key, launch.tuned, launch.tuned_sm90 = kernel, key, tuned, tuned_sm90
    return launch


def interpreter_scope(interpreting: bool):
    """The context an untuned launch runs in: :func:`language_restored` when interpreted."""
    return language_restored() if interpreting else contextlib.nullcontext()
