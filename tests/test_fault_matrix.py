"""The fault matrix (issue 21): every command-line tool x every write stage x {kill -9, SIGTERM, SIGHUP, full
disk, read-only folder}, through tests/fault_injection.py in a child process.

A stage is the moment just before one rename lands a file or moves a run folder (`<fault>@move=NAME#K`).
Each case starts from a previous result of the tool in place and asserts the invariant:
- every file that existed before is byte-identical (for train.py: in --dump_path, or whole in the set-aside
  sibling a kill left), or the new complete result exists, or (train.py, after its first training state)
  a run that `--resume` completes;
- the tool failed with no traceback (one `error:` line, or a signal's status);
- a rerun (`--force` or `--resume` for train.py, the same command for the scripts) succeeds with the complete
  result.

The full set is marked `fault_matrix` (`python -m pytest -q -m fault_matrix tests`); the default run samples
two cases.
"""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from cli_checks import base_argv, child_env, with_flags

REPO = Path(train.__file__).resolve().parent
FAULTS = ("kill9", "sigterm", "sighup", "full", "readonly")
SIGNAL_STATUSES = {-9, -15, -1, 129, 143}
TRAIN_RUN = ["--n_gpu", "0", "--n_epoch", "1", "--batch_size", "8", "--gradient_accumulation_steps", "2",
             "--log_interval", "2", "--checkpoint_interval", "2"]

