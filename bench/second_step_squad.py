"""The second step on extractive QA, offline: does distilling a fine-tuned teacher help a student fine-tuned on
few examples? Paired over seeds, with a 95 % interval.

Usage (from the repository root; about 5 minutes on 2 CPU cores with the defaults):
    python bench/second_step_squad.py
    python bench/second_step_squad.py --seeds 8 --student_paragraphs 60 --threads 2

What it does, through run_squad_w_distillation.main (the command's real path):
1. Builds a SQuAD v1.1-format set of templated facts ("the teacher of anna is bob ." ... "who is the teacher of
   anna ?"), a WordPiece tokenizer trained on its text, and tiny BERT (teacher) and DistilBERT (student) models.
2. Fine-tunes the teacher on --teacher_paragraphs paragraphs (plain fine-tuning: no --teacher_type).
3. For each seed: the same student start (weights seeded by the seed), fine-tuned on the first
   --student_paragraphs paragraphs with and without the teacher, on the same batches (same --seed: the
   sampler's order and the dropout draws are the same), and scored on the dev set.
4. Prints exact match and F1 per seed, the paired differences (with - without), their mean with a 95 %
   t-interval over seeds, and how many seeds distillation wins, ties and loses.
"""

import argparse
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("TQDM_DISABLE", "1")

from tokenizers import BertWordPieceTokenizer  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForQuestionAnswering,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertForQuestionAnswering,
)

import run_squad_w_distillation  # noqa: E402

NAMES = ("anna bob carl dave emma fred gina hugo ivan jane kate leon mia nora otto paul rosa sam tina uma "
         "vera will xena yann zoe").split()
RELATIONS = "teacher student friend brother sister mother father boss doctor neighbour".split()
# 97.5 % quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def make_squad(n_paragraphs: int, seed: int, facts: int) -> dict:
    """Paragraphs of `facts` sentences "the <relation> of <name> is <name> .", one question per fact."""
    rng = random.Random(seed)
    data = []
    for p in range(n_paragraphs):
        pairs = rng.sample([(relation, name) for relation in RELATIONS for name in NAMES], facts)
        context, qas = "", []
        for f, (relation, subject) in enumerate(pairs):
            answer = rng.choice(NAMES)
            sentence = f"the {relation} of {subject} is {answer} ."
            start = len(context) + len(f"the {relation} of {subject} is ")
            context += sentence + " "
            qas.append({"id": f"{seed}-{p}-{f}", "question": f"who is the {relation} of {subject} ?",
                        "answers": [{"text": answer, "answer_start": start}]})
        data.append({"title": str(p), "paragraphs": [{"context": context.strip(), "qas": qas}]})
    return {"version": "1.1", "data": data}


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def build_tokenizer(texts: list[str], out: Path) -> BertTokenizerFast:
    """A lower-casing WordPiece tokenizer trained on `texts`, saved in `out`."""
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=300, min_frequency=1)
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, model_max_length=128)
    tokenizer.save_pretrained(out)
    return tokenizer


