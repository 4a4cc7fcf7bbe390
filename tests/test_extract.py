"""scripts/extract_distilbert.py and scripts/extract.py: the student starts as chosen teacher layers.

The contract (SPEC §3): all layers extracted into a student of the same depth reproduce the teacher's
logits; with the default layers, student layer i is exactly teacher layer (0 2 4 7 9 11)[i]; the output
loads into the student built from its training config with no unexpected key; bad input is one line.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from subprocess import CompletedProcess

import assets
import extract
import extract_distilbert
import extraction
import pytest
import torch
from cli_utils import ScriptError, run_cli
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BertConfig,
    DistilBertConfig,
    DistilBertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    RobertaConfig,
    RobertaForMaskedLM,
    ViTConfig,
)

DEFAULT_LAYERS = [0, 2, 4, 7, 9, 11]
MODULE = {"bert": extract_distilbert, "roberta": extract, "gpt2": extract}
STUDENT_CLASS = {"bert": DistilBertForMaskedLM, "roberta": RobertaForMaskedLM, "gpt2": GPT2LMHeadModel}
TRAINING_CONFIG = {"bert": "distilbert-base-uncased", "roberta": "distilroberta-base", "gpt2": "distilgpt2"}


def run_main(kind: str, teacher_dir: Path, out: Path, *flags: str) -> dict[str, torch.Tensor]:
    """Run the script's main() in this process and load what it wrote, as train.py will."""
    MODULE[kind].main(["--model_type", kind, "--model_name", str(teacher_dir), "--dump_checkpoint", str(out), *flags])
    return torch.load(out, weights_only=True)


def load_saved_teacher(teacher_dir: Path, kind: str) -> torch.nn.Module:
    return assets.MODEL_CLASSES[kind].from_pretrained(teacher_dir).eval()


def same_depth_student(kind: str, teacher: torch.nn.Module) -> torch.nn.Module:
    """A student with the teacher's depth and sizes; DistilBERT made as close to BERT as it can be.

    Its random init is seeded apart from the teacher's (tiny teachers use seeds 0 and 1), so that
    only what the checkpoint loads can make it agree with the teacher.
    """
    cfg = teacher.config
    torch.manual_seed(1234)
    if kind == "bert":
        # Learned positions (the teacher's are copied in), BERT's gelu; DistilBERT's LayerNorm eps is a
        # hard-coded 1e-12, which is BertConfig's default layer_norm_eps.
        assert cfg.layer_norm_eps == 1e-12 and cfg.hidden_act == "gelu", "tiny BERT teacher changed"
        student_cfg = DistilBertConfig(
            vocab_size=cfg.vocab_size, dim=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
            n_heads=cfg.num_attention_heads, hidden_dim=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings, sinusoidal_pos_embds=False, activation="gelu",
        )
        return DistilBertForMaskedLM(student_cfg).eval()
    return STUDENT_CLASS[kind](assets.teacher_config(kind, cfg.vocab_size, n_layers=cfg.num_hidden_layers)).eval()


