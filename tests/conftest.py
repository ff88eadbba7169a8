"""Shared test setup. Nothing here switches Triton to the interpreter: ``backend="triton"`` runs CPU
tensors through an interpreted copy of the kernels and CUDA tensors through the compiled ones,
side by side in one process (kernels/interpreted.py)."""
