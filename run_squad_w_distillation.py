"""Fine-tune a model on SQuAD v1.1 / v2.0, with a second step of distillation from a SQuAD-fine-tuned teacher.

The original's `run_squad_w_distillation.py` with every flag and default, on today's transformers. Without
--teacher_type it is plain fine-tuning (the no-teacher baseline, and the way to make the teacher). With a
teacher the loss is alpha_ce * KL(teacher || student) at --temperature on the start and end distributions
(batchmean, x T^2, start and end averaged) + alpha_squad * the student's own span loss. Recipe and figures:
docs/second-step.md.

Usage (CPU; on GPUs the same without --no_cuda, torchrun --nproc_per_node N for N GPUs):
    python run_squad_w_distillation.py --model_type bert --model_name_or_path bert-base-uncased \\
        --do_train --do_eval --do_lower_case --train_file train-v1.1.json --predict_file dev-v1.1.json \\
        --output_dir squad_teacher --no_cuda                                # 1. the teacher
    python run_squad_w_distillation.py --model_type distilbert --model_name_or_path serialization_dir/my_student \\
        --teacher_type bert --teacher_name_or_path squad_teacher \\
        --do_train --do_eval --do_lower_case --train_file train-v1.1.json --predict_file dev-v1.1.json \\
        --output_dir squad_student --alpha_ce 0.5 --alpha_squad 0.5 --temperature 2.0 --no_cuda   # 2. the student
    torchrun --nproc_per_node 2 run_squad_w_distillation.py ... --no_cuda   # two CPU processes over gloo

--output_dir gets checkpoint-<step>/ every --save_steps optimizer steps (weights, config, tokenizer,
training_args.json, optimizer.pt and scheduler.pt of tensors only), the final model folder, and with --do_eval
predictions_<prefix>.json, nbest_predictions_<prefix>.json and, for v2.0, null_odds_<prefix>.json; the scores
are logged and written to eval_results<prefix>.json. The features are cached beside the input file as
cached_distillation_{train|dev}_<model>_<max_seq_length>.npz (never a pickle).
"""

import inspect
import math
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, PreTrainedTokenizerBase

import task_training
from scripts.cli_flags import ArgumentParser, HelpFormatter, non_negative_float, number
from scripts.file_safety import check_model_folder, check_outputs_apart
from scripts.model_families import position_limit
from squad_data import SquadExample, SquadFeatures, load_or_build_features, read_squad_examples, squad_file
from squad_metrics import squad_v1_scores, squad_v2_scores
from squad_predictions import compute_predictions, write_prediction_files
from task_training import AUTO
from utils import MODEL_LOAD_ERRORS, UserError, load_failure, logger, write_json

# The original's families. XLNet's and XLM's plain span heads (...ForQuestionAnsweringSimple) stand in for their
# beam-search heads, whose outputs the original unpacked wrongly.
MODEL_TYPES = ("bert", "distilbert", "roberta", "xlnet", "xlm", AUTO)
RUN_KIND = "run_squad_w_distillation.py"  # what its --output_dir marker names
SQUAD_FILES = ("predictions_*.json", "nbest_predictions_*.json", "null_odds_*.json")  # its evaluation's files
MODEL_FLAGS = ("--model_name_or_path", "--teacher_name_or_path", "--config_name", "--tokenizer_name")
# Families that read segment ids without a table sized by type_vocab_size (XLNet's relative segments).
SEGMENTS_WITHOUT_TABLE = ("xlnet",)


