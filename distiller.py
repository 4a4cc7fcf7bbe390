"""The distillation trainer: batches, masking, the step (forward, losses, backward, optimizer step) and the loop.

`Distiller.train()` reads top to bottom: batch -> prepare_batch -> step (forward, losses, backward,
optimizer step at the accumulation boundary) -> log -> checkpoint. What is logged and how is metrics.py's
(`MetricsLogger`); which files are written and how is checkpointing.py's (`CheckpointManager`): the
trainer decides when, and knows its position in the data. With --fsdp the models are sharded first
(sharding.py) and the same loop runs: only how gradients are synchronised and the teacher's LM head is read
differ, in `_gradient_sync` and `_teacher_output`.

Runs survive interruptions: at every checkpoint and epoch end a training state is saved too, from which
`Distiller(..., training_state=...)` continues bit for bit; SIGTERM/SIGINT stop the run at the next
optimizer step with that state saved.
"""

import json
import math
import signal
import threading
from argparse import Namespace
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import AbstractContextManager, nullcontext
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, Sampler
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from checkpointing import CheckpointManager
from grouped_batch_sampler import GroupedBatchSampler, create_lengths_groups
from losses import DEFAULT_LOSS_CHUNK_SIZE, LOSS_TERMS, PROBE_SHAPE, TEACHER_TERMS, StudentWithLoss, TeacherOutput
from metrics import MetricsLogger, training_scalars
from run_folder import PreviousRun
from sharding import clip_grad_norm_, gathered_projection, shard_models, total_norm
from utils import (
    IGNORE_INDEX,
    NonFiniteLossError,
    TrainingInterrupted,
    get_rng_states,
    logger,
    set_rng_states,
)

if TYPE_CHECKING:
    from lm_seqs_dataset import LmSeqsDataset

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


def probe_ids(dataset: "LmSeqsDataset") -> Tensor:
    """The first PROBE_SHAPE tokens of the first sequences of the data: what StudentWithLoss probes the models with."""
    n_sequences, length = PROBE_SHAPE
    sequences = [dataset[index][0] for index in range(min(n_sequences, len(dataset)))]
    length = min(length, *(len(ids) for ids in sequences))
    return torch.tensor([ids[:length].tolist() for ids in sequences], dtype=torch.long)


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


