"""Every file a run writes to `dump_path` besides its logs: the [F] checkpoints (`checkpoint.pth`,
`model_epoch_{e}.pth`, `pytorch_model.bin`, each with `config.json`), the training state that `--resume`
takes up (training_state.py), and the finished model folder (`save_pretrained` files, tokenizer, model card).

`CheckpointManager` knows where and how; the trainer knows when, and what its position in the data is.
Only the master writes; calls that gather something from every process are collectives, and every
process makes them. Every write goes through a temporary name and a rename: a crash never leaves a
half-written file under a final name.
"""

import copy
import tempfile
from argparse import Namespace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from model_card import render_model_card
from run_folder import PreviousRun
from training_state import (
    TRAINING_STATE,
    TRAINING_STATE_FORMAT,
    check_training_state,
    optimizer_state_mismatch,
)
from utils import TMP_PREFIX, TMP_SUFFIX, UserError, atomic_write, publish, reported_as_write_error

# What the exported student's generation config keeps from its model config.
GENERATION_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


class CheckpointManager:
    """The student's checkpoints, the training state and the exported model folder of one run.

    Args:
        params: the run's namespace: `dump_path`, `is_master`, `multi_gpu`, `world_size`, `global_rank`, `seed`,
            `n_epoch`, `gradient_accumulation_steps` are read; the model card shows the rest.
        student: the model saved (not a DDP wrapper).
        distillation: the student and its loss (`StudentWithLoss`): what the loss trains besides the student.
        optimizer, scheduler, scaler: saved in and restored from the training state.
        batches_per_epoch: part of the data position a training state must agree with.
        tokenizer: saved with the finished student; None saves none.
    """

    def __init__(
        self,
        params: Namespace,
        student: nn.Module,
        distillation: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        batches_per_epoch: int,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        self.params = copy.copy(params)  # for the model card; never written
        self.dump_path = Path(params.dump_path)
        self.is_master = params.is_master
        self.multi_gpu = params.multi_gpu
        self.world_size = params.world_size
        self.global_rank = params.global_rank
        self.student = student
        self.distillation = distillation
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.batches_per_epoch = batches_per_epoch
        self.tokenizer = tokenizer
        self.previous_run: PreviousRun | None = None  # what --force set aside: deleted before the first save

    def save_checkpoint(self, checkpoint_name: str) -> None:
        """Write the student's state dict as `dump_path/checkpoint_name` and its config.json (master only)."""
        if not self.is_master:
            return
        self._discard_previous_run()
        atomic_write(self.dump_path / "config.json", self.student.config.to_json_file)
        atomic_write(self.dump_path / checkpoint_name, partial(torch.save, self.student.state_dict()))

    def export(self, steps: dict[str, int], last_evaluation: dict[str, float] | None) -> None:
        """Make dump_path a complete model folder (master only): the student's `save_pretrained` files
        (config, safetensors, generation config), the tokenizer's, and a model card (README.md).

        Written in a temporary folder first, then each file renamed into place (fsynced).

        Args:
            steps: optimizer steps, iterations and epochs trained, for the model card.
            last_evaluation: the last held-out figures, for the model card; None if never evaluated.
        """
        if not self.is_master:
            return
        if self.student.can_generate():  # the token ids only: no training-time output flags
            self.student.generation_config = GenerationConfig(**{
                name: getattr(self.student.config, name) for name in GENERATION_TOKEN_IDS
                if getattr(self.student.config, name, None) is not None
            })
        card = render_model_card(self.params, self.student, steps, last_evaluation)
        with (
            reported_as_write_error(self.dump_path),
            tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}save_pretrained.", suffix=TMP_SUFFIX, dir=self.dump_path)
            as tmp,
        ):
            self.student.save_pretrained(tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            (Path(tmp) / "README.md").write_text(card, encoding="utf-8")
            for file in Path(tmp).iterdir():
                publish(file, self.dump_path / file.name)

    def _discard_previous_run(self) -> None:
        """Before the first save: delete the previous run that --force set aside (master only)."""
        if self.previous_run is not None:
            self.previous_run.discard()
            self.previous_run = None

    def save_training_state(self, point: dict) -> None:
        """Write `training_state.pth`: all a resumed run needs to continue bit for bit.

        One file, written atomically by the master: the student's weights, what the loss trains, optimizer,
        schedule, grad scaler, counters, data position and the generator states of every process, gathered to
        the master: every process must call it (a collective). One file rather than one per process, so that
        it is consistent by construction.

        Args:
            point: the resume point (`Distiller.resume_point`): position, counters and this process's rng.
        """
        rng_states = [point["rng"]]
        if self.multi_gpu:
            rng_states = [None] * self.world_size
            dist.all_gather_object(rng_states, point["rng"])
        if self.is_master:
            self._write_training_state(point, rng_states)
        if self.multi_gpu:
            dist.barrier()  # every process returns once the file is on disk: a launcher may stop the others next

    def _write_training_state(self, point: dict, rng_states: list[dict]) -> None:
        """Write the training state of resume point `point` (master only)."""
        state = {
            "format": TRAINING_STATE_FORMAT,
            "student": self.student.state_dict(),
            "loss": self.distillation.loss_state_dict(),  # what is trained besides the student (never exported)
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "position": {
                **point["position"], "seed": self.params.seed, "batches_per_epoch": self.batches_per_epoch
            },
            "counters": point["counters"],
            "rng": rng_states,  # by global rank
        }
        atomic_write(self.dump_path / TRAINING_STATE, partial(torch.save, state))

    def restore(self, state: dict) -> dict:
        """Take up a training state: weights, what the loss trains, optimizer, schedule, scaler.

        Everything is checked before use (see `check_training_state`).

        Returns:
            {"position": epoch and batches done, "counters": the run's counters, "rng": this process's
            generator states}, for the trainer to continue from.

        Raises:
            UserError: the state is damaged, or belongs to another number of processes, seed, data or model.
        """
        problem = check_training_state(
            state, self.world_size, self.params.seed, self.batches_per_epoch, self.params.n_epoch,
            self.params.gradient_accumulation_steps,
        )
        if problem is None:
            try:
                self.student.load_state_dict(state["student"])
                self.distillation.load_loss_state_dict(state.get("loss", {}))
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
                self.scaler.load_state_dict(state["scaler"])
            except (RuntimeError, ValueError, KeyError, TypeError) as err:
                problem = f"it does not fit this student and optimizer ({' '.join(str(err).split())[:300]})"
            else:
                problem = optimizer_state_mismatch(self.optimizer)
        if problem is not None:
            raise UserError(
                f"{str(self.dump_path / TRAINING_STATE)!r} cannot be resumed: {problem}; resume with the run's "
                "launcher, flags and data, or start it again with --force"
            )
        return {"position": state["position"], "counters": state["counters"], "rng": state["rng"][self.global_rank]}
