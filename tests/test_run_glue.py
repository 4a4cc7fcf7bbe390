"""run_glue_w_distillation.py: the loss against a hand computation, the teacher then the student end to end as
real commands (every task found, the table, the metrics against an independent recomputation), two gloo
processes under torchrun on a task of one's own, and bad input as one line with nothing written."""

import json
import math
import random
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification, AutoTokenizer, BertForMaskedLM, BertForSequenceClassification,
    DistilBertForMaskedLM,
)

import assets
import glue_assets
import glue_tasks
import run_glue_w_distillation as glue
from cli_checks import child_env, error_line, free_port
from task_training import run_script
from test_glue_tasks import reference_f1, reference_pearson, reference_ranks

FAST = ["--no_cuda", "--max_seq_length", "32", "--num_train_epochs", "1", "--learning_rate", "1e-3",
        "--per_gpu_train_batch_size", "4", "--logging_steps", "50", "--save_steps", "50"]


def test_glue_losses_equal_a_hand_computation():
    s_logits = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]])
    t_logits = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 2.0, 0.5]])
    labels = torch.tensor([2, 0])
    temperature, alpha_ce, alpha_task = 3.0, 0.7, 0.2

    def softmax(row, t=1.0):
        norm = sum(math.exp(v / t) for v in row)
        return [math.exp(v / t) / norm for v in row]

    kl = sum(pt * math.log(pt / ps) for s, t in zip(s_logits.tolist(), t_logits.tolist())
             for ps, pt in zip(softmax(s, temperature), softmax(t, temperature))) / 2 * temperature**2
    ce = -sum(math.log(softmax(s)[y]) for s, y in zip(s_logits.tolist(), labels.tolist())) / 2
    losses = glue.glue_losses(s_logits, t_logits, labels, False, temperature, alpha_ce, alpha_task)
    assert losses["loss_ce"].item() == pytest.approx(kl, rel=1e-6)
    assert losses["loss_task"].item() == pytest.approx(ce, rel=1e-6)
    assert losses["loss"].item() == pytest.approx(alpha_ce * kl + alpha_task * ce, rel=1e-6)
    alone = glue.glue_losses(s_logits, None, labels, False, temperature, alpha_ce, alpha_task)
    assert alone.keys() == {"loss", "loss_task"} and alone["loss"].item() == pytest.approx(ce, rel=1e-6)

    s_values, t_values, targets = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [2.5]]), torch.tensor([0.0, 4.0])
    regression = glue.glue_losses(s_values, t_values, targets, True, temperature, alpha_ce, alpha_task)
    assert regression["loss_ce"].item() == pytest.approx((1.0 + 0.25) / 2)  # teacher vs student, not KL
    assert regression["loss_task"].item() == pytest.approx((1.0 + 1.0) / 2)
    assert regression["loss"].item() == pytest.approx(alpha_ce * 0.625 + alpha_task * 1.0)


@pytest.fixture(scope="module")
def glue_setup(tmp_path_factory):
    """A tokenizer, a tiny BERT to fine-tune into teachers, a tiny DistilBERT student start, MRPC and STS-B."""
    root = tmp_path_factory.mktemp("glue")
    rng = random.Random(0)
    tokenizer_dir = assets.build_tokenizer("bert", root / "tokenizer", [glue_assets.sentence(rng) for _ in range(200)],
                                           vocab_size=120)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    bert = assets.save_seeded(lambda: BertForMaskedLM(assets.teacher_config("bert", len(tokenizer))), tokenizer,
                              root / "bert", 0)
    student = assets.save_seeded(lambda: DistilBertForMaskedLM(assets.student_config("distilbert", len(tokenizer))),
                                 tokenizer, root / "distilbert", 0)
    for task in ("mrpc", "sts-b"):
        glue_assets.write_glue_task(root / "glue", task, n_train=16, n_dev=8)
    return {"root": root, "tokenizer": tokenizer, "bert": bert, "student": student, "glue": root / "glue"}