def random_ids(vocab_size: int, seed: int = 0) -> torch.Tensor:
    """(2, 12) ids above the special tokens, so RoBERTa's position ids are not shifted by padding."""
    return torch.randint(5, vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def tiny_student_from_training_config(repo_root: Path, kind: str, vocab_size: int) -> torch.nn.Module:
    """The student of training_configs/<name>.json with its width shrunk to the tiny teachers' (depth kept)."""
    raw = json.loads((repo_root / "training_configs" / f"{TRAINING_CONFIG[kind]}.json").read_text())
    shrink = {
        "bert": dict(dim=32, hidden_dim=128, n_heads=2, max_position_embeddings=assets.MAX_LEN),
        "roberta": dict(
            hidden_size=32, intermediate_size=128, num_attention_heads=2, max_position_embeddings=assets.MAX_LEN + 2
        ),
        "gpt2": dict(n_embd=32, n_head=2, n_positions=assets.MAX_LEN),
    }[kind]
    config_class = {"bert": DistilBertConfig, "roberta": RobertaConfig, "gpt2": GPT2Config}[kind]
    return STUDENT_CLASS[kind](config_class.from_dict({**raw, **shrink, "vocab_size": vocab_size}))


@pytest.fixture(scope="module")
def deep_teacher_dirs(tmp_path_factory, tokenizer_dirs) -> dict[str, Path]:
    """12-layer tiny teachers, so the default layers 0 2 4 7 9 11 exist."""
    root = tmp_path_factory.mktemp("deep-teachers")
    return {
        kind: assets.build_teacher(kind, root / f"tiny-{kind}-12", tokenizer_dirs[kind], n_layers=12, seed=1)
        for kind in ("bert", "roberta", "gpt2")
    }


# ---------------------------------------------------------------- (1) all layers: same logits as the teacher


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2"])
def test_all_layers_reproduce_teacher_logits(kind, teacher_dirs, tmp_path):
    teacher = load_saved_teacher(teacher_dirs[kind], kind)
    n_layers = teacher.config.num_hidden_layers
    layers = [str(idx) for idx in range(n_layers)]
    state = run_main(kind, teacher_dirs[kind], tmp_path / "student.pth", "--vocab_transform", "--layers", *layers)
    if kind == "bert":
        # DistilBERT has no token types; BERT adds token-type row 0 everywhere, so zero it to compare.
        teacher.bert.embeddings.token_type_embeddings.weight.data.zero_()
    student = same_depth_student(kind, teacher)
    ids = random_ids(teacher.config.vocab_size)
    with torch.no_grad():
        assert not torch.allclose(student(ids).logits, teacher(ids).logits, atol=1e-3), "student starts as teacher"
        loaded = student.load_state_dict(state, strict=False)
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)
    assert loaded.unexpected_keys == []


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_without_vocab_transform_the_head_transform_stays_at_student_init(kind, teacher_dirs, tmp_path):
    """Without --vocab_transform only the MLM head's transform (dense + LayerNorm) is not copied.

    So the checkpoint lacks exactly those tensors, the student keeps its random transform, and its
    logits differ from the teacher's although everything below the head is identical.
    """
    teacher = load_saved_teacher(teacher_dirs[kind], kind)
    layers = [str(idx) for idx in range(teacher.config.num_hidden_layers)]
    state = run_main(kind, teacher_dirs[kind], tmp_path / "student.pth", "--layers", *layers)
    modules = {"bert": ["vocab_transform", "vocab_layer_norm"], "roberta": ["lm_head.dense", "lm_head.layer_norm"]}
    transform = [f"{module}.{param}" for module in modules[kind] for param in ("weight", "bias")]
    if kind == "bert":
        teacher.bert.embeddings.token_type_embeddings.weight.data.zero_()
    student = same_depth_student(kind, teacher)
    missing = student.load_state_dict(state, strict=False).missing_keys

    assert not set(transform) & set(state)
    assert set(transform) <= set(missing)
    ids = random_ids(teacher.config.vocab_size)
    with torch.no_grad():
        student_out = student(ids, output_hidden_states=True)
        teacher_out = teacher(ids, output_hidden_states=True)
    torch.testing.assert_close(student_out.hidden_states[-1], teacher_out.hidden_states[-1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(student_out.logits, teacher_out.logits, atol=1e-3)


# ------------------------------------------- (2)+(3) default layers: exact tensors, exact coverage, clean load

# Student tensor <- teacher tensor inside one layer, from SPEC §3 (written here independently of the scripts).
DISTILBERT_LAYER = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}
STUDENT_LAYER_PREFIX = {
    "bert": "distilbert.transformer.layer", "roberta": "roberta.encoder.layer", "gpt2": "transformer.h"
}
TEACHER_LAYER_PREFIX = {"bert": "bert.encoder.layer", "roberta": "roberta.encoder.layer", "gpt2": "transformer.h"}
# Tensors outside the layers: student <- teacher.
OUTSIDE_LAYERS = {
    "bert": {
        "distilbert.embeddings.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
        "distilbert.embeddings.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
        "distilbert.embeddings.LayerNorm.weight": "bert.embeddings.LayerNorm.weight",
        "distilbert.embeddings.LayerNorm.bias": "bert.embeddings.LayerNorm.bias",
        "vocab_transform.weight": "cls.predictions.transform.dense.weight",
        "vocab_transform.bias": "cls.predictions.transform.dense.bias",
        "vocab_layer_norm.weight": "cls.predictions.transform.LayerNorm.weight",
        "vocab_layer_norm.bias": "cls.predictions.transform.LayerNorm.bias",
        "vocab_projector.weight": "cls.predictions.decoder.weight",
        "vocab_projector.bias": "cls.predictions.bias",
    },
    "roberta": {
        key: key
        for key in [
            "roberta.embeddings.word_embeddings.weight",
            "roberta.embeddings.position_embeddings.weight",
            "roberta.embeddings.token_type_embeddings.weight",
            "roberta.embeddings.LayerNorm.weight",
            "roberta.embeddings.LayerNorm.bias",
            "lm_head.dense.weight",
            "lm_head.dense.bias",
            "lm_head.layer_norm.weight",
            "lm_head.layer_norm.bias",
            "lm_head.decoder.weight",
            "lm_head.bias",
        ]
    },
    "gpt2": {
        key: key
        for key in [
            "transformer.wte.weight",
            "transformer.wpe.weight",
            "transformer.ln_f.weight",
            "transformer.ln_f.bias",
            "lm_head.weight",
        ]
    },
}
# Student tensors the checkpoint deliberately lacks (with --vocab_transform).
STUDENT_NOT_COVERED = {
    "bert": [],
    "roberta": ["lm_head.decoder.bias"],  # tied to lm_head.bias: loaded through it
    "gpt2": [],
}
# Teacher tensors nothing is copied from, besides the unchosen layers.
TEACHER_NOT_USED = {
    "bert": ["bert.embeddings.token_type_embeddings.weight", "cls.predictions.decoder.bias"],  # no token types; tied
    "roberta": ["lm_head.decoder.bias"],  # tied to lm_head.bias
    "gpt2": [],
}


def student_layer_key(kind: str, student_idx: int, teacher_key: str, teacher_idx: int) -> str:
    """Where the default extraction must put a teacher layer tensor."""
    suffix = teacher_key.removeprefix(f"{TEACHER_LAYER_PREFIX[kind]}.{teacher_idx}.")
    module, param = suffix.rsplit(".", 1)
    if kind == "bert":
        module = {teacher: student for student, teacher in DISTILBERT_LAYER.items()}[module]
    return f"{STUDENT_LAYER_PREFIX[kind]}.{student_idx}.{module}.{param}"


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2"])
def test_default_layers_copy_exact_teacher_tensors(kind, deep_teacher_dirs, repo_root, tmp_path):
    teacher = load_saved_teacher(deep_teacher_dirs[kind], kind)
    teacher_state = teacher.state_dict()
    state = run_main(kind, deep_teacher_dirs[kind], tmp_path / "student.pth", "--vocab_transform")

    expected = dict(OUTSIDE_LAYERS[kind])
    layer_key = re.compile(rf"{re.escape(TEACHER_LAYER_PREFIX[kind])}\.(\d+)\.")
    for teacher_key in teacher_state:
        match = layer_key.match(teacher_key)
        if match and int(match.group(1)) in DEFAULT_LAYERS:
            teacher_idx = int(match.group(1))
            student_idx = DEFAULT_LAYERS.index(teacher_idx)
            expected[student_layer_key(kind, student_idx, teacher_key, teacher_idx)] = teacher_key
    assert sorted(state) == sorted(expected)
    for student_key, teacher_key in expected.items():
        assert torch.equal(state[student_key], teacher_state[teacher_key]), (student_key, teacher_key)

    unchosen = {key for key in teacher_state if (m := layer_key.match(key)) and int(m.group(1)) not in DEFAULT_LAYERS}
    assert sorted(set(teacher_state) - set(expected.values()) - unchosen) == sorted(TEACHER_NOT_USED[kind])

    student = tiny_student_from_training_config(repo_root, kind, teacher.config.vocab_size)
    loaded = student.load_state_dict(state, strict=False)
    assert loaded.unexpected_keys == []
    assert sorted(loaded.missing_keys) == sorted(STUDENT_NOT_COVERED[kind])


@pytest.mark.parametrize(
    ("kind", "teacher_config", "training_config"),
    [
        ("bert", BertConfig(), "distilbert-base-uncased"),  # bert-base-uncased
        ("bert", BertConfig(vocab_size=28996), "distilbert-base-cased"),  # bert-base-cased
        ("bert", BertConfig(vocab_size=119547), "distilbert-base-multilingual-cased"),
        (
            "roberta",
            RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5),
            "distilroberta-base",
        ),
        ("gpt2", GPT2Config(), "distilgpt2"),  # gpt2
    ],
)
def test_full_size_extraction_fits_the_training_config(kind, teacher_config, training_config, repo_root):
    """Shapes of a full-size extraction match the released student configs (on the meta device: no memory)."""
    config_file = repo_root / "training_configs" / f"{training_config}.json"
    student_config = STUDENT_CLASS[kind].config_class.from_pretrained(config_file)
    with torch.device("meta"):
        teacher = assets.MODEL_CLASSES[kind](teacher_config)
        student = STUDENT_CLASS[kind](student_config)
    pairs = MODULE[kind].TABLES[kind].key_pairs(DEFAULT_LAYERS, vocab_transform=True)
    state = extraction.transfer(teacher.state_dict(), pairs)
    student_state = student.state_dict()

    assert {key: tuple(t.shape) for key, t in state.items()} == {key: tuple(student_state[key].shape) for key in state}
    assert sorted(set(student_state) - set(state)) == sorted(STUDENT_NOT_COVERED[kind])


