"""bench/second_step.py: a smoke run at tiny size (both tasks through both task scripts), and its interval by hand."""

import math

import pytest
import torch
from safetensors.torch import load_file

from bench import second_step


def test_the_bench_runs_both_tasks_and_reports_every_seed(capsys, tmp_path):
    results = second_step.main(["--size", "tiny", "--seeds", "2", "--threads", "1", "--work_dir", str(tmp_path)])
    assert set(results) == {"classification", "qa"} and all(len(r["seeds"]) == 2 for r in results.values())
    assert capsys.readouterr().out.count("95 % t-interval") == 2
    for task in results:  # the students' start: the fine-tuned teacher's embeddings and its layers 0 and 2
        teacher = load_file(tmp_path / task / "teacher" / "model.safetensors")
        student = load_file(tmp_path / task / "student_start" / "model.safetensors")
        assert torch.equal(student["distilbert.embeddings.word_embeddings.weight"],
                           teacher["bert.embeddings.word_embeddings.weight"])
        for student_layer, teacher_layer in enumerate((0, 2)):
            assert torch.equal(student[f"distilbert.transformer.layer.{student_layer}.ffn.lin2.weight"],
                               teacher[f"bert.encoder.layer.{teacher_layer}.output.dense.weight"])
            assert torch.equal(student[f"distilbert.transformer.layer.{student_layer}.attention.q_lin.bias"],
                               teacher[f"bert.encoder.layer.{teacher_layer}.attention.self.query.bias"])


def test_the_paired_interval_is_the_t_interval():
    mean, low, high = second_step.paired_interval([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.303
    assert (mean, low, high) == pytest.approx((2.0, 2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    assert second_step.t_quantile_975(40) == pytest.approx(2.021, abs=1e-3)
    assert second_step.t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)


def test_the_vocabulary_is_counted_frequent_words_first_ties_alphabetical(tmp_path):
    tokenizer = second_step.wordpiece_tokenizer(["The dog", "the cat", "cat"], 23, tmp_path)
    characters = list("acdeghot")
    expected = [*second_step.SPECIAL_TOKENS, *characters, *(f"##{c}" for c in characters), "cat", "the"]
    assert sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get) == expected
    assert tokenizer.tokenize("The dog") == ["the", "d", "##o", "##g"]
    rare_spelled_out = second_step.wordpiece_tokenizer(["The dog", "the cat", "cat"], 23, tmp_path, min_count=2)
    assert sorted(rare_spelled_out.get_vocab(), key=rare_spelled_out.get_vocab().get) == expected  # both seen twice
    only_the = second_step.wordpiece_tokenizer(["The dog", "the cat", "the"], 23, tmp_path, min_count=3)
    assert only_the.tokenize("the cat") == ["the", "c", "##a", "##t"]
