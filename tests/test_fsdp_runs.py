"""train.py --fsdp as users run it: two gloo processes under torchrun (CLM, student with dropout, two layers).

The default run trains once and checks what a user gets: the same complete model folder as an unsharded
run (it loads in `pipeline` with no missing key), and a training state whose weights and optimizer are
sharded in one `training_state.shards.<iteration>` folder. The kill-and-resume runs are the fault matrix's
(`-m fault_matrix`): a run killed by SIGKILL and resumed ends bit for bit where the uninterrupted one ends,
and a two-process state resumes in one process and in four, resharded.
"""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

import assets
from cli_checks import child_env, error_line, free_port, run_main
from training_state import TRAINING_STATE

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

# 24 sequences of 2: 6 batches per epoch on each of two ranks. Windows of 2; checkpoints every 3 iterations fall
# inside windows, and a window ends each epoch.
RUN_FLAGS = ["--n_gpu", "0", "--n_epoch", "2", "--batch_size", "2", "--gradient_accumulation_steps", "2",
             "--checkpoint_interval", "3", "--log_interval", "2", "--warmup_prop", "0.2", "--learning_rate", "2e-3",
             "--seed", "5", "--fsdp"]


@pytest.fixture(scope="module")
def fsdp_argv(tmp_path_factory, teacher_dirs):
    """gpt2 -> two-layer gpt2 CLM flags with --fsdp, for a dump path."""
    return assets.gpt2_clm_argv(tmp_path_factory.mktemp("fsdp_inputs"), teacher_dirs["gpt2"], RUN_FLAGS, 24, 16,
                                n_layers=2)


