"""Held-out evaluation of a student, and of its agreement with the teacher.

MLM models: cross-entropy, perplexity and top-1 accuracy on masked positions; CLM models: the same
for next-token prediction. With a teacher: top-1 agreement and mean KL(teacher || student) on
those positions. Masked positions are drawn once from a seeded generator and reused for every
model evaluated, so the figures of two models compare prediction for prediction.

Used by train.py (`--eval_data_file`, logged under `eval/...`) and as a command:

    python evaluation.py --data_file data/held_out.bert-base-uncased.pickle \\
        --student serialization_dir/my_first_training --tokenizer_name bert-base-uncased \\
        --teacher_name bert-base-uncased
"""

import argparse
import json
import math
import os
from argparse import Namespace
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from itertools import repeat
from pathlib import Path
from statistics import NormalDist
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig

from lm_seqs_dataset import FlatCorpus, LmSeqsDataset
from losses import (
    DEFAULT_LOSS_CHUNK_SIZE, PROBE_SHAPE, fusion_blocker, logit_chunks, probe_model, projection_inputs_as_logits,
)
from scripts.cli_flags import ArgumentParser, number, positive_int
from scripts.file_safety import check_model_folder, check_outputs_apart
from scripts.model_families import auto_lm_class, auto_markers, is_masked_lm, position_limit, vocabulary_size
from scripts.token_data import TokenDataError, is_mmap_file, load_token_id_arrays, load_token_id_mmap
from utils import (
    IGNORE_INDEX,
    MODEL_LOAD_ERRORS,
    UserError,
    load_failure,
    load_tensors,
    load_tokenizer,
    logger,
    run_command,
    special_token_ids,
    write_json,
)

T = TypeVar("T")
EvalBatch = tuple[Tensor, Tensor, Tensor]  # input_ids (bs, len), attention_mask (bs, len) bool, labels (bs, len)

# The original families' sequences carry their roles' markers (cls/sep with MLM, bos/eos without); any other
# family's carry those its tokenizer adds (binarized_data.py --tokenizer_type auto).
ROLE_MARKER_TYPES = ("bert", "distilbert", "roberta", "gpt2")
AUTO = "auto"


