"""No data loss by construction (issue 21): one test, or a few, per class of the hostile-user cases.

1. quickstart --force would delete its own inputs       5. a model folder is not a previous run
2. a script writing over its own input                  6. a failing clean-up still restores
3. the previous run is set aside in one rename          7. failed writes are one line
4. set-aside runs and links are never followed          8. JSON files validated by type
9. the final export is tried before training            10. --resume refuses changed data
11. sizes bounded before allocating; SIGHUP saves like SIGTERM

The fault matrix (tests/test_fault_matrix.py) checks the same invariants for every tool and write.
"""

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import quickstart
import train
from cli_checks import base_argv, child_env, error_line, run_main, with_flags

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

REPO = Path(train.__file__).resolve().parent
SCRIPTS = REPO / "scripts"
RUN = ["--n_gpu", "0", "--n_epoch", "1", "--batch_size", "8", "--gradient_accumulation_steps", "2",
       "--log_interval", "4", "--checkpoint_interval", "4", "--seed", "0"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (links as their target, folders as empty entries)."""
    return {
        str(path.relative_to(folder)): (
            f"-> {os.readlink(path)}".encode() if path.is_symlink() else b"" if path.is_dir() else path.read_bytes()
        )
        for path in sorted(folder.rglob("*"))
    }


def one_line_failure(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return error_line(result.stderr)


def script(name: str, *args: object, **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=child_env(REPO), **options)


@pytest.fixture(scope="module")
def data_copy(family_inputs, tmp_path_factory) -> Path:
    """The first 40 sequences of the gpt2 data: 5 batches, a run of a few seconds."""
    copy = tmp_path_factory.mktemp("data") / "data.pickle"
    with open(family_inputs["gpt2"]["data_file"], "rb") as handle:
        copy.write_bytes(pickle.dumps(pickle.load(handle)[:40]))
    return copy


def gpt2_argv(family_inputs, dump: Path, data: Path, *extra: str) -> list[str]:
    return [*with_flags(base_argv(family_inputs, "gpt2", dump), {"--data_file": str(data)}), *RUN, *extra]


@pytest.fixture(scope="module")
def finished_run(family_inputs, data_copy, tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("finished") / "run"
    train.main(gpt2_argv(family_inputs, dump, data_copy))
    assert (dump / "training_state.pth").is_file()
    return dump


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, symlinks=True)
    return copy


# ---------------------------------------------------------------- 1. quickstart --force and its own inputs


@pytest.mark.parametrize("flag", ["--text_file", "--teacher_name"])
def test_class1_quickstart_force_refuses_inputs_inside_its_output_dir(flag, teacher_dirs, tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "logs").mkdir()
    source = out / "data" / "train.txt"
    if flag == "--text_file":
        source.write_text("a line of text to train on\nanother line held out\n" * 20)
    else:
        source = out / "teacher"
        shutil.copytree(teacher_dirs["gpt2"], source)
    before = snapshot(out)
    result = subprocess.run(
        [sys.executable, quickstart.__file__, "--output_dir", str(out), "--force", flag, str(source)],
        capture_output=True, text=True, timeout=60, env=child_env(REPO),
    )
    assert "holds " + flag in one_line_failure(result)
    assert snapshot(out) == before


# ---------------------------------------------------------------- 2. scripts over their own inputs


def test_class2_token_counts_refuses_to_write_over_its_data(family_inputs, tmp_path):
    data = tmp_path / "data.pickle"
    shutil.copy(family_inputs["gpt2"]["data_file"], data)
    before = data.read_bytes()
    result = script("token_counts.py", "--data_file", data, "--token_counts_dump", data, "--vocab_size", 300)
    assert "is the same path as --data_file" in one_line_failure(result)
    assert data.read_bytes() == before


@pytest.mark.parametrize("model_type", ["gpt2", "auto"])
def test_class2_extract_refuses_to_write_into_its_teacher(model_type, teacher_dirs, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dirs["gpt2"], teacher)
    before = snapshot(teacher)
    target = teacher if model_type == "auto" else teacher / "model.safetensors"
    result = script("extract.py", "--model_type", model_type, "--model_name", teacher, "--dump_checkpoint", target,
                    "--layers", 0)
    assert "--model_name" in one_line_failure(result)
    assert snapshot(teacher) == before


# ---------------------------------------------------------------- 3. one rename


def test_class3_the_previous_run_is_set_aside_whole_in_one_rename(run_copy, family_inputs, data_copy, capsys,
                                                                  monkeypatch):
    """A kill at any moment finds the previous run whole in one place: its folder is renamed once, not entry
    by entry, and it is the set-aside sibling until the new run's first training state."""
    before = snapshot(run_copy)
    set_aside = run_copy.with_name("run.previous-run")
    renames, seen_aside = [], []
    original_rename = os.rename

    def rename(src, dst):
        renames.append((Path(src), Path(dst)))
        return original_rename(src, dst)

    def train_step(distiller, previous_run):
        seen_aside.append(snapshot(set_aside))
        raise KeyboardInterrupt  # a Ctrl-C before the first checkpoint

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(train.Distiller, "train", train_step)
    status, stderr = run_main(gpt2_argv(family_inputs, run_copy, data_copy, "--force"), capsys)
    assert status == 130
    assert seen_aside == [before]
    moved_out = [(src, dst) for src, dst in renames if src.parent == run_copy]
    assert moved_out == [] and renames[0] == (run_copy, set_aside)
    assert snapshot(run_copy) == before and not set_aside.exists()


# ---------------------------------------------------------------- 4. links are never followed


@pytest.mark.parametrize("where", ["inside", "beside"])
def test_class4_a_set_aside_link_is_never_followed(where, run_copy, family_inputs, data_copy, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("not a run")
    link = run_copy / ".previous-run" if where == "inside" else run_copy.with_name("run.previous-run")
    link.symlink_to(other)
    before, other_before = snapshot(run_copy), snapshot(other)
    argv = with_flags(gpt2_argv(family_inputs, run_copy, data_copy, "--force"), {"--alpha_ce": "1e38"})
    status, stderr = run_main(argv, capsys)  # a loss that overflows: the run fails before its first checkpoint
    assert status == 1 and ("is not finite" in error_line(stderr) or "is a link" in error_line(stderr))
    assert snapshot(other) == other_before
    assert snapshot(run_copy) == before
    assert link.is_symlink()


# ---------------------------------------------------------------- 5. model files alone are no run


def test_class5_force_refuses_a_model_folder_no_run_wrote(teacher_dirs, family_inputs, data_copy, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(teacher_dirs["gpt2"], model)  # config.json, model.safetensors, tokenizer files
    before = snapshot(model)
    status, stderr = run_main(gpt2_argv(family_inputs, model, data_copy, "--force"), capsys)
    assert status == 1 and "--force replaces only a previous run's folder" in error_line(stderr)
    assert snapshot(model) == before


def test_class5_a_run_from_before_markers_is_replaced_with_a_warning(run_copy, family_inputs, data_copy, capsys,
                                                                       caplog, monkeypatch):
    (run_copy / ".distillation-run.json").unlink(missing_ok=True)
    monkeypatch.setattr(train.Distiller, "train", lambda distiller, previous_run: previous_run.discard())
    status, _ = run_main(gpt2_argv(family_inputs, run_copy, data_copy, "--force"), capsys)
    assert status == 0 and "replacing it as a run from before markers" in caplog.text
    assert sorted(p.name for p in run_copy.iterdir()) == [
        ".distillation-run.json", "data_fingerprint.json", "git_log.json", "parameters.json"
    ]


# ---------------------------------------------------------------- 6. restore before clean-up


def test_class6_a_failing_clean_up_still_restores_the_previous_run(run_copy, family_inputs, data_copy, capsys,
                                                                   monkeypatch):
    def full_disk_close(writer):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "close", full_disk_close)
    before = snapshot(run_copy)
    argv = with_flags(gpt2_argv(family_inputs, run_copy, data_copy, "--force"), {"--alpha_ce": "1e38"})
    status, stderr = run_main(argv, capsys)
    assert status == 1 and error_line(stderr)
    assert snapshot(run_copy) == before
    assert not run_copy.with_name("run.previous-run").exists()


# ---------------------------------------------------------------- 7. failed writes are one line


def test_class7_tensorboard_on_a_full_disk_is_one_line(family_inputs, data_copy, tmp_path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full_disk)
    status, stderr = run_main(gpt2_argv(family_inputs, tmp_path / "run", data_copy), capsys)
    line = error_line(stderr)
    assert status == 1 and line.startswith("error: could not write") and "No space left on device" in line


def _file_size_limit(n_bytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, resource.RLIM_INFINITY))


def test_class7_extract_auto_on_a_full_disk_is_one_line(teacher_dirs, tmp_path):
    target = tmp_path / "student"
    result = script("extract.py", "--model_type", "auto", "--model_name", teacher_dirs["gpt2"], "--dump_checkpoint",
                    target, "--layers", 0, preexec_fn=_file_size_limit(4096))
    assert one_line_failure(result).startswith(f"error: could not write {str(target)!r}")
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- 8. JSON validated by type


def test_class8_parameters_json_that_is_a_list_is_one_line(run_copy, family_inputs, data_copy, capsys):
    (run_copy / "parameters.json").write_text("[1, 2]")
    before = snapshot(run_copy)
    status, stderr = run_main(gpt2_argv(family_inputs, run_copy, data_copy, "--resume"), capsys)
    line = error_line(stderr)
    assert status == 1 and "parameters.json" in line and "not a JSON object" in line
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("damage, fragment", [
    ("tokenizer_config_list", "tokenizer_config.json holds a list"),
    ("model_max_length_string", "field 'model_max_length' is a string"),
    ("vocab_not_utf8", "vocab.txt is not UTF-8"),
])
def test_class8_a_damaged_teacher_folder_is_one_line_naming_file_and_field(
    damage, fragment, teacher_dirs, family_inputs, data_copy, tmp_path, capsys
):
    kind = "bert" if damage == "vocab_not_utf8" else "gpt2"
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dirs[kind], teacher)
    config_file = teacher / "tokenizer_config.json"
    if damage == "tokenizer_config_list":
        config_file.write_text('["not", "an", "object"]')
    elif damage == "model_max_length_string":
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_max_length": "512"}))
    else:  # a WordPiece vocabulary read from vocab.txt, with a byte that is not UTF-8
        vocab = json.loads((teacher / "tokenizer.json").read_text())["model"]["vocab"]
        (teacher / "tokenizer.json").unlink()
        (teacher / "vocab.txt").write_bytes("\n".join(sorted(vocab, key=vocab.get)).encode() + b"\n\xff\xfe\n")
    argv = with_flags(base_argv(family_inputs, kind, tmp_path / "run"), {"--teacher_name": str(teacher)}) + RUN
    status, stderr = run_main(argv, capsys)
    assert status == 1 and fragment in error_line(stderr) and "--teacher_name" in error_line(stderr)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 9. the final export, tried first


