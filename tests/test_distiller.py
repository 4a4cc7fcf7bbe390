"""distiller.py: loss formulas against explicit math, MLM masking statistics, optimiser groups and schedule,
gradient accumulation, the non-finite check, batch preparation and the files a run writes."""

import copy
import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import assets
from distiller import (
    Distiller,
    mask_tokens,
    optimizer_groups,
    round_batch_for_fp16,
)
from lm_seqs_dataset import LmSeqsDataset
from losses import compute_losses
from utils import NonFiniteLossError

VOCAB = 64
GPT2_SPECIALS = {"bos_token": 0, "eos_token": 0, "unk_token": 0}
BERT_SPECIALS = {"pad_token": 0, "unk_token": 1, "cls_token": 2, "sep_token": 3, "mask_token": 4}
ALL_TERMS = {"ce": 1.0, "mlm": 1.0, "clm": 1.0, "mse": 1.0, "cos": 1.0}


# ---------------------------------------------------------------- helpers


def tiny_model(kind: str, role: str, vocab_size: int = VOCAB, seed: int = 0):
    """A tiny one-layer model (see assets.tiny_model) with this file's vocabulary."""
    return assets.tiny_model(kind, role, vocab_size, seed)


def gpt2_distiller(tmp_path, data, student=None, teacher=None, **overrides) -> Distiller:
    """A single-process CPU Distiller for a tiny GPT-2 pair (CLM), data given as a list of id arrays."""
    settings = dict(special_tok_ids=GPT2_SPECIALS, learning_rate=1e-3, warmup_prop=0.0, log_interval=10**6)
    settings.update(overrides)
    params = assets.distiller_params(tmp_path / "dump", **settings)
    (tmp_path / "dump").mkdir(parents=True, exist_ok=True)  # as train.py makes it; a Distiller writes nothing
    student = student if student is not None else tiny_model("gpt2", "student")
    teacher = teacher if teacher is not None else tiny_model("gpt2", "teacher", seed=1)
    return Distiller(params, LmSeqsDataset(params, data), None, student, teacher)


