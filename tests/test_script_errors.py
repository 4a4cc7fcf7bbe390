"""Every script's failures at the edges are one line: writes that fail, and flag values that cannot work.

Write faults are real, not mocked: the scripts run in a child process whose file size limit is
lowered (RLIMIT_FSIZE, with SIGXFSZ ignored, so a write past it fails with EFBIG as on a full disk)
and which has given up the capabilities that let root write anywhere (CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH), so that a folder of mode 0o555 refuses it as it refuses any user. Tests run
as root here and in CI, where chmod alone would not stop a write.

Run as a script, this file is that child: it reads its cases as JSON on stdin and prints the exit
status and stderr of each on stdout.
"""

import ctypes
import importlib
import io
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import traceback
from contextlib import redirect_stderr
from pathlib import Path

FILE_SIZE_LIMIT = 4096  # bytes: below every output of the cases, above nothing else the scripts write
SCRIPTS = ("binarized_data", "binarized_data_mmap", "token_counts", "convert_to_mmap", "extract", "extract_distilbert")
FAULTS = {  # what the single error line must say
    "full_disk": "could not write",  # and for torch.save and safetensors, "is the disk full?"
    "unwritable_folder": "cannot write in folder",
    "parent_is_file": "is a file, not a folder",
}


# ---------------------------------------------------------------- the child


