"""See distillation work end to end, offline, on 2 CPU cores in minutes: the distilled student
measurably beats the same student trained without its teacher.

    python quickstart.py                       # everything local: about 6 minutes on 2 idle CPU cores
    python quickstart.py --teacher_name gpt2 --text_file data/dump.txt --student_layers "0 2 4 7 9 11" --n_gpu 1

The regime is the paper's: the teacher has had more data and compute than the students get. Steps,
each through the project's real command-line tools:
 1. an English corpus from the docstrings of the Python standard library (parsed, never imported),
    split into train and held-out (or --text_file); the students get a third of the train split;
 2. a byte-level BPE tokenizer trained on the train split;
 3. a small GPT-2 teacher, pretrained by causal LM with train.py itself (no teacher: α_clm only) on
    the whole train split for 4 epochs, unless --teacher_name gives a real one;
 4. scripts/binarized_data.py, and scripts/extract.py: the student starts from teacher layers 0 and 2;
 5. two students at once, one process each, from that same start, on the same batches, for one pass
    over their third: the distilled student with the triple loss (α_ce 5, α_clm 2, α_cos 1) and the
    no-teacher student with α_clm 2 alone (the paper's ablation);
 6. a table (printed, and written to results.md) of held-out perplexity and next-token accuracy, and
    the paired differences of the two students with their 95 % intervals; training_curves.png.
"""

import argparse
import ast
import logging
import math
import os
import random
import re
import resource
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from scripts.cli_flags import LEARNING_RATE_RANGE, SEED_RANGE, ArgumentParser, number, positive_int
from scripts.file_safety import check_outputs_apart
from run_folder import check_force_target, run_folder_session
from utils import (
    TMP_PREFIX, TMP_SUFFIX, UserError, atomic_write, load_tokenizer, logger, reported_as_write_error, run_command,
    write_json,
)

REPO = Path(__file__).resolve().parent
SCRIPTS = REPO / "scripts"
MIN_WORDS = 8
END_OF_TEXT = "<|endoftext|>"
TEACHER, BEFORE = "teacher", "student before distillation"
DISTILLED, NO_TEACHER = "distilled student", "no-teacher student"
# DistilBERT's loss weights, with the causal-LM term in the masked-LM term's place.
DISTILLED_ALPHAS = ("--alpha_ce", 5.0, "--alpha_clm", 2.0, "--alpha_cos", 1.0)
NO_TEACHER_ALPHAS = ("--alpha_ce", 0.0, "--alpha_clm", 2.0, "--alpha_cos", 0.0)
STUDENT_DROPOUT = 0.1  # distilgpt2.json's
N_CURVE_POINTS = 10  # held-out evaluations per student run
QUICKSTART_RUN = "quickstart.py"  # the kind of run its --output_dir marker names
QUICKSTART_RECORDS = ("data", "logs")  # what a quickstart's folder from before markers must hold
# What a quickstart writes in --output_dir: a folder from before markers is replaced only if it holds nothing else.
OUTPUTS = (
    "data", "logs", "tokenizer", "teacher", "teacher_init", "student_config.json", "student_init.pth", "distilled",
    "no_teacher", "results.md", "results.json", "training_curves.png", f"{TMP_PREFIX}*{TMP_SUFFIX}",
)
LEARNING_RATE = number(float, *LEARNING_RATE_RANGE, low_open=True)  # as train.py takes it, but > 0
# Exit statuses of a step stopped by SIGHUP, SIGINT or SIGTERM (train.py's 129, 130 and 143, or the signal itself).
INTERRUPTED = {129, 130, 143, -signal.SIGHUP, -signal.SIGINT, -signal.SIGTERM}


def stdlib_docstring_corpus() -> list[str]:
    """English paragraphs from the standard library's docstrings, deterministic for a Python version."""
    return [paragraph for _, paragraph in stdlib_docstrings()]


