"""The GPU step on a real GPU (skipped without one): a few bf16 steps of a tiny pair on CUDA give the
losses of the fp32 CPU run on the same batches, the micro-batches inside an accumulation window
never wait for the device, and --fsdp in one process on the GPU gives the unsharded steps."""

import copy

import pytest
import torch

import assets
from distiller import Distiller
from lm_seqs_dataset import LmSeqsDataset
from utils import init_gpu_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 64
BERT_SPECIALS = {"pad_token": 0, "unk_token": 1, "cls_token": 2, "sep_token": 3, "mask_token": 4}
N_STEPS = 4


def mlm_distiller(tmp_path, device: str, bf16: bool, student, teacher) -> Distiller:
    """A DistilBERT-from-BERT MLM Distiller on `device`, all five-term recipe weights but clm."""
    params = assets.distiller_params(
        tmp_path, student_type="distilbert", teacher_type="bert", special_tok_ids=BERT_SPECIALS, mlm=True,
        alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, alpha_clm=0.0, bf16=bf16, gradient_accumulation_steps=2,
        warmup_prop=0.0, n_gpu=1 if device == "cuda" else 0,
    )
    params.device = torch.device(device)
    data = assets.make_sequences(8, 12, VOCAB, start_id=2, end_id=3)
    token_probs = torch.ones(VOCAB)
    token_probs[list(BERT_SPECIALS.values())] = 0.0
    return Distiller(params, LmSeqsDataset(params, data), token_probs, student, teacher)


def losses_of_steps(distiller: Distiller, batches: list) -> list[float]:
    """Step through `batches` (prepared on the host) and return each micro-batch's total loss."""
    losses = []
    for batch in batches:
        distiller.step(*batch)
        losses.append(distiller.last_loss.item())
    return losses


def test_bf16_steps_on_cuda_match_fp32_on_cpu(tmp_path):
    student = assets.tiny_model("distilbert", "student", VOCAB, 0)
    teacher = assets.tiny_model("bert", "teacher", VOCAB, 1)
    cpu = mlm_distiller(tmp_path / "cpu", "cpu", False, copy.deepcopy(student), copy.deepcopy(teacher))
    cuda = mlm_distiller(tmp_path / "cuda", "cuda", True, copy.deepcopy(student), copy.deepcopy(teacher))
    assert cuda.optimizer.defaults["fused"]

    torch.manual_seed(0)  # the masking draws on the host: the same targets for both runs
    ids = torch.randint(5, VOCAB, (N_STEPS, 4, 12))
    batches = [cpu.prepare_batch_mlm((ids[i], torch.full((4,), 12))) for i in range(N_STEPS)]
    cpu_losses = losses_of_steps(cpu, batches)
    cuda_losses = losses_of_steps(cuda, batches)

    assert cuda.n_optimizer_steps == cpu.n_optimizer_steps == N_STEPS // 2
    # bf16 keeps ~3 significant digits; the weights drift apart a little after each optimizer step.
    assert cuda_losses == pytest.approx(cpu_losses, rel=3e-2)


def test_micro_batches_inside_a_window_do_not_sync(tmp_path):
    student = assets.tiny_model("gpt2", "student", VOCAB, 0)
    teacher = assets.tiny_model("gpt2", "teacher", VOCAB, 1)
    params = assets.distiller_params(
        tmp_path, special_tok_ids={"bos_token": 0, "eos_token": 0, "unk_token": 0}, bf16=True,
        gradient_accumulation_steps=2, alpha_ce=1.0, alpha_clm=1.0, alpha_cos=1.0, n_gpu=1,
    )
    params.device = torch.device("cuda")
    data = assets.make_sequences(4, 12, VOCAB, start_id=0, end_id=0)
    distiller = Distiller(params, LmSeqsDataset(params, data), None, student, teacher)
    ids = torch.randint(1, VOCAB, (2, 12))
    batch = distiller.prepare_batch_clm((ids, torch.full((2,), 12)))
    distiller.step(*batch)  # warm-up window: first-call allocations
    distiller.step(*batch)
    torch.cuda.synchronize()
    # CLM: the models get no padding mask, so transformers has none to inspect on the host either.
    torch.cuda.set_sync_debug_mode("error")
    try:
        distiller.step(*batch)  # opens a window, does not step: no read-back allowed
    finally:
        torch.cuda.set_sync_debug_mode("default")
    distiller.step(*batch)  # steps: the finite check reads its flags here
    assert distiller.n_optimizer_steps == 2


def test_fsdp_in_one_process_on_cuda_equals_the_unsharded_steps(tmp_path):
    # --fsdp --n_gpu 1 without a launcher: a one-process NCCL group (init_gpu_params), the student and the
    # teacher sharded on the GPU; the same losses and saved weights as the unsharded GPU run.
    student = assets.tiny_model("gpt2", "student", VOCAB, 0)
    teacher = assets.tiny_model("gpt2", "teacher", VOCAB, 1)
    specials = {"bos_token": 0, "eos_token": 0, "unk_token": 0}
    data = assets.make_sequences(8, 12, VOCAB, start_id=0, end_id=0)
    ids = torch.randint(1, VOCAB, (N_STEPS, 2, 12), generator=torch.Generator().manual_seed(0))

    def run(name: str, fsdp: bool) -> tuple[list[float], dict]:
        dump = tmp_path / name
        dump.mkdir()
        params = assets.distiller_params(
            dump, special_tok_ids=specials, gradient_accumulation_steps=2, alpha_ce=1.0, alpha_clm=1.0,
            alpha_cos=1.0, warmup_prop=0.0, n_gpu=1, fsdp=fsdp, loss_chunk_size=5,
        )
        if fsdp:
            init_gpu_params(params)
        params.device = torch.device("cuda", 0)
        distiller = Distiller(params, LmSeqsDataset(params, data), None, copy.deepcopy(student),
                              copy.deepcopy(teacher))
        batches = [distiller.prepare_batch_clm((ids[i], torch.full((2,), 12))) for i in range(N_STEPS)]
        losses = losses_of_steps(distiller, batches)
        distiller.save_checkpoint("checkpoint.pth")
        return losses, torch.load(dump / "checkpoint.pth", weights_only=True)

    plain_losses, plain_weights = run("plain", fsdp=False)
    try:
        sharded_losses, sharded_weights = run("sharded", fsdp=True)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert sharded_losses == pytest.approx(plain_losses, rel=1e-5)
    assert sharded_weights.keys() == plain_weights.keys()
    for name, value in plain_weights.items():
        assert sharded_weights[name].device.type == "cpu"
        torch.testing.assert_close(sharded_weights[name], value.cpu(), rtol=1e-5, atol=1e-6, msg=name)