def test_class9_what_the_final_save_would_refuse_stops_the_run_before_it_starts(
    run_copy, family_inputs, data_copy, tmp_path, capsys, monkeypatch
):
    config = json.loads(Path(family_inputs["gpt2"]["student_config"]).read_text())
    student_config = tmp_path / "student.json"
    student_config.write_text(json.dumps({**config, "pad_token_id": -1}))  # the generation config refuses it
    trained = []
    monkeypatch.setattr(train.Distiller, "step", lambda *args, **kwargs: trained.append(1))
    before = snapshot(run_copy)
    argv = with_flags(gpt2_argv(family_inputs, run_copy, data_copy, "--force"), {"--student_config": str(student_config)})
    status, stderr = run_main(argv, capsys)
    assert status == 1 and "could not be saved as a model folder" in error_line(stderr)
    assert trained == [] and snapshot(run_copy) == before


# ---------------------------------------------------------------- 10. --resume and changed data


def test_class10_resume_refuses_data_that_changed(run_copy, family_inputs, data_copy, capsys):
    original = data_copy.read_bytes()
    sequences = pickle.loads(original)
    changed = [np.concatenate([seq[:1], seq[1:-1][::-1], seq[-1:]]) for seq in sequences]  # the same lengths
    assert any((a != b).any() for a, b in zip(changed, sequences))
    before = snapshot(run_copy)
    try:
        data_copy.write_bytes(pickle.dumps(changed))
        status, stderr = run_main(gpt2_argv(family_inputs, run_copy, data_copy, "--resume"), capsys)
    finally:
        data_copy.write_bytes(original)
    line = error_line(stderr)
    assert status == 1 and "--data_file" in line and "not the data this run started on" in line and "--force" in line
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------- 11. sizes and signals