def stdlib_docstrings() -> list[tuple[str, str]]:
    """(top-level module or package, paragraph) of the standard library's docstrings in English, each paragraph
    once, deterministic for a Python version (bench/second_step.py classifies them by module).

    Sources are parsed with `ast`, never imported (importing some modules has side effects). Test
    suites, doctest examples and paragraphs that are mostly symbols are left out.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paragraphs, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if {"site-packages", "test", "tests", "idle_test"} & set(parts):
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
                        paragraphs.append((parts[0].removesuffix(".py"), line))
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


def train_bpe_tokenizer(lines: Sequence[str], vocab_size: int, max_length: int, out_dir: Path) -> Path:
    """Train a GPT-2-style byte-level BPE tokenizer on `lines` and save it to `out_dir`.

    Byte-level BPE training is deterministic (the same lines give the same tokenizer, run after run),
    which the tokenizers library's WordPiece training is not (huggingface/tokenizers#1794).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    ))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=max_length,
        bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--output_dir", default="quickstart_out", help="Everything the run makes goes here.")
    parser.add_argument("--force", action="store_true", help="Replace --output_dir if it exists.")
    parser.add_argument(
        "--text_file", default=None, help="Your own corpus, one sequence per line (default: stdlib docstrings)."
    )
    parser.add_argument("--max_lines", type=positive_int, default=None, help="Use at most this many corpus lines.")
    parser.add_argument(
        "--held_out_prop", type=number(float, 0, 1, low_open=True, high_open=True), default=0.05,
        help="Share of the corpus held out for evaluation.",
    )
    parser.add_argument(
        "--student_data_prop", type=number(float, 0, 1, low_open=True), default=0.33,
        help="Share of the train split the students train on (the teacher trains on all of it).",
    )
    parser.add_argument(
        "--teacher_name", default=None, help="A real GPT-2 teacher (hub name or directory): skips steps 2-3."
    )
    parser.add_argument(
        "--vocab_size", type=number(int, 257), default=4000, help="Byte-level BPE vocabulary of the local tokenizer."
    )
    parser.add_argument(
        "--max_length", type=number(int, 12), default=64, help="Longest sequence (tokens); longer ones are split."
    )
    parser.add_argument("--hidden", type=positive_int, default=128, help="Width of the local teacher (and students).")
    parser.add_argument("--heads", type=positive_int, default=4, help="Attention heads; must divide --hidden.")
    parser.add_argument("--teacher_layers", type=positive_int, default=4)
    parser.add_argument(
        "--teacher_epochs", type=positive_int, default=4, help="Epochs of the local teacher (on all the train split)."
    )
    parser.add_argument(
        "--student_layers", default="0 2", help="Teacher layers the students start from (one per student layer)."
    )
    parser.add_argument("--distil_epochs", type=positive_int, default=1, help="Epochs of each student over its share.")
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument(
        "--teacher_learning_rate", type=LEARNING_RATE, default=2e-3, help="Peak LR of the teacher's pretraining."
    )
    parser.add_argument(
        "--learning_rate", type=LEARNING_RATE, default=5e-4, help="Peak LR of both students (the original's default)."
    )
    parser.add_argument(
        "--threads", type=positive_int, default=1,
        help="Torch threads of each process. The figures depend on it (keep it fixed to compare runs); 1 runs best "
        "on a busy machine, and the two students train at once anyway.",
    )
    parser.add_argument("--n_gpu", type=number(int, 0, 1), default=0, help="0 trains on the CPU; 1 on one GPU.")
    parser.add_argument("--seed", type=number(int, *SEED_RANGE), default=56)
    return parser


def student_layer_indices(args: argparse.Namespace) -> list[int]:
    """--student_layers as integers; with the local teacher, checked against its depth before anything runs."""
    try:
        layers = [int(layer) for layer in args.student_layers.split()]
    except ValueError:
        layers = []
    if not layers:
        raise UserError(f"--student_layers must list teacher layer numbers, e.g. \"0 2\" (got {args.student_layers!r})")
    if args.teacher_name is None and not all(0 <= layer < args.teacher_layers for layer in layers):
        raise UserError(
            f"--student_layers {args.student_layers!r}: the local teacher has layers 0 to {args.teacher_layers - 1} "
            "(--teacher_layers)"
        )
    return layers