def gpt2_batch(n: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (n, length), lengths (n,)) of equal-length GPT-2 sequences."""
    seqs = assets.make_sequences(n, length, VOCAB, start_id=0, end_id=0, seed=seed)
    ids = torch.from_numpy(np.stack(seqs).astype(np.int64))
    return ids, torch.full((n,), length, dtype=torch.int64)


def softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(x / temperature) for x in row]
    return [e / sum(exps) for e in exps]


# ---------------------------------------------------------------- losses against explicit math


@pytest.fixture
def loss_inputs():
    generator = torch.Generator().manual_seed(0)
    s_logits = torch.randn(2, 3, 5, generator=generator)
    t_logits = torch.randn(2, 3, 5, generator=generator)
    s_hidden = torch.randn(2, 3, 4, generator=generator)
    t_hidden = torch.randn(2, 3, 4, generator=generator)
    attention_mask = torch.tensor([[True, True, True], [True, True, False]])
    mlm_labels = torch.tensor([[-100, 3, -100], [1, -100, -100]])
    clm_labels = torch.tensor([[4, 2, 1], [0, 3, -100]])
    return s_logits, t_logits, s_hidden, t_hidden, attention_mask, mlm_labels, clm_labels


def reference_kl(s_logits, t_logits, positions, temperature):
    total = 0.0
    for b, i in positions:
        p = softmax(t_logits[b, i].tolist(), temperature)
        q = softmax(s_logits[b, i].tolist(), temperature)
        total += sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q))
    return total / len(positions) * temperature**2


def reference_mse(s_logits, t_logits, positions):
    total = sum((s - t) ** 2 for b, i in positions for s, t in zip(s_logits[b, i].tolist(), t_logits[b, i].tolist()))
    return total / len(positions)


def true_positions(mask: torch.Tensor) -> list[tuple[int, int]]:
    return [tuple(index) for index in mask.nonzero().tolist()]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.5])
def test_ce_is_kl_batchmean_over_real_positions_times_t_squared(loss_inputs, temperature):
    s_logits, t_logits, s_hidden, t_hidden, mask, mlm_labels, _ = loss_inputs
    alphas = dict(ALL_TERMS, clm=0.0)
    losses = compute_losses(s_logits, t_logits, s_hidden, t_hidden, mask, mlm_labels, alphas, temperature)
    expected = reference_kl(s_logits, t_logits, true_positions(mask), temperature)
    assert losses["ce"].item() == pytest.approx(expected, rel=1e-5)


def test_restrict_ce_to_mask_selects_only_mlm_targets(loss_inputs):
    s_logits, t_logits, s_hidden, t_hidden, mask, mlm_labels, _ = loss_inputs
    alphas = dict(ALL_TERMS, clm=0.0)
    losses = compute_losses(s_logits, t_logits, s_hidden, t_hidden, mask, mlm_labels, alphas, 2.0, True)
    targets = true_positions(mlm_labels != -100)
    assert targets == [(0, 1), (1, 0)]
    assert losses["ce"].item() == pytest.approx(reference_kl(s_logits, t_logits, targets, 2.0), rel=1e-5)
    assert losses["mse"].item() == pytest.approx(reference_mse(s_logits, t_logits, targets), rel=1e-5)


def test_mlm_is_cross_entropy_on_targets(loss_inputs):
    s_logits, t_logits, s_hidden, t_hidden, mask, mlm_labels, _ = loss_inputs
    losses = compute_losses(s_logits, t_logits, s_hidden, t_hidden, mask, mlm_labels, dict(ALL_TERMS, clm=0.0), 2.0)
    nll = [-math.log(softmax(s_logits[b, i].tolist())[mlm_labels[b, i]]) for b, i in [(0, 1), (1, 0)]]
    assert losses["mlm"].item() == pytest.approx(sum(nll) / 2, rel=1e-5)


def test_clm_predicts_the_next_token(loss_inputs):
    s_logits, t_logits, s_hidden, t_hidden, mask, _, clm_labels = loss_inputs
    losses = compute_losses(s_logits, t_logits, s_hidden, t_hidden, mask, clm_labels, dict(ALL_TERMS, mlm=0.0), 2.0)
    # Position i predicts label i + 1; the last real position of sequence 1 has padding after it.
    pairs = [(0, 0, 2), (0, 1, 1), (1, 0, 3)]
    nll = [-math.log(softmax(s_logits[b, i].tolist())[label]) for b, i, label in pairs]
    assert losses["clm"].item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)


def test_mse_is_summed_over_selected_rows_divided_by_their_number(loss_inputs):
    s_logits, t_logits, s_hidden, t_hidden, mask, mlm_labels, _ = loss_inputs
    losses = compute_losses(s_logits, t_logits, s_hidden, t_hidden, mask, mlm_labels, dict(ALL_TERMS, clm=0.0), 2.0)
    assert losses["mse"].item() == pytest.approx(reference_mse(s_logits, t_logits, true_positions(mask)), rel=1e-5)


def test_cos_is_mean_of_one_minus_cosine_over_real_positions(loss_inputs):
    s_logits, t_logits, s_hidden, t_hidden, mask, mlm_labels, _ = loss_inputs
    losses = compute_losses(s_logits, t_logits, s_hidden, t_hidden, mask, mlm_labels, dict(ALL_TERMS, clm=0.0), 2.0)
    terms = []
    for b, i in true_positions(mask):
        s, t = s_hidden[b, i].tolist(), t_hidden[b, i].tolist()
        dot = sum(x * y for x, y in zip(s, t))
        terms.append(1 - dot / (math.sqrt(sum(x * x for x in s)) * math.sqrt(sum(y * y for y in t))))
    assert losses["cos"].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_only_terms_with_positive_weight_are_computed(loss_inputs):
    s_logits, t_logits, _, _, mask, _, clm_labels = loss_inputs
    alphas = {"ce": 0.5, "mlm": 0.0, "clm": 0.5, "mse": 0.0, "cos": 0.0}
    losses = compute_losses(s_logits, t_logits, None, None, mask, clm_labels, alphas, 2.0)
    assert list(losses) == ["ce", "clm"]
    assert all(value.dtype == torch.float32 and value.dim() == 0 for value in losses.values())


class _BoolNumels(TorchDispatchMode):
    """Records the size of every boolean tensor an operation produces."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numels += [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dtype == torch.bool]
        return out


