"""Distil a pretrained teacher (BERT, RoBERTa, GPT-2) into a smaller student (DistilBERT, DistilRoBERTa, DistilGPT2).

Usage (data from scripts/binarized_data.py and scripts/token_counts.py, optional student
initialisation from scripts/extract_distilbert.py or scripts/extract.py):

CPU, one process (--n_gpu 0):
    python train.py --n_gpu 0 --force --dump_path serialization_dir/cpu_run \\
        --student_type distilbert --student_config training_configs/distilbert-base-uncased.json \\
        --teacher_type bert --teacher_name bert-base-uncased \\
        --alpha_ce 5.0 --alpha_mlm 2.0 --alpha_cos 1.0 --alpha_clm 0.0 --mlm --freeze_pos_embs \\
        --data_file data/binarized_text.bert-base-uncased.pickle \\
        --token_counts data/token_counts.bert-base-uncased.pickle

One GPU: the same command with --n_gpu 1 (the default).

N GPUs on one node with torchrun (one process per GPU, NCCL):
    torchrun --nproc_per_node 4 train.py --n_gpu 4 --force --dump_path serialization_dir/my_first_training ...

N GPUs with the legacy launcher (NODE_RANK, N_NODES, N_GPU_NODE, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
exported), exactly as in the original README:
    python -m torch.distributed.launch --nproc_per_node=$N_GPU_NODE --nnodes=$N_NODES --node_rank $NODE_RANK \\
        --master_addr $MASTER_ADDR --master_port $MASTER_PORT train.py --force --n_gpu $WORLD_SIZE ...

Several CPU processes over gloo (tests, debugging the distributed path without a GPU):
    torchrun --nproc_per_node 2 train.py --n_gpu 0 ...

Only the master process (node 0, local rank 0) writes to --dump_path: parameters.json, git_log.json,
config.json, checkpoint.pth, model_epoch_<e>.pth, pytorch_model.bin, the save_pretrained files, the
tensorboard log in log/train and training_state.pth. Bad flags or files give one `error: ...` line and
exit status 1; every file is written to a temporary name and renamed, so a crash never damages one. The
master locks --dump_path while it runs: a second run into the same folder stops with an error.

Interrupted runs continue where they stopped, bit for bit: run the same command with --resume instead
of --force (the same launcher and number of processes too). SIGTERM or SIGINT (Ctrl-C) makes a run save
its training state at the next optimizer step and exit with status 143 or 130; a killed run (kill -9,
power cut) loses only the iterations since its last checkpoint:
    python train.py --n_gpu 0 --dump_path serialization_dir/cpu_run ... --resume
"""

import argparse
import fcntl
import json
import math
import os
import pickle
import shlex
import shutil
import sys
from argparse import Namespace
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    RobertaConfig,
    RobertaForMaskedLM,
)

from distiller import LOSS_TERMS, TEACHER_TERMS, TRAINING_STATE, Distiller, load_training_state
from evaluation import Evaluator, build_eval_batches, load_binarized_data, load_token_file
from lm_seqs_dataset import LmSeqsDataset
from losses import DEFAULT_LOSS_CHUNK_SIZE
from scripts.cli_flags import non_negative_int
from scripts.token_data import load_token_counts
from utils import (
    DIST_TIMEOUT_S,
    NonFiniteLossError,
    TrainingInterrupted,
    UserError,
    git_log,
    init_gpu_params,
    logger,
    remove_stale_temporaries,
    set_seed,
    setup_logging,
    special_token_ids,
    write_json,
)

