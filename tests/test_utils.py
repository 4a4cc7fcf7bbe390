"""utils.py: git provenance that never fails a run, rank facts from every launcher's environment,
seeding, atomic writes and the error types."""

import json
import logging
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch

import utils
from utils import NonFiniteLossError, UserError, WriteError, atomic_write, git_log, init_gpu_params, set_seed

LAUNCHER_VARIABLES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "N_GPU_NODE", "N_NODES", "NODE_RANK",
)


# ---------------------------------------------------------------- git_log


def _git(repo, *args) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _read_git_log(folder) -> dict:
    return json.loads((folder / "git_log.json").read_text())


@pytest.fixture
def tiny_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "work")
    (repo / "code.py").write_text("print('hi')\n")
    _git(repo, "add", "code.py")
    _git(repo, "commit", "-q", "-m", "first")
    return repo


def test_git_log_records_sha_and_branch(tiny_repo, tmp_path):
    git_log(tmp_path, code_dir=tiny_repo)
    infos = _read_git_log(tmp_path)
    assert infos["repo_sha"] == _git(tiny_repo, "rev-parse", "HEAD")
    assert infos["repo_branch"] == "work"
    assert str(tiny_repo) in infos["repo_id"]


def test_git_log_on_a_detached_head(tiny_repo, tmp_path):
    _git(tiny_repo, "checkout", "-q", "--detach")
    git_log(tmp_path, code_dir=tiny_repo)
    infos = _read_git_log(tmp_path)
    assert infos["repo_sha"] == _git(tiny_repo, "rev-parse", "HEAD")
    assert infos["repo_branch"] is None


def test_git_log_outside_a_checkout(tmp_path):
    outside = tmp_path / "not_a_repo"
    outside.mkdir()
    git_log(tmp_path, code_dir=outside)
    assert _read_git_log(tmp_path) == {"repo_id": None, "repo_sha": None, "repo_branch": None}


def test_git_log_without_gitpython(tiny_repo, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "git", None)  # makes `import git` raise ImportError
    git_log(tmp_path, code_dir=tiny_repo)
    assert _read_git_log(tmp_path)["repo_sha"] is None


def test_git_log_of_this_checkout(tmp_path, repo_root):
    git_log(tmp_path)
    infos = _read_git_log(tmp_path)
    assert infos["repo_sha"] == _git(repo_root, "rev-parse", "HEAD")


# ---------------------------------------------------------------- init_gpu_params


