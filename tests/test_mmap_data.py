"""The memory-mapped data format: binarized_data.py --format mmap, convert_to_mmap.py, token_counts.py
and train.py on it, against the pickle format.

Both formats of the same corpus and seed must give the same sequences in the same order, so the
same dataset, the same batches and the same trained weights, bit for bit; the mapped ids must
never be copied into a process; damaged files are one-line errors.
"""

import os
import pickle
import subprocess
import sys
import tracemalloc
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler
from transformers import AutoTokenizer

import assets
import binarized_data
import convert_to_mmap
import lm_seqs_dataset
import token_counts
import train
from cli_utils import ScriptError
from grouped_batch_sampler import GroupedBatchSampler, create_lengths_groups
from lm_seqs_dataset import FlatCorpus, LmSeqsDataset
from token_data import TokenDataError, load_token_counts, load_token_id_arrays, load_token_id_mmap, mmap_files

# train.main installs torchelastic's error handler, which cannot reach a file descriptor under pytest's capture.
pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

MAX_SIZE = 24  # below many of the corpus' lengths, so that sequences are split into chunks
KINDS = ("bert", "gpt2")


def binarize(source: Path, tokenizer_dir: Path, kind: str, out_dir: Path, output_format: str, *extra: str) -> Path:
    """scripts/binarized_data.py's main with seed 0; the path of what it wrote (the .ids.npy file for mmap)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    binarized_data.main([
        "--file_path", str(source), "--tokenizer_type", kind, "--tokenizer_name", str(tokenizer_dir),
        "--dump_file", str(out_dir / "binarized_text"), "--seed", "0", "--format", output_format, *extra,
    ])
    return binarized_data.output_path(str(out_dir / "binarized_text"), str(tokenizer_dir), output_format)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory, corpus_file, teacher_dirs) -> dict[str, dict[str, Path]]:
    """Per family (bert, gpt2): the corpus binarized as a pickle and memory-mapped; for bert also
    memory-mapped by 2 worker processes in batches of 64 lines."""
    root = tmp_path_factory.mktemp("mmap_data")
    files = {}
    for kind in KINDS:
        files[kind] = {
            output_format: binarize(corpus_file, teacher_dirs[kind], kind, root / kind / output_format, output_format)
            for output_format in ("pickle", "mmap")
        }
    files["bert"]["mmap_workers"] = binarize(
        corpus_file, teacher_dirs["bert"], "bert", root / "bert" / "workers", "mmap", "--workers", "2",
        "--batch_size", "64",
    )
    return files


def params(kind: str, special_tok_ids: dict[str, int]) -> Namespace:
    return Namespace(max_model_input_size=MAX_SIZE, mlm=kind == "bert", special_tok_ids=special_tok_ids, is_master=True)


def both_datasets(data_files, teacher_dirs, kind: str) -> tuple[LmSeqsDataset, LmSeqsDataset]:
    """LmSeqsDataset on the pickle and on the memory-mapped file of `kind`, as train.py builds them."""
    special = train.required_special_token_ids(AutoTokenizer.from_pretrained(teacher_dirs[kind]), kind == "bert")
    from_pickle = LmSeqsDataset(params(kind, special), load_token_id_arrays(data_files[kind]["pickle"]))
    from_map = LmSeqsDataset(params(kind, special), FlatCorpus(*load_token_id_mmap(data_files[kind]["mmap"])))
    return from_pickle, from_map


def served_sequences(ids_file: Path) -> list[np.ndarray]:
    """The sequences of a memory-mapped file in training order, read the obvious way."""
    ids, offsets, order = load_token_id_mmap(ids_file)
    return [np.asarray(ids[offsets[k] : offsets[k + 1]]) for k in order]


def assert_same_sequences(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    assert {a.dtype for a in actual} == {e.dtype for e in expected}
    assert all(np.array_equal(a, e) for a, e in zip(actual, expected))


# ---------------------------------------------------------------- the files


@pytest.mark.parametrize("kind", KINDS)
def test_mmap_holds_the_pickles_sequences_in_the_pickles_order(data_files, kind):
    assert_same_sequences(served_sequences(data_files[kind]["mmap"]), load_token_id_arrays(data_files[kind]["pickle"]))


def test_files_and_names(data_files):
    ids_file = data_files["bert"]["mmap"]
    assert ids_file.name == "binarized_text.tiny-bert-teacher.ids.npy"
    assert sorted(p.name for p in ids_file.parent.iterdir()) == [
        "binarized_text.tiny-bert-teacher.ids.npy", "binarized_text.tiny-bert-teacher.offsets.npy",
        "binarized_text.tiny-bert-teacher.order.npy",
    ]
    ids, offsets, order = (np.load(path) for path in mmap_files(ids_file).values())
    assert (ids.dtype, offsets.dtype, order.dtype) == (np.uint16, np.int64, np.int64)
    # Stored as read (line 0 first), the shuffle kept apart.
    assert not np.array_equal(order, np.arange(len(order)))


def test_worker_processes_write_the_same_files(data_files):
    """Streaming with 2 workers and small batches: byte for byte what one process writes."""
    single, workers = mmap_files(data_files["bert"]["mmap"]), mmap_files(data_files["bert"]["mmap_workers"])
    for part in single:
        assert single[part].read_bytes() == workers[part].read_bytes(), part


def test_converter_round_trips(data_files, tmp_path):
    pickle_file = tmp_path / "copy.tiny-bert.pickle"
    pickle_file.write_bytes(data_files["bert"]["pickle"].read_bytes())
    convert_to_mmap.main(["--data_file", str(pickle_file)])
    converted = tmp_path / "copy.tiny-bert.ids.npy"
    sequences = load_token_id_arrays(pickle_file)
    assert_same_sequences(served_sequences(converted), sequences)
    # The pickle's order is already shuffled: kept as the stored order.
    assert np.array_equal(load_token_id_mmap(converted).order, np.arange(len(sequences)))
    assert_same_sequences(served_sequences(converted), served_sequences(data_files["bert"]["mmap"]))


def test_converter_keeps_int32_ids(tmp_path):
    sequences = [np.array([2, 70_000, 3], dtype=np.int32), np.array([2, 5, 6, 3], dtype=np.int32)]
    target = tmp_path / "big.ids.npy"
    convert_to_mmap.convert(sequences, target)
    assert_same_sequences(served_sequences(target), sequences)


def test_failed_binarization_leaves_the_previous_files(corpus_lines, tokenizer_dirs, tmp_path):
    source = tmp_path / "bad.txt"
    source.write_bytes("\n".join(corpus_lines[:30]).encode() + b"\ncaf\xe9 au lait\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    previous = {path: f"previous {path.name}".encode() for path in mmap_files(out_dir / "b.tiny-bert.ids.npy").values()}
    for path, content in previous.items():
        path.write_bytes(content)
    with pytest.raises(ScriptError, match="line 31 is not valid UTF-8"):
        binarized_data.main([
            "--file_path", str(source), "--tokenizer_name", str(tokenizer_dirs["bert"]), "--dump_file",
            str(out_dir / "b"), "--format", "mmap", "--batch_size", "8",
        ])
    assert {path: path.read_bytes() for path in out_dir.iterdir()} == previous


# ---------------------------------------------------------------- the dataset


@pytest.mark.parametrize("kind", KINDS)
def test_both_formats_give_the_same_dataset(data_files, teacher_dirs, kind):
    from_pickle, from_map = both_datasets(data_files, teacher_dirs, kind)
    assert from_pickle.lengths.max() <= MAX_SIZE < max(map(len, load_token_id_arrays(data_files[kind]["pickle"])))
    assert np.array_equal(from_pickle.lengths, from_map.lengths)
    for i in range(len(from_pickle)):
        (pickle_ids, pickle_length), (map_ids, map_length) = from_pickle[i], from_map[i]
        assert pickle_length == map_length and pickle_ids.dtype == map_ids.dtype
        assert np.array_equal(pickle_ids, map_ids), i


def test_both_formats_give_the_same_batches(data_files, teacher_dirs):
    """Same seeded sampler -> grouped batches -> DataLoader(collate_fn=batch_sequences): the same tensors."""
    batches = []
    for dataset in both_datasets(data_files, teacher_dirs, "bert"):
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
        batch_sampler = GroupedBatchSampler(sampler, create_lengths_groups(dataset.lengths, MAX_SIZE), batch_size=8)
        loader = DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=dataset.batch_sequences)
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) > 10
    for (ids_a, lengths_a), (ids_b, lengths_b) in zip(*batches, strict=True):
        assert torch.equal(ids_a, ids_b) and torch.equal(lengths_a, lengths_b)


def synthetic_map(path: Path, n_tokens: int) -> Path:
    """[CLS] ... [SEP] documents of 100 to 1000 tokens, BERT-like ids, written as a memory-mapped corpus."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 1001, n_tokens // 550)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    ids = rng.integers(5, 30_000, int(offsets[-1]), dtype=np.uint16)
    ids[offsets[:-1]], ids[offsets[1:] - 1] = 2, 3
    files = mmap_files(path)
    np.save(files["ids"], ids)
    np.save(files["offsets"], offsets)
    np.save(files["order"], rng.permutation(len(lengths)))
    return path


