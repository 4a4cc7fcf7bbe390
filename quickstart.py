"""See distillation work end to end, offline, on 2 CPU cores in minutes.

    python quickstart.py                       # everything local: about 9 minutes on 2 CPU cores
    python quickstart.py --teacher_name bert-base-uncased --text_file data/dump.txt --n_gpu 1

Steps, each through the project's real command-line tools:
 1. an English corpus from the docstrings of the Python standard library (parsed, never imported),
    split into train and held-out (or --text_file);
 2. a WordPiece tokenizer trained on the train split;
 3. a small BERT teacher, pretrained by masked LM with train.py itself (no teacher: α_mlm only),
    unless --teacher_name gives a real one;
 4. scripts/binarized_data.py, scripts/token_counts.py, scripts/extract_distilbert.py;
 5. train.py with the triple loss (the distilled student), and with α_mlm only (the no-teacher
    baseline of the paper's ablation), from the same teacher-initialised student and for the
    same number of steps;
 6. a table (printed and written to results.md) of held-out masked-LM accuracy, perplexity and
    agreement with the teacher, and training_curves.png.
"""

import argparse
import ast
import logging
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path

from utils import UserError, atomic_write, logger, run_command, write_json

REPO = Path(__file__).resolve().parent
SCRIPTS = REPO / "scripts"
MIN_WORDS = 8
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def stdlib_docstring_corpus() -> list[str]:
    """English paragraphs from the standard library's docstrings, deterministic for a Python version.

    Sources are parsed with `ast`, never imported (importing some modules has side effects). Test
    suites, doctest examples and paragraphs that are mostly symbols are left out.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paragraphs, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "test", "tests", "idle_test"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for paragraph in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                    line = " ".join(paragraph.split())
                    if _is_prose(line) and line not in seen:
                        seen.add(line)
                        paragraphs.append(line)
    return paragraphs


def _is_prose(line: str) -> bool:
    letters = sum(c.isalpha() or c.isspace() for c in line)
    return ">>>" not in line and len(line.split()) >= MIN_WORDS and letters >= 0.85 * len(line)


def split_corpus(lines: list[str], held_out_prop: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle with `seed` and cut off a held-out share (at least one line on each side)."""
    lines = list(lines)
    random.Random(seed).shuffle(lines)
    n_held_out = min(max(1, round(held_out_prop * len(lines))), len(lines) - 1)
    return lines[n_held_out:], lines[:n_held_out]


def train_wordpiece_tokenizer(lines: Sequence[str], vocab_size: int, max_length: int, out_dir: Path) -> Path:
    """Train a lowercasing BERT-style WordPiece tokenizer on `lines` and save it to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(
        lines, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL_TOKENS)
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=max_length, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--output_dir", default="quickstart_out", help="Everything the run makes goes here.")
    parser.add_argument("--force", action="store_true", help="Replace --output_dir if it exists.")
    parser.add_argument("--text_file", default=None, help="Your own corpus, one sequence per line (default: stdlib docstrings).")
    parser.add_argument("--max_lines", type=int, default=None, help="Use at most this many corpus lines.")
    parser.add_argument("--held_out_prop", type=float, default=0.05)
    parser.add_argument("--teacher_name", default=None, help="A real BERT teacher (hub name or directory): skips steps 2-3.")
    parser.add_argument("--vocab_size", type=int, default=4000, help="WordPiece vocabulary of the local tokenizer.")
    parser.add_argument("--max_length", type=int, default=64, help="Longest sequence (tokens); longer ones are split.")
    parser.add_argument("--hidden", type=int, default=128, help="Hidden size of the local teacher (and the student).")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--teacher_layers", type=int, default=4)
    parser.add_argument("--teacher_epochs", type=int, default=5, help="Masked-LM pretraining epochs of the local teacher.")
    parser.add_argument("--student_layers", default="0 2", help="Teacher layers the student starts from (one per student layer).")
    parser.add_argument("--distil_epochs", type=int, default=1, help="Epochs of each student (distilled and MLM-only).")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--teacher_learning_rate", type=float, default=1e-3, help="Peak LR of the teacher's pretraining.")
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="Peak LR of both students (the original's default).")
    parser.add_argument("--n_gpu", type=int, default=0, help="0 trains on the CPU; 1 on one GPU.")
    parser.add_argument("--seed", type=int, default=56)
    return parser


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def run_step(title: str, command: list[str]) -> float:
    """Run one of the project's CLIs, its output streaming through; a failure stops the quickstart."""
    logger.info(f"[quickstart] {title}: {' '.join(command[1:])}")
    start = time.monotonic()
    returncode = subprocess.run(command, cwd=REPO).returncode
    if returncode != 0:
        raise UserError(f"step '{title}' failed with exit status {returncode}; its error is printed above")
    return time.monotonic() - start


def python(script: Path, *args: object) -> list[str]:
    return [sys.executable, str(script), *map(str, args)]


