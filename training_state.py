"""The training state: what a run saves beside its [F] checkpoints so that `--resume` continues it bit for bit
(checkpointing.py's `CheckpointManager` writes and takes it up), and the checks that a state
read back is whole and belongs to this run before anything of it is used.

`training_state.pth` holds the student's weights, what the loss trains besides them (a narrower student's
projection), the optimizer, schedule and grad scaler, the counters, the data position (epoch, batches done,
seed, batches per epoch) and every process's generator states. A sharded run (--fsdp) keeps the weights and
the optimizer state in the folder `training_state.shards.<iteration>` that it names instead
(torch.distributed.checkpoint: one file per process and their layout), and may resume on another number of
processes (`reshard_position`).
"""

from pathlib import Path

import torch
from torch import Tensor

from utils import UserError, load_tensors

# The file, beside the [F] checkpoints (which stay plain student state dicts), and its format.
TRAINING_STATE = "training_state.pth"
TRAINING_STATE_FORMAT = 1
# The folders of a sharded run's weights and optimizer state: `training_state.shards.<iteration>`.
TRAINING_STATE_SHARDS = "training_state.shards"


def load_training_state(dump_path: str | Path) -> dict:
    """Read `dump_path/training_state.pth` as `CheckpointManager.save_training_state` wrote it.

    Loaded with weights_only=True: tensors and plain containers only, nothing in the file can run.

    Raises:
        UserError: the file is missing, damaged, or not a training state of this format.
    """
    path = Path(dump_path) / TRAINING_STATE
    if not path.is_file():
        raise UserError(
            f"{str(path)!r} does not exist: the run saved no training state yet (one is saved every "
            "--checkpoint_interval iterations and at each epoch end); start it again with --force"
        )
    try:
        state = load_tensors(path)
    # A damaged or foreign file fails in many ways (UnpicklingError, RuntimeError, EOFError...); all mean the same.
    except Exception as err:
        raise UserError(f"{str(path)!r} is not a readable training state: {err}") from err
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        raise UserError(f"{str(path)!r} is not a training state of format {TRAINING_STATE_FORMAT}")
    return state


# What a training state holds, key by key, with the type of each value (see `CheckpointManager._write_training_state`).
_STATE_LAYOUT = {"scheduler": dict, "scaler": dict, "position": dict, "counters": dict, "rng": list}
_WEIGHTS_LAYOUT = {False: {"student": dict, "optimizer": dict}, True: {"shards": str}}  # by sharded
_POSITION_KEYS = ("epoch", "batches_done", "seed", "batches_per_epoch")
_COUNTER_KEYS = ("n_total_iter", "n_optimizer_steps", "n_sequences_epoch")