STUDENT_CLASSES = {
    "distilbert": (DistilBertConfig, DistilBertForMaskedLM),
    "bert": (BertConfig, BertForMaskedLM),  # [+] a BERT student: MLM pretraining of a teacher (quickstart.py)
    "roberta": (RobertaConfig, RobertaForMaskedLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),
}
TEACHER_CLASSES = {
    "bert": (BertConfig, BertForMaskedLM),
    "roberta": (RobertaConfig, RobertaForMaskedLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),
}
POSITION_EMBEDDINGS = {
    "distilbert": "distilbert.embeddings.position_embeddings",
    "roberta": "roberta.embeddings.position_embeddings",
    "gpt2": "transformer.wpe",
}
# Special-token roles the batches are built from: markers and padding of the dataset, mask of MLM.
REQUIRED_ROLES = {
    True: ("cls_token", "sep_token", "pad_token", "mask_token"),  # --mlm
    False: ("bos_token", "eos_token", "unk_token"),
}
POSITIVE_INT_FLAGS = (
    "n_epoch", "batch_size", "gradient_accumulation_steps", "log_interval", "checkpoint_interval", "dist_timeout"
)
# Flags a --resume may change: how often files are written, what is evaluated, how long processes
# wait for each other; never the numbers the training computes. Every other flag must be the run's,
# except those naming this invocation rather than the run.
MAY_CHANGE_ON_RESUME = (
    "log_interval", "checkpoint_interval", "eval_interval", "eval_data_file", "fp16_opt_level", "dist_timeout",
    "num_workers", "compile",
)
NOT_COMPARED_ON_RESUME = ("dump_path", "force", "resume", "local_rank", *MAY_CHANGE_ON_RESUME)


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the original train.py with its default, plus --bf16 and --max_model_input_size."""
    parser = argparse.ArgumentParser(
        description="Distil a teacher language model into a student (DistilBERT / DistilRoBERTa / DistilGPT2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--force", action="store_true", help="Replace --dump_path if it already exists.")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="[+] Continue the run in --dump_path from its training_state.pth (saved every --checkpoint_interval "
        "iterations, at each epoch end and on SIGTERM/SIGINT), bit for bit as if it had never stopped; deletes "
        "nothing. Give the run's command again (without --force) and the same number of processes: only "
        f"--{', --'.join(MAY_CHANGE_ON_RESUME)} may change; other differences are refused.",
    )
    parser.add_argument("--dump_path", type=str, required=True, help="Output folder (logs, checkpoints, configs).")
    parser.add_argument(
        "--data_file", type=str, required=True,
        help="Binarized data from scripts/binarized_data.py: the pickle, or [+] the .ids.npy file of --format mmap, "
        "memory-mapped (one copy in the page cache for every process of the machine).",
    )

    parser.add_argument("--student_type", type=str, choices=list(STUDENT_CLASSES), required=True,
        help="Student architecture. [+] 'bert' trains a BERT-architecture model (e.g. pretraining a small teacher "
        "with --alpha_mlm only).",
    )
    parser.add_argument("--student_config", type=str, required=True, help="Path to the student's config (JSON).")
    parser.add_argument(
        "--student_pretrained_weights",
        default=None,
        type=str,
        help="Initial student weights: a torch.save state dict (e.g. from scripts/extract_distilbert.py), "
        "a .safetensors file or a save_pretrained folder.",
    )
    parser.add_argument("--teacher_type", choices=["bert", "roberta", "gpt2"], required=True)
    parser.add_argument("--teacher_name", type=str, required=True, help="Teacher: hub name or local folder.")

    parser.add_argument("--temperature", default=2.0, type=float, help="Softmax temperature of the ce loss.")
    parser.add_argument("--alpha_ce", default=0.5, type=float, help="Weight of the distillation (KL) loss.")
    parser.add_argument("--alpha_mlm", default=0.0, type=float, help="Weight of the MLM loss; > 0 only with --mlm.")
    parser.add_argument("--alpha_clm", default=0.5, type=float, help="Weight of the CLM loss; 0 with --mlm.")
    parser.add_argument("--alpha_mse", default=0.0, type=float, help="Weight of the MSE loss on the logits.")
    parser.add_argument("--alpha_cos", default=0.0, type=float, help="Weight of the cosine loss on the hidden states.")

    parser.add_argument("--mlm", action="store_true", help="Masked-LM distillation (else causal LM).")
    parser.add_argument("--mlm_mask_prop", default=0.15, type=float, help="Fraction of tokens that become MLM targets.")
    parser.add_argument("--word_mask", default=0.8, type=float, help="Probability of masking a target.")
    parser.add_argument("--word_keep", default=0.1, type=float, help="Probability of keeping a target unchanged.")
    parser.add_argument("--word_rand", default=0.1, type=float, help="Probability of a random id for a target.")
    parser.add_argument(
        "--mlm_smoothing",
        default=0.7,
        type=float,
        help="Targets are drawn with probability count ** -mlm_smoothing (XLM/word2vec): rare tokens more often.",
    )
    parser.add_argument("--token_counts", type=str, help="Token counts (scripts/token_counts.py); needed with --mlm.")
    parser.add_argument(
        "--restrict_ce_to_mask",
        action="store_true",
        help="Compute the ce (and mse) loss on the MLM targets only, not on every real token.",
    )
    parser.add_argument(
        "--freeze_pos_embs",
        action="store_true",
        help="Freeze the position embeddings of a roberta or gpt2 student. DistilBERT students with "
        "sinusoidal_pos_embds in their config always keep them frozen.",
    )
    parser.add_argument(
        "--freeze_token_type_embds", action="store_true", help="Freeze the token-type embeddings (roberta only)."
    )

    parser.add_argument("--n_epoch", type=int, default=3, help="Number of passes over the data.")
    parser.add_argument("--batch_size", type=int, default=5, help="Sequences per micro-batch and process.")
    parser.add_argument(
        "--group_by_size",
        action="store_false",
        dest="group_by_size",
        help="A switch that turns grouping OFF, named as in the original: by default (group_by_size=%(default)s) "
        "batches are made of sequences of similar length to save padding; passing --group_by_size disables that.",
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=50,
        help="Micro-batches per optimizer step (effective batch = batch_size x this x processes).",
    )
    parser.add_argument("--warmup_prop", default=0.05, type=float, help="Fraction of the steps for linear warm-up.")
    parser.add_argument("--weight_decay", default=0.0, type=float, help="AdamW weight decay (not on biases/norms).")
    parser.add_argument("--learning_rate", default=5e-4, type=float, help="Peak learning rate of AdamW.")
    parser.add_argument("--adam_epsilon", default=1e-6, type=float, help="Epsilon of AdamW.")
    parser.add_argument("--max_grad_norm", default=5.0, type=float, help="Gradient clipping norm.")
    parser.add_argument(
        "--initializer_range",
        default=0.02,
        type=float,
        help="Kept from the original for compatibility and recorded in parameters.json; the student's random "
        "initialisation uses the initializer_range of --student_config.",
    )

    parser.add_argument("--fp16", action="store_true", help="Mixed precision float16 (torch.autocast + GradScaler).")
    parser.add_argument(
        "--fp16_opt_level",
        type=str,
        default="O1",
        help="Accepted for compatibility and ignored: it was an apex option; --fp16 uses torch.autocast.",
    )
    parser.add_argument("--bf16", action="store_true", help="Mixed precision bfloat16 (torch.autocast, no scaler).")
    parser.add_argument(
        "--max_model_input_size",
        type=int,
        default=None,
        help="Longest sequence fed to the models (longer ones are split); default: the tokenizer's "
        "model_max_length capped by the teacher's position embeddings (with --resume: the run's value).",
    )
    parser.add_argument("--n_gpu", type=int, default=1, help="GPUs in total (0 = CPU; > 1 needs a launcher).")
    parser.add_argument(
        "--num_workers",
        type=int,
        default=0,
        help="[+] DataLoader worker processes that collate batches (0: in the training process). The batches "
        "are the same for any value; on CUDA they are pinned and copied without blocking.",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="[+] torch.compile the student for the training steps (checkpoints stay plain state dicts). The "
        "first steps are slow while it compiles; worth it for long GPU runs.",
    )
    parser.add_argument(
        "--loss_chunk_size",
        type=non_negative_int,
        default=DEFAULT_LOSS_CHUNK_SIZE,
        help="[+] Rows of logits at a time in the losses over the vocabulary (and in evaluation): the final "
        "vocabulary projections and the ce/mlm/clm/mse terms are computed chunk by chunk, with their gradients, "
        "so that no (rows x vocabulary) tensor larger than a chunk exists. 0: full logits, as the original.",
    )
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        dest="local_rank",
        type=int,
        default=-1,
        help="Set by torch.distributed.launch (either spelling); torchrun's LOCAL_RANK takes precedence.",
    )
    parser.add_argument("--seed", type=int, default=56, help="Random seed.")
    parser.add_argument(
        "--dist_timeout",
        type=int,
        default=DIST_TIMEOUT_S,
        help="[+] Seconds a process waits for the others in a collective before the run fails (a process died "
        "or hangs); must exceed the longest pause of the master alone (evaluation, checkpoint writes).",
    )
    parser.add_argument(
        "--eval_data_file",
        type=str,
        default=None,
        help="[+] Held-out binarized data: masked-LM (or causal-LM) loss, perplexity, accuracy and agreement "
        "with the teacher, logged under eval/ at each epoch end and every --eval_interval iterations.",
    )
    parser.add_argument(
        "--eval_interval", type=int, default=0, help="[+] Evaluate every N micro-batches too (0: at epoch ends only)."
    )
    parser.add_argument("--log_interval", type=int, default=500, help="Tensorboard log every N micro-batches.")
    parser.add_argument(
        "--checkpoint_interval",
        type=int,
        default=4000,
        help="checkpoint.pth (and [+] training_state.pth, for --resume) every N micro-batches.",
    )
    return parser


def sanity_checks(args: Namespace) -> None:
    """Refuse inconsistent flags and missing input files before anything runs.

    Raises:
        UserError: naming the flag, the value and the fix.
    """
    for term in LOSS_TERMS:
        if getattr(args, f"alpha_{term}") < 0:
            raise UserError(f"--alpha_{term} must be >= 0 (got {getattr(args, f'alpha_{term}')})")
    if sum(getattr(args, f"alpha_{term}") for term in LOSS_TERMS) <= 0:
        raise UserError("the loss weights sum to 0: set at least one of --alpha_ce/mlm/clm/mse/cos > 0")
    if args.mlm and args.alpha_mlm <= 0:
        raise UserError(f"--mlm needs --alpha_mlm > 0 (got {args.alpha_mlm})")
    if not args.mlm and args.alpha_mlm != 0:
        raise UserError(f"--alpha_mlm must be 0 without --mlm (got {args.alpha_mlm}); add --mlm for masked-LM training")
    if (args.alpha_mlm > 0) == (args.alpha_clm > 0):
        raise UserError(
            f"exactly one of --alpha_mlm and --alpha_clm must be > 0 (got --alpha_mlm {args.alpha_mlm}, "
            f"--alpha_clm {args.alpha_clm}); with --mlm pass --alpha_clm 0.0"
        )

    if args.mlm:
        if args.token_counts is None or not os.path.isfile(args.token_counts):
            raise UserError(
                f"--mlm needs --token_counts, an existing file (got {args.token_counts!r}); "
                "make it with scripts/token_counts.py"
            )
        if args.student_type not in ("distilbert", "roberta", "bert"):
            raise UserError(f"--mlm needs --student_type distilbert, roberta or bert (got {args.student_type})")
        if args.teacher_type not in ("bert", "roberta"):
            raise UserError(f"--mlm needs --teacher_type bert or roberta (got {args.teacher_type})")
    else:
        if args.student_type != "gpt2":
            raise UserError(f"causal LM (no --mlm) needs --student_type gpt2 (got {args.student_type}); or add --mlm")
        if args.teacher_type != "gpt2":
            raise UserError(f"causal LM (no --mlm) needs --teacher_type gpt2 (got {args.teacher_type}); or add --mlm")
    expected_teacher = "bert" if args.student_type == "distilbert" else args.student_type
    if args.teacher_type != expected_teacher:
        raise UserError(
            f"--student_type {args.student_type} needs --teacher_type {expected_teacher} (got {args.teacher_type})"
        )

    if not os.path.isfile(args.data_file):
        raise UserError(f"--data_file {args.data_file!r} does not exist; make it with scripts/binarized_data.py")
    if not os.path.isfile(args.student_config):
        raise UserError(f"--student_config {args.student_config!r} does not exist (see training_configs/)")
    if args.eval_data_file is not None and not os.path.isfile(args.eval_data_file):
        raise UserError(f"--eval_data_file {args.eval_data_file!r} does not exist; make it with scripts/binarized_data.py")
    if args.eval_interval < 0:
        raise UserError(f"--eval_interval must be >= 0 (got {args.eval_interval})")
    if args.student_pretrained_weights is not None and not os.path.exists(args.student_pretrained_weights):
        raise UserError(f"--student_pretrained_weights {args.student_pretrained_weights!r} does not exist")
    if args.freeze_token_type_embds and args.student_type != "roberta":
        raise UserError(
            f"--freeze_token_type_embds only applies to --student_type roberta (got {args.student_type}); drop it"
        )

    for flag in POSITIVE_INT_FLAGS:
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    if args.temperature <= 0:
        raise UserError(f"--temperature must be > 0 (got {args.temperature})")
    if not 0.0 <= args.warmup_prop <= 1.0:
        raise UserError(f"--warmup_prop must be in [0, 1] (got {args.warmup_prop})")
    if args.max_grad_norm <= 0:
        raise UserError(f"--max_grad_norm must be > 0 (got {args.max_grad_norm})")
    if args.mlm and not 0.0 < args.mlm_mask_prop <= 1.0:
        raise UserError(f"--mlm_mask_prop must be in (0, 1] (got {args.mlm_mask_prop})")
    word_probs = (args.word_mask, args.word_keep, args.word_rand)
    if args.mlm and (min(word_probs) < 0 or not math.isclose(sum(word_probs), 1.0, abs_tol=1e-6)):
        raise UserError(
            f"--word_mask, --word_keep and --word_rand must be >= 0 and sum to 1 (got {args.word_mask}, "
            f"{args.word_keep}, {args.word_rand})"
        )
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 are exclusive: pick one")
    if args.max_model_input_size is not None and args.max_model_input_size < 3:
        raise UserError(f"--max_model_input_size must be >= 3 (got {args.max_model_input_size})")
    if args.n_gpu < 0:
        raise UserError(f"--n_gpu must be >= 0 (got {args.n_gpu})")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0 (got {args.num_workers})")
    if args.resume and args.force:
        raise UserError("--resume continues the run in --dump_path and --force deletes it: pass only one of them")


def check_dump_path(args: Namespace) -> None:
    """Refuse an existing --dump_path without --force, and a --force that would delete the run's own inputs."""
    dump_path = Path(args.dump_path).resolve()
    if not dump_path.exists():
        return
    if not args.force:
        raise UserError(f"--dump_path {args.dump_path!r} already exists; pass --force to replace it")
    inputs = (
        args.data_file, args.token_counts, args.student_config, args.student_pretrained_weights, args.teacher_name
    )
    for path in filter(None, inputs):
        resolved = Path(path).resolve()
        if resolved == dump_path or dump_path in resolved.parents or resolved in dump_path.parents:
            raise UserError(f"--force would delete {path!r} together with --dump_path {args.dump_path!r}; pick another")