@pytest.mark.parametrize("restrict", [False, True])
def test_losses_never_build_a_batch_by_length_by_vocab_mask(loss_inputs, restrict):
    s_logits, t_logits, s_hidden, t_hidden, mask, mlm_labels, _ = loss_inputs
    alphas = dict(ALL_TERMS, clm=0.0)
    with _BoolNumels() as recorder:
        compute_losses(s_logits, t_logits, s_hidden, t_hidden, mask, mlm_labels, alphas, 2.0, restrict)
    assert recorder.numels, "the recorder saw no boolean tensor at all"
    assert max(recorder.numels) < s_logits.numel()


# ---------------------------------------------------------------- MLM masking


def synthetic_mlm_batch(bs: int, seq_len: int, vocab_size: int, seed: int):
    """(ids, attention_mask): [CLS] Zipf-distributed ids [SEP] then padding, random lengths."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(12, seq_len + 1, size=bs)
    body_ids = np.arange(5, vocab_size)
    zipf = 1.0 / np.arange(1, len(body_ids) + 1)
    ids = np.full((bs, seq_len), BERT_SPECIALS["pad_token"])
    for row, length in enumerate(lengths):
        ids[row, 1 : length - 1] = rng.choice(body_ids, size=length - 2, p=zipf / zipf.sum())
        ids[row, 0], ids[row, length - 1] = BERT_SPECIALS["cls_token"], BERT_SPECIALS["sep_token"]
    mask = torch.arange(seq_len)[None, :] < torch.from_numpy(lengths)[:, None]
    return torch.from_numpy(ids), mask


def smoothed_probs(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    counts = torch.bincount(ids[mask], minlength=vocab_size).double()
    probs = counts.clamp(min=1) ** -0.7
    probs[list(BERT_SPECIALS.values())] = 0.0
    return probs.float()


def test_mask_tokens_targets_and_80_10_10_split():
    vocab_size = 1000
    ids, mask = synthetic_mlm_batch(64, 128, vocab_size, seed=0)
    token_probs = smoothed_probs(ids, mask, vocab_size)
    pred_probs = torch.tensor([0.8, 0.1, 0.1])
    generator = torch.Generator().manual_seed(0)
    special = torch.isin(ids, torch.tensor(list(BERT_SPECIALS.values())))
    actions = torch.zeros(3)
    for _ in range(20):
        input_ids, labels = mask_tokens(ids, mask, token_probs, 0.15, pred_probs, 4, vocab_size, generator)
        targets = labels != -100
        assert targets.sum().item() == math.ceil(0.15 * mask.sum().item())
        assert not (targets & ~mask).any(), "padding became a target"
        assert not (targets & special).any(), "a special token became a target"
        assert torch.equal(labels[targets], ids[targets])
        assert torch.equal(input_ids[~targets], ids[~targets])
        masked = input_ids[targets] == 4
        kept = ~masked & (input_ids[targets] == ids[targets])
        actions += torch.tensor([masked.sum(), kept.sum(), (~masked & ~kept).sum()])
    fractions = actions / actions.sum()
    # ~13,000 targets: 4 standard deviations of a 0.1 fraction is ~0.011.
    assert fractions.tolist() == pytest.approx([0.8, 0.1, 0.1], abs=0.015)


def test_mask_tokens_prefers_rare_tokens_as_count_to_the_minus_smoothing():
    # Five body ids with frequencies 1 : 2 : 4 : 8 : 16; a small mask proportion keeps the draw
    # without replacement close to proportional, so rate(id) ~ count(id) ** -0.7.
    rng = np.random.default_rng(0)
    body = rng.choice(np.arange(5, 10), size=(32, 98), p=np.array([1, 2, 4, 8, 16]) / 31)
    ids = torch.from_numpy(np.concatenate([np.full((32, 1), 2), body, np.full((32, 1), 3)], axis=1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    token_probs = smoothed_probs(ids, mask, 10)
    generator = torch.Generator().manual_seed(0)
    chosen = torch.zeros(10)
    for _ in range(300):
        _, labels = mask_tokens(ids, mask, token_probs, 0.02, torch.tensor([0.8, 0.1, 0.1]), 4, 10, generator)
        chosen += torch.bincount(labels[labels != -100], minlength=10)
    counts = torch.bincount(ids.flatten(), minlength=10)[5:].double()
    rates = chosen[5:].double() / (counts * 300)
    slope = np.polyfit(np.log(counts.numpy()), np.log(rates.numpy()), 1)[0]
    assert slope == pytest.approx(-0.7, abs=0.07)
    assert chosen[:5].sum() == 0


def test_round_batch_for_fp16():
    ids, lengths = torch.arange(13 * 13).view(13, 13), torch.arange(13)
    rounded_ids, rounded_lengths = round_batch_for_fp16(ids, lengths, pad_id=-1)
    assert rounded_ids.shape == (8, 16)
    assert (rounded_ids[:, 13:] == -1).all()
    assert torch.equal(rounded_ids[:, :13], ids[rounded_lengths])  # rows kept whole, with their lengths
    small_ids, small_lengths = round_batch_for_fp16(ids[:5, :8], lengths[:5], pad_id=-1)
    assert torch.equal(small_ids, ids[:5, :8]) and torch.equal(small_lengths, lengths[:5])


# ---------------------------------------------------------------- optimiser and schedule


def _names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_no_decay_on_biases_and_every_norm_weight_and_frozen_excluded():
    student = tiny_model("distilbert", "student")
    student.distilbert.embeddings.position_embeddings.weight.requires_grad_(False)
    decay, no_decay = optimizer_groups(student, weight_decay=0.01)
    decay_names, no_decay_names = _names(student, decay["params"]), _names(student, no_decay["params"])
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    for norm in ("embeddings.LayerNorm", "sa_layer_norm", "output_layer_norm", "vocab_layer_norm"):
        assert any(norm + ".weight" in name for name in no_decay_names), norm
    assert all(name.endswith("bias") or "norm" in name.lower() for name in no_decay_names)
    assert all(name.endswith("weight") and "norm" not in name.lower() for name in decay_names)
    assert "distilbert.embeddings.word_embeddings.weight" in decay_names
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert decay_names | no_decay_names == trainable
    assert "distilbert.embeddings.position_embeddings.weight" not in trainable


def test_gpt2_ln_weights_are_not_decayed():
    student = tiny_model("gpt2", "student")
    _, no_decay = optimizer_groups(student, weight_decay=0.1)
    names = _names(student, no_decay["params"])
    assert {"transformer.h.0.ln_1.weight", "transformer.h.0.ln_2.weight", "transformer.ln_f.weight"} <= names


def test_adamw_settings_and_warmup_schedule(tmp_path):
    data = assets.make_sequences(10, 16, VOCAB, 0, 0)
    distiller = gpt2_distiller(
        tmp_path, data, batch_size=2, gradient_accumulation_steps=2, n_epoch=3, warmup_prop=0.3,
        adam_epsilon=1e-7, learning_rate=1e-3, group_by_size=False,
    )
    assert isinstance(distiller.optimizer, torch.optim.AdamW)
    assert distiller.optimizer.defaults["betas"] == (0.9, 0.98)
    assert distiller.optimizer.defaults["eps"] == 1e-7
    assert len(distiller.dataloader) == 5
    assert distiller.num_train_optimization_steps == int(5 / 2 * 3) + 1 == 8
    assert distiller.num_warmup_steps == math.ceil(0.3 * 8) == 3
    lr_lambda = distiller.scheduler.lr_lambdas[0]
    expected = [s / 3 if s < 3 else (8 - s) / (8 - 3) for s in range(9)]
    assert [lr_lambda(s) for s in range(9)] == pytest.approx(expected)


# ---------------------------------------------------------------- steps


def test_distiller_trains_the_student_it_was_given(tmp_path):
    student = tiny_model("gpt2", "student")
    distiller = gpt2_distiller(tmp_path, assets.make_sequences(4, 16, VOCAB, 0, 0), student=student)
    assert distiller.student is student and distiller.raw_student is student


def test_accumulated_micro_batches_equal_one_large_batch(tmp_path):
    student = tiny_model("gpt2", "student")
    ids, lengths = gpt2_batch(4, 16)
    data = assets.make_sequences(4, 16, VOCAB, 0, 0)
    # No clipping: the two updates must agree on the gradients themselves, not only on their direction.
    settings = dict(alpha_ce=1.0, alpha_clm=1.0, alpha_mse=0.5, alpha_cos=1.0, max_grad_norm=1e6)
    accumulated = gpt2_distiller(
        tmp_path / "a", data, student=copy.deepcopy(student), gradient_accumulation_steps=2, **settings
    )
    single = gpt2_distiller(
        tmp_path / "b", data, student=copy.deepcopy(student), gradient_accumulation_steps=1, **settings
    )

    for half in (slice(0, 2), slice(2, 4)):
        input_ids, mask, labels = accumulated.prepare_batch_clm((ids[half], lengths[half]))
        accumulated.step(input_ids=input_ids, attention_mask=mask, lm_labels=labels)
    input_ids, mask, labels = single.prepare_batch_clm((ids, lengths))
    single.step(input_ids=input_ids, attention_mask=mask, lm_labels=labels)

    assert (accumulated.n_total_iter, accumulated.n_optimizer_steps) == (2, 1)
    assert (single.n_total_iter, single.n_optimizer_steps) == (1, 1)
    changed = False
    for (name, p_acc), p_single, p_start in zip(
        accumulated.raw_student.named_parameters(), single.raw_student.parameters(), student.parameters()
    ):
        torch.testing.assert_close(p_acc.grad, p_single.grad, rtol=1e-5, atol=1e-7, msg=name)
        # Adam's first step moves each weight by about lr * sign(grad): where a gradient is rounding noise
        # (|g| near 1e-7) the two sums may differ in sign, so the weights are compared where the sign is certain.
        certain = p_single.grad.abs() > 1e-5
        torch.testing.assert_close(p_acc[certain], p_single[certain], rtol=1e-5, atol=1e-7, msg=name)
        changed |= not torch.equal(p_acc, p_start)
    assert changed, "the optimizer step did not move any weight"


def test_step_counts_and_loss_attributes(tmp_path):
    distiller = gpt2_distiller(
        tmp_path, assets.make_sequences(10, 16, VOCAB, 0, 0), gradient_accumulation_steps=2,
        alpha_ce=2.0, alpha_clm=0.5, alpha_cos=1.0,
    )
    ids, lengths = gpt2_batch(2, 16)
    for _ in range(5):
        input_ids, mask, labels = distiller.prepare_batch_clm((ids, lengths))
        distiller.step(input_ids=input_ids, attention_mask=mask, lm_labels=labels)
    assert (distiller.n_total_iter, distiller.n_optimizer_steps) == (5, 2)
    for name in ("last_loss", "last_loss_ce", "last_loss_clm", "last_loss_cos"):
        value = getattr(distiller, name)
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, name
    total = 2.0 * distiller.last_loss_ce + 0.5 * distiller.last_loss_clm + 1.0 * distiller.last_loss_cos
    torch.testing.assert_close(distiller.last_loss, total)
    assert set(distiller.last_losses) == {"ce", "clm", "cos"}


def _poison(model) -> None:
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))


def test_nan_raises_before_the_optimizer_step(tmp_path):
    teacher = tiny_model("gpt2", "teacher", seed=1)
    data = assets.make_sequences(4, 16, VOCAB, 0, 0)
    distiller = gpt2_distiller(tmp_path, data, teacher=teacher, gradient_accumulation_steps=1)
    before = copy.deepcopy(distiller.raw_student.state_dict())
    _poison(teacher)
    input_ids, mask, labels = distiller.prepare_batch_clm(gpt2_batch(2, 16))
    with pytest.raises(NonFiniteLossError) as error:
        distiller.step(input_ids=input_ids, attention_mask=mask, lm_labels=labels)
    assert (error.value.step, error.value.term) == (1, "loss_ce")
    assert "loss_ce" in str(error.value) and "iteration 1" in str(error.value)
    assert distiller.n_optimizer_steps == 0
    for name, value in distiller.raw_student.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_nan_in_an_earlier_micro_batch_is_caught_at_the_boundary(tmp_path):
    teacher = tiny_model("gpt2", "teacher", seed=1)
    good_teacher_state = copy.deepcopy(teacher.state_dict())
    data = assets.make_sequences(4, 16, VOCAB, 0, 0)
    distiller = gpt2_distiller(tmp_path, data, teacher=teacher, gradient_accumulation_steps=2)
    before = copy.deepcopy(distiller.raw_student.state_dict())
    input_ids, mask, labels = distiller.prepare_batch_clm(gpt2_batch(2, 16))
    _poison(teacher)
    distiller.step(input_ids=input_ids, attention_mask=mask, lm_labels=labels)  # no boundary: no check yet
    teacher.load_state_dict(good_teacher_state)
    with pytest.raises(NonFiniteLossError) as error:
        distiller.step(input_ids=input_ids, attention_mask=mask, lm_labels=labels)
    assert error.value.step == 2
    for name, value in distiller.raw_student.state_dict().items():
        assert torch.equal(value, before[name]), name


def _infinite_gradient(model) -> None:
    """Make the first parameter's gradient infinite in every backward pass; the loss stays finite."""
    next(model.parameters()).register_hook(lambda grad: torch.full_like(grad, float("inf")))