def check_args(args: argparse.Namespace) -> None:
    """Refuse what the flag types alone cannot: combinations, and an --output_dir that is not ours to replace.

    --force replaces only a folder that is empty or a quickstart's (run_folder.check_force_target), never a
    source tree, a model folder or the user's own files.
    """
    if args.hidden % args.heads:
        raise UserError(f"--heads {args.heads} must divide --hidden {args.hidden}")
    student_layer_indices(args)
    check_outputs_apart({"--output_dir": args.output_dir}, {"--text_file": args.text_file, "--teacher_name": args.teacher_name})
    check_output_dir(args, Path(args.output_dir).resolve())


def check_output_dir(args: argparse.Namespace, out: Path) -> None:
    """Refuse an --output_dir that exists, unless --force is given and it is a quickstart's folder."""
    check_force_target(out, args.force, "--output_dir", QUICKSTART_RUN, OUTPUTS, QUICKSTART_RECORDS)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def child_environment(threads: int) -> dict[str, str]:
    """The environment of every step: `threads` torch threads per process, whatever the machine.

    CPU kernels split their sums differently for each thread count, so a fixed count is what makes
    the same seed give the same table. One thread per process also keeps a busy machine from
    stalling the run (threads that wait on each other slow down far more than one that runs alone).
    """
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def cpu_seconds() -> float:
    """User plus system CPU time of this process and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextmanager
def timed(timings: dict[str, dict[str, float]], step: str) -> Iterator[None]:
    """Add the wall-clock and CPU seconds of the block to `timings[step]`."""
    wall, cpu = time.monotonic(), cpu_seconds()
    yield
    before = timings.get(step, {"wall_s": 0.0, "cpu_s": 0.0})
    timings[step] = {"wall_s": before["wall_s"] + time.monotonic() - wall, "cpu_s": before["cpu_s"] + cpu_seconds() - cpu}


def python(script: Path, *args: object) -> list[str]:
    return [sys.executable, str(script), *map(str, args)]


def run_step(title: str, command: list[str], env: dict[str, str]) -> None:
    """Run one of the project's CLIs, its output streaming through; a failure stops the quickstart."""
    logger.info(f"[quickstart] {title}: {' '.join(command[1:])}")
    returncode = subprocess.run(command, cwd=REPO, env=env).returncode
    if returncode in INTERRUPTED:
        raise interrupted(title)
    if returncode != 0:
        raise UserError(f"step '{title}' failed with exit status {returncode}; its error is printed above")


def interrupted(title: str) -> UserError:
    """The error of a step stopped by a signal: train.py then advises --resume, which the quickstart has not."""
    return UserError(f"interrupted during step '{title}'; run the quickstart again to start over (it has no --resume)")


def run_together(title: str, commands: dict[str, list[str]], env: dict[str, str], log_dir: Path) -> None:
    """Run CLIs at the same time, one process each, the output of each in `log_dir/<name>.log`."""
    logger.info(f"[quickstart] {title}: {len(commands)} processes at once, their output in {log_dir}/")
    processes = {}
    for name, command in commands.items():
        logger.info(f"[quickstart] {name}: {' '.join(command[1:])}")
        with open(log_dir / f"{name}.log", "w", encoding="utf-8") as log:
            processes[name] = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    failed = wait_for_all(processes)
    if any(processes[name].returncode in INTERRUPTED for name in failed):
        raise interrupted(title)
    if failed:
        errors = [line for name in failed for line in last_error(log_dir / f"{name}.log")]
        raise UserError(f"step '{title}' failed ({', '.join(failed)}; see {log_dir}/): {' | '.join(errors)}")


def wait_for_all(processes: dict[str, subprocess.Popen]) -> list[str]:
    """Wait for every process; return the names of those that failed by themselves.

    The first failure, or an interruption, stops the others: a comparison with one of its two runs
    missing is of no use.
    """
    stopped = set()
    try:
        while any(process.poll() is None for process in processes.values()):
            if any(process.returncode for process in processes.values()):
                break
            time.sleep(0.5)
    finally:
        for name, process in processes.items():
            if process.poll() is None:
                stopped.add(name)
                process.terminate()
                process.wait()
    return [name for name, process in processes.items() if process.returncode != 0 and name not in stopped]