def check_resume(args: Namespace) -> None:
    """For --resume: --dump_path holds a run with a training state, whose shaping flags equal these.

    Runs on every process (a refusal on the master alone would leave the others waiting), so every
    process must see --dump_path. An omitted --max_model_input_size takes the run's value:
    parameters.json records the derived one, not the flag.

    Raises:
        UserError: naming every flag that differs from the run's parameters.json, or what is missing.
    """
    dump_path = Path(args.dump_path)
    parameters_file = dump_path / "parameters.json"
    if not parameters_file.is_file():
        raise UserError(f"--resume: {str(parameters_file)!r} does not exist; --dump_path must be the folder of a run")
    if not (dump_path / TRAINING_STATE).is_file():
        raise UserError(
            f"--resume: {args.dump_path!r} holds no {TRAINING_STATE} yet (one is saved every --checkpoint_interval "
            "iterations and at each epoch end); start the run again with --force"
        )
    try:
        saved = json.loads(parameters_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"--resume: could not read {str(parameters_file)!r}: {err}") from err
    if args.max_model_input_size is None:
        args.max_model_input_size = saved.get("max_model_input_size")

    parser = build_parser()
    shaping = [action.dest for action in parser._actions if action.dest not in ("help", *NOT_COMPARED_ON_RESUME)]
    differing = [
        f"--{name} (run: {saved.get(name, parser.get_default(name))!r}, now: {getattr(args, name)!r})"
        for name in shaping
        if saved.get(name, parser.get_default(name)) != getattr(args, name)
    ]
    if saved.get("world_size") != args.world_size:
        differing.append(f"the number of processes (run: {saved.get('world_size')}, now: {args.world_size})")
    if differing:
        raise UserError(
            f"--resume: {', '.join(differing)} differ from the run's parameters.json; pass the run's values "
            f"(only --{', --'.join(MAY_CHANGE_ON_RESUME)} may change)"
        )


