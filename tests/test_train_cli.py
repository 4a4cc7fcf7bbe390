"""train.py: flags and defaults, every sanity check through the CLI, the dump_path lifecycle, model loading,
and a real end-to-end run per family (bert -> distilbert MLM, roberta -> roberta MLM, gpt2 -> gpt2 CLM)."""

import errno
import fcntl
import json
import math
import os
import pickle
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

import assets
import run_folder
import train
from cli_checks import FAMILY_FLAGS, STUDENT_OF, base_argv, error_line, run_cli, run_main, with_flags
from scripts.model_families import embeddable_positions
from utils import UserError

# train.main installs torchelastic's error handler, which cannot reach a file descriptor under pytest's capture.
pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

ACTIVE_TERMS = {"bert": {"ce", "mlm", "cos"}, "roberta": {"ce", "mlm", "mse"}, "gpt2": {"ce", "clm", "cos"}}
FROZEN = {
    "bert": {"distilbert.embeddings.position_embeddings.weight"},
    "roberta": {"roberta.embeddings.position_embeddings.weight", "roberta.embeddings.token_type_embeddings.weight"},
    "gpt2": {"transformer.wpe.weight"},
}
N_EPOCH = 3
RUN_FLAGS = [
    "--n_gpu", "0", "--n_epoch", str(N_EPOCH), "--batch_size", "8", "--gradient_accumulation_steps", "1",
    "--learning_rate", "5e-3", "--warmup_prop", "0.1", "--log_interval", "5", "--checkpoint_interval", "20",
    "--seed", "0",
]


# ---------------------------------------------------------------- shared inputs


def assert_one_line_error(stderr: str, fragment: str) -> None:
    line = error_line(stderr)
    assert fragment in line, line


# ---------------------------------------------------------------- end-to-end runs, one per family


@pytest.fixture(scope="module", params=sorted(FAMILY_FLAGS))
def finished_run(request, family_inputs, tmp_path_factory):
    kind = request.param
    dump_path = tmp_path_factory.mktemp(f"run_{kind}") / "dump"
    result = run_cli(base_argv(family_inputs, kind, dump_path) + RUN_FLAGS, cwd=tmp_path_factory.mktemp("cwd"))
    assert result.returncode == 0, result.stderr[-3000:]
    return kind, dump_path, result


