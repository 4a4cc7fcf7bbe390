"""The second step on GLUE: fine-tune a student on a GLUE task, or on every task in --data_dir, with or
without a teacher fine-tuned on the task, and print the paper's table (Score without WNLI, then a column
per task). Without --teacher_type it is plain fine-tuning: the no-teacher baseline, and how to make the
teachers.

    # the teachers: one per task found in glue_data/ (official GLUE layout), in teachers/<task>/
    python run_glue_w_distillation.py --model_type bert --model_name_or_path bert-base-uncased \\
        --data_dir glue_data --output_dir teachers --do_train --do_eval
    # the students, each distilled from its task's teacher (teachers/<task>/), then the table
    python run_glue_w_distillation.py --model_type distilbert --model_name_or_path serialization_dir/my_student \\
        --teacher_type bert --teacher_name_or_path teachers --data_dir glue_data --output_dir students \\
        --do_train --do_eval
    # one task, as the original run_glue.py took it; two CPU processes
    torchrun --nproc_per_node 2 run_glue_w_distillation.py --task_name mrpc --data_dir glue_data/MRPC --no_cuda ...
    # a task of your own, from CSV or JSON lines with named columns
    python run_glue_w_distillation.py --task_name reviews --train_file train.csv --predict_file dev.csv \\
        --text_columns review --label_column stars ...

Loss with a teacher: `alpha_ce * loss_ce + alpha_task * loss_task`, loss_ce the KL divergence of the
student's class distribution from the teacher's at --temperature (batchmean, times T^2), or for a
regression task (STS-B) the mean squared difference of their predictions; loss_task the cross-entropy
with the labels (the squared error for regression). Without a teacher, loss_task alone.

Outputs: with one task, --output_dir holds its checkpoints and final model, as the original's; with
several, --output_dir/<task>/ each (CoLA, MNLI, ...). --do_eval evaluates those final models (and with
--eval_all_checkpoints their checkpoints), writes eval_results.txt beside each, and glue_results.json and
glue_table.md in --output_dir. Without --do_train it evaluates the models already in --output_dir, or, when
there are none, --model_name_or_path (or its <task>/ folders) [+], so a released model can be scored.
"""

import inspect
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

import glue_tasks
from glue_tasks import DEV, GLUE_TASKS, TRAIN, Task
from scripts.cli_flags import ArgumentParser, non_negative_float, number
from scripts.file_safety import check_outputs_apart
from scripts.model_families import position_limit
from task_training import (
    AUTO, TRAINING_ARGS_FILE, add_task_arguments, check_same_vocabulary, check_task_arguments, checkpoint_step,
    checkpoints_to_evaluate, load_task_model, output_folder, run_script, setup_run, soft_target_loss, train,
)
from utils import TEACHER_DTYPES, UserError, atomic_write, load_tokenizer, logger, set_seed, write_json

MODEL_TYPES = ("bert", "distilbert", "roberta", "xlnet", "xlm", AUTO)
RUN_KIND = "run_glue_w_distillation.py"  # what its --output_dir marker names
RESULTS_JSON, TABLE_MD, EVAL_RESULTS = "glue_results.json", "glue_table.md", "eval_results.txt"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_task_arguments(parser, MODEL_TYPES)
    add = parser.add_argument
    add("--data_dir", default=None,
        help="The GLUE data: a folder of task folders (CoLA, SST-2, ...) or one task's folder (with --task_name).")
    add("--task_name", default=None,
        help=f"One of {', '.join(GLUE_TASKS)}, `all` (the default: every task found in --data_dir), or a name of "
             "your own for --train_file/--predict_file.")
    add("--alpha_task", default=0.5, type=non_negative_float,
        help="Weight of the task's own loss (cross-entropy with the labels; squared error for regression).")
    add("--max_seq_length", default=128, type=number(int, 4),
        help="Tokens per example after tokenization (longer pairs lose tokens from the longer text).")
    add("--train_file", default=None, help="[+] A task of your own: training examples (.csv, .tsv, .jsonl).")
    add("--predict_file", default=None, help="[+] A task of your own: evaluation examples (.csv, .tsv, .jsonl).")
    add("--text_columns", nargs="+", default=["sentence"], metavar="COLUMN",
        help="[+] With --train_file/--predict_file: the text column, or the two columns of a pair.")
    add("--label_column", default="label", help="[+] With --train_file/--predict_file: the label column.")
    add("--label_list", default=None,
        help="[+] With --train_file/--predict_file: the labels, comma-separated, in output order (default: the "
             "training file's, sorted). A GLUE --task_name brings its own.")
    add("--regression", action="store_true",
        help="[+] With --train_file/--predict_file: numeric labels, one output, Pearson/Spearman.")
    return parser


