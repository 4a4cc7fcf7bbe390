"""The edges of "any family" (issue 22), fast enough for the default run; tests/test_family_matrix.py runs the
families end to end.

Three classes of defect: config attributes read without a default (no max_position_embeddings in ALiBi and
state-space models), a fused loss that trusted get_output_embeddings() (DeBERTa-v2's new head: a layer inside
the head), and widths taken from config names (OPT's hidden states are word_embed_proj_dim wide).
"""

import logging

import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertForMaskedLM,
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    ElectraConfig,
    ElectraForMaskedLM,
    GPT2Config,
    LlamaConfig,
    MambaConfig,
    MambaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
)

import assets
import binarized_data
import evaluation
import extract
import train
from cli_checks import error_line, run_main
from cli_utils import ScriptError
from losses import StudentWithLoss
from scripts.model_families import position_limit, vocabulary_size
from test_losses import (
    VOCAB, assert_same_losses_and_gradients, gradients, make_alphas, make_batch, reference_step, wrapper_step,
)
from utils import UserError

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def seeded(model_class, config, seed: int):
    torch.manual_seed(seed)
    return model_class(assets.without_dropout(config))


# ---------------------------------------------------------------- 1. facts from the model, configs only as defaults


def tiny_bloom(seed: int = 0) -> BloomForCausalLM:
    return seeded(BloomForCausalLM, BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=1, n_head=2), seed)


def tiny_mamba(seed: int = 0) -> MambaForCausalLM:
    config = MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, state_size=4, expand=2, conv_kernel=3)
    return seeded(MambaForCausalLM, config, seed)


@pytest.mark.parametrize("make_model", [tiny_bloom, tiny_mamba], ids=["bloom", "mamba"])
def test_a_config_without_max_position_embeddings_passes_the_checks(make_model):
    """ALiBi and state-space models state no position limit: the tokenizer's length is the limit, nothing crashes."""
    student, teacher = make_model(0), make_model(1)
    assert not hasattr(teacher.config, "max_position_embeddings")
    assert position_limit(teacher, teacher.config) is None and position_limit(None, teacher.config) is None
    train.check_compatibility(student, teacher, teacher.config, [1] * VOCAB)
    train.check_compatibility(student, None, teacher.config, None)  # no teacher term: its config only
    params = assets.distiller_params("unused", max_model_input_size=None)

    class Tokenizer:
        model_max_length = 48

    assert train.max_model_input_size(params, Tokenizer(), teacher, teacher.config) == 48
    Tokenizer.model_max_length = 10**30  # "no limit": neither says, so the user must
    with pytest.raises(UserError, match=f"nor its {teacher.config.model_type} model gives a maximum length"):
        train.max_model_input_size(params, Tokenizer(), teacher, teacher.config)


def test_position_limits_and_vocabularies_come_from_the_embeddings():
    """Written out per family: a learned table's rows less the positions it skips; else the config; else none."""
    opt = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   ffn_dim=32, max_position_embeddings=40))
    assert opt.model.decoder.embed_positions.num_embeddings == 42  # OPT's offset of 2
    xlmr = XLMRobertaForMaskedLM(XLMRobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32,
                                                  max_position_embeddings=34, pad_token_id=1))
    electra = ElectraForMaskedLM(ElectraConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32, embedding_size=8,
                                               max_position_embeddings=30))
    assert position_limit(opt, opt.config) == 40
    assert position_limit(xlmr, xlmr.config) == 32  # ids start after the padding id 1
    assert position_limit(electra, electra.config) == 30
    # A table that disagrees with its config: the table wins.
    electra.config.max_position_embeddings = 512
    assert position_limit(electra, electra.config) == 30
    # No table (rotary): the config's limit is the default.
    assert position_limit(None, LlamaConfig(max_position_embeddings=77)) == 77
    assert position_limit(None, GPT2Config(n_positions=20)) == 20
    # Vocabulary: the input embeddings' rows, whatever the config says.
    electra.config.vocab_size = 7
    assert vocabulary_size(electra, electra.config) == VOCAB and vocabulary_size(None, electra.config) == 7