def test_the_finished_folder_is_a_model_that_pipeline_loads(finished_run):
    """[+] dump_path holds what from_pretrained and pipeline need: weights, a clean config, the tokenizer."""
    from transformers import pipeline

    kind, dump_path, _ = finished_run
    auto_class = AutoModelForCausalLM if kind == "gpt2" else AutoModelForMaskedLM
    _, info = auto_class.from_pretrained(dump_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not json.loads((dump_path / "config.json").read_text()).get("output_hidden_states")
    tokenizer = AutoTokenizer.from_pretrained(dump_path)
    if kind == "gpt2":
        generated = pipeline("text-generation", model=str(dump_path))("the student", max_new_tokens=2, do_sample=False)
        assert generated[0]["generated_text"].startswith("the student")
        return
    guesses = pipeline("fill-mask", model=str(dump_path))(f"the teacher and the {tokenizer.mask_token} model")
    vocabulary = tokenizer.get_vocab()
    assert len(guesses) == 5 and all(guess["token"] < len(tokenizer) for guess in guesses)
    # Real entries of the teacher's vocabulary, decoded by its tokenizer (an empty one would give none).
    assert all(tokenizer.convert_ids_to_tokens(guess["token"]) in vocabulary for guess in guesses)
    assert [guess["token_str"] for guess in guesses] == [tokenizer.decode([guess["token"]]) for guess in guesses]


def test_run_writes_every_output_file(finished_run):
    kind, dump_path, _ = finished_run
    names = {path.name for path in dump_path.iterdir()}
    expected = {"parameters.json", "git_log.json", "config.json", "checkpoint.pth", "pytorch_model.bin",
                "model.safetensors", "log", *(f"model_epoch_{e}.pth" for e in range(N_EPOCH)),
                ".distillation-run.json", "data_fingerprint.json"}  # the run marker, the data's fingerprint
    assert expected <= names
    assert not [name for name in names if name.endswith(".tmp") or name.startswith(".") and name not in expected]
    parameters = json.loads((dump_path / "parameters.json").read_text())
    flags = {action.dest for action in train.build_parser()._actions if action.dest != "help"}
    assert flags <= set(parameters)
    assert {"special_tok_ids", "max_model_input_size", "is_master", "world_size"} <= set(parameters)
    assert set(json.loads((dump_path / "git_log.json").read_text())) == {"repo_id", "repo_sha", "repo_branch"}


def test_run_saves_a_loadable_student(finished_run):
    kind, dump_path, _ = finished_run
    auto_class = AutoModelForCausalLM if kind == "gpt2" else AutoModelForMaskedLM
    model = auto_class.from_pretrained(dump_path)
    final = torch.load(dump_path / "pytorch_model.bin", weights_only=True)
    for name, value in model.state_dict().items():
        if name in final:
            assert torch.equal(value, final[name]), name
    # Frozen embeddings stay as they were after the first epoch; trained weights moved.
    first_epoch = torch.load(dump_path / "model_epoch_0.pth", weights_only=True)
    for name in FROZEN[kind]:
        assert torch.equal(first_epoch[name], final[name]), name
    assert any(not torch.equal(first_epoch[name], final[name]) for name in final if name not in FROZEN[kind])


def test_run_tensorboard_tags_and_decreasing_loss(finished_run):
    kind, dump_path, _ = finished_run
    events = EventAccumulator(str(dump_path / "log" / "train"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    state = torch.load(dump_path / "pytorch_model.bin", weights_only=True)
    model_class = assets.MODEL_CLASSES[STUDENT_OF[kind]]
    student = model_class(assets.student_config(STUDENT_OF[kind], 10))
    param_names = {name for name, _ in student.named_parameters()}
    assert param_names <= set(state)
    for name in param_names:
        assert {f"parameter_mean/{name}", f"parameter_std/{name}"} <= scalars, name
        has_grad_tags = {f"grad_mean/{name}", f"grad_std/{name}"} <= scalars
        assert has_grad_tags == (name not in FROZEN[kind]), name
    loss_tags = {tag for tag in scalars if tag.startswith("losses/")}
    assert loss_tags == {"losses/cum_avg_loss_epoch", "losses/loss"} | {f"losses/loss_{t}" for t in ACTIVE_TERMS[kind]}
    assert {"learning_rate/lr", "global/memory_usage", "global/speed", "epoch/loss"} <= scalars
    grad_norms = [event.value for event in events.Scalars("global/grad_norm")]  # [+] beside the original's tags
    assert grad_norms and all(math.isfinite(norm) and norm > 0 for norm in grad_norms)
    assert all(event.value > 0 for event in events.Scalars("global/tokens_per_second"))
    assert {"config/training/text_summary", "config/student/text_summary"} <= set(events.Tags()["tensors"])

    epoch_losses = [event.value for event in events.Scalars("epoch/loss")]
    assert len(epoch_losses) == N_EPOCH
    assert all(later < earlier for earlier, later in zip(epoch_losses, epoch_losses[1:])), epoch_losses
    assert epoch_losses[-1] < 0.98 * epoch_losses[0], epoch_losses
    assert all(math.isfinite(event.value) for event in events.Scalars("losses/loss"))


def test_run_logs_are_on_stderr_with_pid(finished_run):
    _, _, result = finished_run
    assert "PID: " in result.stderr and "Training is finished" in result.stderr


# ---------------------------------------------------------------- the sanity checks, each with its message

SANITY_CASES = [
    # (family of the base command, flags appended/replaced, fragment of the message)
    ("bert", {"--alpha_mlm": "0.0"}, "--mlm needs --alpha_mlm > 0 (got 0.0)"),
    ("gpt2", {"--alpha_mlm": "1.0"}, "--alpha_mlm must be 0 without --mlm (got 1.0)"),
    ("bert", {"--alpha_clm": "0.5"}, "exactly one of --alpha_mlm and --alpha_clm must be > 0"),
    ("bert", {"--token_counts": "missing.pickle"},
     "--mlm needs --token_counts, an existing file (got 'missing.pickle')"),
    ("bert", {"--student_type": "gpt2"}, "--mlm needs --student_type distilbert, roberta or bert (got gpt2)"),
    ("bert", {"--teacher_type": "gpt2"}, "--mlm needs --teacher_type bert or roberta (got gpt2)"),
    ("gpt2", {"--student_type": "distilbert"}, "causal LM (no --mlm) needs --student_type gpt2 (got distilbert)"),
    ("gpt2", {"--teacher_type": "bert"}, "causal LM (no --mlm) needs --teacher_type gpt2 (got bert)"),
    ("bert", {"--teacher_type": "roberta"}, "--student_type distilbert needs --teacher_type bert (got roberta)"),
    ("roberta", {"--teacher_type": "bert"}, "--student_type roberta needs --teacher_type roberta (got bert)"),
    ("bert", {"--student_config": "missing.json"}, "--student_config 'missing.json' does not exist"),
    ("bert", {"--student_pretrained_weights": "missing.pth"},
     "--student_pretrained_weights 'missing.pth' does not exist"),
    ("bert", {"--freeze_token_type_embds": None}, "--freeze_token_type_embds only applies to --student_type roberta"),
    ("gpt2", {"--alpha_cos": "-1.0"}, "--alpha_cos must be >= 0 (got -1.0)"),
    ("gpt2", {"--alpha_ce": "0.0", "--alpha_clm": "0.0", "--alpha_cos": "0.0"}, "the loss weights sum to 0"),
    ("gpt2", {"--data_file": "missing.pickle"}, "--data_file 'missing.pickle' does not exist"),
    ("gpt2", {"--n_epoch": "0"}, "--n_epoch must be >= 1 (got 0)"),
    ("gpt2", {"--batch_size": "0"}, "--batch_size must be >= 1 (got 0)"),
    ("gpt2", {"--gradient_accumulation_steps": "0"}, "--gradient_accumulation_steps must be >= 1 (got 0)"),
    ("gpt2", {"--log_interval": "0"}, "--log_interval must be >= 1 (got 0)"),
    ("gpt2", {"--checkpoint_interval": "-3"}, "--checkpoint_interval must be >= 1 (got -3)"),
    ("gpt2", {"--temperature": "0"}, "--temperature must be in [0.001, 1000] (got 0.0)"),
    ("gpt2", {"--warmup_prop": "1.5"}, "--warmup_prop must be in [0, 1] (got 1.5)"),
    ("gpt2", {"--max_grad_norm": "0"}, "--max_grad_norm must be > 0 (got 0.0)"),
    ("bert", {"--mlm_mask_prop": "0"}, "--mlm_mask_prop must be in (0, 1] (got 0.0)"),
    ("bert", {"--word_rand": "0.3"}, "--word_mask, --word_keep and --word_rand must be >= 0 and sum to 1"),
    ("gpt2", {"--fp16": None, "--bf16": None}, "--fp16 and --bf16 are exclusive"),
    ("gpt2", {"--max_model_input_size": "2"}, "--max_model_input_size must be >= 3 (got 2)"),
    ("gpt2", {"--n_gpu": "-1"}, "--n_gpu must be >= 0 (got -1)"),
]


def test_sanity_check_messages_are_distinct():
    fragments = [fragment for _, _, fragment in SANITY_CASES]
    assert len(set(fragments)) == len(fragments)


@pytest.mark.parametrize("kind", sorted(FAMILY_FLAGS))
def test_valid_commands_pass_the_checks(kind, family_inputs, tmp_path):
    train.sanity_checks(train.build_parser().parse_args(base_argv(family_inputs, kind, tmp_path / "dump")))


@pytest.mark.parametrize(("kind", "flags", "fragment"), SANITY_CASES, ids=[c[2][:40] for c in SANITY_CASES])
def test_each_sanity_check_fails_through_main_with_one_line(kind, flags, fragment, family_inputs, tmp_path, capsys):
    argv = with_flags(base_argv(family_inputs, kind, tmp_path / "dump"), flags)
    with pytest.raises(UserError) as error:
        train.sanity_checks(train.build_parser().parse_args(argv))
    assert fragment in str(error.value)
    status, stderr = run_main(argv, capsys)
    assert status == 1
    assert_one_line_error(stderr, fragment)
    assert not (tmp_path / "dump").exists()


def test_sanity_check_through_a_real_process(family_inputs, tmp_path):
    argv = with_flags(base_argv(family_inputs, "bert", tmp_path / "dump"), {"--alpha_mlm": "0.0"})
    result = run_cli(argv, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --mlm needs --alpha_mlm > 0 (got 0.0)"


# ---------------------------------------------------------------- checks that need the models: compatibility


def _mismatched_config(tmp_path, kind: str, **changes) -> str:
    config = assets.student_config(STUDENT_OF[kind], 400)
    for name, value in changes.items():
        setattr(config, name, value)
    path = tmp_path / "mismatched.json"
    config.to_json_file(path)
    return str(path)


@pytest.mark.parametrize(
    ("kind", "changes", "fragment"),
    [
        ("bert", {"vocab_size": 999}, "differ in vocabulary size"),
        ("roberta", {"max_position_embeddings": 130}, "differ in maximum positions"),
    ],
)
def test_student_teacher_mismatch_is_a_clear_error(kind, changes, fragment, family_inputs, tmp_path, capsys):
    argv = with_flags(base_argv(family_inputs, kind, tmp_path / "dump"),
                       {"--student_config": _mismatched_config(tmp_path, kind, **changes), "--n_gpu": "0"})
    status, stderr = run_main(argv, capsys)
    assert status == 1
    assert_one_line_error(stderr, fragment)


def test_counts_of_another_vocabulary_are_refused(family_inputs, tmp_path, capsys):
    counts = tmp_path / "counts.pickle"
    counts.write_bytes(pickle.dumps([1] * 50))
    argv = with_flags(base_argv(family_inputs, "bert", tmp_path / "dump"),
                       {"--token_counts": str(counts), "--n_gpu": "0"})
    status, stderr = run_main(argv, capsys)
    assert status == 1
    assert_one_line_error(stderr, "--token_counts has 50 entries but the vocabulary has")


def test_max_model_input_size_beyond_the_teacher_is_refused(family_inputs, tmp_path, capsys):
    argv = with_flags(base_argv(family_inputs, "gpt2", tmp_path / "dump"),
                       {"--max_model_input_size": "65", "--n_gpu": "0"})
    status, stderr = run_main(argv, capsys)
    assert status == 1
    assert_one_line_error(stderr, "--max_model_input_size 65 exceeds the teacher's 64 positions")


def test_fp16_opt_level_is_warned_once_and_a_bad_teacher_is_one_line(family_inputs, tmp_path, capsys, caplog):
    not_a_teacher = tmp_path / "not_a_teacher"
    not_a_teacher.mkdir()
    argv = with_flags(base_argv(family_inputs, "gpt2", tmp_path / "dump"),
                       {"--teacher_name": str(not_a_teacher), "--fp16": None, "--n_gpu": "0"})
    status, stderr = run_main(argv, capsys)
    assert status == 1
    assert_one_line_error(stderr, f"could not load a tokenizer from --teacher_name '{not_a_teacher}'")
    assert caplog.text.count("--fp16_opt_level O1 is ignored") == 1
    assert not (tmp_path / "dump").exists()


# ---------------------------------------------------------------- dump_path lifecycle


def _existing_dump(tmp_path):
    """A previous run's folder from before run markers (what --force may replace: it holds a run's records),
    its final weights the file to keep safe."""
    dump = tmp_path / "dump"
    (dump / "log").mkdir(parents=True)
    (dump / "parameters.json").write_text("{}")
    (dump / "pytorch_model.bin").write_text("a previous run's weights")
    return dump


def test_existing_dump_path_without_force_is_left_untouched(family_inputs, tmp_path):
    dump = _existing_dump(tmp_path)
    result = run_cli(base_argv(family_inputs, "gpt2", dump) + ["--n_gpu", "0"], cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "already exists; pass --force to replace it")
    assert sorted(p.name for p in dump.iterdir()) == ["log", "parameters.json", "pytorch_model.bin"]


def test_force_replaces_only_after_everything_loaded(family_inputs, tmp_path, capsys):
    dump = _existing_dump(tmp_path)
    argv = with_flags(base_argv(family_inputs, "bert", dump),
                       {"--student_config": _mismatched_config(tmp_path, "bert", vocab_size=999), "--force": None,
                        "--n_gpu": "0"})
    status, stderr = run_main(argv, capsys)
    assert status == 1 and "differ in vocabulary size" in stderr
    assert sorted(p.name for p in dump.iterdir()) == ["log", "parameters.json", "pytorch_model.bin"]


def test_force_refuses_to_delete_the_inputs(family_inputs, tmp_path, capsys):
    dump = _existing_dump(tmp_path)
    data_copy = dump / "data.pickle"
    data_copy.write_bytes(open(family_inputs["gpt2"]["data_file"], "rb").read())
    argv = with_flags(base_argv(family_inputs, "gpt2", dump), {"--data_file": str(data_copy), "--force": None,
                                                                 "--n_gpu": "0"})
    status, stderr = run_main(argv, capsys)
    assert status == 1
    assert_one_line_error(stderr, "holds --data_file")
    assert data_copy.exists()


# ---------------------------------------------------------------- one live run per --dump_path


@contextmanager
def locked_by_this_process(folder):
    """flock on `folder` through a descriptor of this test, as another run's master holds its dump path."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(descriptor)


def is_locked(folder) -> bool:
    """Whether some open descriptor holds a flock on `folder` (this test then fails to take it)."""
    try:
        with locked_by_this_process(folder):
            return False
    except BlockingIOError:
        return True


def test_a_dump_path_another_process_holds_is_refused_untouched_on_resume(family_inputs, tmp_path):
    dump = _existing_dump(tmp_path)
    with locked_by_this_process(dump):
        result = run_cli(base_argv(family_inputs, "gpt2", dump) + ["--n_gpu", "0", "--resume"], cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "is in use by another run that is still going")
    assert sorted(p.name for p in dump.iterdir()) == ["log", "parameters.json", "pytorch_model.bin"]


def test_force_does_not_replace_a_dump_path_in_use(family_inputs, tmp_path, capsys):
    dump = _existing_dump(tmp_path)
    with locked_by_this_process(dump):
        status, stderr = run_main(base_argv(family_inputs, "gpt2", dump) + ["--n_gpu", "0", "--force"], capsys)
    assert status == 1
    assert_one_line_error(stderr, "is in use by another run that is still going")
    assert sorted(p.name for p in dump.iterdir()) == ["log", "parameters.json", "pytorch_model.bin"]


@pytest.mark.parametrize("existing", [True, False], ids=["replaced with --force", "new"])
def test_the_master_holds_its_dump_path_while_it_trains(existing, family_inputs, tmp_path, monkeypatch):
    dump = _existing_dump(tmp_path) if existing else tmp_path / "new" / "dump"
    held_during_training = []
    monkeypatch.setattr(
        train.Distiller, "train", lambda distiller, previous_run: held_during_training.append(is_locked(dump))
    )
    train.main(base_argv(family_inputs, "gpt2", dump) + ["--n_gpu", "0", "--force"])
    assert held_during_training == [True]
    assert not is_locked(dump)  # released at the end
    assert (dump / "parameters.json").is_file() and not (dump / "pytorch_model.bin").exists()


def test_a_filesystem_without_locks_is_warned_about_not_refused(tmp_path, monkeypatch, caplog):
    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_folder.fcntl, "flock", no_locks)
    with run_folder.RunFolderLock(tmp_path) as lock:
        lock.acquire()
    assert "nothing stops a second run writing there" in caplog.text


# ---------------------------------------------------------------- non-finite loss through the CLI


def test_nan_loss_exits_non_zero_with_step_and_term(family_inputs, teacher_dirs, tmp_path):
    poisoned = tmp_path / "poisoned-teacher"
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dirs["gpt2"])
    with torch.no_grad():  # finite weights (those are checked at load) whose outputs overflow to inf and NaN
        teacher.transformer.ln_f.weight.fill_(3e38)
    teacher.save_pretrained(poisoned)
    AutoTokenizer.from_pretrained(teacher_dirs["gpt2"]).save_pretrained(poisoned)
    dump = tmp_path / "dump"
    argv = with_flags(base_argv(family_inputs, "gpt2", dump),
                       {"--teacher_name": str(poisoned), "--n_gpu": "0", "--gradient_accumulation_steps": "1",
                        "--checkpoint_interval": "1"})
    result = run_cli(argv, cwd=tmp_path)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "loss_ce is not finite at iteration 1")
    assert not (dump / "checkpoint.pth").exists() and not (dump / "pytorch_model.bin").exists()


# ---------------------------------------------------------------- parser, loading and pure helpers

F_DEFAULTS = dict(
    force=False, student_pretrained_weights=None, temperature=2.0, alpha_ce=0.5, alpha_mlm=0.0, alpha_clm=0.5,
    alpha_mse=0.0, alpha_cos=0.0, mlm=False, mlm_mask_prop=0.15, word_mask=0.8, word_keep=0.1, word_rand=0.1,
    mlm_smoothing=0.7, token_counts=None, restrict_ce_to_mask=False, freeze_pos_embs=False,
    freeze_token_type_embds=False, n_epoch=3, batch_size=5, group_by_size=True, gradient_accumulation_steps=50,
    warmup_prop=0.05, weight_decay=0.0, learning_rate=5e-4, adam_epsilon=1e-6, max_grad_norm=5.0,
    initializer_range=0.02, fp16=False, fp16_opt_level="O1", n_gpu=1, local_rank=-1, seed=56, log_interval=500,
    checkpoint_interval=4000, bf16=False, max_model_input_size=None,
)
REQUIRED = ["--dump_path", "d", "--data_file", "f", "--student_type", "gpt2", "--student_config", "c",
            "--teacher_type", "gpt2", "--teacher_name", "t"]


def test_every_flag_has_its_original_default():
    args = vars(train.build_parser().parse_args(REQUIRED))
    assert {name: args[name] for name in F_DEFAULTS} == F_DEFAULTS


def test_group_by_size_is_a_switch_that_turns_grouping_off():
    assert train.build_parser().parse_args(REQUIRED + ["--group_by_size"]).group_by_size is False
    assert "turns grouping OFF" in train.build_parser().format_help().replace("\n", " ").replace("  ", " ")


def test_loss_chunk_size_is_a_non_negative_integer_with_fusion_on_by_default(capsys):
    assert train.build_parser().parse_args(REQUIRED).loss_chunk_size > 0
    assert train.build_parser().parse_args(REQUIRED + ["--loss_chunk_size", "0"]).loss_chunk_size == 0
    for value, reason in (("-1", "must be >= 0, got -1"), ("1.5", "expected an integer, got '1.5'")):
        with pytest.raises(SystemExit) as exit_info:
            train.build_parser().parse_args(REQUIRED + ["--loss_chunk_size", value])
        assert exit_info.value.code == 2
        assert f"argument --loss_chunk_size: {reason}" in capsys.readouterr().err


@pytest.mark.parametrize("spelling", ["--local_rank", "--local-rank", "--local-rank=3"])
def test_local_rank_accepts_both_launcher_spellings(spelling):
    argv = REQUIRED + ([spelling] if "=" in spelling else [spelling, "3"])
    assert train.build_parser().parse_args(argv).local_rank == 3


def test_token_probs_from_counts():
    probs = train.token_probs_from_counts([0, 1, 8, 100, 5], special_ids=[4], smoothing=0.7)
    assert probs.dtype == torch.float32
    assert probs.tolist() == pytest.approx([1.0, 1.0, 8**-0.7, 100**-0.7, 0.0])


def test_special_token_ids_and_max_input_size(teacher_dirs):
    bert = AutoTokenizer.from_pretrained(teacher_dirs["bert"])
    assert train.required_special_token_ids(bert, mlm=True) == {
        "unk_token": 1, "sep_token": 3, "pad_token": 0, "cls_token": 2, "mask_token": 4}
    with pytest.raises(UserError, match="no bos_token, eos_token"):
        train.required_special_token_ids(bert, mlm=False)
    roberta = AutoModelForMaskedLM.from_pretrained(teacher_dirs["roberta"])
    assert embeddable_positions(roberta.config) == assets.MAX_LEN
    params = assets.distiller_params("unused", teacher_type="roberta", max_model_input_size=None)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dirs["roberta"])
    tokenizer.model_max_length = 10**30  # hub tokenizers without a limit report a huge number
    assert train.max_model_input_size(params, tokenizer, roberta, roberta.config) == assets.MAX_LEN
    assert train.max_model_input_size(params, tokenizer, None, roberta.config) == assets.MAX_LEN


@pytest.fixture
def reference_student():
    torch.manual_seed(3)
    return assets.MODEL_CLASSES["distilbert"](assets.student_config("distilbert", 400))


def _student_args(tmp_path, weights) -> object:
    config = tmp_path / "student.json"
    assets.student_config("distilbert", 400).to_json_file(config)
    return assets.distiller_params("unused", student_type="distilbert", teacher_type="bert", student_config=str(config),
                                   student_pretrained_weights=None if weights is None else str(weights))


@pytest.mark.parametrize("form", ["torch_save", "safetensors", "save_pretrained"])
def test_student_initialised_from_every_weight_format(form, reference_student, tmp_path):
    state = reference_student.state_dict()
    if form == "torch_save":
        weights = tmp_path / "student.pth"
        torch.save(state, weights)
    elif form == "safetensors":
        weights = tmp_path / "student.safetensors"
        save_file({name: value.clone().contiguous() for name, value in state.items()}, weights)
    else:
        weights = tmp_path / "pretrained"
        reference_student.save_pretrained(weights)
    student = train.build_student(_student_args(tmp_path, weights))
    assert not student.config.output_hidden_states  # asked for per call; a saved config must not force it
    for name, value in student.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_missing_and_unexpected_keys_are_reported(reference_student, tmp_path, caplog):
    state = reference_student.state_dict()
    state.pop("vocab_transform.bias")
    state["teacher_only.weight"] = torch.zeros(2)
    weights = tmp_path / "partial.pth"
    torch.save(state, weights)
    train.build_student(_student_args(tmp_path, weights))
    assert "vocab_transform.bias" in caplog.text and "teacher_only.weight" in caplog.text


def test_weights_of_another_shape_are_a_user_error(tmp_path):
    other = assets.MODEL_CLASSES["distilbert"](assets.student_config("distilbert", 123))
    weights = tmp_path / "other.pth"
    torch.save(other.state_dict(), weights)
    with pytest.raises(UserError, match="does not fit the student"):
        train.build_student(_student_args(tmp_path, weights))


def test_freezing(tmp_path):
    for student_type, flags, frozen in [
        ("distilbert", {}, {"distilbert.embeddings.position_embeddings.weight"}),
        ("roberta", {"freeze_pos_embs": True, "freeze_token_type_embds": True},
         {"roberta.embeddings.position_embeddings.weight", "roberta.embeddings.token_type_embeddings.weight"}),
        ("gpt2", {"freeze_pos_embs": True}, {"transformer.wpe.weight"}),
        ("gpt2", {}, set()),
    ]:
        student = assets.MODEL_CLASSES[student_type](assets.student_config(student_type, 50))
        train.freeze_embeddings(student, assets.distiller_params("unused", student_type=student_type, **flags))
        assert {name for name, p in student.named_parameters() if not p.requires_grad} == frozen, student_type


# ---------------------------------------------------------------- no-teacher baseline and held-out evaluation


def test_mlm_only_run_needs_no_teacher_weights_and_logs_eval(family_inputs, teacher_dirs, tmp_path):
    """α_ce = α_mse = α_cos = 0: the teacher's weights are never loaded (here there are none), a BERT
    student trains by masked LM alone (a no-teacher baseline), and --eval_data_file
    adds eval/ figures at each epoch end and every --eval_interval iterations."""
    weightless = tmp_path / "weightless-teacher"
    weightless.mkdir()
    for path in teacher_dirs["bert"].iterdir():
        if not path.name.endswith((".safetensors", ".bin")):
            (weightless / path.name).write_bytes(path.read_bytes())
    inputs = family_inputs["bert"]
    dump = tmp_path / "dump"
    argv = [
        "--dump_path", str(dump), "--data_file", inputs["data_file"], "--token_counts", inputs["token_counts"],
        "--student_type", "bert", "--student_config", str(weightless / "config.json"),
        "--teacher_type", "bert", "--teacher_name", str(weightless), "--mlm", "--alpha_mlm", "1.0",
        "--alpha_ce", "0.0", "--alpha_clm", "0.0", "--eval_data_file", inputs["data_file"], "--eval_interval", "7",
        *RUN_FLAGS,
    ]
    argv[argv.index("--n_epoch") + 1] = "2"
    result = run_cli(argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the teacher is not loaded" in result.stderr
    events = EventAccumulator(str(dump / "log" / "train"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"eval/loss", "eval/perplexity", "eval/accuracy", "eval/n_targets"} <= scalars
    assert not {"eval/teacher_agreement", "losses/loss_ce"} & scalars
    steps = [event.step for event in events.Scalars("eval/accuracy")]
    assert [step for step in steps if step % 7 == 0][:2] == [7, 14]
    assert 1 <= len([step for step in steps if step % 7]) <= 2  # the two epoch ends (unless one is a multiple of 7)
    assert len(events.Scalars("epoch/loss")) == 2
    accuracy = [event.value for event in events.Scalars("eval/accuracy")]
    assert accuracy[-1] > accuracy[0], accuracy
    assert (dump / "model.safetensors").exists()