# --------------------------------------------------------------------- output formats and tied weights


def test_tensors_are_independent_contiguous_copies(teacher_dirs, tmp_path):
    teacher = load_saved_teacher(teacher_dirs["gpt2"], "gpt2")
    pairs = extract.GPT2_TO_DISTILGPT2.key_pairs([0, 1], vocab_transform=False)
    state = extraction.transfer(teacher.state_dict(), pairs)

    def storage(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage().data_ptr()

    assert all(tensor.is_contiguous() for tensor in state.values())
    assert not {storage(t) for t in state.values()} & {storage(t) for t in teacher.state_dict().values()}
    # Tied in the teacher (lm_head = wte), separate in the checkpoint, so safetensors can save it.
    assert storage(state["lm_head.weight"]) != storage(state["transformer.wte.weight"])


def test_safetensors_output(teacher_dirs, tmp_path):
    out = tmp_path / "student.safetensors"
    extract.main(["--model_type", "roberta", "--model_name", str(teacher_dirs["roberta"]), "--dump_checkpoint",
                  str(out), "--layers", "1", "--vocab_transform"])
    state = load_file(out)
    teacher_state = load_saved_teacher(teacher_dirs["roberta"], "roberta").state_dict()

    assert torch.equal(state["roberta.encoder.layer.0.output.dense.weight"],
                       teacher_state["roberta.encoder.layer.1.output.dense.weight"])
    assert "lm_head.dense.weight" in state


def test_default_output_name_follows_the_original():
    parser = extraction.build_parser("test", ["bert"], extract_distilbert.DEFAULT_NAMES)
    args = parser.parse_args([])
    extraction.resolve_defaults(args, extract_distilbert.DEFAULT_NAMES)
    assert (args.model_name, args.dump_checkpoint) == (
        "bert-base-uncased", "serialization_dir/tf_bert-base-uncased_0247911.pth"
    )

    args = parser.parse_args(["--model_name", "/models/my-bert/", "--layers", "0", "5"])
    extraction.resolve_defaults(args, extract_distilbert.DEFAULT_NAMES)
    assert args.dump_checkpoint == "serialization_dir/tf_my-bert_05.pth"


# ---------------------------------------------------------------------------------- (4) bad input


@pytest.mark.parametrize(
    ("kind", "flags", "message"),
    [
        ("roberta", ["--layers", "0", "3"], "--layers 3 out of range: the teacher has 2 layers"),
        ("gpt2", ["--layers", "1", "1"], "--layers repeats 1"),
        ("bert", ["--layers", "2"], "--layers 2 out of range"),
    ],
)
def test_bad_layers_are_refused_before_writing(kind, flags, message, teacher_dirs, tmp_path):
    out = tmp_path / "student.pth"
    argv = ["--model_type", kind, "--model_name", str(teacher_dirs[kind]), "--dump_checkpoint", str(out), *flags]
    with pytest.raises(ScriptError, match=re.escape(message)):
        MODULE[kind].main(argv)
    assert list(tmp_path.iterdir()) == []


def test_teacher_of_another_family_is_refused(teacher_dirs, tmp_path):
    with pytest.raises(ScriptError, match="is a 'roberta' model, not a 'bert' teacher"):
        extract_distilbert.main(["--model_name", str(teacher_dirs["roberta"]), "--dump_checkpoint",
                                 str(tmp_path / "x.pth")])
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_lacking_a_copied_tensor_is_refused(teacher_dirs, tmp_path):
    """A checkpoint without the MLM head would give a random vocab_projector: refuse it."""
    teacher_dir = tmp_path / "headless-bert"
    shutil.copytree(teacher_dirs["bert"], teacher_dir)
    weights = load_file(teacher_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("cls.")}, teacher_dir / "model.safetensors",
              metadata={"format": "pt"})
    out = tmp_path / "student.pth"
    with pytest.raises(ScriptError, match="the checkpoint lacks .* tensor"):
        extract_distilbert.main(["--model_name", str(teacher_dir), "--dump_checkpoint", str(out), "--layers", "0", "1"])
    assert not out.exists()


