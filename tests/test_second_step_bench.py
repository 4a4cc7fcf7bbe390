"""bench/second_step.py: a smoke run at tiny size (both tasks through both task scripts), and its interval by hand."""

import math

import pytest

from bench import second_step


def test_the_bench_runs_both_tasks_and_reports_every_seed(capsys):
    results = second_step.main(["--size", "tiny", "--seeds", "2", "--threads", "1"])
    assert set(results) == {"classification", "qa"} and all(len(r["seeds"]) == 2 for r in results.values())
    assert capsys.readouterr().out.count("95 % t-interval") == 2


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
