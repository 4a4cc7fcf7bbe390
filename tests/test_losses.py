"""losses.py: the fused, chunked vocabulary losses equal `compute_losses` on full logits (every term, every
parameter's gradient) for the three families, never build a tensor larger than a chunk of logits, work
under autocast, fall back for models whose logits are not a plain projection; the hidden-state projection
of a narrower student."""

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import Gemma2Config, Gemma2ForCausalLM

import assets
from losses import LOSS_TERMS, StudentWithLoss, compute_losses, fused_vocabulary_losses
from utils import IGNORE_INDEX

VOCAB = 101
LENGTHS = (10, 8, 6)  # 24 real positions
N_TARGETS = 8  # MLM targets: every third real position
DIVIDING_CHUNK, OTHER_CHUNK = 4, 5  # 4 divides 24 and 8; 5 divides neither
# (student kind, teacher kind, masked LM, restrict_ce_to_mask)
FAMILIES = {
    "bert->distilbert": ("distilbert", "bert", True, False),
    "bert->distilbert restricted": ("distilbert", "bert", True, True),
    "roberta": ("roberta", "roberta", True, False),
    "gpt2": ("gpt2", "gpt2", False, False),
    # Today's families (the auto types): ModernBERT's head transform and decoder bias, Llama's untied head,
    # Qwen3's tied one, GPT-NeoX's untied lm_head.
    "modernbert": ("modernbert", "modernbert", True, False),
    "llama": ("llama", "llama", False, False),
    "qwen3": ("qwen3", "qwen3", False, False),
    "gpt_neox": ("gpt_neox", "gpt_neox", False, False),
}
WEIGHTS = {  # of ce, the LM term, mse, cos
    "all": (2.0, 1.0, 0.3, 0.7),
    "ce": (1.0, 0.0, 0.0, 0.0),
    "lm": (0.0, 1.0, 0.0, 0.0),
    "mse": (0.0, 0.0, 1.0, 0.0),
}


def make_batch(mlm: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (3, 10), attention_mask (3, 10) bool, labels (3, 10)): MLM labels on every third real position."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=generator)
    mask = torch.arange(max(LENGTHS)) < torch.tensor(LENGTHS)[:, None]
    if not mlm:
        return ids, mask, ids.masked_fill(~mask, IGNORE_INDEX)
    targets = torch.zeros_like(mask)
    targets[mask] = torch.arange(int(mask.sum())) % 3 == 0
    assert int(targets.sum()) == N_TARGETS
    return ids, mask, torch.where(targets, ids, IGNORE_INDEX)


def make_alphas(mlm: bool, weights: tuple[float, float, float, float]) -> dict[str, float]:
    ce, lm, mse, cos = weights
    return {"ce": ce, "mlm": lm if mlm else 0.0, "clm": 0.0 if mlm else lm, "mse": mse, "cos": cos}


def make_models(student_kind: str, teacher_kind: str, student_hidden: int = 16):
    """Tiny student and teacher whose output weights are scaled up, so that their distributions are far from
    uniform: between near-uniform ones the KL is the difference of two sums near log(vocab), whose float32
    rounding (~3e-7) is a large share of a value near 0 on any path."""
    if student_kind in assets.AUTO_KINDS:
        student, teacher = (tiny_auto_model(kind, seed) for kind, seed in ((student_kind, 0), (teacher_kind, 1)))
        teacher.eval()
    else:
        student = assets.tiny_model(student_kind, "student", VOCAB, seed=0, hidden=student_hidden)
        teacher = assets.tiny_model(teacher_kind, "teacher", VOCAB, seed=1).eval()
    with torch.no_grad():
        for model in (student, teacher):
            model.get_output_embeddings().weight.mul_(20.0)
    return student, teacher


class _SpecialIds:
    """The special-token ids and size assets.auto_teacher_config reads from a tokenizer, for VOCAB ids."""

    pad_token_id, bos_token_id, eos_token_id, cls_token_id, sep_token_id = 0, 1, 2, 1, 2

    def __len__(self) -> int:
        return VOCAB