def check_training_state(
    state: dict, world_size: int, seed: int, batches_per_epoch: int, n_epoch: int, accumulation: int,
    sharded: bool = False,
) -> str | None:
    """What makes `state` unusable for this run, or None: missing keys, wrong types, impossible positions.

    A state is saved at the start of an accumulation window, so its position is consistent by
    construction: iterations = epoch x batches_per_epoch + batches done, and the optimizer has
    stepped once per completed window (the windows run across epoch ends).

    Args:
        state: what `load_training_state` read.
        world_size, seed, batches_per_epoch, n_epoch, accumulation: this run's processes, --seed,
            batches per epoch, --n_epoch and --gradient_accumulation_steps.
        sharded: whether this run is sharded (--fsdp); its state must be a sharded run's, and the other way round.
    """
    if ("shards" in state) != sharded:
        saved_by, resume_with = ("a sharded run (--fsdp)", "with --fsdp") if "shards" in state else (
            "a run without --fsdp", "without --fsdp")
        return f"it was saved by {saved_by}; resume it {resume_with}"
    for key, kind in {**_STATE_LAYOUT, **_WEIGHTS_LAYOUT[sharded]}.items():
        if not isinstance(state.get(key), kind):
            return f"its {key!r} entry is missing or not a {kind.__name__}"
    position, counters = state["position"], state["counters"]
    for group, keys in (("position", _POSITION_KEYS), ("counters", _COUNTER_KEYS)):
        missing = [key for key in keys if not isinstance(state[group].get(key), int)]
        if missing:
            return f"its {group} lacks {', '.join(missing)}"
    if not isinstance(counters.get("total_loss_epoch"), Tensor) or counters["total_loss_epoch"].numel() != 1:
        return "its counters lack the epoch's loss total"
    saved = (len(state["rng"]), position["seed"], position["batches_per_epoch"])
    if saved != (world_size, seed, batches_per_epoch):
        return (
            f"it was saved by {saved[0]} process(es) with seed {saved[1]} and {saved[2]} batches per epoch; this "
            f"run has {world_size}, {seed} and {batches_per_epoch}"
        )
    epoch, done, iterations = position["epoch"], position["batches_done"], counters["n_total_iter"]
    if not (0 <= epoch <= n_epoch and 0 <= done <= batches_per_epoch and (epoch < n_epoch or done == 0)):
        return f"its position (epoch {epoch}, {done} batches done) is outside {n_epoch} epochs of {batches_per_epoch}"
    if iterations != epoch * batches_per_epoch + done:
        return f"its iteration count {iterations} disagrees with its position (epoch {epoch}, {done} batches done)"
    if counters["n_optimizer_steps"] != iterations // accumulation or iterations % accumulation:
        return (
            f"its {counters['n_optimizer_steps']} optimizer steps after {iterations} iterations do not fit "
            f"--gradient_accumulation_steps {accumulation}"
        )
    if not all(isinstance(rng, dict) and {"python", "numpy", "torch"} <= rng.keys() for rng in state["rng"]):
        return "its generator states are incomplete"
    return None


def optimizer_state_mismatch(optimizer: torch.optim.Optimizer) -> str | None:
    """What in a just-loaded AdamW state does not fit its parameters' shapes, or None.

    `Optimizer.load_state_dict` checks the groups' sizes but not the moments' shapes, which would only
    fail at the first step.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if name != "step" and isinstance(value, Tensor) and value.shape != param.shape:
                    return f"its optimizer {name} of shape {tuple(value.shape)} is for a parameter of shape " \
                           f"{tuple(param.shape)}"
    return None


def reshard_position(state: dict, world_size: int, batches_per_epoch: int, accumulation: int) -> dict:
    """A sharded run's `state` moved onto `world_size` processes with `batches_per_epoch` batches each: the same
    epoch, about the same share of it done, at the start of an accumulation window.

    The weights and the optimizer reshard exactly (torch.distributed.checkpoint); the data cannot: another
    number of processes splits each epoch into other batches, so the resumed run continues after the same
    fraction of the epoch, not after the same sequences, and each process takes the generator states of the
    saved process of its rank modulo their number. Nothing is checked here: `check_training_state` does that.

    Returns:
        a copy of `state` with its position, counters, schedule and generator states translated.
    """
    position, counters = state["position"], state["counters"]
    epoch, done, saved_batches = position["epoch"], position["batches_done"], position["batches_per_epoch"]
    done_now = done * batches_per_epoch // max(saved_batches, 1)
    done_now -= (epoch * batches_per_epoch + done_now) % accumulation  # back to the start of its window
    if done_now < 0:
        done_now += accumulation
    iterations = epoch * batches_per_epoch + done_now
    share = done_now / done if done else 0.0
    rng = state["rng"]
    return {
        **state,
        "position": {**position, "batches_done": done_now, "batches_per_epoch": batches_per_epoch},
        "counters": {
            "n_total_iter": iterations,
            "n_optimizer_steps": iterations // accumulation,
            "n_sequences_epoch": round(counters["n_sequences_epoch"] * share),
            "total_loss_epoch": counters["total_loss_epoch"] * share,
        },
        "scheduler": {**state["scheduler"], "last_epoch": iterations // accumulation},
        "rng": [rng[rank % len(rng)] for rank in range(world_size)],
    }
