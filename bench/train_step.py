"""Throughput and peak memory of one distillation training step (`Distiller.step`, MLM, DistilBERT recipe).

Usage (or as `python -m bench.train_step` from the repository root):
    python bench/train_step.py                 # CPU (scaled-down models), plus real shapes on CUDA if present
    python bench/train_step.py --skip_cpu --peak_tflops 989
    python bench/train_step.py --threads 1 --large_vocab 128000 --loss_chunk_size 256

CPU: a BERT teacher and DistilBERT student with the real vocabulary (30522) but scaled-down depth and
width (printed), at sequence lengths 128 and 512, fp32; then a large-vocabulary case, a tiny Llama-style
decoder (GQA, RMSNorm, rotary, untied head; teacher 2 layers, student 1, --decoder_width wide) at
--large_vocab entries (today's tokenizers: 128k-262k), its step with the fused vocabulary losses
(--loss_chunk_size) and a float32 or a bfloat16 teacher (--teacher_dtype), and with full logits
(--loss_chunk_size 0), interleaved: tokens/s, peak process RSS and the teacher's weights. CUDA: the real DistilBERT shapes
(12-layer 768-wide BERT teacher, 6-layer student) in bf16, with model FLOPs utilisation against
--peak_tflops (default: H200 dense bf16, ~989 TFLOP/s).

Each measured step is the real training path, as `Distiller.train` runs it: prepare_batch_mlm (masking
on the host) -> `Distiller.step` (non-blocking copies, teacher forward in inference mode, student
forward/backward, then at the boundary finite check, clip, AdamW step (fused on CUDA), schedule).

MFU = model FLOPs per second / --peak_tflops, with model FLOPs per token counting the matmuls only:
    teacher forward F(L_t) + student forward and backward 3 F(L_s), where
    F(L) = L (24 h^2 + 4 s h) + 2 h^2 + 2 h V
(per layer: 2 x 12 h^2 for the Q, K, V, output and FFN weights, i.e. 2 N_layer; 2 x 2 s h for the
attention scores and weighted sum; then the MLM head transform and decoder; embeddings and the
loss/softmax work are not counted). Without the attention terms this is 2 N_t + 6 N_s per token.
"""

import argparse
import copy
import resource
import sys
import threading
import time
from argparse import Namespace
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
)

if not __package__:  # run as `python bench/train_step.py`: import the project from the repository root, as -m does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distiller import Distiller  # noqa: E402
from lm_seqs_dataset import LmSeqsDataset  # noqa: E402
from losses import DEFAULT_LOSS_CHUNK_SIZE  # noqa: E402
from train import build_parser  # noqa: E402

VOCAB_SIZE = 30522
SPECIAL_TOK_IDS = {"pad_token": 0, "unk_token": 100, "cls_token": 101, "sep_token": 102, "mask_token": 103}


@dataclass
class Shape:
    """Model sizes of one benchmark setting."""

    hidden: int
    heads: int
    teacher_layers: int
    student_layers: int
    max_positions: int = 512

    def describe(self) -> str:
        return (
            f"teacher BERT {self.teacher_layers}x{self.hidden} / student DistilBERT "
            f"{self.student_layers}x{self.hidden}, {self.heads} heads, FFN {4 * self.hidden}, vocab {VOCAB_SIZE}"
        )


CPU_SHAPE = Shape(hidden=256, heads=4, teacher_layers=4, student_layers=2)
REAL_SHAPE = Shape(hidden=768, heads=12, teacher_layers=12, student_layers=6)


def build_models(shape: Shape, vocab_size: int = VOCAB_SIZE) -> tuple[DistilBertForMaskedLM, BertForMaskedLM]:
    """Randomly initialised student and teacher of `shape`, hidden states on (the cosine loss needs them)."""
    teacher = BertForMaskedLM(
        BertConfig(
            vocab_size=vocab_size, hidden_size=shape.hidden, num_hidden_layers=shape.teacher_layers,
            num_attention_heads=shape.heads, intermediate_size=4 * shape.hidden,
            max_position_embeddings=shape.max_positions, output_hidden_states=True,
        )
    )
    student = DistilBertForMaskedLM(
        DistilBertConfig(
            vocab_size=vocab_size, dim=shape.hidden, n_layers=shape.student_layers, n_heads=shape.heads,
            hidden_dim=4 * shape.hidden, max_position_embeddings=shape.max_positions, sinusoidal_pos_embds=True,
            output_hidden_states=True,
        )
    )
    return student, teacher


