"""One rank of the sharded-training tests, launched by test_sharding.py as

    python -m torch.distributed.run --standalone --nproc_per_node N tests/fsdp_worker.py OUT_DIR CASE...

with the repo root and tests/ on PYTHONPATH. Every CASE trains the same tiny GPT-2 pair (two layers each, the
student narrower than the teacher, so that the hidden-state projection trains too) on the same data with
`Distiller.train()`, over gloo, in one process group, and writes OUT_DIR/CASE/rank<r>.pt: the loss of every
micro-batch on this rank, the gradient norm of every optimizer step, the reduce-scatters counted after each
micro-batch, the dtype of the student's parameters inside its forward, the per-process bytes its parameters,
gradients and optimizer state take, the type of the teacher's LM head weight between steps, and what the
master exported in OUT_DIR/CASE/dump.

CASE is `ddp` (fused losses, unsharded), `fsdp` (fused losses, sharded), `fsdp_full` (sharded, full logits:
--loss_chunk_size 0) or `fsdp_bf16` (sharded, --bf16).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import assets
from distiller import Distiller
from lm_seqs_dataset import LmSeqsDataset
from utils import init_gpu_params, set_seed

VOCAB = 96
GPT2_SPECIALS = {"bos_token": 0, "eos_token": 0, "unk_token": 0}
SETTINGS = dict(
    special_tok_ids=GPT2_SPECIALS, alpha_ce=1.0, alpha_clm=1.0, alpha_mse=0.1, alpha_cos=1.0, warmup_prop=0.1,
    learning_rate=1e-2, n_epoch=2, batch_size=2, gradient_accumulation_steps=2, log_interval=3,
    checkpoint_interval=4, loss_chunk_size=7,
)
CASES = {
    "ddp": {},
    "fsdp": {"fsdp": True},
    "fsdp_full": {"fsdp": True, "loss_chunk_size": 0},
    "fsdp_bf16": {"fsdp": True, "bf16": True},
}


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The student (two layers, 16 wide) and the teacher (two layers, 32 wide), seeded."""
    torch.manual_seed(0)
    student = assets.MODEL_CLASSES["gpt2"](
        assets.without_dropout(assets.student_config("gpt2", VOCAB, n_layers=2, hidden=16))
    )
    torch.manual_seed(1)
    teacher = assets.MODEL_CLASSES["gpt2"](assets.without_dropout(assets.teacher_config("gpt2", VOCAB, n_layers=2)))
    return student, teacher


def local_bytes(distiller: Distiller) -> dict[str, int]:
    """Bytes this process holds of the student's parameters, gradients and AdamW state (its shards when sharded)."""

    def size(tensor) -> int:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return local.numel() * local.element_size()

    params = list(distiller.model.parameters())
    return {
        "params": sum(size(p) for p in params),
        "grads": sum(size(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(size(v) for state in distiller.optimizer.state.values() for v in state.values()
                         if torch.is_tensor(v) and v.dim() > 0),
    }


def run_case(case: str, out_dir: Path, rank_facts: dict) -> None:
    dump = out_dir / case / "dump"
    params = assets.distiller_params(dump, **{**SETTINGS, **CASES[case]})
    vars(params).update(rank_facts)
    if params.is_master:
        dump.mkdir(parents=True)
    dist.barrier()
    set_seed(params)
    data = assets.make_sequences(16, 12, VOCAB, start_id=0, end_id=0, seed=0)
    student, teacher = models()
    distiller = Distiller(params, LmSeqsDataset(params, data), None, student, teacher)
    losses, grad_norms, reduce_scatters, forward_dtypes = [], [], [], set()
    original_step, original_reduce_scatter = distiller.step, dist.reduce_scatter_single
    calls = []

    def counted_reduce_scatter(*args, **kwargs):
        calls.append(1)
        return original_reduce_scatter(*args, **kwargs)

    def step(**batch):
        original_step(**batch)
        losses.append(distiller.last_loss.item())
        reduce_scatters.append(len(calls))
        if distiller.n_total_iter % params.gradient_accumulation_steps == 0:
            grad_norms.append(distiller.grad_norm.item())

    layer = student.transformer.h[0]  # after FSDP's own pre-forward hook: its parameters are gathered here
    layer.register_forward_pre_hook(lambda module, args: forward_dtypes.add(str(module.attn.c_attn.weight.dtype)))
    distiller.step = step
    dist.reduce_scatter_single = counted_reduce_scatter
    try:
        distiller.train()
    finally:
        dist.reduce_scatter_single = original_reduce_scatter
    distiller.close()
    result = {"losses": losses, "grad_norms": grad_norms, "reduce_scatters": reduce_scatters,
              "forward_dtypes": sorted(forward_dtypes), "bytes": local_bytes(distiller),
              "teacher_head_at_rest": type(teacher.get_output_embeddings().weight).__name__}
    torch.save(result, out_dir / case / f"rank{params.global_rank}.pt")


def main(out_dir: Path, cases: list[str]) -> None:
    torch.set_num_threads(1)
    params = assets.distiller_params(out_dir, fsdp=True)
    init_gpu_params(params)  # a gloo process group, even for one process (--fsdp)
    rank_facts = {name: getattr(params, name) for name in ("is_master", "multi_gpu", "world_size", "global_rank",
                                                          "local_rank", "device")}
    for case in cases:
        run_case(case, out_dir, rank_facts)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
