"""The second step's --output_dir, for both task scripts: --overwrite_output_dir replaces only a previous run of the
same script (marked), whole, and never a folder of the user's other files; a failed run puts the previous one back;
a failed tensorboard write is one line. (The fault matrix puts the same folders through kills, signals, a full disk and a read-only folder.)"""

import errno
import os
from pathlib import Path

import pytest

import glue_assets
import run_glue_w_distillation
import run_squad_w_distillation
import squad_assets
import task_training
from cli_checks import error_line
from run_folder import MARKER
from test_fault_matrix import snapshot

SQUAD_RUN = ["--max_seq_length", "32", "--doc_stride", "8", "--max_query_length", "12", "--no_cuda",
             "--per_gpu_train_batch_size", "8", "--max_steps", "1", "--save_steps", "1"]
GLUE_RUN = ["--no_cuda", "--max_seq_length", "32", "--max_steps", "1", "--per_gpu_train_batch_size", "4",
            "--save_steps", "50"]


@pytest.fixture(scope="module")
def commands(tmp_path_factory, tokenizer_dirs) -> dict:
    """Per script: (main, argv for an --output_dir, with --overwrite_output_dir)."""
    root = tmp_path_factory.mktemp("task-output-dir")
    squad_assets.write_squad(root / "squad" / "train-v1.1.json", squad_assets.make_squad(4, 0))
    squad_assets.write_squad(root / "squad" / "dev-v1.1.json", squad_assets.make_squad(2, 1))
    glue_assets.write_glue_task(root / "glue", "mrpc", n_train=8, n_dev=4)
    model = squad_assets.build_qa_model("bert", root / "model", tokenizer_dirs["bert"])
    common = ["--model_type", "bert", "--model_name_or_path", str(model), "--do_train", "--do_eval",
              "--overwrite_output_dir"]
    return {
        "squad": (run_squad_w_distillation.main,
                  lambda out: [*common, "--output_dir", str(out), "--data_dir", str(root / "squad"), *SQUAD_RUN]),
        "glue": (run_glue_w_distillation.main,
                 lambda out: [*common, "--output_dir", str(out), "--data_dir", str(root / "glue"), *GLUE_RUN]),
    }


def run(main, argv: list[str], capsys) -> tuple[int, str]:
    try:
        task_training.run_script(main, argv)
    except SystemExit as exit_info:
        return exit_info.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


@pytest.mark.parametrize("script", ["squad", "glue"])
def test_overwrite_replaces_a_previous_run_whole_and_never_other_files(script, commands, tmp_path, capsys):
    main, argv = commands[script]
    out = tmp_path / "out"
    assert run(main, argv(out), capsys)[0] == 0
    first_marker = (out / MARKER).read_bytes()
    (out / "checkpoint-999").mkdir()  # what the previous run had and this one does not write
    assert run(main, argv(out), capsys)[0] == 0
    assert not (out / "checkpoint-999").exists() and (out / MARKER).read_bytes() != first_marker
    assert (out / "model.safetensors").is_file() and not out.with_name("out.previous-run").exists()

    # A folder of the user's own files, even beside a model: refused in one line, untouched.
    own = tmp_path / "own"
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    (own / "config.json").write_text("{}")
    before = snapshot(own)
    status, stderr = run(main, argv(own), capsys)
    assert status == 1 and "--overwrite_output_dir replaces only a previous run's folder" in error_line(stderr)
    assert "notes.txt" in error_line(stderr) and snapshot(own) == before


@pytest.mark.parametrize("script", ["squad", "glue"])
def test_a_run_that_fails_puts_the_previous_run_back(script, commands, tmp_path, capsys, monkeypatch):
    main, argv = commands[script]
    out = tmp_path / "out"
    assert run(main, argv(out), capsys)[0] == 0
    before = snapshot(out)

    def failing_train(args, *rest, **kwargs):
        (Path(args.output_dir) / "checkpoint-1").mkdir()  # a first write, then the failure
        raise task_training.UserError("a failure during training")

    monkeypatch.setattr(run_squad_w_distillation.task_training, "train", failing_train)
    monkeypatch.setattr(run_glue_w_distillation, "train", failing_train)
    status, stderr = run(main, argv(out), capsys)
    assert status == 1 and error_line(stderr) == "error: a failure during training"
    assert snapshot(out) == before and not out.with_name("out.previous-run").exists()


@pytest.mark.parametrize("failing", ["__init__", "add_scalar", "close"])
def test_a_failed_tensorboard_write_is_one_line(failing, commands, tmp_path, capsys, monkeypatch):
    main, argv = commands["squad"]

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(task_training.SummaryWriter, failing, no_space)
    status, stderr = run(main, [*argv(tmp_path / "out"), "--logging_steps", "1"], capsys)
    runs = tmp_path / "out" / task_training.LOG_DIR
    assert status == 1 and error_line(stderr) == f"error: could not write {str(runs)!r}: No space left on device"
    assert "Traceback" not in stderr
