"""Serving Aligners in inference engines: :mod:`aligner.serving.vllm` (the ``vllm`` extra)."""
