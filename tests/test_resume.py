"""Runs that survive: an interrupted run resumed with --resume ends bit for bit where an uninterrupted
run ends, weights and tensorboard curves, in one process (MLM: masking and dropout draw random numbers)
and in two gloo processes under torchrun (CLM with dropout).

Interruptions come from tests/fault_injection.py or a monkeypatch: a crash after a checkpoint that fell
inside an accumulation window whose end crosses an epoch end (the resumed run re-runs the window), a
SIGTERM (the run stops at the next optimizer step, every process agreeing), a SIGKILL of one of two
ranks (the other ends with an error, without a launcher to stop it), a SIGKILL in the middle of a
checkpoint write (the previous files stay loadable).
"""

import logging
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, DistilBertForMaskedLM

import assets
import train
from cli_checks import child_env, error_line, free_port, run_main
from distiller import EpochRandomSampler
from training_state import TRAINING_STATE

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

# 40 sequences of 4: 10 batches per epoch in one process, 5 per rank in two. Windows of 3 micro-batches
# cross epoch ends, and checkpoints every 4 iterations fall inside windows.
RUN_FLAGS = ["--n_gpu", "0", "--n_epoch", "3", "--batch_size", "4", "--gradient_accumulation_steps", "3",
             "--checkpoint_interval", "4", "--log_interval", "1", "--warmup_prop", "0.2", "--learning_rate", "2e-3",
             "--seed", "3"]


class Crash(Exception):
    """Stands for a process dying at a given iteration, in-process."""


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs use one intra-op thread, as the subprocesses do (OMP_NUM_THREADS=1): CPU kernels
    may round differently with another number of threads, and runs are compared bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def training_state(dump) -> dict:
    return torch.load(dump / TRAINING_STATE, weights_only=True)


def assert_same_weights(dump, reference) -> None:
    final = torch.load(dump / "pytorch_model.bin", weights_only=True)
    expected = torch.load(reference / "pytorch_model.bin", weights_only=True)
    assert final.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(final[name], value), name


def scalars(dump) -> dict[str, list[tuple[int, float]]]:
    """Every tensorboard scalar as [(step, value)] (what a reader shows after the resume's purge), but the
    wall-clock ones. epoch/loss is logged at step = epoch, beyond the purge's reach: a resume that
    re-runs an epoch end logs its (identical) point again, so it is compared without repeats."""
    events = EventAccumulator(str(dump / "log" / "train"), size_guidance={"scalars": 0})
    events.Reload()
    series = {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if not tag.startswith("global/")
    }
    series["epoch/loss"] = list(dict.fromkeys(series["epoch/loss"]))
    return series


def assert_resumed_run_equals(dump, reference) -> None:
    assert_same_weights(dump, reference)
    assert scalars(dump) == scalars(reference)
    assert not [path.name for path in dump.iterdir() if path.name.endswith(".tmp")]


