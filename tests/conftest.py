"""Shared fixtures. The repo root and scripts/ go on sys.path here and nowhere else."""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import assets  # noqa: E402  (tests/ is on sys.path through pytest's rootdir insertion)

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
