"""Today's families end to end (--teacher_type/--student_type auto), through the real commands: binarize with the
tokenizer's own markers, count, extract a shallower student, distil (MLM for ModernBERT, CLM for the decoders),
evaluate, and load the exported folder with `pipeline`; a low-precision teacher; the bad combinations."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, pipeline

import binarized_data
import evaluation
import extract
import token_counts
import train
from cli_checks import error_line, run_main

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

RUN = ["--n_gpu", "0", "--n_epoch", "1", "--batch_size", "8", "--gradient_accumulation_steps", "1",
       "--learning_rate", "2e-3", "--log_interval", "5", "--checkpoint_interval", "1000", "--seed", "0"]
LOSSES = {
    True: ["--mlm", "--alpha_ce", "2.0", "--alpha_mlm", "1.0", "--alpha_cos", "1.0", "--alpha_clm", "0.0"],
    False: ["--alpha_ce", "1.0", "--alpha_clm", "1.0", "--alpha_cos", "1.0"],
}
MASKED = {"modernbert": True, "llama": False, "qwen3": False, "gpt_neox": False}


@pytest.fixture(scope="module")
def auto_inputs(auto_teacher_dirs, corpus_file, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Per family: data binarized with --tokenizer_type auto, counts, and a 2-layer student extracted from the teacher."""
    root = tmp_path_factory.mktemp("auto_inputs")
    inputs = {}
    for kind, teacher in auto_teacher_dirs.items():
        binarized_data.main(["--file_path", str(corpus_file), "--tokenizer_type", "auto", "--tokenizer_name",
                             str(teacher), "--dump_file", str(root / "data"), "--seed", "0"])
        data_file = root / f"data.{teacher.name}.pickle"
        counts = root / f"counts.{kind}.pickle"
        token_counts.main(["--data_file", str(data_file), "--token_counts_dump", str(counts), "--vocab_size",
                           str(len(AutoTokenizer.from_pretrained(teacher)))])
        student = root / f"student-{kind}"
        extract.main(["--model_type", "auto", "--model_name", str(teacher), "--layers", "0", "2",
                      "--dump_checkpoint", str(student)])
        inputs[kind] = dict(data_file=str(data_file), token_counts=str(counts), teacher=str(teacher),
                            student=str(student))
    return inputs


def auto_argv(inputs: dict, kind: str, dump_path: Path) -> list[str]:
    files = inputs[kind]
    argv = ["--dump_path", str(dump_path), "--data_file", files["data_file"], "--student_type", "auto",
            "--student_config", str(Path(files["student"]) / "config.json"), "--student_pretrained_weights",
            files["student"], "--teacher_type", "auto", "--teacher_name", files["teacher"], *LOSSES[MASKED[kind]], *RUN]
    return argv + (["--token_counts", files["token_counts"]] if MASKED[kind] else [])


