"""Benchmark: the second step at work, offline on CPU. A student distilled from a task-fine-tuned teacher
against the same student fine-tuned alone, from the same start and on the same batches, over several seeds.

Two tasks are built here, deterministic for a Python version:
- classification: which standard-library package a docstring paragraph comes from (asyncio, email, logging,
  tkinter, xml; parsed with `ast`, as quickstart.py reads them), JSON lines through run_glue_w_distillation.py;
- extractive QA: templated facts about made-up countries (capital, founding year, ruler, export, river), the
  five facts of one country a context in a random order, SQuAD v1.1 JSON through run_squad_w_distillation.py.
For each task: a WordPiece vocabulary counted on its training text; a teacher (BERT, 4 layers, width 64, random
weights: nothing is pretrained offline) fine-tuned on the whole training set; one student start, a DistilBERT
of the fine-tuned teacher's layers 0 and 2 (every other layer, as the paper made its student of BERT's; the copy
is scripts/extract_distilbert.py's key table), with a new task head. The teacher has had more, as in the paper's
regime: four times the students' data and twice their depth. For each seed the student is fine-tuned from that
start on a quarter of the training set for 10 epochs, twice: with the teacher (--alpha_ce 0.5
--alpha_task/--alpha_squad 0.5 --temperature 2, the original's defaults) and without. The same seed gives both
runs the same new head, the same batches and the same dropout.

Printed: the teacher's dev figure; per seed both students' dev accuracy (classification) or F1 (QA) and their
difference, every seed listed whether distillation wins or not; the mean difference with its 95 % t-interval.
Both task scripts run in this process through their `main(argv)`, so a run costs no interpreter start.

Usage (or as `python -m bench.second_step` from the repository root):
    python bench/second_step.py                       # 5 seeds, both tasks, one thread: minutes (docs/second-step.md)
    python bench/second_step.py --seeds 10 --tasks qa --work_dir /tmp/second_step   # keep the models and runs
"""

import argparse
import io
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, DistilBertForMaskedLM, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

if not __package__:  # run as `python bench/second_step.py`: import the project from the repository root, as -m does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))  # as scripts/extract*.py import them

import run_glue_w_distillation  # noqa: E402
import run_squad_w_distillation  # noqa: E402
from extract_distilbert import BERT_TO_DISTILBERT, distilbert_config  # noqa: E402
from extraction import transfer  # noqa: E402
from quickstart import stdlib_docstrings  # noqa: E402

CLASSES = ("asyncio", "email", "logging", "tkinter", "xml")
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
STUDENT_LAYERS = (0, 2)  # every other layer of the 4-layer teacher, as DistilBERT took from BERT
QA_MIN_COUNT = 100  # words of the QA vocabulary: the templates' (a name is seen ~10 times, one per context or more)
DISTILLATION = ["--alpha_ce", "0.5", "--temperature", "2.0"]  # the original's defaults, and alpha_task/squad 0.5
# The 0.975 quantiles of Student's t for 1 to 30 degrees of freedom (beyond: a Cornish-Fisher expansion).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

# Sizes: (the teacher's training set, the students' share of it, dev set, teacher epochs, student epochs, batch
# size); QA sets count contexts (5 questions each).
SIZES = {
    "full": {"classification": (800, 200, 200, 10, 10, 16), "qa": (200, 50, 40, 12, 10, 16)},
    "tiny": {"classification": (40, 20, 20, 1, 1, 8), "qa": (8, 4, 4, 1, 1, 8)},
}