def torchrun(repo_root, cwd, argv: list[str], processes: int = 2, fault: str | None = None):
    """train.py (or, with a FAULT, tests/fault_injection.py) under torchrun with `processes` gloo processes."""
    script = "tests/fault_injection.py" if fault else "train.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(repo_root / script), *argv]
    variables = {**child_env(repo_root), **({"FAULT": fault} if fault else {})}
    return subprocess.run(command, cwd=cwd, env=variables, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(fsdp_argv, repo_root, tmp_path_factory):
    """The uninterrupted two-process sharded run."""
    dump = tmp_path_factory.mktemp("fsdp_reference") / "dump"
    result = torchrun(repo_root, dump.parent, fsdp_argv(dump))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Sharding the student and its loss, and the teacher, with FSDP2" in result.stderr
    return dump


def test_a_sharded_run_exports_the_folder_of_an_unsharded_one(reference):
    names = {path.name for path in reference.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
            "pytorch_model.bin", "checkpoint.pth", "model_epoch_0.pth", "model_epoch_1.pth", TRAINING_STATE} <= names
    # The training state names its one shard folder: one file per process and their layout.
    state = torch.load(reference / TRAINING_STATE, weights_only=True)
    assert "student" not in state and "optimizer" not in state
    assert [name for name in names if name.startswith("training_state.shards.")] == [state["shards"]]
    assert sorted(p.name for p in (reference / state["shards"]).iterdir()) == [".metadata", "__0_0.distcp",
                                                                               "__1_0.distcp"]
    assert len(state["rng"]) == 2 and state["counters"]["n_total_iter"] == 12
    # The exported weights are the final ones, whole, with no key missing or left over.
    model, info = AutoModelForCausalLM.from_pretrained(reference, output_loading_info=True)
    assert not any(info.values()), info
    final = torch.load(reference / "pytorch_model.bin", weights_only=True)
    assert final.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, final[name]), name
    generator = pipeline("text-generation", model=str(reference))
    assert generator("ab", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("ab")


def test_one_process_without_a_launcher_is_a_group_of_one(fsdp_argv, tmp_path, capsys):
    dump = tmp_path / "dump"
    code, stderr = run_main(fsdp_argv(dump, "--n_epoch", "1"), capsys)
    assert code == 0, stderr[-3000:]
    state = torch.load(dump / TRAINING_STATE, weights_only=True)
    assert len(state["rng"]) == 1 and (dump / state["shards"] / "__0_0.distcp").is_file()
    model, info = AutoModelForCausalLM.from_pretrained(dump, output_loading_info=True)
    assert not any(info.values()), info
    assert not torch.distributed.is_initialized()  # the run's group is gone with it


@pytest.mark.parametrize("flag", [["--fp16"], ["--compile"], ["--eval_data_file", "data.pickle"]])
def test_fsdp_refuses_what_it_cannot_run_in_one_line(flag, fsdp_argv, tmp_path, capsys):
    if flag[0] == "--eval_data_file":
        flag = [flag[0], fsdp_argv(tmp_path)[3]]  # an existing file: only the combination is refused
    code, stderr = run_main(fsdp_argv(tmp_path / "dump", *flag), capsys)
    assert code == 1
    assert error_line(stderr) == (
        f"error: --fsdp does not work with {flag[0]}: drop one of them (--bf16 is the mixed precision of --fsdp)"
    )
    assert not (tmp_path / "dump").exists()


@pytest.mark.fault_matrix
def test_a_killed_sharded_run_resumes_bit_exact(fsdp_argv, reference, repo_root, tmp_path):
    # Rank 1 dies by SIGKILL after iteration 8: the last state is the window start at 6 (checkpoint at 6).
    dump = tmp_path / "dump"
    result = torchrun(repo_root, tmp_path, fsdp_argv(dump), fault="sigkill@8:1")
    assert result.returncode != 0
    state = torch.load(dump / TRAINING_STATE, weights_only=True)
    assert state["counters"]["n_total_iter"] == 6
    result = torchrun(repo_root, tmp_path, fsdp_argv(dump, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("pytorch_model.bin", "model_epoch_1.pth"):
        final, expected = (torch.load(folder / name, weights_only=True) for folder in (dump, reference))
        assert final.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(final[key], value), (name, key)
    assert len([p for p in dump.iterdir() if p.name.startswith("training_state.shards.")]) == 1


@pytest.mark.fault_matrix
def test_a_two_process_sharded_state_resumes_in_one_process(fsdp_argv, reference, repo_root, tmp_path):
    # Rank 1 dies after iteration 4: the last state is the start of the window 2-3 (checkpoint at 3).
    dump = tmp_path / "dump"
    result = torchrun(repo_root, tmp_path, fsdp_argv(dump), fault="sigkill@4:1")
    assert result.returncode != 0
    assert torch.load(dump / TRAINING_STATE, weights_only=True)["counters"]["n_total_iter"] == 2
    result = torchrun(repo_root, tmp_path, fsdp_argv(dump, "--resume"), processes=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Resharding the training state of 2 process(es) onto 1") == 1
    # 2 of 6 batches per rank is a third of the epoch: 4 of its 12 batches in one process.
    assert "Resuming at iteration 4 (optimizer step 2), epoch 0, after 4 of its 12 batches" in result.stderr
    final = torch.load(dump / "pytorch_model.bin", weights_only=True)
    expected = torch.load(reference / "pytorch_model.bin", weights_only=True)
    assert final.keys() == expected.keys()
    # Another split of the data: close to the two-process run, not equal to it.
    assert all(torch.isfinite(value).all() for value in final.values())
    assert any(not torch.equal(final[key], value) for key, value in expected.items())
    model, info = AutoModelForCausalLM.from_pretrained(dump, output_loading_info=True)
    assert not any(info.values()), info


@pytest.mark.fault_matrix
def test_a_two_process_sharded_state_resumes_on_four(fsdp_argv, reference, repo_root, tmp_path):
    # Killed after iteration 8: the state is the end of epoch 0 (iteration 6). Four processes have 3 batches
    # per epoch; iteration 3 + 0 is inside a window of 2, so the run takes up at the next window, 1 batch in.
    dump = tmp_path / "dump"
    result = torchrun(repo_root, tmp_path, fsdp_argv(dump), fault="sigkill@8:1")
    assert result.returncode != 0
    result = torchrun(repo_root, tmp_path, fsdp_argv(dump, "--resume"), processes=4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Resharding the training state of 2 process(es) onto 4") == 1
    assert "Resuming at iteration 4 (optimizer step 2), epoch 1, after 1 of its 3 batches" in result.stderr
    state = torch.load(dump / TRAINING_STATE, weights_only=True)
    assert len(state["rng"]) == 4 and state["counters"]["n_total_iter"] == 6
    assert len(list((dump / state["shards"]).glob("*.distcp"))) == 4
    model, info = AutoModelForCausalLM.from_pretrained(dump, output_loading_info=True)
    assert not any(info.values()), info
