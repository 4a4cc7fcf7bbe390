"""From start/end logits of every feature to each question's answer text, its n-best list and (v2.0) null odds,
and the original's prediction files.

As the original: the `n_best_size` best starts and ends of each window give the candidate spans (both in the
context, end not before start, at most `max_answer_length` tokens, the start token in the window where it has
the most context); spans are ranked by start + end logit and deduplicated by text. For v2.0 the null score is
the smallest start + end logit at the classifier token over the windows, the null odds are that minus the best
span's score, and the answer is "" when they exceed `--null_score_diff_threshold`. Texts are cut from the
context with the fast tokenizer's character offsets.
"""

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from squad_data import NOT_CONTEXT, SquadExample
from utils import write_json

EMPTY = "empty"  # the original's stand-in text when no span qualifies


class Candidate(NamedTuple):
    """A span (or the null answer, text "") and its logits."""

    text: str
    start_logit: float
    end_logit: float


def _max_context_features(feature_ids: Sequence[int], offsets: np.ndarray) -> dict[int, int]:
    """Context token (by its first character) -> the window where it has the most context on both sides.

    A token's score in a window is min(tokens left of it, tokens right of it) + 0.01 * window length.
    """
    best: dict[int, tuple[float, int]] = {}
    for feature in feature_ids:
        starts = [int(start) for start in offsets[feature, :, 0] if start != NOT_CONTEXT]
        for position, char in enumerate(starts):
            score = min(position, len(starts) - 1 - position) + 0.01 * len(starts)
            if char not in best or score > best[char][0]:
                best[char] = (score, feature)
    return {char: feature for char, (_, feature) in best.items()}


def _spans(example: SquadExample, feature: int, offsets: np.ndarray, start_logits: np.ndarray, end_logits: np.ndarray,
           n_best_size: int, max_answer_length: int, max_context: dict[int, int]) -> list[Candidate]:
    """The candidate spans of one window."""
    window = offsets[feature]
    starts = np.argsort(start_logits)[::-1][:n_best_size]
    ends = np.argsort(end_logits)[::-1][:n_best_size]
    spans = []
    for start in starts:
        if window[start, 0] == NOT_CONTEXT or max_context.get(int(window[start, 0])) != feature:
            continue
        for end in ends:
            if window[end, 0] == NOT_CONTEXT or end < start or end - start + 1 > max_answer_length:
                continue
            text = example.context[window[start, 0]:window[end, 1]]
            spans.append(Candidate(text, float(start_logits[start]), float(end_logits[end])))
    return spans


def _probabilities(candidates: Sequence[Candidate]) -> list[float]:
    """Softmax of the candidates' start + end logits."""
    scores = [candidate.start_logit + candidate.end_logit for candidate in candidates]
    top = max(scores)
    exps = [math.exp(score - top) for score in scores]
    return [value / sum(exps) for value in exps]


def compute_predictions(
    examples: Sequence[SquadExample],
    features: dict[str, np.ndarray],
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best_size: int,
    max_answer_length: int,
    version_2: bool,
    null_score_diff_threshold: float,
) -> tuple[dict[str, str], dict[str, list[dict]], dict[str, float] | None]:
    """Each question's answer, n-best list and (v2.0) null odds.

    Args:
        examples: the questions, in the order of features["example_index"].
        features: from squad_data.convert_examples_to_features (offsets, example_index, cls_index).
        start_logits, end_logits: (n_features, max_seq_length), float.

    Returns:
        ({qas_id: text}, {qas_id: [{text, probability, start_logit, end_logit}, ...]}, {qas_id: null odds} or None).
    """
    offsets, cls_index = features["offsets"], features["cls_index"]
    features_of: dict[int, list[int]] = {}
    for feature, example_index in enumerate(features["example_index"]):
        features_of.setdefault(int(example_index), []).append(feature)
    predictions, nbest_lists, null_odds = {}, {}, {} if version_2 else None
    for index, example in enumerate(examples):
        feature_ids = features_of.get(index, [])
        max_context = _max_context_features(feature_ids, offsets)
        candidates, null = [], None
        for feature in feature_ids:
            candidates += _spans(example, feature, offsets, start_logits[feature], end_logits[feature], n_best_size,
                                 max_answer_length, max_context)
            if version_2:
                cls = cls_index[feature]
                score = Candidate("", float(start_logits[feature, cls]), float(end_logits[feature, cls]))
                if null is None or score.start_logit + score.end_logit < null.start_logit + null.end_logit:
                    null = score
        if null is not None:
            candidates.append(null)
        candidates.sort(key=lambda candidate: candidate.start_logit + candidate.end_logit, reverse=True)
        nbest, seen = [], set()
        for candidate in candidates:
            if len(nbest) >= n_best_size:
                break
            if candidate.text not in seen:
                seen.add(candidate.text)
                nbest.append(candidate)
        if version_2 and null is not None and "" not in seen:
            nbest.append(null)
        if version_2 and len(nbest) == 1:
            nbest.insert(0, Candidate(EMPTY, 0.0, 0.0))
        if not nbest:
            nbest.append(Candidate(EMPTY, 0.0, 0.0))
        nbest_lists[example.qas_id] = [
            {"text": candidate.text, "probability": probability, "start_logit": candidate.start_logit,
             "end_logit": candidate.end_logit}
            for candidate, probability in zip(nbest, _probabilities(nbest))
        ]
        if not version_2:
            predictions[example.qas_id] = nbest[0].text
            continue
        best_span = next(candidate for candidate in nbest if candidate.text)
        null_score = null.start_logit + null.end_logit if null is not None else 0.0
        null_odds[example.qas_id] = null_score - best_span.start_logit - best_span.end_logit
        predictions[example.qas_id] = "" if null_odds[example.qas_id] > null_score_diff_threshold else best_span.text
    return predictions, nbest_lists, null_odds


def prediction_files(output_dir: str | os.PathLike, prefix: str) -> dict[str, Path]:
    """The original's file names: predictions_<prefix>.json, nbest_predictions_<prefix>.json, null_odds_<prefix>.json."""
    return {name: Path(output_dir) / f"{name}_{prefix}.json" for name in ("predictions", "nbest_predictions", "null_odds")}


def write_prediction_files(
    output_dir: str | os.PathLike,
    prefix: str,
    predictions: dict[str, str],
    nbest: dict[str, list[dict]],
    null_odds: dict[str, float] | None,
) -> None:
    """Write the prediction files (null odds for v2.0 only), each atomically."""
    paths = prediction_files(output_dir, prefix)
    write_json(paths["predictions"], predictions)
    write_json(paths["nbest_predictions"], nbest)
    if null_odds is not None:
        write_json(paths["null_odds"], null_odds)