class EpochRandomSampler(RandomSampler):
    """A RandomSampler whose order is a pure function of (seed, epoch), as DistributedSampler's is.

    The original drew each epoch's order from the global generator, which a resumed run cannot
    rebuild; here `set_epoch` reseeds a private generator with seed + epoch.
    """

    def __init__(self, data_source: Sized, seed: int):
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass over the data the order of `epoch`."""
        self.generator.manual_seed(self.seed + epoch)


class ResumableBatches(Sampler[list[int]]):
    """The batches of `batch_sampler` for one epoch, without the first `skip`.

    The epoch's order is a pure function of (seed, epoch), so a resumed run rebuilds the epoch it
    stopped in and leaves out the batches it already trained on, without loading them.
    """

    def __init__(self, batch_sampler: Sampler[list[int]]):
        self.batch_sampler = batch_sampler
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        return islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.batch_sampler) - self.skip


def _build_dataloader(params: Namespace, dataset: "LmSeqsDataset") -> tuple[Sampler, ResumableBatches, DataLoader]:
    """Random (one process) or distributed sampler -> grouped or plain batch sampler -> DataLoader.

    Nothing here draws from the global generators (the DataLoader takes its worker seed from a
    private one), so they serve only masking and dropout, and a training state can restore them.
    """
    if params.multi_gpu:
        sampler = DistributedSampler(
            dataset, num_replicas=params.world_size, rank=params.global_rank, seed=params.seed
        )
    else:
        sampler = EpochRandomSampler(dataset, seed=params.seed)
    if params.group_by_size:
        groups = create_lengths_groups(lengths=dataset.lengths, k=params.max_model_input_size)
        batch_sampler = GroupedBatchSampler(sampler=sampler, group_ids=groups, batch_size=params.batch_size)
    else:
        batch_sampler = BatchSampler(sampler=sampler, batch_size=params.batch_size, drop_last=False)
    batches = ResumableBatches(batch_sampler)
    # Workers only collate (no randomness): any --num_workers gives the same batches. Pinned batches
    # copy to a GPU asynchronously.
    dataloader = DataLoader(
        dataset=dataset, batch_sampler=batches, collate_fn=dataset.batch_sequences, generator=torch.Generator(),
        num_workers=getattr(params, "num_workers", 0), pin_memory=torch.device(params.device).type == "cuda",
    )
    return sampler, batches, dataloader


class _StopSignals:
    """While active, SIGTERM, SIGHUP and SIGINT ask the training loop to stop at its next optimizer step.

    Preemption (SLURM, Kubernetes, torchrun stopping its workers) sends SIGTERM and waits a grace
    period before SIGKILL: the loop saves its training state at the next optimizer step and stops.
    A second signal of the same kind gets the previous behaviour back (Ctrl-C twice: stop at once).
    Handlers can only be installed from the main thread; elsewhere signals keep their behaviour.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # SIGHUP: the terminal or the session closed

    def __init__(self):
        self.received = 0  # number of the last signal received; 0: none
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum in self.previous:
            signal.signal(signum, self._previous_handler(signum))
        self.previous = {}

    def _previous_handler(self, signum: int) -> object:
        """The handler before ours (one installed outside Python reads as None: the default)."""
        handler = self.previous[signum]
        return signal.SIG_DFL if handler is None else handler

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum
        signal.signal(signum, self._previous_handler(signum))
        logger.warning(
            f"{signal.Signals(signum).name} received: stopping at the next optimizer step with the training "
            "state saved (send it again to stop at once)"
        )


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
        training_state: from `load_training_state`, to continue an interrupted run where it stopped
            (with the same params); None starts from the beginning.
        tokenizer: saved with the finished student, so that `dump_path` is a complete model folder
            (`pipeline(..., model=dump_path)`).
    """

    def __init__(
        self,
        params: Namespace,
        dataset: "LmSeqsDataset",
        token_probs: Tensor | None,
        student: nn.Module,
        teacher: nn.Module | None,
        evaluator: Callable[[nn.Module], dict[str, float]] | None = None,
        training_state: dict | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        logger.info("Initializing Distiller")
        self.dump_path = Path(params.dump_path)
        self.is_master = params.is_master
        self.multi_gpu = params.multi_gpu
        self.world_size = params.world_size
        self.global_rank = params.global_rank
        self.seed = params.seed
        self.device = torch.device(params.device)
        self.n_epoch = params.n_epoch
        self.gradient_accumulation_steps = params.gradient_accumulation_steps
        self.max_grad_norm = params.max_grad_norm
        self.log_interval = params.log_interval
        self.checkpoint_interval = params.checkpoint_interval
        self.fp16 = params.fp16
        self.fsdp = getattr(params, "fsdp", False)
        self.temperature = params.temperature
        self.restrict_ce_to_mask = params.restrict_ce_to_mask
        self.alphas = {term: getattr(params, f"alpha_{term}") for term in LOSS_TERMS}
        self.active_terms = [term for term in LOSS_TERMS if self.alphas[term] > 0]
        self.params_text = json.dumps(vars(params), indent=4, default=str)

        self.sampler, self.batches, self.dataloader = _build_dataloader(params, dataset)
        self.batches_per_epoch = len(self.batches)

        self.mlm = params.mlm
        # Decided once: padding is the dataset's (the pad id for MLM and, as in the original, the unknown id for CLM).
        self.prepare_batch = self.prepare_batch_mlm if self.mlm else self.prepare_batch_clm
        self.pad_id = dataset.pad_id
        if self.mlm:
            self.mask_token_id = params.special_tok_ids["mask_token"]
            self.mlm_mask_prop = params.mlm_mask_prop
            self.token_probs = token_probs.float().cpu()  # batches are prepared on the host
            self.pred_probs = torch.tensor([params.word_mask, params.word_keep, params.word_rand], dtype=torch.float32)

        self.needs_teacher = any(self.alphas[term] > 0 for term in TEACHER_TERMS)
        if self.needs_teacher and teacher is None:
            raise ValueError(f"the loss terms {self.active_terms} need a teacher")
        # --fsdp: both models stay on the host (where they were loaded) until sharding moves them to the device one
        # unit at a time, so that a model larger than one device is never whole on it; the probe runs there too.
        home = torch.device("cpu") if self.fsdp else self.device
        self.teacher = teacher.to(home).eval() if self.needs_teacher else None
        self.evaluator = evaluator if self.is_master else None
        self.last_evaluation: dict[str, float] | None = None
        self.eval_interval = getattr(params, "eval_interval", 0)
        self.raw_student = student.to(home).train()
        self.vocab_size = self.raw_student.get_input_embeddings().weight.size(0)  # the ids it takes
        # The student and its loss in one module (and, for a narrower student, the projection of its hidden states),
        # after a probe of both models on the first sequences of the data: see StudentWithLoss.
        self.distillation = StudentWithLoss(
            self.raw_student, self.alphas, self.temperature, self.restrict_ce_to_mask,
            getattr(params, "loss_chunk_size", DEFAULT_LOSS_CHUNK_SIZE), self.teacher, self.seed,
            probe_ids(dataset), getattr(params, "fused_loss_explicit", False),
        )

        if self.fsdp:
            # Before the optimizer is built: sharding replaces the parameters by their shards (DTensors).
            logger.info("Sharding the student and its loss, and the teacher, with FSDP2 (--fsdp)")
            shard_models(self.distillation, self.raw_student, self.teacher, self.device, params.bf16)

        logger.info("--- Initializing model optimizer")
        self.optimizer = torch.optim.AdamW(
            optimizer_groups(self.distillation, params.weight_decay),
            lr=params.learning_rate,
            eps=params.adam_epsilon,
            betas=(0.9, 0.98),
            fused=True if self.device.type == "cuda" else None,  # one kernel for all parameters; CPU: the default
        )
        self.num_train_optimization_steps = (
            int(self.batches_per_epoch / self.gradient_accumulation_steps * self.n_epoch) + 1
        )
        self.num_warmup_steps = math.ceil(self.num_train_optimization_steps * params.warmup_prop)
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer,
            num_warmup_steps=self.num_warmup_steps,
            num_training_steps=self.num_train_optimization_steps,
        )
        n_trainable = sum(p.numel() for group in self.optimizer.param_groups for p in group["params"])
        n_total = sum(p.numel() for p in self.distillation.parameters())
        logger.info(f"Number of trainable parameters (student): {n_trainable} of {n_total}")

        # Decided once: autocast context and loss scaler (a disabled GradScaler is a pass-through).
        if self.fp16:
            self.autocast = torch.autocast(device_type=self.device.type, dtype=torch.float16)
        elif params.bf16:
            self.autocast = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        else:
            self.autocast = nullcontext()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.fp16)

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
        self.grad_norm: Tensor | None = None  # total gradient norm before clipping, at the last optimizer step
        self.weights_finite = torch.ones((), dtype=torch.bool, device=self.device)  # after the last step
        self.window_start: dict | None = None  # resume point at the start of the current accumulation window
        self.stop_signals = _StopSignals()
        self.stop_signal = 0  # the signal every process agreed to stop on at the last optimizer step; 0: none
        # Opened by `train`: building a Distiller writes nothing, so train.py can build (and check)
        # everything before it touches --dump_path.
        self.metrics = MetricsLogger(self.dump_path, self.is_master, self.world_size)
        self.checkpoints = CheckpointManager(
            params, self.raw_student, self.distillation, self.optimizer, self.scheduler, self.scaler,
            self.batches_per_epoch, tokenizer,
        )
        self.resumed = training_state is not None
        self.rng_to_restore: dict | None = None
        if self.resumed:
            self._restore(training_state)

        if getattr(params, "compile", False):
            # A compiled wrapper for the steps only; raw_student (same parameters) is what is saved and restored.
            self.distillation.student = torch.compile(self.raw_student)
        self.ddp = self.multi_gpu and not self.fsdp
        if self.ddp:
            logger.info("Using DistributedDataParallel for the student and its loss")
            # No device_ids: DDP would copy every input to the device, the host masks that select loss rows too.
            self.model = DistributedDataParallel(self.distillation)
        else:
            self.model = self.distillation
        # What the steps train: the DDP module (no_sync, communication hooks), the sharded root, or the student
        # given, in place.
        self.student = self.model if self.ddp or self.fsdp else self.distillation.student

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

    def train(self, previous_run: PreviousRun | None = None) -> None:
        """Run the epochs left (all, or from where a training state stopped), then save the final student.

        At every checkpoint interval and epoch end the training state is saved too. SIGTERM or SIGINT
        stop the run at the next optimizer step, after saving it.

        Args:
            previous_run: the run that --force replaces, set aside in dump_path: deleted just before
                this run writes its first checkpoint (until then the caller may put it back).

        Raises:
            NonFiniteLossError: a loss term became NaN or infinite (before the optimizer step).
            TrainingInterrupted: SIGTERM or SIGINT reached a process; the training state is saved.
        """
        logger.info("Starting training")
        self.checkpoints.previous_run = previous_run
        self.start_logging()
        self.student.train()
        if self.rng_to_restore is not None:
            set_rng_states(self.rng_to_restore, self.device)  # here, so that nothing draws before the first batch
        with self.stop_signals:
            for _ in range(self.epoch, self.n_epoch):
                iter_bar = self.start_epoch()
                for batch in iter_bar:
                    self.note_window_start()
                    input_ids, attention_mask, lm_labels = self.prepare_batch(batch)  # on the host; step copies
                    self.metrics.count_tokens(int(attention_mask.sum()))  # a host tensor: no device sync
                    self.step(input_ids=input_ids, attention_mask=attention_mask, lm_labels=lm_labels)
                    if self.n_total_iter % self.log_interval == 0:
                        self.log(iter_bar)
                    if self.n_total_iter % self.checkpoint_interval == 0 or self.stop_signal:
                        self.save_checkpoint("checkpoint.pth")
                        self.save_training_state()
                    if self.eval_interval and self.n_total_iter % self.eval_interval == 0:
                        self.evaluate()
                    if self.stop_signal:
                        raise TrainingInterrupted(self.stop_signal, self.n_total_iter, self.dump_path)
                iter_bar.close()
                self.end_epoch()
                self.save_training_state()

        logger.info("Save very last checkpoint as `pytorch_model.bin`.")
        self.save_checkpoint("pytorch_model.bin")
        self.save_pretrained()
        if self.multi_gpu:
            # The processes end together: one tearing its connections down while the master still writes the
            # folder can make gloo abort another at exit, failing a run that finished.
            dist.barrier()
        logger.info("Training is finished")

    def start_logging(self) -> None:
        """Open the tensorboard log; a new run logs its configuration, a resumed one hides the events the
        interrupted run logged after its training state (they are logged again)."""
        if self.resumed:
            self.metrics.open(purge_step=self.n_total_iter + 1)
        else:
            self.metrics.open()
            self.metrics.log_config(self.params_text, self.raw_student.config.to_json_string())

    def start_epoch(self) -> Iterable[tuple[Tensor, Tensor]]:
        """Set the data up for the current epoch (from where it stopped, when resuming) and return its progress bar."""
        logger.info(f"--- Starting epoch {self.epoch}/{self.n_epoch - 1}")
        self.sampler.set_epoch(self.epoch)  # the order: a function of (seed, epoch), the same on every process
        self.batches.skip = self.n_iter  # > 0 only when resuming: batches already trained on
        return self.metrics.progress(self.dataloader, self.n_iter, self.batches_per_epoch)

    def note_window_start(self) -> None:
        """When an accumulation window opens, remember its resume point: a save inside the window resumes from
        there. Taken before prepare_batch, whose masking draws from the generators this snapshot records."""
        if self.n_total_iter % self.gradient_accumulation_steps == 0:
            self.window_start = self.resume_point()

    def step(self, input_ids: Tensor, attention_mask: Tensor, lm_labels: Tensor) -> None:
        """Run one micro-batch: both forward passes, the losses, backward, and the optimizer step at the boundary.

        Leaves the loss values of this micro-batch in `last_loss` and `last_loss_<term>` (0-dim tensors,
        read back to the host only when logged). Nothing here waits for the device except the finite
        check at the accumulation boundary (one read of a few flags, see `_check_finite_and_stop`).

        Args:
            input_ids: (bs, seq_len) int64, on the host (copied without blocking) or the device.
            attention_mask: (bs, seq_len) bool, True on real tokens; best on the host: it also selects
                the loss rows, which needs no device sync from there.
            lm_labels: (bs, seq_len) int64, -100 where there is nothing to predict; best on the host too.

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
        input_ids = self._to_device(input_ids)
        # [F] the CLM models run without a mask: padding is at the end and attention is causal.
        model_mask = self._to_device(attention_mask) if self.mlm else None
        with self._gradient_sync(stepping):
            with self.autocast:
                t_output = self._teacher_output(input_ids, model_mask)
                loss, losses = self.model(input_ids, model_mask, attention_mask, lm_labels, t_output)
            self.scaler.scale(loss / self.gradient_accumulation_steps).backward()

        self._record(loss, losses)
        self.n_iter += 1
        self.n_total_iter += 1
        self.n_sequences_epoch += input_ids.size(0)
        if stepping:
            self.optimize()

    def _gradient_sync(self, stepping: bool) -> AbstractContextManager:
        """Reduce gradients across processes only on the micro-batch that steps the optimizer: DDP's `no_sync`
        inside a window; a sharded model reduce-scatters only when asked to."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(stepping)
        return self.model.no_sync() if self.ddp and not stepping else nullcontext()

    def _teacher_output(self, input_ids: Tensor, model_mask: Tensor | None) -> TeacherOutput | None:
        """The teacher's forward without gradients, in the autocast dtype; None without a teacher.

        Unsharded, in inference mode (no autograd bookkeeping at all); sharded, under no_grad, because FSDP's
        gathered parameters keep version counters, which inference tensors lack. A sharded teacher's projection,
        resharded after its forward, is gathered for the fused losses, which read it in the student's forward.
        """
        if self.teacher is None:
            return None
        with torch.no_grad() if self.fsdp else torch.inference_mode():
            t_output = self.distillation.teacher_output(self.teacher, input_ids, model_mask)
            if t_output.projection is not None:
                t_output = t_output._replace(projection=gathered_projection(t_output.projection))
        return t_output

    def _to_device(self, tensor: Tensor) -> Tensor:
        """Copy a host tensor to the training device without blocking (pinned first on CUDA, so the copy is async)."""
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

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
        """At the accumulation boundary: unscale, clip, finite check and stop agreement, optimizer and schedule step.

        The gradient norm that clipping computes is checked with the losses, before the step (with fp16 a
        non-finite norm is the GradScaler's business: it skips the step and lowers its scale). After the
        step, whether the weights are still finite is noted on the device, read before any save and at
        the next boundary.
        """
        self.scaler.unscale_(self.optimizer)
        self.grad_norm = clip_grad_norm_(self.model.parameters(), self.max_grad_norm).detach()
        self.stop_signal = self._check_finite_and_stop()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.n_optimizer_steps += 1
        self.weights_finite = total_norm(self.trained_parameters()).isfinite()

    def trained_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the optimizer updates."""
        return (param for group in self.optimizer.param_groups for param in group["params"])

    def _check_finite_and_stop(self) -> int:
        """Raise NonFiniteLossError on every process if any process saw a non-finite loss in this window, a
        non-finite gradient norm, or non-finite weights after the previous step; else return the stop signal
        any process received (0: none), the same on every process.

        Everything travels in one MIN all-reduce, the one the finite check needs anyway (a check on one
        process only would leave the others waiting in the next collective): the finite flags as 1/0,
        then the signal number negated. Every process thus stops at this same step, and no collective is
        added per micro-batch.
        """
        norm_finite = self.grad_norm.isfinite() | torch.tensor(self.fp16, device=self.device)
        received = torch.tensor([-self.stop_signals.received], dtype=torch.int32, device=self.device)
        finite = torch.cat([self.window_finite, norm_finite[None], self.weights_finite[None]])
        flags = torch.cat([finite.to(torch.int32), received])
        if self.multi_gpu:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        *finite_flags, negated_signal = flags.tolist()
        for term, is_finite in zip([*self.finite_terms, "gradient norm", "weights"], finite_flags):
            if not is_finite:
                raise NonFiniteLossError(self.n_total_iter, term)
        return -negated_signal

    def _check_weights_finite(self) -> None:
        """Raise NonFiniteLossError when the last optimizer step left a non-finite weight; before every save.

        Every process calls it (weights are the same on all), so all stop together.
        """
        if not bool(self.weights_finite):
            raise NonFiniteLossError(self.n_total_iter, "weights")

    def log(self, iter_bar: tqdm) -> None:
        """Write the tensorboard scalars of this iteration and refresh the progress bar (master only; every
        process takes part for a sharded student, whose parameters are gathered one at a time)."""
        if not self.is_master and not self.fsdp:
            return
        tensors = training_scalars(
            self.raw_student, self.grad_norm, self.total_loss_epoch / self.n_iter, self.last_loss, self.last_losses
        )
        self.metrics.log_step(self.n_total_iter, tensors, self.scheduler.get_last_lr()[0], iter_bar)

    def end_epoch(self) -> None:
        """Save `model_epoch_{epoch}.pth`, log `epoch/loss` and reset the epoch counters."""
        logger.info(f"--- Ending epoch {self.epoch}/{self.n_epoch - 1}")
        logger.info(f"{self.n_sequences_epoch} sequences have been trained during this epoch.")
        self.save_checkpoint(f"model_epoch_{self.epoch}.pth")
        if self.is_master:
            self.metrics.log_epoch(self.epoch, (self.total_loss_epoch / max(self.n_iter, 1)).item())
        self.evaluate()
        self.epoch += 1
        self.n_sequences_epoch = 0
        self.n_iter = 0
        self.total_loss_epoch = torch.zeros((), device=self.device)

    def evaluate(self) -> None:
        """Run the evaluator on the student and log its figures as `eval/<name>` (master only)."""
        if self.evaluator is None:
            return
        figures = self.evaluator(self.raw_student)
        self.last_evaluation = {"iteration": self.n_total_iter, **figures}
        self.metrics.log_evaluation(self.n_total_iter, figures)

    def save_checkpoint(self, checkpoint_name: str = "checkpoint.pth") -> None:
        """Write the student's weights as `dump_path/checkpoint_name` with its config.json (master only)."""
        self._check_weights_finite()
        self.checkpoints.save_checkpoint(checkpoint_name)

    def save_pretrained(self) -> None:
        """Make dump_path a complete model folder with a model card (master only; see `CheckpointManager.export`)."""
        self._check_weights_finite()
        steps = {"optimizer_steps": self.n_optimizer_steps, "iterations": self.n_total_iter, "epochs": self.epoch}
        self.checkpoints.export(steps, self.last_evaluation)

    def save_training_state(self) -> None:
        """Write `training_state.pth` (every process calls it: a collective; see `CheckpointManager`).

        At an optimizer-step boundary it describes now. Inside an accumulation window it describes the
        window's start (the weights and the optimizer have not moved since): a resumed run re-runs the
        window's first micro-batches rather than storing half-accumulated gradients, which differ on every
        process.
        """
        self._check_weights_finite()
        at_boundary = self.n_total_iter % self.gradient_accumulation_steps == 0
        self.metrics.flush()  # the events logged so far survive a kill, as the state does
        self.checkpoints.save_training_state(self.resume_point() if at_boundary else self.window_start)

    def _restore(self, state: dict) -> None:
        """Take up a training state (checked by `CheckpointManager.restore`) and its counters and data position;
        the generator states are set when training starts (`train`), so that nothing draws before the first batch.

        Raises:
            UserError: the state is damaged, or belongs to another number of processes, seed, data or model.
        """
        point = self.checkpoints.restore(state)
        position, counters = point["position"], point["counters"]
        self.epoch, self.n_iter = position["epoch"], position["batches_done"]
        self.n_total_iter = counters["n_total_iter"]
        self.n_optimizer_steps = counters["n_optimizer_steps"]
        self.n_sequences_epoch = counters["n_sequences_epoch"]
        self.total_loss_epoch = counters["total_loss_epoch"].to(self.device)
        self.rng_to_restore = point["rng"]
        logger.info(
            f"Resuming at iteration {self.n_total_iter} (optimizer step {self.n_optimizer_steps}), epoch "
            f"{self.epoch}, after {self.n_iter} of its {self.batches_per_epoch} batches"
        )

    def resume_point(self) -> dict:
        """Where a resumed run would start if the run stopped at this optimizer-step boundary.

        Returns:
            {"position": epoch and batches done in it, "counters": iteration, step and loss counters,
            "rng": this process's generator states}.
        """
        return {
            "position": {"epoch": self.epoch, "batches_done": self.n_iter},
            "counters": {
                "n_total_iter": self.n_total_iter,
                "n_optimizer_steps": self.n_optimizer_steps,
                "n_sequences_epoch": self.n_sequences_epoch,
                "total_loss_epoch": self.total_loss_epoch.clone(),
            },
            "rng": get_rng_states(self.device),
        }

    def close(self) -> None:
        """Flush and close the tensorboard writer."""
        self.metrics.close()