def test_a_non_finite_gradient_norm_raises_before_the_optimizer_step(tmp_path):
    data = assets.make_sequences(4, 16, VOCAB, 0, 0)
    distiller = gpt2_distiller(tmp_path, data, gradient_accumulation_steps=1)
    before = copy.deepcopy(distiller.raw_student.state_dict())
    _infinite_gradient(distiller.raw_student)
    input_ids, mask, labels = distiller.prepare_batch_clm(gpt2_batch(2, 16))
    with pytest.raises(NonFiniteLossError) as error:
        distiller.step(input_ids=input_ids, attention_mask=mask, lm_labels=labels)
    assert error.value.term == "gradient norm" and torch.isfinite(distiller.last_loss)
    assert distiller.n_optimizer_steps == 0
    for name, value in distiller.raw_student.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_with_fp16_a_non_finite_gradient_norm_is_the_scalers_skipped_step(tmp_path):
    data = assets.make_sequences(4, 16, VOCAB, 0, 0)
    distiller = gpt2_distiller(tmp_path, data, gradient_accumulation_steps=1, fp16=True)
    before = copy.deepcopy(distiller.raw_student.state_dict())
    scale = distiller.scaler.get_scale()
    _infinite_gradient(distiller.raw_student)
    input_ids, mask, labels = distiller.prepare_batch_clm(gpt2_batch(8, 16))
    distiller.step(input_ids=input_ids, attention_mask=mask, lm_labels=labels)
    assert distiller.scaler.get_scale() < scale  # skipped, scale lowered
    for name, value in distiller.raw_student.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_non_finite_weights_after_a_step_stop_every_save(tmp_path):
    data = assets.make_sequences(4, 16, VOCAB, 0, 0)
    distiller = gpt2_distiller(tmp_path, data, gradient_accumulation_steps=1)
    original_step = distiller.optimizer.step

    def overflowing_step(*args, **kwargs):
        original_step(*args, **kwargs)
        with torch.no_grad():
            next(distiller.raw_student.parameters())[0].fill_(float("inf"))

    distiller.optimizer.step = overflowing_step
    input_ids, mask, labels = distiller.prepare_batch_clm(gpt2_batch(2, 16))
    distiller.step(input_ids=input_ids, attention_mask=mask, lm_labels=labels)
    for save in (distiller.save_checkpoint, distiller.save_training_state, distiller.save_pretrained):
        with pytest.raises(NonFiniteLossError, match="weights is not finite at iteration 1; after the optimizer step"):
            save()
    assert list((tmp_path / "dump").iterdir()) == []
    with pytest.raises(NonFiniteLossError, match="weights"):  # and at the next optimizer step
        distiller.step(input_ids=input_ids, attention_mask=mask, lm_labels=labels)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_step_runs_on_cpu(tmp_path, precision):
    distiller = gpt2_distiller(tmp_path, assets.make_sequences(4, 16, VOCAB, 0, 0), gradient_accumulation_steps=1,
                               **{precision: True})
    input_ids, mask, labels = distiller.prepare_batch_clm(gpt2_batch(8, 16))
    distiller.step(input_ids=input_ids, attention_mask=mask, lm_labels=labels)
    assert torch.isfinite(distiller.last_loss) and distiller.n_optimizer_steps == 1
    assert distiller.scaler.is_enabled() == (precision == "fp16")  # bf16 needs no loss scaling
    assert all(p.dtype == torch.float32 for p in distiller.raw_student.parameters())  # fp32 master weights


