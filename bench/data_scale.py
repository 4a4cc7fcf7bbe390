"""Benchmark: training data load time and memory per rank, pickle against memory-mapped, 1, 2 and 4 ranks.

A synthetic corpus of --n_tokens BERT-like ids (default 10^8, lines of 8 to 255 tokens, 1 % of them
longer than 512 and split, a few unknown-heavy ones dropped) is written once in both formats into a
temporary folder, deleted at the end. For each format and rank count, that many separate processes
(multiprocessing, spawn) start together and each does what a train.py rank does with --data_file:
load it (scripts/token_data.py), build LmSeqsDataset, keep the loaded data referenced as train.py
does, then touch every sequence once (batch_sequences over the whole dataset, in a random order as
the training sampler reads it). While every rank still holds its dataset, each measures itself (psutil):
- RSS: resident pages, including the file pages of the map;
- anon = RSS - shared: private memory, what a rank costs on top of the page cache; delta = its growth
  since just after the imports (interpreter, numpy, torch);
- USS (pages no other process maps) and PSS (each page divided among the processes mapping it).
Figures per rank are medians over the ranks. The files are freshly written, so the page cache is warm.

Targets: memory-mapped anon per rank flat (within 10 %) from 1 to 4 ranks; loading 10^8 tokens < 1 s.

Usage (or as `python -m bench.data_scale` from the repository root):
    python bench/data_scale.py                        # 10^8 tokens, 1, 2 and 4 ranks
    python bench/data_scale.py --n_tokens 10000000 --ranks 1 2 --work_dir /data/tmp
"""

import argparse
import multiprocessing
import pickle
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import psutil
import torch

if not __package__:  # run as `python bench/data_scale.py`: import the project from the repository root, as -m does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lm_seqs_dataset import FlatCorpus, LmSeqsDataset  # noqa: E402
from scripts.token_data import load_token_id_arrays, load_token_id_mmap, mmap_files  # noqa: E402

VOCAB_SIZE = 30522
SPECIAL_TOK_IDS = {"pad_token": 0, "unk_token": 1, "cls_token": 2, "sep_token": 3, "mask_token": 4}
MAX_MODEL_INPUT_SIZE = 512
TOUCH_BATCH = 256
MB = 1 << 20