# ------------------------------------------------------------- the real CLIs, as subprocesses, from elsewhere


def gpt2_teacher_with_legacy_buffers(teacher_dir: Path, out_dir: Path) -> Path:
    """A copy of `teacher_dir` whose weights carry the causal-mask buffers old GPT-2 checkpoints stored."""
    shutil.copytree(teacher_dir, out_dir)
    weights = load_file(out_dir / "model.safetensors")
    n_positions = weights["transformer.wpe.weight"].shape[0]
    for block in {int(key.split(".")[2]) for key in weights if key.startswith("transformer.h.")}:
        weights[f"transformer.h.{block}.attn.bias"] = torch.tril(torch.ones(1, 1, n_positions, n_positions))
        weights[f"transformer.h.{block}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


@pytest.fixture(scope="module")
def cli_runs(repo_root, teacher_dirs, deep_teacher_dirs, tmp_path_factory) -> dict[str, tuple[CompletedProcess, Path]]:
    """Every CLI case of this file, run at once (each pays for importing transformers) from a fresh cwd."""
    root = tmp_path_factory.mktemp("cli")
    legacy_gpt2 = gpt2_teacher_with_legacy_buffers(deep_teacher_dirs["gpt2"], root / "legacy-gpt2")
    cases = {
        "readme_bert": ["extract_distilbert.py", "--model_type", "bert", "--model_name", str(deep_teacher_dirs["bert"]),
                        "--vocab_transform"],
        "gpt2_safetensors": ["extract.py", "--model_type", "gpt2", "--model_name", str(legacy_gpt2),
                             "--dump_checkpoint", "out/distilgpt2-init.safetensors"],
        "unknown_model_type": ["extract.py", "--model_type", "xlnet", "--model_name", str(teacher_dirs["roberta"]),
                               "--dump_checkpoint", "student.pth"],
        "missing_teacher_dir": ["extract_distilbert.py", "--model_name", str(root / "no-such-teacher"),
                                "--dump_checkpoint", "student.pth"],
        "layers_out_of_range": ["extract.py", "--model_type", "gpt2", "--model_name", str(teacher_dirs["gpt2"]),
                                "--layers", "0", "2", "--dump_checkpoint", "student.pth"],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(name: str) -> tuple[CompletedProcess, Path]:
        cwd = root / name
        cwd.mkdir()
        script, *flags = cases[name]
        command = [sys.executable, str(repo_root / "scripts" / script), *flags]
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120), cwd

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        return dict(zip(cases, pool.map(run, cases)))


def test_cli_readme_command_writes_the_original_default_name(cli_runs, deep_teacher_dirs):
    result, cwd = cli_runs["readme_bert"]
    assert result.returncode == 0, result.stderr
    out = cwd / "serialization_dir" / f"tf_{deep_teacher_dirs['bert'].name}_0247911.pth"
    state = torch.load(out, weights_only=True)

    assert len(state) == 4 + 6 * 16 + 2 + 4  # embeddings, 6 layers, vocab_projector, vocab transform + norm
    assert "6 layers selected" in result.stderr
    assert f"Number of tensors transferred for distillation: {len(state)}" in result.stderr


def test_cli_gpt2_skips_legacy_buffers_and_writes_safetensors(cli_runs):
    result, cwd = cli_runs["gpt2_safetensors"]
    assert result.returncode == 0, result.stderr
    state = load_file(cwd / "out" / "distilgpt2-init.safetensors")

    assert len(state) == 2 + 6 * 12 + 3  # wte and wpe, 6 blocks, ln_f and lm_head
    assert not [key for key in state if key.endswith((".attn.bias", ".attn.masked_bias"))]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown_model_type", r"error: argument --model_type: invalid choice: 'xlnet'"),
        ("missing_teacher_dir", r"error: --model_name '.*no-such-teacher': no such teacher directory$"),
        ("layers_out_of_range", r"error: --layers 2 out of range: the teacher has 2 layers"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(cli_runs, case, message):
    result, cwd = cli_runs[case]
    last_line = result.stderr.strip().splitlines()[-1]

    assert result.returncode != 0
    assert re.match(message, last_line), last_line
    assert "Traceback" not in result.stderr
    assert list(cwd.iterdir()) == []


# ------------------------------------------------- --dump_config: the student config that fits the checkpoint


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2"])
def test_dump_config_gives_a_student_that_reproduces_the_teacher(kind, teacher_dirs, tmp_path):
    """All layers extracted: the dumped config, not a hand-written one, makes the student that gives the teacher's
    logits; the checkpoint loads into it with nothing left over and only tied tensors missing."""
    teacher = load_saved_teacher(teacher_dirs[kind], kind)
    layers = [str(idx) for idx in range(teacher.config.num_hidden_layers)]
    config_path = tmp_path / "configs" / "student.json"  # its folder is created
    state = run_main(
        kind, teacher_dirs[kind], tmp_path / "student.pth", "--vocab_transform", "--layers", *layers,
        "--dump_config", str(config_path),
    )
    config = STUDENT_CLASS[kind].config_class.from_json_file(config_path)
    torch.manual_seed(1234)
    student = STUDENT_CLASS[kind](config).eval()
    loaded = student.load_state_dict(state, strict=False)
    if kind == "bert":
        teacher.bert.embeddings.token_type_embeddings.weight.data.zero_()
    ids = random_ids(teacher.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)
    assert loaded.unexpected_keys == []
    assert sorted(loaded.missing_keys) == sorted(STUDENT_NOT_COVERED[kind])


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2"])
def test_dump_config_has_the_chosen_depth_and_nothing_else_is_written_without_it(kind, deep_teacher_dirs, tmp_path):
    with_config, without = tmp_path / "with", tmp_path / "without"
    state = run_main(
        kind, deep_teacher_dirs[kind], with_config / "student.pth", "--dump_config", str(with_config / "c.json")
    )
    state_without = run_main(kind, deep_teacher_dirs[kind], without / "student.pth")

    config = STUDENT_CLASS[kind].config_class.from_json_file(with_config / "c.json")
    assert config.num_hidden_layers == len(DEFAULT_LAYERS)
    assert config.vocab_size == load_saved_teacher(deep_teacher_dirs[kind], kind).config.vocab_size
    assert [p.name for p in without.iterdir()] == ["student.pth"]
    assert list(state) == list(state_without)
    assert all(torch.equal(state[key], state_without[key]) for key in state)


def test_distilbert_config_takes_the_teachers_sizes_under_distilberts_names():
    bert = BertConfig(
        vocab_size=1234, hidden_size=48, num_hidden_layers=12, num_attention_heads=3, intermediate_size=100,
        hidden_act="gelu_new", hidden_dropout_prob=0.15, attention_probs_dropout_prob=0.05,
        max_position_embeddings=77, initializer_range=0.03, pad_token_id=7,
    )
    config = extract_distilbert.distilbert_config(bert, [0, 2, 4])
    assert isinstance(config, DistilBertConfig)
    assert (
        config.vocab_size, config.dim, config.n_heads, config.hidden_dim, config.activation, config.dropout,
        config.attention_dropout, config.max_position_embeddings, config.initializer_range, config.pad_token_id,
        config.n_layers, config.sinusoidal_pos_embds,
    ) == (1234, 48, 3, 100, "gelu_new", 0.15, 0.05, 77, 0.03, 7, 3, False)


# ------------------------------------------------------------- --model_type auto: any family, a model folder

# Written out here, independently of scripts/model_families.py.
AUTO_STACK = {
    "modernbert": "model.layers", "llama": "model.layers", "qwen3": "model.layers", "gpt_neox": "gpt_neox.layers"
}
FULL, SLIDING = "full_attention", "sliding_attention"
# Attention type of each default student layer: the teacher's of layers 0 2 4 7 9 11. The tiny ModernBERT is
# global every 3 layers (0, 3, 6, 9); the tiny Qwen3 full on even layers.
DEFAULT_AUTO_LAYER_TYPES = {
    "modernbert": [FULL, SLIDING, SLIDING, SLIDING, FULL, SLIDING],
    "qwen3": [FULL, FULL, FULL, SLIDING, SLIDING, SLIDING],
}


@pytest.fixture(scope="module")
def deep_auto_teacher_dirs(tmp_path_factory, auto_tokenizer_dirs) -> dict[str, Path]:
    """12-layer tiny teachers of today's families, so the default layers 0 2 4 7 9 11 exist."""
    root = tmp_path_factory.mktemp("deep-auto-teachers")
    return {
        kind: assets.build_auto_teacher(kind, root / f"tiny-{kind}-12", auto_tokenizer_dirs[kind], n_layers=12, seed=1)
        for kind in assets.AUTO_KINDS
    }


def run_auto(teacher_dir: Path, out: Path, *flags: str) -> Path:
    """extract.py --model_type auto in this process; returns the student folder."""
    extract.main(["--model_type", "auto", "--model_name", str(teacher_dir), "--dump_checkpoint", str(out), *flags])
    return out


def load_student_folder(kind: str, folder: Path) -> torch.nn.Module:
    """The student as a user loads it, asserting that every tensor comes from the folder and none is left over."""
    student, info = assets.AUTO_MODEL_CLASSES[kind].from_pretrained(folder, output_loading_info=True)
    assert not any(info[keys] for keys in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return student.eval()


def auto_ids(vocab_size: int) -> torch.Tensor:
    """(2, 12) ids: longer than the tiny models' attention window, so sliding and full attention differ."""
    return torch.randint(5, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", assets.AUTO_KINDS)
def test_auto_all_layers_reproduce_teacher_logits(kind, auto_teacher_dirs, tmp_path):
    teacher = assets.AUTO_MODEL_CLASSES[kind].from_pretrained(auto_teacher_dirs[kind]).eval()
    layers = [str(idx) for idx in range(teacher.config.num_hidden_layers)]
    student = load_student_folder(kind, run_auto(auto_teacher_dirs[kind], tmp_path / "student", "--layers", *layers))
    ids = auto_ids(teacher.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)
    assert student.config.to_dict() == {**teacher.config.to_dict(), "_name_or_path": student.config.name_or_path}


@pytest.mark.parametrize("kind", assets.AUTO_KINDS)
def test_auto_default_layers_hold_exactly_the_chosen_teacher_tensors(kind, deep_auto_teacher_dirs, tmp_path):
    """Every tensor the teacher's own folder stores, outside the stack or in a chosen layer (renumbered), and
    nothing else; tied heads are stored the way the teacher stores them."""
    teacher_dir = deep_auto_teacher_dirs[kind]
    folder = run_auto(teacher_dir, tmp_path / "student")
    teacher_state, state = load_file(teacher_dir / "model.safetensors"), load_file(folder / "model.safetensors")

    layer_key = re.compile(rf"{re.escape(AUTO_STACK[kind])}\.(\d+)\.(.*)")
    expected = {}
    for key in teacher_state:
        match = layer_key.fullmatch(key)
        if match is None:
            expected[key] = key
        elif int(match.group(1)) in DEFAULT_LAYERS:
            expected[f"{AUTO_STACK[kind]}.{DEFAULT_LAYERS.index(int(match.group(1)))}.{match.group(2)}"] = key
    assert sorted(state) == sorted(expected)
    for student_key, teacher_key in expected.items():
        assert torch.equal(state[student_key], teacher_state[teacher_key]), (student_key, teacher_key)

    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == len(DEFAULT_LAYERS)
    assert config.get("layer_types") == DEFAULT_AUTO_LAYER_TYPES.get(kind)
    load_student_folder(kind, folder)


def test_auto_students_layers_keep_their_attention_types(deep_auto_teacher_dirs, tmp_path):
    """ModernBERT: the student is the teacher run through only its layers 0 2 4 7 9 11, each with its own
    attention type (a re-derived global-every-3 pattern would make student layer 3 global); Qwen3: each
    student layer attends within the teacher layer's window."""
    folder = run_auto(deep_auto_teacher_dirs["modernbert"], tmp_path / "modernbert")
    student = load_student_folder("modernbert", folder)
    reference = assets.AUTO_MODEL_CLASSES["modernbert"].from_pretrained(deep_auto_teacher_dirs["modernbert"]).eval()
    reference.model.layers = nn.ModuleList(reference.model.layers[idx] for idx in DEFAULT_LAYERS)
    ids = auto_ids(student.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert [layer.attention_type for layer in student.model.layers] == DEFAULT_AUTO_LAYER_TYPES["modernbert"]

    qwen = load_student_folder("qwen3", run_auto(deep_auto_teacher_dirs["qwen3"], tmp_path / "qwen3"))
    windows = [layer.self_attn.sliding_window for layer in qwen.model.layers]
    assert windows == [None if kind == FULL else 4 for kind in DEFAULT_AUTO_LAYER_TYPES["qwen3"]]


def test_auto_dump_config_is_the_folders_config(auto_teacher_dirs, tmp_path):
    folder = run_auto(auto_teacher_dirs["llama"], tmp_path / "student", "--layers", "0", "2",
                      "--dump_config", str(tmp_path / "student.json"))
    assert json.loads((tmp_path / "student.json").read_text()) == json.loads((folder / "config.json").read_text())


def test_auto_output_replaces_only_its_own_files(auto_teacher_dirs, tmp_path):
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "config.json").write_text("{}")
    run_auto(auto_teacher_dirs["gpt_neox"], folder, "--layers", "1", "3")

    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "notes.txt"
    ]
    assert (folder / "notes.txt").read_text() == "mine"
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no temporary folder left


def test_auto_refuses_to_leave_other_weights_beside_its_own(auto_teacher_dirs, tmp_path):
    """An earlier sharded save would be half-shadowed: refused, and the folder is left as it was."""
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ScriptError, match=r"holds weights this extraction would not replace \(model.safetensors.index"):
        run_auto(auto_teacher_dirs["qwen3"], folder, "--layers", "0")
    assert [p.name for p in folder.iterdir()] == ["model.safetensors.index.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def test_auto_layers_out_of_range_or_repeated_are_refused_before_writing(auto_teacher_dirs, tmp_path):
    for flags, message in [
        (["--layers", "0", "4"], "--layers 4 out of range: the teacher has 4 layers, choose indices from 0 to 3"),
        (["--layers", "2", "2"], "--layers repeats 2"),
    ]:
        with pytest.raises(ScriptError, match=re.escape(message)):
            run_auto(auto_teacher_dirs["llama"], tmp_path / "student", *flags)
    assert list(tmp_path.iterdir()) == []


def test_auto_modernbert_student_must_start_with_the_teachers_first_layer(auto_teacher_dirs, tmp_path):
    """ModernBERT's first layer has no attention norm: a student whose layer 0 is another teacher layer would
    not take its weights. The check before renaming catches it and nothing is left behind."""
    with pytest.raises(ScriptError, match=r"does not take the extracted weights \(unexpected keys: 1, e.g. "
                                          r"'model.layers.0.attn_norm.weight'\).*start --layers with 0"):
        run_auto(auto_teacher_dirs["modernbert"], tmp_path / "student", "--layers", "1", "3")
    assert list(tmp_path.iterdir()) == []


class _FlatConfig(PretrainedConfig):
    model_type = "tiny-flat-lm"
    vocab_size: int = 50
    hidden_size: int = 8
    num_hidden_layers: int = 3


class _FlatLM(PreTrainedModel):
    """A causal LM whose layers are an nn.Sequential, not a ModuleList: no stack to find."""

    config_class = _FlatConfig

    def __init__(self, config: _FlatConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.Sequential(*(nn.Linear(config.hidden_size, config.hidden_size) for _ in range(3)))
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()


@pytest.fixture(scope="module")
def flat_teacher_dir(tmp_path_factory) -> Path:
    """A registered causal-LM family that AutoModelForCausalLM loads, saved to a folder."""
    AutoConfig.register(_FlatConfig.model_type, _FlatConfig, exist_ok=True)
    AutoModelForCausalLM.register(_FlatConfig, _FlatLM, exist_ok=True)
    folder = tmp_path_factory.mktemp("flat") / "tiny-flat"
    _FlatLM(_FlatConfig()).save_pretrained(folder)
    return folder


def test_auto_teacher_without_a_layer_stack_is_refused(flat_teacher_dir, tmp_path):
    with pytest.raises(ScriptError, match=r"_FlatLM has no nn.ModuleList of 3 modules .*: cannot find its layers"):
        run_auto(flat_teacher_dir, tmp_path / "student", "--layers", "0")
    assert list(tmp_path.iterdir()) == []


def test_auto_refuses_a_model_that_is_not_a_language_model(tmp_path):
    vit = tmp_path / "tiny-vit"
    ViTConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8).save_pretrained(vit)
    with pytest.raises(ScriptError, match=r"'vit' model is not a language model"):
        run_auto(vit, tmp_path / "student", "--layers", "0")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-vit"]


def test_auto_needs_a_model_name_and_writes_a_folder(auto_teacher_dirs, tmp_path):
    with pytest.raises(ScriptError, match="--model_type auto needs --model_name"):
        extract.main(["--model_type", "auto"])
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ScriptError, match="is a file: --model_type auto writes a folder"):
        run_auto(auto_teacher_dirs["llama"], tmp_path / "a-file", "--layers", "0")


def test_auto_default_output_folder():
    parser = extraction.build_parser("test", ["roberta", "gpt2", "auto"], extract.DEFAULT_NAMES)
    args = parser.parse_args(["--model_type", "auto", "--model_name", "/models/Llama-3.2-1B/", "--layers", "0", "15"])
    extraction.resolve_defaults(args, extract.DEFAULT_NAMES)
    assert args.dump_checkpoint == "serialization_dir/Llama-3.2-1B_015"


def test_auto_cli_writes_the_default_folder(repo_root, deep_auto_teacher_dirs, tmp_path):
    """The real script from a fresh cwd (model_families is found beside it): serialization_dir/<name>_0247911/."""
    command = [
        sys.executable, str(repo_root / "scripts" / "extract.py"), "--model_type", "auto",
        "--model_name", str(deep_auto_teacher_dirs["llama"]),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "serialization_dir" / f"{deep_auto_teacher_dirs['llama'].name}_0247911"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert "6 layers selected" in result.stderr
    assert load_student_folder("llama", folder).config.num_hidden_layers == 6


def test_auto_cli_error_is_one_line_and_writes_nothing(auto_teacher_dirs, tmp_path, capsys):
    argv = ["--model_type", "auto", "--model_name", str(auto_teacher_dirs["qwen3"]), "--layers", "9",
            "--dump_checkpoint", str(tmp_path / "student")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(extract.main, argv)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "error: --layers 9 out of range: the teacher has 4 layers, choose indices from 0 to 3"
    )
    assert list(tmp_path.iterdir()) == []