# ---------------------------------------------------------------- batch preparation


def test_prepare_batch_clm_masks_padding(tmp_path):
    distiller = gpt2_distiller(tmp_path, assets.make_sequences(4, 16, VOCAB, 0, 0))
    ids = torch.tensor([[0, 7, 8, 9, 0], [0, 5, 0, 0, 0]])
    input_ids, mask, labels = distiller.prepare_batch_clm((ids, torch.tensor([5, 3])))
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[True] * 5, [True, True, True, False, False]]
    assert torch.equal(input_ids, ids)
    assert labels.tolist() == [[0, 7, 8, 9, 0], [0, 5, 0, -100, -100]]


def test_prepare_batch_clm_rounds_for_fp16(tmp_path):
    distiller = gpt2_distiller(tmp_path, assets.make_sequences(4, 16, VOCAB, 0, 0), fp16=True)
    ids, lengths = gpt2_batch(11, 13)
    input_ids, mask, labels = distiller.prepare_batch_clm((ids, lengths))
    assert input_ids.shape == mask.shape == labels.shape == (8, 16)
    assert (input_ids[:, 13:] == GPT2_SPECIALS["unk_token"]).all() and not mask[:, 13:].any()


def test_prepare_batch_mlm(tmp_path):
    params = assets.distiller_params(
        tmp_path / "dump", student_type="distilbert", teacher_type="bert", mlm=True, alpha_mlm=1.0,
        alpha_clm=0.0, special_tok_ids=BERT_SPECIALS,
    )
    ids, mask = synthetic_mlm_batch(8, 40, VOCAB, seed=1)
    data = [row[: int(n)].numpy().astype(np.uint16) for row, n in zip(ids, mask.sum(1))]
    token_probs = smoothed_probs(ids, mask, VOCAB)
    student, teacher = tiny_model("distilbert", "student"), tiny_model("bert", "teacher")
    distiller = Distiller(params, LmSeqsDataset(params, data), token_probs, student, teacher)
    input_ids, attention_mask, labels = distiller.prepare_batch_mlm((ids, mask.sum(1)))
    assert attention_mask.dtype == torch.bool and torch.equal(attention_mask, mask)
    targets = labels != -100
    assert targets.sum() == math.ceil(0.15 * mask.sum().item())
    assert not (targets & ~mask).any()
    assert torch.equal(input_ids[~targets], ids[~targets])
    distiller.step(input_ids=input_ids, attention_mask=attention_mask, lm_labels=labels)
    assert set(distiller.last_losses) == {"ce", "mlm"}