def train_command(
    args: argparse.Namespace, dump_path: Path, data: Path, counts: Path, held_out: Path, learning_rate: float,
    *extra: object,
) -> list[str]:
    """train.py with the settings every quickstart run shares (batching, schedule, logging, evaluation).

    MLM targets are drawn uniformly (--mlm_smoothing 0), as the evaluation draws them: over a run this
    short, the recipe's rarity smoothing spends the few steps on rare words, and students trained with
    it scored worse on uniformly masked held-out text than where they started.
    """
    return python(
        REPO / "train.py", "--force", "--dump_path", dump_path, "--data_file", data, "--token_counts", counts,
        "--mlm", "--mlm_smoothing", 0.0, "--n_gpu", args.n_gpu, "--seed", args.seed, "--batch_size", args.batch_size,
        "--gradient_accumulation_steps", 1, "--learning_rate", learning_rate, "--warmup_prop", 0.05,
        "--max_model_input_size", args.max_length, "--log_interval", 10, "--checkpoint_interval", 100000,
        "--eval_data_file", held_out, "--eval_interval", 100, *extra,
    )


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir).resolve()
    if out.exists() and not args.force:
        raise UserError(f"--output_dir {str(out)!r} exists; pass --force to replace it")
    timings = {}
    start = time.monotonic()
    if args.text_file:
        try:
            lines = [line.strip() for line in Path(args.text_file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"could not read --text_file {args.text_file!r}: {err}") from err
    else:
        lines = stdlib_docstring_corpus()
    if len(lines) < 2:
        raise UserError("the corpus needs at least two non-blank lines (one to train on, one held out)")
    train_lines, held_out_lines = split_corpus(lines[: args.max_lines], args.held_out_prop, args.seed)
    # Replaced only now that the corpus has loaded: a bad --text_file leaves the old folder alone.
    shutil.rmtree(out, ignore_errors=True)
    (out / "data").mkdir(parents=True)
    for name, split in (("train", train_lines), ("held_out", held_out_lines)):
        write_text(out / "data" / f"{name}.txt", "\n".join(split) + "\n")
    timings["corpus"] = time.monotonic() - start
    logger.info(f"[quickstart] corpus: {len(train_lines)} train and {len(held_out_lines)} held-out lines")

    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, DistilBertConfig

    if args.teacher_name:
        tokenizer_name = args.teacher_name
    else:
        tokenizer_name = str(train_wordpiece_tokenizer(train_lines, args.vocab_size, args.max_length, out / "tokenizer"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    tag = Path(tokenizer_name).name
    data = {}
    for name in ("train", "held_out"):
        timings[f"binarize {name}"] = run_step(f"binarize {name}", python(
            SCRIPTS / "binarized_data.py", "--file_path", out / "data" / f"{name}.txt", "--tokenizer_type", "bert",
            "--tokenizer_name", tokenizer_name, "--dump_file", out / "data" / name, "--seed", args.seed,
        ))
        data[name] = out / "data" / f"{name}.{tag}.pickle"
    counts = out / "data" / f"token_counts.{tag}.pickle"
    timings["count"] = run_step("count tokens", python(
        SCRIPTS / "token_counts.py", "--data_file", data["train"], "--token_counts_dump", counts, "--vocab_size", len(tokenizer)
    ))

    if args.teacher_name:
        teacher = args.teacher_name
    else:
        teacher_init = out / "teacher_init"
        BertForMaskedLM(BertConfig(
            vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.teacher_layers,
            num_attention_heads=args.heads, intermediate_size=4 * args.hidden, max_position_embeddings=args.max_length,
            # A short run on a small corpus: dropout would only slow the teacher down.
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )).save_pretrained(teacher_init)
        tokenizer.save_pretrained(teacher_init)
        teacher = out / "teacher"
        timings["pretrain teacher"] = run_step("pretrain the teacher (masked LM, no teacher)", train_command(
            args, teacher, data["train"], counts, data["held_out"], args.teacher_learning_rate,
            "--student_type", "bert", "--student_config", teacher_init / "config.json",
            "--teacher_type", "bert", "--teacher_name", teacher_init,
            "--alpha_mlm", 1.0, "--alpha_ce", 0.0, "--alpha_clm", 0.0, "--n_epoch", args.teacher_epochs,
            # Twice the usual targets per sequence: more signal per step for a model learning from scratch.
            "--mlm_mask_prop", 0.3,
        ))
        tokenizer.save_pretrained(teacher)

    teacher_config = BertConfig.from_pretrained(teacher)
    student_layers = args.student_layers.split()
    student_config = out / "student_config.json"
    DistilBertConfig(
        vocab_size=teacher_config.vocab_size, dim=teacher_config.hidden_size, n_layers=len(student_layers),
        n_heads=teacher_config.num_attention_heads, hidden_dim=teacher_config.intermediate_size,
        max_position_embeddings=teacher_config.max_position_embeddings, sinusoidal_pos_embds=False,
        pad_token_id=tokenizer.pad_token_id,
    ).to_json_file(student_config)
    student_init = out / "student_init.pth"
    timings["extract"] = run_step("extract the student from the teacher", python(
        SCRIPTS / "extract_distilbert.py", "--model_type", "bert", "--model_name", teacher,
        "--dump_checkpoint", student_init, "--vocab_transform", "--layers", *student_layers,
    ))

    student_args = (
        "--student_type", "distilbert", "--student_config", student_config, "--student_pretrained_weights", student_init,
        "--teacher_type", "bert", "--teacher_name", teacher, "--n_epoch", args.distil_epochs, "--alpha_clm", 0.0,
    )
    runs = {"distilled": out / "distilled", "mlm_only": out / "mlm_only"}
    timings["distil"] = run_step("distil (triple loss)", train_command(
        args, runs["distilled"], data["train"], counts, data["held_out"], args.learning_rate, *student_args,
        "--alpha_ce", 5.0, "--alpha_mlm", 2.0, "--alpha_cos", 1.0,
    ))
    timings["mlm-only baseline"] = run_step("train the no-teacher baseline (MLM only)", train_command(
        args, runs["mlm_only"], data["train"], counts, data["held_out"], args.learning_rate, *student_args,
        "--alpha_ce", 0.0, "--alpha_mlm", 2.0, "--alpha_cos", 0.0,
    ))

    results = evaluate_all(args, teacher, tokenizer, student_init, student_config, runs, data["held_out"])
    write_report(out, results, runs if args.teacher_name else {"teacher": teacher, **runs}, timings)
    return results


def evaluate_all(args, teacher, tokenizer, student_init, student_config, runs, held_out) -> dict[str, dict[str, float]]:
    """Held-out figures of the teacher and of each student, on the same masked positions."""
    from evaluation import evaluate_model, load_eval_batches, load_model

    teacher_model = load_model(str(teacher))
    batches = load_eval_batches(str(held_out), tokenizer, args.max_length, True, args.batch_size, 0.15, args.seed)
    models = {
        "teacher": teacher_model,
        "student before distillation": load_model(str(student_init), str(student_config)),
        "distilled student": load_model(str(runs["distilled"])),
        "MLM-only student": load_model(str(runs["mlm_only"])),
    }
    return {name: evaluate_model(model, batches, mlm=True, teacher=teacher_model) for name, model in models.items()}


def results_table(results: dict[str, dict[str, float]]) -> str:
    rows = ["| model | masked-token accuracy | perplexity | top-1 agreement with teacher |", "|---|---|---|---|"]
    for name, figures in results.items():
        rows.append(f"| {name} | {figures['accuracy']:.1%} | {figures['perplexity']:.1f} | {figures['teacher_agreement']:.1%} |")
    return "\n".join(rows)


def write_report(out: Path, results: dict, runs: dict[str, Path], timings: dict[str, float]) -> None:
    """Print the table; write results.md, results.json and training_curves.png (of `runs`) in `out`."""
    table = results_table(results)
    n_targets = next(iter(results.values()))["n_targets"]
    timing_lines = "\n".join(f"- {step}: {seconds:.0f} s" for step, seconds in timings.items())
    report = (
        f"# Quickstart results\n\nHeld-out masked-LM evaluation on {n_targets} masked tokens "
        f"(the same positions for every model).\n\n{table}\n\n![training curves](training_curves.png)\n\n"
        f"## Time per step\n\n{timing_lines}\n"
    )
    write_text(out / "results.md", report)
    write_json(out / "results.json", results)
    plot_training_curves(runs, out / "training_curves.png")
    print(f"\n{table}\n\nWritten: {out / 'results.md'}, {out / 'training_curves.png'}")


def read_scalars(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one tensorboard tag of a training run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one "No path found" line per read otherwise
    events = EventAccumulator(str(run_dir / "log" / "train"), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return [], []
    scalars = events.Scalars(tag)
    return [s.step for s in scalars], [s.value for s in scalars]


def moving_average(steps: list[int], values: list[float], window: int) -> tuple[list[int], list[float]]:
    """Means of `window` consecutive values, at the step of each window's last value."""
    if len(values) < window:
        return steps, values
    sums = [sum(values[i - window : i]) for i in range(window, len(values) + 1)]
    return steps[window - 1 :], [total / window for total in sums]


def plot_training_curves(runs: dict[str, Path], path: Path) -> None:
    """The students' training masked-LM loss (averaged over 10 log points: single batches are noisy)
    and held-out accuracy, against iterations; and the teacher's held-out accuracy while it was
    pretrained, when `runs` has a "teacher" run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = {name: run_dir for name, run_dir in runs.items() if name != "teacher"}
    n_panels = 3 if "teacher" in runs else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5.5 * n_panels, 4))
    for name, run_dir in students.items():
        axes[0].plot(*moving_average(*read_scalars(run_dir, "losses/loss_mlm"), window=10), label=name)
        axes[1].plot(*read_scalars(run_dir, "eval/accuracy"), marker="o", label=name)
    titles = ["students: training masked-LM loss", "students: held-out masked-token accuracy"]
    if "teacher" in runs:
        axes[2].plot(*read_scalars(runs["teacher"], "eval/accuracy"), marker="o", label="teacher", color="black")
        titles.append("teacher pretraining: held-out masked-token accuracy")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    run_command(main)