def tiny_auto_model(kind: str, seed: int):
    """A one-layer model of a family of today (assets.AUTO_KINDS), 32 wide, no dropout."""
    torch.manual_seed(seed)
    config = assets.without_dropout(assets.auto_teacher_config(kind, _SpecialIds(), n_layers=1, hidden=32))
    return assets.AUTO_MODEL_CLASSES[kind](config)


def reference_step(student, teacher, batch, mlm, alphas, restrict, projection=None):
    """Full logits of both models, `compute_losses`, the weighted total, backward: (losses, gradients by name)."""
    ids, mask, labels = batch
    model_mask = mask.long() if mlm else None
    with torch.inference_mode():
        t_output = teacher(input_ids=ids, attention_mask=model_mask, output_hidden_states=True)
    s_output = student(input_ids=ids, attention_mask=model_mask, output_hidden_states=True)
    s_hidden = s_output.hidden_states[-1]
    if projection is not None:
        s_hidden = projection(s_hidden)
    losses = compute_losses(s_output.logits, t_output.logits, s_hidden, t_output.hidden_states[-1], mask, labels,
                            alphas, 2.0, restrict)
    sum(alphas[term] * value for term, value in losses.items()).backward()
    return losses


def wrapper_step(wrapper, teacher, batch, mlm):
    """One forward and backward of a StudentWithLoss: (loss, losses)."""
    ids, mask, labels = batch
    model_mask = mask.long() if mlm else None
    with torch.inference_mode():
        t_output = wrapper.teacher_output(teacher, ids, model_mask)
    loss, losses = wrapper(ids, model_mask, mask, labels, t_output)
    loss.backward()
    return loss, losses


