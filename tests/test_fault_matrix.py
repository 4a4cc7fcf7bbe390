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

import glue_assets
import squad_assets
import train
from cli_checks import base_argv, child_env, with_flags
from run_folder import MARKER
from test_quickstart import REDUCED as QUICKSTART_RUN
from test_quickstart import markov_corpus

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
    ("squad", "squad.previous-run#1"),
    ("squad", "checkpoint-2#1"),
    ("squad", "model.safetensors#2"),
    ("squad", "predictions_.json#1"),
    ("squad", "eval_results.json#1"),
    ("glue", "glue.previous-run#1"),
    ("glue", "model.safetensors#1"),
    ("glue", "glue_table.md#1"),
    ("quickstart", "quickstart.previous-run#1"),
    ("quickstart", "results.json#1"),
)
# The tools that hold a run folder (train.py's --dump_path, the others' --output_dir): a previous result is set aside
# whole while they run, so the invariant is about that folder, and the new result is told complete by its files.
RUN_FOLDER_TOOLS = {
    "train": ("pytorch_model.bin", "model.safetensors", "config.json", "README.md"),
    "squad": ("model.safetensors", "checkpoint-2/model.safetensors", "predictions_.json", "eval_results.json"),
    "glue": ("model.safetensors", "eval_results.txt", "glue_results.json", "glue_table.md"),
    "quickstart": ("results.md", "results.json", "training_curves.png", "distilled/model.safetensors"),
}
SQUAD_RUN = ["--max_seq_length", "32", "--doc_stride", "8", "--max_query_length", "12", "--no_cuda", "--learning_rate",
             "1e-3", "--per_gpu_train_batch_size", "8", "--max_steps", "2", "--save_steps", "2", "--logging_steps", "1"]
GLUE_RUN = ["--no_cuda", "--max_seq_length", "32", "--num_train_epochs", "1", "--learning_rate", "1e-3",
            "--per_gpu_train_batch_size", "4", "--logging_steps", "50", "--save_steps", "50"]
SAMPLED = {("train", "training_state.pth#1", "kill9"), ("token_counts", "counts.pickle#1", "full"),
           ("squad", "checkpoint-2#1", "kill9")}
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


def second_step_commands(inputs: dict, out: Path) -> dict:
    """The commands of the tools that need `second_step_inputs`: each replaces its previous run in out/<tool>."""
    squad, glue, text_file = inputs["squad"], inputs["glue"], inputs["quickstart_text"]
    return {
        "squad": lambda seed: [REPO / "run_squad_w_distillation.py", "--model_type", "distilbert",
                               "--model_name_or_path", squad["student"], "--teacher_type", "bert",
                               "--teacher_name_or_path", squad["teacher"], "--output_dir", out / "squad", "--do_train",
                               "--do_eval", "--data_dir", squad["data"], "--overwrite_output_dir", *SQUAD_RUN,
                               "--seed", seed],
        "glue": lambda seed: [REPO / "run_glue_w_distillation.py", "--model_type", "bert", "--model_name_or_path",
                              squad["teacher"], "--data_dir", glue, "--output_dir", out / "glue", "--do_train",
                              "--do_eval", "--overwrite_output_dir", *GLUE_RUN, "--seed", seed],
        "quickstart": lambda seed: [REPO / "quickstart.py", "--output_dir", out / "quickstart", "--text_file",
                                    text_file, *QUICKSTART_RUN, "--seed", seed, "--force"],
    }


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
        if name in ("squad", "glue", "quickstart"):
            commands.update(second_step_commands(inputs, out))
        self.command = commands[name]
        if name in RUN_FOLDER_TOOLS:
            self.result = out / ("run" if name == "train" else name)

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
def second_step_inputs(matrix_inputs, tokenizer_dirs, tmp_path_factory) -> dict:
    """matrix_inputs and what the second step's scripts and the quickstart read: SQuAD files, a QA teacher and
    student, an MRPC folder, a text file."""
    root = tmp_path_factory.mktemp("second-step-inputs")
    squad_assets.write_squad(root / "squad" / "train-v1.1.json", squad_assets.make_squad(8, 0))
    squad_assets.write_squad(root / "squad" / "dev-v1.1.json", squad_assets.make_squad(3, 1))
    glue_assets.write_glue_task(root / "glue", "mrpc", n_train=16, n_dev=8)
    (root / "markov.txt").write_text("\n".join(markov_corpus()) + "\n", encoding="utf-8")
    squad = {"data": root / "squad",
             "teacher": squad_assets.build_qa_model("bert", root / "qa-teacher", tokenizer_dirs["bert"]),
             "student": squad_assets.build_qa_model("distilbert", root / "qa-student", tokenizer_dirs["bert"])}
    return {**matrix_inputs, "squad": squad, "glue": root / "glue", "quickstart_text": root / "markov.txt"}


