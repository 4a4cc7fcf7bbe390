"""distiller.py's GPU-step contract, checked on CPU: loss values reach the host only when logged, the
finite check is the one read per optimizer step, --num_workers does not change the batches, and
--compile wraps a separate reference while the raw student is what is saved."""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import assets
from distiller import Distiller
from lm_seqs_dataset import LmSeqsDataset

VOCAB = 64
GPT2_SPECIALS = {"bos_token": 0, "eos_token": 0, "unk_token": 0}


def gpt2_distiller(tmp_path, n_sequences: int, **overrides) -> Distiller:
    """A single-process CPU Distiller for a tiny GPT-2 pair (CLM: batch preparation reads nothing back)."""
    settings = dict(special_tok_ids=GPT2_SPECIALS, warmup_prop=0.0, batch_size=1, n_epoch=1)
    settings.update(overrides)
    params = assets.distiller_params(tmp_path / "dump", **settings)
    (tmp_path / "dump").mkdir(parents=True, exist_ok=True)  # as train.py makes it; a Distiller writes nothing
    data = assets.make_sequences(n_sequences, 12, VOCAB, start_id=0, end_id=0)
    student = assets.tiny_model("gpt2", "student", VOCAB, 0)
    teacher = assets.tiny_model("gpt2", "teacher", VOCAB, 1)
    return Distiller(params, LmSeqsDataset(params, data), None, student, teacher)


class CountHostReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense: what .item(), float(), int() and bool() of a tensor run, a device sync on GPU.

    Reads of `host_tensors()` are left out: AdamW's step counters, which live on the host unless the
    optimizer is fused (then on the device, and never read back).
    """

    def __init__(self, reads: list, host_tensors):
        super().__init__()
        self.reads = reads
        self.host_tensors = host_tensors

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not any(args[0] is t for t in self.host_tensors()):
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


def test_loss_values_are_read_back_only_at_log_steps_and_the_finite_check_per_optimizer_step(tmp_path, monkeypatch):
    # 12 micro-batches; optimizer steps after 3, 6, 9, 12; logs after 4, 8, 12.
    distiller = gpt2_distiller(
        tmp_path, 12, gradient_accumulation_steps=3, log_interval=4, checkpoint_interval=10**6,
        alpha_ce=1.0, alpha_clm=1.0, alpha_mse=0.5, alpha_cos=1.0,
    )
    reads = []
    # Tensor.tolist does not dispatch on CPU tensors; count it by hand (on GPU it is a device-to-host copy).
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (reads.append("tolist"), tolist(self))[1])
    reads_in = {"step": Counter(), "log": Counter()}

    def step_counters():
        return [state["step"] for state in distiller.optimizer.state.values()]

    def counted(name, method):
        def wrapper(*args, **kwargs):
            before = len(reads)
            with CountHostReads(reads, step_counters):
                method(*args, **kwargs)
            if len(reads) > before:
                reads_in[name][distiller.n_total_iter] += len(reads) - before

        return wrapper

    monkeypatch.setattr(distiller, "step", counted("step", distiller.step))
    monkeypatch.setattr(distiller, "log", counted("log", distiller.log))
    distiller.train()

    assert distiller.n_total_iter == 12 and distiller.n_optimizer_steps == 4
    # The one read at each optimizer boundary: the window's finite flags and the stop signal (_check_finite_and_stop).
    assert reads_in["step"] == {3: 1, 6: 1, 9: 1, 12: 1}
    # One stacked read of every logged scalar, the loss values included.
    assert reads_in["log"] == {4: 1, 8: 1, 12: 1}


def test_num_workers_give_the_same_batches(tmp_path):
    in_process = gpt2_distiller(tmp_path / "a", 10, batch_size=3)
    with_workers = gpt2_distiller(tmp_path / "b", 10, batch_size=3, num_workers=2)
    assert with_workers.dataloader.num_workers == 2 and not with_workers.dataloader.pin_memory  # pinned on CUDA only
    for epoch in (0, 1):
        for distiller in (in_process, with_workers):
            distiller.sampler.set_epoch(epoch)
        expected, got = list(in_process.dataloader), list(with_workers.dataloader)
        assert len(expected) == len(got) == 4
        for (ids_a, lengths_a), (ids_b, lengths_b) in zip(expected, got):
            assert torch.equal(ids_a, ids_b) and torch.equal(lengths_a, lengths_b)


def test_compile_wraps_the_student_and_saves_the_raw_one(tmp_path):
    # Only the wiring: compiling even a tiny model on CPU takes longer than this test suite should.
    plain = gpt2_distiller(tmp_path / "a", 4)
    compiled = gpt2_distiller(tmp_path / "b", 4, compile=True)
    assert plain.student is plain.raw_student
    assert isinstance(compiled.student, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.student._orig_mod is compiled.raw_student
    assert compiled.optimizer.param_groups[0]["params"][0] is next(compiled.raw_student.parameters())
    compiled.save_checkpoint("checkpoint.pth")
    saved = torch.load(tmp_path / "b" / "dump" / "checkpoint.pth", weights_only=True)
    assert saved.keys() == compiled.raw_student.state_dict().keys()  # no "_orig_mod." prefixes


def test_adamw_is_fused_only_on_cuda(tmp_path):
    assert not gpt2_distiller(tmp_path, 4).optimizer.defaults["fused"]


def test_teacher_runs_in_inference_mode(tmp_path, monkeypatch):
    distiller = gpt2_distiller(tmp_path, 4, alpha_ce=1.0, alpha_clm=1.0)
    seen = []
    distiller.teacher.register_forward_hook(lambda module, args, output: seen.append(torch.is_inference_mode_enabled()))
    ids = torch.randint(1, VOCAB, (2, 8))
    distiller.step(*distiller.prepare_batch_clm((ids, torch.full((2,), 8))))
    assert seen == [True]