# ---------------------------------------------------------------- a whole in-process run


def test_train_writes_checkpoints_and_leaves_params_alone(tmp_path):
    data = assets.make_sequences(12, 16, VOCAB, 0, 0)
    distiller = gpt2_distiller(
        tmp_path, data, batch_size=2, gradient_accumulation_steps=2, n_epoch=2, checkpoint_interval=4, log_interval=3
    )
    distiller.train()
    distiller.close()
    dump = tmp_path / "dump"
    names = {path.name for path in dump.iterdir()}
    assert {"checkpoint.pth", "model_epoch_0.pth", "model_epoch_1.pth", "pytorch_model.bin", "config.json",
            "model.safetensors", "log"} <= names
    assert not any(name.endswith(".tmp") or name.startswith(".") for name in names)
    assert distiller.n_total_iter == 12 and distiller.n_optimizer_steps == 6
    state = torch.load(dump / "pytorch_model.bin", weights_only=True)
    for name, value in distiller.raw_student.state_dict().items():
        assert torch.equal(state[name], value), name


def test_distiller_never_writes_to_params(tmp_path):
    data = assets.make_sequences(6, 16, VOCAB, 0, 0)
    params = assets.distiller_params(tmp_path / "dump", special_tok_ids=GPT2_SPECIALS, n_epoch=1, batch_size=2,
                                     gradient_accumulation_steps=1, log_interval=1, checkpoint_interval=2)
    snapshot = copy.deepcopy(vars(params))
    distiller = Distiller(params, LmSeqsDataset(params, data), None, tiny_model("gpt2", "student"),
                          tiny_model("gpt2", "teacher", seed=1))
    distiller.train()
    distiller.close()
    assert vars(params) == snapshot


