"""quickstart.py end to end at reduced size: the real CLIs in sequence, a results table and a plot,
and distillation that measurably moves the student towards its teacher."""

import json
import os
import random
import subprocess
import sys

import pytest

import assets
import quickstart

REDUCED = [
    "--vocab_size", "300", "--max_length", "64", "--hidden", "32", "--heads", "2", "--teacher_layers", "2",
    "--student_layers", "0", "--teacher_epochs", "3", "--distil_epochs", "3", "--batch_size", "16",
    "--teacher_learning_rate", "3e-3",
]


def chain_corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    """Lines where every word fixes the next through a secret permutation: nothing to learn from word
    frequencies, everything from context, so even a minutes-old tiny teacher relies on its upper layer."""
    rng = random.Random(seed)
    words = sorted({word for word in assets.WORDS if len(word) >= 3})[:80]
    successor = dict(zip(words, rng.sample(words, len(words))))
    lines = []
    for _ in range(n_lines):
        word, line = rng.choice(words), []
        for _ in range(rng.randint(14, 30)):
            line.append(word)
            word = successor[word]
        lines.append(" ".join(line))
    return lines


def test_stdlib_corpus_is_english_prose_and_split_deterministically():
    lines = quickstart.stdlib_docstring_corpus()
    assert len(lines) > 5000
    assert all(len(line.split()) >= quickstart.MIN_WORDS and ">>>" not in line and "\n" not in line for line in lines)
    assert len(set(lines)) == len(lines)
    words = " ".join(lines[:2000]).lower().split()
    assert words.count("the") > 0.03 * len(words)  # English: "the" is the commonest word
    train, held_out = quickstart.split_corpus(lines, 0.05, seed=1)
    assert quickstart.split_corpus(lines, 0.05, seed=1) == (train, held_out)
    assert len(held_out) == round(0.05 * len(lines)) and sorted(train + held_out) == sorted(lines)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    text_file = root / "chain.txt"
    text_file.write_text("\n".join(chain_corpus()) + "\n")
    out = root / "out"
    result = subprocess.run(
        [sys.executable, quickstart.__file__, "--output_dir", str(out), "--text_file", str(text_file), *REDUCED],
        cwd=tmp_path_factory.mktemp("cwd"), capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def test_quickstart_writes_the_table_and_the_plot(quickstart_run):
    out, result = quickstart_run
    report = (out / "results.md").read_text()
    for row in ("teacher", "student before distillation", "distilled student", "MLM-only student"):
        assert f"| {row} |" in report and f"| {row} |" in result.stdout
    png = (out / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    for run in ("teacher", "distilled", "mlm_only"):
        assert (out / run / "model.safetensors").exists()


def test_distillation_moves_the_student_towards_the_teacher(quickstart_run):
    out, _ = quickstart_run
    results = json.loads((out / "results.json").read_text())
    teacher, before = results["teacher"], results["student before distillation"]
    distilled, mlm_only = results["distilled student"], results["MLM-only student"]
    assert teacher["teacher_agreement"] == 1.0 and teacher["teacher_kl"] == pytest.approx(0.0, abs=1e-6)
    assert distilled["teacher_agreement"] > before["teacher_agreement"] + 0.05
    assert distilled["teacher_kl"] < before["teacher_kl"]
    # The paper's ablation: the same student trained on the labels alone tracks the teacher less closely.
    assert distilled["teacher_agreement"] > mlm_only["teacher_agreement"]
    assert distilled["teacher_kl"] < mlm_only["teacher_kl"]
    assert len({figures["n_targets"] for figures in results.values()}) == 1  # the same masked positions for all


def test_existing_output_dir_needs_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = subprocess.run([sys.executable, quickstart.__file__, "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: --output_dir")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
