"""The distillation trainer: batches, losses, optimisation, logging and checkpoints of one run.

`Distiller.train()` reads top to bottom: batch -> prepare_batch -> step (forward, losses, backward,
optimizer step at the accumulation boundary) -> log -> checkpoint. Only the master process writes
to `dump_path`; the other processes get a do-nothing tensorboard writer.
"""

import json
import math
import os
import tempfile
import time
from argparse import Namespace
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, Sampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from grouped_batch_sampler import GroupedBatchSampler, create_lengths_groups
from utils import IGNORE_INDEX, NonFiniteLossError, atomic_write, logger

if TYPE_CHECKING:
    from lm_seqs_dataset import LmSeqsDataset

LOSS_TERMS = ("ce", "mlm", "clm", "mse", "cos")
# Terms that compare with the teacher: when all of them weigh 0 the teacher is never run.
TEACHER_TERMS = ("ce", "mse", "cos")

# Weight decay is decided by module type: the original matched the name `LayerNorm.weight`, which
# missed DistilBERT's sa_layer_norm/output_layer_norm/vocab_layer_norm and GPT-2's ln_*.
NORM_TYPES = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)



def mask_tokens(
    token_ids: Tensor,
    attention_mask: Tensor,
    token_probs: Tensor,
    mlm_mask_prop: float,
    pred_probs: Tensor,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Choose the MLM targets of a batch and corrupt them.

    ceil(mlm_mask_prop x real tokens) targets are drawn without replacement among the real positions,
    with probability proportional to `token_probs[id]`; each target is then replaced by the mask id,
    kept, or replaced by a uniformly random id with probabilities `pred_probs`.

    Args:
        token_ids: (bs, seq_len) int64 padded ids.
        attention_mask: (bs, seq_len) bool, True on real tokens; padding is never a target.
        token_probs: (vocab_size,) float32 sampling weight per id, 0 for ids that must never be
            a target (special tokens).
        mlm_mask_prop: fraction of the real tokens that become targets, rounded up.
        pred_probs: (3,) float32 probabilities of (mask, keep, random) for a target.
        mask_token_id: id written on "mask" targets.
        vocab_size: "random" targets get an id drawn uniformly from [0, vocab_size).
        generator: random generator on the tensors' device; None uses torch's default one.

    Returns:
        (input_ids, labels): both (bs, seq_len) int64; labels hold the original id on targets and
        -100 everywhere else.
    """
    flat_ids = token_ids.flatten()
    real_positions = attention_mask.flatten().nonzero().squeeze(1)  # (n_real,)
    # XLM/word2vec smoothing: token_probs = count ** -0.7, so rare ids are picked as targets more often.
    # Sampling stays in float32 whatever the training precision.
    weights = token_probs[flat_ids[real_positions]].float()  # (n_real,)
    # Capped by the candidates: sampling without replacement cannot draw more than the non-zero weights.
    n_targets = min(math.ceil(mlm_mask_prop * real_positions.numel()), int(torch.count_nonzero(weights)))
    labels = torch.full_like(flat_ids, IGNORE_INDEX)
    if n_targets == 0:
        return token_ids.clone(), labels.view_as(token_ids)
    targets = real_positions[torch.multinomial(weights, n_targets, replacement=False, generator=generator)]
    labels[targets] = flat_ids[targets]

    # BERT's 80/10/10 by default: action 0 = mask, 1 = keep, 2 = random id.
    action = torch.multinomial(pred_probs.float(), n_targets, replacement=True, generator=generator)
    random_ids = torch.randint(vocab_size, (n_targets,), generator=generator, device=flat_ids.device)
    replacement = torch.where(action == 0, mask_token_id, torch.where(action == 1, flat_ids[targets], random_ids))
    input_ids = flat_ids.clone()
    input_ids[targets] = replacement
    return input_ids.view_as(token_ids), labels.view_as(token_ids)


def round_batch_for_fp16(token_ids: Tensor, lengths: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Make batch size and sequence length multiples of 8, the shapes fp16 tensor cores run fastest on.

    Random sequences are dropped so that the batch size is a multiple of 8 (only when it is >= 8);
    the length is padded with `pad_id` up to the next multiple of 8.

    Args:
        token_ids: (bs, seq_len) int64.
        lengths: (bs,) int64.
        pad_id: id used for the added padding columns.

    Returns:
        (token_ids (bs', seq_len'), lengths (bs',)) with bs' = 8 * (bs // 8) when bs >= 8 and
        seq_len' = 8 * ceil(seq_len / 8).
    """
    batch_size = token_ids.size(0)
    if batch_size >= 8 and batch_size % 8:
        keep = torch.randperm(batch_size)[: batch_size - batch_size % 8]
        token_ids, lengths = token_ids[keep], lengths[keep]
    pad = -token_ids.size(1) % 8
    if pad:
        token_ids = F.pad(token_ids, (0, pad), value=pad_id)
    return token_ids, lengths


def _kl_distillation(s_logits: Tensor, t_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) summed over the vocabulary, averaged over rows, times T^2 (Hinton et al.)."""
    log_p_student = F.log_softmax(s_logits / temperature, dim=-1)
    p_teacher = F.softmax(t_logits / temperature, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2


def _token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the positions whose label is not -100; logits (..., vocab), labels (...)."""
    targets = labels != IGNORE_INDEX
    return F.cross_entropy(logits[targets].float(), labels[targets])


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
        alphas: weight of each term in LOSS_TERMS; terms with weight 0 are not computed.
        temperature: softmax temperature T of the ce term.
        restrict_ce_to_mask: select only the MLM targets for ce and mse.

    Returns:
        {term: loss} in LOSS_TERMS order, for the terms with alphas[term] > 0.
    """
    selected = lm_labels != IGNORE_INDEX if restrict_ce_to_mask else attention_mask  # (bs, seq_len) bool

    def selected_logits() -> tuple[Tensor, Tensor]:
        # Select rows, never a (bs, seq_len, vocab) mask: (n_selected, vocab) each.
        return s_logits[selected].float(), t_logits[selected].float()

    def mse() -> Tensor:
        s_rows, t_rows = selected_logits()
        return F.mse_loss(s_rows, t_rows, reduction="sum") / s_rows.size(0)

    terms = {
        "ce": lambda: _kl_distillation(*selected_logits(), temperature),
        "mlm": lambda: _token_cross_entropy(s_logits, lm_labels),
        "clm": lambda: _token_cross_entropy(s_logits[:, :-1], lm_labels[:, 1:]),
        "mse": mse,
        "cos": lambda: _cosine_loss(s_hidden[attention_mask], t_hidden[attention_mask]),
    }
    return {term: loss() for term, loss in terms.items() if alphas[term] > 0}


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on every trainable parameter except biases and normalisation weights.

    Normalisation layers are recognised by module type (NORM_TYPES); frozen parameters are left out;
    a parameter shared by several modules (tied embeddings) appears once.

    Args:
        model: the student.
        weight_decay: decay of the first group.

    Returns:
        [{"params": decayed, "weight_decay": weight_decay}, {"params": not decayed, "weight_decay": 0.0}].
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            exempt = name.endswith("bias") or isinstance(module, NORM_TYPES)
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _build_dataloader(params: Namespace, dataset: "LmSeqsDataset") -> tuple[Sampler, DataLoader]:
    """Random (one process) or distributed sampler -> grouped or plain batch sampler -> DataLoader."""
    if params.multi_gpu:
        sampler = DistributedSampler(
            dataset, num_replicas=params.world_size, rank=params.global_rank, seed=params.seed
        )
    else:
        sampler = RandomSampler(dataset)
    if params.group_by_size:
        groups = create_lengths_groups(lengths=dataset.lengths, k=params.max_model_input_size)
        batch_sampler = GroupedBatchSampler(sampler=sampler, group_ids=groups, batch_size=params.batch_size)
    else:
        batch_sampler = BatchSampler(sampler=sampler, batch_size=params.batch_size, drop_last=False)
    dataloader = DataLoader(dataset=dataset, batch_sampler=batch_sampler, collate_fn=dataset.batch_sequences)
    return sampler, dataloader


class _NullWriter:
    """Stands in for the tensorboard SummaryWriter on non-master processes: every call does nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        """Do nothing."""

    def add_text(self, *args, **kwargs) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""


class Distiller:
    """Distils `teacher` into `student` on `dataset`; see SPEC section 7.

    Args:
        params: train.py's namespace plus what `init_gpu_params` sets, `special_tok_ids` and
            `max_model_input_size`. Read once here, never written.
        dataset: the token sequences; `dataset.lengths` and `dataset.batch_sequences` are used.
        token_probs: (vocab_size,) float32 MLM target weights (see `mask_tokens`); None for CLM.
        student: the model being trained (moved to `params.device`; trained in place).
        teacher: the frozen model being imitated (moved to `params.device`, eval mode). May be None
            when every teacher term (ce, mse, cos) weighs 0: then the student learns from the labels
            alone, the no-teacher baseline of the paper's ablation, at the cost of the student only.
        evaluator: called with the student every `params.eval_interval` iterations (0: never) and
            at each epoch end, on the master; its figures are logged as `eval/<name>`.
    """

    def __init__(
        self,
        params: Namespace,
        dataset: "LmSeqsDataset",
        token_probs: Tensor | None,
        student: nn.Module,
        teacher: nn.Module | None,
        evaluator: Callable[[nn.Module], dict[str, float]] | None = None,
    ):
        logger.info("Initializing Distiller")
        self.dump_path = Path(params.dump_path)
        self.is_master = params.is_master
        self.multi_gpu = params.multi_gpu
        self.device = torch.device(params.device)
        self.n_epoch = params.n_epoch
        self.gradient_accumulation_steps = params.gradient_accumulation_steps
        self.max_grad_norm = params.max_grad_norm
        self.log_interval = params.log_interval
        self.checkpoint_interval = params.checkpoint_interval
        self.fp16 = params.fp16
        self.temperature = params.temperature
        self.restrict_ce_to_mask = params.restrict_ce_to_mask
        self.alphas = {term: getattr(params, f"alpha_{term}") for term in LOSS_TERMS}
        self.active_terms = [term for term in LOSS_TERMS if self.alphas[term] > 0]
        self.params_text = json.dumps(vars(params), indent=4, default=str)

        self.sampler, self.dataloader = _build_dataloader(params, dataset)

        self.mlm = params.mlm
        # Decided once: padding is the pad id for MLM and, as in the original, the unknown id for CLM.
        self.prepare_batch = self.prepare_batch_mlm if self.mlm else self.prepare_batch_clm
        self.pad_id = params.special_tok_ids["pad_token" if self.mlm else "unk_token"]
        if self.mlm:
            self.mask_token_id = params.special_tok_ids["mask_token"]
            self.mlm_mask_prop = params.mlm_mask_prop
            self.token_probs = token_probs.float().cpu()  # batches are prepared on the host
            self.pred_probs = torch.tensor([params.word_mask, params.word_keep, params.word_rand], dtype=torch.float32)

        self.needs_teacher = any(self.alphas[term] > 0 for term in TEACHER_TERMS)
        if self.needs_teacher and teacher is None:
            raise ValueError(f"the loss terms {self.active_terms} need a teacher")
        self.teacher = teacher.to(self.device).eval() if self.needs_teacher else None
        self.evaluator = evaluator if self.is_master else None
        self.eval_interval = getattr(params, "eval_interval", 0)
        self.raw_student = student.to(self.device).train()
        self.vocab_size = self.raw_student.config.vocab_size

        logger.info("--- Initializing model optimizer")
        self.optimizer = torch.optim.AdamW(
            optimizer_groups(self.raw_student, params.weight_decay),
            lr=params.learning_rate,
            eps=params.adam_epsilon,
            betas=(0.9, 0.98),
        )
        self.num_train_optimization_steps = (
            int(len(self.dataloader) / self.gradient_accumulation_steps * self.n_epoch) + 1
        )
        self.num_warmup_steps = math.ceil(self.num_train_optimization_steps * params.warmup_prop)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer,
            num_warmup_steps=self.num_warmup_steps,
            num_training_steps=self.num_train_optimization_steps,
        )
        n_trainable = sum(p.numel() for group in self.optimizer.param_groups for p in group["params"])
        n_total = sum(p.numel() for p in self.raw_student.parameters())
        logger.info(f"Number of trainable parameters (student): {n_trainable} of {n_total}")

        # Decided once: autocast context and loss scaler (a disabled GradScaler is a pass-through).
        if self.fp16:
            self.autocast = torch.autocast(device_type=self.device.type, dtype=torch.float16)
        elif params.bf16:
            self.autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        else:
            self.autocast = nullcontext()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.fp16)

        if self.multi_gpu:
            logger.info("Using DistributedDataParallel for the student")
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.student = DistributedDataParallel(self.raw_student, device_ids=device_ids)
        else:
            self.student = self.raw_student

        self.epoch = 0
        self.n_iter = 0  # micro-batches in the current epoch
        self.n_total_iter = 0  # micro-batches since the start: log and checkpoint intervals count these [F]
        self.n_optimizer_steps = 0
        self.n_sequences_epoch = 0
        self.total_loss_epoch = torch.zeros((), device=self.device)
        self.last_loss = torch.zeros((), device=self.device)
        for term in LOSS_TERMS:
            setattr(self, f"last_loss_{term}", torch.zeros((), device=self.device))
        self.last_losses: dict[str, Tensor] = {}
        self.finite_terms = [f"loss_{term}" for term in self.active_terms] + ["loss"]
        self.window_finite = torch.ones(len(self.finite_terms), dtype=torch.bool, device=self.device)
        self.last_log = time.time()

        if self.is_master:
            logger.info("--- Initializing Tensorboard")
            self.tensorboard = SummaryWriter(log_dir=str(self.dump_path / "log" / "train"), flush_secs=60)
        else:
            self.tensorboard = _NullWriter()

    def _batch_prologue(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Shared opening of both batch preparations: fp16 rounding and the attention mask."""
        token_ids, lengths = batch
        if token_ids.size(0) != lengths.size(0):
            raise ValueError(f"batch of {token_ids.size(0)} sequences came with {lengths.size(0)} lengths")
        if self.fp16:
            token_ids, lengths = round_batch_for_fp16(token_ids, lengths, self.pad_id)
        positions = torch.arange(token_ids.size(1), device=lengths.device)
        attention_mask = positions < lengths[:, None]  # (bs, seq_len) bool
        return token_ids, lengths, attention_mask

    def prepare_batch_mlm(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Masked-LM batch: targets chosen and corrupted by `mask_tokens`.

        Args:
            batch: (token_ids (bs, seq_len) int64, lengths (bs,) int64), as `batch_sequences` returns.

        Returns:
            (input_ids (bs, seq_len) int64, attention_mask (bs, seq_len) bool,
            labels (bs, seq_len) int64: the original id on targets, -100 elsewhere).
        """
        token_ids, _, attention_mask = self._batch_prologue(batch)
        input_ids, labels = mask_tokens(
            token_ids,
            attention_mask,
            self.token_probs.to(token_ids.device),
            self.mlm_mask_prop,
            self.pred_probs.to(token_ids.device),
            self.mask_token_id,
            self.vocab_size,
        )
        return input_ids, attention_mask, labels

    def prepare_batch_clm(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Causal-LM batch: the labels are the ids themselves, -100 on padding.

        Args:
            batch: (token_ids (bs, seq_len) int64, lengths (bs,) int64), as `batch_sequences` returns.

        Returns:
            (input_ids (bs, seq_len) int64, attention_mask (bs, seq_len) bool, labels (bs, seq_len) int64).
        """
        token_ids, _, attention_mask = self._batch_prologue(batch)
        labels = token_ids.masked_fill(~attention_mask, IGNORE_INDEX)
        return token_ids, attention_mask, labels

    def train(self) -> None:
        """Run `n_epoch` epochs over the data, then save the final student."""
        logger.info("Starting training")
        self.log_config()
        self.student.train()
        for _ in range(self.n_epoch):
            logger.info(f"--- Starting epoch {self.epoch}/{self.n_epoch - 1}")
            if isinstance(self.sampler, DistributedSampler):
                self.sampler.set_epoch(self.epoch)  # a new shuffle every epoch, the same on every process

            iter_bar = tqdm(self.dataloader, desc="-Iter", disable=not self.is_master)
            for batch in iter_bar:
                input_ids, attention_mask, lm_labels = (t.to(self.device) for t in self.prepare_batch(batch))
                self.step(input_ids=input_ids, attention_mask=attention_mask, lm_labels=lm_labels)
                if self.n_total_iter % self.log_interval == 0:
                    self.log(iter_bar)
                if self.n_total_iter % self.checkpoint_interval == 0:
                    self.save_checkpoint("checkpoint.pth")
                if self.eval_interval and self.n_total_iter % self.eval_interval == 0:
                    self.evaluate()
            iter_bar.close()

            logger.info(f"--- Ending epoch {self.epoch}/{self.n_epoch - 1}")
            self.end_epoch()

        logger.info("Save very last checkpoint as `pytorch_model.bin`.")
        self.save_checkpoint("pytorch_model.bin")
        self.save_pretrained()
        logger.info("Training is finished")

    def step(self, input_ids: Tensor, attention_mask: Tensor, lm_labels: Tensor) -> None:
        """Run one micro-batch: both forward passes, the losses, backward, and the optimizer step at the boundary.

        Leaves the loss values of this micro-batch in `last_loss` and `last_loss_<term>` (0-dim tensors,
        read back to the host only when logged).

        Args:
            input_ids: (bs, seq_len) int64.
            attention_mask: (bs, seq_len) bool, True on real tokens.
            lm_labels: (bs, seq_len) int64, -100 where there is nothing to predict.

        Raises:
            NonFiniteLossError: at the accumulation boundary, on every process, when a loss term of the
                window was NaN or infinite on any process; the optimizer has not stepped.
        """
        opens_window = self.n_total_iter % self.gradient_accumulation_steps == 0
        stepping = (self.n_total_iter + 1) % self.gradient_accumulation_steps == 0
        if opens_window:
            # Cleared when a window opens rather than right after the step, so that the gradients
            # logged after a step (grad_mean/grad_std) are the ones that were just applied.
            self.optimizer.zero_grad(set_to_none=True)
            self.window_finite.fill_(True)
        # [F] the CLM models run without a mask: padding is at the end and attention is causal.
        model_mask = attention_mask if self.mlm else None
        # Under DDP, all-reduce gradients only on the micro-batch that steps the optimizer.
        sync_context = self.student.no_sync() if self.multi_gpu and not stepping else nullcontext()
        with sync_context:
            with self.autocast:
                t_output = None
                if self.teacher is not None:
                    with torch.no_grad():
                        t_output = self.teacher(input_ids=input_ids, attention_mask=model_mask)
                s_output = self.student(input_ids=input_ids, attention_mask=model_mask)
            want_hidden = self.alphas["cos"] > 0
            losses = compute_losses(
                s_output.logits,
                t_output.logits if t_output is not None else None,
                s_output.hidden_states[-1] if want_hidden else None,
                t_output.hidden_states[-1] if want_hidden else None,
                attention_mask,
                lm_labels,
                self.alphas,
                self.temperature,
                self.restrict_ce_to_mask,
            )
            loss = sum(self.alphas[term] * value for term, value in losses.items())
            self.scaler.scale(loss / self.gradient_accumulation_steps).backward()

        self._record(loss, losses)
        self.n_iter += 1
        self.n_total_iter += 1
        self.n_sequences_epoch += input_ids.size(0)
        if stepping:
            self.optimize()

    def _record(self, loss: Tensor, losses: dict[str, Tensor]) -> None:
        """Keep this micro-batch's loss values as device tensors and fold them into the window's finite flags."""
        self.last_loss = loss.detach()
        self.last_losses = {term: value.detach() for term, value in losses.items()}
        for term, value in self.last_losses.items():
            setattr(self, f"last_loss_{term}", value)
        self.total_loss_epoch += self.last_loss
        values = torch.stack([*self.last_losses.values(), self.last_loss])  # in finite_terms order
        self.window_finite &= torch.isfinite(values)

    def optimize(self) -> None:
        """At the accumulation boundary: finite check, unscale, clip, optimizer step, schedule step."""
        self._check_finite()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.n_optimizer_steps += 1

    def _check_finite(self) -> None:
        """Raise NonFiniteLossError on every process if any process saw a non-finite loss in this window.

        The flags are all-reduced with MIN: a check on one process only would leave the others
        waiting in the next collective.
        """
        flags = self.window_finite.to(torch.int32)
        if self.multi_gpu:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        for term, finite in zip(self.finite_terms, flags.tolist()):
            if not finite:
                raise NonFiniteLossError(self.n_total_iter, term)

    def log(self, iter_bar: tqdm) -> None:
        """Write the tensorboard scalars of this iteration and refresh the progress bar (master only)."""
        if not self.is_master:
            return
        tensors = self._scalar_tensors()
        # One host read for every tensor-valued scalar of this log.
        scalars = dict(zip(tensors, torch.stack([t.float() for t in tensors.values()]).tolist()))
        scalars["learning_rate/lr"] = self.scheduler.get_last_lr()[0]
        scalars["global/memory_usage"] = psutil.virtual_memory().used / 1_000_000  # MB used on the machine
        scalars["global/speed"] = time.time() - self.last_log  # seconds since the last log
        for tag, value in scalars.items():
            self.tensorboard.add_scalar(tag=tag, scalar_value=value, global_step=self.n_total_iter)
        iter_bar.set_postfix(
            {
                "Last_loss": f"{scalars['losses/loss']:.2f}",
                "Avg_cum_loss": f"{scalars['losses/cum_avg_loss_epoch']:.2f}",
            }
        )
        self.last_log = time.time()

    def _scalar_tensors(self) -> dict[str, Tensor]:
        """The [F] parameter, gradient and loss scalars as 0-dim device tensors, keyed by tensorboard tag."""
        tensors = {}
        for name, param in self.raw_student.named_parameters():
            tensors[f"parameter_mean/{name}"] = param.detach().mean()
            tensors[f"parameter_std/{name}"] = param.detach().std()
            if param.grad is None:
                continue
            tensors[f"grad_mean/{name}"] = param.grad.mean()
            tensors[f"grad_std/{name}"] = param.grad.std()
        tensors["losses/cum_avg_loss_epoch"] = self.total_loss_epoch / self.n_iter
        tensors["losses/loss"] = self.last_loss
        for term, value in self.last_losses.items():
            tensors[f"losses/loss_{term}"] = value
        return tensors

    def log_config(self) -> None:
        """Write the training parameters and the student config as tensorboard text at step 0 (master only)."""
        if not self.is_master:
            return
        self.tensorboard.add_text("config/training", _as_markdown_code(self.params_text), 0)
        self.tensorboard.add_text("config/student", _as_markdown_code(self.raw_student.config.to_json_string()), 0)

    def end_epoch(self) -> None:
        """Save `model_epoch_{epoch}.pth`, log `epoch/loss` and reset the epoch counters."""
        logger.info(f"{self.n_sequences_epoch} sequences have been trained during this epoch.")
        self.save_checkpoint(f"model_epoch_{self.epoch}.pth")
        self.log_epoch()
        self.evaluate()
        self.epoch += 1
        self.n_sequences_epoch = 0
        self.n_iter = 0
        self.total_loss_epoch = torch.zeros((), device=self.device)

    def log_epoch(self) -> None:
        """Write the epoch's average loss as `epoch/loss` (master only)."""
        if not self.is_master:
            return
        average = (self.total_loss_epoch / max(self.n_iter, 1)).item()
        self.tensorboard.add_scalar(tag="epoch/loss", scalar_value=average, global_step=self.epoch)

    def evaluate(self) -> None:
        """Run the evaluator on the student and log its figures as `eval/<name>` (master only)."""
        if self.evaluator is None:
            return
        figures = self.evaluator(self.raw_student)
        for name, value in figures.items():
            self.tensorboard.add_scalar(tag=f"eval/{name}", scalar_value=value, global_step=self.n_total_iter)
        logger.info(f"Evaluation at iteration {self.n_total_iter}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))

    def save_checkpoint(self, checkpoint_name: str = "checkpoint.pth") -> None:
        """Write the student's state dict as `dump_path/checkpoint_name` and its config.json (master only).

        Both go through a temporary file and a rename, so a crash never leaves a half-written checkpoint.
        """
        if not self.is_master:
            return
        atomic_write(self.dump_path / "config.json", self.raw_student.config.to_json_file)
        atomic_write(self.dump_path / checkpoint_name, partial(torch.save, self.raw_student.state_dict()))

    def save_pretrained(self) -> None:
        """Save the student with `save_pretrained` (config + safetensors) in dump_path (master only)."""
        if not self.is_master:
            return
        with tempfile.TemporaryDirectory(prefix=".save_pretrained.", dir=self.dump_path) as tmp:
            self.raw_student.save_pretrained(tmp)
            for file in Path(tmp).iterdir():
                os.replace(file, self.dump_path / file.name)

    def close(self) -> None:
        """Flush and close the tensorboard writer."""
        self.tensorboard.close()


def _as_markdown_code(text: str) -> str:
    """Indent every line by four spaces: a markdown code block in tensorboard's text tab."""
    return "\n".join("    " + line for line in text.splitlines())
