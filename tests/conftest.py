"""Shared fixtures. The repo root and scripts/ go on sys.path here and nowhere else."""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import assets  # noqa: E402  (tests/ is on sys.path through pytest's rootdir insertion)
import binarized_data  # noqa: E402
import token_counts  # noqa: E402
from cli_checks import STUDENT_OF  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

TOKENIZER_KINDS = ("bert", "roberta", "gpt2")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def corpus_lines() -> list[str]:
    return assets.make_corpus()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus_lines) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "dump.txt"
    path.write_text("\n".join(corpus_lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory, corpus_lines) -> dict[str, Path]:
    """One tiny saved tokenizer per family: {'bert': dir, 'roberta': dir, 'gpt2': dir}."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: assets.build_tokenizer(kind, root / f"tiny-{kind}", corpus_lines) for kind in TOKENIZER_KINDS}


@pytest.fixture(scope="session")
def teacher_dirs(tmp_path_factory, tokenizer_dirs) -> dict[str, Path]:
    """One tiny saved teacher (model + tokenizer) per family, 2 layers."""
    root = tmp_path_factory.mktemp("teachers")
    return {
        kind: assets.build_teacher(kind, root / f"tiny-{kind}-teacher", tokenizer_dirs[kind])
        for kind in TOKENIZER_KINDS
    }


@pytest.fixture(scope="session")
def family_inputs(tmp_path_factory, corpus_file, teacher_dirs) -> dict[str, dict[str, str]]:
    """Per family: binarized data and counts from the real scripts, and a tiny student config (1 layer)."""
    root = tmp_path_factory.mktemp("train_inputs")
    inputs = {}
    for kind, teacher_dir in teacher_dirs.items():
        vocab_size = AutoTokenizer.from_pretrained(teacher_dir).__len__()
        binarized_data.main([
            "--file_path", str(corpus_file), "--tokenizer_type", kind, "--tokenizer_name", str(teacher_dir),
            "--dump_file", str(root / "binarized_text"), "--seed", "0",
        ])
        data_file = root / f"binarized_text.{teacher_dir.name}.pickle"
        counts_file = root / f"token_counts.{kind}.pickle"
        token_counts.main([
            "--data_file", str(data_file), "--token_counts_dump", str(counts_file), "--vocab_size", str(vocab_size),
        ])
        config_file = root / f"student-{kind}.json"
        assets.student_config(STUDENT_OF[kind], vocab_size).to_json_file(config_file)
        inputs[kind] = dict(
            data_file=str(data_file), token_counts=str(counts_file), student_config=str(config_file),
            teacher_name=str(teacher_dir), vocab_size=vocab_size,
        )
    return inputs


@pytest.fixture(scope="session")
def auto_tokenizer_dirs(tmp_path_factory, corpus_lines) -> dict[str, Path]:
    """One tiny saved tokenizer per family of today (assets.AUTO_KINDS), with the family's special tokens:
    'modernbert' adds [CLS] ... [SEP] (and has [PAD], [MASK], [UNK]); 'llama' adds only <|begin_of_text|>
    (eos <|end_of_text|>, no pad or unk); 'qwen3' adds nothing (eos = pad = <|endoftext|>); 'gpt_neox' adds
    nothing (bos = eos = unk = <|endoftext|>)."""
    root = tmp_path_factory.mktemp("auto-tokenizers")
    return {kind: assets.build_auto_tokenizer(kind, root / f"tiny-{kind}", corpus_lines) for kind in assets.AUTO_KINDS}


@pytest.fixture(scope="session")
def auto_teacher_dirs(tmp_path_factory, auto_tokenizer_dirs) -> dict[str, Path]:
    """One tiny saved teacher (model + tokenizer, 4 layers, hidden 32) per family of today, for the `auto` types:
    {'modernbert': dir, 'llama': dir, 'qwen3': dir, 'gpt_neox': dir}; what each covers is in
    assets.auto_teacher_config."""
    root = tmp_path_factory.mktemp("auto-teachers")
    return {
        kind: assets.build_auto_teacher(kind, root / f"tiny-{kind}-teacher", auto_tokenizer_dirs[kind])
        for kind in assets.AUTO_KINDS
    }
