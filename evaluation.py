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
import pickle
from argparse import Namespace
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from lm_seqs_dataset import FlatCorpus, LmSeqsDataset
from scripts.token_data import TokenDataError, is_mmap_file, load_token_id_arrays, load_token_id_mmap
from utils import IGNORE_INDEX, UserError, logger, run_command, special_token_ids, write_json

T = TypeVar("T")
EvalBatch = tuple[Tensor, Tensor, Tensor]  # input_ids (bs, len), attention_mask (bs, len) bool, labels (bs, len)

CAUSAL_MODEL_TYPES = ("gpt2",)


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


def _target_logits(model: nn.Module, batch: EvalBatch, mlm: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """Float logits at the target positions and their labels: (n_targets, vocab), (n_targets,)."""
    input_ids, attention_mask, labels = (t.to(device) for t in batch)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    if not mlm:  # position i predicts token i + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    targets = labels != IGNORE_INDEX
    return logits[targets].float(), labels[targets]


@torch.inference_mode()
def evaluate_model(
    model: nn.Module,
    batches: Sequence[EvalBatch],
    mlm: bool,
    teacher: nn.Module | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Evaluate `model` on fixed batches; compare it with `teacher` when one is given.

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
    nll = correct = agree = kl = 0.0
    n_targets = 0
    for batch in batches:
        logits, labels = _target_logits(model, batch, mlm, device)
        n_targets += labels.numel()
        nll += F.cross_entropy(logits, labels, reduction="sum").item()
        predictions = logits.argmax(dim=-1)
        correct += (predictions == labels).sum().item()
        if teacher is not None:
            t_logits, _ = _target_logits(teacher, batch, mlm, device)
            agree += (predictions == t_logits.argmax(dim=-1)).sum().item()
            kl += F.kl_div(logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True, reduction="sum").item()
    model.train(was_training)
    if n_targets == 0:
        raise UserError("the evaluation data has no target positions")
    loss = nll / n_targets
    results = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / n_targets, "n_targets": n_targets}
    if teacher is not None:
        results.update(teacher_agreement=agree / n_targets, teacher_kl=kl / n_targets)
    return results


@torch.inference_mode()
def per_target_predictions(
    model: nn.Module, batches: Sequence[EvalBatch], mlm: bool, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Cross-entropy and top-1 prediction of `model` at each target of `batches`, one entry per target.

    Targets come in batch order, then row-major within a batch (the order of `target_labels`): the
    same order for every model evaluated on the same batches, so two models' entries pair up.

    Returns:
        losses: (n_targets,) float64 cross-entropy in nats.
        predictions: (n_targets,) int64 top-1 ids.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    losses, predictions = [], []
    for batch in batches:
        logits, labels = _target_logits(model, batch, mlm, device)
        losses.append(F.cross_entropy(logits, labels, reduction="none").double().cpu())
        predictions.append(logits.argmax(dim=-1).cpu())
    model.train(was_training)
    return torch.cat(losses), torch.cat(predictions)


def target_labels(batches: Sequence[EvalBatch], mlm: bool) -> tuple[Tensor, Tensor]:
    """The label of each target of `batches` and the sequence it belongs to, in `per_target_predictions`' order.

    Returns:
        labels: (n_targets,) int64 ids to predict.
        sequences: (n_targets,) int64 index of the target's sequence, counted over all batches.
    """
    labels, sequences, first = [], [], 0
    for _, _, batch_labels in batches:
        if not mlm:  # the target of position i is token i + 1, as in _target_logits
            batch_labels = batch_labels[:, 1:]
        targets = batch_labels != IGNORE_INDEX
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

    def __init__(self, batches: Sequence[EvalBatch], mlm: bool, teacher: nn.Module | None, device: torch.device | str):
        self.batches, self.mlm, self.teacher, self.device = batches, mlm, teacher, device

    def __call__(self, model: nn.Module) -> dict[str, float]:
        return evaluate_model(model, self.batches, self.mlm, self.teacher, self.device)


def load_model(name_or_path: str, config_path: str | None = None) -> nn.Module:
    """An LM from a hub name, a save_pretrained directory, or a weights file plus its config.

    A weights file (`checkpoint.pth`, `pytorch_model.bin`, `model_epoch_*.pth` or `.safetensors`) takes
    its config from `config_path`, else from `config.json` beside it (a training dump_path).
    """
    is_file = os.path.isfile(name_or_path)
    config_source = config_path or (str(Path(name_or_path).parent) if is_file else name_or_path)
    try:
        config = AutoConfig.from_pretrained(config_source)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load a model config from {config_source!r}: {err}") from err
    auto_class = AutoModelForCausalLM if config.model_type in CAUSAL_MODEL_TYPES else AutoModelForMaskedLM
    if not is_file:
        try:
            return auto_class.from_pretrained(name_or_path, config=config)
        except (OSError, ValueError) as err:
            raise UserError(f"could not load a model from {name_or_path!r}: {err}") from err
    model = auto_class.from_config(config)
    try:
        if name_or_path.endswith(".safetensors"):
            state_dict = load_safetensors(name_or_path)
        else:
            state_dict = torch.load(name_or_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict)
    except (OSError, RuntimeError, pickle.UnpicklingError, SafetensorError) as err:
        raise UserError(f"could not load weights {name_or_path!r} into a {config.model_type} model: {err}") from err
    return model


def is_causal(model: nn.Module) -> bool:
    return model.config.model_type in CAUSAL_MODEL_TYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_file", required=True, help="Held-out binarized data (scripts/binarized_data.py output).")
    parser.add_argument(
        "--student", required=True,
        help="A training dump_path or save_pretrained directory, a hub name, or a weights file (checkpoint.pth, ...).",
    )
    parser.add_argument("--student_config", default=None, help="Config of a weights-file --student (default: config.json beside it).")
    parser.add_argument("--tokenizer_name", required=True, help="The tokenizer the data was binarized with (hub name or directory).")
    parser.add_argument("--teacher_name", default=None, help="Also report agreement with this teacher, and its own figures.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--mask_prop", type=float, default=0.15, help="Share of each sequence's tokens masked (MLM).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the masked positions: same seed, same positions.")
    parser.add_argument(
        "--max_sequences", type=int, default=None, help="Evaluate only the first N sequences (after cleaning)."
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


def load_binarized_data(path: str, flag: str) -> list[np.ndarray] | FlatCorpus:
    """Binarized data, told apart by name: a `.npy` file is memory-mapped, anything else is a pickle."""
    if is_mmap_file(path):
        return FlatCorpus(*load_token_file(load_token_id_mmap, path, flag))
    return load_token_file(load_token_id_arrays, path, flag)


def load_eval_batches(
    data_file: str, tokenizer, max_input_size: int, mlm: bool, batch_size: int,
    mask_prop: float, seed: int, max_sequences: int | None = None,
) -> list[EvalBatch]:
    """Read a binarized held-out file (safely: nothing in it can run) and turn it into fixed evaluation batches."""
    data = load_binarized_data(data_file, "--data_file")
    special = special_token_ids(tokenizer)
    params = Namespace(max_model_input_size=max_input_size, mlm=mlm, special_tok_ids=special, is_master=True)
    dataset = LmSeqsDataset(params, data)
    return build_eval_batches(
        dataset, batch_size, mlm, special.values(), special.get("mask_token"), mask_prop, seed, max_sequences
    )


def _max_positions(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "n_positions", None) or config.max_position_embeddings - (2 if config.model_type == "roberta" else 0)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    args = build_parser().parse_args(argv)
    student = load_model(args.student, args.student_config)
    teacher = load_model(args.teacher_name) if args.teacher_name else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load a tokenizer from --tokenizer_name {args.tokenizer_name!r}: {err}") from err
    mlm = not is_causal(student)
    max_input_size = min(tokenizer.model_max_length, _max_positions(student))
    batches = load_eval_batches(
        args.data_file, tokenizer, max_input_size, mlm, args.batch_size, args.mask_prop, args.seed, args.max_sequences
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
