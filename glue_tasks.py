"""The GLUE tasks: their files, their metrics and the paper's results table.

Reads the official GLUE TSV layout (the folders `download_glue_data.py` makes: CoLA, SST-2, MRPC, STS-B,
QQP, MNLI, QNLI, RTE, WNLI, each with `train.tsv` and `dev.tsv`, MNLI with `dev_matched.tsv` and
`dev_mismatched.tsv`), and any other task from CSV, TSV or JSON-lines files with named text and label
columns. Every label is checked against the task's set while the file is read, so a bad file is one
line naming file, line and label before anything is trained or written.

Metrics are the GLUE benchmark's: Matthews correlation for CoLA, F1 and accuracy for MRPC and QQP,
Pearson and Spearman correlations for STS-B, accuracy otherwise. A task's score is the mean of its
metrics (GLUE's rule; MNLI's is the mean of its matched and mismatched accuracies), and the table's
Score is the mean of the task scores without WNLI.
"""

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils import UserError

TRAIN, DEV = "train", "dev"


@dataclass(frozen=True)
class Example:
    """One sentence or sentence pair and its label (a label string, or a float for regression)."""

    text_a: str
    text_b: str | None
    label: str | float


@dataclass(frozen=True)
class GlueLayout:
    """Where a GLUE task's files are and which of their tab-separated columns hold what.

    Attributes:
        column: the task's name in the GLUE distribution and in the paper's table (also its folder).
        labels: the label strings, in the order of the model's outputs; None for regression (STS-B).
        header: whether the files' first line names the columns (CoLA's has none).
        text_a, text_b, label: column positions (negative: from the end of the row); text_b None for
            single-sentence tasks.
        eval_files: the dev files, each evaluated on its own (MNLI: matched and mismatched).
        metrics: the task's GLUE metrics.
        label_range: for regression, the closed range a label must lie in.
    """

    column: str
    labels: tuple[str, ...] | None
    header: bool
    text_a: int
    text_b: int | None
    label: int
    eval_files: tuple[str, ...] = ("dev.tsv",)
    metrics: tuple[str, ...] = ("acc",)
    label_range: tuple[float, float] | None = None

    @property
    def min_columns(self) -> int:
        """The fewest columns a row must have for every position to exist and be distinct."""
        positive = [i + 1 for i in (self.text_a, self.text_b, self.label) if i is not None and i >= 0]
        from_end = max((-i for i in (self.text_a, self.text_b, self.label) if i is not None and i < 0), default=0)
        return max(positive, default=0) + from_end


BINARY = ("0", "1")
NLI_2 = ("entailment", "not_entailment")

# Task names as the original run_glue.py spelled them (--task_name, case-insensitive).
GLUE_TASKS: dict[str, GlueLayout] = {
    "cola": GlueLayout("CoLA", BINARY, header=False, text_a=3, text_b=None, label=1, metrics=("mcc",)),
    "mnli": GlueLayout(
        "MNLI", ("contradiction", "entailment", "neutral"), header=True, text_a=8, text_b=9, label=-1,
        eval_files=("dev_matched.tsv", "dev_mismatched.tsv"),
    ),
    "mrpc": GlueLayout("MRPC", BINARY, header=True, text_a=3, text_b=4, label=0, metrics=("f1", "acc")),
    "qnli": GlueLayout("QNLI", NLI_2, header=True, text_a=1, text_b=2, label=-1),
    "qqp": GlueLayout("QQP", BINARY, header=True, text_a=3, text_b=4, label=5, metrics=("f1", "acc")),
    "rte": GlueLayout("RTE", NLI_2, header=True, text_a=1, text_b=2, label=-1),
    "sst-2": GlueLayout("SST-2", BINARY, header=True, text_a=0, text_b=None, label=1),
    "sts-b": GlueLayout(
        "STS-B", None, header=True, text_a=7, text_b=8, label=-1, metrics=("pearson", "spearmanr"),
        label_range=(0.0, 5.0),
    ),
    "wnli": GlueLayout("WNLI", BINARY, header=True, text_a=1, text_b=2, label=-1),
}
TABLE_TASKS = tuple(GLUE_TASKS)  # the paper's column order: alphabetical by name
NOT_IN_SCORE = ("wnli",)  # the GLUE paper's own baselines do no better than the majority class on it


