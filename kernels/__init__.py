"""Triton kernels of the fused Aligner attention: ``@triton.jit`` functions and their launchers.

The kernel modules are imported on first use, not with the package: Triton fixes at import time
whether their kernels are compiled for the GPU or run by the interpreter (``TRITON_INTERPRET``),
so importing the package (e.g. for ``SUPPORTED_HEAD_DIMS``) must not make that choice.
"""

from .configs import SUPPORTED_HEAD_DIMS

_LAZY = {
    "aligner_attention_forward": "forward",
    "INTERPRETING": "forward",
    "aligner_attention_backward": "backward",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["INTERPRETING", "SUPPORTED_HEAD_DIMS", "aligner_attention_backward", "aligner_attention_forward"]