def last_error(log: Path) -> list[str]:
    """The last `error: ...` line of a CLI's log, if it wrote one."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line for line in lines if line.startswith("error:")][-1:]


def train_command(
    args: argparse.Namespace, dump_path: Path, data: Path, held_out: Path, learning_rate: float,
    log_interval: int, eval_interval: int, *extra: object,
) -> list[str]:
    """train.py with the settings every quickstart run shares (causal LM, batching, schedule, evaluation)."""
    return python(
        REPO / "train.py", "--force", "--dump_path", dump_path, "--data_file", data, "--student_type", "gpt2",
        "--teacher_type", "gpt2", "--n_gpu", args.n_gpu, "--seed", args.seed, "--batch_size", args.batch_size,
        "--gradient_accumulation_steps", 1, "--learning_rate", learning_rate, "--warmup_prop", 0.05,
        "--max_model_input_size", args.max_length, "--log_interval", log_interval, "--checkpoint_interval", 100000,
        "--eval_data_file", held_out, "--eval_interval", eval_interval, *extra,
    )


def read_corpus(args: argparse.Namespace) -> list[str]:
    if args.text_file:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"could not read --text_file {args.text_file!r}: {err}") from err
        lines = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        lines = stdlib_docstring_corpus()
    lines = lines[: args.max_lines]
    if len(lines) < 2:
        raise UserError("the corpus needs at least two non-blank lines (one to train on, one held out)")
    return lines


def pretrain_local_teacher(args: argparse.Namespace, out: Path, tokenizer, data: dict[str, Path], env) -> Path:
    """A small GPT-2 from a seeded random initialisation, pretrained by causal LM with train.py (no teacher term)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    teacher_init = out / "teacher_init"
    torch.manual_seed(args.seed)  # the same seed, the same starting weights
    GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_embd=args.hidden, n_layer=args.teacher_layers, n_head=args.heads,
        n_positions=args.max_length, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        # A short run on a small corpus: dropout would only slow the teacher down.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )).save_pretrained(teacher_init)
    tokenizer.save_pretrained(teacher_init)
    teacher = out / "teacher"
    run_step("pretrain the teacher (causal LM, no teacher)", train_command(
        args, teacher, data["train"], data["held_out"], args.teacher_learning_rate, 10, 0,
        "--student_config", teacher_init / "config.json", "--teacher_name", teacher_init,
        "--alpha_clm", 1.0, "--alpha_ce", 0.0, "--n_epoch", args.teacher_epochs,
    ), env)
    tokenizer.save_pretrained(teacher)
    return teacher


def write_student_config(teacher: str | Path, n_layers: int, path: Path) -> None:
    """The teacher's architecture with `n_layers` layers and distilgpt2.json's dropout."""
    from transformers import GPT2Config

    config = GPT2Config.from_pretrained(teacher)
    config.n_layer = n_layers
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = STUDENT_DROPOUT
    config.to_json_file(path)


def read_splits(args: argparse.Namespace) -> dict[str, list[str]]:
    """Read and split the corpus: train, students (a share of train), held_out."""
    train_lines, held_out_lines = split_corpus(read_corpus(args), args.held_out_prop, args.seed)
    return {
        "train": train_lines,
        "students": train_lines[: max(1, round(args.student_data_prop * len(train_lines)))],
        "held_out": held_out_lines,
    }


def write_splits(out: Path, splits: dict[str, list[str]]) -> None:
    """Write the splits in out/data."""
    train_lines, held_out_lines = splits["train"], splits["held_out"]
    with reported_as_write_error(out):
        (out / "data").mkdir()
        (out / "logs").mkdir()
    for name, lines in splits.items():
        write_text(out / "data" / f"{name}.txt", "\n".join(lines) + "\n")
    logger.info(
        f"[quickstart] corpus: {len(train_lines)} train lines (the students get {len(splits['students'])} of them) "
        f"and {len(held_out_lines)} held-out lines"
    )