def write_corpus(n_tokens: int, folder: Path) -> dict[str, Path]:
    """The synthetic corpus as `corpus.pickle` and `corpus.ids.npy` (+ offsets, order) in `folder`.

    Both hold the same sequences in the same training order, as binarized_data.py writes them.
    """
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 256, n_tokens // 130)
    long = rng.random(len(lengths)) < 0.01
    lengths[long] = rng.integers(600, 2000, np.count_nonzero(long))
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    ids = rng.integers(5, VOCAB_SIZE, int(offsets[-1]), dtype=np.uint16)
    ids[rng.integers(0, ids.size, ids.size // 1000)] = SPECIAL_TOK_IDS["unk_token"]
    for heavy in np.flatnonzero(rng.random(len(lengths)) < 0.005):
        ids[offsets[heavy] : offsets[heavy + 1]] = SPECIAL_TOK_IDS["unk_token"]
    ids[offsets[:-1]] = SPECIAL_TOK_IDS["cls_token"]
    ids[offsets[1:] - 1] = SPECIAL_TOK_IDS["sep_token"]
    order = rng.permutation(len(lengths))

    files = {"pickle": folder / "corpus.pickle", "mmap": folder / "corpus.ids.npy"}
    with open(files["pickle"], "wb") as handle:
        starts, ends = offsets[:-1].tolist(), offsets[1:].tolist()
        pickle.dump([ids[starts[k] : ends[k]] for k in order.tolist()], handle, protocol=4)
    for part, array in zip(("ids", "offsets", "order"), (ids, offsets, order)):
        np.save(mmap_files(files["mmap"])[part], array)
    return files


def load(output_format: str, path: Path) -> list[np.ndarray] | FlatCorpus:
    """--data_file as train.py loads it."""
    if output_format == "mmap":
        return FlatCorpus(*load_token_id_mmap(path))
    return load_token_id_arrays(path)


def memory_mb(process: psutil.Process) -> dict[str, float]:
    info = process.memory_full_info()
    return {"rss": info.rss / MB, "anon": (info.rss - info.shared) / MB, "uss": info.uss / MB, "pss": info.pss / MB}


def rank_main(output_format: str, path: Path, start: multiprocessing.Barrier, results: multiprocessing.Queue) -> None:
    """One rank: load, build, touch every sequence, then measure itself while every rank holds its dataset."""
    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1: ranks do not fight over the cores
    process = psutil.Process()
    baseline = memory_mb(process)
    params = Namespace(
        max_model_input_size=MAX_MODEL_INPUT_SIZE, mlm=True, special_tok_ids=SPECIAL_TOK_IDS, is_master=False
    )
    start.wait()
    began = time.perf_counter()
    data = load(output_format, path)  # referenced until the rank ends, as train.py's run() does
    dataset = LmSeqsDataset(params, data)
    loaded = time.perf_counter()
    order = np.random.default_rng(0).permutation(len(dataset))  # random, as the training sampler reads
    for first in range(0, len(dataset), TOUCH_BATCH):
        dataset.batch_sequences([dataset[i] for i in order[first : first + TOUCH_BATCH].tolist()])
    touched = time.perf_counter()
    start.wait()  # every rank holds its dataset now
    memory = memory_mb(process)
    results.put({
        "load_s": loaded - began, "touch_s": touched - loaded, **memory,
        "anon_delta": memory["anon"] - baseline["anon"],
    })
    start.wait()  # stay alive until every rank has measured


def run_ranks(output_format: str, path: Path, n_ranks: int) -> dict[str, float]:
    """Start `n_ranks` processes together; the median of each of their figures."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(n_ranks), context.Queue()
    ranks = [context.Process(target=rank_main, args=(output_format, path, start, results)) for _ in range(n_ranks)]
    for rank in ranks:
        rank.start()
    rows = [results.get(timeout=600) for _ in ranks]
    for rank in ranks:
        rank.join()
        if rank.exitcode != 0:
            raise RuntimeError(f"a {output_format} rank exited with status {rank.exitcode}")
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]} | {
        "load_max_s": max(row["load_s"] for row in rows), "pss_total": sum(row["pss"] for row in rows),
    }


def report(figures: dict[tuple[str, int], dict[str, float]], n_tokens: int) -> None:
    print(f"\nPer rank (median over ranks), {n_tokens:,} tokens; MB = 2^20 bytes")
    print(f"  {'format':7s} {'ranks':>5s} {'load s':>7s} {'(max)':>6s} {'touch s':>8s} {'RSS':>7s} {'anon':>7s} "
          f"{'delta':>7s} {'USS':>7s} {'PSS':>7s} {'PSS all ranks':>14s}")
    for (output_format, n_ranks), row in figures.items():
        print(f"  {output_format:7s} {n_ranks:5d} {row['load_s']:7.2f} {row['load_max_s']:6.2f} {row['touch_s']:8.2f} "
              f"{row['rss']:7.0f} {row['anon']:7.0f} {row['anon_delta']:7.0f} {row['uss']:7.0f} {row['pss']:7.0f} "
              f"{row['pss_total']:14.0f}")
    mapped = {n: row for (output_format, n), row in figures.items() if output_format == "mmap"}
    few, many = min(mapped), max(mapped)
    for key in ("anon", "anon_delta"):
        change = mapped[many][key] / mapped[few][key] - 1
        verdict = "ok" if abs(change) <= 0.10 else "MISSED"
        print(f"  mmap {key} per rank, {few} -> {many} ranks: {change:+.1%} (target within 10 %: {verdict})")
    load_s = mapped[few]["load_s"]
    verdict = "ok" if load_s < 1 else "MISSED"
    print(f"  mmap load + dataset build, {few} rank, {n_tokens:.0e} tokens: {load_s:.2f}s (target < 1 s: {verdict})")
    pickled = figures[("pickle", many)]["pss_total"]
    print(f"  memory of {many} ranks together (PSS summed): pickle {pickled:,.0f} MB, "
          f"mmap {mapped[many]['pss_total']:,.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_tokens", type=int, default=10**8, help="Size of the synthetic corpus.")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="Rank counts to compare.")
    parser.add_argument("--work_dir", default=None, help="Where the temporary corpus goes (default: the system's).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="data_scale_", dir=args.work_dir) as folder:
        began = time.perf_counter()
        files = write_corpus(args.n_tokens, Path(folder))
        sizes = ", ".join(f"{name} {path.stat().st_size / MB:,.0f} MB" for name, path in files.items())
        print(f"Synthetic corpus written in {time.perf_counter() - began:.1f}s: {sizes}")
        figures = {
            (output_format, n_ranks): run_ranks(output_format, files[output_format], n_ranks)
            for output_format in ("pickle", "mmap")
            for n_ranks in args.ranks
        }
    report(figures, args.n_tokens)


if __name__ == "__main__":
    main()