def test_class11_a_student_of_100000_layers_is_refused_before_it_is_built(family_inputs, data_copy, tmp_path, capsys):
    config = json.loads(Path(family_inputs["gpt2"]["student_config"]).read_text())
    student_config = tmp_path / "student.json"
    student_config.write_text(json.dumps({**config, "n_layer": 100_000}))
    argv = with_flags(gpt2_argv(family_inputs, tmp_path / "run", data_copy), {"--student_config": str(student_config)})
    status, stderr = run_main(argv, capsys)
    assert status == 1 and "times the size of its teacher" in error_line(stderr)
    assert not (tmp_path / "run").exists()


def test_class11_token_counts_refuses_a_vocabulary_beyond_memory(family_inputs, tmp_path):
    result = script("token_counts.py", "--data_file", family_inputs["gpt2"]["data_file"], "--token_counts_dump",
                    tmp_path / "counts.pickle", "--vocab_size", 10**11)
    assert "--vocab_size 100000000000 needs about" in one_line_failure(result)
    assert not (tmp_path / "counts.pickle").exists()


def test_class11_a_6_gb_file_of_one_line_is_refused_without_reading_it_whole(teacher_dirs, tmp_path):
    huge = tmp_path / "one_line.txt"
    with open(huge, "wb") as handle:  # sparse: 6 GB of NUL characters and no line break, no disk used
        handle.truncate(6 * 10**9)
    limit = 3 * 2**30  # the child may not take 3 GiB of address space: reading the line whole would fail
    result = script("binarized_data.py", "--file_path", huge, "--tokenizer_type", "gpt2", "--tokenizer_name",
                    teacher_dirs["gpt2"], "--dump_file", tmp_path / "out",
                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert "line 1 is longer than" in one_line_failure(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one_line.txt"]


def test_class11_sighup_saves_the_training_state_like_sigterm(family_inputs, data_copy, tmp_path):
    dump = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fault_injection.py"), *gpt2_argv(family_inputs, dump, data_copy)],
        env={**child_env(REPO), "FAULT": "sighup@1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 128 + signal.SIGHUP, result.stderr[-3000:]
    assert "stopped by SIGHUP" in error_line(result.stderr)
    state = torch.load(dump / "training_state.pth", weights_only=True)
    assert state["counters"]["n_total_iter"] == 2  # the next optimizer step after iteration 1
