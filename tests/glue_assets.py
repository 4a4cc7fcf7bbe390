"""Tiny GLUE folders in the official TSV layout, written from the columns' names (not from glue_tasks.py's
positions), so the reader is checked against the layout as GLUE distributes it."""

import random
from pathlib import Path

# Each task's folder, header (None: CoLA has none), the columns holding the first text, the second text
# and the label, and its labels (None: STS-B's scores).
MNLI_TRAIN = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV = MNLI_TRAIN[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]
LAYOUTS = {
    "cola": ("CoLA", ["source", "acceptability", "original_judgement", "sentence"], "sentence", None,
             "acceptability", ["0", "1"]),
    "sst-2": ("SST-2", ["sentence", "label"], "sentence", None, "label", ["0", "1"]),
    "mrpc": ("MRPC", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], "#1 String", "#2 String", "Quality",
             ["0", "1"]),
    "sts-b": ("STS-B", ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
                        "sentence2", "score"], "sentence1", "sentence2", "score", None),
    "qqp": ("QQP", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], "question1", "question2",
            "is_duplicate", ["0", "1"]),
    "mnli": ("MNLI", MNLI_TRAIN, "sentence1", "sentence2", "gold_label", ["contradiction", "entailment", "neutral"]),
    "qnli": ("QNLI", ["index", "question", "sentence", "label"], "question", "sentence", "label",
             ["entailment", "not_entailment"]),
    "rte": ("RTE", ["index", "sentence1", "sentence2", "label"], "sentence1", "sentence2", "label",
            ["entailment", "not_entailment"]),
    "wnli": ("WNLI", ["index", "sentence1", "sentence2", "label"], "sentence1", "sentence2", "label", ["0", "1"]),
}
WORDS = "the a cat dog sat ran on mat big small red blue good bad film was is very not quite".split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + " ."


def glue_rows(task: str, n: int, seed: int) -> list[tuple[str, str | None, str]]:
    """`n` (text_a, text_b, label) rows; the label follows a word of the text, so a model can learn it."""
    rng = random.Random(seed)
    _, _, _, column_b, _, labels = LAYOUTS[task]
    rows = []
    for _ in range(n):
        text_a, text_b = sentence(rng), sentence(rng) if column_b else None
        if labels is None:
            label = f"{min(5.0, text_a.count('good') * 1.5 + rng.random()):.3f}"
        else:
            label = labels[("good" in text_a) + ("bad" in text_a)] if len(labels) == 3 else labels["good" in text_a]
        rows.append((text_a, text_b, label))
    return rows


def write_glue_file(path: Path, task: str, rows, header: list[str] | None = None) -> None:
    """Write `rows` of (text_a, text_b, label) as GLUE lays out `task`'s files (filler in the other columns)."""
    _, columns, column_a, column_b, column_label, _ = LAYOUTS[task]
    columns = header or columns
    lines = [] if task == "cola" else ["\t".join(columns)]
    for i, (text_a, text_b, label) in enumerate(rows):
        cells = {column: f"x{i}" for column in columns}
        cells.update({column_a: text_a, column_label: label})
        if column_b:
            cells[column_b] = text_b
        if task == "cola":
            cells["original_judgement"] = "" if label == "1" else "*"
        lines.append("\t".join(cells[column] for column in columns))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_glue_task(data_dir: Path, task: str, n_train: int = 24, n_dev: int = 12, seed: int = 0) -> dict:
    """Write one task's folder; returns {file name: rows written}."""
    folder = Path(data_dir) / LAYOUTS[task][0]
    dev_files = ["dev_matched.tsv", "dev_mismatched.tsv"] if task == "mnli" else ["dev.tsv"]
    written = {"train.tsv": glue_rows(task, n_train, seed)}
    write_glue_file(folder / "train.tsv", task, written["train.tsv"])
    for i, name in enumerate(dev_files, 1):
        written[name] = glue_rows(task, n_dev, seed + i)
        write_glue_file(folder / name, task, written[name], MNLI_DEV if task == "mnli" else None)
    return written
