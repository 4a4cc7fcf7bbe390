"""SQuAD scores as the official evaluation scripts define them: v1.1 (exact match and F1, the best over the gold
answers) and v2.0 (the same with unanswerable questions, HasAns/NoAns splits and the best no-answer thresholds).

Answers are compared after normalisation: lower case, punctuation removed, the articles a/an/the dropped,
whitespace collapsed. F1 is over the normalised answers' tokens (a bag of words).
"""

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

PUNCTUATION = frozenset(string.punctuation)
ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower case, remove punctuation, drop the articles a/an/the, collapse whitespace (the official order)."""
    text = "".join(char for char in text.lower() if char not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> bool:
    """Whether the normalised answers are equal."""
    return normalize_answer(prediction) == normalize_answer(gold)


def f1_v1(prediction: str, gold: str) -> float:
    """v1.1's token F1 of the normalised answers (0 when they share no token, even when both are empty)."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_v2(prediction: str, gold: str) -> float:
    """v2.0's token F1: as v1.1's, except that when either side is empty it is 1 if both are, else 0."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    return f1_v1(prediction, gold)


def squad_v1_scores(gold_answers: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict[str, float]:
    """The official v1.1 figures: exact and f1 (x100, the best over each question's gold answers), total.

    Args:
        gold_answers: question id -> its gold answer texts.
        predictions: question id -> predicted text; a question without a prediction scores 0 (the official
            script warns "Unanswered question").
    """
    exact = f1 = 0.0
    for qid, golds in gold_answers.items():
        if qid not in predictions:
            continue
        exact += max(float(exact_match(predictions[qid], gold)) for gold in golds)
        f1 += max(f1_v1(predictions[qid], gold) for gold in golds)
    total = len(gold_answers)
    return {"exact": 100.0 * exact / total, "f1": 100.0 * f1 / total, "total": total}


def _best_threshold(
    predictions: Mapping[str, str], scores: Mapping[str, float], na_probs: Mapping[str, float],
    has_answer: Mapping[str, bool],
) -> tuple[float, float]:
    """(best score x100, its threshold): predict no answer when the null odds exceed the threshold (official v2)."""
    score = best = float(sum(not has for has in has_answer.values()))
    threshold = 0.0
    for qid in sorted(na_probs, key=na_probs.get):
        if qid not in scores:
            continue
        if has_answer[qid]:
            score += scores[qid]
        else:
            score += -1.0 if predictions[qid] else 0.0
        if score > best:
            best, threshold = score, na_probs[qid]
    return 100.0 * best / len(scores), threshold


def squad_v2_scores(
    gold_answers: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    na_probs: Mapping[str, float] | None = None,
    na_prob_threshold: float = 1.0,
) -> dict[str, float]:
    """The official v2.0 figures: exact, f1, total, HasAns_* and NoAns_* (when there are such questions),
    best_exact, best_exact_thresh, best_f1, best_f1_thresh.

    Args:
        gold_answers: question id -> gold answer texts ([] or only empty ones: unanswerable, where "" is right).
        predictions: question id -> predicted text ("" for no answer).
        na_probs: question id -> no-answer score (the null odds); default 0 for every question.
        na_prob_threshold: a question whose no-answer score exceeds it counts as answered with "".
    """
    na_probs = na_probs if na_probs is not None else {qid: 0.0 for qid in predictions}
    has_answer, exact, f1 = {}, {}, {}
    for qid, golds in gold_answers.items():
        golds = [gold for gold in golds if normalize_answer(gold)] or [""]
        has_answer[qid] = golds != [""]
        if qid not in predictions:
            continue
        exact[qid] = max(float(exact_match(predictions[qid], gold)) for gold in golds)
        f1[qid] = max(f1_v2(predictions[qid], gold) for gold in golds)

    def thresholded(scores: dict[str, float]) -> dict[str, float]:
        return {qid: float(not has_answer[qid]) if na_probs[qid] > na_prob_threshold else score
                for qid, score in scores.items()}

    exact_thresholded, f1_thresholded = thresholded(exact), thresholded(f1)
    results = _averages(exact_thresholded, f1_thresholded, list(gold_answers), "")
    for prefix, wanted in (("HasAns_", True), ("NoAns_", False)):
        qids = [qid for qid, has in has_answer.items() if has == wanted]
        if qids:
            results.update(_averages(exact_thresholded, f1_thresholded, qids, prefix))
    results["best_exact"], results["best_exact_thresh"] = _best_threshold(predictions, exact, na_probs, has_answer)
    results["best_f1"], results["best_f1_thresh"] = _best_threshold(predictions, f1, na_probs, has_answer)
    return results


def _averages(exact: Mapping[str, float], f1: Mapping[str, float], qids: Sequence[str], prefix: str) -> dict[str, float]:
    """{prefix + exact, f1, total} over `qids` (x100; a question without a score counts 0)."""
    total = len(qids)
    return {
        f"{prefix}exact": 100.0 * sum(exact.get(qid, 0.0) for qid in qids) / total,
        f"{prefix}f1": 100.0 * sum(f1.get(qid, 0.0) for qid in qids) / total,
        f"{prefix}total": total,
    }