def test_dataset_reads_the_map_and_never_copies_the_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(lm_seqs_dataset, "_SCAN_BLOCK", 1 << 20)
    mapped = load_token_id_mmap(synthetic_map(tmp_path / "synthetic.ids.npy", 20_000_000))
    special = {"pad_token": 0, "unk_token": 1, "cls_token": 2, "sep_token": 3, "mask_token": 4}
    tracemalloc.start()  # numpy reports its buffers to tracemalloc: the peak covers every temporary
    try:
        params = Namespace(max_model_input_size=512, mlm=True, special_tok_ids=special)
        dataset = LmSeqsDataset(params, FlatCorpus(*mapped))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(dataset.token_ids.base, np.memmap) and np.shares_memory(dataset.token_ids, mapped.ids)
    assert not dataset.token_ids.flags.writeable
    whole = np.flatnonzero(~dataset.add_start & ~dataset.add_end)[0]
    assert np.shares_memory(dataset[whole][0], mapped.ids)
    # The index arrays and the passes' temporaries (tens of bytes per sequence): a fraction of the
    # ids, never a copy of them.
    assert peak < mapped.ids.nbytes / 4, (peak, mapped.ids.nbytes)


# ---------------------------------------------------------------- token_counts.py and train.py


def train_argv(teacher_dir: Path, data_file: Path, counts_file: Path, config_file: Path, dump_path: Path) -> list[str]:
    return [
        "--dump_path", str(dump_path), "--data_file", str(data_file), "--token_counts", str(counts_file),
        "--student_type", "distilbert", "--student_config", str(config_file), "--teacher_type", "bert",
        "--teacher_name", str(teacher_dir), "--mlm", "--alpha_ce", "5.0", "--alpha_mlm", "2.0", "--alpha_cos", "1.0",
        "--alpha_clm", "0.0", "--max_model_input_size", str(MAX_SIZE), "--n_gpu", "0", "--n_epoch", "1",
        "--batch_size", "8", "--gradient_accumulation_steps", "2", "--learning_rate", "5e-3", "--seed", "0",
        "--log_interval", "10", "--checkpoint_interval", "1000",
    ]