def check_args(args: Namespace) -> None:
    """The checks of the GLUE flags that their types cannot make (one UserError each)."""
    check_task_arguments(args)
    own_files = args.train_file or args.predict_file
    if own_files and (args.task_name is None or args.task_name.lower() == "all"):
        raise UserError("--train_file/--predict_file need --task_name: the name of that task")
    if not own_files and args.data_dir is None:
        raise UserError("pass --data_dir (the GLUE data), or --task_name with --train_file/--predict_file")
    if not own_files and args.task_name and args.task_name.lower() != "all" and not glue_tasks.is_glue_task(
            args.task_name):
        raise UserError(f"--task_name {args.task_name!r} is not a GLUE task ({', '.join(GLUE_TASKS)}, all); a task "
                        "of your own needs --train_file and --predict_file")
    if own_files and args.do_train and not args.train_file:
        raise UserError("--do_train needs --train_file for a task of your own")
    if own_files and args.do_eval and not args.predict_file:
        raise UserError("--do_eval needs --predict_file for a task of your own")
    if not 1 <= len(args.text_columns) <= 2:
        raise UserError(f"--text_columns takes one or two columns, got {len(args.text_columns)}")
    if args.teacher_type is not None and args.alpha_ce == 0:
        raise UserError("a teacher needs --alpha_ce > 0 (got 0); without --teacher_type the student trains alone")
    if args.alpha_ce + args.alpha_task == 0:
        raise UserError("--alpha_ce + --alpha_task must be > 0: nothing would be trained")


def load_tasks(args: Namespace) -> list[Task]:
    """Every task asked for, its files read and checked (a bad file is one line before anything is written)."""
    splits = [split for split, wanted in ((TRAIN, args.do_train), (DEV, args.do_eval)) if wanted]
    if args.train_file or args.predict_file:
        name = args.task_name.lower()
        layout = GLUE_TASKS.get(name)
        labels = args.label_list.split(",") if args.label_list else None
        task = glue_tasks.load_named_columns_task(
            name if layout else args.task_name,
            args.train_file if TRAIN in splits else None,
            args.predict_file if DEV in splits else None,
            args.text_columns,
            args.label_column,
            layout.labels if layout else labels,
            layout.labels is None if layout else args.regression,
        )
        if layout:
            task.metrics = layout.metrics
        return [task]
    names = glue_tasks.task_names(args.task_name) or glue_tasks.find_glue_tasks(args.data_dir)
    return [glue_tasks.load_glue_task(args.data_dir, name, splits) for name in names]


def task_output_dir(args: Namespace, task: Task, n_tasks: int) -> Path:
    """--output_dir with one task (as the original's), --output_dir/<CoLA|MNLI|...> with several."""
    return Path(args.output_dir) / column_name(task.name) if n_tasks > 1 else Path(args.output_dir)


def column_name(name: str) -> str:
    return GLUE_TASKS[name].column if name in GLUE_TASKS else name


def per_task_path(path: str, task: Task) -> str:
    """`path/<CoLA|MNLI|...>` when that folder exists (what a run on several tasks writes), else `path` itself."""
    per_task = Path(path) / column_name(task.name)
    return str(per_task) if per_task.is_dir() else path


def teacher_path(args: Namespace, task: Task) -> str:
    """The task's teacher, from --teacher_name_or_path: one teacher, or the --output_dir of a teachers' run."""
    return per_task_path(args.teacher_name_or_path, task)


def folders_to_evaluate(args: Namespace, task: Task, n_tasks: int) -> list[Path]:
    """The task's folder in --output_dir (and its checkpoints with --eval_all_checkpoints); without --do_train, the
    same when it holds a model (the original), else --model_name_or_path (or its <task>/ folder) [+]."""
    folder = task_output_dir(args, task, n_tasks)
    if args.do_train or (folder / "config.json").is_file():
        return checkpoints_to_evaluate(folder, args.eval_all_checkpoints)
    return [Path(per_task_path(args.model_name_or_path, task))]


def label_config(task: Task) -> dict:
    """Config fields that give a model the task's head: its width and, by name, the labels it predicts."""
    labels = task.labels or ("score",)
    return {
        "num_labels": task.num_labels,
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
        "problem_type": "regression" if task.is_regression else "single_label_classification",
    }


