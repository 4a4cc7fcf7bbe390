"""Per-process memory of sharded training (--fsdp) at 1, 2 and 4 gloo processes, against DDP at 2.

Usage (from anywhere; it launches itself under torchrun, CPU only):
    python bench/fsdp_memory.py
    python bench/fsdp_memory.py --layers 6 --width 512 --vocab 8000 --steps 4 --runs ddp:2 fsdp:1 fsdp:2 fsdp:4

Each run trains a GPT-2-shaped pair with the real `Distiller` (CLM, ce + clm + cos, fused losses, fp32, batch
2 x 64 tokens per process, accumulation 2): the student has --layers layers of --width, the teacher twice the
layers. After --steps optimizer steps every process reports the bytes it holds of the student's parameters,
gradients and AdamW state (its shards when sharded), of the teacher's parameters, and its peak resident memory
during the steps (VmHWM, reset once the models are built: building loads the full models on every process,
as train.py does), with glibc returning freed memory at once (MALLOC_MMAP_THRESHOLD_).

The sharded parts should take 1/N of the unsharded ones; the peak also holds what is not sharded: the
Python process and torch (a few hundred MB), the batch's activations, and one gathered layer at a time.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if not __package__:  # run as `python bench/fsdp_memory.py`: import the project from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MB = 1e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6, help="student layers (the teacher has twice as many)")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps measured")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--runs", nargs="+", default=["ddp:2", "fsdp:1", "fsdp:2", "fsdp:4"],
                        help="mode:processes, mode in ddp, fsdp")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # mode of a launched process
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resident_peak_reset() -> None:
    """Make VmHWM (the peak resident set) start again from the current resident set."""
    Path("/proc/self/clear_refs").write_text("5")


def resident_peak_mb() -> float:
    """VmHWM of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError("no VmHWM in /proc/self/status")


def local_mb(tensors) -> float:
    """MB this process holds of `tensors` (a sharded tensor's local shard)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total / MB


def worker(args: argparse.Namespace) -> None:
    """One process of a run: build, train --steps optimizer steps, report."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from distiller import Distiller
    from lm_seqs_dataset import LmSeqsDataset
    from train import build_parser
    from utils import init_gpu_params, set_seed

    torch.set_num_threads(args.threads)
    params = build_parser().parse_args([
        "--dump_path", args.out + ".dump", "--data_file", "unused", "--student_config", "unused",
        "--student_type", "gpt2", "--teacher_type", "gpt2", "--teacher_name", "unused", "--n_gpu", "0",
        "--alpha_ce", "1.0", "--alpha_clm", "1.0", "--alpha_cos", "1.0", "--batch_size", "2",
        "--gradient_accumulation_steps", "2", "--log_interval", "1000000", "--checkpoint_interval", "1000000",
        *(["--fsdp"] if args.worker == "fsdp" else []),
    ])
    params.special_tok_ids = {"bos_token": 0, "eos_token": 0, "unk_token": 0}
    params.max_model_input_size = 64
    init_gpu_params(params)
    set_seed(params)

    def model(layers: int) -> GPT2LMHeadModel:
        config = GPT2Config(vocab_size=args.vocab, n_positions=64, n_embd=args.width, n_layer=layers,
                            n_head=args.width // 64)
        return GPT2LMHeadModel(config)

    rng = torch.Generator().manual_seed(0)
    n_sequences = 2 * 2 * args.steps * params.world_size
    data = []  # sequences wrapped in the markers (id 0), as binarized_data.py writes them
    for _ in range(n_sequences):
        ids = torch.randint(1, args.vocab, (64,), generator=rng)
        ids[0] = ids[-1] = 0
        data.append(ids.numpy().astype("uint16"))
    distiller = Distiller(params, LmSeqsDataset(params, data), None, model(args.layers), model(2 * args.layers))
    resident_peak_reset()
    for batch in distiller.dataloader:
        input_ids, attention_mask, labels = distiller.prepare_batch(batch)
        distiller.step(input_ids=input_ids, attention_mask=attention_mask, lm_labels=labels)
    trained = list(distiller.model.parameters())
    report = {
        "params": local_mb(trained),
        "grads": local_mb(p.grad for p in trained if p.grad is not None),
        "optimizer": local_mb(v for state in distiller.optimizer.state.values() for v in state.values()
                              if torch.is_tensor(v) and v.dim() > 0),
        "teacher": local_mb(distiller.teacher.parameters()),
        "peak": resident_peak_mb(),
        "n_params": sum(p.numel() for p in distiller.raw_student.parameters()),
        "optimizer_steps": distiller.n_optimizer_steps,
    }
    Path(f"{args.out}.rank{params.global_rank}.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


def launch(args: argparse.Namespace, mode: str, processes: int, out: str) -> list[dict]:
    """Run one configuration under torchrun; each process's report."""
    repo_root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(Path(__file__).resolve()), "--worker", mode, "--out", out, "--layers", str(args.layers),
               "--width", str(args.width), "--vocab", str(args.vocab), "--steps", str(args.steps),
               "--threads", str(args.threads)]
    # Freed tensors go back to the system at once (glibc keeps smaller freed blocks otherwise, and the resident
    # set would count memory no longer in use): the peak is then that of live memory.
    env = {**os.environ, "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": str(args.threads),
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{mode} x{processes} failed:\n{result.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(processes)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    print(f"student: GPT-2 {args.layers} layers x {args.width}, vocabulary {args.vocab}; teacher {2 * args.layers} "
          f"layers; fp32, AdamW; {args.steps} optimizer steps; torch {torch.__version__}, {args.threads} thread(s)")
    print("| run | student params | grads | AdamW state | student total | teacher params | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            mode, processes = run.split(":")
            reports = launch(args, mode, int(processes), f"{tmp}/{mode}{processes}")
            first = reports[0]
            assert first["optimizer_steps"] == args.steps, first
            total = first["params"] + first["grads"] + first["optimizer"]
            peak = max(report["peak"] for report in reports)
            print(f"| {mode.upper()} x{processes} | {first['params']:.0f} MB | {first['grads']:.0f} MB | "
                  f"{first['optimizer']:.0f} MB | {total:.0f} MB | {first['teacher']:.0f} MB | {peak:.0f} MB |")
    print(f"(per process; student {first['n_params'] / 1e6:.1f} M parameters)")


if __name__ == "__main__":
    main()
