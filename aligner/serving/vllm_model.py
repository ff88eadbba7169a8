"""vLLM model classes that add a bank Aligner per request to vLLM's own LLaMA-family models.

``AlignerLlamaForCausalLM`` is vLLM's ``LlamaForCausalLM`` (and likewise for Mistral and Qwen2)
plus, in every layer from the bank's ``start_layer`` on, the prefix term of DESIGN.md section 1
added to vLLM's attention output:

    O_t = O_main_t + gate_h[r] * softmax_n(s * q_t . PK_n[r]) . PV_n[r]       r: token t's batch row

O_main is vLLM's paged attention, untouched; each row's PK / PV are its Aligner's tokens through
the layer's own ``qkv_proj``, computed once when the request joins the batch and kept in
per-row tables. A row without an Aligner has zero tokens and gate 0, so its term is exactly 0.
The tables and the token-to-row map are buffers written in place before each step, so a
compiled (``torch.compile``) or captured (CUDA graph) forward reads the current step's values.
Selected by ``hf_overrides``: see :func:`aligner.serving.vllm.engine_args`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from ..bank import AlignerBank
from . import vllm as serving
from .vllm_compat import AttentionSite, attention_sites, token_rows


class AlignerPrefixTerm(nn.Module):
    """One layer's prefix term for every token of a step, from per-row tables (buffers).

    N = 1: the term does not depend on the query (DESIGN.md section 1, the closed form), so each
    row keeps it whole, ``constant[r] = gate_h[r] * PV[r]`` (heads x head_dim, fp32), and a step
    costs one gather and one add. N > 1: each row keeps PK, PV (in the model's dtype) and its gate;
    the softmax over the N tokens is computed per query, in fp32.
    """

    def __init__(
        self, site: AttentionSite, rows: int, num_tokens: int, token_row: Tensor, dtype: torch.dtype
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = site.num_heads, site.num_kv_heads, site.head_dim
        self.num_tokens, self.scale = num_tokens, site.scale
        width = site.num_heads * site.head_dim
        if num_tokens == 1:
            self.register_buffer("constant", torch.zeros(rows, width, dtype=torch.float32), persistent=False)
        else:
            kv_shape = (rows, num_tokens, site.num_kv_heads, site.head_dim)
            self.register_buffer("prefix_k", torch.zeros(kv_shape, dtype=dtype), persistent=False)
            self.register_buffer("prefix_v", torch.zeros(kv_shape, dtype=dtype), persistent=False)
            self.register_buffer(
                "gate", torch.zeros(rows, site.num_heads, dtype=torch.float32), persistent=False
            )
        self.register_buffer("token_row", token_row, persistent=False)  # shared by every layer

    @property
    def rows(self) -> int:
        return (self.constant if self.num_tokens == 1 else self.gate).shape[0]

    def set_rows(self, rows: Tensor, keys: Tensor, values: Tensor, gate: Tensor) -> None:
        """Rows ``rows`` (R,) now run the Aligners whose keys / values (R, N, kv heads, head_dim)
        and gates (R, heads) are given (zeros: the base model)."""
        if self.num_tokens == 1:
            group = self.num_heads // self.num_kv_heads
            per_head = values[:, 0].float().repeat_interleave(group, dim=1)  # (R, heads, head_dim)
            constant = gate.float()[:, :, None] * per_head
            self.constant.index_copy_(0, rows, constant.flatten(1))
        else:
            self.prefix_k.index_copy_(0, rows, keys.to(self.prefix_k.dtype))
            self.prefix_v.index_copy_(0, rows, values.to(self.prefix_v.dtype))
            self.gate.index_copy_(0, rows, gate.float())

    def forward(self, query: Tensor) -> Tensor:
        """The term for ``query`` (tokens, heads x head_dim), in fp32."""
        tokens = query.shape[0]
        rows = self.token_row[:tokens]
        if self.num_tokens == 1:
            return self.constant[rows]
        group = self.num_heads // self.num_kv_heads
        q = query.view(tokens, self.num_kv_heads, group, self.head_dim).float()
        scores = torch.einsum("tkgd,tnkd->tkgn", q, self.prefix_k[rows].float()) * self.scale
        out = torch.einsum("tkgn,tnkd->tkgd", scores.softmax(dim=-1), self.prefix_v[rows].float())
        gate = self.gate[rows].view(tokens, self.num_kv_heads, group, 1)
        return (gate * out).reshape(tokens, self.num_heads * self.head_dim)

    def add_to_output(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Forward hook on vLLM's ``Attention``: its output plus this layer's prefix term."""
        return output + self(args[0]).to(output.dtype).view_as(output)


class AlignerServingMixin:
    """Adds the bank's Aligners to a vLLM causal LM (see the module docstring)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
            raise ValueError(
                "Aligner serving runs on one device per engine for now: tensor_parallel_size and "
                f"pipeline_parallel_size must be 1, got {parallel.tensor_parallel_size} and "
                f"{parallel.pipeline_parallel_size}"
            )
        hf_config = vllm_config.model_config.hf_config
        path = getattr(hf_config, serving.BANK_KEY, None)
        if not path:
            raise ValueError(
                f"{type(self).__name__} needs hf_overrides[{serving.BANK_KEY!r}], the path of an Aligner "
                "bank: build the engine with aligner.serving.vllm.engine_args(model, bank=...)"
            )
        bank = AlignerBank.load(path)
        bank.config.check_compatible(hf_config, name=f"the bank {path}")
        self.aligner_bank = bank
        self.aligner_batch = serving.batch_aligners(vllm_config)
        sites = attention_sites(self)
        rows = vllm_config.scheduler_config.max_num_seqs
        token_row = torch.zeros(vllm_config.scheduler_config.max_num_batched_tokens, dtype=torch.int64)
        self.aligner_row_names: list[str | None] = [None] * rows
        self.aligner_terms: dict[int, AlignerPrefixTerm] = {}
        self.aligner_sites = {layer: sites[layer] for layer in bank.config.layers}
        for layer, site in self.aligner_sites.items():
            term = AlignerPrefixTerm(site, rows, bank.num_tokens, token_row, vllm_config.model_config.dtype)
            site.parent.aligner = term  # a child module, so that compiled code sees its buffers
            site.attention.register_forward_hook(term.add_to_output)
            self.aligner_terms[layer] = term

    def forward(self, input_ids: Tensor | None, positions: Tensor, *args: Any, **kwargs: Any) -> Any:
        self._prepare_aligner_step(positions.shape[-1], positions.device)
        return super().forward(input_ids, positions, *args, **kwargs)

    @torch.no_grad()
    def _prepare_aligner_step(self, num_tokens: int, device: torch.device) -> None:
        """Refresh the tables of rows whose request changed, and map this step's tokens to rows."""
        changed = self.aligner_batch.take_changes()
        if changed:
            self._refresh_rows(changed)
        term = next(iter(self.aligner_terms.values()), None)
        if term is None:
            return
        rows = token_rows(num_tokens, device)
        if rows is None:  # vLLM's dummy / profiling runs: any valid row
            term.token_row[:num_tokens].zero_()
        else:
            term.token_row[:num_tokens].copy_(rows.clamp_(max=term.rows - 1))

    def _refresh_rows(self, changed: dict[int, str | None]) -> None:
        rows = torch.tensor(sorted(changed), dtype=torch.int64)
        names = [changed[int(row)] for row in rows]
        index = torch.tensor([-1 if name is None else self.aligner_bank.index(name) for name in names])
        tokens, gates = self.aligner_bank.select(index)  # zeros for the base model's rows
        start = self.aligner_bank.start_layer
        weight = next(self.parameters())
        flat = tokens.to(device=weight.device, dtype=weight.dtype).flatten(0, 1)
        rows = rows.to(weight.device)
        for layer, site in self.aligner_sites.items():
            keys, values = site.project_prefix(flat)
            shape = (len(names), -1, site.num_kv_heads, site.head_dim)
            gate = gates[:, layer - start].to(weight.device)
            self.aligner_terms[layer].set_rows(rows, keys.view(shape), values.view(shape), gate)


class AlignerLlamaForCausalLM(AlignerServingMixin, LlamaForCausalLM):
    pass


class AlignerMistralForCausalLM(AlignerServingMixin, MistralForCausalLM):
    pass


class AlignerQwen2ForCausalLM(AlignerServingMixin, Qwen2ForCausalLM):
    pass
