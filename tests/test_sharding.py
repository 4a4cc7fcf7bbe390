"""sharding.py and the sharded Distiller: two gloo processes under torchrun (tests/fsdp_worker.py) train the same
tiny GPT-2 pair unsharded (DDP) and sharded (FSDP2), with fused losses, with full logits and in bf16; and the
helpers that must give an unsharded run's figures, against torch's own or a hand computation.
"""

import subprocess
import sys

import pytest
import torch

from cli_checks import child_env, free_port
from sharding import clip_grad_norm_, gathered_projection, total_norm
from training_state import check_training_state, reshard_position

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

CASES = ("ddp", "fsdp", "fsdp_full", "fsdp_bf16")


@pytest.fixture(scope="module")
def runs(repo_root, tmp_path_factory) -> dict[str, list[dict]]:
    """{case: [rank 0's result, rank 1's]} of one torchrun launch of tests/fsdp_worker.py."""
    out_dir = tmp_path_factory.mktemp("fsdp_worker")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(repo_root / "tests" / "fsdp_worker.py"), str(out_dir), *CASES]
    result = subprocess.run(command, cwd=out_dir, env=child_env(repo_root), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {case: [torch.load(out_dir / case / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
            for case in CASES}
    runs["dumps"] = {case: out_dir / case / "dump" for case in CASES}
    return runs


def _final_weights(runs, case: str) -> dict[str, torch.Tensor]:
    return torch.load(runs["dumps"][case] / "pytorch_model.bin", weights_only=True)


def test_a_sharded_run_equals_an_unsharded_one_step_by_step(runs):
    # The same batches, the same math: losses and gradient norms agree at every step on every rank, to
    # float32 rounding (the reductions are the same sums, split differently).
    for ddp, fsdp in zip(runs["ddp"], runs["fsdp"]):
        assert len(fsdp["losses"]) == 8 and len(fsdp["grad_norms"]) == 4
        torch.testing.assert_close(fsdp["losses"], ddp["losses"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fsdp["grad_norms"], ddp["grad_norms"], rtol=1e-5, atol=1e-6)
    assert runs["ddp"][0]["losses"] != runs["ddp"][1]["losses"]  # each rank trained on its own batches
    ddp, fsdp = _final_weights(runs, "ddp"), _final_weights(runs, "fsdp")
    initial = torch.load(runs["dumps"]["fsdp"] / "model_epoch_0.pth", weights_only=True)
    assert fsdp.keys() == ddp.keys()
    for name, value in ddp.items():
        torch.testing.assert_close(fsdp[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(fsdp[name], initial[name]) for name in fsdp)  # the second epoch trained


def test_each_process_holds_half_of_the_students_parameters_gradients_and_adam_state(runs):
    for ddp, fsdp in zip(runs["ddp"], runs["fsdp"]):
        assert ddp["bytes"]["optimizer"] == 2 * ddp["bytes"]["params"]  # AdamW: two moments per parameter
        for kind in ("params", "grads", "optimizer"):
            assert fsdp["bytes"][kind] == ddp["bytes"][kind] // 2, kind


def test_gradients_are_reduce_scattered_only_on_the_micro_batch_that_steps(runs):
    for rank in runs["fsdp"]:
        counts = rank["reduce_scatters"]
        per_micro_batch = [b - a for a, b in zip([0, *counts], counts)]
        units = per_micro_batch[1]  # one reduce-scatter per FSDP unit: two layers and the root
        assert units == 3
        assert per_micro_batch == [0, units] * 4


def test_the_fused_loss_under_fsdp_equals_the_full_logit_loss(runs):
    # The sharded LM heads (the student's, tied to its embeddings, and the teacher's, resharded after its
    # forward) are gathered whole for the fused losses: the same losses and weights as full logits.
    assert runs["fsdp"][0]["teacher_head_at_rest"] == "DTensor"  # resharded between forwards
    assert runs["ddp"][0]["teacher_head_at_rest"] == "Parameter"
    for fused, full in zip(runs["fsdp"], runs["fsdp_full"]):
        torch.testing.assert_close(fused["losses"], full["losses"], rtol=1e-5, atol=1e-6)
    fused, full = _final_weights(runs, "fsdp"), _final_weights(runs, "fsdp_full")
    for name, value in full.items():
        torch.testing.assert_close(fused[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_gathers_the_student_in_bfloat16_and_follows_float32_to_bf16_rounding(runs):
    assert runs["fsdp_bf16"][0]["forward_dtypes"] == ["torch.bfloat16"]
    assert runs["fsdp"][0]["forward_dtypes"] == ["torch.float32"]
    # bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 per operation); the losses, float32 sums of
    # many such terms, stay within 1% of float32 over these steps, the fp32 master weights within 1e-2.
    for bf16, fp32 in zip(runs["fsdp_bf16"], runs["fsdp"]):
        torch.testing.assert_close(bf16["losses"], fp32["losses"], rtol=1e-2, atol=0)
    bf16, fp32 = _final_weights(runs, "fsdp_bf16"), _final_weights(runs, "fsdp")
    for name, value in fp32.items():
        assert bf16[name].dtype == torch.float32
        torch.testing.assert_close(bf16[name], value, rtol=0, atol=1e-2, msg=name)


# ---------------------------------------------------------------- the helpers, unsharded


def test_clipping_of_plain_parameters_is_torchs():
    torch.manual_seed(0)
    ours, theirs = (torch.nn.Linear(5, 3) for _ in range(2))
    theirs.load_state_dict(ours.state_dict())
    inputs = torch.randn(4, 5)
    for model in (ours, theirs):
        model(inputs).square().sum().backward()
    norm = clip_grad_norm_(ours.parameters(), 0.5)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5)
    assert torch.equal(norm, expected)
    for mine, reference in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(mine.grad, reference.grad)
    assert torch.equal(total_norm([torch.tensor([3.0]), torch.tensor([4.0])]), torch.tensor(5.0))


def test_a_plain_projection_is_read_as_it_is():
    projection = torch.nn.Linear(4, 6)
    assert gathered_projection(projection) is projection


def test_a_state_moves_to_another_number_of_processes_at_the_same_share_of_its_epoch():
    state = {
        "position": {"epoch": 1, "batches_done": 4, "seed": 5, "batches_per_epoch": 6},
        "counters": {"n_total_iter": 10, "n_optimizer_steps": 5, "n_sequences_epoch": 8,
                     "total_loss_epoch": torch.tensor(20.0)},
        "scheduler": {"last_epoch": 5, "base_lrs": [0.1]},
        "rng": [{"rank": 0}, {"rank": 1}],
        "shards": "training_state.shards.10",
    }
    # Two processes of 6 batches -> one of 12: 4/6 of epoch 1 is 8 batches; iteration 12 + 8 = 20 starts a
    # window of 2.
    moved = reshard_position(state, world_size=1, batches_per_epoch=12, accumulation=2)
    assert moved["position"] == {"epoch": 1, "batches_done": 8, "seed": 5, "batches_per_epoch": 12}
    assert {k: v for k, v in moved["counters"].items() if k != "total_loss_epoch"} == {
        "n_total_iter": 20, "n_optimizer_steps": 10, "n_sequences_epoch": 16}
    assert moved["counters"]["total_loss_epoch"].item() == 40.0  # the same average loss per batch
    assert moved["scheduler"] == {"last_epoch": 10, "base_lrs": [0.1]} and moved["rng"] == [{"rank": 0}]
    # One process of 12 -> four of 3, windows of 2: 8/12 of epoch 1 is 2 batches; 3 + 2 = 5 is inside a
    # window, so the state goes back to its start, 1 batch done.
    one = {**moved, "rng": [{"rank": 0}]}
    four = reshard_position(one, world_size=4, batches_per_epoch=3, accumulation=2)
    assert (four["position"]["batches_done"], four["counters"]["n_total_iter"]) == (1, 4)
    assert four["rng"] == [{"rank": 0}] * 4
    assert state["position"]["batches_done"] == 4  # the state given is left alone


def test_a_sharded_state_resumes_only_sharded_and_an_unsharded_one_only_unsharded():
    sharded = {"shards": "training_state.shards.4"}
    unsharded = {"student": {}, "optimizer": {}}
    facts = dict(world_size=2, seed=5, batches_per_epoch=6, n_epoch=2, accumulation=2)
    assert check_training_state(sharded, **facts, sharded=False) == (
        "it was saved by a sharded run (--fsdp); resume it with --fsdp")
    assert check_training_state(unsharded, **facts, sharded=True) == (
        "it was saved by a run without --fsdp; resume it without --fsdp")
