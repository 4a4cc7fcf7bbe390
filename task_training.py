"""The second step's training loop: fine-tuning, with or without a teacher, on a task (SQuAD, GLUE).

One loop serves run_squad_w_distillation.py and run_glue_w_distillation.py; the task scripts own their
data, their loss terms and their evaluation. It reuses the Distiller's pieces (`optimizer_groups`,
`EpochRandomSampler`), the project's process-group set-up and seeding (`utils.init_gpu_params`,
`utils.set_seed`) and its distillation KL (`losses.kl_distillation`).

API (in the order a task script calls it):
- `add_task_arguments(parser, model_types)`: the flags both task scripts share, with the originals'
  defaults (`--model_type`, `--model_name_or_path`, `--output_dir`, `--teacher_type`, `--alpha_ce`,
  `--temperature`, the optimisation, logging, checkpoint and device flags, and [+] `--teacher_dtype`,
  `--bf16`, `--dist_timeout`). `--max_seq_length` and the task's own flags stay in each script.
- `check_task_arguments(args)`: the checks of those flags (one `UserError` each).
- `setup_run(args, kind, own_files)`: refuse an `--output_dir` that training may not replace
  (`check_output_dir`: non-empty without `--overwrite_output_dir`, or not a previous run of the script `kind`),
  start the process group (gloo with `--no_cuda`, NCCL on GPUs, one process per GPU under torchrun), seed, log
  the flags. Sets `args.n_gpu`, `args.device`, `args.is_master`, `args.multi_gpu`, `args.world_size`, ...
- `output_folder(args, kind, own_files, done_file)`: the context a training run writes in: `--output_dir`
  locked and marked, a previous run set aside whole until the run completes (run_folder.run_folder_session).
- `load_task_model(model_class, model_type, name_or_path, flag, ...)`: a model with a task head, its
  family checked against `--model_type` / `--teacher_type` (one line when they differ).
- `load_teacher(args, model_class, **config_overrides)`: the frozen teacher in `--teacher_dtype`, or None
  without `--teacher_type`.
- `check_same_vocabulary(teacher, student, teacher_tokenizer, student_tokenizer)`: one line when the
  teacher's and the student's token ids do not mean the same tokens.
- `soft_target_loss(s_logits, t_logits, temperature)`: KL(teacher || student) at T, batchmean, times T^2.
- `train(args, student, teacher, dataset, loss_fn, tokenizer, evaluate=None) -> int`: the loop; returns the
  number of optimizer steps. `dataset` yields dicts of tensors (one feature each); `loss_fn(student, teacher,
  batch)` runs the models on a batch already on the device and returns {"loss": total, term: value, ...}.
  Every `--save_steps` steps it writes `checkpoint-<step>/`, every `--logging_steps` it logs `lr` and `loss`
  to tensorboard (`<output_dir>/runs`) and, with `--evaluate_during_training`, `eval_<key>` of
  `evaluate(model, prefix)`. It ends with the complete model folder in `--output_dir`.
- `save_model_folder(folder, model, tokenizer, args=None, extra=None)`: a complete model folder (safetensors
  weights, config, tokenizer, `training_args.json`), atomically.
- `checkpoints_to_evaluate(output_dir, eval_all_checkpoints)`: the folders `--do_eval` evaluates.
- `run_script(main, argv)`: the entry point: a UserError or a non-finite loss is one `error:` line, exit 1.

Intervals (`--logging_steps`, `--save_steps`, `--max_steps`, `--warmup_steps`) count optimizer steps, as in
the original.
"""

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
from argparse import Namespace
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import AutoConfig, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from distiller import EpochRandomSampler, optimizer_groups
from losses import kl_distillation
from metrics import NullWriter
from run_folder import RUN_FILE_PATTERNS, check_force_target, run_folder_session
from scripts.file_safety import delete_own
from scripts.cli_flags import LEARNING_RATE_RANGE, SEED_RANGE, non_negative_float, non_negative_int, number
from utils import (
    DIST_TIMEOUT_S,
    MODEL_LOAD_ERRORS,
    TEACHER_DTYPES,
    TMP_PREFIX,
    TMP_SUFFIX,
    NonFiniteLossError,
    UserError,
    check_model_folder,
    init_gpu_params,
    load_failure,
    logger,
    lost_another_process,
    publish,
    reported_as_write_error,
    set_seed,
    setup_logging,
    write_json,
)