@pytest.mark.parametrize("kind", ["modernbert", "llama", "qwen3"])
def test_a_modern_teacher_distils_into_its_extracted_student(kind, auto_inputs, tmp_path, capsys):
    dump = tmp_path / "dump"
    status, stderr = run_main(auto_argv(auto_inputs, kind, dump) + ["--eval_data_file", auto_inputs[kind]["data_file"]],
                              capsys)
    assert status == 0, stderr[-3000:]

    # Trained: the held-out loss went down from the extracted student's.
    teacher = auto_inputs[kind]["teacher"]
    before = evaluation.main(["--data_file", auto_inputs[kind]["data_file"], "--student", auto_inputs[kind]["student"],
                              "--tokenizer_name", teacher, "--teacher_name", teacher, "--max_sequences", "96"])
    after = evaluation.main(["--data_file", auto_inputs[kind]["data_file"], "--student", str(dump),
                             "--tokenizer_name", str(dump), "--teacher_name", teacher, "--max_sequences", "96"])
    assert after["student"]["loss"] < before["student"]["loss"], (before, after)

    # The exported folder is a complete model: weights, clean config, tokenizer.
    model_class = AutoModelForMaskedLM if MASKED[kind] else AutoModelForCausalLM
    model, info = model_class.from_pretrained(dump, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys"))
    assert model.config.num_hidden_layers == 2 and not json.loads((dump / "config.json").read_text()).get(
        "output_hidden_states")
    tokenizer = AutoTokenizer.from_pretrained(dump)
    if MASKED[kind]:
        predictions = pipeline("fill-mask", model=str(dump))(f"the {tokenizer.mask_token} of the student")
        assert len(predictions) == 5 and all(0 <= p["token"] < len(tokenizer) and p["token_str"] for p in predictions)
    else:
        generated = pipeline("text-generation", model=str(dump))("the teacher", max_new_tokens=3, do_sample=False)
        assert generated[0]["generated_text"].startswith("the teacher")


def test_a_bfloat16_teacher_holds_its_weights_in_bfloat16_and_agrees_with_float32(auto_inputs, tmp_path, capsys):
    args = train.build_parser().parse_args(auto_argv(auto_inputs, "llama", tmp_path / "dump"))
    teacher_32, _ = train.load_teacher(args, with_weights=True)
    args.teacher_dtype = "bfloat16"
    teacher_16, _ = train.load_teacher(args, with_weights=True)
    assert {p.dtype for p in teacher_16.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in teacher_16.parameters())
    ids = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits_32, logits_16 = teacher_32(ids).logits, teacher_16(ids).logits.float()
    torch.testing.assert_close(logits_16, logits_32, rtol=0.05, atol=0.05)
    assert (logits_16.argmax(-1) == logits_32.argmax(-1)).float().mean() > 0.9

    dump = tmp_path / "bf16"
    status, stderr = run_main(auto_argv(auto_inputs, "llama", dump) + ["--teacher_dtype", "bfloat16"], capsys)
    assert status == 0, stderr[-3000:]
    assert {value.dtype for value in torch.load(dump / "pytorch_model.bin", weights_only=True).values()} == {
        torch.float32}  # the student still trains in float32


def test_a_tokenizer_that_adds_no_marker_trains_on_bare_ids(auto_inputs, auto_teacher_dirs):
    """GPT-NeoX's tokenizer adds nothing: no marker is checked or re-added to split chunks; padding is its eos."""
    args = train.build_parser().parse_args(auto_argv(auto_inputs, "gpt_neox", "unused"))
    tokenizer = AutoTokenizer.from_pretrained(auto_teacher_dirs["gpt_neox"])
    args.special_tok_ids = train.required_special_token_ids(tokenizer, mlm=False, auto=True)
    args.markers = train.auto_markers(tokenizer, mlm=False)
    args.max_model_input_size, args.is_master = 16, True
    assert args.markers == {"start": None, "end": None, "pad": tokenizer.eos_token_id}
    corpus = evaluation.load_binarized_data(auto_inputs["gpt_neox"]["data_file"], "--data_file")
    dataset = train.LmSeqsDataset(args, corpus)
    assert dataset.pad_id == tokenizer.eos_token_id
    assert not dataset.add_start.any() and not dataset.add_end.any()
    stored = [corpus.ids[corpus.offsets[k] : corpus.offsets[k + 1]].tobytes() for k in range(len(corpus.offsets) - 1)]
    served = [dataset[i][0] for i in range(len(dataset))]
    assert max(map(len, served)) <= 16 and any(len(ids) == 14 for ids in served)  # split lines, no marker slot filled
    assert all(any(ids.tobytes() in line for line in stored) for ids in served)  # each a run of a line's own ids


def test_bad_combinations_are_one_line(auto_inputs, auto_teacher_dirs, tmp_path, capsys):
    # A narrower student with weights extracted from the wider teacher.
    narrow = json.loads((Path(auto_inputs["llama"]["student"]) / "config.json").read_text())
    narrow.update(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)
    config = tmp_path / "narrow.json"
    config.write_text(json.dumps(narrow))
    argv = auto_argv(auto_inputs, "llama", tmp_path / "a")
    argv[argv.index("--student_config") + 1] = str(config)
    status, stderr = run_main(argv, capsys)
    assert status == 1 and "does not fit the student" in error_line(stderr)

    # Vocabularies that differ: a Qwen3 student for the Llama teacher, whose vocabulary is another size.
    argv = auto_argv(auto_inputs, "llama", tmp_path / "b")
    qwen = json.loads((Path(auto_inputs["qwen3"]["student"]) / "config.json").read_text())
    qwen["vocab_size"] += 3
    config.write_text(json.dumps(qwen))
    argv[argv.index("--student_config") + 1] = str(config)
    argv.remove("--student_pretrained_weights"), argv.remove(auto_inputs["llama"]["student"])
    status, stderr = run_main(argv, capsys)
    assert status == 1 and "differ in vocabulary size" in error_line(stderr)

    # MLM with a decoder-only family: its tokenizer has no mask token, nor the family a masked-LM class.
    argv = auto_argv(auto_inputs, "llama", tmp_path / "c")
    argv[argv.index("--alpha_clm") + 1] = "0.0"
    argv += ["--mlm", "--alpha_mlm", "1.0", "--token_counts", auto_inputs["modernbert"]["token_counts"]]
    status, stderr = run_main(argv, capsys)
    assert status == 1 and "has no pad_token, mask_token" in error_line(stderr)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
