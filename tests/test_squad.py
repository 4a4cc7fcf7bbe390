"""run_squad_w_distillation.py and its modules (squad_data, squad_predictions, squad_metrics).

- Scores against an independent reference written here from the official definitions, on hand cases
  (several gold answers, punctuation, articles, unanswerable questions), and hand-computed figures.
- The distillation loss against a hand computation; windows of a context longer than --max_seq_length.
- Bad input (malformed JSON, an answer not in its context, a teacher of another vocabulary): one line,
  nothing written.
- The command end to end: a subprocess without a teacher, and torchrun with two gloo processes with one.
"""

import argparse
import json
import math
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import run_squad_w_distillation as squad_cli
import squad_assets
import task_training
from cli_checks import child_env, error_line, free_port
from squad_data import NOT_CONTEXT, SquadExample, convert_examples_to_features
from squad_metrics import squad_v1_scores, squad_v2_scores
from squad_predictions import compute_predictions

SMALL = ["--max_seq_length", "32", "--doc_stride", "8", "--max_query_length", "12", "--no_cuda",
         "--learning_rate", "1e-3", "--per_gpu_train_batch_size", "8"]


# ---------------------------------------------------------------- an independent reference of the scores

def reference_normalize(text: str) -> str:
    """Word by word: lower case, characters of string.punctuation dropped, then the words a/an/the dropped."""
    kept = "".join(c for c in text.lower() if c not in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    return " ".join(word for word in kept.split() if word not in ("a", "an", "the"))


def reference_f1(prediction: str, gold: str, empty_rule: bool) -> float:
    pred, gold_words = reference_normalize(prediction).split(), reference_normalize(gold).split()
    if empty_rule and (not pred or not gold_words):
        return float(pred == gold_words)
    remaining, common = list(gold_words), 0
    for word in pred:
        if word in remaining:
            remaining.remove(word)
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold_words)
    return 2 * precision * recall / (precision + recall)


GOLD = {"q1": ["The Eiffel Tower", "Tower"], "q2": ["Paris", "France's capital"], "q3": ["apple pie"],
        "q4": [], "q5": [], "q6": ["an  answer."]}
PRED = {"q1": "eiffel tower!", "q2": "in Paris, France", "q3": "an apple", "q4": "", "q5": "something", "q6": "Answer"}


def test_v1_scores_equal_the_reference_and_the_hand_figures():
    answered = {qid: golds for qid, golds in GOLD.items() if golds}
    scores = squad_v1_scores(answered, PRED)
    exact = [max(float(reference_normalize(PRED[q]) == reference_normalize(g)) for g in gs) for q, gs in answered.items()]
    f1 = [max(reference_f1(PRED[q], g, False) for g in gs) for q, gs in answered.items()]
    assert scores["exact"] == pytest.approx(100 * sum(exact) / 4)
    assert scores["f1"] == pytest.approx(100 * sum(f1) / 4)
    # By hand: q1 exact; q2 "in paris france" vs "paris" F1 = 2(1/3)(1)/(4/3) = 0.5; q3 "apple" vs "apple pie" 2/3;
    # q6 "answer" exact ("an" is an article, "." punctuation).
    assert scores == pytest.approx({"exact": 50.0, "f1": 100 * (1 + 0.5 + 2 / 3 + 1) / 4, "total": 4})