@contextmanager
def dump_path_lock(dump_path: str) -> Iterator[None]:
    """Hold an exclusive lock on the --dump_path folder; refuse a folder that another live run holds.

    Two runs writing the same checkpoints (a job requeued while the first still runs, a command
    started twice) would corrupt both. The lock is flock on the folder itself: nothing is written
    into it, and the kernel drops it when its holder ends, however it ends (kill -9 included), so a
    lock never outlives its run. On a filesystem without locks a warning says the folder is unguarded.
    """
    folder = os.open(dump_path, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(folder)
        raise UserError(
            f"--dump_path {dump_path!r} is in use by another run that is still going; wait for it to end or stop it"
        ) from None
    except OSError as err:
        logger.warning(f"Could not lock --dump_path {dump_path!r} ({err}): nothing stops a second run writing there")
    try:
        yield
    finally:
        os.close(folder)  # releases the lock


def prepare_dump_path(args: Namespace) -> None:
    """Create (with --force: replace) --dump_path and write parameters.json and git_log.json into it.

    With --resume everything stays; only the temporaries of writes a kill interrupted are deleted.
    """
    dump_path = Path(args.dump_path)
    if args.resume:
        removed = remove_stale_temporaries(dump_path)
        if removed:
            logger.info(f"Removed the temporaries of interrupted writes: {removed}")
        logger.info(f"Resuming the run in {dump_path}")
        return
    if dump_path.is_dir():  # emptied, not removed: the lock is on the folder
        logger.info(f"--force: replacing the contents of the existing {dump_path}")
        for entry in dump_path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    else:
        if dump_path.exists():
            dump_path.unlink()
        dump_path.mkdir(parents=True)
    logger.info(f"Experiment will be dumped and logged in {dump_path}")
    write_json(dump_path / "parameters.json", vars(args))
    git_log(dump_path)


def required_special_token_ids(tokenizer: PreTrainedTokenizerBase, mlm: bool) -> dict[str, int]:
    """{role name: id} of the tokenizer's special tokens, e.g. {"cls_token": 101, ...}.

    Raises:
        UserError: when a role the batches need (markers, padding, mask) is missing.
    """
    ids = special_token_ids(tokenizer)
    missing = [role for role in REQUIRED_ROLES[mlm] if role not in ids]
    if missing:
        raise UserError(f"the tokenizer of --teacher_name has no {', '.join(missing)}; it cannot be used here")
    return ids


def token_probs_from_counts(counts: Sequence[int], special_ids: Iterable[int], smoothing: float) -> torch.Tensor:
    """MLM target weights: max(count, 1) ** -smoothing, 0 for special tokens (XLM/word2vec smoothing).

    Args:
        counts: occurrences of each id, vocab_size long.
        special_ids: ids that must never be a target.
        smoothing: the exponent (--mlm_smoothing).

    Returns:
        (vocab_size,) float32 tensor.
    """
    probs = np.maximum(np.asarray(counts, dtype=np.float64), 1.0) ** -smoothing
    probs[list(special_ids)] = 0.0
    return torch.from_numpy(probs).float()


def teacher_positions(config: PretrainedConfig, teacher_type: str) -> int:
    """How many positions the teacher can embed (RoBERTa's position ids start after its padding id)."""
    if teacher_type == "roberta":
        return config.max_position_embeddings - config.pad_token_id - 1
    return config.max_position_embeddings


def max_model_input_size(args: Namespace, tokenizer: PreTrainedTokenizerBase, teacher_config: PretrainedConfig) -> int:
    """--max_model_input_size, else the tokenizer's model_max_length capped by the teacher's positions."""
    positions = teacher_positions(teacher_config, args.teacher_type)
    if args.max_model_input_size is None:
        return min(tokenizer.model_max_length, positions)
    if args.max_model_input_size > positions:
        raise UserError(
            f"--max_model_input_size {args.max_model_input_size} exceeds the teacher's {positions} positions"
        )
    return args.max_model_input_size


def load_tokenizer(args: Namespace) -> PreTrainedTokenizerBase:
    """The teacher's tokenizer."""
    try:
        return AutoTokenizer.from_pretrained(args.teacher_name)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load a tokenizer from --teacher_name {args.teacher_name!r}: {err}") from err


def load_teacher(args: Namespace, with_weights: bool) -> tuple[nn.Module | None, PretrainedConfig]:
    """The teacher model (hidden states on, for the cosine loss) and its config.

    Without weights only the config is read: a run with no teacher term never runs the teacher.
    """
    config_class, model_class = TEACHER_CLASSES[args.teacher_type]
    try:
        if not with_weights:
            return None, config_class.from_pretrained(args.teacher_name)
        teacher = model_class.from_pretrained(args.teacher_name, output_hidden_states=True)
        return teacher, teacher.config
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load a {args.teacher_type} teacher from --teacher_name {args.teacher_name!r}: {err}"
        ) from err


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch.save file (loaded with weights_only=True)."""
    try:
        if path.endswith(".safetensors"):
            return load_safetensors(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, SafetensorError) as err:
        raise UserError(f"could not read --student_pretrained_weights {path!r}: {err}") from err


def build_student(args: Namespace) -> nn.Module:
    """The student from --student_config (hidden states on), initialised from --student_pretrained_weights if given."""
    config_class, model_class = STUDENT_CLASSES[args.student_type]
    try:
        config = config_class.from_json_file(args.student_config)
    except (OSError, ValueError) as err:
        raise UserError(f"could not read --student_config {args.student_config!r}: {err}") from err
    config.output_hidden_states = True
    weights = args.student_pretrained_weights
    if weights is None:
        logger.info("Student initialised at random from its config")
        return model_class(config)

    logger.info(f"Loading the student's initial weights from {weights}")
    if os.path.isdir(weights):
        try:
            student, info = model_class.from_pretrained(weights, config=config, output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise UserError(f"could not load --student_pretrained_weights {weights!r}: {err}") from err
        missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    else:
        student = model_class(config)
        try:
            missing, unexpected = student.load_state_dict(_read_state_dict(weights), strict=False)
        except RuntimeError as err:  # shape mismatches: a checkpoint of another architecture
            raise UserError(f"--student_pretrained_weights {weights!r} does not fit the student: {err}") from err
    if missing:
        logger.warning(f"{len(missing)} student weights not in the checkpoint (left at random init): {sorted(missing)}")
    if unexpected:
        logger.warning(f"{len(unexpected)} checkpoint weights unknown to the student (ignored): {sorted(unexpected)}")
    return student


def freeze_embeddings(student: nn.Module, args: Namespace) -> None:
    """Apply --freeze_pos_embs / --freeze_token_type_embds, and keep sinusoidal DistilBERT positions frozen."""
    if args.student_type == "distilbert" and student.config.sinusoidal_pos_embds:
        # Fixed sinusoids by design; transformers 5 no longer sets requires_grad=False itself.
        student.get_submodule(POSITION_EMBEDDINGS["distilbert"]).weight.requires_grad_(False)
    if args.freeze_pos_embs and args.student_type in ("roberta", "gpt2"):
        logger.info("Freezing the student's position embeddings")
        student.get_submodule(POSITION_EMBEDDINGS[args.student_type]).weight.requires_grad_(False)
    if args.freeze_token_type_embds:
        logger.info("Freezing the student's token type embeddings")
        student.roberta.embeddings.token_type_embeddings.weight.requires_grad_(False)


def build_evaluator(args: Namespace, teacher: nn.Module | None) -> Evaluator:
    """Held-out batches from --eval_data_file, masked once with --seed: every evaluation sees the same targets."""
    held_out = LmSeqsDataset(args, load_binarized_data(args.eval_data_file, "--eval_data_file"))
    special = args.special_tok_ids
    batches = build_eval_batches(
        held_out, args.batch_size, args.mlm, special.values(), special.get("mask_token"), args.mlm_mask_prop, args.seed
    )
    return Evaluator(batches, args.mlm, teacher, args.device, args.loss_chunk_size)


def check_compatibility(student: nn.Module, teacher_config: PretrainedConfig, counts: Sequence[int] | None) -> None:
    """Student and teacher must agree on vocabulary and positions; the counts on the vocabulary.

    [+] The hidden sizes may differ: the cosine loss then goes through a learned projection (losses.py).
    """
    for what, attribute in (("vocabulary size", "vocab_size"), ("maximum positions", "max_position_embeddings")):
        s_value, t_value = getattr(student.config, attribute), getattr(teacher_config, attribute)
        if s_value != t_value:
            raise UserError(
                f"the student ({s_value}, --student_config) and the teacher ({t_value}, --teacher_name) differ in "
                f"{what}; use a student config that matches the teacher"
            )
    if counts is not None and len(counts) != student.config.vocab_size:
        raise UserError(
            f"--token_counts has {len(counts)} entries but the vocabulary has {student.config.vocab_size}; "
            f"recount with scripts/token_counts.py --vocab_size {student.config.vocab_size}"
        )


def run(args: Namespace) -> None:
    """Build everything that can fail, then (re)create --dump_path and train.

    The master locks --dump_path (see dump_path_lock) before anything else when it exists (--force,
    --resume), else as soon as it creates it, and holds it to the end.
    """
    logger.info(f"Command line: {shlex.join(sys.argv)}")
    logger.info(f"Parameters: {json.dumps(vars(args), sort_keys=True)}")
    init_gpu_params(args)
    set_seed(args)
    with ExitStack() as held:
        dump_path_existed = args.is_master and Path(args.dump_path).is_dir()
        if dump_path_existed:
            held.enter_context(dump_path_lock(args.dump_path))
        if args.resume:
            check_resume(args)
        elif args.is_master:
            check_dump_path(args)
        if args.is_master:
            if args.fp16 or args.fp16_opt_level != "O1":
                logger.warning(f"--fp16_opt_level {args.fp16_opt_level} is ignored: it was an apex option, "
                               "--fp16 now uses torch.autocast with a GradScaler")

        tokenizer = load_tokenizer(args)
        args.special_tok_ids = required_special_token_ids(tokenizer, args.mlm)
        logger.info(f"Special tokens {args.special_tok_ids}")
        needs_teacher = any(getattr(args, f"alpha_{term}") > 0 for term in TEACHER_TERMS)
        if not needs_teacher:
            logger.info("No teacher term (--alpha_ce/mse/cos all 0): the teacher is not loaded, only its config")
        teacher, teacher_config = load_teacher(args, with_weights=needs_teacher)
        args.max_model_input_size = max_model_input_size(args, tokenizer, teacher_config)
        logger.info(f"Maximum model input size: {args.max_model_input_size}")

        data = load_binarized_data(args.data_file, "--data_file")
        counts, token_probs = None, None
        if args.mlm:
            counts = load_token_file(load_token_counts, args.token_counts, "--token_counts")
            token_probs = token_probs_from_counts(counts, args.special_tok_ids.values(), args.mlm_smoothing)
        dataset = LmSeqsDataset(args, data)
        del data  # the dataset holds its own flat copy (or a view of the map): free the list of arrays

        student = build_student(args)
        freeze_embeddings(student, args)
        check_compatibility(student, teacher_config, counts)
        evaluator = build_evaluator(args, teacher) if args.is_master and args.eval_data_file else None

        if args.is_master:
            prepare_dump_path(args)
            if not dump_path_existed:
                held.enter_context(dump_path_lock(args.dump_path))
        training_state = load_training_state(args.dump_path) if args.resume else None  # read by every process
        distiller = Distiller(args, dataset, token_probs, student, teacher, evaluator, training_state)
        del training_state  # taken up: free this copy of the weights and optimizer state before training
        try:
            distiller.train()
        finally:
            distiller.close()


def _lost_another_process(err: Exception) -> bool:
    """Whether `err` is a collective failing because another process died, or hung past --dist_timeout.

    NCCL and the rendezvous store raise DistError; gloo raises a RuntimeError naming its own source.
    """
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and dist.is_initialized() and "/gloo/" in str(err)
    )


def _exit_with_error(message: str, status: int) -> None:
    """Print `message` as one `error:` line (library messages quoted in it may span lines) and exit."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(status)


@record
def main(argv: Sequence[str] | None = None) -> None:
    """Parse, check, build, train, each failure the user can act on as one `error:` line.

    User errors (including failed writes) and a non-finite loss exit with 1; a stop on SIGTERM/SIGINT,
    with the training state saved, with 128 + the signal number (143, 130), as does a Ctrl-C outside
    the training loop; losing another process of the run (it died, or --dist_timeout ran out) with 1.
    """
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        sanity_checks(args)
        run(args)
    except (UserError, NonFiniteLossError) as err:
        _exit_with_error(str(err), 1)
    except TrainingInterrupted as err:
        _exit_with_error(str(err), err.exit_status)
    except KeyboardInterrupt:  # Ctrl-C before training, or a second one during it
        _exit_with_error("interrupted; a run that saved a training state continues with --resume", 130)
    except Exception as err:
        if not _lost_another_process(err):
            raise
        _exit_with_error(
            f"lost another process of the run, which died or hangs ({str(err).splitlines()[0]}); "
            "once the cause is fixed, run the same command with --resume to continue from the last training state",
            1,
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
