"""Every file a run writes to `dump_path` besides its logs: the [F] checkpoints (`checkpoint.pth`,
`model_epoch_{e}.pth`, `pytorch_model.bin`, each with `config.json`), the training state that `--resume`
takes up (training_state.py), and the finished model folder (`save_pretrained` files, tokenizer, model card).

`CheckpointManager` knows where and how; the trainer knows when, and what its position in the data is.
Only the master writes; calls that gather something from every process are collectives, and every
process makes them. Every write goes through a temporary name and a rename: a crash never leaves a
half-written file under a final name.

A sharded run (--fsdp) writes the same [F] checkpoints and model folder: the student's full state dict is
gathered to the master, one parameter at a time, on its CPU. Its training state keeps the weights and the
optimizer state sharded, in a folder written with torch.distributed.checkpoint (sharding.py) under a
temporary name and renamed; `training_state.pth` then names it, and older folders are removed.
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
from scripts.file_safety import delete_own
from sharding import full_state_dict, load_sharded_state, save_sharded_state
from training_state import (
    TRAINING_STATE,
    TRAINING_STATE_FORMAT,
    TRAINING_STATE_SHARDS,
    check_training_state,
    optimizer_state_mismatch,
    reshard_position,
)
from utils import TMP_PREFIX, TMP_SUFFIX, UserError, atomic_write, logger, publish, reported_as_write_error

# What the exported student's generation config keeps from its model config.
GENERATION_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


class CheckpointManager:
    """The student's checkpoints, the training state and the exported model folder of one run.

    Args:
        params: the run's namespace: `dump_path`, `is_master`, `multi_gpu`, `world_size`, `global_rank`, `seed`,
            `n_epoch`, `gradient_accumulation_steps`, `fsdp` are read; the model card shows the rest.
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
        self.sharded = getattr(params, "fsdp", False)
        self.student = student
        self.distillation = distillation
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.batches_per_epoch = batches_per_epoch
        self.tokenizer = tokenizer
        self.previous_run: PreviousRun | None = None  # what --force set aside: deleted before the first save

    def save_checkpoint(self, checkpoint_name: str) -> None:
        """Write the student's state dict as `dump_path/checkpoint_name` and its config.json (master only; every
        process takes part when the student is sharded)."""
        state = full_state_dict(self.student)
        if not self.is_master:
            return
        atomic_write(self.dump_path / "config.json", self.student.config.to_json_file)
        atomic_write(self.dump_path / checkpoint_name, partial(torch.save, state))

    def export(self, steps: dict[str, int], last_evaluation: dict[str, float] | None) -> None:
        """Make dump_path a complete model folder (master only): the student's `save_pretrained` files
        (config, safetensors, generation config), the tokenizer's, and a model card (README.md).

        Written in a temporary folder first, then each file renamed into place (fsynced). Every process takes
        part when the student is sharded: its full state dict is gathered to the master.

        Args:
            steps: optimizer steps, iterations and epochs trained, for the model card.
            last_evaluation: the last held-out figures, for the model card; None if never evaluated.
        """
        state_dict = full_state_dict(self.student) if self.sharded else None  # None: the model's own
        if not self.is_master:
            return
        self._set_generation_config()
        card = render_model_card(self.params, self.student, steps, last_evaluation)
        with (
            reported_as_write_error(self.dump_path),
            tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}save_pretrained.", suffix=TMP_SUFFIX, dir=self.dump_path)
            as tmp,
        ):
            self.student.save_pretrained(tmp, state_dict=state_dict)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            (Path(tmp) / "README.md").write_text(card, encoding="utf-8")
            for file in Path(tmp).iterdir():
                publish(file, self.dump_path / file.name)

    def _set_generation_config(self) -> None:
        """Give a generative student the generation config its folder gets: the token ids only, no
        training-time output flags."""
        if self.student.can_generate():
            self.student.generation_config = GenerationConfig(**{
                name: getattr(self.student.config, name) for name in GENERATION_TOKEN_IDS
                if getattr(self.student.config, name, None) is not None
            })

    def check_export(self) -> None:
        """Before training (master only): save the config and the tokenizer into a temporary folder, as `export`
        will, so that what save_pretrained refuses (an invalid generation config, a tokenizer that cannot be
        saved) stops the run before it starts, not after its last epoch.

        Raises:
            UserError: naming what save_pretrained refused.
        """
        if not self.is_master:
            return
        with tempfile.TemporaryDirectory(prefix="distillation-export-check.") as tmp:
            try:
                self._set_generation_config()
                self.student.config.save_pretrained(tmp)
                if self.student.can_generate():
                    self.student.generation_config.save_pretrained(tmp)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp)
            except OSError as err:  # the temporary folder's disk, not the export's
                logger.warning(f"Could not try the final export before training ({err}); it is checked at the end")
            except Exception as err:
                reason = " ".join(str(err).split())[:300]
                raise UserError(
                    f"the finished student could not be saved as a model folder: {reason}; fix --student_config "
                    "(or the teacher's tokenizer) before training"
                ) from err

    def _discard_previous_run(self) -> None:
        """After the first training state: delete the previous run that --force set aside (master only)."""
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
        shards = self._save_shards(point["counters"]["n_total_iter"]) if self.sharded else None
        if self.is_master:
            self._write_training_state(point, rng_states, shards)
            if shards is not None:
                self._remove_shards_but(shards)
        if self.multi_gpu:
            dist.barrier()  # every process returns once the file is on disk: a launcher may stop the others next

    def _save_shards(self, iteration: int) -> str:
        """Write the sharded weights and optimizer state in a new `training_state.shards.<iteration>` folder (a
        collective): into a temporary folder, renamed once every process has written its part. Returns its name.

        A folder of that name already there (a save at the same iteration, or one a kill left unnamed) is kept:
        the new one takes a suffix, so the folder `training_state.pth` names is never touched.
        """
        name = [None]
        if self.is_master:
            taken = {path.name for path in self.dump_path.glob(f"{TRAINING_STATE_SHARDS}.{iteration}*")}
            name[0] = next(
                candidate for k in range(len(taken) + 1)
                if (candidate := f"{TRAINING_STATE_SHARDS}.{iteration}" + (f"-{k}" if k else "")) not in taken
            )
            tmp = self.dump_path / f"{TMP_PREFIX}{name[0]}{TMP_SUFFIX}"
            delete_own(tmp, ignore_errors=True)
            tmp.mkdir()
        if dist.is_initialized():
            dist.broadcast_object_list(name, src=0)  # and every process sees the temporary folder
        tmp = self.dump_path / f"{TMP_PREFIX}{name[0]}{TMP_SUFFIX}"
        with reported_as_write_error(tmp):
            save_sharded_state(self.distillation, self.optimizer, tmp)  # returns once every part is written
            if self.is_master:
                tmp.rename(self.dump_path / name[0])
        return name[0]

    def _remove_shards_but(self, keep: str) -> None:
        """Delete the shard folders `training_state.pth` no longer names (master only)."""
        for folder in self.dump_path.glob(f"{TRAINING_STATE_SHARDS}.*"):
            if folder.name != keep:
                delete_own(folder, ignore_errors=True)

    def _write_training_state(self, point: dict, rng_states: list[dict], shards: str | None) -> None:
        """Write the training state of resume point `point` (master only), naming the folder `shards` of a sharded
        run's weights and optimizer state (None: they are in the file)."""
        weights = {"shards": shards} if shards is not None else {
            "student": self.student.state_dict(),
            "loss": self.distillation.loss_state_dict(),  # what is trained besides the student (never exported)
            "optimizer": self.optimizer.state_dict(),
        }
        state = {
            "format": TRAINING_STATE_FORMAT,
            **weights,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "position": {
                **point["position"], "seed": self.params.seed, "batches_per_epoch": self.batches_per_epoch
            },
            "counters": point["counters"],
            "rng": rng_states,  # by global rank
        }
        atomic_write(self.dump_path / TRAINING_STATE, partial(torch.save, state))
        self._discard_previous_run()  # only now: until this run can be resumed, the previous one can come back

    def restore(self, state: dict) -> dict:
        """Take up a training state: weights, what the loss trains, optimizer, schedule, scaler.

        Everything is checked before use (see `check_training_state`).

        Returns:
            {"position": epoch and batches done, "counters": the run's counters, "rng": this process's
            generator states}, for the trainer to continue from.

        Raises:
            UserError: the state is damaged, or belongs to another number of processes, seed, data or model.
        """
        saved_world_size = len(state["rng"]) if isinstance(state.get("rng"), list) else self.world_size
        resharded = self.sharded and "shards" in state and saved_world_size != self.world_size
        if resharded:
            state = reshard_position(state, self.world_size, self.batches_per_epoch, self.params.gradient_accumulation_steps)
        problem = check_training_state(
            state, self.world_size, self.params.seed, self.batches_per_epoch, self.params.n_epoch,
            self.params.gradient_accumulation_steps, self.sharded,
        )
        if problem is None:
            try:
                self._load_weights_and_optimizer(state)
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
        if resharded:
            self.scheduler.last_epoch -= 1
            self.scheduler.step()  # the learning rate of the translated step
            logger.info(
                f"Resharding the training state of {saved_world_size} process(es) onto {self.world_size}: the weights "
                "and optimizer state exactly, the data position to the same share of the epoch (not bit for bit)"
            )
        return {"position": state["position"], "counters": state["counters"], "rng": state["rng"][self.global_rank]}

    def _load_weights_and_optimizer(self, state: dict) -> None:
        """Load the student, what the loss trains and the optimizer: from the state, or from the shard folder it
        names (a collective, resharded to this run's processes)."""
        if "shards" not in state:
            self.student.load_state_dict(state["student"])
            self.distillation.load_loss_state_dict(state.get("loss", {}))
            self.optimizer.load_state_dict(state["optimizer"])
            return
        folder = self.dump_path / state["shards"]
        if Path(state["shards"]).name != state["shards"] or not folder.is_dir():
            raise ValueError(f"its shard folder {state['shards']!r} is missing from {str(self.dump_path)!r}")
        load_sharded_state(self.distillation, self.optimizer, folder)