@dataclass
class Task:
    """A task's examples, ready for training and evaluation.

    Attributes:
        name: `cola`, `mnli`, ... or the name given to a task read from named columns.
        labels: the label strings in the order of the model's outputs; None for regression.
        metrics: the metrics reported for each evaluation set.
        train: the training examples (None when not asked for).
        evals: {evaluation set name: examples}, e.g. {"dev": [...]} or MNLI's matched and mismatched.
    """

    name: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    train: list[Example] | None = None
    evals: dict[str, list[Example]] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        """The model's output width: 1 for regression."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    def label_ids(self, examples: Sequence[Example]) -> np.ndarray:
        """(n,) int64 class indexes, or float32 targets for regression."""
        if self.labels is None:
            return np.array([example.label for example in examples], dtype=np.float32)
        index = {label: i for i, label in enumerate(self.labels)}
        return np.array([index[example.label] for example in examples], dtype=np.int64)


def task_names(name: str | None) -> list[str] | None:
    """The GLUE tasks `--task_name` asks for; None means every task found in --data_dir (`all` or absent)."""
    if name is None or name.lower() == "all":
        return None
    return [name.lower()]


def is_glue_task(name: str) -> bool:
    return name.lower() in GLUE_TASKS


def find_glue_tasks(data_dir: str | Path) -> list[str]:
    """The GLUE tasks whose folders are in `data_dir`, in table order (folder names match case-insensitively)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"--data_dir {str(data_dir)!r} is not a folder")
    folders = {path.name.lower() for path in data_dir.iterdir() if path.is_dir()}
    found = [name for name in TABLE_TASKS if GLUE_TASKS[name].column.lower() in folders]
    if not found:
        names = ", ".join(layout.column for layout in GLUE_TASKS.values())
        raise UserError(
            f"--data_dir {str(data_dir)!r} holds no GLUE task folder ({names}); give the folder that holds them, "
            "or name one task with --task_name and its folder with --data_dir"
        )
    return found


def task_folder(data_dir: str | Path, name: str) -> Path:
    """The folder of GLUE task `name`: `data_dir/<CoLA|MNLI|...>`, or `data_dir` itself when it holds the files.

    The original run_glue.py took the task's own folder (`--data_dir glue_data/MRPC`); a folder of every
    task (`--data_dir glue_data`) works too.
    """
    data_dir = Path(data_dir)
    column = GLUE_TASKS[name].column.lower()
    for path in data_dir.iterdir() if data_dir.is_dir() else ():
        if path.is_dir() and path.name.lower() == column:
            return path
    return data_dir


def load_glue_task(data_dir: str | Path, name: str, splits: Sequence[str]) -> Task:
    """Read GLUE task `name`'s files for `splits` (`train`, `dev`) from `data_dir`.

    Raises:
        UserError: a file is missing, unreadable, has too few columns on a line, or a label outside the
            task's set (naming file, line and label).
    """
    layout = GLUE_TASKS[name]
    folder = task_folder(data_dir, name)
    task = Task(name, layout.labels, layout.metrics)
    if TRAIN in splits:
        task.train = read_glue_file(folder / "train.tsv", name)
    if DEV in splits:
        for file_name in layout.eval_files:
            task.evals[file_name.removesuffix(".tsv")] = read_glue_file(folder / file_name, name)
    return task


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{what}: no file {str(path)!r}")
    return path


def read_glue_file(path: Path, name: str) -> list[Example]:
    """The examples of one GLUE TSV file of task `name` (tab-separated, no quoting, as GLUE writes them)."""
    layout = GLUE_TASKS[name]
    examples = []
    for line, row in _rows(_existing(path, f"GLUE task {layout.column}"), delimiter="\t", skip_header=layout.header):
        if len(row) < layout.min_columns:
            raise UserError(
                f"{path}:{line}: {len(row)} tab-separated columns, {layout.column} needs at least {layout.min_columns}"
            )
        text_b = None if layout.text_b is None else row[layout.text_b]
        label = check_label(row[layout.label], layout.labels, layout.label_range, path, line)
        examples.append(Example(row[layout.text_a], text_b, label))
    return examples


def _rows(path: Path, delimiter: str, skip_header: bool) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-empty row; GLUE's files quote nothing, so neither does the reader."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE)
            for row in reader:
                if skip_header and reader.line_num == 1:
                    continue
                if row:
                    yield reader.line_num, row
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except (OSError, csv.Error) as err:
        raise UserError(f"could not read {str(path)!r}: {err}") from err