def check_task_head(model: nn.Module, task: Task, flag: str, name: str) -> None:
    """Refuse a fine-tuned model (teacher, or the model --do_eval reads) whose outputs are not the task's labels."""
    config = model.config
    if config.num_labels != task.num_labels:
        raise UserError(f"{flag} {name!r} predicts {config.num_labels} label(s) and task {column_name(task.name)} "
                        f"has {task.num_labels}: give the model fine-tuned on this task")
    named = [config.id2label[i] for i in range(config.num_labels)]
    if task.labels and named != [f"LABEL_{i}" for i in range(config.num_labels)] and named != list(task.labels):
        raise UserError(f"{flag} {name!r} predicts the labels {', '.join(named)} and task {column_name(task.name)} "
                        f"has {', '.join(task.labels)} in that order: give the model fine-tuned on this task")


def check_positions(model: nn.Module, max_seq_length: int, flag: str) -> None:
    limit = position_limit(model, model.config)
    if limit is not None and max_seq_length > limit:
        raise UserError(f"--max_seq_length {max_seq_length} is more than the {limit} positions of {flag}'s model: "
                        f"pass --max_seq_length {limit} or less")


@dataclass
class TaskModels:
    student: nn.Module
    teacher: nn.Module | None


def load_models(args: Namespace, task: Task, tokenizer: PreTrainedTokenizerBase) -> TaskModels:
    """The task's student (its head seeded with --seed) and teacher, checked against each other and the task."""
    set_seed(args)  # the student's new head: the same start for every run of the same seed
    student = load_task_model(AutoModelForSequenceClassification, args.model_type, args.model_name_or_path,
                              "--model_name_or_path", args.config_name, **label_config(task))
    check_positions(student, args.max_seq_length, "--model_name_or_path")
    teacher = None
    if args.teacher_type is not None:
        path = teacher_path(args, task)
        dtype = TEACHER_DTYPES[args.teacher_dtype] if args.teacher_dtype else None
        teacher = load_task_model(AutoModelForSequenceClassification, args.teacher_type, path,
                                  "--teacher_name_or_path", dtype=dtype)
        teacher.requires_grad_(False)
        check_task_head(teacher, task, "--teacher_name_or_path", path)
        check_positions(teacher, args.max_seq_length, "--teacher_name_or_path")
        check_same_vocabulary(teacher, student, load_tokenizer(path, "--teacher_name_or_path"), tokenizer)
    return TaskModels(student, teacher)