def binarize(args: argparse.Namespace, out: Path, splits: dict, tokenizer_name: str, env: dict) -> dict[str, Path]:
    """scripts/binarized_data.py on each split the run reads; returns the path of each binarized file."""
    data = {}
    for name in splits:
        if name == "train" and args.teacher_name:  # only the local teacher's pretraining reads it
            continue
        run_step(f"binarize {name}", python(
            SCRIPTS / "binarized_data.py", "--file_path", out / "data" / f"{name}.txt", "--tokenizer_type", "gpt2",
            "--tokenizer_name", tokenizer_name, "--dump_file", out / "data" / name, "--seed", args.seed,
        ), env)
        data[name] = out / "data" / f"{name}.{Path(tokenizer_name).name}.pickle"
    return data


def extract_student(args: argparse.Namespace, out: Path, teacher: str | Path, env: dict) -> tuple[Path, Path]:
    """The students' common start: scripts/extract.py on --student_layers. Returns (config, weights)."""
    layers = student_layer_indices(args)
    student_config, student_init = out / "student_config.json", out / "student_init.pth"
    write_student_config(teacher, len(layers), student_config)
    run_step("extract the student from the teacher", python(
        SCRIPTS / "extract.py", "--model_type", "gpt2", "--model_name", teacher, "--dump_checkpoint", student_init,
        "--layers", *layers,
    ), env)
    return student_config, student_init


def train_students(
    args: argparse.Namespace, out: Path, data: dict[str, Path], teacher: str | Path, start: tuple[Path, Path],
    n_lines: int, env: dict,
) -> dict[str, Path]:
    """Both students at once, one process each, from the same start on the same batches; returns their run folders.

    They differ only in the loss weights. Every step is logged: the first, before any update, shows
    both students with the same loss on the same batch.
    """
    runs = {DISTILLED: out / "distilled", NO_TEACHER: out / "no_teacher"}
    eval_interval = max(1, round(math.ceil(n_lines / args.batch_size) * args.distil_epochs / N_CURVE_POINTS))
    student_config, student_init = start
    commands = {
        run.name: train_command(
            args, run, data["students"], data["held_out"], args.learning_rate, 1, eval_interval,
            "--student_config", student_config, "--student_pretrained_weights", student_init,
            "--teacher_name", teacher, "--n_epoch", args.distil_epochs, *alphas,
        )
        for run, alphas in ((runs[DISTILLED], DISTILLED_ALPHAS), (runs[NO_TEACHER], NO_TEACHER_ALPHAS))
    }
    run_together("train the distilled and the no-teacher student", commands, env, out / "logs")
    return runs


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    out = Path(args.output_dir).resolve()
    timings: dict[str, dict[str, float]] = {}

    tokenizer = None
    with timed(timings, "corpus and tokenizer"):
        splits = read_splits(args)
        import torch

        torch.set_num_threads(args.threads)
        if args.teacher_name:
            tokenizer = load_tokenizer(args.teacher_name, "--teacher_name")  # before --output_dir is replaced
    # Once the corpus and any --teacher_name have loaded, so that a bad input leaves --output_dir alone.
    with run_folder_session(out, QUICKSTART_RUN, "results.json", lambda: check_output_dir(args, out), "--output_dir"):
        return run_steps(args, out, splits, tokenizer, timings)


def run_steps(args: argparse.Namespace, out: Path, splits: dict, tokenizer, timings: dict) -> dict:
    """Every step after the output folder is made: tokenizer, data, teacher, student, training, report."""
    from transformers import AutoTokenizer

    env = child_environment(args.threads)
    with timed(timings, "corpus and tokenizer"):
        write_splits(out, splits)
        if args.teacher_name:
            tokenizer_name = args.teacher_name
        else:
            tokenizer_dir = train_bpe_tokenizer(splits["train"], args.vocab_size, args.max_length, out / "tokenizer")
            tokenizer_name = str(tokenizer_dir)
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    with timed(timings, "binarize"):
        data = binarize(args, out, splits, tokenizer_name, env)
    if args.teacher_name:
        teacher = args.teacher_name
    else:
        with timed(timings, "pretrain the teacher"):
            teacher = pretrain_local_teacher(args, out, tokenizer, data, env)
    with timed(timings, "extract the student"):
        start = extract_student(args, out, teacher, env)
    with timed(timings, "train both students (at once)"):
        runs = train_students(args, out, data, teacher, start, len(splits["students"]), env)
    with timed(timings, "evaluate"):
        results = evaluate_all(args, tokenizer, teacher, start, runs, data["held_out"])
    write_report(out, results, runs, timings, regime(args, len(splits["train"]), len(splits["students"])))
    return results