def build_parser() -> ArgumentParser:
    """Every flag of the original with its default ([+] marks new ones)."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=HelpFormatter)
    task_training.add_task_arguments(parser, MODEL_TYPES)
    add = parser.add_argument
    add("--alpha_squad", default=0.5, type=non_negative_float, help="Weight of the student's own span loss.")
    add("--data_dir", default=None, help="Folder of the SQuAD files (default names train-v1.1.json, dev-v1.1.json, "
        "or the v2.0 ones).")
    add("--train_file", default=None, help="SQuAD JSON to train on (inside --data_dir when it is given).")
    add("--predict_file", default=None, help="SQuAD JSON to evaluate on (inside --data_dir when it is given).")
    add("--version_2_with_negative", action="store_true", help="SQuAD v2.0: some questions have no answer.")
    add("--null_score_diff_threshold", default=0.0, type=number(float),
        help="v2.0: predict no answer when the null odds exceed this.")
    add("--max_seq_length", default=384, type=number(int, 8), help="Tokens per window (question, context, markers).")
    add("--doc_stride", default=128, type=number(int, 1), help="Context tokens between the starts of two windows.")
    add("--max_query_length", default=64, type=number(int, 1), help="Questions are cut to this many tokens.")
    add("--n_best_size", default=20, type=number(int, 1), help="Candidates kept per question (nbest_predictions).")
    add("--max_answer_length", default=30, type=number(int, 1), help="Longest answer, in tokens.")
    add("--verbose_logging", action="store_true", help="Accepted (the original's prediction warnings).")
    add("--threads", default=1, type=number(int, 1), help="Accepted: the fast tokenizer needs no worker processes.")
    return parser


def sanity_checks(args: Namespace) -> None:
    """The flag combinations the types cannot refuse, each one line."""
    task_training.check_task_arguments(args)
    if args.teacher_type == "distilbert":
        raise UserError("--teacher_type distilbert: a DistilBERT teacher is refused, as in the original; distil from "
                        "the larger model it came from")
    if args.teacher_type is not None and args.alpha_ce + args.alpha_squad <= 0:
        raise UserError("--alpha_ce and --alpha_squad are both 0: nothing to train on")
    if args.doc_stride >= args.max_seq_length:
        raise UserError(f"--doc_stride {args.doc_stride} must be below --max_seq_length {args.max_seq_length}")


def load_squad_tokenizer(args: Namespace) -> PreTrainedTokenizerBase:
    """The student's fast tokenizer (its offsets cut the answers from the context)."""
    name = args.tokenizer_name or args.model_name_or_path
    flag = "--tokenizer_name" if args.tokenizer_name else "--model_name_or_path"
    options = {"do_lower_case": True} if args.do_lower_case else {}
    check_model_folder(name, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, cache_dir=args.cache_dir or None, **options)
    except MODEL_LOAD_ERRORS as err:
        raise load_failure(f"a tokenizer from {flag} {name!r}", name, err) from err
    if not tokenizer.is_fast:
        raise UserError(f"the tokenizer of {flag} {name!r} is not a fast tokenizer: its character offsets are needed")
    return tokenizer


def check_positions(args: Namespace, model: nn.Module, what: str) -> None:
    """Refuse a --max_seq_length past the positions `model` can embed (it would fail at the first batch)."""
    limit = position_limit(model, model.config)  # None, or -1 (XLNet's config): no limit from positions
    if limit is not None and 0 < limit < args.max_seq_length:
        raise UserError(f"--max_seq_length {args.max_seq_length} is more than the {limit} positions of {what}; lower it")


def teacher_tokenizer(args: Namespace) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with the teacher, if any (a folder of weights alone has none)."""
    try:
        return AutoTokenizer.from_pretrained(args.teacher_name_or_path)
    except MODEL_LOAD_ERRORS:
        return None


def model_inputs(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch's tensors `model` reads: segment ids only for families with segments (not DistilBERT, XLM, RoBERTa)."""
    raw = model.module if hasattr(model, "module") else model
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    config = raw.config
    has_segments = getattr(config, "type_vocab_size", 0) >= 2 or config.model_type in SEGMENTS_WITHOUT_TABLE
    if "token_type_ids" in batch and has_segments and "token_type_ids" in inspect.signature(raw.forward).parameters:
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs


def squad_loss(args: Namespace):
    """The loss of a batch: the student's span loss, and with a teacher the KL on start and end (SPEC §14)."""

    def loss_fn(student: nn.Module, teacher: nn.Module | None, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        output = student(**model_inputs(student, batch), start_positions=batch["start_positions"],
                         end_positions=batch["end_positions"])
        if teacher is None:
            return {"loss": output.loss}
        with torch.no_grad():
            t_output = teacher(**model_inputs(teacher, batch))
        loss_start = task_training.soft_target_loss(output.start_logits, t_output.start_logits, args.temperature)
        loss_end = task_training.soft_target_loss(output.end_logits, t_output.end_logits, args.temperature)
        loss_ce = (loss_start + loss_end) / 2.0
        loss = args.alpha_ce * loss_ce + args.alpha_squad * output.loss
        return {"loss": loss, "loss_ce": loss_ce, "loss_qa": output.loss}

    return loss_fn


def gold_answers(examples: Sequence[SquadExample]) -> dict[str, list[str]]:
    """qas_id -> gold texts ([] for an unanswerable question)."""
    return {example.qas_id: list(example.answers) for example in examples}


def evaluate(args: Namespace, model: nn.Module, examples: Sequence[SquadExample], features: dict[str, np.ndarray],
             prefix: str) -> dict[str, float]:
    """Predict every question of the dev set, write the prediction files, and return the official scores."""
    model.eval()
    dataset = SquadFeatures(features)
    start_logits, end_logits = [], []
    with torch.no_grad():
        for begin in range(0, len(dataset), args.per_gpu_eval_batch_size):
            batch = {key: values[begin:begin + args.per_gpu_eval_batch_size].to(args.device)
                     for key, values in dataset.arrays.items()}
            output = model(**model_inputs(model, batch))
            start_logits.append(output.start_logits.float().cpu().numpy())
            end_logits.append(output.end_logits.float().cpu().numpy())
    predictions, nbest, null_odds = compute_predictions(
        examples, features, np.concatenate(start_logits), np.concatenate(end_logits), args.n_best_size,
        args.max_answer_length, args.version_2_with_negative, args.null_score_diff_threshold,
    )
    write_prediction_files(args.output_dir, prefix, predictions, nbest, null_odds)
    golds = gold_answers(examples)
    if args.version_2_with_negative:
        # exact/f1 of the predictions as written; the null odds (as the official script's --na-prob-file) give the
        # best thresholds.
        return squad_v2_scores(golds, predictions, null_odds, na_prob_threshold=math.inf)
    return squad_v1_scores(golds, predictions)


def folders_to_evaluate(args: Namespace) -> list[Path]:
    """After training, --output_dir (and its checkpoints with --eval_all_checkpoints); without --do_train, the same
    when --output_dir holds a model, else --model_name_or_path [+]."""
    output_dir = Path(args.output_dir)
    if args.do_train or (output_dir / "config.json").is_file():
        return task_training.checkpoints_to_evaluate(output_dir, args.eval_all_checkpoints)
    return [Path(args.model_name_or_path)]


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Check, load, (train), (evaluate); every input is read and checked before anything is written."""
    args = build_parser().parse_args(argv)
    sanity_checks(args)
    train_file = squad_file(args.data_dir, args.train_file, True, args.version_2_with_negative) if args.do_train else None
    predict_file = (squad_file(args.data_dir, args.predict_file, False, args.version_2_with_negative)
                    if args.do_eval else None)
    if args.do_train:  # the trained model replaces the files of a model folder in --output_dir
        inputs = {flag: getattr(args, flag[2:]) or None for flag in MODEL_FLAGS}
        check_outputs_apart({"--output_dir": args.output_dir},
                            {**inputs, "--train_file": train_file, "--predict_file": predict_file})
    task_training.setup_run(args, RUN_KIND, SQUAD_FILES)
    train_examples = read_squad_examples(train_file, True, args.version_2_with_negative) if train_file else None
    eval_examples = read_squad_examples(predict_file, False, args.version_2_with_negative) if predict_file else None
    tokenizer = load_squad_tokenizer(args)
    training = (load_training(args, train_file, train_examples, predict_file, eval_examples, tokenizer)
                if args.do_train else None)
    done_file = "eval_results.json" if args.do_eval else task_training.TRAINING_ARGS_FILE  # the last write
    with task_training.output_folder(args, RUN_KIND, SQUAD_FILES, done_file):
        if training is not None:
            train_student(args, training, eval_examples, tokenizer)
        if not (args.do_eval and args.is_master):
            return {}
        eval_features = training.eval_features if training is not None else None
        return evaluate_folders(args, predict_file, eval_examples, eval_features, tokenizer)


class Training(NamedTuple):
    """What --do_train needs, loaded and checked before --output_dir is touched."""

    student: nn.Module
    teacher: nn.Module | None
    features: dict[str, np.ndarray]
    eval_features: dict[str, np.ndarray] | None


def load_training(
    args: Namespace, train_file: str, train_examples: list[SquadExample], predict_file: str | None,
    eval_examples: list[SquadExample] | None, tokenizer: PreTrainedTokenizerBase,
) -> Training:
    """The student and the teacher, loaded and checked against each other, and the features (cached beside the
    input files)."""
    student = task_training.load_task_model(AutoModelForQuestionAnswering, args.model_type, args.model_name_or_path,
                                            "--model_name_or_path", config_name=args.config_name,
                                            cache_dir=args.cache_dir)
    teacher = task_training.load_teacher(args, AutoModelForQuestionAnswering)
    check_positions(args, student, "the student (--model_name_or_path)")
    if teacher is not None:
        check_positions(args, teacher, "the teacher (--teacher_name_or_path)")
        task_training.check_same_vocabulary(teacher, student, teacher_tokenizer(args), tokenizer)
    features = load_or_build_features(train_file, train_examples, tokenizer, args, True, args.is_master)
    eval_features = (load_or_build_features(predict_file, eval_examples, tokenizer, args, False, args.is_master)
                     if eval_examples else None)
    return Training(student, teacher, features, eval_features)


def train_student(
    args: Namespace, training: Training, eval_examples: list[SquadExample] | None, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The training loop, evaluating during training with --evaluate_during_training."""

    def evaluate_during_training(model: nn.Module, prefix: str) -> dict[str, float]:
        return evaluate(args, model, eval_examples, training.eval_features, prefix)

    steps = task_training.train(args, training.student.to(args.device), training.teacher,
                                SquadFeatures(training.features), squad_loss(args), tokenizer,
                                evaluate_during_training if eval_examples else None)
    logger.info(f"global_step = {steps}")


def evaluate_folders(
    args: Namespace, predict_file: str, eval_examples: list[SquadExample], eval_features: dict[str, np.ndarray] | None,
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, float]:
    """Evaluate each model folder `folders_to_evaluate` names, writing its predictions and eval_results<step>.json."""
    results: dict[str, float] = {}
    for folder in folders_to_evaluate(args):
        step = task_training.checkpoint_step(folder)
        prefix = "" if step is None else str(step)
        model = task_training.load_task_model(AutoModelForQuestionAnswering, args.model_type, str(folder),
                                              "the model to evaluate")
        check_positions(args, model, f"the model to evaluate ({str(folder)!r})")
        if eval_features is None:  # built once the first model passed its checks
            eval_features = load_or_build_features(predict_file, eval_examples, tokenizer, args, False, True)
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        scores = evaluate(args, model.to(args.device), eval_examples, eval_features, prefix)
        write_json(Path(args.output_dir) / f"eval_results{prefix}.json", scores)
        results.update({f"{key}_{prefix}" if prefix else key: value for key, value in scores.items()})
    logger.info(f"Results: {results}")
    return results


if __name__ == "__main__":
    task_training.run_script(main)