@pytest.fixture(scope="module")
def references(matrix_inputs, tmp_path_factory, request):
    """Per tool, made when first asked: (the previous result, the new result) of clean runs, seed 1 then seed 0."""
    done = {}

    def reference(tool: str) -> tuple[Path, Path]:
        if tool not in done:
            results = []
            for seed in (1, 0):
                runner = Tool(tool, tmp_path_factory.mktemp(f"reference-{tool}"), inputs_of(tool, request))
                completed = runner.run(seed)
                assert completed.returncode == 0, completed.stderr[-3000:]
                results.append(runner.result)
            done[tool] = tuple(results)
        return done[tool]

    return reference


def inputs_of(tool: str, request) -> dict:
    """The inputs a tool's commands read (the second step's built only when a case of theirs runs)."""
    second_step = tool in ("squad", "glue", "quickstart")
    return request.getfixturevalue("second_step_inputs" if second_step else "matrix_inputs")


def undo_read_only(record: Path) -> None:
    for line in record.read_text().splitlines() if record.exists() else []:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", line], check=True)
        else:
            Path(line).chmod(0o755)


def complete_run(tool: str, run: Path, before: dict[str, bytes]) -> bool:
    """Whether `run` holds a new complete result: all of the tool's files, in a folder of a new run (its own marker,
    not the previous run's: a folder where the new run wrote over the previous one's files is not complete)."""
    marker = run / MARKER
    new_folder = marker.is_file() and marker.read_bytes() != before.get(MARKER)
    return new_folder and all((run / name).is_file() for name in RUN_FOLDER_TOOLS[tool])


@pytest.mark.parametrize("tool, stage, fault", CASES)
def test_a_fault_at_any_write_loses_nothing(tool, stage, fault, references, tmp_path, request):
    previous, new = references(tool)
    runner = Tool(tool, tmp_path, inputs_of(tool, request))
    shutil.rmtree(runner.result, ignore_errors=True)
    shutil.copytree(previous, runner.result)
    before = snapshot(runner.result)
    record = tmp_path / "read-only.txt"
    try:
        faulted = runner.run(0, f"{fault}@move={stage}", record)
    finally:
        undo_read_only(record)
    assert "Traceback" not in faulted.stderr, faulted.stderr[-3000:]
    assert faulted.returncode != 0, f"the fault never struck: no rename onto {stage}"
    if faulted.returncode not in SIGNAL_STATUSES:
        assert faulted.returncode == 1 and faulted.stderr.strip().splitlines()[-1].startswith("error: ")

    if tool in RUN_FOLDER_TOOLS:
        set_aside = runner.result.with_name(runner.result.name + ".previous-run")
        intact = snapshot(runner.result) == before or (set_aside.is_dir() and snapshot(set_aside) == before)
        resumable = (tool == "train" and (runner.result / "training_state.pth").is_file()
                     and not complete_run(tool, runner.result, before))
        assert intact or complete_run(tool, runner.result, before) or resumable, faulted.stderr[-3000:]
        rerun = runner.run(0, flags=["--resume"] if resumable and not intact else [])
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert complete_run(tool, runner.result, before) and not set_aside.exists()
    else:
        assert snapshot(runner.result) == before or content(runner.result) == content(new), faulted.stderr[-3000:]
        rerun = runner.run(0)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert content(runner.result) == content(new)
