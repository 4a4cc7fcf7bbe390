"""task_training.py: the KL against a hand computation, the loop against a plain reference loop (same batches,
accumulation, clipping, AdamW, linear schedule), checkpoints and the final folder, the finite check, the
vocabulary check and the order of the folders --eval_all_checkpoints evaluates."""

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, BertForQuestionAnswering

import assets
import task_training
from scripts.cli_flags import ArgumentParser
from cli_checks import child_env, free_port
from utils import NonFiniteLossError, UserError

N_FEATURES, SEQ_LEN = 10, 12
# The two-process run (tests/task_training_worker.py): per rank, micro-batches of 2, 2 per step, 2 steps.
DDP_FLAGS = ["--per_gpu_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "2",
             "--learning_rate", "1e-2", "--max_grad_norm", "0.5", "--weight_decay", "0.1", "--seed", "3",
             "--save_steps", "100"]


# The last layer's output LayerNorm bias shifts every position's hidden state alike, hence every start and end
# logit alike, which the softmax ignores: its gradient is 0 in exact arithmetic, rounding noise in floats, and
# Adam turns noise into full-size steps of either sign. Its weights are compared with the other parameters'.
NOISE_ONLY = "bert.encoder.layer.0.output.LayerNorm.bias"


def task_args(output_dir, *flags: str):
    parser = ArgumentParser()
    task_training.add_task_arguments(parser, ["bert", "distilbert", "auto"])
    args = parser.parse_args(["--model_type", "bert", "--model_name_or_path", "unused", "--output_dir",
                              str(output_dir), "--do_train", "--no_cuda", *flags])
    task_training.check_task_arguments(args)
    task_training.setup_run(args, "run_squad_w_distillation.py")
    return args


def tiny_qa_model(vocab_size: int, seed: int = 0) -> BertForQuestionAnswering:
    torch.manual_seed(seed)
    return BertForQuestionAnswering(assets.without_dropout(assets.teacher_config("bert", vocab_size, n_layers=1)))


def features(vocab_size: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(5, vocab_size, (SEQ_LEN,), generator=generator),
         "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
         "start_positions": torch.tensor(i % SEQ_LEN), "end_positions": torch.tensor((i + 2) % SEQ_LEN)}
        for i in range(N_FEATURES)
    ]


def student_loss(student, teacher, batch):
    return {"loss": student(**batch).loss}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dirs):
    return AutoTokenizer.from_pretrained(tokenizer_dirs["bert"])


def reference_adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """The reference runs' optimizer, written out: weight decay 0.1 except on biases and LayerNorm weights."""
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, eps=1e-8)


def test_soft_target_loss_is_the_hand_computed_kl_times_t_squared():
    s_logits = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    t_logits = torch.tensor([[2.0, 0.0, -1.0], [1.0, 1.0, 1.0]])
    temperature = 2.0
    total = 0.0
    for s_row, t_row in zip(s_logits.tolist(), t_logits.tolist()):
        s_norm = sum(math.exp(v / temperature) for v in s_row)
        t_norm = sum(math.exp(v / temperature) for v in t_row)
        for s, t in zip(s_row, t_row):
            p_s, p_t = math.exp(s / temperature) / s_norm, math.exp(t / temperature) / t_norm
            total += p_t * math.log(p_t / p_s)
    expected = total / 2 * temperature**2  # batchmean: divided by the rows
    actual = task_training.soft_target_loss(s_logits, t_logits.to(torch.bfloat16).float(), temperature)
    assert actual.item() == pytest.approx(expected, rel=1e-6)


def test_train_equals_a_plain_loop_and_writes_checkpoints_and_the_final_folder(tmp_path, tokenizer):
    flags = ["--per_gpu_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "3",
             "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2", "--warmup_steps", "1",
             "--max_grad_norm", "0.5", "--weight_decay", "0.1", "--seed", "3"]
    args = task_args(tmp_path / "out", *flags)
    data = features(len(tokenizer))
    student = tiny_qa_model(len(tokenizer))
    reference = tiny_qa_model(len(tokenizer))

    steps = task_training.train(args, student, None, data, student_loss, tokenizer)
    assert steps == 3

    # The reference: the sampler's order (seed + epoch), two micro-batches of two per step, mean loss; the
    # third step takes the last micro-batch of epoch 0 and the first of epoch 1.
    order = [i for epoch in (0, 1) for i in torch.randperm(N_FEATURES, generator=torch.Generator().manual_seed(3 + epoch)).tolist()]
    optimizer = reference_adamw(reference)
    for step in range(3):
        for micro in range(2):
            ids = order[(2 * step + micro) * 2:(2 * step + micro) * 2 + 2]
            batch = {key: torch.stack([data[i][key] for i in ids]) for key in data[0]}
            (reference(**batch).loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * (step / 1 if step < 1 else (3 - step) / 2)  # warm-up over 1 step, then linear to 0 at 3
        optimizer.step()
        optimizer.zero_grad()
    for (name, value), expected in zip(student.state_dict().items(), reference.state_dict().values()):
        if name != NOISE_ONLY:
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)

    out = tmp_path / "out"
    checkpoint = out / "checkpoint-2"
    assert {"model.safetensors", "config.json", "tokenizer.json", "training_args.json", "optimizer.pt",
            "scheduler.pt"} <= {path.name for path in checkpoint.iterdir()}
    assert json.loads((checkpoint / "training_args.json").read_text())["save_steps"] == 2
    assert torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]  # tensors only: safe to load
    assert not (out / "checkpoint-3").exists()
    final = AutoModelForQuestionAnswering.from_pretrained(out)
    for name, value in final.state_dict().items():
        torch.testing.assert_close(value, student.state_dict()[name], msg=name)
    assert list(out.glob("runs/events.out.tfevents.*"))
    assert not [path.name for path in out.iterdir() if path.name.endswith(".tmp")]