def gradients(module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_same_losses_and_gradients(got_losses, got_grads, want_losses, want_grads, rtol=1e-5):
    """Every term within `rtol`; every entry of a parameter's gradient within `rtol` of that gradient's scale
    (its largest entry; for gradients that are 0 in exact arithmetic, such as attention key biases, whose
    entries are rounding noise, a thousandth of the largest gradient of the model)."""
    assert list(got_losses) == list(want_losses)
    for term, value in want_losses.items():
        torch.testing.assert_close(got_losses[term], value.detach(), rtol=rtol, atol=0, msg=lambda m: f"{term}: {m}")
    assert got_grads.keys() == want_grads.keys()
    model_scale = max(grad.abs().max() for grad in want_grads.values())
    for name, grad in want_grads.items():
        scale = max(grad.abs().max(), 1e-3 * model_scale)
        torch.testing.assert_close(got_grads[name], grad, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- parity with compute_losses, fp32


@pytest.mark.parametrize("weights", list(WEIGHTS), ids=list(WEIGHTS))
@pytest.mark.parametrize("chunk_size", [DIVIDING_CHUNK, OTHER_CHUNK], ids=["chunk-divides", "chunk-does-not-divide"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fused_terms_and_gradients_equal_compute_losses(family, chunk_size, weights):
    student_kind, teacher_kind, mlm, restrict = FAMILIES[family]
    student, teacher = make_models(student_kind, teacher_kind)
    batch = make_batch(mlm)
    alphas = make_alphas(mlm, WEIGHTS[weights])
    want_losses = reference_step(student, teacher, batch, mlm, alphas, restrict)
    want_grads = gradients(student)
    student.zero_grad(set_to_none=True)

    wrapper = StudentWithLoss(student, alphas, 2.0, restrict, chunk_size, teacher)
    assert wrapper.fused
    loss, losses = wrapper_step(wrapper, teacher, batch, mlm)
    assert_same_losses_and_gradients(losses, gradients(student), want_losses, want_grads)
    torch.testing.assert_close(loss.detach(), sum(alphas[t] * v for t, v in want_losses.items()).detach(), rtol=1e-5,
                               atol=0)
    # The projection's weight (tied to the input embeddings) and its bias got the fused gradients too.
    assert student.get_output_embeddings().weight.grad.abs().sum() > 0


def test_chunk_size_zero_is_compute_losses_bit_for_bit():
    student, teacher = make_models("distilbert", "bert")
    batch = make_batch(mlm=True)
    alphas = make_alphas(True, WEIGHTS["all"])
    want_losses = reference_step(student, teacher, batch, True, alphas, False)
    want_grads = gradients(student)
    student.zero_grad(set_to_none=True)
    wrapper = StudentWithLoss(student, alphas, 2.0, False, 0, teacher)
    assert not wrapper.fused
    _, losses = wrapper_step(wrapper, teacher, batch, True)
    assert_same_losses_and_gradients(losses, gradients(student), want_losses, want_grads, rtol=0)


def test_temperature_one_and_no_teacher():
    """T = 1 shares the student's log-softmax between ce and clm; without teacher terms only clm is computed."""
    student, teacher = make_models("gpt2", "gpt2")
    batch = make_batch(mlm=False)
    for alphas, with_teacher in ((make_alphas(False, (1.0, 1.0, 0.0, 0.0)), True), (make_alphas(False, (0, 1, 0, 0)), False)):
        ids, mask, labels = batch
        with torch.inference_mode():
            t_logits = teacher(input_ids=ids).logits
        s_logits = student(input_ids=ids).logits
        want_losses = compute_losses(s_logits, t_logits, None, None, mask, labels, alphas, 1.0)
        sum(alphas[t] * v for t, v in want_losses.items()).backward()
        want_grads = gradients(student)
        student.zero_grad(set_to_none=True)
        wrapper = StudentWithLoss(student, alphas, 1.0, False, OTHER_CHUNK, teacher if with_teacher else None)
        t_output = None
        if with_teacher:
            with torch.inference_mode():
                t_output = wrapper.teacher_output(teacher, ids, None)
        loss, losses = wrapper(ids, None, mask, labels, t_output)
        loss.backward()
        assert_same_losses_and_gradients(losses, gradients(student), want_losses, want_grads)
        student.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- autocast


def relative_gradient_error(got: dict, want: dict) -> float:
    """The largest |got - want| / |want| over parameters (norms; floored at a thousandth of the largest gradient)."""
    floor = 1e-3 * max(grad.abs().max() for grad in want.values())
    return max(((got[name] - grad).norm() / max(grad.norm(), floor)).item() for name, grad in want.items())


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_autocast_matches_the_unfused_path_within_tolerance(family, dtype, tolerance):
    """Under autocast both paths run the projections in `dtype` and the softmax sums in float32.

    Stated tolerance: the terms within 1e-5 of the unfused path's (both see the same low-precision logits);
    each parameter's gradient within `tolerance` of the unfused path's (relative to its norm), and no
    further from the float32 gradients than twice the unfused path's own distance to them.
    """
    student_kind, teacher_kind, mlm, restrict = FAMILIES[family]
    student, teacher = make_models(student_kind, teacher_kind)
    batch = make_batch(mlm)
    alphas = make_alphas(mlm, WEIGHTS["all"])
    results = {}
    for name, chunk_size, precision in (("fp32", 0, None), ("unfused", 0, dtype), ("fused", OTHER_CHUNK, dtype)):
        student.zero_grad(set_to_none=True)
        wrapper = StudentWithLoss(student, alphas, 2.0, restrict, chunk_size, teacher)
        with torch.autocast("cpu", dtype=dtype, enabled=precision is not None):
            _, losses = wrapper_step(wrapper, teacher, batch, mlm)
        results[name] = (losses, gradients(student))
    (fp32_losses, fp32_grads), (want_losses, want_grads), (got_losses, got_grads) = results.values()
    for term, value in want_losses.items():
        assert got_losses[term].dtype == torch.float32
        torch.testing.assert_close(got_losses[term], value.detach(), rtol=1e-5, atol=0, msg=term)
    assert relative_gradient_error(got_grads, want_grads) <= tolerance
    assert relative_gradient_error(got_grads, fp32_grads) <= 2 * relative_gradient_error(want_grads, fp32_grads)


def test_fp16_keeps_gradients_below_its_range():
    """Logit gradients are ~ weight x T / (rows x vocab): mostly below fp16's smallest number (6e-8) here, as
    in real batches (8k rows x 30k entries). The GradScaler scales the loss only after the fused pass has
    computed them, so each chunk's gradient is rescaled before its fp16 matmuls."""
    generator = torch.Generator().manual_seed(0)
    rows, dim, vocab = 64, 16, 4000
    s_rows = torch.randn(rows, dim, generator=generator, requires_grad=True)
    t_rows = torch.randn(rows, dim, generator=generator)
    s_projection, t_projection = torch.nn.Linear(dim, vocab), torch.nn.Linear(dim, vocab)
    mask = torch.ones(1, rows, dtype=torch.bool)
    targets = torch.randint(vocab, (1, rows), generator=generator)
    alphas = {"ce": 1e-3, "mlm": 1e-3, "clm": 0.0, "mse": 0.0, "cos": 0.0}

    logits = s_projection(s_rows)
    logits.retain_grad()
    with torch.no_grad():
        t_logits = t_projection(t_rows)
    losses = compute_losses(logits[None], t_logits[None], None, None, mask, targets, alphas, 2.0)
    sum(alphas[term] * value for term, value in losses.items()).backward()
    assert (logits.grad.abs() < 6e-8).float().mean() > 0.5
    want = [s_rows.grad.clone(), s_projection.weight.grad.clone(), s_projection.bias.grad.clone()]

    s_rows.grad = None
    s_projection.zero_grad()
    total, _ = fused_vocabulary_losses(s_rows, s_projection, t_rows, t_projection, mask[0], targets[0],
                                       (1e-3, 1e-3, 0.0), 2.0, 16, torch.float16)
    total.backward()
    got = [s_rows.grad, s_projection.weight.grad, s_projection.bias.grad]
    for name, got_grad, want_grad in zip(("rows", "weight", "bias"), got, want):
        assert (got_grad - want_grad).norm() <= 5e-3 * want_grad.norm(), name


def test_a_bfloat16_teacher_with_a_float32_student():
    """A teacher held in bfloat16 (inference tensors, no autocast): both paths take the same bf16 teacher logits
    (dividing by T = 2 is exact), so the terms and gradients agree as in float32."""
    student, teacher = make_models("gpt2", "gpt2")
    teacher.to(torch.bfloat16)
    batch = make_batch(mlm=False)
    alphas = make_alphas(False, WEIGHTS["all"])
    results = []
    for chunk_size in (0, OTHER_CHUNK):
        student.zero_grad(set_to_none=True)
        wrapper = StudentWithLoss(student, alphas, 2.0, False, chunk_size, teacher)
        _, losses = wrapper_step(wrapper, teacher, batch, False)
        results.append((losses, gradients(student)))
    (want_losses, want_grads), (got_losses, got_grads) = results
    assert_same_losses_and_gradients(got_losses, got_grads, want_losses, want_grads)


# ---------------------------------------------------------------- memory: never more than a chunk of logits


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation allocates (views of an input allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        sizes = [t.numel() for t in tree_leaves(out)
                 if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        self.largest = max([self.largest, *sizes])
        return out


@pytest.mark.parametrize("family", ["bert->distilbert", "gpt2"])
def test_no_tensor_exceeds_a_chunk_of_logits_in_forward_and_backward(family):
    student_kind, teacher_kind, mlm, restrict = FAMILIES[family]
    vocab, chunk_size = 400, 20  # chunk x vocab = 8000 > every weight (400 x 16) and activation of these models
    student = assets.tiny_model(student_kind, "student", vocab, seed=0)
    teacher = assets.tiny_model(teacher_kind, "teacher", vocab, seed=1).eval()
    ids = torch.randint(5, vocab, (4, 24))
    mask = torch.ones_like(ids, dtype=torch.bool)  # 96 rows: full logits would be 96 x 400
    labels = ids if not mlm else torch.where(torch.rand(ids.shape) < 0.5, ids, IGNORE_INDEX)
    alphas = make_alphas(mlm, WEIGHTS["all"])
    largest = {}
    for size in (0, chunk_size):
        wrapper = StudentWithLoss(student, alphas, 2.0, restrict, size, teacher)
        with LargestTensor() as recorder:
            wrapper_step(wrapper, teacher, (ids, mask, labels), mlm)
        largest[size] = recorder.largest
    assert largest[0] >= 96 * vocab, "the recorder did not see the unfused path's full logits"
    assert largest[chunk_size] <= chunk_size * vocab


# ---------------------------------------------------------------- models whose logits are not a plain projection


def tiny_gemma2() -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=3.0)
    return Gemma2ForCausalLM(config)


def test_soft_capped_logits_take_the_unfused_path_with_one_warning(caplog):
    student, teacher = tiny_gemma2(), tiny_gemma2()
    alphas = make_alphas(False, WEIGHTS["all"])
    with caplog.at_level(logging.INFO, logger="distillation"):
        wrapper = StudentWithLoss(student, alphas, 2.0, False, OTHER_CHUNK, teacher)
    assert not wrapper.fused
    assert [(r.levelname, r.message) for r in caplog.records if "not fused" in r.message] == [(
        "WARNING",
        "Vocabulary losses on full logits, not fused: the student (gemma2) does not allow them: its logits are "
        "transformed after the projection (final_logit_softcapping=3.0 in its config)",
    )]
    ids, mask, labels = make_batch(mlm=False)
    with torch.inference_mode():
        t_output = wrapper.teacher_output(teacher, ids, None)
    assert t_output.logits.shape == (*ids.shape, VOCAB) and t_output.logits.abs().max() <= 3.0  # soft-capped
    _, losses = wrapper(ids, None, mask, labels, t_output)
    assert set(losses) == {"ce", "clm", "mse", "cos"}


# ---------------------------------------------------------------- narrower students


def test_a_narrower_student_matches_the_unfused_path_and_trains_its_projection():
    student, teacher = make_models("gpt2", "gpt2", student_hidden=8)
    batch = make_batch(mlm=False)
    alphas = make_alphas(False, WEIGHTS["all"])
    wrapper = StudentWithLoss(student, alphas, 2.0, False, OTHER_CHUNK, teacher, seed=3)
    projection = wrapper.hidden_projection
    assert projection.weight.shape == (16, 8) and projection.bias is None
    assert torch.equal(projection.weight, StudentWithLoss(student, alphas, 2.0, False, 0, teacher, seed=3)
                       .hidden_projection.weight), "the initialisation is not a function of the seed"
    want_losses = reference_step(student, teacher, batch, False, alphas, False, projection)
    want_grads = gradients(wrapper)
    wrapper.zero_grad(set_to_none=True)
    _, losses = wrapper_step(wrapper, teacher, batch, False)
    assert_same_losses_and_gradients(losses, gradients(wrapper), want_losses, want_grads)
    assert projection.weight.grad.abs().min() > 0
    assert list(wrapper.loss_state_dict()) == ["hidden_projection.weight"]
    assert all(not name.startswith("hidden_projection") for name in student.state_dict())


def test_same_width_or_no_cosine_loss_has_no_projection():
    student, teacher = make_models("gpt2", "gpt2", student_hidden=8)
    assert StudentWithLoss(student, make_alphas(False, (1, 1, 0, 0)), 2.0, False, 0, teacher).hidden_projection is None
    same, teacher = make_models("gpt2", "gpt2")
    wrapper = StudentWithLoss(same, make_alphas(False, WEIGHTS["all"]), 2.0, False, 0, teacher)
    assert wrapper.hidden_projection is None and wrapper.loss_state_dict() == {}
    assert [name for name, _ in wrapper.named_parameters()] == [f"student.{n}" for n, _ in same.named_parameters()]


def test_every_loss_term_is_reported_in_order():
    student, teacher = make_models("distilbert", "bert")
    alphas = dict(make_alphas(True, WEIGHTS["all"]))
    _, losses = wrapper_step(StudentWithLoss(student, alphas, 2.0, False, OTHER_CHUNK, teacher), teacher,
                             make_batch(True), True)
    assert list(losses) == [term for term in LOSS_TERMS if alphas[term] > 0]
    assert all(value.dim() == 0 and value.dtype == torch.float32 for value in losses.values())