def save_model(model: torch.nn.Module, tokenizer: BertTokenizerFast, out: Path) -> Path:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run(argv: list[str]) -> dict[str, float]:
    """run_squad_w_distillation's main on `argv`, its one-line errors raised."""
    return run_squad_w_distillation.main(argv)


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval of `values` (at least two)."""
    mean, degrees = statistics.fmean(values), len(values) - 1
    quantile = T_975[degrees - 1] if degrees <= len(T_975) else 1.96
    half = quantile * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="Students per arm (paired seeds).")
    parser.add_argument("--teacher_paragraphs", type=int, default=600)
    parser.add_argument("--student_paragraphs", type=int, default=40)
    parser.add_argument("--dev_paragraphs", type=int, default=100)
    parser.add_argument("--facts", type=int, default=4, help="Facts (and questions) per paragraph.")
    parser.add_argument("--teacher_epochs", type=float, default=6.0)
    parser.add_argument("--student_epochs", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads.")
    parser.add_argument("--work_dir", default=None, help="Keep the files here (default: a temporary folder).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        train = make_squad(args.teacher_paragraphs, 0, args.facts)
        small = dict(train, data=train["data"][:args.student_paragraphs])
        dev = make_squad(args.dev_paragraphs, 1, args.facts)
        texts = [p["context"] + " " + qa["question"] for a in train["data"] for p in a["paragraphs"] for qa in p["qas"]]
        tokenizer = build_tokenizer(texts, root / "tokenizer")
        (root / "teacher_data").mkdir(exist_ok=True)
        (root / "student_data").mkdir(exist_ok=True)
        write_json(root / "teacher_data" / "train-v1.1.json", train)
        write_json(root / "teacher_data" / "dev-v1.1.json", dev)
        write_json(root / "student_data" / "train-v1.1.json", small)
        write_json(root / "student_data" / "dev-v1.1.json", dev)
        common = ["--max_seq_length", "64", "--doc_stride", "32", "--max_query_length", "16", "--no_cuda",
                  "--per_gpu_train_batch_size", "32", "--learning_rate", "1e-3", "--warmup_steps", "10",
                  "--save_steps", "100000", "--logging_steps", "100000", "--overwrite_output_dir", "--do_train",
                  "--do_eval"]

        torch.manual_seed(0)
        teacher_start = BertForQuestionAnswering(BertConfig(
            vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=256, max_position_embeddings=128))
        save_model(teacher_start, tokenizer, root / "teacher_start")
        began = time.perf_counter()
        teacher_scores = run(["--model_type", "bert", "--model_name_or_path", str(root / "teacher_start"),
                              "--output_dir", str(root / "teacher"), "--data_dir", str(root / "teacher_data"),
                              "--num_train_epochs", str(args.teacher_epochs), *common])
        print(f"teacher (BERT 4 x 64, {args.teacher_paragraphs * args.facts} questions, {args.teacher_epochs:g} "
              f"epochs): EM {teacher_scores['exact']:.1f}  F1 {teacher_scores['f1']:.1f}  "
              f"({time.perf_counter() - began:.0f} s)", flush=True)

        print(f"students (DistilBERT 2 x 64, {args.student_paragraphs * args.facts} questions, "
              f"{args.student_epochs:g} epochs; dev {args.dev_paragraphs * args.facts} questions)")
        print("seed   EM without  EM with   F1 without  F1 with   F1 with - without")
        differences = {"exact": [], "f1": []}
        for seed in range(args.seeds):
            torch.manual_seed(1000 + seed)
            student = DistilBertForQuestionAnswering(DistilBertConfig(
                vocab_size=len(tokenizer), dim=64, n_layers=2, n_heads=4, hidden_dim=256,
                max_position_embeddings=128))
            start = save_model(student, tokenizer, root / f"student_start_{seed}")
            arms = {}
            for arm, teacher_flags in (("without", []), ("with", ["--teacher_type", "bert", "--teacher_name_or_path",
                                                                   str(root / "teacher")])):
                arms[arm] = run(["--model_type", "distilbert", "--model_name_or_path", str(start), "--output_dir",
                                 str(root / f"student_{arm}_{seed}"), "--data_dir", str(root / "student_data"),
                                 "--num_train_epochs", str(args.student_epochs), "--seed", str(seed), *teacher_flags,
                                 *common])
            for metric in differences:
                differences[metric].append(arms["with"][metric] - arms["without"][metric])
            print(f"{seed:<6d} {arms['without']['exact']:<11.1f} {arms['with']['exact']:<9.1f} "
                  f"{arms['without']['f1']:<11.1f} {arms['with']['f1']:<9.1f} {differences['f1'][-1]:+.1f}", flush=True)
        for metric, values in differences.items():
            wins = sum(value > 0 for value in values)
            losses = sum(value < 0 for value in values)
            mean, low, high = t_interval(values)
            print(f"{metric}: mean paired difference (with - without) {mean:+.2f} points, 95 % interval "
                  f"[{low:+.2f}, {high:+.2f}] over {len(values)} seeds; distillation wins {wins}, ties "
                  f"{len(values) - wins - losses}, loses {losses}")
        print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