def test_a_bloom_teacher_distils_end_to_end(corpus_lines, auto_tokenizer_dirs, tmp_path, capsys, caplog):
    """ALiBi, no max_position_embeddings: through binarize and train, with --freeze_pos_embs told why nothing
    is frozen (not that the model must be rotary)."""
    tokenizer = AutoTokenizer.from_pretrained(auto_tokenizer_dirs["qwen3"])
    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=16, n_layer=1, n_head=2,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    teacher = assets.save_seeded(lambda: BloomForCausalLM(config), tokenizer, tmp_path / "bloom", seed=0)
    config.to_json_file(tmp_path / "student.json")
    corpus_file = tmp_path / "corpus.txt"
    corpus_file.write_text("\n".join(corpus_lines[:40]) + "\n", encoding="utf-8")
    binarized_data.main(["--file_path", str(corpus_file), "--tokenizer_type", "auto", "--tokenizer_name", str(teacher),
                         "--dump_file", str(tmp_path / "data"), "--seed", "0"])
    argv = ["--dump_path", str(tmp_path / "dump"), "--data_file", str(tmp_path / "data.bloom.pickle"),
            "--student_type", "auto", "--student_config", str(tmp_path / "student.json"), "--teacher_type", "auto",
            "--teacher_name", str(teacher), "--alpha_ce", "1.0", "--alpha_clm", "1.0", "--alpha_cos", "1.0",
            "--freeze_pos_embs", "--n_gpu", "0", "--n_epoch", "1", "--batch_size", "16",
            "--gradient_accumulation_steps", "1", "--log_interval", "50", "--seed", "0"]
    with caplog.at_level(logging.INFO, logger="distillation"):
        status, stderr = run_main(argv, capsys)
    assert status == 0, stderr[-3000:]
    assert (tmp_path / "dump" / "model.safetensors").is_file()
    messages = [record.message for record in caplog.records]
    assert "--freeze_pos_embs: the student (bloom) has no learned position embeddings (its positions are rotary, " \
           "relative, ALiBi or implicit); nothing to freeze" in messages
    assert "Maximum model input size: 64" in messages  # the tokenizer's, as the model states none
    assert not any("not fused" in message for message in messages)


# ---------------------------------------------------------------- 2. the fused path proves itself


def tiny_deberta(legacy: bool, seed: int, vocab: int = VOCAB, hidden: int = 16) -> DebertaV2ForMaskedLM:
    config = DebertaV2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=2 * hidden, max_position_embeddings=64, relative_attention=True,
                             position_biased_input=False, pos_att_type=["p2c", "c2p"], type_vocab_size=0,
                             pad_token_id=0, legacy=legacy)
    model = seeded(DebertaV2ForMaskedLM, config, seed)
    with torch.no_grad():  # logits far from uniform, as in test_losses.make_models
        for parameter in model.get_input_embeddings().parameters():
            parameter.mul_(20.0)
    return model


@pytest.mark.parametrize("legacy", [False, True], ids=["new-head", "legacy-head"])
def test_a_head_whose_projection_is_not_get_output_embeddings_trains_correctly(legacy, caplog):
    """DeBERTa-v2's new head: get_output_embeddings() is the transform's dense layer, a (hidden, hidden) matrix.
    With the vocabulary as large as the hidden size the shapes fit, and the fused path multiplied the head's
    output by that matrix without a word. The probe sees its logits differ and the step runs on full logits,
    with one warning; the legacy head is a plain projection and stays fused. Either way the terms and every
    gradient are those of the full-logit reference."""
    vocab = hidden = 32
    student, teacher = tiny_deberta(legacy, 0, vocab, hidden), tiny_deberta(legacy, 1, vocab, hidden).eval()
    assert tuple(student.get_output_embeddings().weight.shape) == ((vocab, hidden) if legacy else (hidden, hidden))
    ids, mask, labels = make_batch(mlm=True)
    batch = (ids % vocab, mask, labels.where(labels < 0, labels % vocab))
    alphas = make_alphas(True, (2.0, 1.0, 0.3, 0.7))
    want_losses = reference_step(student, teacher, batch, True, alphas, False)
    want_grads = gradients(student)
    student.zero_grad(set_to_none=True)
    with caplog.at_level(logging.INFO, logger="distillation"):
        wrapper = StudentWithLoss(student, alphas, 2.0, False, 5, teacher)
    _, losses = wrapper_step(wrapper, teacher, batch, True)
    assert_same_losses_and_gradients(losses, gradients(student), want_losses, want_grads)
    assert wrapper.fused is legacy
    warnings = [record.message for record in caplog.records if "not fused" in record.message]
    assert len(warnings) == (0 if legacy else 1)
    if not legacy:
        assert warnings[0].startswith(
            "Vocabulary losses on full logits, not fused: the student (deberta-v2) does not allow them: its output "
            "embeddings (lm_predictions.lm_head.dense (32, 32)) do not make its logits: they differ from its head's "
            "by up to "
        )


def test_fusion_asked_for_explicitly_is_refused_in_one_line():
    student, teacher = tiny_deberta(False, 0), tiny_deberta(False, 1)
    alphas = make_alphas(True, (2.0, 1.0, 0.0, 0.0))
    with pytest.raises(UserError, match=r"^--loss_chunk_size 5 asks for fused losses, but the student \(deberta-v2\) "
                                        r"does not allow them: its output embeddings \(lm_predictions.lm_head.dense "
                                        r"\(16, 16\)\) are not its vocabulary projection.*; pass --loss_chunk_size 0"):
        StudentWithLoss(student, alphas, 2.0, False, 5, teacher, fusion_required=True)
    # Only a value > 0 given on the command line asks for fusion; the default falls back.
    parse = train.build_parser().parse_args
    required = ["--dump_path", "d", "--data_file", "f", "--student_type", "auto", "--student_config", "c",
                "--teacher_type", "auto", "--teacher_name", "t"]
    assert not parse(required).fused_loss_explicit and parse(required).loss_chunk_size == 256
    assert parse(required + ["--loss_chunk_size", "64"]).fused_loss_explicit
    assert not parse(required + ["--loss_chunk_size", "0"]).fused_loss_explicit