def test_non_master_writes_nothing(tmp_path):
    distiller = gpt2_distiller(tmp_path, assets.make_sequences(6, 16, VOCAB, 0, 0), is_master=False, n_epoch=1,
                               batch_size=2, gradient_accumulation_steps=1, log_interval=1, checkpoint_interval=1)
    distiller.train()
    distiller.close()
    dump = tmp_path / "dump"
    assert not dump.exists() or not any(dump.iterdir())


def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    distiller = gpt2_distiller(tmp_path, assets.make_sequences(4, 16, VOCAB, 0, 0))
    distiller.save_checkpoint("checkpoint.pth")
    good = (tmp_path / "dump" / "checkpoint.pth").read_bytes()

    def crash_midway(obj, path):
        open(path, "wb").write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        distiller.save_checkpoint("checkpoint.pth")
    assert (tmp_path / "dump" / "checkpoint.pth").read_bytes() == good
    assert not [p for p in (tmp_path / "dump").iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- no-teacher baseline and evaluation


class _Tripwire(torch.nn.Module):
    """A teacher that fails the test if it is ever run."""

    def forward(self, *args, **kwargs):
        raise AssertionError("the teacher was called although no loss term needs it")


@pytest.mark.parametrize("teacher", [_Tripwire(), None], ids=["tripwire", "none"])
def test_without_teacher_terms_the_teacher_is_never_run(tmp_path, teacher):
    data = assets.make_sequences(8, 16, VOCAB, 0, 0)
    student = tiny_model("gpt2", "student")
    params = assets.distiller_params(
        tmp_path / "dump", special_tok_ids=GPT2_SPECIALS, alpha_ce=0.0, alpha_clm=1.0, n_epoch=2, batch_size=4,
        gradient_accumulation_steps=1, learning_rate=1e-2, warmup_prop=0.0, log_interval=10**6,
    )
    before = {name: value.clone() for name, value in student.state_dict().items()}
    distiller = Distiller(params, LmSeqsDataset(params, data), None, student, teacher)
    assert distiller.teacher is None
    distiller.train()
    distiller.close()
    assert distiller.n_optimizer_steps == 4
    assert set(distiller.last_losses) == {"clm"}
    assert any(not torch.equal(before[name], value) for name, value in student.state_dict().items())


def test_teacher_terms_without_a_teacher_are_refused(tmp_path):
    params = assets.distiller_params(tmp_path / "dump", special_tok_ids=GPT2_SPECIALS, alpha_ce=1.0)
    dataset = LmSeqsDataset(params, assets.make_sequences(4, 16, VOCAB, 0, 0))
    with pytest.raises(ValueError, match="need a teacher"):
        Distiller(params, dataset, None, tiny_model("gpt2", "student"), None)


def test_evaluator_runs_at_its_interval_and_each_epoch_end_on_the_master(tmp_path):
    calls = []

    def evaluator(model):
        calls.append(model.training)
        return {"accuracy": 0.25, "loss": 1.5}

    data = assets.make_sequences(8, 16, VOCAB, 0, 0)
    params = assets.distiller_params(
        tmp_path / "dump", special_tok_ids=GPT2_SPECIALS, n_epoch=2, batch_size=2, gradient_accumulation_steps=1,
        eval_interval=3, log_interval=10**6,
    )
    (tmp_path / "dump").mkdir()
    distiller = Distiller(params, LmSeqsDataset(params, data), None, tiny_model("gpt2", "student"),
                          tiny_model("gpt2", "teacher", seed=1), evaluator)
    distiller.train()
    distiller.close()
    # 8 iterations: at iterations 3 and 6, and at the end of both epochs (4 and 8).
    assert len(calls) == 4
    events = EventAccumulator(str(tmp_path / "dump" / "log" / "train"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/accuracy")] == [3, 4, 6, 8]
    assert {e.value for e in events.Scalars("eval/loss")} == {1.5}


# ---------------------------------------------------------------- narrower students


def test_a_narrower_student_trains_a_hidden_projection_that_is_never_exported(tmp_path):
    student = assets.tiny_model("gpt2", "student", VOCAB, seed=0, hidden=8)  # the teacher is 16 wide
    distiller = gpt2_distiller(tmp_path, assets.make_sequences(8, 16, VOCAB, 0, 0), student=student, alpha_cos=1.0,
                               batch_size=4, gradient_accumulation_steps=1, n_epoch=1, checkpoint_interval=10**6)
    projection = distiller.distillation.hidden_projection
    assert projection.weight.shape == (16, 8)
    assert any(p is projection.weight for group in distiller.optimizer.param_groups for p in group["params"])
    initial = projection.weight.detach().clone()
    distiller.train()
    distiller.close()
    assert projection.weight.grad.abs().min() > 0
    assert not torch.equal(projection.weight, initial)
    dump = tmp_path / "dump"
    assert torch.load(dump / "pytorch_model.bin", weights_only=True).keys() == student.state_dict().keys()
    state = torch.load(dump / "training_state.pth", weights_only=True)
    assert torch.equal(state["loss"]["hidden_projection.weight"], projection.weight)