def mask_for_evaluation(
    token_ids: Tensor,
    lengths: Tensor,
    special_ids: Tensor,
    mask_token_id: int,
    mask_prop: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Mask ceil(mask_prop x maskable tokens) positions of each sequence, uniformly, all with the mask id.

    Unlike training's 80/10/10 corruption every target shows the mask id: the figure measures
    prediction from context alone. Special tokens and padding are never targets.

    Args:
        token_ids: (bs, len) int64 padded ids.
        lengths: (bs,) int64 real lengths.
        special_ids: (n_special,) int64 ids that are never masked.
        mask_token_id: the id written on targets.
        mask_prop: share of each sequence's maskable tokens that become targets (at least one).
        generator: the seeded source of the choice.

    Returns:
        masked_ids: (bs, len) int64, targets replaced by the mask id.
        labels: (bs, len) int64, the original id on targets, IGNORE_INDEX elsewhere.
    """
    real = torch.arange(token_ids.size(1)) < lengths[:, None]
    maskable = real & ~torch.isin(token_ids, special_ids)
    scores = torch.rand(token_ids.shape, generator=generator).masked_fill(~maskable, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)  # (bs, len) position of each token in its row's random order
    n_targets = torch.ceil(mask_prop * maskable.sum(dim=1)).clamp(min=1)
    targets = maskable & (rank < n_targets[:, None])
    labels = torch.where(targets, token_ids, IGNORE_INDEX)
    return token_ids.masked_fill(targets, mask_token_id), labels


def build_eval_batches(
    dataset: LmSeqsDataset,
    batch_size: int,
    mlm: bool,
    special_ids: Sequence[int] = (),
    mask_token_id: int | None = None,
    mask_prop: float = 0.15,
    seed: int = 0,
    max_sequences: int | None = None,
) -> list[EvalBatch]:
    """The held-out set as fixed batches in dataset order, masked once (MLM) with a seeded generator.

    Returns:
        One `(input_ids, attention_mask, labels)` triple per batch. For CLM the labels are the ids
        (IGNORE_INDEX on padding), shifted by the loss, not here.
    """
    if mlm and mask_token_id is None:
        raise UserError("MLM evaluation needs a tokenizer with a mask token")
    generator = torch.Generator().manual_seed(seed)
    special = torch.tensor(sorted(special_ids), dtype=torch.long)
    batches = []
    n_sequences = len(dataset) if max_sequences is None else min(max_sequences, len(dataset))
    for start in range(0, n_sequences, batch_size):
        token_ids, lengths = dataset.batch_sequences([dataset[i] for i in range(start, min(start + batch_size, n_sequences))])
        attention_mask = torch.arange(token_ids.size(1)) < lengths[:, None]
        if mlm:
            token_ids, labels = mask_for_evaluation(token_ids, lengths, special, mask_token_id, mask_prop, generator)
        else:
            labels = token_ids.masked_fill(~attention_mask, IGNORE_INDEX)
        batches.append((token_ids, attention_mask, labels))
    return batches


def _position_targets(labels: Tensor, mlm: bool) -> tuple[Tensor, Tensor]:
    """What each position predicts, and whether it predicts anything: (bs, n) ids and (bs, n) bool.

    n is seq_len for a masked LM; seq_len - 1 for a causal LM, whose position i predicts token i + 1.
    """
    if not mlm:
        labels = labels[:, 1:]
    return labels, labels != IGNORE_INDEX


def _target_logit_chunks(
    model: nn.Module, batch: EvalBatch, mlm: bool, device: torch.device, chunk_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Float logits at the target positions and their labels, `chunk_size` rows at a time (0: all at once).

    Yields:
        (logits (rows, vocab), labels (rows,)), in target order.
    """
    input_ids, attention_mask, labels = (t.to(device) for t in batch)
    with projection_inputs_as_logits(model) if chunk_size else nullcontext():
        rows = model(input_ids=input_ids, attention_mask=attention_mask).logits
    labels, targets = _position_targets(labels, mlm)
    rows, labels = rows[:, : labels.size(1)][targets], labels[targets]
    if not chunk_size:
        yield rows.float(), labels
        return
    starts = range(0, labels.numel(), chunk_size)
    for start, logits in zip(starts, logit_chunks(rows, model.get_output_embeddings(), chunk_size)):
        yield logits, labels[start : start + chunk_size]


def _proven_chunk_size(models: Sequence[nn.Module], batches: Sequence[EvalBatch], loss_chunk_size: int) -> int:
    """`loss_chunk_size` when the chunked logits of every model reproduce its own on the first rows of the
    first batch (losses.probe_model), else 0: full logits."""
    if not loss_chunk_size or not batches or any(fusion_blocker(model) is not None for model in models):
        return 0
    rows, length = PROBE_SHAPE
    probe_ids = batches[0][0][:rows, :length]
    proven = all(probe_model(model, probe_ids, False, loss_chunk_size).mismatch is None for model in models)
    return loss_chunk_size if proven else 0


@torch.inference_mode()
def evaluate_model(
    model: nn.Module,
    batches: Sequence[EvalBatch],
    mlm: bool,
    teacher: nn.Module | None = None,
    device: torch.device | str = "cpu",
    loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
) -> dict[str, float]:
    """Evaluate `model` on fixed batches; compare it with `teacher` when one is given.

    The logits are computed `loss_chunk_size` target rows at a time, as training's fused losses do, so that
    large vocabularies never need full logits (0, or a model whose logits are not a plain projection:
    all target rows at once).

    Returns:
        `loss` (mean cross-entropy over targets), `perplexity` (exp of it), `accuracy` (top-1),
        `n_targets`, and with a teacher `teacher_agreement` (share of targets where both models'
        top-1 predictions agree) and `teacher_kl` (mean KL(teacher || student) per target, nats).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher.eval()
    models = [model] if teacher is None else [model, teacher]
    chunk_size = _proven_chunk_size(models, batches, loss_chunk_size)
    # Sums kept on the device (float64) and read once at the end: no wait for the device per chunk.
    nll, correct, agree, kl = torch.zeros(4, dtype=torch.float64, device=device)
    n_targets = 0
    for batch in batches:
        chunks = _target_logit_chunks(model, batch, mlm, device, chunk_size)
        t_chunks = _target_logit_chunks(teacher, batch, mlm, device, chunk_size) if teacher is not None else repeat(None)
        for (logits, labels), t_chunk in zip(chunks, t_chunks):
            n_targets += labels.numel()
            log_probs = logits.log_softmax(-1)  # for the cross-entropy and the KL alike
            nll += F.nll_loss(log_probs, labels, reduction="sum")
            predictions = logits.argmax(dim=-1)
            correct += (predictions == labels).sum()
            if t_chunk is not None:
                t_logits = t_chunk[0]
                agree += (predictions == t_logits.argmax(dim=-1)).sum()
                kl += F.kl_div(log_probs, t_logits.log_softmax(-1), log_target=True, reduction="sum")
    model.train(was_training)
    if n_targets == 0:
        raise UserError("the evaluation data has no target positions")
    nll, correct, agree, kl = torch.stack([nll, correct, agree, kl]).tolist()
    loss = nll / n_targets
    results = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / n_targets, "n_targets": n_targets}
    if teacher is not None:
        results.update(teacher_agreement=agree / n_targets, teacher_kl=kl / n_targets)
    return results


@torch.inference_mode()
def per_target_predictions(
    model: nn.Module,
    batches: Sequence[EvalBatch],
    mlm: bool,
    device: torch.device | str = "cpu",
    loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy and top-1 prediction of `model` at each target of `batches`, one entry per target.

    Targets come in batch order, then row-major within a batch (the order of `target_labels`): the
    same order for every model evaluated on the same batches, so two models' entries pair up. Logits
    are computed `loss_chunk_size` rows at a time, as in `evaluate_model`.

    Returns:
        losses: (n_targets,) float64 cross-entropy in nats.
        predictions: (n_targets,) int64 top-1 ids.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    chunk_size = _proven_chunk_size([model], batches, loss_chunk_size)
    losses, predictions = [], []
    for batch in batches:
        for logits, labels in _target_logit_chunks(model, batch, mlm, device, chunk_size):
            losses.append(F.cross_entropy(logits, labels, reduction="none").double())
            predictions.append(logits.argmax(dim=-1))
    model.train(was_training)
    return torch.cat(losses).cpu(), torch.cat(predictions).cpu()


def target_labels(batches: Sequence[EvalBatch], mlm: bool) -> tuple[Tensor, Tensor]:
    """The label of each target of `batches` and the sequence it belongs to, in `per_target_predictions`' order.

    Returns:
        labels: (n_targets,) int64 ids to predict.
        sequences: (n_targets,) int64 index of the target's sequence, counted over all batches.
    """
    labels, sequences, first = [], [], 0
    for _, _, batch_labels in batches:
        batch_labels, targets = _position_targets(batch_labels, mlm)
        rows = torch.arange(first, first + batch_labels.size(0))[:, None].expand_as(batch_labels)
        labels.append(batch_labels[targets])
        sequences.append(rows[targets])
        first += batch_labels.size(0)
    return torch.cat(labels), torch.cat(sequences)


def paired_difference(
    a: Tensor, b: Tensor, clusters: Tensor, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean of the paired differences a - b and its confidence interval, clustered by `clusters`.

    Targets of one sequence are not independent (one context, and the same sequence masked again
    under another seed), so the interval treats each cluster's summed difference as one observation:
    the cluster-robust (linearised ratio) standard error of the mean, with a normal quantile.

    Args:
        a: (n,) figures of one model, e.g. per-target cross-entropy.
        b: (n,) the other model's figures on the same targets.
        clusters: (n,) int64 id of the sequence each target belongs to (at least two distinct ids).
        confidence: coverage of the interval.

    Returns:
        (mean difference, interval low, interval high).
    """
    differences = a.double() - b.double()
    _, cluster_index = torch.unique(clusters, return_inverse=True)
    n_clusters = int(cluster_index.max()) + 1
    if n_clusters < 2:
        raise UserError("a paired interval needs targets from at least two sequences")
    sums = torch.zeros(n_clusters, dtype=torch.float64).index_add_(0, cluster_index, differences)
    counts = torch.bincount(cluster_index, minlength=n_clusters).double()
    mean = sums.sum() / counts.sum()
    residuals = sums - mean * counts
    standard_error = math.sqrt(n_clusters / (n_clusters - 1) * residuals.square().sum().item()) / counts.sum().item()
    half_width = NormalDist().inv_cdf(0.5 + confidence / 2) * standard_error
    return mean.item(), mean.item() - half_width, mean.item() + half_width


class Evaluator:
    """Evaluates a student on one fixed held-out set; what the training loop calls at its eval interval.

    Args:
        batches: from `build_eval_batches`, reused by every call.
        mlm: masked (True) or causal (False) language modelling.
        teacher: compared with when given.
        device: where the batches are sent.
    """

    def __init__(
        self, batches: Sequence[EvalBatch], mlm: bool, teacher: nn.Module | None, device: torch.device | str,
        loss_chunk_size: int = DEFAULT_LOSS_CHUNK_SIZE,
    ):
        self.batches, self.mlm, self.teacher, self.device = batches, mlm, teacher, device
        self.loss_chunk_size = loss_chunk_size

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return evaluate_model(model, self.batches, self.mlm, self.teacher, self.device, self.loss_chunk_size)


def load_model(name_or_path: str, config_path: str | None = None) -> nn.Module:
    """An LM from a hub name, a save_pretrained directory, or a weights file plus its config.

    A weights file (`checkpoint.pth`, `pytorch_model.bin`, `model_epoch_*.pth` or `.safetensors`) takes
    its config from `config_path`, else from `config.json` beside it (a training dump_path).
    """
    is_file = os.path.isfile(name_or_path)
    config_source = config_path or (str(Path(name_or_path).parent) if is_file else name_or_path)
    check_model_folder(config_source, "model folder")
    try:
        config = AutoConfig.from_pretrained(config_source)
    except MODEL_LOAD_ERRORS as err:
        raise load_failure(f"a model config from {config_source!r}", config_source, err) from err
    try:
        auto_class = auto_lm_class(config)
        if not is_file:
            return auto_class.from_pretrained(name_or_path, config=config)
        model = auto_class.from_config(config)
        model.load_state_dict(load_tensors(name_or_path))
    except (*MODEL_LOAD_ERRORS, EOFError) as err:
        what = f"weights {name_or_path!r} into" if is_file else f"{name_or_path!r} as"
        raise load_failure(f"{what} a {config.model_type} model", name_or_path, err) from err
    return model


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_file", required=True, help="Held-out binarized data (scripts/binarized_data.py output).")
    parser.add_argument(
        "--student", required=True,
        help="A training dump_path or save_pretrained directory, a hub name, or a weights file (checkpoint.pth, ...).",
    )
    parser.add_argument("--student_config", default=None, help="Config of a weights-file --student (default: config.json beside it).")
    parser.add_argument("--tokenizer_name", required=True, help="The tokenizer the data was binarized with (hub name or directory).")
    parser.add_argument(
        "--tokenizer_type", choices=("bert", "roberta", "gpt2", AUTO), default=None,
        help="The --tokenizer_type the data was binarized with: bert, roberta and gpt2 sequences carry their roles' "
        "markers, auto ones those the tokenizer adds. Default: auto unless the student is a bert, distilbert, "
        "roberta or gpt2 model.",
    )
    parser.add_argument("--teacher_name", default=None, help="Also report agreement with this teacher, and its own figures.")
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument(
        "--mask_prop", type=number(float, 0, 1, low_open=True), default=0.15,
        help="Share of each sequence's tokens masked (MLM).",
    )
    parser.add_argument(
        "--seed", type=number(int, 0, 2**63 - 1), default=0, help="Seed of the masked positions: same seed, same positions."
    )
    parser.add_argument(
        "--max_sequences", type=positive_int, default=None, help="Evaluate only the first N sequences (after cleaning)."
    )
    parser.add_argument("--output_json", default=None, help="Also write the figures to this JSON file.")
    return parser


def load_token_file(loader: Callable[[str], T], path: str, flag: str) -> T:
    """`loader(path)`, a safe reader of scripts/token_data.py, with its TokenDataError a UserError naming `flag`."""
    logger.info(f"Loading {flag} {path}")
    try:
        return loader(path)
    except TokenDataError as err:
        raise UserError(f"could not read {flag}: {err}") from err


def load_binarized_data(path: str, flag: str, vocab_size: int | None = None) -> FlatCorpus:
    """Binarized data as one flat corpus, told apart by name: a `.npy` file is memory-mapped, anything else is a pickle.

    With `vocab_size`, every id is checked to lie in [0, vocab_size) (see `check_token_ids`).

    Raises:
        UserError: the file is missing or damaged, or holds an id outside the vocabulary.
    """
    if is_mmap_file(path):
        corpus = FlatCorpus(*load_token_file(load_token_id_mmap, path, flag))
    else:
        corpus = FlatCorpus.from_arrays(load_token_file(load_token_id_arrays, path, flag))
    if vocab_size is not None:
        check_token_ids(corpus, vocab_size, path, flag)
    return corpus


def check_token_ids(corpus: FlatCorpus, vocab_size: int, path: str, flag: str) -> None:
    """Refuse binarized data holding an id outside [0, vocab_size), checked once, vectorised (a model would
    otherwise fail on it mid-training, or silently read the wrong row)."""
    outside = corpus.first_id_outside(vocab_size)
    if outside is not None:
        raise UserError(
            f"{flag} {path!r} holds token id {outside}, outside the vocabulary of {vocab_size} entries (ids 0 to "
            f"{vocab_size - 1}); binarize the text with the tokenizer of this model"
        )


def load_eval_batches(
    data_file: str, tokenizer, max_input_size: int, mlm: bool, batch_size: int,
    mask_prop: float, seed: int, max_sequences: int | None = None, vocab_size: int | None = None,
    markers: dict[str, int | None] | None = None,
) -> list[EvalBatch]:
    """Read a binarized held-out file (safely: nothing in it can run; ids checked against `vocab_size` when
    given) and turn it into fixed evaluation batches; `markers` as LmSeqsDataset takes them (None: the roles')."""
    data = load_binarized_data(data_file, "--data_file", vocab_size)
    special = special_token_ids(tokenizer)
    params = Namespace(
        max_model_input_size=max_input_size, mlm=mlm, special_tok_ids=special, is_master=True, markers=markers
    )
    dataset = LmSeqsDataset(params, data)
    return build_eval_batches(
        dataset, batch_size, mlm, special.values(), special.get("mask_token"), mask_prop, seed, max_sequences
    )


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    args = build_parser().parse_args(argv)
    check_outputs_apart(
        {"--output_json": args.output_json},
        {flag: getattr(args, flag[2:]) for flag in (
            "--data_file", "--student", "--student_config", "--tokenizer_name", "--teacher_name")},
    )
    student = load_model(args.student, args.student_config)
    teacher = load_model(args.teacher_name) if args.teacher_name else None
    tokenizer = load_tokenizer(args.tokenizer_name, "--tokenizer_name")
    mlm = is_masked_lm(student.config)
    positions = position_limit(student, student.config)
    max_input_size = min(tokenizer.model_max_length, positions or tokenizer.model_max_length)
    vocab_size = min(vocabulary_size(model, model.config) for model in (student, teacher) if model is not None)
    markers = None  # the roles' (cls/sep or bos/eos)
    if (args.tokenizer_type or (AUTO if student.config.model_type not in ROLE_MARKER_TYPES else None)) == AUTO:
        try:
            markers = auto_markers(tokenizer, mlm)
        except ValueError as err:
            raise UserError(f"--tokenizer_type auto: {err}") from err
    batches = load_eval_batches(
        args.data_file, tokenizer, max_input_size, mlm, args.batch_size, args.mask_prop, args.seed, args.max_sequences,
        vocab_size, markers,
    )
    results = {"student": evaluate_model(student, batches, mlm, teacher)}
    if teacher is not None:
        results["teacher"] = evaluate_model(teacher, batches, mlm)
    for name, figures in results.items():
        logger.info(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))
    print(json.dumps(results, indent=2))
    if args.output_json:
        write_json(args.output_json, results)
    return results


if __name__ == "__main__":
    run_command(main)
