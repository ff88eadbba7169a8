"""TRL's trainers on a patched model, with their default configs (bf16 autocast, gradient
checkpointing in DPO), on CPU: SFTTrainer padded and padding-free, DPOTrainer with TRL's own
reference copy (``ref_model=None``) and with :func:`aligner.disabled_model` (no copy). Each trains
the Aligner only; the reference log-probs are the base model's, bit for bit."""

from __future__ import annotations

import pytest
import torch
from tiny_models import randomize_aligner, save_tiny_model
from torch import nn

import aligner
from aligner.hf_patch import get_state

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

STEPS = 3
QUESTIONS = [
    ("what is the capital of france", " paris", " red"),
    ("how many legs does a spider have", " eight", " no"),
    ("what color is the cat", " blue", " yes"),
    ("do bees make honey", " yes", " bad"),
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may reach the Hub (TRL's reference copy is reloaded from the local base_dir)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("trl") / "base")


def patched(base_dir, **config):
    model = AutoModelForCausalLM.from_pretrained(base_dir, **config)
    aligner.patch(model, num_tokens=2, start_layer=1)
    return randomize_aligner(model, scale=0.5)  # non-zero gates: the Aligner changes every step


def state(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def changed(model, before) -> set[str]:
    return {name for name, value in model.state_dict().items() if not torch.equal(before[name], value)}


def aligner_names(model) -> set[str]:
    ids = {id(p) for p in aligner.aligner_parameters(model).values()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def config_args(tmp_path, name):
    """What a CPU test must set; everything else is TRL's default (bf16=True among them)."""
    return dict(
        output_dir=str(tmp_path / name), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
    )  # fmt: skip


def losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def sft(base_dir, tmp_path, padding_free):
    model = patched(base_dir)
    before = state(model)
    rows = [{"prompt": q, "completion": a} for q, a, _ in QUESTIONS] * 2
    args = trl.SFTConfig(
        **config_args(tmp_path, f"sft-{padding_free}"),
        padding_free=padding_free,
        max_length=None if padding_free else 1024,  # padding-free without packing takes no max_length
    )
    assert args.bf16
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(base_dir),
    )  # fmt: skip
    trainer.train()
    assert changed(model, before) == aligner_names(model)
    return losses(trainer)


def test_sft_trains_only_the_aligner_padded_and_padding_free(base_dir, tmp_path):
    padded = sft(base_dir, tmp_path, padding_free=False)
    # One packed row (position_ids restarting per sequence, flash kwargs cu_seq_lens_*) and the
    # right-padded batch train the same Aligner: the prefix term ignores the sequence boundaries,
    # the main attention gets the packed mask transformers builds.
    packed = sft(base_dir, tmp_path, padding_free=True)
    assert len(padded) == len(packed) == STEPS
    assert packed == pytest.approx(padded, rel=1e-4)


def dpo_trainer(base_dir, tmp_path, name, reference):
    model = patched(base_dir)
    rows = [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in QUESTIONS] * 2
    args = trl.DPOConfig(**config_args(tmp_path, name))
    assert args.bf16 and args.gradient_checkpointing
    trainer = trl.DPOTrainer(
        model=model, ref_model=reference(model), args=args, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(base_dir),
    )  # fmt: skip
    return model, trainer


def reference_logps(trainer, model, batch) -> torch.Tensor:
    return torch.cat(trainer.compute_ref_log_probs(model, batch))


def test_dpo_reference_is_the_base_model_with_or_without_a_copy(base_dir, tmp_path):
    unpatched = AutoModelForCausalLM.from_pretrained(base_dir)
    add_fused_lm_head(unpatched)  # TRL's log-prob head, as on its reference models
    runs = {}
    for name, reference in [("copy", lambda model: None), ("view", aligner.disabled_model)]:
        model, trainer = dpo_trainer(base_dir, tmp_path, name, reference)
        ref = trainer.ref_model
        if name == "copy":  # TRL reloaded the base with attn_implementation="aligner_sdpa"
            assert type(ref) is type(model) and not hasattr(ref, "aligner_state")
            assert ref.config._attn_implementation == "aligner_sdpa"
        else:  # no second copy: every tensor of the reference is the policy's
            assert isinstance(ref, aligner.DisabledModel) and not list(ref.parameters())
            policy = {t.data_ptr() for t in model.state_dict().values()}
            assert {t.data_ptr() for t in ref.state_dict().values()} <= policy
        batch = next(iter(trainer.get_train_dataloader()))
        expected = reference_logps(trainer, unpatched, batch)
        assert torch.equal(reference_logps(trainer, ref, batch), expected)
        assert not torch.allclose(reference_logps(trainer, trainer.model, batch), expected)
        before = state(model)
        trainer.train()
        assert changed(model, before) == aligner_names(model)
        runs[name] = losses(trainer), {k: v.clone() for k, v in aligner.aligner_parameters(model).items()}
        assert torch.equal(reference_logps(trainer, ref, batch), expected)  # still the base after training
    (copy_losses, copy_params), (view_losses, view_params) = runs["copy"], runs["view"]
    assert len(copy_losses) == STEPS and copy_losses == view_losses
    assert all(torch.equal(copy_params[k], view_params[k]) for k in copy_params)


# --------------------------------------------------------------------------------------------
# aligner.disabled_model without TRL


@pytest.fixture
def dropout_pair(base_dir):
    """(unpatched base in eval mode, patched policy in training mode), attention dropout 0.5."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, attention_dropout=0.5).eval()
    return base, patched(base_dir, attention_dropout=0.5).train()


def ids():
    return torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(3))


def test_disabled_model_runs_the_base_in_eval_mode_and_restores_everything(dropout_pair):
    base, policy = dropout_pair
    ref = aligner.disabled_model(policy)
    modes = {name: m.training for name, m in policy.named_modules()}
    with torch.no_grad():
        expected = base(ids()).logits
        assert torch.equal(ref(ids()).logits, expected)
        assert torch.equal(ref.base_model(ids()).last_hidden_state, base.model(ids()).last_hidden_state)
        assert {name: m.training for name, m in policy.named_modules()} == modes  # training again
        policy.eval()
        assert not torch.allclose(policy(ids()).logits, expected)  # the Aligner is back
        with aligner.disabled(policy):  # nested in aligner.disabled: still the base, still disabled after
            assert torch.equal(ref(ids()).logits, expected)
            assert not get_state(policy).enabled
        assert get_state(policy).enabled
    prompt = ids()[:1]
    generated = ref.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, base.generate(prompt, max_new_tokens=4, do_sample=False))


def test_disabled_model_restores_the_aligner_after_an_error(base_dir):
    policy = patched(base_dir).train()
    ref = aligner.disabled_model(policy)
    with pytest.raises((IndexError, RuntimeError)):
        ref(torch.full((1, 3), 10_000))  # out of the vocabulary
    assert get_state(policy).enabled
    assert all(m.training for m in policy.modules())


def test_disabled_model_owns_no_weights(base_dir):
    policy = patched(base_dir)
    ref = aligner.disabled_model(policy)
    assert list(ref.parameters()) == [] and ref.config is policy.config
    assert ref.get_output_embeddings() is policy.get_output_embeddings()
    policy.train()
    ref.eval()  # the reference's own flag only: the policy keeps training
    assert policy.training and not ref.training
    # TRL's sync_ref_model would blend the policy into the reference, i.e. into the shared weights:
    # it fails before touching any.
    from trl.trainer.callbacks import SyncRefModelCallback

    before = state(policy)
    with pytest.raises(ValueError, match="zip"):
        SyncRefModelCallback._sync_target_model(policy, ref, 0.6)
    assert not changed(policy, before)


def test_disabled_model_refuses_a_merged_aligner(base_dir):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    aligner.merge(aligner.patch(model, num_tokens=1))
    with pytest.raises(ValueError, match="unmerge"):
        aligner.disabled_model(model)
    with pytest.raises(ValueError, match="carries no Aligner"):
        aligner.disabled_model(nn.Linear(2, 2))
