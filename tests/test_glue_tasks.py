"""glue_tasks.py: the GLUE files as GLUE lays them out, tasks from named columns, the metrics against slow
references written from their definitions, and the paper's table."""

import json
import math
import random

import numpy as np
import pytest

import glue_tasks
from glue_assets import LAYOUTS, write_glue_file, write_glue_task
from glue_tasks import (
    DEV, TRAIN, find_glue_tasks, load_glue_task, load_named_columns_task, results_summary, results_table,
)
from utils import UserError


@pytest.mark.parametrize("task", list(LAYOUTS))
def test_every_glue_task_reads_back_what_was_written(tmp_path, task):
    written = write_glue_task(tmp_path, task, n_train=5, n_dev=3)
    loaded = load_glue_task(tmp_path, task, [TRAIN, DEV])
    read = {"train.tsv": loaded.train, **{f"{name}.tsv": examples for name, examples in loaded.evals.items()}}
    assert set(read) == set(written)
    for name, rows in written.items():
        expected = [(a, b, float(label) if task == "sts-b" else label) for a, b, label in rows]
        assert [(e.text_a, e.text_b, e.label) for e in read[name]] == expected
    assert loaded.num_labels == (1 if task == "sts-b" else len(LAYOUTS[task][5]))


def test_cola_has_no_header_and_its_first_line_is_an_example(tmp_path):
    write_glue_file(tmp_path / "CoLA" / "train.tsv", "cola", [("first one .", None, "0"), ("second .", None, "1")])
    examples = load_glue_task(tmp_path, "cola", [TRAIN]).train
    assert [(e.text_a, e.label) for e in examples] == [("first one .", "0"), ("second .", "1")]


def test_quotes_are_text_not_csv_quoting(tmp_path):
    write_glue_file(tmp_path / "SST-2" / "dev.tsv", "sst-2", [('"it was good', None, "1"), ('said "no" .', None, "0")])
    examples = load_glue_task(tmp_path, "sst-2", [DEV]).evals[DEV]
    assert [e.text_a for e in examples] == ['"it was good', 'said "no" .']


def test_the_task_folder_itself_works_as_data_dir_like_the_original(tmp_path):
    write_glue_task(tmp_path, "mrpc", n_train=4, n_dev=2)
    assert len(load_glue_task(tmp_path / "MRPC", "mrpc", [TRAIN]).train) == 4


def test_find_glue_tasks_in_table_order_and_none_is_one_line(tmp_path):
    for task in ("wnli", "cola", "sts-b"):
        write_glue_task(tmp_path, task, n_train=2, n_dev=2)
    (tmp_path / "notes").mkdir()
    assert find_glue_tasks(tmp_path) == ["cola", "sts-b", "wnli"]
    with pytest.raises(UserError, match="holds no GLUE task folder"):
        find_glue_tasks(tmp_path / "notes")


@pytest.mark.parametrize(
    "task, label, expected",
    [("rte", "entailed", "label 'entailed' is not one of the task's labels entailment, not_entailment"),
     ("cola", "2", "label '2' is not one of the task's labels 0, 1"),
     ("sts-b", "5.5", "label '5.5' is not a finite number in [0, 5]"),
     ("sts-b", "nan", "label 'nan' is not a finite number")],
)
def test_a_label_outside_the_set_names_file_line_and_label(tmp_path, task, label, expected):
    rows = [("one .", "two .", "1.0" if task == "sts-b" else LAYOUTS[task][5][0])] * 3
    rows[1] = ("one .", "two .", label)
    write_glue_file(tmp_path / LAYOUTS[task][0] / "dev.tsv", task, rows)
    with pytest.raises(UserError) as caught:
        load_glue_task(tmp_path, task, [DEV])
    line = 2 if task == "cola" else 3  # the header is line 1
    assert str(caught.value).startswith(f"{tmp_path / LAYOUTS[task][0] / 'dev.tsv'}:{line}: {expected}")