def test_a_non_finite_loss_stops_before_the_step_with_nothing_saved(tmp_path, tokenizer):
    args = task_args(tmp_path / "out", "--per_gpu_train_batch_size", "5", "--gradient_accumulation_steps", "2",
                     "--save_steps", "1")
    student = tiny_qa_model(len(tokenizer))
    before = {name: value.clone() for name, value in student.state_dict().items()}
    calls = []

    def nan_on_the_second_micro_batch(model, teacher, batch):
        calls.append(1)
        loss = model(**batch).loss
        return {"loss": loss * (float("nan") if len(calls) == 2 else 1.0), "loss_qa": loss}

    with pytest.raises(NonFiniteLossError, match="loss is not finite at iteration 2"):
        task_training.train(args, student, None, features(len(tokenizer)), nan_on_the_second_micro_batch, tokenizer)
    for name, value in student.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_eval_all_checkpoints_takes_them_in_step_order_then_the_final_model(tmp_path):
    for step in (10, 2, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-best").mkdir()
    (tmp_path / "checkpoint-7").write_text("a file")
    assert task_training.checkpoints_to_evaluate(tmp_path, False) == [tmp_path]
    assert task_training.checkpoints_to_evaluate(tmp_path, True) == [
        tmp_path / "checkpoint-2", tmp_path / "checkpoint-10", tmp_path / "checkpoint-100", tmp_path]


def test_save_model_folder_replaces_files_of_an_existing_folder_and_keeps_the_others(tmp_path, tokenizer):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "predictions_.json").write_text("{}")
    (folder / "config.json").write_text("old")
    task_training.save_model_folder(folder, tiny_qa_model(len(tokenizer)), tokenizer)
    assert (folder / "predictions_.json").read_text() == "{}"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_vocabulary_mismatches_are_refused(tmp_path, tokenizer_dirs, tokenizer):
    student = tiny_qa_model(len(tokenizer))
    with pytest.raises(UserError, match="vocabulary has 50 tokens and the student's"):
        task_training.check_same_vocabulary(tiny_qa_model(50), student)
    other = AutoTokenizer.from_pretrained(tokenizer_dirs["bert"])
    other.add_tokens(["zzzunseen"])
    with pytest.raises(UserError, match="tokenizers differ \\(e.g. token 'zzzunseen'\\)"):
        task_training.check_same_vocabulary(student, student, other, tokenizer)
    task_training.check_same_vocabulary(student, tiny_qa_model(len(tokenizer), seed=1), tokenizer, tokenizer)


def test_teacher_flags_go_together(tmp_path):
    with pytest.raises(UserError, match="--teacher_type needs --teacher_name_or_path"):
        task_args(tmp_path, "--teacher_type", "bert")
    with pytest.raises(UserError, match="non-empty|not empty"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        task_args(tmp_path / "full")


def test_two_gloo_processes_equal_one_process_averaging_their_batches(tmp_path, tokenizer_dirs, tokenizer, repo_root):
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(repo_root / "tests" / "task_training_worker.py"), str(tmp_path / "out"), str(tokenizer_dirs["bert"])]
    result = subprocess.run(command, cwd=tmp_path, env=child_env(repo_root), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]

    # The reference: each rank's batches from its DistributedSampler; DDP averages the ranks' gradients.
    data = features(len(tokenizer))
    per_rank = []
    for rank in (0, 1):
        sampler = task_training.DistributedSampler(data, num_replicas=2, rank=rank, seed=3)
        order = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            indices = list(sampler)
            order += [indices[i:i + 2] for i in range(0, len(indices), 2)]
        per_rank.append(order)
    reference = tiny_qa_model(len(tokenizer))
    optimizer = reference_adamw(reference)
    for step in range(2):
        for micro in range(2):
            for rank in (0, 1):
                ids = per_rank[rank][2 * step + micro]
                batch = {key: torch.stack([data[i][key] for i in ids]) for key in data[0]}
                (reference(**batch).loss / 2 / 2).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * (2 - step) / 2
        optimizer.step()
        optimizer.zero_grad()
    final = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "out").state_dict()
    for name, expected in reference.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.equal(final[name], ranks[0][name]), name
        if name != NOISE_ONLY:
            torch.testing.assert_close(ranks[0][name], expected, rtol=1e-5, atol=1e-6, msg=name)