# (tool, NAME#K): the rename a fault precedes. Train: setting the previous run aside, its records, the first
# checkpoint, the first training state, the final weights and the exported model folder.
STAGES = (
    ("binarized_data", "data.tiny-gpt2-teacher.pickle#1"),
    ("token_counts", "counts.pickle#1"),
    ("convert_to_mmap", "data.ids.npy#1"),
    ("extract", "student.pth#1"),
    ("extract", "student.json#1"),
    ("extract_distilbert", "student.pth#1"),
    ("extract_auto", "model.safetensors#1"),
    ("evaluation", "figures.json#1"),
    ("train", "run.previous-run#1"),
    ("train", "parameters.json#1"),
    ("train", "checkpoint.pth#1"),
    ("train", "training_state.pth#1"),
    ("train", "pytorch_model.bin#1"),
    ("train", "model.safetensors#1"),
)
SAMPLED = {("train", "training_state.pth#1", "kill9"), ("token_counts", "counts.pickle#1", "full")}
CASES = [
    pytest.param(tool, stage, fault, id=f"{tool}-{stage.split('#')[0]}-{fault}",
                 marks=() if (tool, stage, fault) in SAMPLED else pytest.mark.fault_matrix)
    for tool, stage in STAGES for fault in FAULTS
]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, but the temporaries a kill may leave (`.*.tmp`, files or folders)."""
    return {
        str(path.relative_to(folder)): b"" if path.is_dir() else path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if not any(part.startswith(".") and part.endswith(".tmp") for part in path.relative_to(folder).parts)
    }


def content(folder: Path) -> dict[str, bytes]:
    """`snapshot`, with torch.save files as their tensors' bytes: the archive names its records after the
    temporary file it was written to, so two saves of the same tensors differ in bytes."""
    files = snapshot(folder)
    for name in files:
        if name.endswith(".pth"):
            state = torch.load(folder / name, weights_only=True)
            files[name] = b"".join(key.encode() + state[key].numpy().tobytes() for key in sorted(state))
    return files


class Tool:
    """A tool's command lines in a work folder: `first` makes the previous result, `command` the new one;
    `result` is the folder whose files the invariant is about."""

    def __init__(self, name: str, work: Path, inputs: dict):
        self.name, self.work = name, work
        self.result = work / "out"
        self.result.mkdir(parents=True, exist_ok=True)
        gpt2, out = inputs["gpt2"], self.result
        teacher, corpus, small = inputs["teacher"], inputs["corpus"], inputs["small_data"]
        scripts = REPO / "scripts"
        commands = {
            "binarized_data": lambda seed: [scripts / "binarized_data.py", "--file_path", corpus, "--tokenizer_type",
                                            "gpt2", "--tokenizer_name", teacher, "--dump_file", out / "data",
                                            "--seed", seed],
            "token_counts": lambda seed: [scripts / "token_counts.py", "--data_file",
                                          small if seed == 0 else gpt2["data_file"], "--token_counts_dump",
                                          out / "counts.pickle", "--vocab_size", 400],
            "convert_to_mmap": lambda seed: [scripts / "convert_to_mmap.py", "--data_file",
                                             small if seed == 0 else gpt2["data_file"], "--mmap_file",
                                             out / "data.ids.npy"],
            "extract": lambda seed: [scripts / "extract.py", "--model_type", "gpt2", "--model_name", teacher,
                                     "--dump_checkpoint", out / "student.pth", "--dump_config", out / "student.json",
                                     "--layers", seed],
            "extract_distilbert": lambda seed: [scripts / "extract_distilbert.py", "--model_type", "bert",
                                                "--model_name", inputs["bert_teacher"], "--dump_checkpoint",
                                                out / "student.pth", "--layers", seed],
            "extract_auto": lambda seed: [scripts / "extract.py", "--model_type", "auto", "--model_name", teacher,
                                          "--dump_checkpoint", out / "student", "--layers", seed],
            "evaluation": lambda seed: [REPO / "evaluation.py", "--data_file", small, "--student", teacher,
                                        "--tokenizer_name", teacher, "--seed", seed, "--max_sequences", 8 + seed,
                                        "--output_json", out / "figures.json"],
            "train": lambda seed: [REPO / "train.py", *with_flags(base_argv(inputs, "gpt2", out / "run"),
                                                                  {"--data_file": str(small)}),
                                   *TRAIN_RUN, "--seed", seed],
        }
        self.command = commands[name]
        if name == "train":
            self.result = out / "run"

    def run(self, seed: int, fault: str | None = None, record: Path | None = None, flags=()) -> subprocess.CompletedProcess:
        if self.name == "train":
            flags = flags or ["--force"]  # --resume takes its place
        command = [str(part) for part in self.command(seed)] + list(flags)
        env = child_env(REPO)
        env["PYTHONPATH"] += os.pathsep + str(REPO / "scripts")
        if fault is None:
            argv = [sys.executable, *command]
        else:
            argv = [sys.executable, str(REPO / "tests" / "fault_injection.py"), *command[1:]]
            env.update(FAULT=fault, FAULT_RECORD=str(record))
            if self.name != "train":
                env["FAULT_TOOL"] = command[0]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=self.work)


@pytest.fixture(scope="module")
def matrix_inputs(family_inputs, teacher_dirs, corpus_file, tmp_path_factory) -> dict:
    small = tmp_path_factory.mktemp("matrix") / "small.pickle"
    with open(family_inputs["gpt2"]["data_file"], "rb") as handle:
        small.write_bytes(pickle.dumps(pickle.load(handle)[:40]))
    return {**family_inputs, "teacher": teacher_dirs["gpt2"], "bert_teacher": teacher_dirs["bert"],
            "corpus": corpus_file, "small_data": small}


@pytest.fixture(scope="module")
def references(matrix_inputs, tmp_path_factory):
    """Per tool, made when first asked: (the previous result, the new result) of clean runs, seed 1 then seed 0."""
    done = {}

    def reference(tool: str) -> tuple[Path, Path]:
        if tool not in done:
            results = []
            for seed in (1, 0):
                runner = Tool(tool, tmp_path_factory.mktemp(f"reference-{tool}"), matrix_inputs)
                completed = runner.run(seed)
                assert completed.returncode == 0, completed.stderr[-3000:]
                results.append(runner.result)
            done[tool] = tuple(results)
        return done[tool]

    return reference


def undo_read_only(record: Path) -> None:
    for line in record.read_text().splitlines() if record.exists() else []:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", line], check=True)
        else:
            Path(line).chmod(0o755)


def complete_train_run(run: Path) -> bool:
    return all((run / name).is_file() for name in ("pytorch_model.bin", "model.safetensors", "config.json", "README.md"))


@pytest.mark.parametrize("tool, stage, fault", CASES)
def test_a_fault_at_any_write_loses_nothing(tool, stage, fault, matrix_inputs, references, tmp_path):
    previous, new = references(tool)
    runner = Tool(tool, tmp_path, matrix_inputs)
    shutil.rmtree(runner.result, ignore_errors=True)
    shutil.copytree(previous, runner.result)
    before = snapshot(runner.result)
    record = tmp_path / "read-only.txt"
    try:
        faulted = runner.run(0, f"{fault}@move={stage}", record)
    finally:
        undo_read_only(record)
    assert "Traceback" not in faulted.stderr, faulted.stderr[-3000:]
    if faulted.returncode not in (0, *SIGNAL_STATUSES):
        assert faulted.returncode == 1 and faulted.stderr.strip().splitlines()[-1].startswith("error: ")

    if tool == "train":
        set_aside = runner.result.with_name("run.previous-run")
        intact = snapshot(runner.result) == before or (set_aside.is_dir() and snapshot(set_aside) == before)
        resumable = (runner.result / "training_state.pth").is_file() and not complete_train_run(runner.result)
        assert intact or complete_train_run(runner.result) or resumable, faulted.stderr[-3000:]
        rerun = runner.run(0, flags=["--resume"] if resumable and not intact else [])
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert complete_train_run(runner.result) and not set_aside.exists()
    else:
        assert snapshot(runner.result) == before or content(runner.result) == content(new), faulted.stderr[-3000:]
        rerun = runner.run(0)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert content(runner.result) == content(new)
