"""Triton kernels of the fused Aligner attention: ``@triton.jit`` functions and their launchers.

The repository folder ``kernels/`` is installed as the package ``aligner_kernels`` (setup.py
``package_dir``): the import name ``kernels`` belongs to Hugging Face's Hub kernels package, which
transformers itself imports.

The kernel modules exist twice in a process: compiled (``aligner_kernels.forward``, ...) for GPU tensors
and interpreted (``aligner_kernels._interpreted.forward``, ..., see interpreted.py) for CPU tensors, each
imported on first use. :func:`load` hands out the launchers of one of them.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types

from .configs import SUPPORTED_HEAD_DIMS

KERNEL_MODULES = ("forward", "backward", "decode", "prefix")


@functools.cache
def load(interpreted: bool) -> types.SimpleNamespace:
    """The launchers ``aligner_attention_forward``, ``aligner_attention_backward``,
    ``aligner_attention_decode``, ``aligner_prefix_forward`` and ``aligner_prefix_backward`` (the
    split backend's prefix term), and ``INTERPRETING``: run by the Triton interpreter (for CPU
    tensors) if ``interpreted``, else compiled for the GPU (interpreted as well if the user set
    TRITON_INTERPRET=1 before importing Triton)."""
    package = __name__
    if interpreted:
        from .interpreted import interpreted_package

        package = interpreted_package(sys.modules[__name__], KERNEL_MODULES).__name__
    forward, backward, decode, prefix = (
        importlib.import_module(f"{package}.{name}") for name in KERNEL_MODULES
    )
    return types.SimpleNamespace(
        aligner_attention_forward=forward.aligner_attention_forward,
        aligner_attention_backward=backward.aligner_attention_backward,
        aligner_attention_decode=decode.aligner_attention_decode,
        aligner_prefix_forward=prefix.aligner_prefix_forward,
        aligner_prefix_backward=prefix.aligner_prefix_backward,
        INTERPRETING=forward.INTERPRETING,
    )


__all__ = ["KERNEL_MODULES", "SUPPORTED_HEAD_DIMS", "load"]