def test_v2_scores_equal_the_reference_with_unanswerable_questions_and_thresholds():
    na_probs = {"q1": 0.1, "q2": 0.7, "q3": 0.4, "q4": 0.9, "q5": 0.3, "q6": 0.2}
    scores = squad_v2_scores(GOLD, PRED, na_probs, na_prob_threshold=0.5)
    has = {q: bool(gs) for q, gs in GOLD.items()}

    def raw(q, metric):
        golds = GOLD[q] or [""]
        if metric == "exact":
            return max(float(reference_normalize(PRED[q]) == reference_normalize(g)) for g in golds)
        return max(reference_f1(PRED[q], g, True) for g in golds)

    def at_threshold(q, metric, threshold):  # above the threshold, the question counts as answered with ""
        return float(not has[q]) if na_probs[q] > threshold else raw(q, metric)

    for metric in ("exact", "f1"):
        assert scores[metric] == pytest.approx(100 * sum(at_threshold(q, metric, 0.5) for q in GOLD) / 6)
        assert scores[f"HasAns_{metric}"] == pytest.approx(
            100 * sum(at_threshold(q, metric, 0.5) for q in GOLD if has[q]) / 4)
        assert scores[f"NoAns_{metric}"] == pytest.approx(
            100 * sum(at_threshold(q, metric, 0.5) for q in GOLD if not has[q]) / 2)
        # Brute force over every threshold: below all of them every question is "no answer" (threshold 0).
        candidates = [(sum(float(not has[q]) for q in GOLD), 0.0)]
        for threshold in sorted(na_probs.values()):
            candidates.append((sum(at_threshold(q, metric, threshold) for q in GOLD), threshold))
        best = max(score for score, _ in candidates)
        first = next(threshold for score, threshold in candidates if score == best)
        assert scores[f"best_{metric}"] == pytest.approx(100 * best / 6)
        assert scores[f"best_{metric}_thresh"] == first
    # By hand at 0.5: q2 and q4 are over it (q2 answerable: 0; q4 unanswerable: 1); q5's "something" is wrong.
    assert scores["exact"] == pytest.approx(100 * (1 + 0 + 0 + 1 + 0 + 1) / 6)
    assert (scores["HasAns_total"], scores["NoAns_total"], scores["total"]) == (4, 2, 6)


# ---------------------------------------------------------------- loss and windows

