"""Run the Triton kernels through the interpreter when no GPU is present (CI, dev machines).

Triton decides at import time whether kernels are compiled or interpreted, so this must happen
before anything imports ``kernels``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
