"""The loss of a distillation step (SPEC section 7), and how it is computed without full logits.

- `compute_losses`: the reference, on full (bs, seq_len, vocab) logits of both models.
- `fused_vocabulary_losses`: the same ce, mlm/clm and mse terms from the inputs of the two models' final
  vocabulary projections, chunk by chunk of rows, with the gradients computed in the same pass: no
  (rows, vocab) tensor larger than one chunk ever exists (the approach of Liger-Kernel's fused linear
  cross-entropy/JSD, Apple's cut-cross-entropy and torchtune's chunked KD loss).
- `StudentWithLoss`: the student and the loss of a step in one module, the one DDP wraps. It also holds,
  for a student narrower than its teacher, the learned projection the cosine loss goes through.
"""

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils import IGNORE_INDEX, UserError, logger

LOSS_TERMS = ("ce", "mlm", "clm", "mse", "cos")
# Terms that compare with the teacher: when all of them weigh 0 the teacher is never run.
TEACHER_TERMS = ("ce", "mse", "cos")

# Rows of logits per chunk of the fused losses (--loss_chunk_size); chosen from bench/fused_loss.py.
DEFAULT_LOSS_CHUNK_SIZE = 256

# Config attributes of models whose logits are transformed after the vocabulary projection (Gemma's
# soft-capping, Cohere's and Granite's scaling, ...), with the values that leave the logits as they are:
# other values send a model down the unfused path.
LOGIT_POSTPROCESSING = {
    "final_logit_softcapping": (None,),
    "logit_scale": (None, 1, 1.0),
    "logits_scaling": (None, 1, 1.0),
    "output_multiplier": (None, 1, 1.0),
    "lm_head_multiplier": (None, 1, 1.0),
    "logits_mup_width_multiplier": (None, 1, 1.0),
}
# How far the fused path's logits and loss terms may be from the model's own, relative to their size: float32
# matmuls summed in another order; half types keep about three significant digits.
FUSION_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}
HALF_TOLERANCE = 2e-2
# The rows StudentWithLoss probes both models with: (sequences, tokens); well under one training step.
PROBE_SHAPE = (2, 16)


# ---------------------------------------------------------------- the reference: full logits


def _rows(x: Tensor, mask: Tensor) -> Tensor:
    """`x[mask]` for a (bs, seq_len) bool mask: the selected rows of x (bs, seq_len, ...), in row-major order.

    A mask on the host selects a device tensor without a device sync: its indices are found on the host
    and copied without blocking (a device mask would need its count read back first).
    """
    return _flat_rows(x, _flat_index(mask))


def _flat_index(mask: Tensor) -> Tensor:
    """The flat indices (over bs * seq_len) of the True entries of a (bs, seq_len) mask, in row-major order."""
    return mask.flatten().nonzero().squeeze(1)


def _flat_rows(x: Tensor, rows: Tensor) -> Tensor:
    """Rows `rows` (flat indices over its first two dimensions) of x (bs, seq_len, ...), copied without blocking."""
    return x.flatten(0, 1).index_select(0, rows.to(x.device, non_blocking=True))