AUTO = "auto"  # [+] any family whose config the task's Auto class knows
CHECKPOINT_PREFIX = "checkpoint-"
OPTIMIZER_FILE, SCHEDULER_FILE, TRAINING_ARGS_FILE = "optimizer.pt", "scheduler.pt", "training_args.json"
LOG_DIR = "runs"  # tensorboard, inside --output_dir
# What the loop and the scripts' evaluations write in --output_dir (a task script adds its own names).
TASK_RUN_FILES = (f"{CHECKPOINT_PREFIX}*", LOG_DIR, TRAINING_ARGS_FILE, "eval_results*")


def add_task_arguments(parser: argparse.ArgumentParser, model_types: Sequence[str]) -> None:
    """Add the flags the task scripts share, with the original scripts' defaults ([+] marks new ones).

    Args:
        parser: the script's parser (scripts.cli_flags.ArgumentParser, for one-line usage errors).
        model_types: the choices of --model_type and --teacher_type, `auto` included.
    """
    add = parser.add_argument
    add("--model_type", required=True, choices=list(model_types), help="Student family.")
    add("--model_name_or_path", required=True, help="Student: a local folder or a hub name.")
    add("--output_dir", required=True, help="Where the checkpoints, predictions and the final model go.")
    add("--teacher_type", default=None, choices=list(model_types),
        help="Teacher family; without it the student is fine-tuned alone (the baseline, or how to make the teacher).")
    add("--teacher_name_or_path", default=None, help="Teacher fine-tuned on the task: a local folder or a hub name.")
    add("--teacher_dtype", choices=list(TEACHER_DTYPES), default=None,
        help="[+] Hold the frozen teacher's weights in this type. Default: as its checkpoint holds them.")
    add("--alpha_ce", default=0.5, type=non_negative_float, help="Weight of the distillation (KL) loss.")
    add("--temperature", default=2.0, type=number(float, 0, low_open=True), help="Softmax temperature of the KL loss.")
    add("--config_name", default="", help="Student config, when not the one in --model_name_or_path.")
    add("--tokenizer_name", default="", help="Tokenizer, when not the one in --model_name_or_path.")
    add("--cache_dir", default="", help="Where downloaded models are cached.")
    add("--do_train", action="store_true", help="Train.")
    add("--do_eval", action="store_true", help="Evaluate on the dev set.")
    add("--evaluate_during_training", action="store_true", help="Evaluate every --logging_steps steps (master).")
    add("--do_lower_case", action="store_true", help="Lower-case the text (for a tokenizer that does not itself).")
    add("--per_gpu_train_batch_size", default=8, type=number(int, 1), help="Training batch size per process.")
    add("--per_gpu_eval_batch_size", default=8, type=number(int, 1), help="Evaluation batch size.")
    add("--learning_rate", default=5e-5, type=number(float, *LEARNING_RATE_RANGE), help="Peak learning rate of AdamW.")
    add("--gradient_accumulation_steps", default=1, type=number(int, 1), help="Micro-batches per optimizer step.")
    add("--weight_decay", default=0.0, type=non_negative_float, help="Weight decay (not on biases and norms).")
    add("--adam_epsilon", default=1e-8, type=number(float, 0, low_open=True), help="Epsilon of AdamW.")
    add("--max_grad_norm", default=1.0, type=number(float, 0, low_open=True), help="Gradient clipping norm.")
    add("--num_train_epochs", default=3.0, type=number(float, 0, low_open=True), help="Training epochs.")
    add("--max_steps", default=-1, type=int, help="If > 0: the number of optimizer steps (overrides epochs).")
    add("--warmup_steps", default=0, type=non_negative_int, help="Linear warm-up steps.")
    add("--logging_steps", default=50, type=number(int, 1), help="Log (and evaluate) every this many steps.")
    add("--save_steps", default=50, type=number(int, 1), help="Write checkpoint-<step>/ every this many steps.")
    add("--eval_all_checkpoints", action="store_true", help="--do_eval evaluates every checkpoint-<step>/ too.")
    add("--no_cuda", action="store_true", help="Run on CPU (several processes under torchrun: gloo).")
    add("--overwrite_output_dir", action="store_true", help="Train into a non-empty --output_dir.")
    add("--overwrite_cache", action="store_true", help="Rebuild the cached features.")
    add("--seed", default=42, type=number(int, *SEED_RANGE), help="Random seed.")
    add("--local_rank", "--local-rank", default=-1, type=int, help="Set by torch.distributed.launch; torchrun sets LOCAL_RANK.")
    add("--fp16", action="store_true", help="Mixed precision float16 (torch.autocast + GradScaler).")
    add("--fp16_opt_level", default="O1", help="Accepted and ignored: an apex option; --fp16 uses torch.autocast.")
    add("--bf16", action="store_true", help="[+] Mixed precision bfloat16 (torch.autocast, no scaler).")
    add("--server_ip", default="", help="Accepted and ignored (remote debugging of the original).")
    add("--server_port", default="", help="Accepted and ignored (remote debugging of the original).")
    add("--dist_timeout", default=DIST_TIMEOUT_S, type=number(int, 1),
        help="[+] Seconds a process waits for the others in a collective before the run fails.")


