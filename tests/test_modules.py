"""AlignerPrefix / AlignerFlashAttention as used in training code, and torch.compile capture."""

from __future__ import annotations

import pytest
import torch
from attention_cases import DEVICE
from torch import nn

from aligner import AlignerFlashAttention, AlignerPrefix, aligner_attention_reference, project_prefix

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16 * 2


class ToyAttention(nn.Module):
    """A LLaMA-style attention block whose flash_attn_func call was swapped for the Aligner."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=True)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=True)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
        self.aligner = AlignerFlashAttention(HEADS, backend=backend)

    def forward(self, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, HEADS, HEAD_DIM)
        k = self.k_proj(x).view(b, n, KV_HEADS, HEAD_DIM)
        v = self.v_proj(x).view(b, n, KV_HEADS, HEAD_DIM)
        out = self.aligner(q, k, v, prefix, k_proj=self.k_proj, v_proj=self.v_proj)
        return self.o_proj(out.reshape(b, n, -1))


def make_block(backend: str, seed: int = 0) -> tuple[ToyAttention, AlignerPrefix]:
    torch.manual_seed(seed)
    block, prefix = (
        ToyAttention(backend).to(DEVICE),
        AlignerPrefix(num_tokens=3, hidden_size=HIDDEN).to(DEVICE),
    )
    block.requires_grad_(False)
    block.aligner.gate.requires_grad_(True)
    return block, prefix


def test_prefix_parameters():
    prefix = AlignerPrefix(num_tokens=1, hidden_size=4096)
    assert prefix().shape == (1, 4096) and prefix().dtype == torch.float32
    assert sum(p.numel() for p in prefix.parameters()) == 4096
    gate = AlignerFlashAttention(num_heads=32).gate
    assert gate.shape == (32,) and torch.all(gate == 0)
    with pytest.raises(ValueError, match="num_tokens"):
        AlignerPrefix(0, 16)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_fresh_aligner_leaves_attention_unchanged(backend):
    block, prefix = make_block(backend)
    x = torch.randn(2, 10, HIDDEN, device=DEVICE)
    q = block.q_proj(x).view(2, 10, HEADS, HEAD_DIM).transpose(1, 2)
    k = block.k_proj(x).view(2, 10, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = block.v_proj(x).view(2, 10, KV_HEADS, HEAD_DIM).transpose(1, 2)
    plain = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected = block.o_proj(plain.transpose(1, 2).reshape(2, 10, -1))
    torch.testing.assert_close(block(x, prefix()), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_gradients_reach_prefix_tokens_and_gate(backend):
    block, prefix = make_block(backend)
    with torch.no_grad():
        block.aligner.gate.fill_(0.5)
    block(torch.randn(2, 10, HIDDEN, device=DEVICE), prefix()).square().sum().backward()
    assert prefix.tokens.grad is not None and prefix.tokens.grad.abs().sum() > 0
    assert block.aligner.gate.grad is not None and block.aligner.gate.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in block.named_parameters() if "aligner" not in name)


def test_matches_reference_with_projected_prefix():
    block, prefix = make_block("fused")
    with torch.no_grad():
        block.aligner.gate.normal_()
    x = torch.randn(2, 12, HIDDEN, device=DEVICE)
    q = block.q_proj(x).view(2, 12, HEADS, HEAD_DIM)
    k = block.k_proj(x).view(2, 12, KV_HEADS, HEAD_DIM)
    v = block.v_proj(x).view(2, 12, KV_HEADS, HEAD_DIM)
    pk, pv = project_prefix(prefix(), block.k_proj, block.v_proj, HEAD_DIM)
    assert pk.shape == (3, KV_HEADS, HEAD_DIM)
    expected = aligner_attention_reference(q, k, v, pk, pv, block.aligner.gate)
    torch.testing.assert_close(block.aligner(q, k, v, (pk, pv)), expected, atol=1e-5, rtol=1e-5)
    # Per-sequence tokens (B, N, hidden) project to (B, N, H_kv, D).
    tokens = torch.randn(2, 3, HIDDEN, device=DEVICE)
    pk_b, pv_b = project_prefix(tokens, block.k_proj, block.v_proj, HEAD_DIM)
    expected = aligner_attention_reference(q, k, v, pk_b, pv_b, block.aligner.gate)
    out = block.aligner(q, k, v, tokens, k_proj=block.k_proj, v_proj=block.v_proj)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_prefix_tokens_need_projections():
    block, prefix = make_block("reference")
    q = torch.randn(1, 4, HEADS, HEAD_DIM, device=DEVICE)
    k = torch.randn(1, 4, KV_HEADS, HEAD_DIM, device=DEVICE)
    with pytest.raises(ValueError, match="k_proj and v_proj"):
        block.aligner(q, k, k, prefix())


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_torch_compile_captures_the_op(backend):
    """fullgraph=True: the fused op is one node of the graph (custom op with fake tensors)."""
    block, prefix = make_block(backend)
    with torch.no_grad():
        block.aligner.gate.normal_()
    x = torch.randn(2, 10, HIDDEN, device=DEVICE)
    eager_out = block(x, prefix())
    eager_out.sum().backward()
    eager_grads = (prefix.tokens.grad.clone(), block.aligner.gate.grad.clone())
    prefix.zero_grad()
    block.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x, prefix())
    out.sum().backward()
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefix.tokens.grad, eager_grads[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(block.aligner.gate.grad, eager_grads[1], atol=1e-4, rtol=1e-4)