def forward_flops_per_token(n_layers: int, hidden: int, seq_len: int) -> int:
    """Matmul FLOPs of one forward pass per token: projections, FFN, attention scores/values, MLM head."""
    layers = n_layers * (2 * 12 * hidden**2 + 2 * 2 * seq_len * hidden)
    head = 2 * hidden**2 + 2 * hidden * VOCAB_SIZE
    return layers + head


def bench_params(
    device: torch.device, batch_size: int, seq_len: int, bf16: bool, loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE
) -> Namespace:
    """train.py's namespace for the DistilBERT recipe in one non-writing process (is_master False)."""
    params = build_parser().parse_args(
        [
            "--dump_path", "unused", "--data_file", "unused", "--student_type", "distilbert",
            "--student_config", "unused", "--teacher_type", "bert", "--teacher_name", "unused", "--mlm",
            "--alpha_ce", "5.0", "--alpha_mlm", "2.0", "--alpha_cos", "1.0", "--alpha_clm", "0.0",
            "--batch_size", str(batch_size), "--gradient_accumulation_steps", "1", "--group_by_size",
        ]
    )
    params.bf16 = bf16
    params.loss_chunk_size = loss_chunk_size
    params.n_gpu = 1 if device.type == "cuda" else 0
    params.device = device
    params.is_master = False  # no tensorboard, no checkpoints
    params.multi_gpu = params.multi_node = False
    params.world_size, params.global_rank, params.local_rank = 1, 0, 0
    params.special_tok_ids = SPECIAL_TOK_IDS
    params.max_model_input_size = seq_len
    return params


def synthetic_data(n: int, seq_len: int, seed: int = 0) -> list[np.ndarray]:
    """`n` sequences of exactly `seq_len` ids: [CLS] random word-piece ids [SEP]."""
    rng = np.random.default_rng(seed)
    body = rng.integers(1000, VOCAB_SIZE, size=(n, seq_len - 2))
    return [np.array([101, *row, 102], dtype=np.uint16) for row in body]


@contextmanager
def peak_rss_sampler(period_s: float = 0.002) -> Iterator[dict[str, int]]:
    """Sample this process's resident memory in a thread; yields a dict whose "peak" is filled on exit."""
    process, stats, done = psutil.Process(), {"peak": 0}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            stats["peak"] = max(stats["peak"], process.memory_info().rss)
            time.sleep(period_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield stats
    finally:
        done.set()
        thread.join()


def run_setting(shape: Shape, device: torch.device, batch_size: int, seq_len: int, bf16: bool, warmup: int,
                iters: int, loss_chunk_size: int) -> dict[str, float]:
    """Time `iters` Distiller steps after `warmup`; returns tokens/s, seconds per step and peak memory (MB)."""
    torch.manual_seed(0)
    student, teacher = build_models(shape)
    params = bench_params(device, batch_size, seq_len, bf16, loss_chunk_size)
    dataset = LmSeqsDataset(params, synthetic_data(batch_size * (warmup + iters), seq_len))
    counts = np.ones(VOCAB_SIZE)
    token_probs = torch.from_numpy(counts**-0.7).float()
    token_probs[list(SPECIAL_TOK_IDS.values())] = 0.0
    distiller = Distiller(params, dataset, token_probs, student, teacher)
    batches = [dataset.batch_sequences([dataset[i] for i in range(b * batch_size, (b + 1) * batch_size)])
               for b in range(warmup + iters)]

    def one_step(batch) -> None:
        # Host tensors, as in Distiller.train: step copies them without blocking and selects loss rows on the host.
        input_ids, attention_mask, labels = distiller.prepare_batch_mlm(batch)
        distiller.step(input_ids=input_ids, attention_mask=attention_mask, lm_labels=labels)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for batch in batches[:warmup]:
        one_step(batch)
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with peak_rss_sampler() as rss:
        start = time.perf_counter()
        for batch in batches[warmup:]:
            one_step(batch)
        synchronize()
        elapsed = time.perf_counter() - start
    distiller.last_loss.item()  # the step really finished and produced a number
    peak_mb = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss["peak"]) / 2**20
    tokens = batch_size * seq_len * iters
    return {"tokens_per_s": tokens / elapsed, "s_per_step": elapsed / iters, "peak_mb": peak_mb}


