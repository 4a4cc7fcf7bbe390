"""One rank of the distributed equivalence test, launched by test_distributed.py as

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT_DIR

with the repo root and tests/ on PYTHONPATH. Every rank builds the same tiny GPT-2 pair, goes through
`init_gpu_params` (gloo, --n_gpu 0) and a real `Distiller`, and writes what it holds to
OUT_DIR/rank<r>.pt:

1. gradient accumulation over 2 micro-batches, one sequence each (rank r gets sequences 2r and 2r + 1):
   the number of DDP all-reduces seen after each micro-batch (0 after the first: no_sync), then the
   gradients and weights after the optimizer step;
2. rank 1's teacher turns NaN for the next window: the exception each rank raised and its weights after.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import assets
from distiller import Distiller
from lm_seqs_dataset import LmSeqsDataset
from utils import NonFiniteLossError, init_gpu_params, set_seed

VOCAB = 64
SEQ_LEN = 16
GPT2_SPECIALS = {"bos_token": 0, "eos_token": 0, "unk_token": 0}
# Shared with test_distributed.py's single-process reference.
SETTINGS = dict(
    special_tok_ids=GPT2_SPECIALS, alpha_ce=1.0, alpha_clm=1.0, alpha_mse=0.1, alpha_cos=1.0, warmup_prop=0.0,
    learning_rate=1e-3, max_grad_norm=1e6, log_interval=10**6, checkpoint_interval=10**6,
)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The 4 equal-length sequences of the global batch: (ids (4, SEQ_LEN), lengths (4,))."""
    sequences = assets.make_sequences(4, SEQ_LEN, VOCAB, start_id=0, end_id=0, seed=0)
    ids = torch.tensor([seq.tolist() for seq in sequences], dtype=torch.int64)
    return ids, torch.full((4,), SEQ_LEN, dtype=torch.int64)


def build_distiller(dump_path: Path, **overrides) -> Distiller:
    """A Distiller over the global batch's sequences; rank facts come from init_gpu_params when launched."""
    params = assets.distiller_params(dump_path, **{**SETTINGS, **overrides})
    init_gpu_params(params)  # one CPU process without launcher variables, a gloo rank under torchrun
    set_seed(params)
    data = assets.make_sequences(4, SEQ_LEN, VOCAB, start_id=0, end_id=0, seed=0)
    student = assets.tiny_model("gpt2", "student", VOCAB, seed=0)
    teacher = assets.tiny_model("gpt2", "teacher", VOCAB, seed=1)
    return Distiller(params, LmSeqsDataset(params, data), None, student, teacher)


def snapshot(distiller: Distiller) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of the student's weights and gradients, by parameter name."""
    named = list(distiller.raw_student.named_parameters())
    return {
        "weights": {name: p.detach().clone() for name, p in named},
        "grads": {name: p.grad.clone() for name, p in named if p.grad is not None},
    }


def counting_allreduce(counter: list[int]):
    """A DDP communication hook that does the default all-reduce and counts its calls in `counter`."""

    def hook(process_group, bucket):
        counter.append(1)
        return default_hooks.allreduce_hook(process_group, bucket)

    return hook


WINDOWS = 3  # accumulation windows of two micro-batches trained before the NaN one


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    distiller = build_distiller(out_dir / "dump", gradient_accumulation_steps=2)
    distiller.start_logging()  # what train() does first: only the master may create a log
    rank = dist.get_rank()

    all_reduces = []
    distiller.student.register_comm_hook(None, counting_allreduce(all_reduces))

    ids, lengths = global_batch()
    reduces_after = []  # all-reduces counted after each micro-batch, over WINDOWS accumulation windows
    for window in range(WINDOWS):
        for index in (2 * rank, 2 * rank + 1):
            batch = distiller.prepare_batch_clm((ids[index : index + 1], lengths[index : index + 1]))
            distiller.step(input_ids=batch[0], attention_mask=batch[1], lm_labels=batch[2])
            reduces_after.append(len(all_reduces))
        if window == 0:
            result = {"n_optimizer_steps_after_first": distiller.n_optimizer_steps, **snapshot(distiller)}
    result["reduces_after"] = reduces_after
    result["n_optimizer_steps"] = distiller.n_optimizer_steps
    result["weights_before_nan"] = snapshot(distiller)["weights"]

    if rank == 1:
        with torch.no_grad():
            distiller.teacher.transformer.wte.weight.fill_(float("nan"))
    try:
        for index in (2 * rank, 2 * rank + 1):
            batch = distiller.prepare_batch_clm((ids[index : index + 1], lengths[index : index + 1]))
            distiller.step(input_ids=batch[0], attention_mask=batch[1], lm_labels=batch[2])
    except NonFiniteLossError as error:
        result["error"] = (error.step, error.term)
    result["weights_after_nan"] = snapshot(distiller)["weights"]
    result["is_master"] = distiller.is_master

    distiller.close()
    torch.save(result, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
