"""Families none of the other tests use, as a new user would try them (`auto` everywhere, the README recipe):
binarize with the tokenizer's own markers → count → extract a shallower student → distil with fused losses and
with full logits → distil a narrower student from random weights → load the export with `pipeline`.

A marked set (`-m family_matrix`, deselected by the README's test command): about a second per family on a CPU.
Where a family cannot do a step, the one-line refusal is asserted instead (DeBERTa-v2's new head with
--loss_chunk_size given: its get_output_embeddings() is not its vocabulary projection).
"""

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, pipeline

import assets
import binarized_data
import extract
import token_counts
from cli_checks import error_line, run_main

pytestmark = [pytest.mark.family_matrix, pytest.mark.filterwarnings("ignore:Unable to enable fault handler")]

RUN = ["--n_gpu", "0", "--n_epoch", "1", "--batch_size", "8", "--gradient_accumulation_steps", "1",
       "--learning_rate", "2e-3", "--log_interval", "5", "--checkpoint_interval", "1000", "--seed", "0"]
LOSSES = {
    True: ["--mlm", "--alpha_ce", "2.0", "--alpha_mlm", "1.0", "--alpha_cos", "1.0", "--alpha_clm", "0.0"],
    False: ["--alpha_ce", "1.0", "--alpha_clm", "1.0", "--alpha_cos", "1.0"],
}
FALLBACK = "Vocabulary losses on full logits, not fused"
# Families whose fused path fails its probe, with what the warning (and the refusal) says.
NOT_FUSABLE = {"deberta-v2": "its output embeddings (lm_predictions.lm_head.dense (32, 32)) are not its vocabulary "
                             "projection"}


@pytest.fixture(scope="module")
def matrix_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("matrix-corpus") / "corpus.txt"
    path.write_text("\n".join(assets.make_corpus(n_lines=40, seed=1)) + "\n", encoding="utf-8")
    return path


def prepare(kind: str, root: Path, corpus_file: Path) -> dict[str, str]:
    """Tokenizer and teacher of `kind`, then the real commands: binarize, count, extract layers 0 and 2."""
    tokenizer = assets.build_matrix_tokenizer(kind, root / "tokenizer", assets.make_corpus())
    teacher = assets.build_matrix_teacher(kind, root / "teacher", tokenizer)
    binarized_data.main(["--file_path", str(corpus_file), "--tokenizer_type", "auto", "--tokenizer_name", str(teacher),
                         "--dump_file", str(root / "data"), "--seed", "0"])
    data_file = root / "data.teacher.pickle"
    counts = root / "counts.pickle"
    token_counts.main(["--data_file", str(data_file), "--token_counts_dump", str(counts), "--vocab_size",
                       str(len(AutoTokenizer.from_pretrained(teacher)))])
    student = root / "student"
    extract.main(["--model_type", "auto", "--model_name", str(teacher), "--layers", "0", "2",
                  "--dump_checkpoint", str(student)])
    return dict(data_file=str(data_file), token_counts=str(counts), teacher=str(teacher), student=str(student))


def train_argv(files: dict, mlm: bool, dump: Path, *extra: str, weights: bool = True) -> list[str]:
    argv = ["--dump_path", str(dump), "--data_file", files["data_file"], "--student_type", "auto",
            "--student_config", files.get("config", str(Path(files["student"]) / "config.json")),
            "--teacher_type", "auto", "--teacher_name", files["teacher"], *LOSSES[mlm], *RUN, *extra]
    argv += ["--student_pretrained_weights", files["student"]] if weights else []
    return argv + (["--token_counts", files["token_counts"]] if mlm else [])


def check_export(dump: Path, mlm: bool) -> None:
    """The exported folder loads whole and answers through `pipeline`."""
    model_class = AutoModelForMaskedLM if mlm else AutoModelForCausalLM
    _, info = model_class.from_pretrained(dump, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokenizer = AutoTokenizer.from_pretrained(dump)
    if mlm:
        predictions = pipeline("fill-mask", model=str(dump))(f"the {tokenizer.mask_token} of the student")
        assert len(predictions) == 5 and all(0 <= p["token"] < len(tokenizer) for p in predictions)
    else:
        generated = pipeline("text-generation", model=str(dump))("the teacher", max_new_tokens=3, do_sample=False)
        assert generated[0]["generated_text"].startswith("the teacher")


@pytest.mark.parametrize("kind", list(assets.MATRIX_FAMILIES))
def test_a_family_goes_from_text_to_pipeline(kind, matrix_corpus, tmp_path, capsys, caplog):
    mlm = assets.MATRIX_FAMILIES[kind][1]
    files = prepare(kind, tmp_path, matrix_corpus)
    capsys.readouterr()

    def fallback_warnings() -> list[str]:
        return [record.message for record in caplog.records if FALLBACK in record.message]

    # Fused (the default): used where the probe proves it, else full logits with one warning.
    caplog.clear()
    status, stderr = run_main(train_argv(files, mlm, tmp_path / "fused"), capsys)
    assert status == 0, stderr[-3000:]
    warnings = fallback_warnings()
    if kind in NOT_FUSABLE:
        assert len(warnings) == 1 and f"the student ({kind})" in warnings[0], warnings
        assert NOT_FUSABLE[kind] in warnings[0]
        # Fusion asked for explicitly: refused in one line before the run folder exists.
        status, stderr = run_main(train_argv(files, mlm, tmp_path / "explicit", "--loss_chunk_size", "64"), capsys)
        assert status == 1 and NOT_FUSABLE[kind] in error_line(stderr) and "--loss_chunk_size 0" in error_line(stderr)
        assert not (tmp_path / "explicit").exists()
    else:
        assert warnings == [], warnings
    check_export(tmp_path / "fused", mlm)

    # Full logits.
    caplog.clear()
    status, stderr = run_main(train_argv(files, mlm, tmp_path / "full", "--loss_chunk_size", "0"), capsys)
    assert status == 0, stderr[-3000:]
    assert fallback_warnings() == []
    check_export(tmp_path / "full", mlm)

    # A narrower student from random weights, its cosine loss through a projection sized from the real widths.
    student_config = json.loads((Path(files["student"]) / "config.json").read_text())
    narrow = tmp_path / "narrow.json"
    narrow.write_text(json.dumps(assets.narrower_config(student_config)))
    narrow_files = {**files, "config": str(narrow)}
    status, stderr = run_main(train_argv(narrow_files, mlm, tmp_path / "narrow", weights=False), capsys)
    assert status == 0, stderr[-3000:]
    check_export(tmp_path / "narrow", mlm)