def test_evaluation_of_such_a_head_equals_full_logits():
    model, teacher = tiny_deberta(False, 0), tiny_deberta(False, 1)
    ids, mask, labels = make_batch(mlm=True)
    batches = [(ids, mask, labels)]
    full = evaluation.evaluate_model(model, batches, True, teacher, loss_chunk_size=0)
    chunked = evaluation.evaluate_model(model, batches, True, teacher, loss_chunk_size=5)
    assert chunked == full


# ---------------------------------------------------------------- 3. widths from the hidden states


def tiny_opt(hidden: int, projected: int, seed: int) -> OPTForCausalLM:
    config = OPTConfig(vocab_size=VOCAB, hidden_size=hidden, word_embed_proj_dim=projected, num_hidden_layers=1,
                       num_attention_heads=2, ffn_dim=2 * hidden, max_position_embeddings=64)
    model = seeded(OPTForCausalLM, config, seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model


@pytest.mark.parametrize(("student_projected", "projection_shape"), [(16, None), (8, (16, 8))],
                         ids=["same-hidden-state-width", "narrower-hidden-states"])
def test_a_narrower_students_projection_is_sized_from_its_hidden_states(student_projected, projection_shape):
    """OPT's last hidden state is word_embed_proj_dim wide, not hidden_size: a student of hidden_size 24 with the
    teacher's 16-wide projected states needs no projection; one with 8-wide states a (16, 8) one."""
    student, teacher = tiny_opt(24, student_projected, 0), tiny_opt(32, 16, 1).eval()
    alphas = make_alphas(False, (2.0, 1.0, 0.3, 0.7))
    wrapper = StudentWithLoss(student, alphas, 2.0, False, 5, teacher, seed=3)
    projection = wrapper.hidden_projection
    assert (None if projection is None else tuple(projection.weight.shape)) == projection_shape
    assert wrapper.fused
    batch = make_batch(mlm=False)
    want_losses = reference_step(student, teacher, batch, False, alphas, False, projection)
    want_grads = gradients(wrapper)
    wrapper.zero_grad(set_to_none=True)
    _, losses = wrapper_step(wrapper, teacher, batch, False)
    assert_same_losses_and_gradients(losses, gradients(wrapper), want_losses, want_grads)


# ---------------------------------------------------------------- the smaller things


def albert(groups: int, out_dir):
    config = AlbertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=4, num_hidden_groups=groups,
                          num_attention_heads=2, intermediate_size=32, embedding_size=8, max_position_embeddings=32)
    return seeded(AlbertForMaskedLM, config, 0).save_pretrained(out_dir) or out_dir


def test_albert_with_a_group_per_layer_extracts_and_shared_layers_are_refused_in_one_line(tmp_path):
    teacher_dir = albert(4, tmp_path / "grouped")
    extract.main(["--model_type", "auto", "--model_name", str(teacher_dir), "--layers", "0", "3",
                  "--dump_checkpoint", str(tmp_path / "student")])
    student = AlbertForMaskedLM.from_pretrained(tmp_path / "student")
    teacher = AlbertForMaskedLM.from_pretrained(teacher_dir)
    assert student.config.num_hidden_layers == student.config.num_hidden_groups == 2
    assert torch.equal(student.albert.encoder.albert_layer_groups[1].albert_layers[0].ffn.weight,
                       teacher.albert.encoder.albert_layer_groups[3].albert_layers[0].ffn.weight)

    shared = albert(1, tmp_path / "shared")
    with pytest.raises(ScriptError, match=r"AlbertForMaskedLM has no nn.ModuleList of 4 modules .*layers that share "
                                          r"weights \(ALBERT's, say\) cannot be cut to chosen ones"):
        extract.main(["--model_type", "auto", "--model_name", str(shared), "--layers", "0", "2",
                      "--dump_checkpoint", str(tmp_path / "student-shared")])
    assert not (tmp_path / "student-shared").exists()


def test_wider_starting_weights_for_a_narrow_student_are_one_line_without_transformers_table(
        auto_teacher_dirs, tmp_path, capfd):
    """transformers logs a table of every mismatched tensor before it raises: the refusal is the only output."""
    teacher = auto_teacher_dirs["llama"]
    config = LlamaConfig.from_pretrained(teacher)
    config.update(dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1))
    config.to_json_file(tmp_path / "narrow.json")
    args = assets.distiller_params("unused", student_type="auto", teacher_type="auto", mlm=False,
                                   student_config=str(tmp_path / "narrow.json"),
                                   student_pretrained_weights=str(teacher))
    capfd.readouterr()
    with pytest.raises(UserError, match=r"does not fit the student \(llama\): \d+ tensor\(s\) of another shape, e.g. "
                                        r"'\S+' \(\d+(, \d+)?\) in the weights, \(\d+(, \d+)?\) in the student"):
        train.build_student(args)
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out and "MISMATCH" not in captured.err + captured.out