class Features(Dataset):
    """A task's examples as padded tensors: one dict a feature (input_ids, attention_mask, token_type_ids, labels)."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["input_ids"])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


def encode(task: Task, examples: Sequence[glue_tasks.Example], tokenizer: PreTrainedTokenizerBase,
           args: Namespace) -> Features:
    """Tokenize (pairs as pairs), cut to --max_seq_length, pad to the longest example of the set."""
    prepare = str.lower if args.do_lower_case else str
    texts_a = [prepare(example.text_a) for example in examples]
    texts_b = [prepare(example.text_b) for example in examples] if examples and examples[0].text_b is not None else None
    encoded = tokenizer(texts_a, texts_b, truncation=True, max_length=args.max_seq_length, padding="longest",
                        return_token_type_ids=True, return_tensors="pt")
    tensors = {key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids")}
    tensors["labels"] = torch.from_numpy(task.label_ids(examples))
    return Features(tensors)


def model_inputs(model: nn.Module) -> tuple[str, ...]:
    """The features a model's forward takes: DistilBERT has no token_type_ids, BERT's teacher reads them."""
    accepted = inspect.signature(model.forward).parameters
    return tuple(key for key in ("input_ids", "attention_mask", "token_type_ids") if key in accepted)


def glue_losses(
    s_logits: Tensor,
    t_logits: Tensor | None,
    labels: Tensor,
    regression: bool,
    temperature: float,
    alpha_ce: float,
    alpha_task: float,
) -> dict[str, Tensor]:
    """The loss terms and their total.

    Args:
        s_logits, t_logits: (bs, num_labels) student and teacher outputs (t_logits None without a teacher).
        labels: (bs,) int64 classes, or float targets for regression (num_labels 1).
        regression: STS-B-like: squared errors instead of cross-entropy and KL.

    Returns:
        {"loss": total, "loss_task": ..., "loss_ce": ...}: without a teacher the total is loss_task alone;
        with one, alpha_ce * loss_ce + alpha_task * loss_task.
    """
    s_logits = s_logits.float()
    if regression:
        loss_task = F.mse_loss(s_logits.squeeze(-1), labels.float())
    else:
        loss_task = F.cross_entropy(s_logits, labels)
    if t_logits is None:
        return {"loss": loss_task, "loss_task": loss_task}
    if regression:
        loss_ce = F.mse_loss(s_logits.squeeze(-1), t_logits.float().squeeze(-1))
    else:
        loss_ce = soft_target_loss(s_logits, t_logits, temperature)
    return {"loss": alpha_ce * loss_ce + alpha_task * loss_task, "loss_ce": loss_ce, "loss_task": loss_task}


def make_loss_fn(args: Namespace, task: Task, models: TaskModels):
    """task_training.train's loss_fn: both models on the batch, then glue_losses."""
    student_keys = model_inputs(models.student)
    teacher_keys = model_inputs(models.teacher) if models.teacher is not None else ()

    def loss_fn(student: nn.Module, teacher: nn.Module | None, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        s_logits = student(**{key: batch[key] for key in student_keys}).logits
        t_logits = None
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(**{key: batch[key] for key in teacher_keys}).logits
        return glue_losses(s_logits, t_logits, batch["labels"], task.is_regression, args.temperature, args.alpha_ce,
                           args.alpha_task)

    return loss_fn


@torch.no_grad()
def predict(model: nn.Module, features: Features, args: Namespace) -> np.ndarray:
    """(n,) predicted class indexes, or predicted values for a regression head."""
    model.eval()
    keys = model_inputs(model)
    outputs = []
    for batch in DataLoader(features, batch_size=args.per_gpu_eval_batch_size):
        logits = model(**{key: batch[key].to(args.device) for key in keys}).logits.float()
        outputs.append(logits.squeeze(-1) if logits.size(-1) == 1 else logits.argmax(-1))
    return torch.cat(outputs).cpu().numpy()


def evaluate(model: nn.Module, task: Task, eval_features: dict[str, Features], args: Namespace) -> dict:
    """{evaluation set: {metric: value}} of `model` on the task's dev set(s)."""
    results = {}
    for split, features in eval_features.items():
        predictions = predict(model, features, args)
        results[split] = glue_tasks.compute_metrics(task, predictions, features.tensors["labels"].numpy())
        logger.info(f"{column_name(task.name)} {split}: " + ", ".join(f"{k} = {v:.4f}" for k, v in
                                                                        results[split].items()))
    return results


def write_eval_results(folder: Path, results: dict) -> None:
    """eval_results.txt (the original's name): one `<set>_<metric> = <value>` line each."""
    lines = [f"{split}_{metric} = {value}" for split, metrics in results.items() for metric, value in metrics.items()]
    atomic_write(folder / EVAL_RESULTS, lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))


def train_task(args: Namespace, task: Task, models: TaskModels, tokenizer, eval_features: dict[str, Features]) -> None:
    """Fine-tune (and distil) the task's student into args.output_dir with task_training.train."""
    student = models.student.to(args.device)
    student.train()
    teacher = models.teacher.to(args.device).eval() if models.teacher is not None else None
    set_seed(args)  # dropout draws from here on: the same whether or not other tasks ran before

    def evaluate_during_training(model: nn.Module, prefix: str) -> dict[str, float]:
        results = evaluate(model, task, eval_features, args)
        return {f"{split}_{metric}": value for split, metrics in results.items() for metric, value in metrics.items()}

    logger.info(f"***** {column_name(task.name)}: {len(task.train)} training examples, "
                f"{'distilled from ' + teacher_path(args, task) if teacher is not None else 'no teacher'} *****")
    train(args, student, teacher, encode(task, task.train, tokenizer, args), make_loss_fn(args, task, models),
          tokenizer, evaluate_during_training if eval_features else None)


def table_row_name(args: Namespace) -> str:
    name = Path(args.model_name_or_path.rstrip("/")).name or args.model_name_or_path
    return f"{name} distilled from {Path(args.teacher_name_or_path.rstrip('/')).name}" if args.teacher_type else name


