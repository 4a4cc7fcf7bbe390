"""train.py and evaluation.py at the edges, through the real CLIs: a failed start loses nothing (with --force a
previous run stays byte for byte), ids are checked against the vocabulary, nothing non-finite reaches a
checkpoint, two runs started together into one folder, --force only over a previous run, starting weights
and training states that do not fit, write failures, damaged model inputs."""

import json
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
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import assets
import evaluation
import train
from cli_checks import base_argv, child_env, error_line, run_cli, run_main, with_flags
from scripts.cli_flags import ArgumentParser
from utils import UserError, run_command

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

SMALL_RUN = ["--n_gpu", "0", "--n_epoch", "1", "--batch_size", "8", "--gradient_accumulation_steps", "2",
             "--log_interval", "4", "--checkpoint_interval", "4", "--seed", "0"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, by relative path (folders as empty entries)."""
    return {str(path.relative_to(folder)): b"" if path.is_dir() else path.read_bytes() for path in folder.rglob("*")}


def bert_argv(family_inputs, dump_path, *extra: str) -> list[str]:
    return [*base_argv(family_inputs, "bert", dump_path), *SMALL_RUN, *extra]


@pytest.fixture(scope="module")
def previous_run(family_inputs, tmp_path_factory) -> Path:
    """A finished bert -> distilbert run with a held-out evaluation: what --force must not lose on a failed start."""
    dump = tmp_path_factory.mktemp("previous") / "run"
    argv = bert_argv(family_inputs, dump, "--eval_data_file", family_inputs["bert"]["data_file"])
    train.main(argv)
    assert (dump / "training_state.pth").is_file() and (dump / "README.md").is_file()
    return dump


@pytest.fixture
def run_copy(previous_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(previous_run, copy)
    return copy


# ---------------------------------------------------------------- bad inputs of every kind, one class


def _ids_file(tmp_path, family_inputs, bad_id: int, dtype=np.uint16, mmap: bool = False) -> str:
    """The bert data with one id replaced by `bad_id` (pickle, or the memory-mapped format)."""
    sequences = pickle.loads(Path(family_inputs["bert"]["data_file"]).read_bytes())
    sequences = [seq.astype(dtype) for seq in sequences]
    sequences[3][5] = bad_id
    if not mmap:
        path = tmp_path / "bad_ids.pickle"
        path.write_bytes(pickle.dumps(sequences))
        return str(path)
    prefix = tmp_path / "bad_ids"
    np.save(f"{prefix}.ids.npy", np.concatenate(sequences))
    np.save(f"{prefix}.offsets.npy", np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64))
    np.save(f"{prefix}.order.npy", np.arange(len(sequences), dtype=np.int64))
    return f"{prefix}.ids.npy"


def _weights_of_teacher(family_inputs, teacher_dirs, tmp_path, kind: str) -> str:
    return str(teacher_dirs[kind])  # a save_pretrained folder of another model: none of the student's names


def _training_state_as_weights(family_inputs, teacher_dirs, tmp_path, previous_run) -> str:
    return str(previous_run / "training_state.pth")


def _nan_student_weights(family_inputs, tmp_path) -> str:
    config = assets.student_config("distilbert", family_inputs["bert"]["vocab_size"])
    state = assets.MODEL_CLASSES["distilbert"](config).state_dict()
    state["distilbert.embeddings.word_embeddings.weight"][0, 0] = float("nan")
    path = tmp_path / "nan_student.pth"
    torch.save(state, path)
    return str(path)


def _config_file(tmp_path, text: str) -> str:
    path = tmp_path / "student.json"
    path.write_text(text)
    return str(path)


def _truncated_teacher(teacher_dirs, tmp_path) -> str:
    damaged = tmp_path / "damaged-teacher"
    shutil.copytree(teacher_dirs["bert"], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(damaged)


def _truncated_student(family_inputs, tmp_path) -> str:
    """A save_pretrained student folder whose model.safetensors was cut in half."""
    folder = tmp_path / "truncated-student"
    config = assets.student_config("distilbert", family_inputs["bert"]["vocab_size"])
    assets.MODEL_CLASSES["distilbert"](config).save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(folder)


BAD_STARTS = {
    # name: (flags replaced or added, given the fixtures; fragment of the one error line)
    "learning_rate nan": (lambda f: {"--learning_rate": "nan"}, "--learning_rate must be a finite number"),
    "negative adam_epsilon": (lambda f: {"--adam_epsilon": "-0.000001"}, "--adam_epsilon must be > 0"),
    "mlm_smoothing nan": (lambda f: {"--mlm_smoothing": "nan"}, "--mlm_smoothing must be a finite number"),
    "max_grad_norm nan": (lambda f: {"--max_grad_norm": "nan"}, "--max_grad_norm must be a finite number"),
    "alpha_ce inf": (lambda f: {"--alpha_ce": "inf"}, "--alpha_ce must be a finite number"),
    "negative weight_decay": (lambda f: {"--weight_decay": "-0.1"}, "--weight_decay must be in [0, 1000]"),
    "learning rate beyond float32's reach": (lambda f: {"--learning_rate": "3e38"}, "--learning_rate must be in"),
    "negative seed": (lambda f: {"--seed": "-1"}, "--seed must be in [0, 4.29497e+09]"),
    "mlm_mask_prop 2": (lambda f: {"--mlm_mask_prop": "2"}, "--mlm_mask_prop must be in (0, 1]"),
    "id beyond the vocabulary": (
        lambda f: {"--data_file": _ids_file(f.tmp_path, f.inputs, f.vocab)}, "outside the vocabulary of"),
    "id beyond the vocabulary, mmap": (
        lambda f: {"--data_file": _ids_file(f.tmp_path, f.inputs, f.vocab + 7, mmap=True)}, "holds token id"),
    "negative id": (
        lambda f: {"--data_file": _ids_file(f.tmp_path, f.inputs, -4, dtype=np.int32)}, "holds token id -4"),
    "held-out id beyond the vocabulary": (
        lambda f: {"--eval_data_file": _ids_file(f.tmp_path, f.inputs, 60000)}, "--eval_data_file"),
    "weights of a gpt2": (
        lambda f: {"--student_pretrained_weights": str(f.teachers["gpt2"])}, "holds only 0 of the student's"),
    "the teacher's own checkpoint": (
        lambda f: {"--student_pretrained_weights": str(f.teachers["bert"])}, "holds only 0 of the student's"),
    "a training state as weights": (
        lambda f: {"--student_pretrained_weights": str(f.previous / "training_state.pth")},
        "holds only 0 of the student's"),
    "NaN in the starting weights": (
        lambda f: {"--student_pretrained_weights": _nan_student_weights(f.inputs, f.tmp_path)}, "non-finite values"),
    "config not a JSON object": (
        lambda f: {"--student_config": _config_file(f.tmp_path, "[1, 2]")}, "could not read --student_config"),
    "heads not dividing the width": (
        lambda f: {"--student_config": _config_file(
            f.tmp_path, json.dumps({"vocab_size": f.vocab, "dim": 30, "n_heads": 4, "n_layers": 1, "hidden_dim": 8}))},
        "could not build the student"),
    "truncated student weights": (
        lambda f: {"--student_pretrained_weights": _truncated_student(f.inputs, f.tmp_path)},
        "could not read --student_pretrained_weights"),
    "truncated teacher weights": (
        lambda f: {"--teacher_name": _truncated_teacher(f.teachers, f.tmp_path)}, "could not load a bert teacher"),
    "weights that safe loading refuses": (
        lambda f: {"--student_pretrained_weights": _bytes_file(f.tmp_path, "s.pth", b"not a checkpoint")},
        "not a torch.save file of tensors that safe loading accepts"),
    "temperature that overflows": (lambda f: {"--temperature": "1e-300"}, "--temperature must be in [0.001, 1000]"),
    "student of zero width": (lambda f: _student_config_with(f, dim=0), "could not build the student"),
    "student of zero layers": (lambda f: _student_config_with(f, n_layers=0), "it needs at least 1"),
    "config field of the wrong type": (
        lambda f: _student_config_with(f, n_layers="two"), "could not read --student_config"),
    "accumulation beyond the whole run": (
        lambda f: {"--gradient_accumulation_steps": "100000"}, "the student would never be updated"),
    "one batch of everything, accumulated over two": (
        lambda f: {"--batch_size": "100000"}, "exceeds the number of batches in the whole run, 1 (--n_epoch 1 x 1 per epoch)"),
    # Failures that only training reveals: the previous run is set aside, then put back.
    "a loss that overflows in the first steps": (lambda f: {"--alpha_ce": "1e38"}, "is not finite at iteration 2"),
    "smoothing that leaves nothing to mask": (lambda f: {"--mlm_smoothing": "1e300"}, "loss_mlm is not finite"),
}


def _bytes_file(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _student_config_with(f, **fields) -> dict[str, str]:
    config = json.loads(Path(f.inputs["bert"]["student_config"]).read_text())
    return {"--student_config": _config_file(f.tmp_path, json.dumps({**config, **fields}))}


class _Fixtures:
    def __init__(self, tmp_path, inputs, teachers, previous):
        self.tmp_path, self.inputs, self.teachers, self.previous = tmp_path, inputs, teachers, previous
        self.vocab = inputs["bert"]["vocab_size"]


@pytest.mark.parametrize("case", sorted(BAD_STARTS))
def test_a_failed_start_with_force_leaves_the_previous_run_intact(
    case, run_copy, previous_run, family_inputs, teacher_dirs, tmp_path, capsys
):
    flags, fragment = BAD_STARTS[case]
    before = snapshot(run_copy)
    argv = with_flags(bert_argv(family_inputs, run_copy, "--force"),
                      flags(_Fixtures(tmp_path, family_inputs, teacher_dirs, previous_run)))
    status, stderr = run_main(argv, capsys)
    assert status != 0
    assert fragment in error_line(stderr)
    assert snapshot(run_copy) == before


def test_a_run_killed_before_its_first_checkpoint_keeps_the_previous_run_for_the_next_force(
    run_copy, family_inputs, repo_root, capsys
):
    """--force sets the previous run aside until the new one checkpoints: a kill in between leaves it set
    aside; the next --force that fails puts it back byte for byte, one that trains deletes it."""
    before = snapshot(run_copy)
    argv = bert_argv(family_inputs, run_copy, "--force")
    killed = subprocess.run(
        [sys.executable, str(repo_root / "tests" / "fault_injection.py"), *argv],
        env={**child_env(repo_root), "FAULT": "sigkill@1"}, capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    set_aside = run_copy.with_name(run_copy.name + ".previous-run")  # the whole previous run, renamed once
    assert not (run_copy / "training_state.pth").exists()
    assert snapshot(set_aside) == before

    status, stderr = run_main(with_flags(argv, {"--alpha_ce": "1e38"}), capsys)
    assert status == 1 and "is not finite" in error_line(stderr)
    assert snapshot(run_copy) == before

    status, _ = run_main(argv, capsys)
    assert status == 0
    assert not set_aside.exists()
    assert torch.load(run_copy / "training_state.pth", weights_only=True)["counters"]["n_total_iter"] > 0


def test_an_impossible_flag_of_evaluation_and_quick_usage_errors_are_one_line(capsys):
    parser = ArgumentParser(prog="x")
    parser.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--n", "x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
    for flags in (["--mask_prop", "2"], ["--batch_size", "0"], ["--seed", "-3"], ["--mask_prop", "nan"]):
        with pytest.raises(SystemExit) as exit_info:
            evaluation.build_parser().parse_args(["--data_file", "d", "--student", "s", "--tokenizer_name", "t", *flags])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: argument " + flags[0]) and err.count("\n") == 1, err


def test_a_hub_name_that_cannot_be_reached_says_how_to_fail_fast(family_inputs, tmp_path):
    argv = with_flags([*base_argv(family_inputs, "gpt2", tmp_path / "dump"), *SMALL_RUN],
                      {"--teacher_name": "no-such-org/no-such-teacher"})
    result = run_cli(argv, cwd=tmp_path, env={**child_env(Path(train.__file__).parent), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert "no-such-org/no-such-teacher" in error_line(result.stderr) and "HF_HUB_OFFLINE=1" in error_line(result.stderr)


# ---------------------------------------------------------------- ids against the vocabulary, in evaluation.py


@pytest.mark.parametrize(("bad_id", "dtype", "mmap"), [(400, np.uint16, False), (-1, np.int32, False),
                                                       (1000, np.uint16, True)])
def test_evaluation_refuses_ids_outside_the_vocabulary(bad_id, dtype, mmap, family_inputs, teacher_dirs, tmp_path):
    data_file = _ids_file(tmp_path, family_inputs, bad_id, dtype=dtype, mmap=mmap)
    argv = ["--data_file", data_file, "--student", str(teacher_dirs["bert"]), "--tokenizer_name",
            str(teacher_dirs["bert"])]
    with pytest.raises(UserError) as error:
        evaluation.main(argv)
    vocab = family_inputs["bert"]["vocab_size"]
    assert f"--data_file {data_file!r} holds token id {bad_id}, outside the vocabulary of {vocab} entries" in str(error.value)


def test_evaluation_refuses_a_truncated_model_in_one_line(family_inputs, teacher_dirs, tmp_path):
    student = _truncated_student(family_inputs, tmp_path)
    argv = ["--data_file", family_inputs["bert"]["data_file"], "--student", student, "--tokenizer_name",
            str(teacher_dirs["bert"])]
    with pytest.raises(UserError, match=f"could not load {student!r} as a distilbert model: .*deserializing"):
        evaluation.main(argv)
    with pytest.raises(UserError, match="could not load .* as a bert model"):
        evaluation.main([*argv[:3], str(teacher_dirs["bert"]), *argv[4:], "--teacher_name",
                         _truncated_teacher(teacher_dirs, tmp_path)])


def test_evaluation_command_reports_a_bad_id_in_one_line(family_inputs, teacher_dirs, tmp_path, capsys):
    data_file = _ids_file(tmp_path, family_inputs, 401)
    argv = ["--data_file", data_file, "--student", str(teacher_dirs["bert"]), "--tokenizer_name",
            str(teacher_dirs["bert"])]
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: evaluation.main(argv))  # what `python evaluation.py` runs
    assert exit_info.value.code == 1 and "holds token id 401" in error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- nothing non-finite reaches a checkpoint


def test_weights_that_overflow_stop_the_run_and_the_files_on_disk_are_finite(family_inputs, tmp_path, capsys):
    # The largest learning rate and decay the flags allow: each step multiplies the weights by -1e6, so within
    # a few steps they (or the logits, the loss, the gradients) leave float32's range.
    dump = tmp_path / "dump"
    argv = with_flags(bert_argv(family_inputs, dump), {"--learning_rate": "1e3", "--weight_decay": "1e3",
                                                       "--warmup_prop": "0", "--checkpoint_interval": "2"})
    status, stderr = run_main(argv, capsys)
    assert status == 1
    line = error_line(stderr)
    assert "is not finite at iteration" in line and "last good ones" in line
    for name in ("checkpoint.pth", "training_state.pth", "pytorch_model.bin", "model.safetensors"):
        if (dump / name).exists():
            state = torch.load(dump / name, weights_only=True)
            tensors = state["student"] if name == "training_state.pth" else state
            assert all(value.isfinite().all() for value in tensors.values() if value.is_floating_point()), name
    assert not (dump / "pytorch_model.bin").exists()


# ---------------------------------------------------------------- concurrent starts, --force over foreign folders


@pytest.mark.parametrize("force", [False, True], ids=["new folder", "both with --force over a previous run"])
def test_two_runs_started_together_into_one_folder(force, family_inputs, previous_run, tmp_path):
    dump = tmp_path / "run"
    if force:
        shutil.copytree(previous_run, dump)
    commands = [with_flags(base_argv(family_inputs, "gpt2", dump), {"--seed": str(seed), **({"--force": None} if force
                else {})}) + ["--n_gpu", "0", "--n_epoch", "1", "--batch_size", "8"] for seed in (11, 22)]
    env = {**child_env(Path(train.__file__).parent), "OMP_NUM_THREADS": "1"}
    script = str(Path(train.__file__))
    processes = [subprocess.Popen([sys.executable, script, *argv], cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, text=True) for argv in commands]
    results = [(process.wait(timeout=300), process.stderr.read()) for process in processes]
    statuses = sorted(status for status, _ in results)
    assert statuses == [0, 1], [stderr[-2000:] for _, stderr in results]
    winner = next(seed for (status, _), seed in zip(results, (11, 22)) if status == 0)
    loser_stderr = next(stderr for status, stderr in results if status == 1)
    assert any(reason in error_line(loser_stderr) for reason in ("is in use by another run", "already exists"))
    assert json.loads((dump / "parameters.json").read_text())["seed"] == winner
    assert (dump / "pytorch_model.bin").is_file() and (dump / "tokenizer.json").is_file()


@pytest.mark.parametrize("foreign", [".git", "train.py", "notes.txt", "src"])
def test_force_refuses_a_folder_that_holds_what_no_run_writes(foreign, run_copy, family_inputs, capsys):
    """A folder without a run marker (from before markers) that holds more than a run's files."""
    (run_copy / ".distillation-run.json").unlink()
    path = run_copy / foreign
    if foreign in (".git", "src"):
        path.mkdir()
        (path / "HEAD" if foreign == ".git" else path / "module.py").write_text("precious")
    else:
        path.write_text("precious")
    before = snapshot(run_copy)
    status, stderr = run_main(bert_argv(family_inputs, run_copy, "--force"), capsys)
    assert status == 1
    line = error_line(stderr)
    assert "--force replaces only a previous run's folder" in line and foreign in line
    assert snapshot(run_copy) == before


def test_force_over_an_empty_folder_trains(family_inputs, tmp_path, capsys):
    dump = tmp_path / "empty"
    dump.mkdir()
    status, _ = run_main(bert_argv(family_inputs, dump, "--force"), capsys)
    assert status == 0 and (dump / "pytorch_model.bin").is_file()


def test_a_dump_path_that_is_a_file_is_refused(family_inputs, tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("precious")
    status, stderr = run_main(bert_argv(family_inputs, target, "--force"), capsys)
    assert status == 1 and "is a file, not a folder" in error_line(stderr)
    assert target.read_text() == "precious"


# ---------------------------------------------------------------- a training state that does not fit


def _damage_state(state: dict, how: str) -> None:
    if how == "missing optimizer":
        del state["optimizer"]
    elif how == "weights of another shape":
        name = next(iter(state["student"]))
        state["student"][name] = torch.zeros(3, 3)
    elif how == "optimizer moments of another shape":
        moments = next(iter(state["optimizer"]["state"].values()))
        moments["exp_avg"] = torch.zeros(5)
    elif how == "negative epoch":
        state["position"]["epoch"] = -1
    elif how == "more batches done than the epoch has":
        state["position"]["batches_done"] = state["position"]["batches_per_epoch"] + 1
    elif how == "iterations disagree with the position":
        state["counters"]["n_total_iter"] += 3


@pytest.mark.parametrize("how", ["missing optimizer", "weights of another shape", "optimizer moments of another shape",
                                 "negative epoch", "more batches done than the epoch has",
                                 "iterations disagree with the position"])
def test_a_damaged_training_state_is_refused_and_nothing_changes(how, run_copy, family_inputs, capsys):
    state = torch.load(run_copy / "training_state.pth", weights_only=True)
    _damage_state(state, how)
    torch.save(state, run_copy / "training_state.pth")
    before = snapshot(run_copy)
    argv = bert_argv(family_inputs, run_copy, "--resume", "--eval_data_file", family_inputs["bert"]["data_file"])
    status, stderr = run_main(argv, capsys)
    assert status == 1
    assert "cannot be resumed" in error_line(stderr)
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------- write failures


def _limit_file_size(limit: int):
    def limit_in_child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG: a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_in_child


def test_a_full_disk_is_one_line_and_earlier_files_stay(family_inputs, tmp_path):
    dump = tmp_path / "dump"
    # checkpoint.pth fits, the larger training_state.pth (weights + optimizer moments) does not.
    checkpoint_size = len(pickle.dumps(0)) + 4 * sum(
        p.numel() for p in assets.MODEL_CLASSES["gpt2"](assets.student_config("gpt2", 400)).parameters())
    argv = [*base_argv(family_inputs, "gpt2", dump), *SMALL_RUN]
    result = run_cli(argv, cwd=tmp_path, preexec_fn=_limit_file_size(2 * checkpoint_size))
    assert result.returncode == 1
    assert "could not write" in error_line(result.stderr) and "training_state.pth" in error_line(result.stderr)
    assert torch.load(dump / "checkpoint.pth", weights_only=True)  # the earlier file, whole
    assert not [path.name for path in dump.iterdir() if path.name.endswith(".tmp")]


@pytest.mark.parametrize("where", ["parent is a file", "read-only filesystem"])
def test_an_unwritable_dump_path_is_one_line(where, family_inputs, tmp_path, capsys):
    if where == "parent is a file":
        (tmp_path / "a_file").write_text("precious")
        dump = tmp_path / "a_file" / "run"
    else:
        dump = Path("/sys/distillation_run")  # sysfs: nothing can be created there, root included
    status, stderr = run_main([*base_argv(family_inputs, "gpt2", dump), *SMALL_RUN], capsys)
    assert status == 1
    assert error_line(stderr).startswith(f"error: could not write {str(dump)!r}")


# ---------------------------------------------------------------- the finished folder is a complete model


def test_the_run_folder_holds_a_model_card(previous_run, family_inputs):
    card = (previous_run / "README.md").read_text()
    assert family_inputs["bert"]["teacher_name"] in card and family_inputs["bert"]["data_file"] in card
    assert "loss weights ce 5.0, mlm 2.0, cos 1.0" in card
    steps = torch.load(previous_run / "training_state.pth", weights_only=True)["counters"]["n_optimizer_steps"]
    assert f"{steps} optimizer steps" in card
    assert "last evaluation" in card and "perplexity" in card


def test_gpt2_student_generates_token_ids(family_inputs, tmp_path, capsys):
    from transformers import pipeline

    dump = tmp_path / "gpt2"
    status, _ = run_main([*base_argv(family_inputs, "gpt2", dump), *SMALL_RUN], capsys)
    assert status == 0
    model, info = AutoModelForCausalLM.from_pretrained(dump, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys"))
    assert not json.loads((dump / "config.json").read_text()).get("output_hidden_states")
    generation = json.loads((dump / "generation_config.json").read_text())
    assert {"output_hidden_states", "output_attentions", "use_cache"}.isdisjoint(generation) and generation["eos_token_id"] == 0
    ids = torch.tensor([[0, 5, 6, 7]])
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert isinstance(generated, torch.Tensor) and generated.shape == (1, 8) and torch.equal(generated[:, :4], ids)
    text = pipeline("text-generation", model=str(dump))("the teacher", max_new_tokens=3, do_sample=False)
    assert text[0]["generated_text"].startswith("the teacher")
    assert set(load_file(dump / "model.safetensors")) <= set(model.state_dict())

