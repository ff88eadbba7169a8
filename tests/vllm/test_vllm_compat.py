"""Pins what aligner.serving.vllm_compat reads from vLLM beyond its documented plugin interfaces
(and the documented ones it relies on): a vLLM release that changes one fails here, by name."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect

import torch
import vllm
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaAttention
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from aligner.serving import vllm as serving
from aligner.serving import vllm_compat


def test_vllm_release_is_one_the_plugin_was_tested_with():
    assert vllm.__version__.startswith(vllm_compat.TESTED_VERSIONS), vllm.__version__


def test_general_plugin_entry_point_is_installed():
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(p.value == "aligner.serving.vllm:register" for p in plugins)


def test_attention_metadata_has_query_start_loc():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    assert "query_start_loc" in {f.name for f in dataclasses.fields(CPUAttentionMetadata)}
    try:
        from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata
    except ImportError:  # a CPU build without the CUDA backends
        return
    assert "query_start_loc" in {f.name for f in dataclasses.fields(FlashAttentionMetadata)}


def test_token_rows_from_query_start_loc():
    from types import SimpleNamespace

    from vllm.forward_context import override_forward_context

    metadata = {"model.layers.0.self_attn.attn": SimpleNamespace(query_start_loc=torch.tensor([0, 3, 4, 9]))}
    context = SimpleNamespace(attn_metadata=metadata)
    with override_forward_context(context):
        rows = vllm_compat.token_rows(11, torch.device("cpu"))
    assert rows.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3]  # the last two: padding, clamped later
    assert vllm_compat.token_rows(4, torch.device("cpu")) is None  # outside a step


def test_llama_attention_calls_attn_with_roped_query_beside_fused_qkv():
    source = inspect.getsource(LlamaAttention.forward)
    assert "self.qkv_proj(hidden_states)" in source
    assert "self.rotary_emb(positions, q, k)" in source
    assert "self.attn(q, k, v)" in source
    for name in ("layer_name", "num_heads", "num_kv_heads", "head_size"):
        assert name in inspect.getsource(Attention.__init__), name


def test_logits_processor_interface():
    assert {"removed", "added", "moved", "batch_size"} <= {f.name for f in dataclasses.fields(BatchUpdate)}
    assert {m.name for m in MoveDirectionality} == {"SWAP", "UNIDIRECTIONAL"}
    assert issubclass(serving.AlignerRequests, LogitsProcessor)
    assert not inspect.isabstract(serving.AlignerRequests)


def test_server_module_takes_the_serve_options():
    import importlib

    source = inspect.getsource(importlib.import_module(vllm_compat.SERVER_MODULE))
    assert "api_server.entry import main" in source
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", "m", "--hf-overrides", "{}", "--logits-processors", "a:B", "--middleware", "x.Y"]
    )
    assert args.model == "m" and args.middleware == ["x.Y"] and args.logits_processors == ["a:B"]