def check_inputs(args: Namespace) -> tuple[list[Task], PreTrainedTokenizerBase, dict[str, TaskModels]]:
    """Read every task's files and load and check every task's models, before anything is written.

    Returns the tasks, the tokenizer, and the first task's models (kept: the others are loaded again in turn,
    so that one task's models are in memory at a time).
    """
    if args.do_train:  # --do_eval alone reads --output_dir: it holds the models it evaluates
        check_outputs_apart({"--output_dir": args.output_dir}, {flag: getattr(args, flag[2:]) or None for flag in (
            "--model_name_or_path", "--teacher_name_or_path", "--data_dir", "--train_file", "--predict_file",
            "--config_name", "--tokenizer_name")})
    tasks = load_tasks(args)
    # the start's tokenizer; to evaluate a run on several tasks, the one its task folders share
    tokenizer_source = args.model_name_or_path if args.do_train else per_task_path(args.model_name_or_path, tasks[0])
    tokenizer = load_tokenizer(args.tokenizer_name or tokenizer_source, "--tokenizer_name or --model_name_or_path")
    args.n_gpu = 0  # set properly by setup_run; the checks below run on CPU before it
    checked = {}
    if args.do_train:
        checked = {task.name: load_models(args, task, tokenizer) for task in tasks[:1]}
        for task in tasks[1:]:
            load_models(args, task, tokenizer)
    return tasks, tokenizer, checked


def evaluate_all(args: Namespace, tasks: list[Task], eval_features: dict[str, dict[str, Features]]) -> dict:
    """Evaluate every task's models, then write eval_results.txt beside each, glue_results.json and glue_table.md.

    Returns the results summary.
    """
    results, per_folder = {}, {}
    for task in tasks:  # every model evaluated before any result is written
        task_folder = task_output_dir(args, task, len(tasks))
        for folder in folders_to_evaluate(args, task, len(tasks)):
            model = load_task_model(AutoModelForSequenceClassification, args.model_type, str(folder),
                                    "the model to evaluate").to(args.device)
            check_task_head(model, task, "the model to evaluate", str(folder))
            # a checkpoint's results go beside it, the final model's (or a given model's) in the task's folder
            results_folder = folder if checkpoint_step(folder) is not None else task_folder
            per_folder.setdefault(task.name, {})[results_folder] = evaluate(model, task, eval_features[task.name], args)
        results[task.name] = per_folder[task.name][task_folder]  # the final model's
    for task_results in per_folder.values():
        for folder, found in task_results.items():
            folder.mkdir(parents=True, exist_ok=True)
            write_eval_results(folder, found)
    summary = glue_tasks.results_summary(table_row_name(args), results)
    if args.eval_all_checkpoints:
        summary["checkpoints"] = {task: {str(path): found for path, found in folders.items()}
                                  for task, folders in per_folder.items()}
    table = glue_tasks.results_table(summary)
    write_json(Path(args.output_dir) / RESULTS_JSON, summary)
    atomic_write(Path(args.output_dir) / TABLE_MD, lambda tmp: tmp.write_text(table, encoding="utf-8"))
    print(table, end="")
    return summary


def main(argv: Sequence[str] | None = None) -> dict | None:
    """Parse, check every input, train each task in turn, evaluate, write the table.

    Returns the results summary (the master's, with --do_eval), else None.
    """
    args = build_parser().parse_args(argv)
    check_args(args)
    tasks, tokenizer, checked = check_inputs(args)
    own_files = (RESULTS_JSON, TABLE_MD, EVAL_RESULTS, *(column_name(task.name) for task in tasks))
    setup_run(args, RUN_KIND, own_files)
    last_model = task_output_dir(args, tasks[-1], len(tasks)).relative_to(args.output_dir) / TRAINING_ARGS_FILE
    done_file = TABLE_MD if args.do_eval else str(last_model)  # the last write
    with output_folder(args, RUN_KIND, own_files, done_file):
        return train_and_evaluate(args, tasks, tokenizer, checked)


def train_and_evaluate(
    args: Namespace, tasks: list[Task], tokenizer: PreTrainedTokenizerBase, checked: dict[str, TaskModels]
) -> dict | None:
    """Train each task in turn (--do_train), then evaluate them all (--do_eval), once every check has passed."""
    eval_features = {}
    for task in tasks:
        task_args = Namespace(**vars(args))
        task_args.output_dir = str(task_output_dir(args, task, len(tasks)))
        eval_features[task.name] = {split: encode(task, examples, tokenizer, args)
                                    for split, examples in task.evals.items()}
        if args.do_train:
            models = checked.pop(task.name, None) or load_models(task_args, task, tokenizer)
            train_task(task_args, task, models, tokenizer,
                       eval_features[task.name] if args.evaluate_during_training else {})
    if not (args.do_eval and args.is_master):
        return None
    return evaluate_all(args, tasks, eval_features)


if __name__ == "__main__":
    run_script(main)