def regime(args: argparse.Namespace, n_train: int, n_student: int) -> str:
    """One sentence saying what the teacher had and what the students get."""
    teacher = (
        f"the teacher ({args.teacher_name}) was pretrained elsewhere"
        if args.teacher_name
        else f"the teacher pretrained on all the train lines for {args.teacher_epochs} epochs"
    )
    return (
        f"{teacher}; each student trains on {n_student} of the {n_train} train lines for {args.distil_epochs} "
        f"epoch{'s' if args.distil_epochs > 1 else ''}, from the same teacher layers ({args.student_layers}) "
        "and on the same batches, the two differing only in the teacher terms of the loss"
    )


def evaluate_all(
    args: argparse.Namespace, tokenizer, teacher: str | Path, start: tuple[Path, Path], runs: dict[str, Path],
    held_out: Path,
) -> dict:
    """Each model's held-out figures on the same positions (every next token), and the students' paired differences.

    Returns:
        {"models": {name: figures}, "distilled minus no-teacher": {figure: (mean, low, high)}, "n_sequences": int}
    """
    from evaluation import load_eval_batches, load_model, paired_difference, per_target_predictions, target_labels

    device = "cuda" if args.n_gpu else "cpu"
    models = {
        TEACHER: load_model(str(teacher)),
        BEFORE: load_model(str(start[1]), str(start[0])),
        DISTILLED: load_model(str(runs[DISTILLED])),
        NO_TEACHER: load_model(str(runs[NO_TEACHER])),
    }
    batches = load_eval_batches(str(held_out), tokenizer, args.max_length, False, args.batch_size, 0.0, args.seed)
    labels, sequences = target_labels(batches, mlm=False)
    losses, correct, top1 = {}, {}, {}
    for name, model in models.items():
        losses[name], top1[name] = per_target_predictions(model.to(device), batches, mlm=False, device=device)
        correct[name] = (top1[name] == labels).double()
    figures = {
        name: {
            "loss": losses[name].mean().item(),
            "perplexity": math.exp(losses[name].mean().item()),
            "accuracy": correct[name].mean().item(),
            "teacher_agreement": (top1[name] == top1[TEACHER]).double().mean().item(),
            "n_targets": labels.numel(),
        }
        for name in models
    }
    return {
        "models": figures,
        "distilled minus no-teacher": {
            "loss": paired_difference(losses[DISTILLED], losses[NO_TEACHER], sequences),
            "accuracy": paired_difference(correct[DISTILLED], correct[NO_TEACHER], sequences),
        },
        "n_sequences": int(sequences.unique().numel()),
    }


def distillation_wins(results: dict) -> bool:
    """The claim the quickstart makes: lower cross-entropy with a 95 % interval below zero, and accuracy not lower."""
    differences = results["distilled minus no-teacher"]
    return differences["loss"][2] < 0 and differences["accuracy"][0] >= 0


def results_table(results: dict) -> str:
    rows = ["| model | perplexity | next-token accuracy | top-1 agreement with teacher |", "|---|---|---|---|"]
    for name, figures in results["models"].items():
        rows.append(
            f"| {name} | {figures['perplexity']:.1f} | {figures['accuracy']:.1%} | {figures['teacher_agreement']:.1%} |"
        )
    return "\n".join(rows)


def comparison_table(results: dict) -> str:
    """The distilled student minus the no-teacher student, with 95 % intervals (perplexity as a relative change)."""
    loss, accuracy = (results["distilled minus no-teacher"][key] for key in ("loss", "accuracy"))
    perplexity = [100 * math.expm1(value) for value in loss]
    accuracy = [100 * value for value in accuracy]
    rows = [
        f"| {DISTILLED} minus {NO_TEACHER} | difference | 95 % interval |", "|---|---|---|",
        f"| cross-entropy (nats per token) | {loss[0]:+.4f} | {loss[1]:+.4f} to {loss[2]:+.4f} |",
        f"| perplexity | {perplexity[0]:+.1f} % | {perplexity[1]:+.1f} % to {perplexity[2]:+.1f} % |",
        f"| next-token accuracy (points) | {accuracy[0]:+.2f} | {accuracy[1]:+.2f} to {accuracy[2]:+.2f} |",
    ]
    return "\n".join(rows)


