"""`--fsdp`: the student and the teacher sharded across the processes with FSDP2 (`fully_shard`), for models
whose full copy (with the student's optimizer state) does not fit on one device.

Each layer of the stack `find_layer_stack` finds is its own FSDP unit, and so is the root: for the student,
`StudentWithLoss` (the student, its loss and a narrower student's projection), whose forward is the whole
step, so that the embeddings and the LM head are gathered for the fused loss too; for the teacher, the
teacher, frozen and resharded after its forward. Every process then holds 1/N of each model's parameters,
of the student's gradients and of its AdamW state, plus one gathered layer at a time.

The helpers here work on sharded (DTensor) and plain tensors alike, so that the trainer does not branch:
total norms and clipping over a sharded model, a gathered copy of a projection or a parameter, the full
state dict gathered to the master, and the sharded training state saved and read with
`torch.distributed.checkpoint` (which reshards when the number of processes changes).
"""

from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from scripts.model_families import find_layer_stack


def shard_models(
    distillation: nn.Module, student: nn.Module, teacher: nn.Module | None, device: torch.device, bf16: bool
) -> None:
    """Shard the student (inside `distillation`, the root) and the teacher over every process, in place.

    Args:
        distillation: `StudentWithLoss`, whose forward runs the student and the loss.
        student: its student; each of its layers becomes an FSDP unit.
        teacher: the frozen teacher, in its own dtype; None without teacher terms.
        device: this process's device; the mesh spans every process on devices of its type.
        bf16: keep the student's gathered parameters in bfloat16 with the gradients reduced in float32.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    # The student's root stays gathered from its forward through its backward (FSDP's default for a root).
    _shard_layers_and_root(student, distillation, mesh, precision, reshard_root=None)
    if teacher is not None:
        teacher.requires_grad_(False)
        # The teacher has no backward: its root is resharded after the forward too, or it would stay gathered.
        _shard_layers_and_root(teacher, teacher, mesh, None, reshard_root=True)


def _shard_layers_and_root(
    model: nn.Module, root: nn.Module, mesh, precision: MixedPrecisionPolicy | None, reshard_root: bool | None
) -> None:
    """One FSDP unit per layer of `model`'s stack (resharded after its forward), then `root` (which holds
    `model`) for everything else; `reshard_root` None leaves the root to FSDP's default."""
    options = {"mesh": mesh} if precision is None else {"mesh": mesh, "mp_policy": precision}
    _, layers = find_layer_stack(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True, **options)
    fully_shard(root, reshard_after_forward=reshard_root, **options)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a DTensor (sharded by `shard_models`)."""
    return any(isinstance(param, DTensor) for param in model.parameters())


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor: gathered from every process if it is sharded (a collective then), else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class GatheredProjection(NamedTuple):
    """A vocabulary projection's full weight and bias, for the fused losses to read as they read an nn.Linear."""

    weight: Tensor
    bias: Tensor | None


def gathered_projection(projection: nn.Module) -> nn.Module | GatheredProjection:
    """`projection` with its weight and bias whole: a sharded one's gathered (a collective), a plain one as it is.

    The teacher's projection is resharded after its forward, but the fused losses read it later, in the
    student's forward.
    """
    if not isinstance(projection.weight, DTensor):
        return projection
    bias = None if projection.bias is None else full_tensor(projection.bias)
    return GatheredProjection(full_tensor(projection.weight), bias)


def total_norm(tensors: Iterable[Tensor]) -> Tensor:
    """The 2-norm of all `tensors` together, over every shard of the sharded ones (a collective then)."""
    norm = torch.nn.utils.get_total_norm(list(tensors))
    return full_tensor(norm)


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` for sharded and plain parameters: the total norm is the norm of the
    whole gradient, not of this process's shard. Returns that norm, before clipping."""
    parameters = list(parameters)
    norm = total_norm(param.grad for param in parameters if param.grad is not None)
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model.state_dict()` whole and on the CPU, on the master; {} on the other processes.

    A collective for a sharded model: each parameter is gathered in turn and moved to the CPU, so the master
    holds one full copy (on the host) beside its shards, never two.
    """
    if not is_sharded(model):
        return model.state_dict()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied parameters (an LM head sharing the input embeddings) are gathered as separate copies: made one tensor
    # again, as in `state_dict()`, so that save_pretrained stores them once, as an unsharded run's export does.
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied_to = first_name.setdefault(id(param), name)
        if tied_to != name and name in state:
            state[name] = state[tied_to]
    return state


def save_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Write the sharded weights and optimizer state of every process into `folder` (a collective).

    An optimizer that has not stepped yet has no state to write (and asking for its state dict would make one).
    """
    state = {"model": get_model_state_dict(model)}
    if optimizer.state:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=folder)


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Read what `save_sharded_state` wrote into the sharded `model` and, if it was written, `optimizer` (a
    collective), whatever the number of processes that wrote it: torch.distributed.checkpoint reshards.

    Raises:
        ValueError: the folder is not such a checkpoint, or does not fit the model and optimizer.
    """
    try:
        saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
        state = {"model": get_model_state_dict(model)}
        with_optimizer = any(key.startswith("optimizer.") for key in saved)
        if with_optimizer:
            state["optimizer"] = get_optimizer_state_dict(model, optimizer)
        dcp.load(state, checkpoint_id=folder)
    except (CheckpointException, OSError) as err:  # CheckpointException is a BaseException
        raise ValueError(f"reading {str(folder)!r} failed: {err}") from None
    set_model_state_dict(model, state["model"])
    if with_optimizer:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