def test_training_is_identical_on_both_formats(data_files, teacher_dirs, tmp_path):
    """Counts and a tiny seeded train.py run from each format, through the CLI: the same weights, bit for bit."""
    teacher_dir = teacher_dirs["bert"]
    vocab_size = len(AutoTokenizer.from_pretrained(teacher_dir))
    config_file = tmp_path / "student.json"
    assets.student_config("distilbert", vocab_size).to_json_file(config_file)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    runs = {}
    for output_format in ("pickle", "mmap"):
        data_file, counts_file = data_files["bert"][output_format], tmp_path / f"counts.{output_format}.pickle"
        token_counts.main([
            "--data_file", str(data_file), "--token_counts_dump", str(counts_file), "--vocab_size", str(vocab_size),
        ])
        argv = train_argv(teacher_dir, data_file, counts_file, config_file, tmp_path / output_format)
        command = [sys.executable, os.path.join(os.path.dirname(train.__file__), "train.py"), *argv]
        runs[output_format] = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    assert load_token_counts(tmp_path / "counts.pickle.pickle") == load_token_counts(tmp_path / "counts.mmap.pickle")
    for process in runs.values():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    weights = {fmt: torch.load(tmp_path / fmt / "pytorch_model.bin", weights_only=True) for fmt in runs}
    assert weights["pickle"].keys() == weights["mmap"].keys()
    for name, tensor in weights["pickle"].items():
        assert torch.equal(tensor, weights["mmap"][name]), name