def verdict(results: dict) -> str:
    """One sentence on the comparison, whichever way it went."""
    loss, accuracy = (results["distilled minus no-teacher"][key] for key in ("loss", "accuracy"))
    if distillation_wins(results):
        return (
            "The distilled student wins: its held-out cross-entropy is lower, with a 95 % interval entirely "
            "below zero, and its accuracy is not lower."
        )
    if loss[1] > 0:
        return "The distilled student loses here: its cross-entropy is higher, with a 95 % interval above zero."
    if loss[2] >= 0:
        return "No measured win in this run: the 95 % interval of the cross-entropy difference includes zero."
    return (
        f"No clear win in this run: the distilled student's cross-entropy is lower (95 % interval below zero), "
        f"but its accuracy is not: {100 * accuracy[0]:+.2f} points (95 % interval {100 * accuracy[1]:+.2f} to "
        f"{100 * accuracy[2]:+.2f})."
    )


def write_report(out: Path, results: dict, runs: dict[str, Path], timings: dict, regime_text: str) -> None:
    """Print the tables; write results.md, results.json and training_curves.png in `out`."""
    figures = results["models"]
    n_targets, n_sequences = figures[TEACHER]["n_targets"], results["n_sequences"]
    summary = (
        f"Regime: {regime_text}.\n\nHeld-out causal-LM evaluation: every next token of {n_sequences} held-out "
        f"sequences, {n_targets} positions, the same for every model.\n\n{results_table(results)}\n\n"
        f"Paired on those {n_targets} positions; the intervals treat each held-out sequence as one observation "
        f"(positions of one sequence are not independent).\n\n{comparison_table(results)}\n\n{verdict(results)}"
    )
    timing_rows = "\n".join(
        f"| {step} | {seconds['wall_s']:.0f} | {seconds['cpu_s']:.0f} |" for step, seconds in timings.items()
    )
    timing_table = f"| step | wall-clock (s) | CPU (s) |\n|---|---|---|\n{timing_rows}"
    report = (
        f"# Quickstart results\n\n{summary}\n\n![training curves](training_curves.png)\n\n"
        f"## Time per step\n\n{timing_table}\n"
    )
    write_text(out / "results.md", report)
    write_json(out / "results.json", {**results, "regime": regime_text, "timings": timings})
    plot_training_curves(runs, figures, out / "training_curves.png")
    print(f"\n{summary}\n\n{timing_table}\n\nWritten: {out / 'results.md'}, {out / 'training_curves.png'}")


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


def plot_training_curves(runs: dict[str, Path], figures: dict[str, dict[str, float]], path: Path) -> None:
    """Held-out perplexity and next-token accuracy of both students against the iteration, from their common
    start (iteration 0), with the teacher's level for reference.

    Held-out figures rather than the training loss: length-grouped batches make the training loss
    jump with the length of each batch's sequences, which reads as divergence when it is not.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("perplexity", "held-out perplexity", 1.0), ("accuracy", "held-out next-token accuracy (%)", 100.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4))
    for ax, (key, label, scale) in zip(axes, panels):
        for name, run_dir in runs.items():
            steps, values = read_scalars(run_dir, f"eval/{key}")
            values = [scale * value for value in (figures[BEFORE][key], *values)]
            ax.plot([0, *steps], values, marker="o", markersize=3, label=name)
        ax.axhline(scale * figures[TEACHER][key], color="black", linestyle="--", linewidth=1, label=TEACHER)
        ax.set_xlabel("training iteration (batch) of each student")
        ax.set_ylabel(label)
        ax.set_title(label.replace(" (%)", ""))
        ax.legend()
    fig.suptitle(f"Both students start from the {BEFORE} (iteration 0)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    run_command(main)
