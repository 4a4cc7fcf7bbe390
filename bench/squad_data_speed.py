"""Speed of the SQuAD data path: examples to doc-stride features (squad_data) and logits to answers
(squad_predictions), at the original's defaults (--max_seq_length 384, --doc_stride 128, --max_query_length 64,
--n_best_size 20, --max_answer_length 30).

Usage (or as `python -m bench.squad_data_speed` from the repository root):
    python bench/squad_data_speed.py                     # 4000 questions, one thread
    python bench/squad_data_speed.py --examples 20000 --words 300

Contexts are runs of standard-library docstring paragraphs (quickstart.stdlib_docstring_corpus) of about
--words words, questions eight of their words, answers a word of the context; the tokenizer is a lower-casing
WordPiece trained on them (30000 entries, SQuAD-sized BERT's). Printed: questions and features per second of
each stage, so the cost of SQuAD v1.1's 88k training questions and 10.6k dev questions can be read off.
"""

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers starts its thread pool

import numpy as np  # noqa: E402
from tokenizers import BertWordPieceTokenizer  # noqa: E402
from transformers import BertTokenizerFast  # noqa: E402

if not __package__:  # run as `python bench/squad_data_speed.py`: import the project from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quickstart import stdlib_docstring_corpus  # noqa: E402
from squad_data import SquadExample, convert_examples_to_features  # noqa: E402
from squad_predictions import compute_predictions  # noqa: E402


def make_examples(paragraphs: list[str], n: int, words: int, seed: int) -> list[SquadExample]:
    """`n` questions on contexts of about `words` words, each answer a word of its context at its place."""
    rng = random.Random(seed)
    examples = []
    for index in range(n):
        context_words: list[str] = []
        while len(context_words) < words:
            context_words += rng.choice(paragraphs).split()
        k = rng.randrange(len(context_words))
        context = " ".join(context_words)
        start = len(" ".join(context_words[:k])) + (1 if k else 0)
        question = " ".join(rng.sample(context_words, 8)) + " ?"
        examples.append(SquadExample(str(index), question, context, [context_words[k]], [start]))
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--words", type=int, default=120, help="Context length in words (SQuAD's mean is ~120).")
    args = parser.parse_args()

    paragraphs = stdlib_docstring_corpus()
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(paragraphs, vocab_size=30000)
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, model_max_length=512)
    examples = make_examples(paragraphs, args.examples, args.words, seed=0)

    began = time.perf_counter()
    features = convert_examples_to_features(examples, tokenizer, 384, 128, 64, training=True)
    seconds = time.perf_counter() - began
    n_features = len(features["input_ids"])
    print(f"features: {len(examples)} questions ({args.words} words of context) -> {n_features} windows in "
          f"{seconds:.2f} s: {len(examples) / seconds:.0f} questions/s (SQuAD v1.1 train, 88k: "
          f"~{88_000 / (len(examples) / seconds):.0f} s)")

    rng = np.random.default_rng(0)
    start_logits = rng.normal(size=features["input_ids"].shape).astype(np.float32)
    end_logits = rng.normal(size=start_logits.shape).astype(np.float32)
    for version_2 in (False, True):
        began = time.perf_counter()
        compute_predictions(examples, features, start_logits, end_logits, 20, 30, version_2, 0.0)
        seconds = time.perf_counter() - began
        print(f"predictions (v{'2.0' if version_2 else '1.1'}): {n_features} windows in {seconds:.2f} s: "
              f"{n_features / seconds:.0f} windows/s")


if __name__ == "__main__":
    main()
