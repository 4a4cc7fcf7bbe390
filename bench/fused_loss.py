"""The fused, chunked vocabulary losses against full logits: step speed and peak memory on identical batches.

Usage, from the repository root (CPU, fp32; set the thread count with --threads; or as
`python -m bench.fused_loss`):
    python bench/fused_loss.py speed --vocab 30522 --batch 4 --seq_len 511 --rounds 5
    python bench/fused_loss.py memory --vocab 30522 --batch 16 --seq_len 511 --variants fused original
    python bench/fused_loss.py epoch --vocab 8000
    python bench/fused_loss.py chunks --vocab 30522 --batch 4 --seq_len 511 --chunk_sizes 128 256 512 1024

Models: the CPU shape of bench/train_step.py (BERT teacher 4 x 256, DistilBERT student 2 x 256), the
DistilBERT recipe (MLM, alpha ce/mlm/cos = 5/2/1, T = 2), random weights, `Distiller.step` end to end
(masking on the host, teacher forward, student forward and backward, clipping, AdamW, schedule). Variants:

- fused: `--loss_chunk_size K` (default: train.py's);
- unfused: `--loss_chunk_size 0` (full logits, `compute_losses`);
- original: the original scripts' step as SPEC.md describes it, in the same Distiller: full logits of both
  models, the (bs, seq_len, vocab) boolean mask `attention_mask.unsqueeze(-1).expand_as(logits)` with
  `masked_select`, `KLDivLoss(reduction="batchmean")` on log-probabilities against softmax probabilities,
  `CrossEntropyLoss` over every position, the hidden-state mask expanded the same way and
  `CosineEmbeddingLoss`. Around it, the step is ours (the teacher's full logits under inference mode,
  backward, clipping, AdamW): only the loss computation differs.

speed: one process, the three variants (their own copies of the same initial student) step on the same
batch in each round, in rotating order; printed: seconds per step of each, and the paired ratios per
round. memory: each variant in a fresh process (peak RSS = the kernel's ru_maxrss, over the whole
process: models, one warm-up and one measured step). epoch: each variant in a fresh process trains one
epoch (`Distiller.train`) over sequences of random lengths (16 to 511), batches grouped by length; peak
RSS. chunks: fused steps at several chunk sizes, interleaved (what the default was chosen from).
"""

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if not __package__:  # run as `python bench/fused_loss.py`: import the project from the repository root, as -m does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.train_step import CPU_SHAPE, SPECIAL_TOK_IDS, bench_params, build_models  # noqa: E402
from distiller import Distiller  # noqa: E402
from lm_seqs_dataset import LmSeqsDataset  # noqa: E402
from losses import DEFAULT_LOSS_CHUNK_SIZE, TeacherOutput  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("fused", "unfused", "original")


class OriginalLoss(nn.Module):
    """The original scripts' forward and loss (SPEC section 7), standing in for `Distiller.model`.

    Written from SPEC.md's description: full logits, (bs, seq_len, vocab) boolean masks and
    masked_select, KLDivLoss(batchmean) against softmax probabilities, CosineEmbeddingLoss.
    """

    def __init__(self, student: nn.Module, alphas: dict[str, float], temperature: float):
        super().__init__()
        self.student, self.alphas, self.temperature = student, alphas, temperature
        self.kl_loss = nn.KLDivLoss(reduction="batchmean")
        self.lm_loss = nn.CrossEntropyLoss(ignore_index=-100)
        self.cosine_loss = nn.CosineEmbeddingLoss(reduction="mean")

    def forward(self, input_ids, model_mask, attention_mask, lm_labels, teacher_output: TeacherOutput):
        s_output = self.student(input_ids=input_ids, attention_mask=model_mask, output_hidden_states=True)
        s_logits, s_hidden = s_output.logits, s_output.hidden_states[-1]
        t_logits, t_hidden = teacher_output.logits, teacher_output.hidden
        vocab, dim, temperature = s_logits.size(-1), s_hidden.size(-1), self.temperature
        mask = attention_mask.unsqueeze(-1).expand_as(s_logits)  # (bs, seq_len, vocab) bool
        s_selected = torch.masked_select(s_logits, mask).view(-1, vocab)
        t_selected = torch.masked_select(t_logits, mask).view(-1, vocab)
        losses = {
            "ce": self.kl_loss(F.log_softmax(s_selected / temperature, dim=-1), F.softmax(t_selected / temperature, dim=-1))
            * temperature**2,
            "mlm": self.lm_loss(s_logits.view(-1, vocab), lm_labels.view(-1)),
        }
        hidden_mask = attention_mask.unsqueeze(-1).expand_as(s_hidden)
        s_rows = torch.masked_select(s_hidden, hidden_mask).view(-1, dim)
        t_rows = torch.masked_select(t_hidden, hidden_mask).view(-1, dim)
        losses["cos"] = self.cosine_loss(s_rows, t_rows, s_rows.new_ones(s_rows.size(0)))
        return sum(self.alphas[term] * value for term, value in losses.items()), losses