def test_a_missing_file_and_a_short_row_are_one_line(tmp_path):
    write_glue_task(tmp_path, "mnli", n_train=2, n_dev=2)
    (tmp_path / "MNLI" / "dev_mismatched.tsv").unlink()
    with pytest.raises(UserError, match=r"GLUE task MNLI: no file .*dev_mismatched.tsv"):
        load_glue_task(tmp_path, "mnli", [DEV])
    load_glue_task(tmp_path, "mnli", [TRAIN])  # training alone does not need the dev files
    (tmp_path / "QNLI").mkdir()
    (tmp_path / "QNLI" / "train.tsv").write_text("index\tquestion\tsentence\tlabel\n0\tq ?\tentailment\n")
    with pytest.raises(UserError, match=r"train.tsv:2: 3 tab-separated columns, QNLI needs at least 4"):
        load_glue_task(tmp_path, "qnli", [TRAIN])


def test_named_columns_from_csv_and_json_lines(tmp_path):
    csv_file = tmp_path / "train.csv"
    csv_file.write_text('premise,hypothesis,gold\n"a, b",c,yes\nd,e,no\nf,g,yes\n', encoding="utf-8")
    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text('{"premise": "h", "hypothesis": "i", "gold": "no"}\n\n{"premise": "j", "hypothesis": "k", '
                     '"gold": "yes", "extra": 1}\n', encoding="utf-8")
    task = load_named_columns_task("mine", str(csv_file), str(jsonl), ["premise", "hypothesis"], "gold", None, False)
    assert task.labels == ("no", "yes")
    assert [(e.text_a, e.text_b, e.label) for e in task.train] == [("a, b", "c", "yes"), ("d", "e", "no"),
                                                                     ("f", "g", "yes")]
    assert [(e.text_a, e.label) for e in task.evals[DEV]] == [("h", "no"), ("j", "yes")]
    assert task.label_ids(task.train).tolist() == [1, 0, 1]


def test_named_columns_regression_and_integer_labels(tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"s": "a", "y": 1}\n{"s": "b", "y": 0}\n', encoding="utf-8")
    task = load_named_columns_task("ints", str(jsonl), None, ["s"], "y", ["0", "1"], False)
    assert [e.label for e in task.train] == ["1", "0"]
    regression = load_named_columns_task("reg", str(jsonl), None, ["s"], "y", None, True)
    assert regression.is_regression and regression.label_ids(regression.train).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    "dev_text, message",
    [('{"s": "a", "y": "maybe"}\n', "dev.jsonl:1: label 'maybe' is not one of the task's labels no, yes"),
     ('{"s": "a"}\n', "dev.jsonl:1: no column 'y' (it has 's')"),
     ('{"s": "a", "y": "no"}\n[1]\n', "dev.jsonl:2: not a JSON object"),
     ("", "dev.jsonl: no examples")],
)
def test_named_columns_bad_input_is_one_line(tmp_path, dev_text, message):
    (tmp_path / "train.jsonl").write_text('{"s": "a", "y": "no"}\n{"s": "b", "y": "yes"}\n', encoding="utf-8")
    (tmp_path / "dev.jsonl").write_text(dev_text, encoding="utf-8")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_named_columns_task("t", str(tmp_path / "train.jsonl"), str(tmp_path / "dev.jsonl"), ["s"], "y", None,
                                False)


# Slow references, from the definitions.

def reference_mcc(predictions, labels):
    """Binary Matthews correlation from the four counts."""
    tp = sum(p == 1 and y == 1 for p, y in zip(predictions, labels))
    tn = sum(p == 0 and y == 0 for p, y in zip(predictions, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(predictions, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(predictions, labels))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


def reference_f1(predictions, labels):
    tp = sum(p == 1 and y == 1 for p, y in zip(predictions, labels))
    precision = tp / max(1, sum(p == 1 for p in predictions))
    recall = tp / max(1, sum(y == 1 for y in labels))
    return 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)


def reference_pearson(x, y):
    n = len(x)
    mean_x, mean_y = sum(x) / n, sum(y) / n
    covariance = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y))
    spread = math.sqrt(sum((a - mean_x) ** 2 for a in x) * sum((b - mean_y) ** 2 for b in y))
    return 0.0 if spread == 0 else covariance / spread