def check_label(
    value: object, labels: Sequence[str] | None, label_range: tuple[float, float] | None, path: Path, line: int
) -> str | float:
    """`value` as a label of the task: one of `labels`, or a finite float (within `label_range`) for regression."""
    if labels is not None:
        label = _label_text(value)
        if label not in labels:
            raise UserError(f"{path}:{line}: label {label!r} is not one of the task's labels {', '.join(labels)}")
        return label
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    low, high = label_range or (-math.inf, math.inf)
    if not (math.isfinite(number) and low <= number <= high):
        bounds = f" in [{low:g}, {high:g}]" if label_range else ""
        raise UserError(f"{path}:{line}: label {value!r} is not a finite number{bounds} (a regression task)")
    return number


def _label_text(value: object) -> str:
    """A label as text: JSON's 1 and "1" are the same label; booleans and floats like 1.0 are kept as written."""
    if isinstance(value, str):
        return value.strip()
    return json.dumps(value)


# Tasks from named columns (CSV, TSV or JSON lines).

def load_named_columns_task(
    name: str,
    train_file: str | None,
    eval_file: str | None,
    text_columns: Sequence[str],
    label_column: str,
    labels: Sequence[str] | None,
    regression: bool,
) -> Task:
    """A task read from files with a header (CSV, TSV) or JSON lines, by column names.

    Args:
        name: the task's name in the results.
        train_file, eval_file: the files (None: not asked for); `.csv`, `.tsv`, or `.jsonl`/`.json` (one
            object a line).
        text_columns: one column (single sentences) or two (pairs).
        label_column: the column of the labels.
        labels: the label set in output order; None: the sorted labels of the training file (or of the
            evaluation file when there is no training file). Ignored for regression.
        regression: the labels are numbers and the model has one output.

    Raises:
        UserError: a missing file or column, an empty file, or a label outside the set.
    """
    files = {split: path for split, path in ((TRAIN, train_file), (DEV, eval_file)) if path}
    rows = {split: read_named_columns(path, text_columns, label_column) for split, path in files.items()}
    if regression:
        labels = None
    elif labels is None:
        first = TRAIN if TRAIN in rows else DEV
        labels = tuple(sorted({_label_text(row[2]) for row in rows[first]}))
    task = Task(name, None if labels is None else tuple(labels), ("pearson", "spearmanr") if regression else ("acc",))
    for split, path in files.items():
        examples = [
            Example(text_a, text_b, check_label(label, task.labels, None, Path(path), line))
            for text_a, text_b, label, line in rows[split]
        ]
        if split == TRAIN:
            task.train = examples
        else:
            task.evals[DEV] = examples
    return task


def read_named_columns(
    path: str | Path, text_columns: Sequence[str], label_column: str
) -> list[tuple[str, str | None, object, int]]:
    """(text_a, text_b, raw label, line number) of each row of a CSV, TSV or JSON-lines file."""
    path = _existing(Path(path), "task file")
    wanted = [*text_columns, label_column]
    records = _json_lines(path) if path.suffix.lower() in (".jsonl", ".json") else _table_lines(path)
    rows = []
    for line, record in records:
        missing = [column for column in wanted if column not in record]
        if missing:
            raise UserError(
                f"{path}:{line}: no column {missing[0]!r} (it has {', '.join(map(repr, record)) or 'none'}); "
                "name the columns with --text_columns and --label_column"
            )
        texts = [record[column] for column in text_columns]
        if not all(isinstance(text, str) for text in texts):
            raise UserError(f"{path}:{line}: the text columns {', '.join(text_columns)} must hold text")
        rows.append((texts[0], texts[1] if len(texts) > 1 else None, record[label_column], line))
    if not rows:
        raise UserError(f"{path}: no examples")
    return rows