def run_command(argv: list[str], cwd, repo_root, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), str(repo_root / "run_glue_w_distillation.py"), *argv]
    return subprocess.run(command, cwd=cwd, env=child_env(repo_root), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def teachers(glue_setup, repo_root):
    """The command without a teacher on every task of --data_dir: how the teachers are made."""
    out = glue_setup["root"] / "teachers"
    result = run_command(["--model_type", "bert", "--model_name_or_path", str(glue_setup["bert"]), "--data_dir",
                          str(glue_setup["glue"]), "--output_dir", str(out), "--do_train", "--do_eval", *FAST],
                         glue_setup["root"], repo_root)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_the_teachers_run_writes_a_model_per_task_and_the_table(teachers):
    out, result = teachers
    for task in ("MRPC", "STS-B"):
        assert (out / task / "model.safetensors").is_file() and (out / task / "eval_results.txt").is_file()
    table = (out / "glue_table.md").read_text()
    assert table.splitlines()[0] == "| Model | Score | CoLA | MNLI | MRPC | QNLI | QQP | RTE | SST-2 | STS-B | WNLI |"
    assert table in result.stdout
    config = json.loads((out / "STS-B" / "config.json").read_text())
    assert config["id2label"] == {"0": "score"} and config["problem_type"] == "regression"


def predict_one_by_one(folder, examples, tokenizer):
    """The model's prediction for each example alone (no batch, no padding): an independent path."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    outputs = []
    with torch.no_grad():
        for example in examples:
            encoded = tokenizer(example.text_a, example.text_b, truncation=True, max_length=32, return_tensors="pt")
            logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits[0]
            outputs.append(logits.item() if logits.numel() == 1 else int(logits.argmax()))
    return outputs


def test_the_student_distilled_from_each_tasks_teacher_reports_the_metrics_it_computes(glue_setup, teachers,
                                                                                       repo_root):
    out = glue_setup["root"] / "students"
    result = run_command(["--model_type", "distilbert", "--model_name_or_path", str(glue_setup["student"]),
                          "--teacher_type", "bert", "--teacher_name_or_path", str(teachers[0]), "--data_dir",
                          str(glue_setup["glue"]), "--output_dir", str(out), "--do_train", "--do_eval",
                          "--alpha_ce", "0.8", "--alpha_task", "0.2", *FAST], glue_setup["root"], repo_root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distilled from" in result.stderr
    summary = json.loads((out / "glue_results.json").read_text())
    assert summary["model"] == "distilbert distilled from teachers" and summary["score_tasks"] == ["mrpc", "sts-b"]

    mrpc = glue_tasks.load_glue_task(glue_setup["glue"], "mrpc", ["dev"]).evals["dev"]
    predictions = predict_one_by_one(out / "MRPC", mrpc, glue_setup["tokenizer"])
    labels = [int(example.label) for example in mrpc]
    expected = {"f1": reference_f1(predictions, labels),
                "acc": sum(p == y for p, y in zip(predictions, labels)) / len(labels)}
    assert summary["tasks"]["mrpc"]["metrics"]["dev"] == pytest.approx(expected)
    sts = glue_tasks.load_glue_task(glue_setup["glue"], "sts-b", ["dev"]).evals["dev"]
    values, targets = predict_one_by_one(out / "STS-B", sts, glue_setup["tokenizer"]), [e.label for e in sts]
    expected = {"pearson": reference_pearson(values, targets),
                "spearmanr": reference_pearson(reference_ranks(values), reference_ranks(targets))}
    assert summary["tasks"]["sts-b"]["metrics"]["dev"] == pytest.approx(expected, abs=1e-4)
    mean = (sum(expected.values()) / 2 * 100 + summary["tasks"]["mrpc"]["score"]) / 2
    assert summary["score"] == pytest.approx(mean, abs=1e-2)


def test_two_gloo_processes_under_torchrun_on_a_task_of_ones_own(glue_setup, teachers, repo_root, tmp_path):
    rows = glue_assets.glue_rows("mrpc", 12, seed=5)
    for name, part in (("train.jsonl", rows[:8]), ("dev.jsonl", rows[8:])):
        (tmp_path / name).write_text("".join(json.dumps({"first": a, "second": b, "same": y}) + "\n"
                                             for a, b, y in part))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    result = run_command(["--model_type", "distilbert", "--model_name_or_path", str(glue_setup["student"]),
                          "--teacher_type", "bert", "--teacher_name_or_path", str(teachers[0] / "MRPC"),
                          "--task_name", "pairs", "--train_file", str(tmp_path / "train.jsonl"), "--predict_file",
                          str(tmp_path / "dev.jsonl"), "--text_columns", "first", "second", "--label_column", "same",
                          "--output_dir", str(tmp_path / "out"), "--do_train", "--do_eval", "--save_steps", "1",
                          *FAST[:-2]], tmp_path, repo_root, launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1"]  # 8 / (2 x 4)
    summary = json.loads((tmp_path / "out" / "glue_results.json").read_text())
    assert list(summary["tasks"]) == ["pairs"] and summary["score"] is None  # not a GLUE task: outside the Score
    assert result.stdout.count("| Model | Score |") == 1  # the master alone evaluates and prints
    assert "| pairs |" in result.stdout.splitlines()[0]


def run_in_process(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_script(glue.main, argv)
    assert exit_info.value.code == 1
    return error_line(capsys.readouterr().err)


def save_classifier(folder, tokenizer, num_labels: int):
    config = assets.teacher_config("bert", len(tokenizer))
    config.num_labels = num_labels
    return assets.save_seeded(lambda: BertForSequenceClassification(config), tokenizer, folder, 0)


def test_bad_input_is_one_line_and_nothing_is_written(glue_setup, tmp_path, capsys):
    data = tmp_path / "glue"
    glue_assets.write_glue_task(data, "mrpc", n_train=4, n_dev=2)
    rte = glue_assets.glue_rows("rte", 4, seed=1)
    rte[2] = (rte[2][0], rte[2][1], "contradiction")
    glue_assets.write_glue_file(data / "RTE" / "train.tsv", "rte", rte)
    glue_assets.write_glue_file(data / "RTE" / "dev.tsv", "rte", glue_assets.glue_rows("rte", 2, seed=2))
    out = tmp_path / "out"
    student = ["--model_type", "distilbert", "--model_name_or_path", str(glue_setup["student"]), "--output_dir",
               str(out), "--do_train", "--do_eval", *FAST]

    # every task's files are read before the first is trained: RTE's bad label stops MRPC too
    line = run_in_process([*student, "--data_dir", str(data)], capsys)
    assert line == (f"error: {data / 'RTE' / 'train.tsv'}:4: label 'contradiction' is not one of the task's labels "
                    "entailment, not_entailment")
    (data / "MRPC" / "dev.tsv").unlink()
    line = run_in_process([*student, "--data_dir", str(data), "--task_name", "MRPC"], capsys)
    assert line.startswith("error: GLUE task MRPC: no file") and line.endswith("dev.tsv'")

    glue_assets.write_glue_task(data, "mrpc", n_train=4, n_dev=2)
    line = run_in_process([*student, "--data_dir", str(data / "MRPC"), "--output_dir", str(data)], capsys)
    assert line.startswith(f"error: --output_dir {str(data)!r} holds --data_dir {str(data / 'MRPC')!r}")
    three_labels = save_classifier(tmp_path / "three", glue_setup["tokenizer"], 3)
    line = run_in_process([*student, "--data_dir", str(data), "--task_name", "mrpc", "--teacher_type", "bert",
                           "--teacher_name_or_path", str(three_labels)], capsys)
    assert line.startswith(f"error: --teacher_name_or_path {str(three_labels)!r} predicts 3 label(s) and task MRPC "
                           "has 2")
    other_tokenizer = AutoTokenizer.from_pretrained(assets.build_tokenizer(
        "bert", tmp_path / "other_tokenizer", assets.make_corpus(100), vocab_size=90))
    other_vocabulary = save_classifier(tmp_path / "other", other_tokenizer, 2)
    line = run_in_process([*student, "--data_dir", str(data), "--task_name", "mrpc", "--teacher_type", "bert",
                           "--teacher_name_or_path", str(other_vocabulary)], capsys)
    assert "vocabulary has" in line and "distillation needs a teacher and a student of the same tokenizer" in line
    assert not out.exists()


def test_evaluation_alone_scores_a_given_model_per_task_as_its_own_run_did(glue_setup, teachers, tmp_path, capsys):
    out = tmp_path / "scores"
    summary = glue.main(["--model_type", "bert", "--model_name_or_path", str(teachers[0]), "--data_dir",
                         str(glue_setup["glue"]), "--output_dir", str(out), "--do_eval", *FAST])
    assert summary["tasks"] == json.loads((teachers[0] / "glue_results.json").read_text())["tasks"]
    assert sorted(path.name for path in out.iterdir()) == ["MRPC", "STS-B", "glue_results.json", "glue_table.md"]
    assert (out / "MRPC" / "eval_results.txt").read_text() == (teachers[0] / "MRPC" / "eval_results.txt").read_text()
    assert not (teachers[0] / "MRPC" / "checkpoint-1").exists()  # nothing written into the evaluated model