def report(shape: Shape, device: torch.device, settings: list[tuple[int, int]], bf16: bool, args) -> None:
    """Run and print every (batch size, sequence length) setting of one device."""
    precision = "bf16 autocast" if bf16 else "fp32"
    print(f"\n== {device.type.upper()}: {shape.describe()}; {precision}; --loss_chunk_size {args.loss_chunk_size}; "
          f"{args.warmup} warm-up + {args.iters} timed steps")
    memory_kind = "peak allocated" if device.type == "cuda" else "peak process RSS"
    header = f"{'seq_len':>7} {'batch':>5} {'tokens/s':>10} {'s/step':>8} {memory_kind + ' (MB)':>24}"
    print(header + (f" {'TFLOP/s':>8} {'MFU':>6}" if device.type == "cuda" else ""))
    for batch_size, seq_len in settings:
        result = run_setting(shape, device, batch_size, seq_len, bf16, args.warmup, args.iters, args.loss_chunk_size)
        line = (f"{seq_len:>7} {batch_size:>5} {result['tokens_per_s']:>10.0f} {result['s_per_step']:>8.3f} "
                f"{result['peak_mb']:>24.0f}")
        if device.type == "cuda":
            flops_per_token = forward_flops_per_token(shape.teacher_layers, shape.hidden, seq_len) + 3 * (
                forward_flops_per_token(shape.student_layers, shape.hidden, seq_len)
            )
            achieved = flops_per_token * result["tokens_per_s"] / 1e12
            line += f" {achieved:>8.1f} {achieved / args.peak_tflops:>6.1%}"
        print(line, flush=True)


# The decoder case's variants: (name, fused rows per chunk or 0 for full logits, teacher weight type).
DECODER_VARIANTS = (("fused, fp32 teacher", None, torch.float32), ("fused, bf16 teacher", None, torch.bfloat16),
                    ("full logits, fp32", 0, torch.float32))


def decoder_distillers(args, device: torch.device) -> dict[str, Distiller]:
    """Llama-style teacher and student at a large vocabulary (CLM, alpha ce/clm/cos = 5/2/1), one Distiller per
    DECODER_VARIANTS entry (--loss_chunk_size or 0; a float32 or bfloat16 teacher, as --teacher_dtype holds
    it), each with its own copy of the same initial student."""
    torch.manual_seed(0)
    config = dict(vocab_size=args.large_vocab, hidden_size=args.decoder_width, intermediate_size=2 * args.decoder_width,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.decoder_seq_len,
                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    teacher = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **config)).requires_grad_(False)
    student = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **config))
    rng = np.random.default_rng(0)
    data = [np.array([0, *row, 0], dtype=np.int32)
            for row in rng.integers(1, args.large_vocab, size=(args.decoder_batch, args.decoder_seq_len - 2))]
    distillers = {}
    for name, chunk_size, teacher_dtype in DECODER_VARIANTS:
        chunk_size = args.loss_chunk_size if chunk_size is None else chunk_size
        params = build_parser().parse_args(
            ["--dump_path", "unused", "--data_file", "unused", "--student_type", "auto", "--student_config", "unused",
             "--teacher_type", "auto", "--teacher_name", "unused", "--alpha_ce", "5.0", "--alpha_clm", "2.0",
             "--alpha_cos", "1.0", "--batch_size", str(args.decoder_batch), "--gradient_accumulation_steps", "1",
             "--loss_chunk_size", str(chunk_size)]
        )
        params.n_gpu, params.device, params.is_master = 0, device, False
        params.multi_gpu = params.multi_node = False
        params.world_size, params.global_rank, params.local_rank = 1, 0, 0
        params.special_tok_ids = {"bos_token": 0, "eos_token": 0, "unk_token": 0}
        params.max_model_input_size = args.decoder_seq_len
        distillers[name] = Distiller(params, LmSeqsDataset(params, data), None, copy.deepcopy(student),
                                     copy.deepcopy(teacher).to(teacher_dtype))
    return distillers