def _table_lines(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    """(line number, {column: value}) of a CSV (or, by its suffix, TSV) file with a header line."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            for record in reader:
                yield reader.line_num, {k: v for k, v in record.items() if k is not None and v is not None}
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except (OSError, csv.Error) as err:
        raise UserError(f"could not read {str(path)!r}: {err}") from err


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    """(line number, object) of each non-empty line of a JSON-lines file."""
    try:
        with open(path, encoding="utf-8") as handle:
            for line, text in enumerate(handle, 1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{line}: not a JSON object ({err.msg})") from err
                if not isinstance(record, dict):
                    raise UserError(f"{path}:{line}: not a JSON object")
                yield line, record
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise UserError(f"could not read {str(path)!r}: {err}") from err


# Metrics: numpy, checked in tests/test_glue_tasks.py against slow references written from the definitions.

def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels))


def f1_binary(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class (index 1); 0 when there is no true positive."""
    true_positive = np.sum((predictions == 1) & (labels == 1))
    if true_positive == 0:
        return 0.0
    return float(2 * true_positive / (np.sum(predictions == 1) + np.sum(labels == 1)))


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (its multi-class form, from the confusion matrix); 0 when undefined (a constant)."""
    n_classes = int(max(predictions.max(initial=0), labels.max(initial=0))) + 1
    confusion = np.zeros((n_classes, n_classes), dtype=np.float64)
    np.add.at(confusion, (labels, predictions), 1)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, total = np.trace(confusion), confusion.sum()
    denominator = math.sqrt(
        (total**2 - predicted_counts @ predicted_counts) * (total**2 - true_counts @ true_counts)
    )
    if denominator == 0:
        return 0.0
    return float((correct * total - true_counts @ predicted_counts) / denominator)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when undefined (a constant)."""
    x, y = np.asarray(x, np.float64) - np.mean(x), np.asarray(y, np.float64) - np.mean(y)
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return 0.0 if denominator == 0 else float(x @ y / denominator)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation: Pearson's of the average ranks; 0 when undefined."""
    return pearson(average_ranks(x), average_ranks(y))


METRICS = {"acc": accuracy, "f1": f1_binary, "mcc": matthews_corrcoef, "pearson": pearson, "spearmanr": spearman}


def compute_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{metric: value} of the task's metrics for predicted class indexes (or values, for regression)."""
    return {metric: METRICS[metric](predictions, labels) for metric in task.metrics}


def task_score(results: dict[str, dict[str, float]]) -> float:
    """GLUE's task score, x100: the mean of the metrics of each evaluation set, averaged over the sets."""
    return 100 * float(np.mean([np.mean(list(metrics.values())) for metrics in results.values()]))


# The table.

def results_summary(model: str, results: dict[str, dict[str, dict[str, float]]]) -> dict:
    """What glue_results.json holds: every metric, each task's score and the macro scores.

    Args:
        model: the name of the model in the table's row.
        results: {task: {evaluation set: {metric: value}}}.
    """
    scores = {task: task_score(sets) for task, sets in results.items()}
    in_score = [scores[task] for task in TABLE_TASKS if task in scores and task not in NOT_IN_SCORE]
    glue = [scores[task] for task in TABLE_TASKS if task in scores]
    return {
        "model": model,
        "score": float(np.mean(in_score)) if in_score else None,
        "score_tasks": [task for task in TABLE_TASKS if task in scores and task not in NOT_IN_SCORE],
        "score_with_wnli": float(np.mean(glue)) if "wnli" in scores else None,
        "tasks": {task: {"score": scores[task], "metrics": results[task]} for task in results},
    }


def results_table(summary: dict) -> str:
    """The paper's GLUE table as Markdown: the Score (mean without WNLI), then one column per task.

    Tasks not run show `-`; tasks that are not GLUE's follow in extra columns, outside the Score.
    Below it, each task's metrics.
    """
    scores = {task: entry["score"] for task, entry in summary["tasks"].items()}
    extra = [task for task in scores if task not in GLUE_TASKS]
    columns = [GLUE_TASKS[task].column for task in TABLE_TASKS] + extra
    cells = [f"{scores[task]:.1f}" if task in scores else "-" for task in (*TABLE_TASKS, *extra)]
    score = "-" if summary["score"] is None else f"{summary['score']:.1f}"
    lines = [
        "| Model | Score | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 2) + "|",
        f"| {summary['model']} | {score} | " + " | ".join(cells) + " |",
        "",
        f"Score: mean of {len(summary['score_tasks'])} of the 8 GLUE task scores without WNLI"
        + ("" if summary["score_with_wnli"] is None else f" (with WNLI: {summary['score_with_wnli']:.1f})")
        + "; a task's score is the mean of its metrics x100.",
    ]
    for task, entry in summary["tasks"].items():
        details = "; ".join(
            f"{split} " + ", ".join(f"{metric} {100 * value:.2f}" for metric, value in metrics.items())
            for split, metrics in entry["metrics"].items()
        )
        lines.append(f"- {GLUE_TASKS[task].column if task in GLUE_TASKS else task}: {details}")
    return "\n".join(lines) + "\n"