@pytest.fixture
def launcher_env(monkeypatch):
    """A clean launcher environment; init_process_group is recorded instead of called."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: calls.append(kwargs))

    def set_env(**variables):
        for name, value in variables.items():
            monkeypatch.setenv(name, str(value))
        return calls

    return set_env


def _params(n_gpu: int = 0, local_rank: int = -1) -> Namespace:
    return Namespace(n_gpu=n_gpu, local_rank=local_rank, seed=0)


def _facts(params: Namespace) -> dict:
    names = ("world_size", "global_rank", "local_rank", "n_gpu_per_node", "n_nodes", "node_id", "is_master",
             "multi_gpu", "multi_node")
    return {name: getattr(params, name) for name in names}


def test_single_cpu_process(launcher_env):
    calls = launcher_env()
    params = _params(n_gpu=0)
    init_gpu_params(params)
    assert _facts(params) == dict(world_size=1, global_rank=0, local_rank=0, n_gpu_per_node=1, n_nodes=1, node_id=0,
                                  is_master=True, multi_gpu=False, multi_node=False)
    assert params.device == torch.device("cpu")
    assert calls == []


def test_torchrun_environment_on_cpu_uses_gloo(launcher_env):
    calls = launcher_env(RANK=3, LOCAL_RANK=1, WORLD_SIZE=4, LOCAL_WORLD_SIZE=2, GROUP_RANK=1)
    params = _params(n_gpu=0)
    init_gpu_params(params)
    assert _facts(params) == dict(world_size=4, global_rank=3, local_rank=1, n_gpu_per_node=2, n_nodes=2, node_id=1,
                                  is_master=False, multi_gpu=True, multi_node=True)
    assert [call["backend"] for call in calls] == ["gloo"]
    assert (calls[0]["rank"], calls[0]["world_size"]) == (3, 4)


def test_torchrun_rank_zero_is_master(launcher_env):
    launcher_env(RANK=0, LOCAL_RANK=0, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, GROUP_RANK=0)
    params = _params(n_gpu=0)
    init_gpu_params(params)
    assert params.is_master and params.multi_gpu and not params.multi_node


def test_legacy_launcher_variables_and_local_rank_flag(launcher_env):
    # The original README's exports plus `--local_rank 1` from torch.distributed.launch, no LOCAL_RANK.
    launcher_env(RANK=3, WORLD_SIZE=4, N_GPU_NODE=2, N_NODES=2, NODE_RANK=1)
    params = _params(n_gpu=0, local_rank=1)
    init_gpu_params(params)
    assert (params.local_rank, params.node_id, params.n_nodes, params.n_gpu_per_node) == (1, 1, 2, 2)
    assert not params.is_master and params.multi_node


def test_torchrun_variables_win_over_legacy_ones(launcher_env):
    launcher_env(RANK=1, LOCAL_RANK=1, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, GROUP_RANK=0, N_GPU_NODE=1, NODE_RANK=1)
    params = _params(n_gpu=0, local_rank=0)
    init_gpu_params(params)
    assert (params.local_rank, params.node_id, params.n_gpu_per_node) == (1, 0, 2)


def test_n_gpu_must_match_the_launcher(launcher_env):
    launcher_env(RANK=0, LOCAL_RANK=0, WORLD_SIZE=2)
    with pytest.raises(UserError, match="--n_gpu 4 .*WORLD_SIZE=2"):
        init_gpu_params(_params(n_gpu=4))
    with pytest.raises(UserError, match="--n_gpu 1 .*pass --n_gpu 2"):
        init_gpu_params(_params(n_gpu=1))


def test_inconsistent_layout_is_refused(launcher_env):
    launcher_env(RANK=0, LOCAL_RANK=0, WORLD_SIZE=4, N_GPU_NODE=3)
    with pytest.raises(UserError, match="inconsistent"):
        init_gpu_params(_params(n_gpu=0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without GPU")
def test_gpu_requested_without_gpu(launcher_env):
    launcher_env()
    with pytest.raises(UserError, match="--n_gpu 1 but no CUDA device is visible; use --n_gpu 0"):
        init_gpu_params(_params(n_gpu=1))


def test_init_gpu_params_is_the_only_reader_of_launcher_variables(repo_root):
    for module in ("distiller.py", "train.py", "lm_seqs_dataset.py", "grouped_batch_sampler.py"):
        path = repo_root / module
        if not path.exists():
            continue
        source = path.read_text()
        assert "os.environ" not in source and "getenv" not in source, module
        assert "init_process_group" not in source, module


# ---------------------------------------------------------------- seeding, writes, errors, logging


def test_set_seed_makes_draws_repeatable():
    params = Namespace(seed=7, n_gpu=0)
    set_seed(params)
    first = (np.random.rand(3), torch.rand(3))
    set_seed(params)
    second = (np.random.rand(3), torch.rand(3))
    assert np.array_equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def failing_write(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(WriteError, match="could not write .*out.json.*disk full"):
        atomic_write(target, failing_write)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    atomic_write(target, lambda path: path.write_text("new"))
    assert target.read_text() == "new"


def test_non_finite_loss_error_names_step_and_term():
    error = NonFiniteLossError(12, "loss_cos")
    assert (error.step, error.term) == (12, "loss_cos")
    assert "loss_cos" in str(error) and "iteration 12" in str(error)


def test_log_format_has_time_level_name_pid_and_message():
    record = logging.LogRecord("distillation", logging.INFO, __file__, 1, "hello", None, None)
    line = logging.Formatter(utils.LOG_FORMAT, utils.LOG_DATE_FORMAT).format(record)
    assert line.endswith(f" - INFO - distillation - PID: {record.process} - hello")