def give_up_root_file_access() -> None:
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that file modes bind this process even as root."""
    if os.geteuid() != 0:
        return

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Sets(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, sets = Header(0x20080522, 0), (Sets * 2)()  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    if libc.capget(ctypes.byref(header), sets) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    keep = ~(1 << 1 | 1 << 2) & 0xFFFFFFFF  # all but CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2)
    sets[0].effective &= keep
    sets[0].permitted &= keep
    if libc.capset(ctypes.byref(header), sets) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def run_cases_under_faults(cases: dict[str, list]) -> dict[str, tuple[int | str, str]]:
    """Run each case `{name: [module, argv]}` as its command line would, under the faults; (status, stderr)."""
    from cli_utils import run_cli

    give_up_root_file_access()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    results = {}
    for name, (module, argv) in cases.items():
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            try:
                run_cli(importlib.import_module(module).main, argv)
                status = 0
            except SystemExit as exit_info:
                status = exit_info.code
            except BaseException:  # what `python scripts/<module>.py` would show as a traceback
                traceback.print_exc()
                status = "traceback"
        results[name] = (status, stderr.getvalue())
    return results


if __name__ == "__main__":
    print(json.dumps(run_cases_under_faults(json.load(sys.stdin))))
    sys.exit(0)


# ---------------------------------------------------------------- the tests

import numpy as np  # noqa: E402  (the child above needs none of these)
import pytest  # noqa: E402

from token_data import dump_token_id_arrays, mmap_files  # noqa: E402


def outputs_and_argv(script: str, folder: Path, inputs: dict[str, Path]) -> tuple[list[Path], list[str]]:
    """The files `script` writes into `folder`, and its module and command line."""
    if script.startswith("binarized_data"):
        output_format = "mmap" if script.endswith("mmap") else "pickle"
        written = folder / f"b.tiny-bert.{'ids.npy' if output_format == 'mmap' else 'pickle'}"
        argv = ["--file_path", str(inputs["text"]), "--tokenizer_name", str(inputs["bert_tokenizer"]),
                "--dump_file", str(folder / "b"), "--format", output_format, "--seed", "0"]
        return (list(mmap_files(written).values()) if output_format == "mmap" else [written]), argv
    if script == "token_counts":
        written = folder / "counts.pickle"
        return [written], ["--data_file", str(inputs["data"]), "--token_counts_dump", str(written),
                           "--vocab_size", "30522"]
    if script == "convert_to_mmap":
        written = folder / "data.ids.npy"
        return list(mmap_files(written).values()), ["--data_file", str(inputs["data"]), "--mmap_file", str(written)]
    kind, suffix = ("roberta", "pth") if script == "extract" else ("bert", "safetensors")
    written = folder / f"student.{suffix}"
    return [written], ["--model_type", kind, "--model_name", str(inputs[f"{kind}_teacher"]),
                       "--dump_checkpoint", str(written), "--layers", "0", "1"]


def prepare_write_faults(root: Path, inputs: dict[str, Path]) -> tuple[dict[str, list], dict[str, tuple]]:
    """Every script under every write fault: the child's cases, and {case: (output folder, its files' bytes)}.

    The folder's files before the run are the earlier outputs the failed run must leave as they were.
    """
    cases, folders = {}, {}
    for script in SCRIPTS:
        for fault in FAULTS:
            folder = root / script / fault
            written, argv = outputs_and_argv(script, folder, inputs)
            folder.parent.mkdir(parents=True, exist_ok=True)
            if fault == "parent_is_file":
                folder.write_text("a file where the output folder should be\n")
            else:
                folder.mkdir()
                for path in written:
                    path.write_bytes(f"earlier {path.name}".encode())
            before = {path: path.read_bytes() for path in folder.iterdir()} if folder.is_dir() else {}
            if fault == "unwritable_folder":
                folder.chmod(0o555)
            module = "binarized_data" if script.startswith("binarized_data") else script
            cases[f"{script}/{fault}"] = [module, argv]
            folders[f"{script}/{fault}"] = (folder, before)
    return cases, folders


def damaged_teachers(root: Path, teacher_dir: Path) -> dict[str, Path]:
    """Copies of a saved BERT teacher, each damaged in one way."""
    damaged = {}
    for damage in DAMAGED_TEACHERS:
        folder = damaged[damage] = root / damage
        shutil.copytree(teacher_dir, folder)
        weights = folder / "model.safetensors"
        if damage == "truncated_safetensors":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif damage == "empty_safetensors":
            weights.write_bytes(b"")
        elif damage == "config_not_json":
            (folder / "config.json").write_text('{"model_type": "bert", "hidden_size": 32,')
        elif damage == "config_not_an_object":
            (folder / "config.json").write_text('["bert", 32]')
        else:  # weights that safe loading refuses: a pickle that calls os.system
            weights.unlink()
            (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"bert.embeddings": RunsCode()}))
    return damaged


class RunsCode:
    def __reduce__(self):
        return os.system, ("echo this ran",)


DAMAGED_TEACHERS = {  # what the error line must say
    "truncated_safetensors": "damaged or truncated safetensors file",
    "empty_safetensors": "damaged or truncated safetensors file",
    "config_not_json": "is not a valid JSON file",
    "config_not_an_object": "config.json holds a list, not a JSON object",
    "unsafe_weights": "refused by safe loading, the file holds more than tensors",
}
UNREACHABLE_HUB_NAMES = {  # a name the hub would have to serve, with HF_HUB_OFFLINE=1 in the child
    "binarized_data": ["--tokenizer_name", "no-such-org/no-such-tokenizer"],
    "extract": ["--model_type", "gpt2", "--model_name", "no-such-org/no-such-model"],
    "extract_distilbert": ["--model_name", "no-such-model"],
}


@pytest.fixture(scope="module")
def child_runs(tmp_path_factory, repo_root, corpus_file, tokenizer_dirs, teacher_dirs):
    """Every case of this file that needs the faults, run in one child process (one import of torch).

    Returns {case: (exit status, stderr)} and, for the write faults, {case: (folder, files before)}.
    """
    root = tmp_path_factory.mktemp("child_runs")
    rng = np.random.default_rng(0)
    data = root / "data.pickle"
    with open(data, "wb") as handle:
        dump_token_id_arrays([rng.integers(0, 30522, 40).astype(np.uint16) for _ in range(200)], handle)
    inputs = {"text": corpus_file, "bert_tokenizer": tokenizer_dirs["bert"], "data": data,
              "bert_teacher": teacher_dirs["bert"], "roberta_teacher": teacher_dirs["roberta"]}
    cases, folders = prepare_write_faults(root / "faults", inputs)
    for damage, teacher in damaged_teachers(root / "teachers", teacher_dirs["bert"]).items():
        out = root / "damaged" / damage
        out.mkdir(parents=True)
        cases[f"damaged/{damage}"] = ["extract_distilbert", ["--model_name", str(teacher), "--layers", "0", "1",
                                                            "--dump_checkpoint", str(out / "student.pth")]]
        folders[f"damaged/{damage}"] = (out, {})
    for script, argv in UNREACHABLE_HUB_NAMES.items():
        out = root / "hub" / script
        out.mkdir(parents=True)
        output_flag = ["--file_path", str(corpus_file), "--dump_file", str(out / "b")] if script == "binarized_data" \
            else ["--dump_checkpoint", str(out / "student.pth")]
        cases[f"hub/{script}"] = [script, [*argv, *output_flag]]
        folders[f"hub/{script}"] = (out, {})
    env = {**os.environ, "PYTHONPATH": str(repo_root / "scripts"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.run([sys.executable, __file__], input=json.dumps(cases), capture_output=True, text=True,
                           env=env, timeout=300, check=True)
    return json.loads(child.stdout), folders


def one_error_line(status: int | str, stderr: str) -> str:
    """The single `error: ...` line of a run that failed with status 1 and no traceback."""
    assert status == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def files_in(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.iterdir()} if folder.is_dir() else {}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_failed_write_is_one_line_and_leaves_the_earlier_files(child_runs, script, fault):
    results, folders = child_runs
    line = one_error_line(*results[f"{script}/{fault}"])
    folder, before = folders[f"{script}/{fault}"]
    assert FAULTS[fault] in line and folder.name in line, line
    assert files_in(folder) == before  # the earlier outputs intact, and no temporary file left


@pytest.mark.parametrize("damage", sorted(DAMAGED_TEACHERS))
def test_a_damaged_teacher_is_one_line_and_writes_nothing(child_runs, damage):
    results, folders = child_runs
    status, stderr = results[f"damaged/{damage}"]
    line = one_error_line(status, stderr)
    assert f"{damage}'" in line and DAMAGED_TEACHERS[damage] in line, line
    assert "weights_only" not in line and "this ran" not in stderr
    assert files_in(folders[f"damaged/{damage}"][0]) == {}


@pytest.mark.parametrize("script", sorted(UNREACHABLE_HUB_NAMES))
def test_a_hub_name_that_cannot_be_loaded_says_how_to_fail_at_once(child_runs, script):
    results, folders = child_runs
    line = one_error_line(*results[f"hub/{script}"])
    assert UNREACHABLE_HUB_NAMES[script][-1] in line and "HF_HUB_OFFLINE=1 makes this fail at once" in line, line
    assert files_in(folders[f"hub/{script}"][0]) == {}


# ---------------------------------------------------------------- flag values that cannot work

import binarized_data  # noqa: E402
import convert_to_mmap  # noqa: E402
import extract  # noqa: E402
import extract_distilbert  # noqa: E402
import token_counts  # noqa: E402

IMPOSSIBLE_FLAGS = [
    (binarized_data, ["--workers", "0"], "argument --workers: must be >= 1, got 0"),
    (binarized_data, ["--batch_size", "0"], "argument --batch_size: must be >= 1, got 0"),
    (binarized_data, ["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (binarized_data, ["--workers", "two"], "argument --workers: expected an integer, got 'two'"),
    (token_counts, ["--vocab_size", "0"], "argument --vocab_size: must be >= 1, got 0"),
    (token_counts, ["--vocab_size", "3e4"], "argument --vocab_size: expected an integer, got '3e4'"),
    (convert_to_mmap, ["--data_file", "x.pickle", "--mmap_files", "y"], "unrecognized arguments: --mmap_files y"),
    (extract, ["--layers", "0", "-2"], "argument --layers: must be >= 0, got -2"),
    (extract_distilbert, ["--layers", "zero"], "argument --layers: expected an integer, got 'zero'"),
    (extract, ["--model_type", "xlnet"], "argument --model_type: invalid choice: 'xlnet'"),
]


@pytest.mark.parametrize(("script", "argv", "message"), IMPOSSIBLE_FLAGS,
                         ids=[f"{script.__name__} {' '.join(argv)}" for script, argv, _ in IMPOSSIBLE_FLAGS])
def test_impossible_flag_values_are_one_line_before_any_work(script, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # every default output would land here
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert stderr.startswith(f"error: {message}") and stderr.count("\n") == 1, stderr
    assert list(tmp_path.iterdir()) == []
