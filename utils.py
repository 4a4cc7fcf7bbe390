"""Shared helpers: logging, the error types, process-group set-up, seeding and RNG states, git
provenance; the error types and atomic writes come from scripts/file_safety.py (standard library only)."""

import json
import logging
import os
import pickle
import random
import signal
import sys
from argparse import Namespace
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from scripts.file_safety import (  # noqa: F401  (re-exported: the writes of the training code go through here)
    TMP_PREFIX, TMP_SUFFIX, UserError, WriteError, atomic_write, check_model_folder, publish, remove_stale_temporaries,
    reported_write as reported_as_write_error,
)

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - PID: %(process)d - %(message)s"
LOG_DATE_FORMAT = "%m/%d/%Y %H:%M:%S"

logger = logging.getLogger("distillation")


def setup_logging(level: int = logging.INFO) -> None:
    """Log to stderr with time, level, logger name, process id and message. Called by entry points only."""
    logging.basicConfig(format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, level=level)


IGNORE_INDEX = -100  # label of positions with nothing to predict (torch's cross_entropy default)


def special_token_ids(tokenizer) -> dict[str, int]:
    """{role name: id} of a tokenizer's special tokens, e.g. {"cls_token": 101, "mask_token": 103, ...}."""
    return {
        role: tokenizer.convert_tokens_to_ids(token)
        for role, token in tokenizer.special_tokens_map.items()
        if isinstance(token, str)
    }


def run_command(main: Callable[[], object]) -> None:
    """Entry point of a command: set up logging, run `main`, turn a UserError into one `error:` line and exit 1."""
    setup_logging()
    try:
        main()
    except UserError as err:  # WriteError and file_safety's refusals included
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(1)


# What loading a model, config, tokenizer or weights file raises when its files are missing, damaged,
# inconsistent (heads not dividing the width, a zero width, a field of the wrong type) or unreachable:
# each means "cannot use this input".
MODEL_LOAD_ERRORS = (
    OSError, ValueError, TypeError, KeyError, RuntimeError, ArithmeticError, SafetensorError, StrictDataclassError,
)


def load_tokenizer(name: str, flag: str):
    """The tokenizer that `name` (a folder or a hub name, given as `flag`) holds, or one line saying why not."""
    from transformers import AutoTokenizer  # here: quickstart.py imports this module long before transformers

    check_model_folder(name, flag)
    try:
        return AutoTokenizer.from_pretrained(name)
    except MODEL_LOAD_ERRORS as err:
        raise load_failure(f"a tokenizer from {flag} {name!r}", name, err) from err


def load_tensors(path: str | os.PathLike) -> object:
    """A .safetensors file, or torch.load with weights_only=True: tensors and plain containers only,
    nothing in the file can run.

    Raises:
        ValueError: safe loading refused the file (not a torch.save file, or objects beyond tensors); the
            reason only, not torch's advice to turn safety off.
        OSError, RuntimeError, EOFError, SafetensorError: the file is missing, truncated or damaged.
    """
    if str(path).endswith(".safetensors"):
        return load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise ValueError(
            f"not a torch.save file of tensors that safe loading accepts ({' '.join(reason.split())})"
        ) from err


def load_failure(what: str, name: str | None, err: Exception) -> UserError:
    """The one-line error for `what` (e.g. "a tokenizer from --teacher_name 'x'") that could not be loaded.

    A name that is no local path was looked up on the hub: without network that retries for minutes
    first, which HF_HUB_OFFLINE=1 avoids, so the message says so.
    """
    hint = ""
    if name is not None and not os.path.exists(name):
        hint = " (no such local path; a hub name needs network: set HF_HUB_OFFLINE=1 to fail at once without it)"
    return UserError(f"could not load {what}: {' '.join(str(err).split()) or type(err).__name__}{hint}")


class NonFiniteLossError(RuntimeError):
    """A loss term, the gradient norm or the weights became NaN or infinite; nothing non-finite was saved.

    Raised before the optimizer step for a loss term or the gradient norm (the weights are the last good
    ones), and right after it for the weights (before anything is saved, so the checkpoints on disk are).

    Args:
        step: the training iteration (micro-batch count) at which the check ran.
        term: what is not finite, e.g. `loss_ce`, `loss` for the weighted total, `gradient norm`, `weights`.
    """

    def __init__(self, step: int, term: str):
        if term == "weights":
            where = ("after the optimizer step, before anything was saved, so the checkpoints on disk are the "
                     "last good ones")
        else:
            where = "stopped before the optimizer step, so the weights and the checkpoints on disk are the last good ones"
        super().__init__(
            f"{term} is not finite at iteration {step}; {where} (lower --learning_rate or --max_grad_norm, or "
            "check the data and the starting weights)"
        )
        self.step = step
        self.term = term