def after_iteration(monkeypatch, iteration: int, action) -> None:
    """Call `action()` right after micro-batch `iteration` of any Distiller in this process."""
    original = train.Distiller.step

    def step(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.n_total_iter == iteration:
            action()

    monkeypatch.setattr(train.Distiller, "step", step)


# ---------------------------------------------------------------- one process, in this process


@pytest.fixture(scope="module")
def mlm_argv(tmp_path_factory, teacher_dirs):
    """bert -> distilbert MLM flags (student with dropout, initialised at random) for a dump path."""
    root = tmp_path_factory.mktemp("resume_inputs")
    vocab_size = AutoConfig.from_pretrained(teacher_dirs["bert"]).vocab_size
    tokenizer = AutoTokenizer.from_pretrained(teacher_dirs["bert"])
    data = assets.make_sequences(40, 20, vocab_size, tokenizer.cls_token_id, tokenizer.sep_token_id, seed=2)
    (root / "data.pickle").write_bytes(pickle.dumps(data))
    (root / "counts.pickle").write_bytes(pickle.dumps(np.bincount(np.concatenate(data), minlength=vocab_size).tolist()))
    assets.student_config("distilbert", vocab_size).to_json_file(root / "student.json")

    def argv(dump_path, *extra: str) -> list[str]:
        return [
            "--dump_path", str(dump_path), "--data_file", str(root / "data.pickle"),
            "--token_counts", str(root / "counts.pickle"), "--student_type", "distilbert",
            "--student_config", str(root / "student.json"), "--teacher_type", "bert",
            "--teacher_name", str(teacher_dirs["bert"]), "--mlm", "--alpha_ce", "2.0", "--alpha_mlm", "1.0",
            "--alpha_cos", "1.0", "--alpha_clm", "0.0", *RUN_FLAGS, *extra,
        ]

    return argv


@pytest.fixture(scope="module")
def reference(mlm_argv, tmp_path_factory):
    """The uninterrupted run."""
    dump = tmp_path_factory.mktemp("reference") / "dump"
    train.main(mlm_argv(dump))
    return dump


def test_a_crash_inside_an_accumulation_window_resumes_bit_exact(mlm_argv, reference, tmp_path, monkeypatch, capsys,
                                                                 caplog):
    caplog.set_level(logging.INFO, logger="distillation")
    dump = tmp_path / "dump"

    def crash():
        raise Crash

    after_iteration(monkeypatch, 11, crash)
    with pytest.raises(Crash):
        train.main(mlm_argv(dump))
    # Saved last at the end of epoch 0 (iteration 10), inside the window of iterations 10-12:
    # the state is the window's start, batch 9 of epoch 0.
    state = training_state(dump)
    assert state["position"] == {"epoch": 0, "batches_done": 9, "seed": 3, "batches_per_epoch": 10}
    assert (state["counters"]["n_total_iter"], state["counters"]["n_optimizer_steps"]) == (9, 3)

    monkeypatch.undo()
    status, stderr = run_main(mlm_argv(dump, "--resume"), capsys)
    assert status == 0, stderr[-3000:]
    assert "Resuming at iteration 9 (optimizer step 3), epoch 0, after 9 of its 10 batches" in caplog.text
    assert_resumed_run_equals(dump, reference)


def test_sigterm_saves_the_state_at_the_next_optimizer_step_and_exits_143(mlm_argv, reference, tmp_path,
                                                                        monkeypatch, capsys):
    dump = tmp_path / "dump"
    handler_before = signal.getsignal(signal.SIGTERM)
    after_iteration(monkeypatch, 13, lambda: os.kill(os.getpid(), signal.SIGTERM))
    status, stderr = run_main(mlm_argv(dump), capsys)
    assert status == 143
    assert error_line(stderr) == (
        f"error: stopped by SIGTERM at iteration 15; the training state is saved in '{dump}': run the same "
        "command with --resume (and without --force) to continue"
    )
    assert signal.getsignal(signal.SIGTERM) is handler_before
    assert training_state(dump)["counters"]["n_total_iter"] == 15  # the optimizer step after the signal
    assert torch.load(dump / "checkpoint.pth", weights_only=True).keys() == training_state(dump)["student"].keys()

    monkeypatch.undo()
    # --checkpoint_interval may change on resume: it decides when files are written, not what is computed.
    status, stderr = run_main(mlm_argv(dump, "--resume", "--checkpoint_interval", "7"), capsys)
    assert status == 0, stderr[-3000:]
    assert_resumed_run_equals(dump, reference)


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(mlm_argv, reference, repo_root, tmp_path, capsys,
                                                                caplog):
    caplog.set_level(logging.INFO, logger="distillation")
    dump = tmp_path / "dump"
    process = subprocess.Popen(
        [sys.executable, str(repo_root / "tests" / "fault_injection.py"), *mlm_argv(dump)],
        env={**child_env(repo_root), "FAULT": f"pause@{TRAINING_STATE}#2"}, stderr=subprocess.PIPE, text=True,
    )
    paused = dump / f"{TRAINING_STATE}.paused"
    deadline = time.time() + 120
    while not paused.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert paused.exists(), process.stderr.read()[-3000:] if process.poll() is not None else "timed out"
    process.kill()
    process.communicate()
    paused.unlink()

    # The second save (iteration 8) was half-written: the first one (iteration 4, window start 3) is intact.
    leftovers = [path.name for path in dump.iterdir() if path.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{TRAINING_STATE}.")
    assert training_state(dump)["counters"]["n_total_iter"] == 3
    torch.load(dump / "checkpoint.pth", weights_only=True)

    status, stderr = run_main(mlm_argv(dump, "--resume"), capsys)
    assert status == 0, stderr[-3000:]
    assert f"Removed the temporaries of interrupted writes: {leftovers}" in caplog.text
    assert_resumed_run_equals(dump, reference)


def test_resume_refuses_changed_flags_and_deletes_nothing(mlm_argv, reference, tmp_path, capsys):
    before = {path.name: path.stat().st_mtime_ns for path in reference.iterdir()}
    status, stderr = run_main(mlm_argv(reference, "--resume", "--learning_rate", "1e-3", "--seed", "4",
                                       "--log_interval", "2"), capsys)
    assert status == 1
    assert error_line(stderr) == (
        "error: --resume: --learning_rate (run: 0.002, now: 0.001), --seed (run: 3, now: 4) differ from the run's "
        "parameters.json; pass the run's values (only --log_interval, --checkpoint_interval, --eval_interval, "
        "--eval_data_file, --fp16_opt_level, --dist_timeout, --num_workers, --compile may change)"
    )
    status, stderr = run_main(mlm_argv(reference, "--resume", "--force"), capsys)
    assert status == 1 and "pass only one of them" in error_line(stderr)
    assert {path.name: path.stat().st_mtime_ns for path in reference.iterdir()} == before

    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    status, stderr = run_main(mlm_argv(not_a_run, "--resume"), capsys)
    assert status == 1 and "parameters.json' does not exist" in error_line(stderr)
    (not_a_run / "parameters.json").write_text((reference / "parameters.json").read_text())
    status, stderr = run_main(mlm_argv(not_a_run, "--resume"), capsys)
    assert status == 1 and f"holds no {TRAINING_STATE} yet" in error_line(stderr)
    assert [path.name for path in not_a_run.iterdir()] == ["parameters.json"]


def test_a_narrower_student_resumes_bit_exact_with_its_hidden_projection(mlm_argv, teacher_dirs, tmp_path, monkeypatch,
                                                                       capsys):
    """A student half the teacher's width: the cosine loss goes through a projection that trains, is saved in the
    training state and restored from it, and is never part of the exported student."""
    config = assets.student_config("distilbert", AutoConfig.from_pretrained(teacher_dirs["bert"]).vocab_size, hidden=16)
    config.to_json_file(tmp_path / "narrow.json")
    narrow = ["--student_config", str(tmp_path / "narrow.json")]
    reference, dump = tmp_path / "reference", tmp_path / "dump"
    train.main(mlm_argv(reference, *narrow))

    def crash():
        raise Crash

    after_iteration(monkeypatch, 11, crash)
    with pytest.raises(Crash):
        train.main(mlm_argv(dump, *narrow))
    projection = training_state(dump)["loss"]["hidden_projection.weight"]
    assert projection.shape == (32, 16)
    monkeypatch.undo()
    status, stderr = run_main(mlm_argv(dump, "--resume", *narrow), capsys)
    assert status == 0, stderr[-3000:]
    assert_resumed_run_equals(dump, reference)
    final = training_state(dump)["loss"]["hidden_projection.weight"]
    assert torch.equal(final, training_state(reference)["loss"]["hidden_projection.weight"])
    assert not torch.equal(final, projection), "the projection did not train"

    exported = {name for name in safe_open(dump / "model.safetensors", "pt").keys()}
    student_keys = set(DistilBertForMaskedLM(config).state_dict())
    assert exported <= student_keys and not any("hidden_projection" in name for name in exported)
    assert torch.load(dump / "pytorch_model.bin", weights_only=True).keys() == student_keys


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    def order(seed: int, epoch: int) -> list[int]:
        sampler = EpochRandomSampler(range(50), seed=seed)
        torch.rand(3)  # the global generator plays no part
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 1) == order(0, 1)
    assert sorted(order(0, 1)) == list(range(50))
    assert len({tuple(order(0, epoch)) for epoch in range(3)}) == 3  # a new shuffle every epoch
    assert order(0, 1) != order(1, 1)


# ---------------------------------------------------------------- two gloo processes


@pytest.fixture(scope="module")
def clm_argv(tmp_path_factory, teacher_dirs):
    """gpt2 -> gpt2 CLM flags (student with dropout) for a dump path."""
    return assets.gpt2_clm_argv(tmp_path_factory.mktemp("ddp_resume_inputs"), teacher_dirs["gpt2"], RUN_FLAGS, 40, 20)


def torchrun(repo_root, cwd, script: str, argv: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(repo_root / script), *argv]
    variables = {**child_env(repo_root), **({"FAULT": fault} if fault else {})}
    return subprocess.run(command, cwd=cwd, env=variables, capture_output=True, text=True, timeout=300)


def test_two_processes_stopped_killed_and_resumed_end_bit_exact(clm_argv, repo_root, tmp_path):
    reference = tmp_path / "reference"
    result = torchrun(repo_root, tmp_path, "train.py", clm_argv(reference))
    assert result.returncode == 0, result.stderr[-3000:]

    # 1. SIGTERM reaches rank 1 alone after iteration 5: both ranks stop at the optimizer step of iteration 6.
    dump = tmp_path / "dump"
    result = torchrun(repo_root, tmp_path, "tests/fault_injection.py", clm_argv(dump), fault="sigterm@5:1")
    assert result.returncode != 0
    assert result.stderr.count("error: stopped by SIGTERM at iteration 6;") == 2, result.stderr[-3000:]
    assert training_state(dump)["counters"]["n_total_iter"] == 6
    assert len(training_state(dump)["rng"]) == 2

    # 2. Resumed without a launcher; rank 1 is killed after iteration 11, past the epoch end at 10, whose
    # state is the start of the window 9-11. Rank 0 must end with an error, not wait for it.
    port = free_port()
    ranks = []
    for rank in (0, 1):
        variables = {**child_env(repo_root), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                     "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                     "FAULT": "sigkill@11:1"}
        command = [sys.executable, str(repo_root / "tests" / "fault_injection.py"),
                   *clm_argv(dump, "--resume", "--dist_timeout", "60")]
        ranks.append(subprocess.Popen(command, cwd=tmp_path, env=variables, stderr=subprocess.PIPE, text=True))
    _, rank1_stderr = ranks[1].communicate(timeout=300)
    assert ranks[1].returncode == -signal.SIGKILL, rank1_stderr[-3000:]
    killed_at = time.time()
    _, rank0_stderr = ranks[0].communicate(timeout=90)
    assert time.time() - killed_at < 60, "rank 0 outlived --dist_timeout after rank 1 died"
    assert ranks[0].returncode == 1
    assert error_line(rank0_stderr).startswith("error: lost another process of the run")
    state = training_state(dump)
    assert (state["position"]["epoch"], state["position"]["batches_done"]) == (1, 4)
    assert state["counters"]["n_total_iter"] == 9

    # 3. Resumed under torchrun to the end.
    result = torchrun(repo_root, tmp_path, "train.py", clm_argv(dump, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_resumed_run_equals(dump, reference)