def kl_distillation(s_logits: Tensor, t_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) summed over the vocabulary, averaged over rows, times T^2 (Hinton et al.).

    The teacher side is given as log-probabilities: the same value, without kl_div taking the log of
    every probability again (a third of the term's time on a CPU).
    """
    log_p_student = F.log_softmax(s_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t_logits / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2


def _token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the positions whose label is not -100; logits (..., vocab), labels (...)."""
    targets = labels != IGNORE_INDEX
    return F.cross_entropy(_rows(logits, targets).float(), labels[targets].to(logits.device, non_blocking=True))


def _cosine_loss(s_hidden: Tensor, t_hidden: Tensor) -> Tensor:
    """Mean of 1 - cos(student row, teacher row); both (n_rows, dim)."""
    return (1.0 - F.cosine_similarity(s_hidden.float(), t_hidden.float(), dim=-1)).mean()


def compute_losses(
    s_logits: Tensor,
    t_logits: Tensor | None,
    s_hidden: Tensor | None,
    t_hidden: Tensor | None,
    attention_mask: Tensor,
    lm_labels: Tensor,
    alphas: Mapping[str, float],
    temperature: float,
    restrict_ce_to_mask: bool = False,
) -> dict[str, Tensor]:
    """The distillation loss terms whose weight is > 0, each a float32 0-dim tensor.

    - ce: KL(softmax(t/T) || softmax(s/T)) summed over the vocabulary, averaged over the selected
      positions, times T^2. Selected: every real position, or only the MLM targets when
      `restrict_ce_to_mask`.
    - mlm: student cross-entropy on the MLM targets (labels != -100).
    - clm: student cross-entropy predicting token i + 1 from position i.
    - mse: squared error between student and teacher logits, summed over the selected positions and
      divided by their number.
    - cos: mean over real positions of 1 - cos(student, teacher last hidden state).

    Args:
        s_logits: (bs, seq_len, vocab) student logits.
        t_logits: (bs, seq_len, vocab) teacher logits; only read when a TEACHER_TERMS weight is > 0.
        s_hidden: (bs, seq_len, dim) student last hidden state; only read when alphas["cos"] > 0.
        t_hidden: (bs, seq_len, dim) teacher last hidden state; only read when alphas["cos"] > 0.
        attention_mask: (bs, seq_len) bool, True on real tokens.
        lm_labels: (bs, seq_len) int64, -100 where there is nothing to predict.
            Both may live on the host while the logits are on an accelerator: rows are then selected
            without a device sync (see `_rows`).
        alphas: weight of each term in LOSS_TERMS; terms with weight 0 are not computed.
        temperature: softmax temperature T of the ce term.
        restrict_ce_to_mask: select only the MLM targets for ce and mse.

    Returns:
        {term: loss} in LOSS_TERMS order, for the terms with alphas[term] > 0.
    """
    selected = lm_labels != IGNORE_INDEX if restrict_ce_to_mask else attention_mask  # (bs, seq_len) bool

    @cache  # ce and mse read the same rows
    def selected_logits() -> tuple[Tensor, Tensor]:
        # Select rows, never a (bs, seq_len, vocab) mask: (n_selected, vocab) each.
        return _rows(s_logits, selected).float(), _rows(t_logits, selected).float()

    def mse() -> Tensor:
        s_rows, t_rows = selected_logits()
        return F.mse_loss(s_rows, t_rows, reduction="sum") / s_rows.size(0)

    terms = {
        "ce": lambda: kl_distillation(*selected_logits(), temperature),
        "mlm": lambda: _token_cross_entropy(s_logits, lm_labels),
        "clm": lambda: _token_cross_entropy(s_logits[:, :-1], lm_labels[:, 1:]),
        "mse": mse,
        "cos": lambda: _cosine_loss(_rows(s_hidden, attention_mask), _rows(t_hidden, attention_mask)),
    }
    return {term: loss() for term, loss in terms.items() if alphas[term] > 0}


# ---------------------------------------------------------------- the vocabulary projection of any LM


def _projection_name(model: nn.Module, projection: nn.Module) -> str:
    """The qualified name of `projection` inside `model`, for messages."""
    return next((name for name, module in model.named_modules() if module is projection), type(projection).__name__)


def fusion_blocker(model: nn.Module) -> str | None:
    """Why `model` has nothing the fused path could even try; None when it has a projection to try.

    The logit transforms of LOGIT_POSTPROCESSING are refused from the config as well: soft-capping at 30 is
    invisible on the small logits of a probe, not on a trained model's.
    """
    projection = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(projection, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return "it has no output embeddings with a (vocabulary, width) weight"
    config = model.config.get_text_config()
    for attribute, neutral in LOGIT_POSTPROCESSING.items():
        value = getattr(config, attribute, None)
        if value not in neutral:
            return f"its logits are transformed after the projection ({attribute}={value} in its config)"
    return None


def fusion_mismatch(
    model: nn.Module, input_ids: Tensor, logits: Tensor, chunk_size: int
) -> tuple[str | None, Tensor | None]:
    """Whether the fused path reproduces `model`'s own logits on `input_ids`: (why not or None, projection inputs).

    The fused path is run as training runs it: the model's forward with its output embeddings' forward
    skipped (`projection_inputs_as_logits`), then `logit_chunks` over those inputs. Its logits must equal
    the model's own `logits` within float tolerance (FUSION_TOLERANCE of the largest |logit|): a head whose
    vocabulary projection is not `get_output_embeddings()` (DeBERTa-v2's with legacy=False), or whose logits
    are transformed afterwards, fails here instead of training on wrong logits.

    Args:
        model: in eval mode, called under no_grad.
        input_ids: (bs, seq_len) on the model's device.
        logits: (bs, seq_len, vocab) float32, the model's own logits for `input_ids`.
        chunk_size: rows per chunk.

    Returns:
        (None, inputs (bs, seq_len, dim)) when they match, else (the reason in a phrase, None).
    """
    blocker = fusion_blocker(model)
    if blocker is not None:
        return blocker, None
    projection = model.get_output_embeddings()
    name = f"{_projection_name(model, projection)} {tuple(projection.weight.shape)}"
    try:
        with projection_inputs_as_logits(model):
            inputs = model(input_ids=input_ids).logits
        rows = inputs.flatten(0, 1)
        fused = torch.cat(list(logit_chunks(rows, projection, chunk_size))).view(*inputs.shape[:-1], -1)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"its output embeddings ({name}) are not its vocabulary projection: skipping them fails ({first_line})", \
            None
    if fused.shape != logits.shape:
        return (
            f"its output embeddings ({name}) are not its vocabulary projection: they give {tuple(fused.shape)} "
            f"logits where its head gives {tuple(logits.shape)}"
        ), None
    error, scale = (fused - logits).abs().max().item(), logits.abs().max().item()
    if not error <= _tolerance(inputs.dtype, projection.weight.dtype) * scale:
        return (
            f"its output embeddings ({name}) do not make its logits: they differ from its head's by up to {error:.3g} "
            f"(largest |logit| {scale:.3g})"
        ), None
    return None, inputs


def _tolerance(*dtypes: torch.dtype) -> float:
    """The relative tolerance of a probe comparison for tensors of these dtypes (the loosest applies)."""
    return max(FUSION_TOLERANCE.get(dtype, HALF_TOLERANCE) for dtype in dtypes)


class ModelProbe(NamedTuple):
    """What one forward of a few rows shows of a model (`probe_model`).

    family: its config's model_type, for messages.
    logits: (bs, seq_len, vocab) float32, its own.
    hidden_width: the width of its last hidden state; None when it was not asked for or not returned.
    inputs: (bs, seq_len, dim) inputs of its vocabulary projection from the fused path, when that path
        reproduces `logits`; else None, and `mismatch` says why.
    mismatch: why the fused path cannot be used; None when it can (or was not tried).
    """

    family: str
    logits: Tensor
    hidden_width: int | None
    inputs: Tensor | None
    mismatch: str | None


def probe_model(model: nn.Module, input_ids: Tensor, want_hidden: bool, chunk_size: int) -> ModelProbe:
    """Run `model` on a few rows (eval mode, no gradient, no random draw) and read its facts from the outputs.

    Args:
        model: any LM; its training mode is restored afterwards.
        input_ids: (bs, seq_len) int64, moved to the model's device.
        want_hidden: also read the width of its last hidden state.
        chunk_size: > 0 tries the fused path too (`fusion_mismatch`).
    """
    input_ids = probe_rows(input_ids, chunk_size).to(next(model.parameters(), input_ids).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(input_ids=input_ids, **({"output_hidden_states": True} if want_hidden else {}))
            logits = output.logits.float()
            hidden_states = getattr(output, "hidden_states", None) if want_hidden else None
            width = hidden_states[-1].size(-1) if hidden_states else None
            mismatch, inputs = fusion_mismatch(model, input_ids, logits, chunk_size) if chunk_size > 0 else (None, None)
    finally:
        model.train(was_training)
    return ModelProbe(model.config.model_type, logits, width, inputs, mismatch)


def probe_rows(input_ids: Tensor, chunk_size: int) -> Tensor:
    """The first rows of `input_ids`, at most `chunk_size` of them when > 0: the probe's full logits must not be
    larger than a chunk of logits either."""
    if chunk_size <= 0 or input_ids.numel() <= chunk_size:
        return input_ids
    n_sequences = max(1, min(input_ids.size(0), chunk_size // input_ids.size(1)))
    return input_ids[:n_sequences, : max(1, chunk_size // n_sequences)]


def synthetic_probe_ids(model: nn.Module) -> Tensor:
    """PROBE_SHAPE ids drawn from the model's input vocabulary with a generator of their own (the global ones,
    which masking and dropout draw from, are left alone): the probe when no data is given."""
    vocab = model.get_input_embeddings().weight.size(0)
    return torch.randint(vocab, PROBE_SHAPE, generator=torch.Generator().manual_seed(0))


def _return_input(inputs: Tensor) -> Tensor:
    """Stands in for the vocabulary projection's forward: the logits become its inputs."""
    return inputs


@contextmanager
def projection_inputs_as_logits(model: nn.Module) -> Iterator[None]:
    """While active, `model(...).logits` are the inputs of its vocabulary projection, (bs, seq_len, dim).

    The projection's forward is shadowed on the instance, nothing else: parameter names, state dicts and
    every other module stay as they are, and no full logits are computed.
    """
    projection = model.get_output_embeddings()
    projection.forward = _return_input
    try:
        yield
    finally:
        del projection.forward


class _Projection:
    """A vocabulary projection ready for chunks: weight and bias in the matmul dtype, and the logit scale.

    Logits come out multiplied by `scale` (1/T for the temperature softmaxes): the inputs and the bias are
    scaled instead, which costs (rows, dim) and (vocab,) work rather than a pass over (rows, vocab).
    """

    def __init__(
        self, rows: Tensor, weight: Tensor, bias: Tensor | None, scale: float, autocast_dtype: torch.dtype | None
    ):
        # The dtype the projection itself would run in: autocast's when it is on, else the promoted types.
        self.dtype = autocast_dtype or torch.promote_types(rows.dtype, weight.dtype)
        self.weight = weight.detach().to(self.dtype)
        self.bias = None if bias is None else (bias.detach().float() * scale).to(self.dtype)
        self.scale = scale

    def inputs(self, rows: Tensor) -> Tensor:
        """(chunk, dim) rows in the matmul dtype, scaled."""
        return (rows.detach() * self.scale if self.scale != 1.0 else rows.detach()).to(self.dtype)

    def logits(self, inputs: Tensor) -> Tensor:
        """(chunk, vocab) float32: scale x (rows @ weight^T + bias), for inputs from `inputs`."""
        return F.linear(inputs, self.weight, self.bias).float()


def logit_chunks(
    rows: Tensor, projection: nn.Linear, chunk_size: int, autocast_dtype: torch.dtype | None = None
) -> Iterator[Tensor]:
    """The float32 logits of `rows`, one chunk of at most `chunk_size` rows at a time (no gradient).

    Args:
        rows: (n_rows, dim) inputs of `projection`.
        projection: the model's vocabulary projection (`get_output_embeddings()`).
        chunk_size: rows per chunk.
        autocast_dtype: the dtype of the matmul under autocast; None: the inputs' and weights' own.

    Yields:
        (<= chunk_size, vocab) float32 logits, in row order.
    """
    chunks = _Projection(rows, projection.weight, projection.bias, 1.0, autocast_dtype)
    for start in range(0, rows.size(0), chunk_size):
        yield chunks.logits(chunks.inputs(rows[start : start + chunk_size]))


# ---------------------------------------------------------------- fused, chunked vocabulary losses


class _ChunkedVocabularyLosses(torch.autograd.Function):
    """ce / lm / mse from projection inputs, chunk by chunk; gradients computed in the forward pass.

    The forward keeps the gradients of the weighted total with respect to the student's rows and
    projection (accumulated over the chunks); the backward only scales them by the incoming gradient
    (it runs once: no retain_graph). Teacher tensors (possibly inference tensors) are read, never saved.
    """

    @staticmethod
    def forward(ctx, s_rows, s_weight, s_bias, t_rows, t_weight, t_bias, selected, targets, settings):
        with torch.autocast(s_rows.device.type, enabled=False):
            total, terms, grads = _chunked_losses_and_gradients(
                s_rows, s_weight, s_bias, t_rows, t_weight, t_bias, selected, targets, settings, ctx.needs_input_grad
            )
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(terms)
        return total, terms

    @staticmethod
    def backward(ctx, grad_total, grad_terms):
        grads = [None if grad is None else grad.mul_(grad_total) for grad in ctx.saved_tensors]
        return *grads, None, None, None, None, None, None


class _Settings(NamedTuple):
    """The non-tensor arguments of `fused_vocabulary_losses`."""

    weights: tuple[float, float, float]
    temperature: float
    chunk_size: int
    autocast_dtype: torch.dtype | None


def _chunked_losses_and_gradients(
    s_rows: Tensor,
    s_weight: Tensor,
    s_bias: Tensor | None,
    t_rows: Tensor | None,
    t_weight: Tensor | None,
    t_bias: Tensor | None,
    selected: Tensor,
    targets: Tensor,
    settings: _Settings,
    needs_grad: tuple[bool, ...],
) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """The loop of `fused_vocabulary_losses`: (total, terms, [grad rows, grad weight, grad bias])."""
    (w_ce, w_lm, w_mse), temperature, chunk_size, autocast_dtype = settings
    # With ce, both models' logits are made at temperature T; lm and mse undo it where they need to.
    logit_scale = 1.0 / temperature if w_ce > 0 else 1.0
    student = _Projection(s_rows, s_weight, s_bias, logit_scale, autocast_dtype)
    teacher = _Projection(t_rows, t_weight, t_bias, logit_scale, autocast_dtype) if w_ce > 0 or w_mse > 0 else None

    n_selected = selected.sum().float()
    n_targets = targets.size(0)
    # Per-row factors of each term's gradient with respect to the student's logits s: d(T^2 KL / n)/ds =
    # T (q - p) / n; d(|s - t|^2 / n)/ds = 2 (s - t) / n, where s - t is the scaled logits' difference / scale.
    ce_factor = torch.where(selected, w_ce * temperature / n_selected, 0.0)[:, None]
    mse_factor = torch.where(selected, 2.0 * w_mse / (logit_scale * n_selected), 0.0)[:, None]
    lm_factor = w_lm / n_targets if n_targets else 0.0

    sums = torch.zeros(3, dtype=torch.float32, device=s_rows.device)  # KL, NLL, squared error (of scaled logits)
    grad_rows = torch.empty_like(s_rows, dtype=torch.float32) if needs_grad[0] else None
    grad_weight = torch.zeros_like(s_weight, dtype=torch.float32) if needs_grad[1] else None
    grad_bias = torch.zeros_like(s_bias, dtype=torch.float32) if needs_grad[2] else None
    for start in range(0, s_rows.size(0), chunk_size):
        chunk = slice(start, start + chunk_size)
        inputs = student.inputs(s_rows[chunk])
        logits = student.logits(inputs)  # (chunk, vocab) s x logit_scale
        t_logits = teacher.logits(teacher.inputs(t_rows[chunk])) if teacher is not None else None
        grad_logits = None
        if w_mse > 0:
            diff = logits - t_logits
            sums[2] += torch.where(selected[chunk], torch.linalg.vecdot(diff, diff), 0.0).sum()
            grad_logits = diff.mul_(mse_factor[chunk])
        if w_ce > 0:
            kl_rows, grad_ce = _kl_and_gradient(logits, t_logits, ce_factor[chunk])
            sums[0] += torch.where(selected[chunk], kl_rows, 0.0).sum()
            grad_logits = grad_ce if grad_logits is None else grad_logits.add_(grad_ce)
        lm_rows = slice(0, max(0, min(n_targets - start, logits.size(0))))  # rows with a target come first
        if w_lm > 0 and lm_rows.stop > 0:
            grad_lm = None if grad_logits is None else grad_logits[lm_rows]  # None: no teacher term, all rows have one
            nll_sum, grad_lm = _nll_and_gradient(logits[lm_rows], targets[chunk], 1.0 / logit_scale, lm_factor, grad_lm)
            sums[1] += nll_sum
            grad_logits = grad_lm if grad_logits is None else grad_logits
        del logits, t_logits
        _accumulate_gradients(grad_logits, inputs, student, grad_rows, grad_weight, grad_bias, chunk)

    terms = torch.stack(
        [sums[0] / n_selected * temperature**2, sums[1] / n_targets, sums[2] / (logit_scale**2 * n_selected)]
    )
    total = sum(weight * term for weight, term in zip((w_ce, w_lm, w_mse), terms) if weight > 0)
    return total, terms, [grad_rows, grad_weight, grad_bias]


def _kl_and_gradient(s_scaled: Tensor, t_scaled: Tensor, factor: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row KL(softmax(t/T) || softmax(s/T)) and its gradient `factor x (q - p)`; inputs (chunk, vocab) s/T, t/T.

    Returns (kl (chunk,), gradient (chunk, vocab)); t_scaled is overwritten (with p).
    """
    log_q = F.log_softmax(s_scaled, dim=-1)
    log_p = F.log_softmax(t_scaled, dim=-1)
    p = torch.exp(log_p, out=t_scaled)
    kl_rows = torch.linalg.vecdot(p, log_p.sub_(log_q))
    del log_p
    return kl_rows, torch.exp(log_q, out=log_q).sub_(p).mul_(factor)


def _nll_and_gradient(
    logits_scaled: Tensor, targets: Tensor, unscale: float, factor: float, grad: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of the rows against `targets`, and its gradient `factor x (softmax - one_hot)`
    added to `grad` (None: a new tensor).

    logits_scaled: (rows, vocab) logits times 1/unscale; targets: (>= rows,) ids, the first `rows` used.

    Returns:
        (nll sum, grad).
    """
    logits = logits_scaled * unscale if unscale != 1.0 else logits_scaled
    probabilities = F.log_softmax(logits, dim=-1)
    targets = targets[: probabilities.size(0), None]
    nll_sum = -probabilities.gather(1, targets).sum()
    probabilities.exp_()
    grad = probabilities.mul_(factor) if grad is None else grad.add_(probabilities, alpha=factor)
    grad.scatter_add_(1, targets, grad.new_full(targets.shape, -factor))
    return nll_sum, grad


def _accumulate_gradients(
    grad_logits: Tensor,
    inputs: Tensor,
    student: _Projection,
    grad_rows: Tensor | None,
    grad_weight: Tensor | None,
    grad_bias: Tensor | None,
    chunk: slice,
) -> None:
    """Back through the chunk's projection: its rows' gradient, and the weight's and bias's, accumulated.

    `inputs` were scaled by student.scale, so the weight's gradient is computed against them and unscaled.
    fp16 cannot hold these gradients unscaled (the loss scaler acts after this pass): a low-precision matmul
    gets the chunk's gradient brought to a maximum of 1, and its result is scaled back in float32.
    """
    if student.dtype == torch.float16:
        rescale = grad_logits.abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
        low = (grad_logits / rescale).to(student.dtype)
    else:  # float32, or bfloat16, whose exponent range is float32's
        low, rescale = grad_logits.to(student.dtype), None
    if grad_rows is not None:
        grad_rows[chunk] = _rescaled(low @ student.weight, rescale)
    if grad_weight is not None:
        if low.dtype == grad_weight.dtype:  # float32: accumulated in place, no (vocab, dim) temporary
            grad_weight.addmm_(low.t(), inputs, alpha=1.0 / student.scale)
        else:
            grad_weight.add_(_rescaled(low.t() @ inputs, rescale), alpha=1.0 / student.scale)
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)


def _rescaled(product: Tensor, scale: Tensor | None) -> Tensor:
    """A matmul result in float32, times the scale its gradient operand was divided by (None: 1)."""
    return product if scale is None else product.float() * scale


def fused_vocabulary_losses(
    s_rows: Tensor,
    s_projection: nn.Linear,
    t_rows: Tensor | None,
    t_projection: nn.Linear | None,
    selected: Tensor,
    targets: Tensor,
    weights: tuple[float, float, float],
    temperature: float,
    chunk_size: int,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The vocabulary terms of `compute_losses` from projection inputs, never more than `chunk_size` rows of logits.

    For rows r: s = s_rows @ W_s^T + b_s and t = t_rows @ W_t^T + b_t (the models' own projections, tied
    or not), then as in `compute_losses`, with the softmax sums in float32:
    ce = T^2 sum_{selected} KL(softmax(t/T) || softmax(s/T)) / n_selected,
    lm = sum_{first len(targets) rows} -log softmax(s)[target] / len(targets),
    mse = sum_{selected} |s - t|^2 / n_selected.

    Args:
        s_rows: (n_rows, dim_s) inputs of the student's projection (after any head transform).
        s_projection: the student's vocabulary projection; its weight and bias get gradients.
        t_rows: (n_rows, dim_t) inputs of the teacher's projection, no gradient (inference tensors and
            lower precision are fine); None when ce and mse weigh 0.
        t_projection: the teacher's vocabulary projection; None with t_rows.
        selected: (n_rows,) bool, rows read by ce and mse.
        targets: (n_targets,) int64 LM target ids of the first n_targets rows (the rows with a target
            come first: their number is a shape, never read back from a device).
        weights: (w_ce, w_lm, w_mse) weights of the terms in the total; a 0 weight skips its term.
        temperature: softmax temperature T of ce.
        chunk_size: rows per chunk.
        autocast_dtype: the dtype of the projections' matmuls under autocast; None: the tensors' own.

    Returns:
        (total, terms): total, the 0-dim float32 sum of weight x term over the terms with weight > 0,
        carries the gradients; terms (3,) float32 (ce, lm, mse) has none (for logging; a skipped
        term's value is meaningless).
    """
    t_weight, t_bias = (None, None) if t_projection is None else (t_projection.weight, t_projection.bias)
    settings = _Settings(tuple(weights), temperature, chunk_size, autocast_dtype)
    return _ChunkedVocabularyLosses.apply(
        s_rows, s_projection.weight, s_projection.bias, t_rows, t_weight, t_bias, selected, targets, settings
    )


# ---------------------------------------------------------------- the student and its loss, as one module


class TeacherOutput(NamedTuple):
    """What the loss reads of the teacher's forward pass.

    logits: (bs, seq_len, vocab), or with fusion the inputs of its vocabulary projection (bs, seq_len, dim).
    hidden: (bs, seq_len, dim) last hidden state, None without the cosine loss.
    projection: its vocabulary projection with fusion, else None.
    """

    logits: Tensor
    hidden: Tensor | None
    projection: nn.Linear | None


def _loss_rows(
    attention_mask: Tensor, lm_labels: Tensor, lm_term: str | None, restrict_ce_to_mask: bool, with_teacher: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The rows the vocabulary terms read, as `compute_losses` selects them, those with an LM target first.

    Returns:
        rows: (n_rows,) int64 flat indices into (bs * seq_len): the rows with an LM target (mlm: a label;
            clm: a label at the next position), then the other rows ce and mse read;
        selected: (n_rows,) bool, the rows ce and mse read (every real position, or the MLM targets);
        targets: (n_targets,) int64, the ids the first n_targets rows predict.
    """
    next_ids = torch.full_like(lm_labels, IGNORE_INDEX)
    if lm_term == "mlm":
        next_ids = lm_labels
    elif lm_term == "clm":
        next_ids[:, :-1] = lm_labels[:, 1:]
    has_target = (next_ids != IGNORE_INDEX).flatten()
    selected = lm_labels != IGNORE_INDEX if restrict_ce_to_mask else attention_mask
    selected = selected.flatten() if with_teacher else torch.zeros_like(has_target)
    rows = torch.cat([_flat_index(has_target), _flat_index(selected & ~has_target)])
    return rows, selected[rows], next_ids.flatten()[has_target]


class StudentWithLoss(nn.Module):
    """The student and the loss of a distillation step in one module: its forward runs the student and
    returns the losses, so that DDP wraps it whole (one all-reduce of everything trained, `no_sync`).

    Saving and export use the student itself; what this module trains besides (the hidden-state
    projection) is in `loss_state_dict` and goes only into the training state.

    Args:
        student: the model being trained (a submodule here: its parameters are this module's).
        alphas: weight of each term in LOSS_TERMS (at most one of mlm, clm > 0).
        temperature: softmax temperature of ce.
        restrict_ce_to_mask: ce and mse on the MLM targets only.
        loss_chunk_size: rows of logits per chunk of the fused vocabulary losses; 0 computes full
            logits and `compute_losses`, as does a model whose fused path fails its probe.
        teacher: the teacher, read for its width and projection (not held); None without teacher terms.
        seed: seed of the hidden-state projection's initialisation (its own generator: the global
            ones, which masking and dropout draw from, are left as a same-width run leaves them).
        probe_ids: (bs, seq_len) int64 ids, a few rows of the data, that both models are probed with before
            anything trains (`probe_model`): the hidden-state widths come from their outputs, and the fused
            path is used only if it reproduces each model's own logits and the full-logit loss terms.
            None: `synthetic_probe_ids`.
        fusion_required: refuse (UserError) rather than fall back to full logits when the probe fails,
            for a user who asked for fusion explicitly.

    Raises:
        UserError: the models' logits disagree in vocabulary, a model returns no hidden states for the
            cosine loss, or `fusion_required` and the fused path fails its probe.
    """

    def __init__(
        self,
        student: nn.Module,
        alphas: Mapping[str, float],
        temperature: float,
        restrict_ce_to_mask: bool,
        loss_chunk_size: int,
        teacher: nn.Module | None = None,
        seed: int = 0,
        probe_ids: Tensor | None = None,
        fusion_required: bool = False,
    ):
        super().__init__()
        if alphas["mlm"] > 0 and alphas["clm"] > 0:
            raise ValueError("the mlm and clm terms are exclusive")
        self.student = student
        self.alphas = dict(alphas)
        self.temperature = temperature
        self.restrict_ce_to_mask = restrict_ce_to_mask
        self.chunk_size = loss_chunk_size
        self.lm_term = next((term for term in ("mlm", "clm") if alphas[term] > 0), None)
        self.want_hidden = alphas["cos"] > 0
        self.fused = False
        probe_ids = probe_rows(synthetic_probe_ids(student) if probe_ids is None else probe_ids, loss_chunk_size)
        probes = {"student": probe_model(student, probe_ids, self.want_hidden, loss_chunk_size)}
        if teacher is not None:
            probes["teacher"] = probe_model(teacher, probe_ids, self.want_hidden, loss_chunk_size)
        _check_probes(probes, self.want_hidden)
        self.hidden_projection = None
        if self.want_hidden and probes["student"].hidden_width != probes["teacher"].hidden_width:
            self.hidden_projection = _hidden_projection(
                probes["student"].hidden_width, probes["teacher"].hidden_width, student, seed
            )
        if loss_chunk_size > 0:
            reason = self._fusion_refusal(probes, probe_ids, teacher)
            self.fused = reason is None
            if reason is not None and fusion_required:
                raise UserError(
                    f"--loss_chunk_size {loss_chunk_size} asks for fused losses, but {reason}; "
                    "pass --loss_chunk_size 0 to compute full logits"
                )
            if reason is not None:
                logger.warning(f"Vocabulary losses on full logits, not fused: {reason}")

    def _fusion_refusal(
        self, probes: Mapping[str, ModelProbe], probe_ids: Tensor, teacher: nn.Module | None
    ) -> str | None:
        """Why the fused path must not be used, from the probes; None when it reproduces the full-logit path.

        Each model's fused logits must equal its own (`fusion_mismatch`), and the fused loss terms of the probe
        rows (every position a target) the `compute_losses` terms of the full logits, within float tolerance.
        """
        for role, probe in probes.items():
            if probe.mismatch is not None:
                return f"the {role} ({probe.family}) does not allow them: {probe.mismatch}"
        s_probe, t_probe = probes["student"], probes.get("teacher")
        attention_mask = torch.ones(probe_ids.shape, dtype=torch.bool)
        lm_labels = probe_ids.cpu()
        alphas = {**self.alphas, "cos": 0.0}
        want = compute_losses(s_probe.logits, None if t_probe is None else t_probe.logits, None, None, attention_mask,
                              lm_labels, alphas, self.temperature, self.restrict_ce_to_mask)
        t_output = None if t_probe is None else TeacherOutput(t_probe.inputs, None, teacher.get_output_embeddings())
        with torch.no_grad():
            _, got = self._fused_vocabulary_losses(s_probe.inputs, t_output, attention_mask, lm_labels, None)
        tolerance = _tolerance(*(probe.inputs.dtype for probe in probes.values()))
        for term, value in want.items():
            got_value, want_value = got[term].item(), value.item()
            if not abs(got_value - want_value) <= tolerance * abs(want_value) + 1e-5:
                return f"its {term} term ({got_value:.6g}) differs from the full-logit one ({want_value:.6g}) on the probe"
        return None

    def _forward_context(self, model: nn.Module):
        """What a forward of either model runs in: with fusion, its logits are its projection's inputs."""
        return projection_inputs_as_logits(model) if self.fused else nullcontext()

    def teacher_output(self, teacher: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> TeacherOutput:
        """Run the teacher for this loss (the caller decides the grad mode: inference mode in training).

        Args:
            teacher: the frozen teacher.
            input_ids: (bs, seq_len) int64 on the teacher's device.
            attention_mask: (bs, seq_len) on that device, or None (CLM runs without one).
        """
        with self._forward_context(teacher):
            output = teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=self.want_hidden)
        return TeacherOutput(
            output.logits,
            output.hidden_states[-1] if self.want_hidden else None,
            teacher.get_output_embeddings() if self.fused else None,
        )

    def forward(
        self,
        input_ids: Tensor,
        model_mask: Tensor | None,
        attention_mask: Tensor,
        lm_labels: Tensor,
        teacher_output: TeacherOutput | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the student and compute the loss of one micro-batch.

        Args:
            input_ids: (bs, seq_len) int64 on the device.
            model_mask: what the student's attention_mask is: (bs, seq_len) on the device, or None (CLM).
            attention_mask: (bs, seq_len) bool, True on real tokens; best on the host (see `_rows`).
            lm_labels: (bs, seq_len) int64, -100 where there is nothing to predict; best on the host.
            teacher_output: from `teacher_output`; None when no term reads the teacher.

        Returns:
            (loss, losses): the 0-dim float32 total sum(alpha x term), which carries the gradients, and
            {term: 0-dim value} in LOSS_TERMS order for the terms with weight > 0 (the fused terms
            without gradients: they are for logging).
        """
        with self._forward_context(self.student):
            s_output = self.student(
                input_ids=input_ids, attention_mask=model_mask, output_hidden_states=self.want_hidden
            )
        device_type = input_ids.device.type
        autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        s_hidden = s_output.hidden_states[-1] if self.want_hidden else None
        with torch.autocast(device_type, enabled=False):  # the losses accumulate in float32
            if self.hidden_projection is not None:
                s_hidden = self.hidden_projection(s_hidden.to(self.hidden_projection.weight.dtype))
            if not self.fused:
                losses = compute_losses(
                    s_output.logits,
                    None if teacher_output is None else teacher_output.logits,
                    s_hidden,
                    None if teacher_output is None else teacher_output.hidden,
                    attention_mask,
                    lm_labels,
                    self.alphas,
                    self.temperature,
                    self.restrict_ce_to_mask,
                )
                return sum(self.alphas[term] * value for term, value in losses.items()), losses
            return self._fused_losses(s_output.logits, s_hidden, teacher_output, attention_mask, lm_labels, autocast_dtype)

    def _fused_losses(
        self,
        s_inputs: Tensor,
        s_hidden: Tensor | None,
        teacher_output: TeacherOutput | None,
        attention_mask: Tensor,
        lm_labels: Tensor,
        autocast_dtype: torch.dtype | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """`forward`'s loss with the vocabulary terms fused; s_inputs (bs, seq_len, dim) projection inputs."""
        total, losses = self._fused_vocabulary_losses(
            s_inputs, teacher_output, attention_mask, lm_labels, autocast_dtype
        )
        if self.want_hidden:
            real = _flat_index(attention_mask).to(s_hidden.device, non_blocking=True)  # once, for both models
            losses["cos"] = _cosine_loss(_flat_rows(s_hidden, real), _flat_rows(teacher_output.hidden, real))
            total = total + self.alphas["cos"] * losses["cos"]
        return total, losses

    def _fused_vocabulary_losses(
        self,
        s_inputs: Tensor,
        teacher_output: TeacherOutput | None,
        attention_mask: Tensor,
        lm_labels: Tensor,
        autocast_dtype: torch.dtype | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The ce, mlm/clm and mse terms of `_fused_losses`: (their weighted total, {term: value})."""
        alphas = self.alphas
        weights = (alphas["ce"], alphas[self.lm_term] if self.lm_term else 0.0, alphas["mse"])
        with_teacher = weights[0] > 0 or weights[2] > 0
        if not any(weight > 0 for weight in weights):
            return s_inputs.new_zeros((), dtype=torch.float32), {}
        rows, selected, targets = _loss_rows(
            attention_mask, lm_labels, self.lm_term, self.restrict_ce_to_mask, with_teacher
        )
        device = s_inputs.device
        rows = rows.to(device, non_blocking=True)  # once, for both models
        total, terms = fused_vocabulary_losses(
            _flat_rows(s_inputs, rows),
            self.student.get_output_embeddings(),
            _flat_rows(teacher_output.logits, rows) if with_teacher else None,
            teacher_output.projection if with_teacher else None,
            selected.to(device, non_blocking=True),
            targets.to(device, non_blocking=True),
            weights,
            self.temperature,
            self.chunk_size,
            autocast_dtype,
        )
        values = dict(zip(("ce", self.lm_term, "mse"), terms))
        return total, {term: values[term] for term in LOSS_TERMS if term != "cos" and alphas[term] > 0}

    def loss_state_dict(self) -> dict[str, Tensor]:
        """What this module trains besides the student (the hidden-state projection): for the training state."""
        return {name: value for name, value in self.state_dict().items() if not name.startswith("student.")}

    def load_loss_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Take up `loss_state_dict`'s output."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [name for name in missing if not name.startswith("student.")]
        if missing or unexpected:
            raise ValueError(f"loss state mismatch: missing {missing}, unexpected {unexpected}")


def _check_probes(probes: Mapping[str, ModelProbe], want_hidden: bool) -> None:
    """Refuse what the probe shows cannot train: logits over vocabularies of different sizes, or no hidden
    states for the cosine loss."""
    widths = {role: probe.logits.size(-1) for role, probe in probes.items()}
    if len(set(widths.values())) > 1:
        raise UserError(
            "the student's and the teacher's logits differ in vocabulary size ("
            + ", ".join(f"{role} ({probes[role].family}): {width}" for role, width in widths.items())
            + "); use a student config with the teacher's vocabulary"
        )
    for role, probe in probes.items():
        if want_hidden and probe.hidden_width is None:
            raise UserError(f"the {role} ({probe.family}) returns no hidden states, which the cosine loss compares; "
                            "set --alpha_cos 0")


def _hidden_projection(student_width: int, teacher_width: int, student: nn.Module, seed: int) -> nn.Linear:
    """A linear map from the student's last hidden state to the teacher's, for the cosine loss (TinyBERT's W_h, no
    bias), sized from the widths the models' hidden states really have (OPT's, say, are word_embed_proj_dim wide).

    nn.Linear's own initialisation, drawn on the host from a generator seeded with `seed` (the same start on every
    device, sharded or not), then moved to the student's device.
    """
    projection = nn.Linear(student_width, teacher_width, bias=False)
    nn.init.kaiming_uniform_(projection.weight, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
    logger.info(
        f"The student's hidden states are {student_width} wide and the teacher's {teacher_width}: the cosine loss goes "
        "through a learned projection (trained with the student, kept in the training state, not exported)"
    )
    return projection.to(next(student.parameters()).device)
