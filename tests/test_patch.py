"""Aligner on tiny random Hugging Face LLaMA-family models: patch, train, generate, pad, pack, merge."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers
from attention_cases import DEVICE
from tiny_models import DEFAULTS, llama2_7b_on_meta, randomize_aligner, tiny_model
from torch import nn

import aligner

VOCAB = DEFAULTS["vocab_size"]
# Attention layouts of the families the tests run on (the rest of the shape: tiny_models.DEFAULTS).
CONFIGS = {
    "llama-mha": dict(family="llama", num_key_value_heads=4),
    "llama-gqa-bias": dict(family="llama", attention_bias=True),
    "mistral-mqa": dict(family="mistral", num_key_value_heads=1, sliding_window=None),
    "qwen2-gqa": dict(family="qwen2"),
}


def model_of(kind: str, **fields):
    return tiny_model(**CONFIGS[kind], device=DEVICE, **fields)


def tokens(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("kind", CONFIGS)
def test_zero_gates_leave_logits_unchanged_and_only_aligner_gets_gradients(kind):
    model = model_of(kind)
    ids = tokens(2, 12)
    base_logits = model(ids).logits
    aligner.patch(model, num_tokens=3, start_layer=1)
    assert type(model).__name__.endswith("ForCausalLM") and isinstance(model, transformers.PreTrainedModel)
    torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-5, rtol=1e-5)
    model(ids).logits.square().mean().backward()
    params = aligner.aligner_parameters(model)
    # Zero gates: the prefix gets no gradient yet, the gates do.
    assert all(params[name].grad is not None for name in params)
    assert all(params[name].grad.abs().sum() > 0 for name in params if name.startswith("gate"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"aligner_prefix.tokens"} | {
        f"model.layers.{i}.self_attn.aligner.gate" for i in range(1, 3)
    }
    assert all(p.grad is None for name, p in model.named_parameters() if name not in trainable)


def test_parameter_count_llama2_7b_on_meta_device(capsys):
    model = llama2_7b_on_meta()
    aligner.patch(model, num_tokens=1)
    trainable, total = aligner.print_trainable_parameters(model)
    assert trainable == 5056
    assert total == 5056 + 6_738_415_616
    assert "trainable params: 5,056" in capsys.readouterr().out
    aligner.unpatch(model)
    aligner.patch(model, num_tokens=10)
    assert aligner.trainable_parameters(model)[0] == 41_920


def _rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, positions, theta):
    """Rotate-half RoPE on (L, heads, D) at the given absolute positions."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim)
    angles = positions[:, None].float() * inv_freq[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def eager_aligner_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The spec (DESIGN.md section 1) written out with plain matmuls, one sequence at a time."""
    config, state = model.config, model.aligner_state
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    group, eps = heads // kv_heads, config.rms_norm_eps
    theta = config.rope_parameters["rope_theta"]
    prefix_tokens = model.aligner_prefix.tokens
    outputs = []
    for seq in ids:
        length = seq.shape[0]
        positions = torch.arange(length, device=seq.device)
        h = model.model.embed_tokens.weight[seq]
        for index, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            x = _rms_norm(h, layer.input_layernorm.weight, eps)
            q = _rope(attn.q_proj(x).view(length, heads, head_dim), positions, theta)
            k = _rope(attn.k_proj(x).view(length, kv_heads, head_dim), positions, theta)
            v = attn.v_proj(x).view(length, kv_heads, head_dim)
            causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
            out = torch.empty_like(q)
            for head in range(heads):
                g = head // group
                scores = (q[:, head] @ k[:, g].T) / math.sqrt(head_dim)
                out[:, head] = scores.masked_fill(~causal, -math.inf).softmax(-1) @ v[:, g]
                if index >= state.start_layer:
                    pk = attn.k_proj(prefix_tokens).view(-1, kv_heads, head_dim)[:, g]
                    pv = attn.v_proj(prefix_tokens).view(-1, kv_heads, head_dim)[:, g]
                    prefix_out = ((q[:, head] @ pk.T) / math.sqrt(head_dim)).softmax(-1) @ pv
                    out[:, head] += attn.aligner.gate[head] * prefix_out
            h = h + attn.o_proj(out.reshape(length, -1))
            x = _rms_norm(h, layer.post_attention_layernorm.weight, eps)
            h = h + layer.mlp.down_proj(nn.functional.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x))
        outputs.append(model.lm_head(_rms_norm(h, model.model.norm.weight, eps)))
    return torch.stack(outputs)


@pytest.mark.parametrize("kind", ["llama-mha", "llama-gqa-bias", "qwen2-gqa"])
@pytest.mark.parametrize("num_tokens", [1, 4])
def test_logits_match_an_independent_eager_implementation(kind, num_tokens):
    model = aligner.patch(model_of(kind), num_tokens=num_tokens, start_layer=1)
    randomize_aligner(model)
    ids = tokens(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, eager_aligner_logits(model, ids), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("num_tokens", [1, 10])
def test_cached_generation_equals_full_recompute(num_tokens):
    model = aligner.patch(model_of("llama-gqa-bias"), num_tokens=num_tokens)
    randomize_aligner(model, scale=0.5)
    model.generation_config.eos_token_id = None  # always generate all 8 tokens
    prompt = tokens(2, 5)
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **options)
    uncached = model.generate(prompt, use_cache=False, **options)
    assert torch.equal(cached, uncached)
    # Greedy decoding step by step by hand, each step a full forward without cache.
    ids = prompt
    for _ in range(8):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, ids)


def _sequence_logits_alone(model, sequences):
    return [model(seq[None]).logits[0] for seq in sequences]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_padded_batch_equals_each_sequence_alone(side, num_tokens):
    model = aligner.patch(model_of("llama-gqa-bias"), num_tokens=num_tokens)
    randomize_aligner(model)
    lengths = [9, 4, 6]
    sequences = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span], mask[row, span] = seq, 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # restart at 0 in every sequence, as generate does
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
        for row, expected in enumerate(_sequence_logits_alone(model, sequences)):
            torch.testing.assert_close(logits[row][mask[row].bool()], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 3])
def test_packed_batch_equals_each_sequence_alone(num_tokens):
    """Padding-free batches (position_ids restarting per sequence, as TRL's collators produce), run
    as training runs them: without a KV cache (transformers detects packing only then; with a cache
    the unpatched model mixes the sequences too)."""
    model = aligner.patch(model_of("llama-gqa-bias"), num_tokens=num_tokens)
    randomize_aligner(model)
    sequences = [tokens(1, n, seed=20 + i)[0] for i, n in enumerate([7, 3, 11])]
    ids = torch.cat(sequences)[None]
    position_ids = torch.cat([torch.arange(len(s), device=DEVICE) for s in sequences])[None]
    with torch.no_grad():
        logits = model(ids, position_ids=position_ids, use_cache=False).logits[0]
        # The same batch described by flash-attn kwargs (DataCollatorWithFlattening style).
        cu = torch.tensor([0, 7, 10, 21], dtype=torch.int32, device=DEVICE)
        flash_kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=11, max_length_k=11)
        logits_kwargs = model(ids, position_ids=position_ids, use_cache=False, **flash_kwargs).logits[0]
        expected = torch.cat(_sequence_logits_alone(model, sequences))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_kwargs, expected, atol=1e-5, rtol=1e-5)


def test_merge_and_unmerge_round_trip():
    model = aligner.patch(model_of("llama-mha"), num_tokens=1)
    randomize_aligner(model)
    before = copy.deepcopy(model.state_dict())
    ids = tokens(2, 9)
    with torch.no_grad():
        expected = model(ids).logits
        aligner.merge(model)
        assert all(model.model.layers[i].self_attn.o_proj.bias is not None for i in range(2, 3))
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
        aligner.unmerge(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    with pytest.raises(ValueError, match="only a 1-token Aligner can be merged"):
        aligner.merge(aligner.patch(model_of("llama-mha"), num_tokens=2))


def test_unpatch_restores_the_model_and_disabled_runs_the_base():
    model = model_of("qwen2-gqa")
    original = {name: t.clone() for name, t in model.state_dict().items()}
    ids = tokens(2, 8)
    with torch.no_grad():
        base_logits = model(ids).logits
        aligner.patch(model, num_tokens=2)
        randomize_aligner(model)
        patched_logits = model(ids).logits
        assert not torch.allclose(patched_logits, base_logits)
        with aligner.disabled(model):
            torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
            with aligner.disabled(model):  # nested: the outer block stays disabled after the inner one
                pass
            torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
        torch.testing.assert_close(model(ids).logits, patched_logits, rtol=0, atol=0)
        aligner.unpatch(model)
        torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, "aligner_prefix") and not hasattr(model, "aligner_state")
    state = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in original)
    assert all(p.requires_grad for p in model.parameters())


def test_training_lowers_the_loss_and_changes_only_the_aligner():
    model = aligner.patch(model_of("llama-gqa-bias"), num_tokens=1)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ids = tokens(4, 16)
    losses = []
    model.train()
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    assert any(
        p.abs().sum() > 0 for name, p in aligner.aligner_parameters(model).items() if name.startswith("gate")
    )


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_gradient_checkpointing_gives_the_same_gradients():
    def gradients(checkpointing: bool):
        model = aligner.patch(model_of("llama-gqa-bias"), num_tokens=3)
        randomize_aligner(model)
        model.train()
        if checkpointing:  # (renamed activation_checkpointing_enable in newer transformers)
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        ids = tokens(2, 10)
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in aligner.aligner_parameters(model).items()}

    plain, checkpointed = gradients(False), gradients(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    model32 = aligner.patch(model_of("llama-gqa-bias"), num_tokens=3)
    randomize_aligner(model32, scale=0.3)
    model = copy.deepcopy(model32).to(dtype)
    assert model.aligner_prefix.tokens.dtype == dtype  # .to() casts every parameter, as in PEFT
    ids = tokens(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), model32(ids).logits, atol=0.1, rtol=0.05)


def test_unsupported_models_get_a_clear_error():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    with pytest.raises(ValueError, match="gpt2.*q_proj/k_proj/v_proj/o_proj"):
        aligner.patch(transformers.GPT2LMHeadModel(config))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        aligner.patch(nn.Linear(2, 2))
    model = aligner.patch(model_of("llama-mha"))
    with pytest.raises(ValueError, match="already carries an Aligner"):
        aligner.patch(model)
    with pytest.raises(ValueError, match="start_layer"):
        aligner.patch(model_of("llama-mha"), start_layer=5)


def test_fused_backend_in_the_model_matches_the_reference():
    """The whole model through the Triton kernels (interpreter on CPU): padded batch and generation."""
    ids, mask = tokens(2, 9), torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[0, :3] = 0  # left padding in the first sequence
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    results = {}
    for backend in ("reference", "fused"):
        model = aligner.patch(
            model_of("llama-gqa-bias", num_hidden_layers=2), num_tokens=3, start_layer=1, backend=backend
        )
        randomize_aligner(model)
        model.generation_config.eos_token_id = None
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
        generated = model.generate(
            ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0
        )
        results[backend] = (logits * mask[..., None], generated)
    torch.testing.assert_close(results["fused"][0], results["reference"][0], atol=1e-4, rtol=1e-4)
    assert torch.equal(results["fused"][1], results["reference"][1])