def damage(ids_file: Path, out_dir: Path, how: str) -> Path:
    """A copy of the three files of `ids_file` in `out_dir`, damaged `how`; returns the copy's ids file."""
    out_dir.mkdir()
    copies = mmap_files(out_dir / ids_file.name)
    for part, source in mmap_files(ids_file).items():
        copies[part].write_bytes(source.read_bytes())
    if how == "truncated":
        copies["ids"].write_bytes(copies["ids"].read_bytes()[:-10])
    elif how == "offsets_of_another_corpus":
        np.save(copies["offsets"], np.load(copies["offsets"])[:-1])
    elif how == "order_not_a_permutation":
        order = np.load(copies["order"])
        order[1] = order[0]
        np.save(copies["order"], order)
    elif how == "order_missing":
        copies["order"].unlink()
    elif how == "not_npy":
        copies["ids"].write_bytes(b"not an array at all")
    return copies["ids"]


DAMAGES = {
    "truncated": "is not a complete .npy array (truncated or damaged?)",
    "offsets_of_another_corpus": "does not match",
    "order_not_a_permutation": "is not a permutation",
    "order_missing": "order.npy' does not exist",
    "not_npy": "is not a complete .npy array",
}


def test_damaged_files_are_one_line_errors_of_token_counts(data_files, repo_root, tmp_path):
    started = {}
    for how in DAMAGES:
        ids_file = damage(data_files["bert"]["mmap"], tmp_path / how, how)
        command = [sys.executable, str(repo_root / "scripts" / "token_counts.py"), "--data_file", str(ids_file),
                   "--token_counts_dump", str(tmp_path / how / "counts.pickle"), "--vocab_size", "1000"]
        started[how] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for how, process in started.items():
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 1 and "Traceback" not in stderr, stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and DAMAGES[how] in last, (how, last)
        assert not (tmp_path / how / "counts.pickle").exists()


def test_damaged_file_is_a_one_line_error_of_train(data_files, teacher_dirs, tmp_path, capsys):
    ids_file = damage(data_files["bert"]["mmap"], tmp_path / "damaged", "offsets_of_another_corpus")
    counts_file = tmp_path / "counts.pickle"
    token_counts.main(["--data_file", str(data_files["bert"]["pickle"]), "--token_counts_dump", str(counts_file),
                       "--vocab_size", str(len(AutoTokenizer.from_pretrained(teacher_dirs["bert"])))])
    config_file = tmp_path / "student.json"
    assets.student_config("distilbert", 10).to_json_file(config_file)
    argv = train_argv(teacher_dirs["bert"], ids_file, counts_file, config_file, tmp_path / "dump")
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 1 and len(errors) == 1
    assert "could not read --data_file" in errors[0] and "does not match" in errors[0]
    assert not (tmp_path / "dump").exists()


def test_reader_names_the_ids_file(tmp_path):
    with pytest.raises(TokenDataError, match="is not the .ids.npy file"):
        load_token_id_mmap(tmp_path / "binarized_text.bert.offsets.npy")


def test_a_pickled_dataset_maps_the_file_again(data_files, teacher_dirs):
    """What a DataLoader worker started by spawn receives: the file's place, not a copy of the ids."""
    _, from_map = both_datasets(data_files, teacher_dirs, "bert")
    payload = pickle.dumps(from_map)
    received = pickle.loads(payload)
    assert isinstance(received.token_ids.base, np.memmap) and not received.token_ids.flags.writeable
    assert len(payload) < from_map.token_ids.nbytes / 2  # the index arrays only
    assert all(np.array_equal(received[i][0], from_map[i][0]) for i in range(len(from_map)))