class TrainingInterrupted(Exception):
    """SIGTERM, SIGHUP or SIGINT stopped the run after it saved its training state; exit status 128 + signal number.

    Args:
        signum: the signal that asked for the stop (on any process of the run).
        step: the training iteration (micro-batch count) the state was saved at.
        dump_path: where the training state is.
    """

    def __init__(self, signum: int, step: int, dump_path: str | os.PathLike):
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at iteration {step}; the training state is saved in "
            f"{str(dump_path)!r}: run the same command with --resume (and without --force) to continue"
        )
        self.exit_status = 128 + signum


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write `obj` as indented JSON, atomically; values JSON cannot hold (devices, paths) become strings."""

    def dump(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=4, default=str) + "\n", encoding="utf-8")

    atomic_write(path, dump)


def git_log(folder: str | os.PathLike, code_dir: str | os.PathLike | None = None) -> None:
    """Write `folder/git_log.json` with the repository id, commit sha and branch of the code being run.

    Provenance must never stop a run: outside a checkout, on a detached HEAD (branch null) or without
    gitpython, the missing fields are null and a warning is logged.

    Args:
        folder: where git_log.json goes.
        code_dir: a folder inside the repository to describe; default: the one holding this file.
    """
    repo_infos = {"repo_id": None, "repo_sha": None, "repo_branch": None}
    code_dir = Path(code_dir or Path(__file__).resolve().parent)
    try:
        import git  # lazily: gitpython also needs a git executable, which a training box may lack
    except ImportError as err:
        logger.warning(f"git_log: gitpython is unavailable ({err}); recording no commit")
    else:
        try:
            repo = git.Repo(code_dir, search_parent_directories=True)
            repo_infos["repo_id"] = str(repo)
            repo_infos["repo_sha"] = repo.head.object.hexsha
            repo_infos["repo_branch"] = None if repo.head.is_detached else repo.active_branch.name
        except (git.exc.GitError, ValueError, OSError) as err:
            # ValueError: a repository without any commit has no HEAD object yet.
            logger.warning(f"git_log: {code_dir} is not in a usable git checkout ({err!r}); recording what is known")
    write_json(Path(folder) / "git_log.json", repo_infos)


def _env_int(name: str) -> int | None:
    """The integer value of environment variable `name`, or None when it is unset or empty."""
    value = os.environ.get(name, "")
    return int(value) if value.strip() else None


def _first_set(*values: int | None, default: int) -> int:
    """The first of `values` that is not None, else `default`."""
    return next((value for value in values if value is not None), default)


DIST_TIMEOUT_S = 600  # default of train.py's --dist_timeout

# --teacher_dtype of train.py and the task scripts: the type the frozen teacher's weights are held in.
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lost_another_process(err: Exception) -> bool:
    """Whether `err` is a collective failing because another process died, or hung past --dist_timeout.

    NCCL and the rendezvous store raise DistError; gloo raises a RuntimeError naming its own source.
    """
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and dist.is_initialized() and "/gloo/" in str(err)
    )


def init_gpu_params(params: Namespace) -> None:
    """Read the launcher's environment, set the rank facts on `params` and start the process group.

    The only place that reads RANK, LOCAL_RANK, WORLD_SIZE, ... and calls `init_process_group`:
    - `--n_gpu 0`: CPU; one process, or several over gloo when a launcher sets WORLD_SIZE > 1.
    - `--n_gpu 1`: one GPU, one process.
    - `--n_gpu N > 1`: one GPU per process over NCCL; N must equal the launcher's WORLD_SIZE.
    torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK) are read first;
    the original's N_GPU_NODE, N_NODES and NODE_RANK only when torchrun's are missing; the local rank
    falls back to `--local_rank` / `--local-rank` as passed by `torch.distributed.launch`.

    Sets on `params`: world_size, global_rank, local_rank, n_gpu_per_node, n_nodes, node_id,
    is_master (node 0, local rank 0), multi_gpu (more than one process), multi_node and device. Every
    process but the master then logs warnings and errors only.

    The process group gets `params.dist_timeout` seconds: a collective that waits longer for a
    process (dead, or hung) fails on the others instead of blocking them forever.

    Raises:
        UserError: when the flags and the launcher disagree, or a GPU is asked for and none is visible.
    """
    world_size = _first_set(_env_int("WORLD_SIZE"), default=1)
    if params.n_gpu > 1 and world_size != params.n_gpu:
        raise UserError(
            f"--n_gpu {params.n_gpu} needs one process per GPU, but the launcher started WORLD_SIZE={world_size}; "
            f"run under `torchrun --nproc_per_node {params.n_gpu} train.py ...` or pass --n_gpu equal to WORLD_SIZE"
        )
    if params.n_gpu == 1 and world_size > 1:
        raise UserError(
            f"--n_gpu 1 but the launcher started WORLD_SIZE={world_size} processes; pass --n_gpu {world_size}"
        )
    if params.n_gpu > 0 and torch.cuda.device_count() == 0:
        raise UserError(f"--n_gpu {params.n_gpu} but no CUDA device is visible; use --n_gpu 0 to train on CPU")

    global_rank = _first_set(_env_int("RANK"), default=0)
    local_rank = _first_set(_env_int("LOCAL_RANK"), None if params.local_rank < 0 else params.local_rank, default=0)
    n_per_node = _first_set(_env_int("LOCAL_WORLD_SIZE"), _env_int("N_GPU_NODE"), default=world_size)
    n_nodes = _first_set(_env_int("N_NODES"), default=max(world_size // n_per_node, 1))
    node_id = _first_set(_env_int("GROUP_RANK"), _env_int("NODE_RANK"), default=global_rank // n_per_node)
    if n_nodes * n_per_node != world_size:
        raise UserError(
            f"the launcher's layout is inconsistent: {n_nodes} node(s) x {n_per_node} process(es) per node "
            f"!= WORLD_SIZE={world_size}; check N_NODES / N_GPU_NODE or the launcher's --nnodes/--nproc_per_node"
        )

    params.world_size = world_size
    params.global_rank = global_rank
    params.local_rank = local_rank
    params.n_gpu_per_node = n_per_node
    params.n_nodes = n_nodes
    params.node_id = node_id
    params.is_master = node_id == 0 and local_rank == 0
    params.multi_gpu = world_size > 1
    params.multi_node = n_nodes > 1
    if not params.is_master:  # one voice: the other processes report only warnings and errors
        logging.getLogger().setLevel(logging.WARNING)
    if params.n_gpu > 0:
        torch.cuda.set_device(local_rank)
        params.device = torch.device("cuda", local_rank)
    else:
        params.device = torch.device("cpu")

    logger.info(
        f"--- Global rank {global_rank} / world size {world_size} - node {node_id} of {n_nodes} "
        f"- local rank {local_rank} of {n_per_node} - master: {params.is_master} - multi-process: "
        f"{params.multi_gpu} - multi-node: {params.multi_node} - device: {params.device}"
    )
    if params.multi_gpu or getattr(params, "fsdp", False):  # --fsdp shards over a process group, even of one
        backend = "nccl" if params.n_gpu > 0 else "gloo"
        logger.info(f"Initializing the {backend} process group (MASTER_ADDR/MASTER_PORT from the environment)")
        timeout = timedelta(seconds=getattr(params, "dist_timeout", DIST_TIMEOUT_S))
        # One process without a launcher has no rendezvous address: an in-process store serves it.
        rendezvous = {"init_method": "env://"} if "MASTER_ADDR" in os.environ else {"store": torch.distributed.HashStore()}
        torch.distributed.init_process_group(
            backend=backend, rank=global_rank, world_size=world_size, timeout=timeout, **rendezvous
        )


def set_seed(params: Namespace) -> None:
    """Seed Python, numpy and torch (and every CUDA device when GPUs are used) with `params.seed`."""
    random.seed(params.seed)
    np.random.seed(params.seed)
    torch.manual_seed(params.seed)
    if params.n_gpu > 0:
        torch.cuda.manual_seed_all(params.seed)


def get_rng_states(device: torch.device) -> dict[str, object]:
    """This process's Python, numpy, torch (and CUDA, on a GPU) generator states.

    In types that torch.load(weights_only=True) reads back: tensors, tuples, dicts, numbers.
    """
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, object], device: torch.device) -> None:
    """Restore what `get_rng_states` returned: every draw after it repeats the draws after the capture."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(states["numpy"])
    numpy_state["state"] = dict(numpy_state["state"], key=numpy_state["state"]["key"].numpy().astype(np.uint32))
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
