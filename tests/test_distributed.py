"""The distributed path on CPU: two gloo processes under torchrun (`--n_gpu 0`).

- tests/ddp_worker.py drives real Distillers in two ranks: gradients are all-reduced only on the
  micro-batch that steps, both ranks end with identical weights equal to one process taking the same
  global batch, and a NaN on one rank stops both before the optimizer step.
- train.py itself under torchrun finishes, only rank 0 writes, and its student equals a single-process
  run over the same global batch.
"""

import pickle
import subprocess
import sys

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

import assets
import ddp_worker
from cli_checks import child_env, free_port
from distiller import Distiller
from lm_seqs_dataset import LmSeqsDataset

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def _torchrun(repo_root, cwd, *args: str) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run` with two local processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    return subprocess.run(command, cwd=cwd, env=child_env(repo_root), capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- Distillers in two gloo ranks


@pytest.fixture(scope="module")
def rank_results(repo_root, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp_worker")
    result = _torchrun(repo_root, out_dir, str(repo_root / "tests" / "ddp_worker.py"), str(out_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)], out_dir


def test_gradients_are_all_reduced_only_on_the_stepping_micro_batch(rank_results):
    results, _ = rank_results
    for result in results:
        # Per micro-batch over three windows of two: nothing on the first, one all-reduce of every
        # gradient bucket on the stepping one, the same number at every optimizer step.
        per_micro_batch = [b - a for a, b in zip([0, *result["reduces_after"]], result["reduces_after"])]
        buckets = per_micro_batch[1]
        assert buckets > 0, "the stepping micro-batch was not synchronised"
        assert per_micro_batch == [0, buckets] * 3, "gradients were not all-reduced exactly once per optimizer step"
        assert (result["n_optimizer_steps_after_first"], result["n_optimizer_steps"]) == (1, 3)


def test_ranks_hold_identical_weights_equal_to_one_process_on_the_global_batch(rank_results, tmp_path):
    (rank0, rank1), _ = rank_results
    for name, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][name]), name
        assert torch.equal(rank0["grads"][name], rank1["grads"][name]), name

    single = ddp_worker.build_distiller(tmp_path / "dump", gradient_accumulation_steps=1)
    assert not single.multi_gpu
    batch = single.prepare_batch_clm(ddp_worker.global_batch())
    single.step(input_ids=batch[0], attention_mask=batch[1], lm_labels=batch[2])
    single.close()
    reference = ddp_worker.snapshot(single)
    initial = assets.tiny_model("gpt2", "student", ddp_worker.VOCAB, seed=0).state_dict()
    for name, value in reference["weights"].items():
        torch.testing.assert_close(rank0["grads"][name], reference["grads"][name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(rank0["weights"][name], value, rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.equal(initial[name], value) for name, value in reference["weights"].items())


def test_nan_on_one_rank_stops_every_rank_before_the_step(rank_results):
    results, _ = rank_results
    for result in results:
        assert result["error"] == (8, "loss_ce")
        for name, value in result["weights_before_nan"].items():
            assert torch.equal(result["weights_after_nan"][name], value), name


def test_only_rank_zero_is_master_and_writes(rank_results):
    results, out_dir = rank_results
    assert [result["is_master"] for result in results] == [True, False]
    event_files = list((out_dir / "dump" / "log" / "train").iterdir())
    assert len(event_files) == 1


# ---------------------------------------------------------------- train.py under torchrun


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, teacher_dirs) -> tuple:
    """Four equal-length GPT-2 sequences, a dropout-free one-layer student config and its initial weights."""
    root = tmp_path_factory.mktemp("ddp_cli_inputs")
    data_file = root / "data.pickle"
    data_file.write_bytes(pickle.dumps(assets.make_sequences(4, 20, 400, start_id=0, end_id=0, seed=1)))
    config = assets.without_dropout(assets.student_config("gpt2", 400))
    config_file = root / "student.json"
    config.to_json_file(config_file)
    weights_file = root / "student_init.pth"
    torch.manual_seed(0)
    torch.save(assets.MODEL_CLASSES["gpt2"](config).state_dict(), weights_file)
    return data_file, config_file, weights_file, teacher_dirs["gpt2"]


def _train_argv(cli_inputs, dump_path, batch_size: int) -> list[str]:
    data_file, config_file, weights_file, teacher_dir = cli_inputs
    return [
        "--dump_path", str(dump_path), "--data_file", str(data_file), "--student_type", "gpt2",
        "--student_config", str(config_file), "--student_pretrained_weights", str(weights_file),
        "--teacher_type", "gpt2", "--teacher_name", str(teacher_dir),
        "--alpha_ce", "1.0", "--alpha_clm", "1.0", "--alpha_cos", "1.0", "--n_gpu", "0", "--n_epoch", "1",
        "--batch_size", str(batch_size), "--gradient_accumulation_steps", "1", "--warmup_prop", "0.0",
        "--learning_rate", "1e-3", "--log_interval", "1", "--checkpoint_interval", "1",
    ]


@pytest.fixture(scope="module")
def single_process_run(cli_inputs, repo_root, tmp_path_factory):
    """train.py in one process over the global batch of 4 sequences: one optimizer step."""
    dump_path = tmp_path_factory.mktemp("single_process") / "dump"
    result = subprocess.run([sys.executable, str(repo_root / "train.py"), *_train_argv(cli_inputs, dump_path, 4)],
                            cwd=dump_path.parent, env=child_env(repo_root), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return dump_path


# torchrun, and the legacy launcher as the original README used it (exported N_GPU_NODE, N_NODES,
# NODE_RANK, WORLD_SIZE; `--local-rank=<r>` passed to train.py).
LAUNCHERS = {
    "torchrun": (["torch.distributed.run"], {}),
    "legacy": (["torch.distributed.launch"], {"NODE_RANK": "0", "N_NODES": "1", "N_GPU_NODE": "2", "WORLD_SIZE": "2"}),
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_train_py_in_two_processes_matches_one_process(launcher, cli_inputs, single_process_run, repo_root, tmp_path):
    # Global batch = the 4 sequences: 2 ranks x 2 sequences vs 1 process x 4 sequences, one optimizer step.
    module, variables = LAUNCHERS[launcher]
    command = [sys.executable, "-m", *module, "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(repo_root / "train.py"),
               *_train_argv(cli_inputs, tmp_path / "ddp", batch_size=2), "--n_gpu", "0"]
    distributed = subprocess.run(command, cwd=tmp_path, env={**child_env(repo_root), **variables}, capture_output=True,
                                 text=True, timeout=300)
    assert distributed.returncode == 0, distributed.stderr[-3000:]
    assert "world size 2" in distributed.stderr and "Initializing the gloo process group" in distributed.stderr
    info_pids = {line.split("PID: ")[1].split()[0] for line in distributed.stderr.splitlines()
                 if " - INFO - distillation - PID: " in line}
    assert len(info_pids) == 1, f"only the master logs at INFO, not {info_pids}"

    assert _names(tmp_path / "ddp") == _names(single_process_run)
    assert len(_names(tmp_path / "ddp" / "log" / "train")) == 1, "a second rank wrote a tensorboard log"
    ddp_state = torch.load(tmp_path / "ddp" / "pytorch_model.bin", weights_only=True)
    single_state = torch.load(single_process_run / "pytorch_model.bin", weights_only=True)
    initial = torch.load(cli_inputs[2], weights_only=True)
    for name, value in single_state.items():
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(value, initial[name]) for name, value in single_state.items())


def _names(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_distributed_sampler_reshuffles_every_epoch(tmp_path, monkeypatch):
    # A one-process gloo group is enough to take the DistributedSampler + DDP path in this process.
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        params = assets.distiller_params(tmp_path / "dump", **{**ddp_worker.SETTINGS, "multi_gpu": True,
                                                               "is_master": False, "n_epoch": 3, "batch_size": 2})
        data = assets.make_sequences(4, ddp_worker.SEQ_LEN, ddp_worker.VOCAB, start_id=0, end_id=0)
        distiller = Distiller(params, LmSeqsDataset(params, data), None,
                              assets.tiny_model("gpt2", "student", ddp_worker.VOCAB),
                              assets.tiny_model("gpt2", "teacher", ddp_worker.VOCAB, seed=1))
        assert isinstance(distiller.sampler, DistributedSampler)
        assert isinstance(distiller.student, DistributedDataParallel)
        assert distiller.student.find_unused_parameters is False
        epochs, original = [], distiller.sampler.set_epoch

        def recording_set_epoch(epoch: int) -> None:
            epochs.append(epoch)
            original(epoch)

        monkeypatch.setattr(distiller.sampler, "set_epoch", recording_set_epoch)
        distiller.train()
        distiller.close()
        assert epochs == [0, 1, 2]
    finally:
        torch.distributed.destroy_process_group()