def check_task_arguments(args: Namespace) -> None:
    """The checks of add_task_arguments' flags that one flag's type cannot make."""
    if args.teacher_type is not None and not args.teacher_name_or_path:
        raise UserError("--teacher_type needs --teacher_name_or_path (the teacher fine-tuned on the task)")
    if args.teacher_type is None and args.teacher_name_or_path:
        raise UserError("--teacher_name_or_path needs --teacher_type (e.g. --teacher_type bert or auto)")
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 are exclusive: pick one")
    if not (args.do_train or args.do_eval):
        raise UserError("nothing to do: pass --do_train, --do_eval or both")


def check_output_dir(args: Namespace, kind: str, own_files: Collection[str]) -> None:
    """A training run's --output_dir: absent, empty, or (with --overwrite_output_dir) a previous run's folder of the
    script `kind`: marked by it, or from before markers holding its training_args.json and only files a task run
    writes (`own_files` are the script's own names). Never a folder of the user's other files."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {args.output_dir!r} is a file, not a folder")
    if not args.do_train or not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if not args.overwrite_output_dir:
        raise UserError(f"--output_dir {args.output_dir!r} exists and is not empty; pass --overwrite_output_dir "
                        "to replace a previous run of this script there")
    check_force_target(output_dir, True, "--output_dir", kind, (*RUN_FILE_PATTERNS, *TASK_RUN_FILES, *own_files),
                       (TRAINING_ARGS_FILE,), force_flag="--overwrite_output_dir")


@contextmanager
def output_folder(args: Namespace, kind: str, own_files: Collection[str], done_file: str) -> Iterator[None]:
    """--output_dir held for a training run of the script `kind` whose last write is `done_file`, on the master
    (run_folder.run_folder_session): with --overwrite_output_dir the previous run is set aside whole, put back if
    this one fails, deleted once it completes. Evaluation alone writes into --output_dir as it is."""
    if not (args.do_train and args.is_master):
        yield
        return
    folder = Path(args.output_dir).resolve()
    with run_folder_session(folder, kind, done_file, lambda: check_output_dir(args, kind, own_files), "--output_dir"):
        yield


def setup_run(args: Namespace, kind: str, own_files: Collection[str] = ()) -> None:
    """Refuse an --output_dir this run may not write (`check_output_dir`), start the processes, seed, log the flags.

    One process per GPU (torchrun or the legacy launcher) over NCCL; with --no_cuda or without a GPU, CPU
    processes over gloo. The original's one-process DataParallel over every GPU is gone: one process uses
    one GPU, torchrun --nproc_per_node N uses N.
    """
    check_output_dir(args, kind, own_files)
    world_size = int(os.environ.get("WORLD_SIZE") or 1)
    args.n_gpu = 0 if args.no_cuda or not torch.cuda.is_available() else world_size
    init_gpu_params(args)
    set_seed(args)
    logger.info(f"Command line: {shlex.join(sys.argv)}")
    logger.info(f"Parameters: {json.dumps(vars(args), sort_keys=True, default=str)}")
    if args.is_master and args.fp16_opt_level != "O1":
        logger.warning(f"--fp16_opt_level {args.fp16_opt_level} is ignored: it was an apex option")
    if args.is_master and (args.server_ip or args.server_port):
        logger.warning("--server_ip/--server_port are ignored: attach a debugger another way")


def load_task_model(
    model_class: type,
    model_type: str,
    name_or_path: str,
    flag: str,
    config_name: str = "",
    dtype: torch.dtype | None = None,
    cache_dir: str = "",
    **config_overrides: object,
) -> nn.Module:
    """A model with a task head (`model_class`, e.g. AutoModelForQuestionAnswering), its family checked.

    Args:
        model_class: an Auto class or a family's class; `from_pretrained` is called on it.
        model_type: the family asked for (`--model_type` / `--teacher_type`), or `auto` for any.
        name_or_path: folder or hub name of the weights.
        flag: the flag that named it, for the error line.
        config_name: another config than the one beside the weights (`--config_name`).
        dtype: the type to hold the weights in (None: the checkpoint's).
        cache_dir: where hub downloads go (`--cache_dir`; default: the hub's).
        config_overrides: config fields to set (e.g. num_labels).

    Raises:
        UserError: its folder's files are damaged, it cannot be loaded, or its config is of another family than
            `model_type`.
    """
    check_model_folder(name_or_path, flag)
    if config_name:
        check_model_folder(config_name, "--config_name")
    try:
        config = AutoConfig.from_pretrained(config_name or name_or_path, cache_dir=cache_dir or None, **config_overrides)
    except MODEL_LOAD_ERRORS as err:
        raise load_failure(f"a config from {flag} {name_or_path!r}", name_or_path, err) from err
    if model_type != AUTO and config.model_type != model_type:
        raise UserError(f"{flag} {name_or_path!r} holds a {config.model_type} model, not a {model_type} one: pass "
                        f"the type it is (or auto)")
    try:
        model = model_class.from_pretrained(name_or_path, config=config, cache_dir=cache_dir or None,
                                            **({} if dtype is None else {"dtype": dtype}))
    except MODEL_LOAD_ERRORS as err:
        raise load_failure(f"a {model_type} model from {flag} {name_or_path!r}", name_or_path, err) from err
    return model


def load_teacher(args: Namespace, model_class: type, **config_overrides: object) -> nn.Module | None:
    """The frozen teacher (eval mode, on the device, in --teacher_dtype), or None without --teacher_type."""
    if args.teacher_type is None:
        return None
    dtype = TEACHER_DTYPES[args.teacher_dtype] if args.teacher_dtype else None
    teacher = load_task_model(model_class, args.teacher_type, args.teacher_name_or_path, "--teacher_name_or_path",
                              dtype=dtype, cache_dir=args.cache_dir, **config_overrides)
    teacher.requires_grad_(False)
    return teacher.eval().to(args.device)


def check_same_vocabulary(
    teacher: nn.Module,
    student: nn.Module,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
    student_tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Refuse a teacher whose token ids mean other tokens than the student's: both read the same batches.

    Compares the embedding sizes, and the tokenizers' vocabularies when both are given.
    """
    t_size = teacher.get_input_embeddings().num_embeddings
    s_size = student.get_input_embeddings().num_embeddings
    if t_size != s_size:
        raise UserError(f"the teacher's vocabulary has {t_size} tokens and the student's {s_size}: distillation needs "
                        "a teacher and a student of the same tokenizer")
    if teacher_tokenizer is None or student_tokenizer is None:
        return
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        differing = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda item: item[1])[0]
        raise UserError(f"the teacher's and the student's tokenizers differ (e.g. token {differing[0]!r}): "
                        "distillation needs a teacher and a student of the same tokenizer")


def soft_target_loss(s_logits: Tensor, t_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) over the last dimension, batchmean (the rows of the batch), times T^2.

    The original's `KLDivLoss(reduction="batchmean")(log_softmax(s/T), softmax(t/T)) * T**2`; computed in
    float32 whatever the teacher's or autocast's type.
    """
    return kl_distillation(s_logits.float(), t_logits.float(), temperature)


def _temporary_folder_beside(folder: Path) -> Path:
    """A new empty folder next to `folder`, named as utils' atomic writes name their temporaries."""
    return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{folder.name}.", suffix=TMP_SUFFIX, dir=folder.parent))


def save_model_folder(
    folder: str | os.PathLike,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    args: Namespace | None = None,
    extra: Mapping[str, object] | None = None,
) -> None:
    """Write a complete model folder (safetensors weights, config, tokenizer, training_args.json), atomically.

    Everything is written in a temporary folder beside `folder` first. A new `folder` is that folder renamed;
    into an existing one (--output_dir, which holds the checkpoints) each file is moved with os.replace, so
    no file is ever partly written.

    Args:
        folder: where the model goes.
        model: the unwrapped model.
        tokenizer: saved beside it.
        args: the run's flags, written as JSON (never a pickle).
        extra: more tensors-only objects to torch.save, by file name (optimizer.pt, scheduler.pt).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with reported_as_write_error(folder):
        tmp = _temporary_folder_beside(folder)
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if args is not None:
                write_json(tmp / TRAINING_ARGS_FILE, vars(args))
            for name, obj in (extra or {}).items():
                torch.save(obj, tmp / name)
            files = [path for path in tmp.iterdir() if path.is_file()]
            if not folder.exists():
                for path in files:
                    publish(path, path)  # fsync each file: the folder's rename must not outlive its contents
                os.replace(tmp, folder)
                return
            for path in files:
                publish(path, folder / path.name)
        finally:
            delete_own(tmp, ignore_errors=True)


def checkpoint_step(folder: Path) -> int | None:
    """The step of a `checkpoint-<step>` folder, else None."""
    suffix = folder.name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if folder.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def checkpoints_to_evaluate(output_dir: str | os.PathLike, eval_all_checkpoints: bool) -> list[Path]:
    """--output_dir, preceded with --eval_all_checkpoints by every `checkpoint-<step>/` in step order."""
    output_dir = Path(output_dir)
    if not eval_all_checkpoints:
        return [output_dir]
    checkpoints = [path for path in output_dir.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return [*sorted(checkpoints, key=checkpoint_step), output_dir]


def _run_length(args: Namespace, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps in all, epochs): --max_steps wins over --num_train_epochs, as in the original."""
    steps_per_epoch = max(batches_per_epoch // args.gradient_accumulation_steps, 1)
    if args.max_steps > 0:
        return args.max_steps, math.ceil(args.max_steps / steps_per_epoch)
    return int(steps_per_epoch * args.num_train_epochs), math.ceil(args.num_train_epochs)


def _autocast(args: Namespace):
    """The autocast context of --fp16 / --bf16, decided once."""
    if args.fp16:
        return torch.autocast(device_type=args.device.type, dtype=torch.float16)
    if args.bf16:
        return torch.autocast(device_type=args.device.type, dtype=torch.bfloat16)
    return nullcontext()


def _check_finite(args: Namespace, window_finite: dict[str, bool], step: int) -> None:
    """Raise NonFiniteLossError on every process when any process saw a non-finite term in this window."""
    flags = torch.tensor([float(ok) for ok in window_finite.values()], device=args.device)
    if args.multi_gpu:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    for term, ok in zip(window_finite, flags.tolist()):
        if not ok:
            raise NonFiniteLossError(step, term)


def train(
    args: Namespace,
    student: nn.Module,
    teacher: nn.Module | None,
    dataset: Dataset,
    loss_fn: Callable[[nn.Module, nn.Module | None, dict[str, Tensor]], dict[str, Tensor]],
    tokenizer: PreTrainedTokenizerBase,
    evaluate: Callable[[nn.Module, str], dict[str, float]] | None = None,
) -> int:
    """Train `student` on `dataset`, checkpointing, and save it to --output_dir; return the optimizer steps taken.

    Reads top to bottom: batch -> loss_fn (student, teacher under inference mode inside) -> backward (gradients
    synchronised only on the micro-batch that steps) -> at the accumulation boundary: finite check on every
    process, unscale, clip, AdamW step, schedule -> log -> checkpoint. Only the master writes.

    Args:
        args: the flags of add_task_arguments, after setup_run.
        student: on args.device, in train mode.
        teacher: frozen, on args.device, or None.
        dataset: one dict of tensors per feature; batched with the default collate.
        loss_fn: (student or its DDP wrapper, teacher, batch on the device) -> {"loss": total, term: value}.
        tokenizer: saved with every checkpoint and the final model.
        evaluate: (unwrapped student, prefix) -> results, for --evaluate_during_training (master only).

    Raises:
        NonFiniteLossError: a loss term was NaN or infinite on any process; the optimizer had not stepped.
    """
    raw_student = student
    if args.multi_gpu:
        device_ids = [args.device.index] if args.device.type == "cuda" else None
        student = DistributedDataParallel(student, device_ids=device_ids)
        sampler = DistributedSampler(dataset, num_replicas=args.world_size, rank=args.global_rank, seed=args.seed)
    else:
        sampler = EpochRandomSampler(dataset, seed=args.seed)
    batches = BatchSampler(sampler, batch_size=args.per_gpu_train_batch_size, drop_last=False)
    dataloader = DataLoader(dataset, batch_sampler=batches, pin_memory=args.device.type == "cuda")
    total_steps, n_epochs = _run_length(args, len(dataloader))

    optimizer = torch.optim.AdamW(optimizer_groups(raw_student, args.weight_decay), lr=args.learning_rate,
                                  eps=args.adam_epsilon)
    scheduler = get_linear_schedule_with_warmup(optimizer, args.warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.fp16)
    autocast = _autocast(args)
    log_dir = Path(args.output_dir) / LOG_DIR
    with reported_as_write_error(log_dir):  # tensorboard's files are writes too: a failure is one line
        tensorboard = SummaryWriter(log_dir=str(log_dir)) if args.is_master else NullWriter()

    logger.info(f"***** Running training: {len(dataset)} features, {n_epochs} epoch(s), {total_steps} optimizer "
                f"steps, batch {args.per_gpu_train_batch_size} per process x {args.world_size} process(es) x "
                f"{args.gradient_accumulation_steps} accumulation step(s) *****")
    step, micro_batch, loss_sum, logged_loss_sum = 0, 0, 0.0, 0.0
    window_finite: dict[str, bool] = {}
    student.train()
    try:
        for epoch in range(n_epochs):
            sampler.set_epoch(epoch)
            for batch in tqdm(dataloader, desc=f"Epoch {epoch}", disable=not args.is_master):
                stepping = (micro_batch + 1) % args.gradient_accumulation_steps == 0
                batch = {key: value.to(args.device, non_blocking=True) for key, value in batch.items()}
                sync = student.no_sync() if args.multi_gpu and not stepping else nullcontext()
                with sync:
                    with autocast:
                        losses = loss_fn(student, teacher, batch)
                    scaler.scale(losses["loss"] / args.gradient_accumulation_steps).backward()
                for term, value in losses.items():
                    window_finite[term] = window_finite.get(term, True) and bool(torch.isfinite(value.detach()))
                loss_sum += losses["loss"].item() / args.gradient_accumulation_steps
                micro_batch += 1
                if not stepping:
                    continue

                _check_finite(args, window_finite, micro_batch)
                window_finite = {}
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                if step % args.logging_steps == 0:
                    mean_loss = (loss_sum - logged_loss_sum) / args.logging_steps
                    scalars = {"lr": scheduler.get_last_lr()[0], "loss": mean_loss}
                    if args.evaluate_during_training and evaluate is not None and args.is_master:
                        figures = evaluate(raw_student, f"step-{step}")
                        scalars |= {f"eval_{key}": value for key, value in figures.items()}
                        raw_student.train()
                    with reported_as_write_error(log_dir):
                        for tag, value in scalars.items():
                            tensorboard.add_scalar(tag, value, step)
                    logged_loss_sum = loss_sum
                if step % args.save_steps == 0 and args.is_master:
                    extra = {OPTIMIZER_FILE: optimizer.state_dict(), SCHEDULER_FILE: scheduler.state_dict()}
                    save_model_folder(Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{step}", raw_student, tokenizer,
                                      args, extra)
                    logger.info(f"Saved checkpoint {CHECKPOINT_PREFIX}{step}")
                if step >= total_steps:
                    break
            if step >= total_steps:
                break
    finally:
        with reported_as_write_error(log_dir):
            tensorboard.close()
    logger.info(f"Training done: {step} optimizer steps, mean loss {loss_sum / max(step, 1):.4f}")
    if args.is_master:
        save_model_folder(args.output_dir, raw_student, tokenizer, args)
        logger.info(f"Saved the model to {args.output_dir}")
    if args.multi_gpu:
        dist.barrier()  # every process returns once the model is on disk (the evaluation reads it)
    return step


def run_script(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a task script's `main(argv)`: logging set up, a UserError, a non-finite loss or the loss of another
    process of the run as one `error:` line and exit status 1, Ctrl-C as 130, and the process group torn down in
    every case."""
    setup_logging()
    try:
        main(argv)
    except (UserError, NonFiniteLossError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if not lost_another_process(err):
            raise
        print(f"error: lost another process of the run, which died or hangs ({str(err).splitlines()[0]}); run the "
              "command again once the cause is fixed", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
