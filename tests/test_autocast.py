"""Mixed precision as users train: ``torch.autocast`` (what ``Trainer(bf16=True)`` and TRL's configs
do). Under autocast RoPE leaves q in fp32 while v_proj gives bf16; the op casts q, k, v and the
prefix to the autocast dtype as SDPA does, so a patched model trains, and with zero gates equals
the unpatched model under autocast exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import DEFAULTS, randomize_aligner, tiny_model

import aligner

VOCAB = DEFAULTS["vocab_size"]


def ids_and_mask():
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_zero_gates_under_autocast_equal_the_unpatched_model(family, train):
    base = tiny_model(family).requires_grad_(False).train(train)
    model = aligner.patch(copy.deepcopy(base), num_tokens=3, start_layer=0)
    ids, mask = ids_and_mask()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = base(ids, attention_mask=mask).logits
        actual = model(ids, attention_mask=mask).logits
    assert actual.dtype == expected.dtype
    assert torch.equal(actual, expected)


# The Triton interpreter computes bf16 tl.dot wrongly (DESIGN.md section 4): the kernel backends
# run under fp16 autocast on CPU, the reference under bf16.
@pytest.mark.parametrize(
    "backend, dtype",
    [
        ("reference", torch.bfloat16),
        ("reference", torch.float16),
        ("fused", torch.float16),
        ("split", torch.float16),
    ],
)
def test_autocast_training_step(backend, dtype):
    model = aligner.patch(
        tiny_model("llama", num_hidden_layers=2), num_tokens=2, start_layer=0, backend=backend
    )
    randomize_aligner(model, scale=0.5)
    model.train()
    ids, mask = ids_and_mask()
    params = aligner.aligner_parameters(model)
    with torch.autocast("cpu", dtype=dtype):
        loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in params.items()}
    model.zero_grad()
    loss32 = model(ids, attention_mask=mask, labels=ids).loss  # the fp32 step, for scale
    loss32.backward()
    assert torch.isfinite(loss) and abs(loss.item() - loss32.item()) < 0.05
    for name, param in params.items():
        assert torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0, name
        cosine = torch.nn.functional.cosine_similarity(grads[name].flatten(), param.grad.flatten(), dim=0)
        assert cosine > 0.98, (name, cosine)


def test_trainer_bf16_runs_and_trains_only_the_aligner(tmp_path):
    pytest.importorskip("accelerate", reason="needs the train extra")
    from transformers import Trainer, TrainingArguments

    model = aligner.patch(tiny_model("llama", num_hidden_layers=2), num_tokens=1, start_layer=0)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    before = {name: p.detach().clone() for name, p in aligner.aligner_parameters(model).items()}
    ids, _ = ids_and_mask()
    rows = [{"input_ids": row, "labels": row} for row in ids.repeat(4, 1)]
    args = TrainingArguments(
        output_dir=str(tmp_path), bf16=True, use_cpu=True, max_steps=3, per_device_train_batch_size=2,
        learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=rows).train()
    after = aligner.aligner_parameters(model)
    assert all(not torch.equal(before[name], after[name]) for name in before)
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)


def test_after_bf16_training_the_model_runs_in_its_own_precision_again(tmp_path):
    """``train_sft(bf16=True)``: Trainer wraps the model's forward in bf16 autocast; once training
    ends the caller's model computes in fp32 again (under ``aligner.disabled``, exactly the base
    model), instead of silently staying bf16 for every later evaluation and ``generate``."""
    pytest.importorskip("datasets", reason="needs the train extra")
    from tiny_models import save_tiny_model

    from aligner.training import TrainConfig, load_model, train_sft

    model, tokenizer = load_model(str(save_tiny_model(tmp_path / "model")))
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
    examples = [([{"role": "user", "content": "name a color"}], "red")] * 4
    config = TrainConfig(output_dir=str(tmp_path / "out"), max_steps=2, batch_size=2, bf16=True,
                         save_steps=100, progress=False)  # fmt: skip
    train_sft(model, tokenizer, examples, config)
    with torch.no_grad(), aligner.disabled(model):
        assert torch.equal(model(input_ids=ids).logits, base)