def test_distillation_loss_is_the_hand_computation(tmp_path, tokenizer_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs["bert"])
    student = squad_assets.build_qa_model("distilbert", tmp_path / "s", tokenizer_dirs["bert"])
    teacher = squad_assets.build_qa_model("bert", tmp_path / "t", tokenizer_dirs["bert"], seed=1)
    student = task_training.load_task_model(squad_cli.AutoModelForQuestionAnswering, "distilbert", str(student), "s")
    teacher = task_training.load_task_model(squad_cli.AutoModelForQuestionAnswering, "bert", str(teacher), "t")
    student.eval(), teacher.eval()
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, len(tokenizer), (3, 10), generator=generator),
             "attention_mask": torch.ones(3, 10, dtype=torch.long), "token_type_ids": torch.zeros(3, 10, dtype=torch.long),
             "start_positions": torch.tensor([1, 4, 0]), "end_positions": torch.tensor([2, 12, 0])}
    batch["token_type_ids"][:, 5:] = 1
    args = squad_cli.build_parser().parse_args(["--model_type", "distilbert", "--model_name_or_path", "x",
                                                "--output_dir", "x", "--alpha_ce", "0.3", "--alpha_squad", "0.6",
                                                "--temperature", "3.0"])
    losses = squad_cli.squad_loss(args)(student, teacher, batch)

    s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    t_out = teacher(**{key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids")})
    T = 3.0

    def kl(s_logits, t_logits):
        total = 0.0
        for s_row, t_row in zip(s_logits.tolist(), t_logits.tolist()):
            p_s = [math.exp(v / T) / sum(math.exp(u / T) for u in s_row) for v in s_row]
            p_t = [math.exp(v / T) / sum(math.exp(u / T) for u in t_row) for v in t_row]
            total += sum(t * math.log(t / s) for s, t in zip(p_s, p_t))
        return total / len(s_logits) * T**2

    def cross_entropy(logits, positions):  # positions past the sequence are clamped to it and ignored
        terms = []
        for row, position in zip(logits.tolist(), positions.tolist()):
            if min(position, 10) == 10:
                continue
            terms.append(math.log(sum(math.exp(v) for v in row)) - row[position])
        return sum(terms) / len(terms)

    loss_ce = (kl(s_out.start_logits, t_out.start_logits) + kl(s_out.end_logits, t_out.end_logits)) / 2
    loss_qa = (cross_entropy(s_out.start_logits, batch["start_positions"])
               + cross_entropy(s_out.end_logits, batch["end_positions"])) / 2
    assert losses["loss_ce"].item() == pytest.approx(loss_ce, rel=1e-5)
    assert losses["loss_qa"].item() == pytest.approx(loss_qa, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(0.3 * loss_ce + 0.6 * loss_qa, rel=1e-5)
    assert squad_cli.squad_loss(args)(student, None, batch)["loss"].item() == pytest.approx(loss_qa, rel=1e-5)


def test_windows_of_a_long_context_hold_the_answer_past_max_seq_length(tokenizer_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs["bert"])
    context = " ".join(f"the model of word{i} is the teacher ." for i in range(12)) + " the answer is gradient ."
    start = context.rindex("gradient")
    example = SquadExample("q", "what is the answer ?", context, ["gradient"], [start])
    features = convert_examples_to_features([example], tokenizer, max_seq_length=32, doc_stride=8,
                                            max_query_length=12, training=True)
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    assert n_context > 32 and len(features["input_ids"]) > 2
    first_chars = []
    holding = 0
    for row in range(len(features["input_ids"])):
        offsets = features["offsets"][row]
        in_context = [i for i in range(32) if offsets[i, 0] != NOT_CONTEXT]
        first_chars.append(offsets[in_context[0], 0])
        s, e = features["start_positions"][row], features["end_positions"][row]
        if offsets[in_context[0], 0] <= start and offsets[in_context[-1], 1] >= start + len("gradient"):
            holding += 1
            assert context[offsets[s, 0]:offsets[e, 1]] == "gradient"
            assert tokenizer.decode(features["input_ids"][row][s:e + 1]).replace(" ", "") == "gradient"
        else:
            assert (s, e) == (0, 0)  # the [CLS] token
            assert features["input_ids"][row][0] == tokenizer.cls_token_id
    assert holding >= 1
    # Consecutive windows start doc_stride context tokens apart (the original's meaning of --doc_stride).
    token_starts = [start for start, _ in tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
                    ["offset_mapping"]]
    positions = [token_starts.index(char) for char in first_chars]
    assert positions[:-1] == list(range(0, 8 * (len(positions) - 1), 8))
    assert positions[-1] - positions[-2] <= 8


# ---------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def squad_setup(tmp_path_factory, tokenizer_dirs):
    root = tmp_path_factory.mktemp("squad")
    data = root / "data"
    squad_assets.write_squad(data / "train-v1.1.json", squad_assets.make_squad(8, 0))
    squad_assets.write_squad(data / "dev-v1.1.json", squad_assets.make_squad(3, 1))
    squad_assets.write_squad(data / "train-v2.0.json", squad_assets.make_squad(8, 0, version_2=True))
    squad_assets.write_squad(data / "dev-v2.0.json", squad_assets.make_squad(3, 1, version_2=True))
    return {"root": root, "data": data,
            "teacher": squad_assets.build_qa_model("bert", root / "teacher", tokenizer_dirs["bert"]),
            "student": squad_assets.build_qa_model("distilbert", root / "student", tokenizer_dirs["bert"])}


def run_in_process(argv, capsys) -> tuple[int, str]:
    try:
        task_training.run_script(squad_cli.main, argv)
    except SystemExit as exit_info:
        return exit_info.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_fine_tuning_without_a_teacher_end_to_end(squad_setup, repo_root):
    out = squad_setup["root"] / "no-teacher"
    command = [sys.executable, str(repo_root / "run_squad_w_distillation.py"), "--model_type", "bert",
               "--model_name_or_path", str(squad_setup["teacher"]), "--output_dir", str(out), "--do_train",
               "--do_eval", "--data_dir", str(squad_setup["data"]), "--max_steps", "4", "--save_steps", "2",
               "--eval_all_checkpoints", *SMALL]
    result = subprocess.run(command, cwd=squad_setup["root"], env=child_env(repo_root), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    names = {path.name for path in out.iterdir()}
    assert {"checkpoint-2", "checkpoint-4", "model.safetensors", "config.json", "tokenizer.json", "training_args.json",
            "predictions_.json", "nbest_predictions_.json", "predictions_2.json", "eval_results.json"} <= names
    assert "null_odds_.json" not in names
    predictions = json.loads((out / "predictions_.json").read_text())
    dev = json.loads((squad_setup["data"] / "dev-v1.1.json").read_text())
    qids = [qa["id"] for article in dev["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    assert sorted(predictions) == sorted(qids)
    nbest = json.loads((out / "nbest_predictions_.json").read_text())
    for qid, entries in nbest.items():
        assert entries[0]["text"] == predictions[qid] and len(entries) <= 20
        assert sum(entry["probability"] for entry in entries) == pytest.approx(1.0)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["total"] == len(qids) and 0 <= results["f1"] <= 100
    cache = sorted(path.name for path in squad_setup["data"].glob("cached_distillation_*"))
    assert cache == ["cached_distillation_dev_teacher_32.npz", "cached_distillation_train_teacher_32.npz"]
    with np.load(squad_setup["data"] / cache[1], allow_pickle=False) as cached:
        assert cached["input_ids"].shape[1] == 32


def test_distillation_under_torchrun_with_two_gloo_processes(squad_setup, repo_root):
    out = squad_setup["root"] / "distilled"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(repo_root / "run_squad_w_distillation.py"), "--model_type", "distilbert",
               "--model_name_or_path", str(squad_setup["student"]), "--teacher_type", "bert",
               "--teacher_name_or_path", str(squad_setup["teacher"]), "--output_dir", str(out), "--do_train",
               "--do_eval", "--data_dir", str(squad_setup["data"]), "--version_2_with_negative", "--max_steps", "3",
               "--save_steps", "2", "--teacher_dtype", "bfloat16", *SMALL]
    result = subprocess.run(command, cwd=squad_setup["root"], env=child_env(repo_root), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stderr
    names = {path.name for path in out.iterdir()}
    assert {"checkpoint-2", "model.safetensors", "predictions_.json", "null_odds_.json"} <= names
    results = json.loads((out / "eval_results.json").read_text())
    assert {"HasAns_exact", "NoAns_exact", "best_f1", "best_f1_thresh"} <= set(results)
    predictions = json.loads((out / "predictions_.json").read_text())
    null_odds = json.loads((out / "null_odds_.json").read_text())
    assert set(predictions) == set(null_odds)
    for qid, odds in null_odds.items():  # --null_score_diff_threshold 0: no answer exactly when the odds exceed 0
        assert (predictions[qid] == "") == (odds > 0.0)
    student = squad_cli.AutoModelForQuestionAnswering.from_pretrained(out)
    initial = squad_cli.AutoModelForQuestionAnswering.from_pretrained(squad_setup["student"])
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), initial.state_dict().values()))


def test_a_process_that_dies_ends_the_other_with_one_line(squad_setup, repo_root, tmp_path):
    """Rank 1 is killed after its first optimizer step: rank 0, in the next gradient all-reduce, stops with one line."""
    port, ranks = free_port(), []
    for rank in (0, 1):
        variables = {**child_env(repo_root), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                     "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                     "FAULT": "sigkill@step=1:1", "FAULT_TOOL": str(repo_root / "run_squad_w_distillation.py")}
        command = [sys.executable, str(repo_root / "tests" / "fault_injection.py"), "--model_type", "distilbert",
                   "--model_name_or_path", str(squad_setup["student"]), "--output_dir", str(tmp_path / "out"),
                   "--do_train", "--data_dir", str(squad_setup["data"]), "--max_steps", "4", "--save_steps", "10",
                   "--per_gpu_train_batch_size", "2", "--dist_timeout", "60", *SMALL[:-2]]
        ranks.append(subprocess.Popen(command, cwd=tmp_path, env=variables, stderr=subprocess.PIPE, text=True))
    _, rank1_stderr = ranks[1].communicate(timeout=300)
    assert ranks[1].returncode == -signal.SIGKILL, rank1_stderr[-3000:]
    _, rank0_stderr = ranks[0].communicate(timeout=120)
    assert ranks[0].returncode == 1 and "Traceback" not in rank0_stderr, rank0_stderr[-3000:]
    assert error_line(rank0_stderr).startswith("error: lost another process of the run")


@pytest.mark.parametrize("case", ["malformed", "answer_not_in_context", "vocabulary", "positions", "v2_without_flag"])
def test_bad_input_is_one_line_and_writes_nothing(case, squad_setup, tmp_path, tokenizer_dirs, capsys):
    data = tmp_path / "data"
    squad = squad_assets.make_squad(2, 0)
    teacher = squad_setup["teacher"]
    expected = {"malformed": "is not valid JSON", "answer_not_in_context": "is not in its context at answer_start",
                "vocabulary": "vocabulary has", "positions": "is more than the 64 positions of the student",
                "v2_without_flag": "has no answer (a SQuAD v2.0 file needs --version_2_with_negative)"}[case]
    if case == "malformed":
        data.mkdir()
        (data / "train-v1.1.json").write_text(json.dumps(squad)[:-5])
    else:
        if case == "answer_not_in_context":
            squad["data"][1]["paragraphs"][0]["qas"][2]["answers"][0]["answer_start"] += 1
        else:
            teacher = squad_assets.build_qa_model("bert", tmp_path / "other-teacher", tokenizer_dirs["bert"],
                                                  vocab_size=77)
        squad_assets.write_squad(data / "train-v1.1.json", squad)
    squad_assets.write_squad(data / "dev-v1.1.json", squad_assets.make_squad(1, 1, version_2=case == "v2_without_flag"))
    before = sorted(path.name for path in data.iterdir())
    out = tmp_path / "out"
    flags = ["--max_seq_length", "65"] if case == "positions" else []
    status, stderr = run_in_process(
        ["--model_type", "distilbert", "--model_name_or_path", str(squad_setup["student"]), "--teacher_type", "bert",
         "--teacher_name_or_path", str(teacher), "--output_dir", str(out), "--do_train", "--do_eval",
         "--data_dir", str(data), *SMALL, *flags], capsys)
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 1 and len(lines) == 1 and expected in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not out.exists()
    assert sorted(path.name for path in data.iterdir()) == before


def test_a_distilbert_teacher_is_refused(squad_setup, tmp_path, capsys):
    status, stderr = run_in_process(
        ["--model_type", "distilbert", "--model_name_or_path", str(squad_setup["student"]), "--teacher_type",
         "distilbert", "--teacher_name_or_path", str(squad_setup["student"]), "--output_dir", str(tmp_path / "o"),
         "--do_train", "--data_dir", str(squad_setup["data"])], capsys)
    assert status == 1 and "a DistilBERT teacher is refused" in stderr


def test_predictions_rank_valid_spans_and_apply_the_null_threshold():
    example = SquadExample("q", "question", "aa bb cc dd")
    offsets = np.full((1, 8, 2), NOT_CONTEXT)
    offsets[0, 3:7] = [(0, 2), (3, 5), (6, 8), (9, 11)]  # [CLS] q [SEP] aa bb cc dd [SEP]
    features = {"offsets": offsets, "example_index": np.array([0]), "cls_index": np.array([0])}
    start = np.array([[0.0, 9, 0, 1, 2, 5, 0, 0]])  # the question token (9) is no start
    end = np.array([[0.0, 0, 0, 0, 6, 1, 4, 9]])  # nor the final [SEP] (9) an end

    def predict(max_answer_length, version_2=False, threshold=0.0, start=start):
        return compute_predictions([example], features, start, end, 20, max_answer_length, version_2, threshold)

    predictions, nbest, null_odds = predict(2)
    assert predictions == {"q": "cc dd"} and null_odds is None  # 5 + 4; "bb cc dd" (2 + 4 + ...) is 3 tokens long
    texts = [entry["text"] for entry in nbest["q"]]
    assert texts[:3] == ["cc dd", "bb", "aa bb"] and "bb cc dd" not in texts and len(texts) == len(set(texts))
    assert predict(1)[0] == {"q": "bb"}
    predictions, _, null_odds = predict(2, version_2=True)
    assert null_odds == {"q": pytest.approx(0.0 - 9.0)} and predictions == {"q": "cc dd"}
    confident_null = start.copy()
    confident_null[0, 0] = 20.0
    predictions, nbest, null_odds = predict(2, version_2=True, start=confident_null)
    assert null_odds == {"q": pytest.approx(20.0 - 9.0)} and predictions == {"q": ""}
    assert nbest["q"][0]["text"] == ""
    assert predict(2, version_2=True, threshold=12.0, start=confident_null)[0] == {"q": "cc dd"}


def test_training_into_the_student_folder_is_refused(squad_setup, capsys):
    student = squad_setup["student"]
    before = sorted(path.name for path in student.iterdir())
    status, stderr = run_in_process(
        ["--model_type", "distilbert", "--model_name_or_path", str(student), "--output_dir", str(student),
         "--do_train", "--overwrite_output_dir", "--data_dir", str(squad_setup["data"]), *SMALL], capsys)
    assert status == 1 and "is the same path as --model_name_or_path" in stderr
    assert sorted(path.name for path in student.iterdir()) == before


@pytest.mark.family_matrix
@pytest.mark.parametrize("family", ["xlnet", "xlm"])
def test_xlnet_and_xlm_students_distil_from_a_bert_teacher(family, squad_setup, tmp_path, capsys):
    from transformers import XLMConfig, XLMForQuestionAnsweringSimple, XLNetConfig, XLNetForQuestionAnsweringSimple

    tokenizer = AutoTokenizer.from_pretrained(squad_setup["teacher"])
    if family == "xlnet":
        make = lambda: XLNetForQuestionAnsweringSimple(XLNetConfig(  # noqa: E731
            vocab_size=len(tokenizer), d_model=32, n_layer=2, n_head=2, d_inner=64, pad_token_id=0))
    else:
        make = lambda: XLMForQuestionAnsweringSimple(XLMConfig(  # noqa: E731
            vocab_size=len(tokenizer), emb_dim=32, n_layers=2, n_heads=2, max_position_embeddings=64, pad_index=0))
    student = squad_assets.assets.save_seeded(make, tokenizer, tmp_path / family, 0)
    model = squad_cli.AutoModelForQuestionAnswering.from_pretrained(student)
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "token_type_ids": torch.ones(1, 4, dtype=torch.long)}
    assert ("token_type_ids" in squad_cli.model_inputs(model, batch)) == (family == "xlnet")  # the original's rule
    out = tmp_path / "out"
    status, stderr = run_in_process(
        ["--model_type", family, "--model_name_or_path", str(student), "--teacher_type", "bert",
         "--teacher_name_or_path", str(squad_setup["teacher"]), "--output_dir", str(out), "--do_train", "--do_eval",
         "--data_dir", str(squad_setup["data"]), "--max_steps", "2", *SMALL], capsys)
    assert status == 0, stderr[-2000:]
    assert json.loads((out / "eval_results.json").read_text())["total"] == 9


def test_evaluation_alone_scores_the_given_model_when_output_dir_holds_none(squad_setup, tmp_path, capsys):
    out = tmp_path / "scores"
    status, stderr = run_in_process(
        ["--model_type", "bert", "--model_name_or_path", str(squad_setup["teacher"]), "--output_dir", str(out),
         "--do_eval", "--data_dir", str(squad_setup["data"]), *SMALL], capsys)
    assert status == 0, stderr[-2000:]
    assert sorted(path.name for path in out.iterdir()) == ["eval_results.json", "nbest_predictions_.json",
                                                           "predictions_.json"]


def test_every_flag_of_the_original_keeps_its_default():
    args = squad_cli.build_parser().parse_args(["--model_type", "bert", "--model_name_or_path", "m", "--output_dir", "o"])
    original = {
        "teacher_type": None, "teacher_name_or_path": None, "alpha_ce": 0.5, "alpha_squad": 0.5, "temperature": 2.0,
        "data_dir": None, "train_file": None, "predict_file": None, "config_name": "", "tokenizer_name": "",
        "cache_dir": "", "version_2_with_negative": False, "null_score_diff_threshold": 0.0, "max_seq_length": 384,
        "doc_stride": 128, "max_query_length": 64, "do_train": False, "do_eval": False,
        "evaluate_during_training": False, "do_lower_case": False, "per_gpu_train_batch_size": 8,
        "per_gpu_eval_batch_size": 8, "learning_rate": 5e-5, "gradient_accumulation_steps": 1, "weight_decay": 0.0,
        "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "num_train_epochs": 3.0, "max_steps": -1, "warmup_steps": 0,
        "n_best_size": 20, "max_answer_length": 30, "verbose_logging": False, "logging_steps": 50, "save_steps": 50,
        "eval_all_checkpoints": False, "no_cuda": False, "overwrite_output_dir": False, "overwrite_cache": False,
        "seed": 42, "local_rank": -1, "fp16": False, "fp16_opt_level": "O1", "server_ip": "", "server_port": "",
        "threads": 1,
    }
    assert {key: getattr(args, key) for key in original} == original


def test_questions_are_cut_to_max_query_length_tokens(tokenizer_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs["bert"])
    question = "which of the many words of this long question about the teacher and the student is kept ?"
    context = "the student of the teacher is the model ."
    example = SquadExample("q", question, context, ["the model"], [context.index("the model")])
    features = convert_examples_to_features([example], tokenizer, max_seq_length=48, doc_stride=8,
                                            max_query_length=5, training=True)
    ids = features["input_ids"][0].tolist()
    first_sep = ids.index(tokenizer.sep_token_id)
    assert ids[1:first_sep] == tokenizer(question, add_special_tokens=False)["input_ids"][:5]
    start, end = features["start_positions"][0], features["end_positions"][0]
    assert tokenizer.decode(ids[start:end + 1]) == "the model"


def test_the_feature_cache_is_reused_rebuilt_when_its_inputs_change_and_never_unpickled(tmp_path, tokenizer_dirs,
                                                                                         monkeypatch):
    import squad_data

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dirs["bert"])
    path = squad_assets.write_squad(tmp_path / "train.json", squad_assets.make_squad(2, 0))
    examples = squad_data.read_squad_examples(str(path), True, False)
    builds = []
    build = squad_data.convert_examples_to_features
    monkeypatch.setattr(squad_data, "convert_examples_to_features", lambda *a: builds.append(a[3]) or build(*a))

    def features(doc_stride=8, overwrite_cache=False, tokenizer=tokenizer):
        args = argparse.Namespace(max_seq_length=32, doc_stride=doc_stride, max_query_length=12,
                                  version_2_with_negative=False, model_name_or_path="models/tiny/",
                                  overwrite_cache=overwrite_cache)
        return squad_data.load_or_build_features(str(path), examples, tokenizer, args, True, write_cache=True)

    first = features()
    cache = tmp_path / "cached_distillation_train_tiny_32.npz"
    assert cache.is_file() and builds == [8]
    again = features()
    assert builds == [8] and all(np.array_equal(first[key], again[key]) for key in first)
    features(doc_stride=4)
    features(doc_stride=4, overwrite_cache=True)
    assert builds == [8, 4, 4]
    other = AutoTokenizer.from_pretrained(tokenizer_dirs["bert"])
    other.add_tokens(["zzzunseen"])
    features(doc_stride=4, tokenizer=other)
    assert builds == [8, 4, 4, 4]
    np.savez(cache, fingerprint=np.array([object()], dtype=object), input_ids=np.zeros(1))  # a pickle inside
    rebuilt = features(doc_stride=4)
    assert builds == [8, 4, 4, 4, 4] and rebuilt["input_ids"].shape[1] == 32
