"""Safe loading and safe writing: a crafted pickle is refused before anything in it runs, wherever the
project reads one (data, counts, held-out data, student weights, training state); a write that fails
leaves the previous file intact and ends the run with one line and a non-zero exit."""

import errno
import pickle
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

import assets
import evaluation
import training_state
from cli_checks import error_line, run_main
from token_data import TokenDataError, load_token_counts
from utils import UserError

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


class Payload:
    """Unpickling this calls open(path, "w"): what a poisoned file would do, creating `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, teacher_dirs):
    """Valid bert (MLM) and gpt2 (CLM) data, counts and student configs; `argv(kind, dump, **replaced)`
    (a value None adds a switch)."""
    root = tmp_path_factory.mktemp("safety_inputs")
    files = {}
    for kind, (start, end), student in (("bert", ("cls", "sep"), "distilbert"), ("gpt2", ("bos", "eos"), "gpt2")):
        vocab_size = AutoConfig.from_pretrained(teacher_dirs[kind]).vocab_size
        tokenizer = AutoTokenizer.from_pretrained(teacher_dirs[kind])
        start_id, end_id = (getattr(tokenizer, f"{role}_token_id") for role in (start, end))
        data = assets.make_sequences(24, 20, vocab_size, start_id, end_id, seed=5)
        files[kind] = {
            "--data_file": root / f"{kind}.pickle",
            "--token_counts": root / f"{kind}.counts.pickle",
            "--student_config": root / f"{kind}.json",
        }
        files[kind]["--data_file"].write_bytes(pickle.dumps(data))
        counts = np.bincount(np.concatenate(data), minlength=vocab_size).tolist()
        files[kind]["--token_counts"].write_bytes(pickle.dumps(counts))
        assets.student_config(student, vocab_size).to_json_file(files[kind]["--student_config"])

    def argv(kind: str, dump, **replaced: str) -> list[str]:
        flags = {**{flag: str(path) for flag, path in files[kind].items()}, **replaced}
        if kind == "bert":
            loss = ["--mlm", "--alpha_ce", "1.0", "--alpha_mlm", "1.0", "--alpha_clm", "0.0"]
            types = ["--student_type", "distilbert", "--teacher_type", "bert"]
        else:
            flags.pop("--token_counts")
            loss = ["--alpha_ce", "1.0", "--alpha_clm", "1.0"]
            types = ["--student_type", "gpt2", "--teacher_type", "gpt2"]
        return ["--dump_path", str(dump), "--teacher_name", str(teacher_dirs[kind]), *types, *loss,
                *[item for flag, value in flags.items() for item in ([flag] if value is None else [flag, value])],
                "--n_gpu", "0", "--n_epoch", "1",
                "--batch_size", "4", "--gradient_accumulation_steps", "1", "--checkpoint_interval", "2",
                "--seed", "1"]

    argv.files = files
    return argv


# ---------------------------------------------------------------- crafted pickles


@pytest.mark.parametrize(
    ("kind", "flag", "content"),
    [
        ("gpt2", "--data_file", lambda marker: [np.uint16([0, 5, 6, 0]), Payload(marker)]),  # refused at the payload
        ("bert", "--token_counts", lambda marker: [3, 1, Payload(marker)]),
        ("gpt2", "--eval_data_file", lambda marker: Payload(marker)),
    ],
)
def test_a_crafted_pickle_is_refused_and_runs_nothing(kind, flag, content, inputs, tmp_path, capsys):
    marker = tmp_path / "created_by_the_pickle"
    crafted = tmp_path / "crafted.pickle"
    crafted.write_bytes(pickle.dumps(content(marker)))
    status, stderr = run_main(inputs(kind, tmp_path / "dump", **{flag: str(crafted)}), capsys)
    assert status == 1
    line = error_line(stderr)
    assert line.startswith(f"error: could not read {flag}: '{crafted}' is not a list of token")
    assert "refusing to load io.open" in line
    assert not marker.exists()
    assert not (tmp_path / "dump").exists()


def test_evaluation_refuses_a_crafted_data_file(teacher_dirs, tmp_path):
    marker = tmp_path / "created_by_the_pickle"
    crafted = tmp_path / "crafted.pickle"
    crafted.write_bytes(pickle.dumps([Payload(marker)]))
    with pytest.raises(UserError, match="could not read --data_file: .*refusing to load io.open"):
        evaluation.main(["--data_file", str(crafted), "--student", str(teacher_dirs["gpt2"]),
                         "--tokenizer_name", str(teacher_dirs["gpt2"])])
    assert not marker.exists()


def test_crafted_weights_and_training_states_are_refused(inputs, tmp_path, capsys):
    marker = tmp_path / "created_by_the_pickle"
    weights = tmp_path / "student.pth"
    torch.save({"transformer.wte.weight": Payload(marker)}, weights)
    status, stderr = run_main(inputs("gpt2", tmp_path / "dump", **{"--student_pretrained_weights": str(weights)}),
                              capsys)
    assert status == 1 and "could not read --student_pretrained_weights" in error_line(stderr)
    with pytest.raises(UserError, match="could not load weights"):
        evaluation.load_model(str(weights), str(inputs.files["gpt2"]["--student_config"]))

    torch.save({"format": 1, "student": Payload(marker)}, tmp_path / training_state.TRAINING_STATE)
    with pytest.raises(UserError, match="is not a readable training state"):
        training_state.load_training_state(tmp_path)
    assert not marker.exists()


def test_token_counts_reader_accepts_only_a_list_of_ints(tmp_path):
    path = tmp_path / "counts.pickle"
    path.write_bytes(pickle.dumps([0, 7, 2**40]))
    assert load_token_counts(path) == [0, 7, 2**40]
    for content, message in [
        ({"a": 1}, "it holds a dict"),
        ([], "holds no counts"),
        ([1, 2.0], "its items are float, int"),
        ([1, -2], "a negative count"),
        (np.arange(3), "refusing to load numpy"),
    ]:
        path.write_bytes(pickle.dumps(content))
        with pytest.raises(TokenDataError, match=message):
            load_token_counts(path)


# ---------------------------------------------------------------- failed writes


def test_a_failed_write_keeps_the_previous_checkpoint_and_the_run_can_resume(inputs, tmp_path, monkeypatch, capsys):
    dump = tmp_path / "dump"
    real_save, checkpoints = torch.save, []

    def save(obj, path, *args, **kwargs):
        if str(path).split("/")[-1].startswith(".checkpoint.pth."):
            checkpoints.append({name: value.clone() for name, value in obj.items()})
            if len(checkpoints) == 2:
                real_save(obj, path, *args, **kwargs)  # half-written, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    status, stderr = run_main(inputs("gpt2", dump), capsys)
    monkeypatch.undo()
    assert status == 1
    assert error_line(stderr) == f"error: could not write '{dump / 'checkpoint.pth'}': No space left on device"
    kept = torch.load(dump / "checkpoint.pth", weights_only=True)
    assert kept.keys() == checkpoints[0].keys()
    assert all(torch.equal(kept[name], value) for name, value in checkpoints[0].items())
    assert not [path.name for path in dump.iterdir() if path.name.endswith(".tmp")]

    # A path that cannot become a file: the resumed run fails at its first write, the state stays.
    state_before = (dump / training_state.TRAINING_STATE).read_bytes()
    (dump / "config.json").unlink()
    (dump / "config.json").mkdir()
    status, stderr = run_main(inputs("gpt2", dump, **{"--resume": None}), capsys)
    assert status == 1
    assert error_line(stderr).startswith(f"error: could not write '{dump / 'config.json'}': Is a directory")
    assert (dump / training_state.TRAINING_STATE).read_bytes() == state_before

    shutil.rmtree(dump / "config.json")
    status, stderr = run_main(inputs("gpt2", dump, **{"--resume": None}), capsys)
    assert status == 0, stderr[-3000:]
    assert (dump / "pytorch_model.bin").exists()
