"""evaluation.py: masked positions are seeded and shared across models; figures equal hand computations."""

import math
from argparse import Namespace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from evaluation import (
    IGNORE_INDEX, build_eval_batches, evaluate_model, mask_for_evaluation, paired_difference, per_target_predictions,
    target_labels,
)
from lm_seqs_dataset import LmSeqsDataset
from utils import UserError

CLS, SEP, PAD, MASK, UNK = 2, 3, 0, 4, 1
SPECIAL = torch.tensor([PAD, UNK, CLS, SEP, MASK])


class FixedLogits(nn.Module):
    """A stub LM whose logits at every position are a fixed table row chosen by the input id."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return SimpleNamespace(logits=self.table[input_ids])


def test_masking_is_seeded_per_row_and_never_touches_special_or_padding():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (64, 40))
    lengths = torch.randint(14, 41, (64,))
    ids[:, 0] = CLS
    ids[torch.arange(64), lengths - 1] = SEP
    ids[torch.arange(40) >= lengths[:, None]] = PAD
    masked, labels = mask_for_evaluation(ids, lengths, SPECIAL, MASK, 0.15, generator)
    targets = labels != IGNORE_INDEX
    maskable = (torch.arange(40) < lengths[:, None]) & ~torch.isin(ids, SPECIAL)
    assert not (targets & ~maskable).any()
    assert torch.equal(targets.sum(1), torch.ceil(0.15 * maskable.sum(1)).long())
    assert torch.equal(masked[targets], torch.full_like(masked[targets], MASK))
    assert torch.equal(masked[~targets], ids[~targets])
    assert torch.equal(labels[targets], ids[targets])
    again, again_labels = mask_for_evaluation(ids, lengths, SPECIAL, MASK, 0.15, torch.Generator().manual_seed(0))
    assert torch.equal(again, masked) and torch.equal(again_labels, labels)
    other, _ = mask_for_evaluation(ids, lengths, SPECIAL, MASK, 0.15, torch.Generator().manual_seed(1))
    assert not torch.equal(other, masked)


def _dataset(mlm: bool) -> LmSeqsDataset:
    rng = np.random.default_rng(0)
    start, end = (CLS, SEP) if mlm else (CLS, CLS)
    data = [np.array([start, *rng.integers(5, 12, size=n), end], dtype=np.uint16) for n in (12, 15, 20, 13, 30)]
    special = {"cls_token": CLS, "sep_token": SEP, "pad_token": PAD, "mask_token": MASK, "unk_token": UNK}
    if not mlm:
        special = {"bos_token": CLS, "eos_token": CLS, "unk_token": UNK}
    return LmSeqsDataset(Namespace(max_model_input_size=64, mlm=mlm, special_tok_ids=special, is_master=True), data)


def test_batches_are_identical_across_builds_with_the_same_seed():
    dataset = _dataset(mlm=True)
    first = build_eval_batches(dataset, 2, True, SPECIAL.tolist(), MASK, seed=3)
    second = build_eval_batches(dataset, 2, True, SPECIAL.tolist(), MASK, seed=3)
    assert len(first) == 3
    for a, b in zip(first, second):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def _reference(table_s, table_t, batches, shift):
    """Slow per-position reference of every figure."""
    nll = correct = agree = kl = 0.0
    n = 0
    for input_ids, _, labels in batches:
        for row in range(input_ids.size(0)):
            for pos in range(input_ids.size(1) - shift):
                label = labels[row, pos + shift].item()
                if label == IGNORE_INDEX:
                    continue
                s = table_s[input_ids[row, pos]].double()
                t = table_t[input_ids[row, pos]].double()
                log_s = s - torch.logsumexp(s, 0)
                log_t = t - torch.logsumexp(t, 0)
                nll -= log_s[label].item()
                correct += int(s.argmax().item() == label)
                agree += int(s.argmax().item() == t.argmax().item())
                kl += (log_t.exp() * (log_t - log_s)).sum().item()
                n += 1
    return {"loss": nll / n, "accuracy": correct / n, "teacher_agreement": agree / n, "teacher_kl": kl / n, "n_targets": n}


@pytest.mark.parametrize("mlm", [True, False])
def test_figures_equal_a_hand_computation(mlm):
    torch.manual_seed(0)
    table_s, table_t = torch.randn(12, 12), torch.randn(12, 12)
    table_t[:, 7] += 2.0  # a teacher with an opinion, so agreement is neither 0 nor 1
    batches = build_eval_batches(_dataset(mlm), 2, mlm, SPECIAL.tolist(), MASK if mlm else None, seed=0)
    student, teacher = FixedLogits(table_s), FixedLogits(table_t)
    got = evaluate_model(student, batches, mlm, teacher)
    want = _reference(table_s, table_t, batches, shift=0 if mlm else 1)
    assert got["n_targets"] == want["n_targets"] > 0
    for key in ("loss", "accuracy", "teacher_agreement", "teacher_kl"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["perplexity"] == pytest.approx(math.exp(want["loss"]), rel=1e-5)
    assert student.calls == teacher.calls == len(batches)



@pytest.mark.parametrize("mlm", [True, False])
def test_per_target_figures_are_the_averaged_figures_position_by_position(mlm):
    torch.manual_seed(0)
    table = torch.randn(12, 12)
    batches = build_eval_batches(_dataset(mlm), 2, mlm, SPECIAL.tolist(), MASK if mlm else None, seed=0)
    losses, predictions = per_target_predictions(FixedLogits(table), batches, mlm)
    labels, sequences = target_labels(batches, mlm)
    shift = 0 if mlm else 1
    want_losses, want_predictions, want_labels, want_sequences = [], [], [], []
    for index, (input_ids, _, batch_labels) in enumerate(batches):
        for row in range(input_ids.size(0)):
            for pos in range(input_ids.size(1) - shift):
                label = batch_labels[row, pos + shift].item()
                if label != IGNORE_INDEX:
                    logits = table[input_ids[row, pos]].double()
                    want_losses.append((torch.logsumexp(logits, 0) - logits[label]).item())
                    want_predictions.append(logits.argmax().item())
                    want_labels.append(label)
                    want_sequences.append(2 * index + row)
    assert losses.tolist() == pytest.approx(want_losses, rel=1e-5)
    assert predictions.tolist() == want_predictions and labels.tolist() == want_labels
    assert sequences.tolist() == want_sequences
    averaged = evaluate_model(FixedLogits(table), batches, mlm)
    assert losses.mean().item() == pytest.approx(averaged["loss"], rel=1e-6)
    assert (predictions == labels).double().mean().item() == pytest.approx(averaged["accuracy"])


def test_paired_interval_is_the_textbook_one_when_every_target_is_its_own_cluster():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, generator=generator), torch.randn(500, generator=generator) + 0.3
    mean, low, high = paired_difference(a, b, torch.arange(500))
    differences = (a - b).double()
    half_width = 1.959964 * differences.std().item() / math.sqrt(500)
    assert mean == pytest.approx(differences.mean().item())
    assert (low, high) == pytest.approx((mean - half_width, mean + half_width), rel=1e-5)


def test_paired_interval_treats_each_sequence_as_one_observation():
    """Two sequences: differences 1, 1, 1 in the first and 3 in the second. Mean over targets 1.5;
    cluster sums 3 and 3 minus 1.5 x (3, 1) give residuals -1.5 and 1.5, so the standard error is
    sqrt(2 / 1 x 4.5) / 4 = 0.75: wider than the 0.5 that four independent targets would give."""
    a = torch.tensor([1.0, 1.0, 1.0, 3.0])
    mean, low, high = paired_difference(a, torch.zeros(4), torch.tensor([7, 7, 7, 9]))
    assert mean == pytest.approx(1.5)
    assert (low, high) == pytest.approx((1.5 - 1.959964 * 0.75, 1.5 + 1.959964 * 0.75), rel=1e-5)
    with pytest.raises(UserError, match="at least two sequences"):
        paired_difference(a, torch.zeros(4), torch.zeros(4, dtype=torch.long))

def test_cli_reads_pickle_and_memory_mapped_data_alike(corpus_file, teacher_dirs, tmp_path):
    """evaluation.py reads both binarized formats through the same safe readers as train.py."""
    import json

    import binarized_data
    import convert_to_mmap
    import evaluation

    teacher = str(teacher_dirs["bert"])
    binarized_data.main(["--file_path", str(corpus_file), "--tokenizer_type", "bert", "--tokenizer_name", teacher,
                         "--dump_file", str(tmp_path / "held_out"), "--seed", "0"])
    pickle_file = tmp_path / f"held_out.{teacher_dirs['bert'].name}.pickle"
    mmap_file = tmp_path / "held_out.ids.npy"
    convert_to_mmap.main(["--data_file", str(pickle_file), "--mmap_file", str(mmap_file)])
    figures = {}
    for name, data_file in (("pickle", pickle_file), ("mmap", mmap_file)):
        out = tmp_path / f"{name}.json"
        evaluation.main(["--data_file", str(data_file), "--student", teacher, "--tokenizer_name", teacher,
                         "--max_sequences", "40", "--output_json", str(out)])
        figures[name] = json.loads(out.read_text())["student"]
    assert figures["pickle"] == figures["mmap"]
    assert figures["pickle"]["n_targets"] > 0


@pytest.mark.parametrize(("student_kind", "teacher_kind", "mlm"), [("distilbert", "bert", True), ("gpt2", "gpt2", False)])
def test_chunked_evaluation_gives_the_figures_of_full_logits_and_never_builds_them(student_kind, teacher_kind, mlm):
    import assets
    from test_losses import LargestTensor

    vocab = 2000  # a chunk of 7 rows of logits (14,000 entries) outweighs every activation of these models
    student = assets.tiny_model(student_kind, "student", vocab, seed=0)
    teacher = assets.tiny_model(teacher_kind, "teacher", vocab, seed=1)
    rng = np.random.default_rng(0)
    start, end = (CLS, SEP) if mlm else (CLS, CLS)
    data = [np.array([start, *rng.integers(5, vocab, size=n), end], dtype=np.uint16) for n in (40, 35, 44, 38)]
    special = {"cls_token": CLS, "sep_token": SEP, "pad_token": PAD, "mask_token": MASK, "unk_token": UNK}
    if not mlm:
        special = {"bos_token": CLS, "eos_token": CLS, "unk_token": UNK}
    dataset = LmSeqsDataset(Namespace(max_model_input_size=64, mlm=mlm, special_tok_ids=special, is_master=True), data)
    batches = build_eval_batches(dataset, 4, mlm, SPECIAL.tolist(), MASK if mlm else None, mask_prop=0.5, seed=0)
    full = evaluate_model(student, batches, mlm, teacher, loss_chunk_size=0)
    chunk_size = 7
    with LargestTensor() as recorder:
        chunked = evaluate_model(student, batches, mlm, teacher, loss_chunk_size=chunk_size)
    assert full["n_targets"] == chunked["n_targets"] > 5 * chunk_size
    for key, value in full.items():
        # The KL near 0 is a difference of float32 sums near log(vocab): its rounding depends on how the
        # sums split over threads, so it is compared to a float32 rounding of log(vocab), not relatively.
        assert chunked[key] == pytest.approx(value, rel=1e-6, abs=1e-6 if key == "teacher_kl" else 0), key
    assert recorder.largest <= chunk_size * vocab