def t_quantile_975(df: int) -> float:
    """Student's t 0.975 quantile: the table to 30 degrees of freedom, then Cornish-Fisher (error < 1e-3)."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_interval(differences: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean paired difference and its 95 % t-interval over the seeds."""
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return mean, math.nan, math.nan
    half = t_quantile_975(len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return mean, mean - half, mean + half


# The data.

def docstring_sets(n_pool: int, n_dev: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training pool, dev) rows {"text", "module"}: the same number of paragraphs per package, shuffled."""
    by_module = defaultdict(list)
    for module, paragraph in stdlib_docstrings():
        if module in CLASSES:
            by_module[module].append(paragraph)
    rng = random.Random(seed)
    pool, dev = [], []
    for module in CLASSES:
        paragraphs = sorted(by_module[module])
        rng.shuffle(paragraphs)
        per_pool, per_dev = n_pool // len(CLASSES), n_dev // len(CLASSES)
        dev += [{"text": text, "module": module} for text in paragraphs[:per_dev]]
        pool += [{"text": text, "module": module} for text in paragraphs[per_dev:per_dev + per_pool]]
    rng.shuffle(pool)
    return pool, dev


SYLLABLES = "ka lo mi ra ven tor sel dun bar qui zo pel ash mer lin gor tha bel cor nim".split()
GOODS = "copper wool salt amber timber tea silk glass iron wine olives horses marble cotton spices".split()
RELATIONS = (  # (fact, question) templates; {e}: the country, {a}: the answer
    ("The capital of {e} is {a}.", "What is the capital of {e}?", "place"),
    ("{e} was founded in {a}.", "When was {e} founded?", "year"),
    ("{e} is ruled by {a}.", "Who rules {e}?", "person"),
    ("The main export of {e} is {a}.", "What is the main export of {e}?", "goods"),
    ("{e} lies on the river {a}.", "Which river does {e} lie on?", "place"),
)


def _made_up_name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _answer(kind: str, rng: random.Random) -> str:
    if kind == "year":
        return str(rng.randint(1000, 1999))
    if kind == "person":
        return f"{rng.choice(['King', 'Queen', 'Duke', 'Lady'])} {_made_up_name(rng)}"
    if kind == "goods":
        return rng.choice(GOODS)
    return _made_up_name(rng)


def facts_squad(n_contexts: int, seed: int) -> dict:
    """SQuAD v1.1 JSON: each context states the five facts of one country in a random order, one question per
    fact, its answer span given by character offset (the capital and the river are both made-up names: the
    question's words tell them apart)."""
    rng = random.Random(seed)
    paragraphs = []
    for c in range(n_contexts):
        country = _made_up_name(rng)
        facts = [(fact, question, _answer(kind, rng)) for fact, question, kind in rng.sample(RELATIONS, len(RELATIONS))]
        context, qas = "", []
        for i, (fact, question, answer) in enumerate(facts):
            start = len(context) + len(fact[:fact.index("{a}")].format(e=country))
            qas.append({"id": f"{seed}-{c}-{i}", "question": question.format(e=country),
                        "answers": [{"text": answer, "answer_start": start}]})
            context += fact.format(e=country, a=answer) + " "
        paragraphs.append({"context": context.strip(), "qas": qas})
    return {"version": "1.1", "data": [{"title": "facts", "paragraphs": paragraphs}]}


def squad_texts(squad: dict) -> list[str]:
    return [text for p in squad["data"][0]["paragraphs"] for text in (p["context"], *(q["question"] for q in p["qas"]))]


# Tokenizer and models.

def wordpiece_tokenizer(texts: list[str], vocab_size: int, out_dir: Path,
                        min_count: int = 1) -> PreTrainedTokenizerFast:
    """A lower-casing BERT-style WordPiece tokenizer for `texts`, saved in `out_dir`.

    Its vocabulary is counted here, not trained: the tokenizers library's WordPiece training breaks ties in a
    different order from run to run (huggingface/tokenizers#1794), and every figure depends on the vocabulary.
    It holds the special tokens, every character (alone and as a `##` continuation), then the most frequent
    words (ties in alphabetical order) seen at least `min_count` times, up to `vocab_size`; other words are
    spelled out in characters.
    """
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in texts
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({character for word in counts for character in word})
    vocab = [*SPECIAL_TOKENS, *characters, *(f"##{character}" for character in characters)]
    frequent = sorted((word for word in counts if len(word) > 1 and counts[word] >= min_count),
                      key=lambda word: (-counts[word], word))
    vocab += frequent[:max(vocab_size - len(vocab), 0)]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=512, unk_token="[UNK]",
                                      pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    wrapped.save_pretrained(out_dir)
    return wrapped


def save_start(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> Path:
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def teacher_start(tokenizer: PreTrainedTokenizerFast, out: Path) -> Path:
    """A random BERT of 4 layers, width 64 (nothing is pretrained offline)."""
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, intermediate_size=256, max_position_embeddings=256))
    return save_start(teacher, tokenizer, out / "teacher_start")


def student_from_teacher(teacher_dir: Path, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> Path:
    """A DistilBERT of the fine-tuned teacher's layers STUDENT_LAYERS, as the paper initialised its student.

    The copy is extract_distilbert.py's key table less the LM head (a fine-tuned teacher has none); the students'
    task head is new, made by each run from its seed.
    """
    pairs = [pair for pair in BERT_TO_DISTILBERT.key_pairs(STUDENT_LAYERS, vocab_transform=False)
             if pair not in BERT_TO_DISTILBERT.head]
    state = transfer(load_file(teacher_dir / "model.safetensors"), pairs)
    student = DistilBertForMaskedLM(distilbert_config(BertConfig.from_pretrained(teacher_dir), STUDENT_LAYERS))
    missing = [key for key in student.load_state_dict(state, strict=False).missing_keys if not key.startswith("vocab_")]
    if missing:  # only the LM head, unused here, may stay as it was
        raise RuntimeError(f"the teacher's layers leave {missing} of the student uninitialised")
    return save_start(student, tokenizer, out_dir)


# The runs.

def quietly(main: Callable, argv: list[str]):
    """`main(argv)` with its log, progress bars and printed table held back; shown only if it fails."""
    captured = io.StringIO()
    try:
        with redirect_stdout(captured), redirect_stderr(captured):
            return main(argv)
    except BaseException:
        print(captured.getvalue()[-5000:], file=sys.stderr)
        raise


def common_flags(epochs: int, batch: int, seed: int, output_dir: Path) -> list[str]:
    return ["--no_cuda", "--do_train", "--do_eval", "--output_dir", str(output_dir), "--overwrite_output_dir",
            "--num_train_epochs", str(epochs), "--per_gpu_train_batch_size", str(batch), "--per_gpu_eval_batch_size",
            "64", "--learning_rate", "1e-3", "--warmup_steps", "10", "--seed", str(seed), "--logging_steps", "1000",
            "--save_steps", "100000"]


def paired_runs(score: Callable[[list[str]], float], task: list[str], start: Path, files: dict[str, Path], tokenizer,
                out: Path, alpha_flag: str, epochs: tuple[int, int], batch: int) -> tuple[Callable, Callable]:
    """(teacher run, student run(seed, distilled)) of one task's script (`score` runs it and returns the figure): the
    teacher from `start` on the teacher's data, whose layers then give the students' start; the students on
    theirs, distilled (with the teacher's soft targets at weight 0.5 against `alpha_flag` 0.5) or alone."""
    teacher_epochs, student_epochs = epochs

    def teacher() -> float:
        figure = score(["--model_type", "bert", "--model_name_or_path", str(start), *task, "--train_file",
                        str(files["teacher_train"]), *common_flags(teacher_epochs, batch, 0, out / "teacher")])
        student_from_teacher(out / "teacher", tokenizer, out / "student_start")
        return figure

    def student(seed: int, distilled: bool) -> float:
        teacher_flags = ["--teacher_type", "bert", "--teacher_name_or_path", str(out / "teacher"), *DISTILLATION,
                         alpha_flag, "0.5"] if distilled else []
        run_dir = out / f"student_{seed}_{'distilled' if distilled else 'alone'}"
        return score(["--model_type", "distilbert", "--model_name_or_path", str(out / "student_start"), *task,
                      "--train_file", str(files["student_train"]), *teacher_flags,
                      *common_flags(student_epochs, batch, seed, run_dir)])

    return teacher, student


def classification_task(out: Path, size: str) -> tuple[Callable, Callable]:
    """(teacher run, student run(seed, distilled)) -> dev accuracy x100, through run_glue_w_distillation.main."""
    n_train, n_student, n_dev, teacher_epochs, student_epochs, batch = SIZES[size]["classification"]
    pool, dev = docstring_sets(n_train, n_dev)
    files = {}
    for name, rows in (("teacher_train", pool), ("student_train", pool[:n_student]), ("dev", dev)):
        files[name] = out / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tokenizer = wordpiece_tokenizer([row["text"] for row in pool], 2000, out / "tokenizer")
    start = teacher_start(tokenizer, out)
    task = ["--task_name", "docstrings", "--predict_file", str(files["dev"]), "--text_columns", "text",
            "--label_column", "module", "--label_list", ",".join(CLASSES), "--max_seq_length", "32"]

    def accuracy(argv: list[str]) -> float:
        summary = quietly(run_glue_w_distillation.main, argv)
        return 100 * summary["tasks"]["docstrings"]["metrics"]["dev"]["acc"]

    epochs = (teacher_epochs, student_epochs)
    return paired_runs(accuracy, task, start, files, tokenizer, out, "--alpha_task", epochs, batch)


def qa_task(out: Path, size: str) -> tuple[Callable, Callable]:
    """(teacher run, student run(seed, distilled)) -> dev F1, through run_squad_w_distillation.main."""
    n_train, n_student, n_dev, teacher_epochs, student_epochs, batch = SIZES[size]["qa"]
    pool = facts_squad(n_train, seed=1)
    student_pool = {**pool, "data": [{"title": "facts", "paragraphs": pool["data"][0]["paragraphs"][:n_student]}]}
    files = {"teacher_train": pool, "student_train": student_pool, "dev": facts_squad(n_dev, seed=2)}
    for name, squad in files.items():
        (out / name).mkdir()  # one folder each: the script caches its features beside the file
        files[name] = out / name / f"{name}.json"
        files[name].write_text(json.dumps(squad), encoding="utf-8")
    # Made-up names are spelled out in characters: a name frequent enough in training to be one token would be
    # many in dev, where every name is new, and what a model learnt of it would not carry over.
    tokenizer = wordpiece_tokenizer(squad_texts(pool), 1000, out / "tokenizer", min_count=QA_MIN_COUNT)
    start = teacher_start(tokenizer, out)
    task = ["--predict_file", str(files["dev"]), "--max_seq_length", "128", "--doc_stride", "64",
            "--max_query_length", "24", "--max_answer_length", "8"]

    def f1(argv: list[str]) -> float:
        return quietly(run_squad_w_distillation.main, argv)["f1"]

    return paired_runs(f1, task, start, files, tokenizer, out, "--alpha_squad", (teacher_epochs, student_epochs), batch)


TASKS = {"classification": (classification_task, "accuracy"), "qa": (qa_task, "F1")}


def run_task(name: str, work_dir: Path, size: str, seeds: Sequence[int]) -> dict:
    """Teacher, then both students for every seed; the per-seed figures and the paired interval."""
    build, metric = TASKS[name]
    out = work_dir / name
    out.mkdir(parents=True)
    started = time.perf_counter()
    teacher, student = build(out, size)
    result = {"metric": metric, "teacher": teacher(), "seeds": {}}
    for seed in seeds:
        distilled, alone = student(seed, True), student(seed, False)
        result["seeds"][seed] = {"distilled": distilled, "alone": alone, "difference": distilled - alone}
    differences = [entry["difference"] for entry in result["seeds"].values()]
    result["mean"], result["low"], result["high"] = paired_interval(differences)
    result["wins"] = sum(d > 0 for d in differences)
    result["seconds"] = time.perf_counter() - started
    return result


def report(name: str, result: dict) -> str:
    metric = result["metric"]
    lines = [f"{name}: teacher dev {metric} {result['teacher']:.1f}",
             f"  seed | distilled | alone | difference"]
    for seed, entry in result["seeds"].items():
        lines.append(f"  {seed:>4} | {entry['distilled']:9.1f} | {entry['alone']:5.1f} | {entry['difference']:+10.1f}")
    lines.append(f"  mean difference {result['mean']:+.1f} {metric} points, 95 % t-interval "
                 f"[{result['low']:+.1f}, {result['high']:+.1f}] over {len(result['seeds'])} seeds; distillation "
                 f"wins on {result['wins']} of {len(result['seeds'])} ({result['seconds']:.0f} s)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="Student seeds (1, 2, ...): each gives one pair of runs.")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--size", choices=list(SIZES), default="full", help="tiny: a smoke run of a few seconds.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (tiny models gain little from more; the figures may move with it).")
    parser.add_argument("--work_dir", default=None, help="Keep the data, models and runs here (default: a temporary "
                                                         "folder, deleted at the end).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()  # the load report of each new task head
    transformers_logging.disable_progress_bar()
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="second_step."))
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        results = {}
        for name in args.tasks:
            results[name] = run_task(name, work_dir, args.size, range(1, args.seeds + 1))
            print(report(name, results[name]), flush=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(f"total {time.perf_counter() - started:.0f} s, {args.threads} torch threads")
    return results


if __name__ == "__main__":
    main()