def reference_ranks(values):
    """Rank of each value: 1 + the values below it + half of the other values equal to it."""
    return [1 + sum(w < v for w in values) + (sum(w == v for w in values) - 1) / 2 for v in values]


def test_metrics_equal_the_slow_references_on_random_cases():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 30)
        labels = np.array([rng.randint(0, 1) for _ in range(n)])
        predictions = np.array([rng.randint(0, 1) for _ in range(n)])
        assert glue_tasks.matthews_corrcoef(predictions, labels) == pytest.approx(reference_mcc(predictions, labels))
        assert glue_tasks.f1_binary(predictions, labels) == pytest.approx(reference_f1(predictions, labels))
        assert glue_tasks.accuracy(predictions, labels) == pytest.approx(np.mean([p == y for p, y in
                                                                                   zip(predictions, labels)]))
        x = [round(rng.uniform(0, 5), 1) for _ in range(n)]  # rounded: ties happen
        y = [round(rng.uniform(0, 5), 1) for _ in range(n)]
        assert glue_tasks.pearson(np.array(x), np.array(y)) == pytest.approx(reference_pearson(x, y))
        assert glue_tasks.spearman(np.array(x), np.array(y)) == pytest.approx(
            reference_pearson(reference_ranks(x), reference_ranks(y)))


def test_metrics_hand_values():
    labels, predictions = np.array([1, 1, 1, 0, 0, 0]), np.array([1, 1, 0, 0, 0, 1])
    assert glue_tasks.matthews_corrcoef(predictions, labels) == pytest.approx(1 / 3)  # (2*2-1*1)/sqrt(3^4)
    assert glue_tasks.f1_binary(predictions, labels) == pytest.approx(2 / 3)
    assert glue_tasks.matthews_corrcoef(np.ones(4, int), np.array([0, 1, 1, 0])) == 0.0  # constant: undefined
    assert glue_tasks.spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 40, 30])) == pytest.approx(0.8)
    assert glue_tasks.pearson(np.array([1.0, 2, 3]), np.array([2.0, 4, 7])) == pytest.approx(0.9933992677987828)
    assert glue_tasks.average_ranks(np.array([3, 1, 3, 2])).tolist() == [3.5, 1, 3.5, 2]


def test_the_table_scores_without_wnli_in_the_papers_column_order():
    results = {
        "wnli": {"dev": {"acc": 0.5}},
        "mrpc": {"dev": {"f1": 0.9, "acc": 0.8}},
        "cola": {"dev": {"mcc": 0.4}},
        "mnli": {"dev_matched": {"acc": 0.8}, "dev_mismatched": {"acc": 0.7}},
    }
    summary = results_summary("student", results)
    assert summary["score"] == pytest.approx((85 + 40 + 75) / 3)
    assert summary["score_with_wnli"] == pytest.approx((85 + 40 + 75 + 50) / 4)
    assert summary["score_tasks"] == ["cola", "mnli", "mrpc"]
    table = results_table(summary).splitlines()
    assert table[0] == "| Model | Score | CoLA | MNLI | MRPC | QNLI | QQP | RTE | SST-2 | STS-B | WNLI |"
    assert table[2] == "| student | 66.7 | 40.0 | 75.0 | 85.0 | - | - | - | - | - | 50.0 |"
    assert "- MNLI: dev_matched acc 80.00; dev_mismatched acc 70.00" in table
    json.dumps(summary)  # what glue_results.json holds