def make_distiller(variant: str, student: nn.Module, teacher: nn.Module, vocab: int, batch_size: int,
                   seq_len: int, chunk_size: int, data: list[np.ndarray]) -> Distiller:
    """A non-writing, single-process Distiller of `variant` over `data`, training `student` in place."""
    params = bench_params(torch.device("cpu"), batch_size, seq_len, False, chunk_size if variant == "fused" else 0)
    params.group_by_size = True
    token_probs = torch.ones(vocab)
    token_probs[list(SPECIAL_TOK_IDS.values())] = 0.0
    distiller = Distiller(params, LmSeqsDataset(params, data), token_probs, student, teacher)
    if variant == "original":
        distiller.model = OriginalLoss(student, distiller.alphas, distiller.temperature)
    return distiller


def synthetic_data(n: int, vocab: int, lengths: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """`n` sequences [CLS] random ids [SEP] of random lengths in [lengths[0], lengths[1]]."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(lengths[0], lengths[1] + 1, size=n)
    return [np.array([101, *rng.integers(1000, vocab, size=size - 2), 102], dtype=np.int32) for size in sizes]


def build(args, variants) -> tuple[dict[str, Distiller], list]:
    """The variants' Distillers (same initial student, shared teacher) and the (fixed) batches of a run."""
    torch.manual_seed(0)
    student, teacher = build_models(CPU_SHAPE, args.vocab)
    data = synthetic_data(args.batch * (args.rounds + 1), args.vocab, (args.seq_len, args.seq_len))
    distillers = {
        variant: make_distiller(variant, copy.deepcopy(student) if len(variants) > 1 else student, teacher,
                                args.vocab, args.batch, args.seq_len, args.chunk_size, data)
        for variant in variants
    }
    first = next(iter(distillers.values()))
    dataset = first.dataloader.dataset
    batches = []
    for b in range(args.rounds + 1):
        batch = dataset.batch_sequences([dataset[i] for i in range(b * args.batch, (b + 1) * args.batch)])
        batches.append(first.prepare_batch_mlm(batch))  # masked once: every variant sees the same targets
    return distillers, batches


def step(distiller: Distiller, batch) -> tuple[float, float]:
    """One `Distiller.step` on a prepared batch: (wall seconds, CPU seconds of this process)."""
    input_ids, attention_mask, labels = batch
    wall, cpu = time.perf_counter(), time.process_time()
    distiller.step(input_ids=input_ids, attention_mask=attention_mask, lm_labels=labels)
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(seconds: list[float]) -> str:
    return f"{min(seconds):.2f}-{max(seconds):.2f} (median {statistics.median(seconds):.2f})"


def ratio_summary(reference: list[float], other: list[float]) -> str:
    ratios = [r / o for r, o in zip(reference, other)]
    return f"{min(ratios):.2f}x-{max(ratios):.2f}x (median {statistics.median(ratios):.2f}x)"


def print_times(times: dict, reference: str | None, tokens: int) -> None:
    """Per variant: wall and CPU seconds per step; per round, the reference's time over each variant's."""
    for variant, pairs in times.items():
        wall, cpu = zip(*pairs)
        print(f"  {variant!s:9s} wall s/step {summary(wall)}, CPU s/step {summary(cpu)}, "
              f"tokens/s {tokens / max(wall):.0f}-{tokens / min(wall):.0f}")
    for variant, pairs in times.items():
        if reference is not None and variant != reference:
            (ref_wall, ref_cpu), (wall, cpu) = zip(*times[reference]), zip(*pairs)
            print(f"  {reference} / {variant}: wall {ratio_summary(ref_wall, wall)}, CPU {ratio_summary(ref_cpu, cpu)}")


def run_speed(args) -> None:
    distillers, batches = build(args, args.variants)
    for distiller in distillers.values():
        step(distiller, batches[0])  # warm-up
    times = {variant: [] for variant in distillers}
    order = list(distillers)
    for batch in batches[1:]:
        for variant in order:
            times[variant].append(step(distillers[variant], batch))
        order = order[1:] + order[:1]
    print(f"speed: vocab {args.vocab}, batch {args.batch} x {args.seq_len}, {torch.get_num_threads()} threads, "
          f"fused chunk {args.chunk_size}, {args.rounds} rounds")
    print_times(times, "original" if "original" in times else None, args.batch * args.seq_len)


def run_chunks(args) -> None:
    torch.manual_seed(0)
    student, teacher = build_models(CPU_SHAPE, args.vocab)
    data = synthetic_data(args.batch * (args.rounds + 1), args.vocab, (args.seq_len, args.seq_len))
    distillers = {
        size: make_distiller("fused", copy.deepcopy(student), teacher, args.vocab, args.batch, args.seq_len, size, data)
        for size in args.chunk_sizes
    }
    first = next(iter(distillers.values()))
    dataset = first.dataloader.dataset
    batch = first.prepare_batch_mlm(dataset.batch_sequences([dataset[i] for i in range(args.batch)]))
    times = {size: [] for size in distillers}
    order = list(distillers)
    for round_index in range(args.rounds + 1):
        for size in order:
            seconds = step(distillers[size], batch)
            if round_index:
                times[size].append(seconds)
        order = order[1:] + order[:1]
    print(f"chunks: vocab {args.vocab}, batch {args.batch} x {args.seq_len}, {torch.get_num_threads()} threads")
    print_times({f"chunk {size}": pairs for size, pairs in times.items()}, None, args.batch * args.seq_len)


def measure_one(args) -> dict:
    """In this (fresh) process: build, warm up, then one measured step or one epoch; the peak RSS."""
    variant = args.variants[0]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.mode == "epoch":
        torch.manual_seed(0)
        student, teacher = build_models(CPU_SHAPE, args.vocab)
        data = synthetic_data(args.sequences, args.vocab, (16, 511))
        distiller = make_distiller(variant, student, teacher, args.vocab, args.batch, 511, args.chunk_size, data)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        distiller.train()
        seconds = time.perf_counter() - start
    else:
        distillers, batches = build(args, [variant])
        distiller = distillers[variant]
        step(distiller, batches[0])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seconds = step(distiller, batches[1])[0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "peak_mib": peak / 1024, "before_mib": before / 1024, "start_mib": baseline / 1024,
            "seconds": seconds}


def run_memory(args) -> None:
    """Each variant in a fresh process, one after the other (never two at once)."""
    what = (f"one epoch of {args.sequences} sequences (lengths 16-511), batch {args.batch}" if args.mode == "epoch"
            else f"one step, batch {args.batch} x {args.seq_len}")
    print(f"{args.mode}: vocab {args.vocab}, {what}, {args.threads} threads, fused chunk {args.chunk_size}")
    for variant in args.variants:
        command = [sys.executable, "-m", "bench.fused_loss", args.mode, "--one", "--variants", variant,
                   "--vocab", str(args.vocab), "--batch", str(args.batch), "--seq_len", str(args.seq_len),
                   "--chunk_size", str(args.chunk_size), "--threads", str(args.threads),
                   "--sequences", str(args.sequences)]
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"  {variant}: failed\n{result.stderr[-2000:]}")
            continue
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"  {variant:9s} peak RSS {figures['peak_mib'] / 1024:.2f} GiB (before the measured part "
              f"{figures['before_mib'] / 1024:.2f} GiB), {figures['seconds']:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["speed", "memory", "epoch", "chunks"])
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=511)
    parser.add_argument("--rounds", type=int, default=5, help="speed/chunks: timed rounds (after one warm-up)")
    parser.add_argument("--chunk_size", type=int, default=DEFAULT_LOSS_CHUNK_SIZE, help="fused variant's chunk")
    parser.add_argument("--chunk_sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--sequences", type=int, default=64, help="epoch: sequences in the epoch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a memory/epoch child process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure_one(args)))
    elif args.mode == "speed":
        run_speed(args)
    elif args.mode == "chunks":
        run_chunks(args)
    else:
        run_memory(args)


if __name__ == "__main__":
    main()