def report_large_vocabulary(args) -> None:
    """Fused against full logits, a float32 against a bfloat16 teacher, on a tiny decoder at a modern vocabulary:
    tokens/s, peak RSS of the step and the teacher's weights, interleaved."""
    distillers = decoder_distillers(args, torch.device("cpu"))
    first = next(iter(distillers.values()))
    dataset = first.dataloader.dataset
    batch = first.prepare_batch_clm(dataset.batch_sequences([dataset[i] for i in range(len(dataset))]))
    for distiller in distillers.values():
        distiller.step(input_ids=batch[0], attention_mask=batch[1], lm_labels=batch[2])  # warm-up
    baseline = psutil.Process().memory_info().rss
    seconds, peaks = {name: [] for name in distillers}, {name: 0 for name in distillers}
    order = list(distillers)
    for _ in range(args.iters):
        for name in order:
            with peak_rss_sampler() as rss:
                start = time.perf_counter()
                distillers[name].step(input_ids=batch[0], attention_mask=batch[1], lm_labels=batch[2])
                seconds[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], rss["peak"])
        order.reverse()
    tokens = args.decoder_batch * args.decoder_seq_len
    print(f"\n== CPU: Llama-style decoder, teacher 2 x {args.decoder_width} / student 1 x {args.decoder_width}, vocab "
          f"{args.large_vocab}, batch {args.decoder_batch} x {args.decoder_seq_len}, fp32 student, fused chunk "
          f"{args.loss_chunk_size}; {args.iters} interleaved rounds after a warm-up; process RSS before the "
          f"timed steps (every variant's models and optimizers): {baseline / 2**20:.0f} MB")
    print(f"{'variant':>22} {'tokens/s':>12} {'s/step':>12} {'peak RSS (MB)':>14} {'above the baseline':>19} "
          f"{'teacher weights (MB)':>21}")
    for name, distiller in distillers.items():
        teacher_mb = sum(p.numel() * p.element_size() for p in distiller.teacher.parameters()) / 2**20
        print(f"{name:>22} {tokens / max(seconds[name]):>5.0f}-{tokens / min(seconds[name]):<6.0f} "
              f"{min(seconds[name]):>5.2f}-{max(seconds[name]):<6.2f} {peaks[name] / 2**20:>14.0f} "
              f"{(peaks[name] - baseline) / 2**20:>19.0f} {teacher_mb:>21.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5, help="Timed steps per setting.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps per setting.")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="Accelerator peak for MFU (H200 bf16 dense).")
    parser.add_argument("--skip_cpu", action="store_true", help="Only the CUDA part.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--large_vocab", type=int, default=128000, help="Vocabulary of the decoder case (0: skip it).")
    parser.add_argument("--decoder_width", type=int, default=256)
    parser.add_argument("--decoder_batch", type=int, default=2)
    parser.add_argument("--decoder_seq_len", type=int, default=256)
    parser.add_argument("--loss_chunk_size", type=int, default=DEFAULT_LOSS_CHUNK_SIZE, help="Fused rows per chunk.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"peak RSS before: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if not args.skip_cpu:
        report(CPU_SHAPE, torch.device("cpu"), [(8, 128), (2, 512)], bf16=False, args=args)
        if args.large_vocab:
            report_large_vocabulary(args)
    if torch.cuda.is_available():
        print(f"CUDA device: {torch.cuda.get_device_name(0)}")
        report(REAL_SHAPE, torch.device("cuda", 0), [(64, 128), (16, 512)], bf16=True, args=args)
    else:
        print("\nNo CUDA device: the real-shape bf16 / MFU part was skipped.")


if __name__ == "__main__":
    main()
