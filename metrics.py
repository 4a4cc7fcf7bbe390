"""What a run reports while it trains: the tensorboard scalars under `dump_path/log/train` (the [F] tag tree of
SPEC section 7), the tqdm bar of each epoch, and the evaluation figures.

Only the master writes. Other processes get a `NullWriter`, so that callers never branch on the rank; every
master-only method of `MetricsLogger` starts with one guard.
"""

import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import psutil
import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from scripts.file_safety import reported_write
from sharding import full_tensor
from utils import logger


class NullWriter:
    """Stands in for the tensorboard SummaryWriter on non-master processes: every call does nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        """Do nothing."""

    def add_text(self, *args, **kwargs) -> None:
        """Do nothing."""

    def flush(self) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""


def training_scalars(
    student: nn.Module, grad_norm: Tensor | None, cum_avg_loss: Tensor, loss: Tensor, losses: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The [F] parameter, gradient and loss scalars as 0-dim device tensors, keyed by tensorboard tag.

    Args:
        student: the model whose parameters (and gradients, where set) are summarised by name; when sharded,
            every process calls this (each parameter is gathered in turn).
        grad_norm: the total gradient norm before clipping at the last optimizer step ([+]); None before one.
        cum_avg_loss: the epoch's average loss so far.
        loss, losses: the last micro-batch's total and its terms by name (ce, mlm, ...).
    """
    tensors = {}
    for name, param in student.named_parameters():
        whole = full_tensor(param.detach())  # a sharded parameter is gathered: every process must call this
        tensors[f"parameter_mean/{name}"] = whole.mean()
        tensors[f"parameter_std/{name}"] = whole.std()
        if param.grad is None:
            continue
        grad = full_tensor(param.grad)
        tensors[f"grad_mean/{name}"] = grad.mean()
        tensors[f"grad_std/{name}"] = grad.std()
    if grad_norm is not None:
        tensors["global/grad_norm"] = grad_norm
    tensors["losses/cum_avg_loss_epoch"] = cum_avg_loss
    tensors["losses/loss"] = loss
    for term, value in losses.items():
        tensors[f"losses/loss_{term}"] = value
    return tensors


class MetricsLogger:
    """The run's tensorboard log and progress bars (master only; a NullWriter elsewhere).

    Args:
        dump_path: the run folder; events go to `dump_path/log/train`.
        is_master: whether this process writes.
        world_size: processes of the run, to estimate the tokens per second of all of them from this one's.
    """

    def __init__(self, dump_path: Path, is_master: bool, world_size: int):
        self.log_dir = Path(dump_path) / "log" / "train"
        self.is_master = is_master
        self.world_size = world_size
        self.writer: SummaryWriter | NullWriter = NullWriter()  # opened by `open`: building writes nothing
        self.last_log = time.time()
        self.n_tokens_since_log = 0

    def open(self, purge_step: int | None = None) -> None:
        """Start the tensorboard log (master only).

        Args:
            purge_step: for a resumed run, the first iteration it logs again: the events the interrupted run
                logged from there on are hidden. None for a new run.
        """
        if not self.is_master:
            return
        logger.info("--- Initializing Tensorboard")
        if purge_step is not None:
            _wait_to_name_after_existing_event_files(self.log_dir)
        with reported_write(self.log_dir):
            self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=60, purge_step=purge_step)
        self.last_log = time.time()

    def log_config(self, params_text: str, student_config: str) -> None:
        """Write the training parameters and the student config as tensorboard text at step 0 (master only)."""
        if not self.is_master:
            return
        with reported_write(self.log_dir):
            self.writer.add_text("config/training", _as_markdown_code(params_text), 0)
            self.writer.add_text("config/student", _as_markdown_code(student_config), 0)

    def progress(self, batches: Iterable, done: int, total: int) -> tqdm:
        """The epoch's progress bar over `batches` (shown on the master only), starting at `done` of `total`."""
        return tqdm(batches, desc="-Iter", disable=not self.is_master, initial=done, total=total)

    def count_tokens(self, n_tokens: int) -> None:
        """Add the real tokens of a micro-batch of this process to the speed figure of the next log."""
        self.n_tokens_since_log += n_tokens

    def log_step(self, step: int, tensors: Mapping[str, Tensor], learning_rate: float, iter_bar: tqdm) -> None:
        """Write the scalars of iteration `step` and refresh the progress bar (master only).

        Args:
            tensors: `training_scalars`, read back to the host in one go.
            learning_rate: the schedule's current rate, logged as `learning_rate/lr`.
        """
        if not self.is_master:
            return
        # One host read for every tensor-valued scalar of this log.
        scalars = dict(zip(tensors, torch.stack([t.float() for t in tensors.values()]).tolist()))
        elapsed = time.time() - self.last_log
        scalars["learning_rate/lr"] = learning_rate
        scalars["global/memory_usage"] = psutil.virtual_memory().used / 1_000_000  # MB used on the machine
        scalars["global/speed"] = elapsed  # seconds since the last log
        # [+] Real (non-padding) tokens of every process, estimated from this one's.
        scalars["global/tokens_per_second"] = self.n_tokens_since_log * self.world_size / max(elapsed, 1e-9)
        with reported_write(self.log_dir):
            for tag, value in scalars.items():
                self.writer.add_scalar(tag=tag, scalar_value=value, global_step=step)
        iter_bar.set_postfix(
            {
                "Last_loss": f"{scalars['losses/loss']:.2f}",
                "Avg_cum_loss": f"{scalars['losses/cum_avg_loss_epoch']:.2f}",
            }
        )
        self.last_log = time.time()
        self.n_tokens_since_log = 0

    def log_epoch(self, epoch: int, average_loss: float) -> None:
        """Write the epoch's average loss as `epoch/loss` (master only)."""
        if not self.is_master:
            return
        with reported_write(self.log_dir):
            self.writer.add_scalar(tag="epoch/loss", scalar_value=average_loss, global_step=epoch)

    def log_evaluation(self, step: int, figures: Mapping[str, float]) -> None:
        """Write held-out figures as `eval/<name>` and log them in one line (master only)."""
        if not self.is_master:
            return
        with reported_write(self.log_dir):
            for name, value in figures.items():
                self.writer.add_scalar(tag=f"eval/{name}", scalar_value=value, global_step=step)
        logger.info(f"Evaluation at iteration {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))

    def flush(self) -> None:
        """Put the events logged so far on disk (before a training state: they survive a kill, as it does)."""
        with reported_write(self.log_dir):
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the tensorboard writer."""
        with reported_write(self.log_dir):
            self.writer.close()


def _wait_to_name_after_existing_event_files(log_dir: Path) -> None:
    """Wait, if need be, until the clock has passed the second the newest event file in `log_dir` was made.

    Readers take a run's event files in name order, and a name is `events.out.tfevents.<second>.<host>.
    <pid>...`: the resumed run's file, whose purge step hides what the interrupted run logged after its
    training state, must sort after the interrupted run's. Within one second the pids decide, at random.
    """
    seconds = [int(path.name.split(".")[3]) for path in log_dir.glob("events.out.tfevents.*")]
    delay = max(seconds, default=0) + 1 - time.time()
    if delay > 2:
        logger.warning(f"the clock is behind the event files in {log_dir}: tensorboard may show stale events")
    elif delay > 0:
        time.sleep(delay)


def _as_markdown_code(text: str) -> str:
    """Indent every line by four spaces: a markdown code block in tensorboard's text tab."""
    return "\n".join("    " + line for line in text.splitlines())
