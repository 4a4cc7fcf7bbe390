"""Distil a pretrained teacher (BERT, RoBERTa, GPT-2) into a smaller student (DistilBERT, DistilRoBERTa, DistilGPT2).

Usage (data from scripts/binarized_data.py and scripts/token_counts.py, optional student
initialisation from scripts/extract_distilbert.py or scripts/extract.py):

CPU, one process (--n_gpu 0), sized for a CPU: the defaults --gradient_accumulation_steps 50 and
--log_interval 500 are the original's GPU-sized values, with which a CPU run shows nothing for long:
    python train.py --n_gpu 0 --force --dump_path serialization_dir/cpu_run \\
        --student_type distilbert --student_config training_configs/distilbert-base-uncased.json \\
        --teacher_type bert --teacher_name bert-base-uncased \\
        --alpha_ce 5.0 --alpha_mlm 2.0 --alpha_cos 1.0 --alpha_clm 0.0 --mlm --freeze_pos_embs \\
        --data_file data/binarized_text.bert-base-uncased.pickle \\
        --token_counts data/token_counts.bert-base-uncased.pickle \\
        --n_epoch 1 --batch_size 8 --gradient_accumulation_steps 2 --log_interval 10

One GPU: the same command with --n_gpu 1 (the default), without its last line.
Any other teacher (--teacher_type auto, --student_type auto): the recipe in README.md.

N GPUs on one node with torchrun (one process per GPU, NCCL):
    torchrun --nproc_per_node 4 train.py --n_gpu 4 --force --dump_path serialization_dir/my_first_training ...

N GPUs with the legacy launcher (NODE_RANK, N_NODES, N_GPU_NODE, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
exported), exactly as in the original README:
    python -m torch.distributed.launch --nproc_per_node=$N_GPU_NODE --nnodes=$N_NODES --node_rank $NODE_RANK \\
        --master_addr $MASTER_ADDR --master_port $MASTER_PORT train.py --force --n_gpu $WORLD_SIZE ...

Several CPU processes over gloo (tests, debugging the distributed path without a GPU):
    torchrun --nproc_per_node 2 train.py --n_gpu 0 ...

Teacher or student too large for one GPU: add --fsdp (any launcher above) to shard both over the processes
(docs/training.md, "Sharded training"); such a run may resume on another number of processes.

Only the master process (node 0, local rank 0) writes to --dump_path: parameters.json, git_log.json,
config.json, checkpoint.pth, model_epoch_<e>.pth, pytorch_model.bin, training_state.pth, the tensorboard
log in log/train, and at the end a complete model folder (save_pretrained weights, the teacher's tokenizer,
a model card README.md). Bad flags or files give one `error: ...` line and exit status 1; every file is
written to a temporary name and renamed, so a crash never damages one. The master locks --dump_path
while it runs: a second run into the same folder stops with an error.

Interrupted runs continue where they stopped, bit for bit: run the same command with --resume instead
of --force (the same launcher and number of processes too). SIGTERM, SIGHUP or SIGINT (Ctrl-C) makes a
run save its training state at the next optimizer step and exit with status 143, 129 or 130; a killed run
(kill -9, power cut) loses only the iterations since its last checkpoint:
    python train.py --n_gpu 0 --dump_path serialization_dir/cpu_run ... --resume
"""

import argparse
import json
import logging
import math
import os
import shlex
import sys
from argparse import Namespace
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
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

import run_folder
from checkpointing import CheckpointManager
from distiller import LOSS_TERMS, TEACHER_TERMS, Distiller
from evaluation import Evaluator, build_eval_batches, check_token_ids, load_binarized_data, load_token_file
from lm_seqs_dataset import LmSeqsDataset
from losses import DEFAULT_LOSS_CHUNK_SIZE
from run_folder import RunFolderLock
from scripts.cli_flags import (
    LEARNING_RATE_RANGE,
    SEED_RANGE,
    ArgumentParser,
    HelpFormatter,
    non_negative_int,
    out_of_range,
)
from scripts.file_safety import check_fits_in_memory, check_model_folder, check_outputs_apart, fingerprint, read_json_object
from scripts.model_families import auto_markers, position_limit, vocabulary_size
from scripts.token_data import is_mmap_file, load_token_counts, mmap_files
from training_state import TRAINING_STATE, load_training_state
from utils import (
    DIST_TIMEOUT_S,
    TEACHER_DTYPES,
    MODEL_LOAD_ERRORS,
    NonFiniteLossError,
    TrainingInterrupted,
    UserError,
    init_gpu_params,
    load_failure,
    load_tensors,
    load_tokenizer,
    logger,
    lost_another_process,
    set_seed,
    setup_logging,
    special_token_ids,
)

AUTO = "auto"  # [+] any architecture: the classes come from the config, the markers from the tokenizer
MODEL_CLASSES = {
    "distilbert": (DistilBertConfig, DistilBertForMaskedLM),
    "bert": (BertConfig, BertForMaskedLM),
    "roberta": (RobertaConfig, RobertaForMaskedLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),
}
# [+] a BERT student: MLM pretraining of a teacher (quickstart.py)
STUDENT_TYPES = ("distilbert", "bert", "roberta", "gpt2", AUTO)
TEACHER_TYPES = ("bert", "roberta", "gpt2", AUTO)
POSITION_EMBEDDINGS = {
    "distilbert": "distilbert.embeddings.position_embeddings",
    "roberta": "roberta.embeddings.position_embeddings",
    "gpt2": "transformer.wpe",
}
# How learned position embeddings are named across families (BERT-like, GPT-2, OPT...).
LEARNED_POSITION_NAMES = ("position_embeddings.weight", "wpe.weight", "embed_positions.weight")
# Special-token roles the batches are built from: markers and padding of the dataset, mask of MLM.
REQUIRED_ROLES = {
    True: ("cls_token", "sep_token", "pad_token", "mask_token"),  # --mlm
    False: ("bos_token", "eos_token", "unk_token"),
}
# With an auto teacher the markers are what its tokenizer adds; only these roles are needed.
AUTO_REQUIRED_ROLES = {True: ("pad_token", "mask_token"), False: ()}
# The range of every numeric flag, as out_of_range's (low, high, low_open, high_open): checked before
# anything else, so that NaN, infinities and impossible values never reach the optimizer, the sampler,
# the masking or the random generators.
FLAG_RANGES = {
    # The losses scale logits by 1/T and the soft-target term by T**2: far outside any useful temperature,
    # these overflow float32 (and 1/T**2 a Python float).
    "temperature": (1e-3, 1e3),
    **{f"alpha_{term}": (0,) for term in LOSS_TERMS},
    "mlm_mask_prop": (0, 1, True),
    "word_mask": (0, 1),
    "word_keep": (0, 1),
    "word_rand": (0, 1),
    "mlm_smoothing": (0,),
    "n_epoch": (1,),
    "batch_size": (1,),
    "gradient_accumulation_steps": (1,),
    "warmup_prop": (0, 1),
    # Bounded so that AdamW's arithmetic (lr / bias correction, 1 - lr x decay) stays within float32.
    "weight_decay": (0, 1e3),
    "learning_rate": LEARNING_RATE_RANGE,
    "adam_epsilon": (0, None, True),
    "max_grad_norm": (0, None, True),
    "initializer_range": (0,),
    "max_model_input_size": (3,),
    "n_gpu": (0,),
    "num_workers": (0,),
    "seed": SEED_RANGE,
    "dist_timeout": (1,),
    "eval_interval": (0,),
    "log_interval": (1,),
    "checkpoint_interval": (1,),
}
# Flags a --resume may change: how often files are written, what is evaluated, how long processes
# wait for each other; never the numbers the training computes. Every other flag must be the run's,
# except those naming this invocation rather than the run.
MAY_CHANGE_ON_RESUME = (
    "log_interval", "checkpoint_interval", "eval_interval", "eval_data_file", "fp16_opt_level", "dist_timeout",
    "num_workers", "compile",
)
NOT_COMPARED_ON_RESUME = ("dump_path", "force", "resume", "local_rank", *MAY_CHANGE_ON_RESUME)
# Starting weights must hold at least this share of the student's tensors (an extraction without
# --vocab_transform lacks only the head's transform).
MIN_WEIGHT_COVERAGE = 0.5


class ExplicitValue(argparse.Action):
    """Stores a flag's value and records that it was given: `--loss_chunk_size N` (N > 0) on the command line asks
    for fused losses explicitly (`fused_loss_explicit`), so a model that cannot have them is refused, not
    silently trained on full logits. The default keeps falling back, as every original command expects."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.fused_loss_explicit = values > 0


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the original train.py with its default, plus --bf16 and --max_model_input_size."""
    parser = ArgumentParser(
        description="Distil a teacher language model into a student (DistilBERT / DistilRoBERTa / DistilGPT2).",
        epilog=__doc__,  # the usage commands, a CPU-sized one first
        formatter_class=HelpFormatter,
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

    parser.add_argument("--student_type", type=str, choices=STUDENT_TYPES, required=True,
        help="Student architecture. [+] 'bert' trains a BERT-architecture model (e.g. pretraining a small teacher "
        "with --alpha_mlm only). [+] 'auto': any architecture, its class from --student_config's model_type "
        "(AutoModelForMaskedLM with --mlm, AutoModelForCausalLM otherwise), e.g. the config.json that "
        "scripts/extract.py --model_type auto writes.",
    )
    parser.add_argument("--student_config", type=str, required=True, help="Path to the student's config (JSON).")
    parser.add_argument(
        "--student_pretrained_weights",
        default=None,
        type=str,
        help="Initial student weights: a torch.save state dict (e.g. from scripts/extract_distilbert.py), "
        "a .safetensors file or a save_pretrained folder.",
    )
    parser.add_argument(
        "--teacher_type", choices=TEACHER_TYPES, required=True,
        help="Teacher architecture. [+] 'auto': any masked (--mlm) or causal LM, e.g. ModernBERT, XLM-R, Llama, "
        "Qwen, GPT-NeoX; sequences then carry the markers its tokenizer adds (scripts/binarized_data.py "
        "--tokenizer_type auto).",
    )
    parser.add_argument(
        "--teacher_dtype", choices=list(TEACHER_DTYPES), default=None,
        help="[+] Hold the frozen teacher's weights in this type (bfloat16/float16: half the memory, faster on "
        "GPUs). Default: as from_pretrained loads it (the checkpoint's type).",
    )
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
        help="Micro-batches per optimizer step (effective batch = batch_size x this x processes); "
        "the default is the original's GPU-sized value, 2 suits a small CPU run.",
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
        "--fsdp",
        action="store_true",
        help="[+] Shard the student (its parameters, gradients and AdamW state) and the teacher over the processes "
        "with FSDP2, for models that do not fit on one device; with --bf16 the student's parameters are gathered "
        "in bfloat16 and its gradients reduced in float32. Not with --fp16, --compile or --eval_data_file. The "
        "checkpoints and the finished folder are those of an unsharded run; the training state is sharded and may "
        "be resumed on another number of processes.",
    )
    parser.add_argument(
        "--loss_chunk_size",
        type=non_negative_int,
        default=DEFAULT_LOSS_CHUNK_SIZE,
        action=ExplicitValue,
        help="[+] Rows of logits at a time in the losses over the vocabulary (and in evaluation): the final "
        "vocabulary projections and the ce/mlm/clm/mse terms are computed chunk by chunk, with their gradients, "
        "so that no (rows x vocabulary) tensor larger than a chunk exists. 0: full logits, as the original. "
        "Fusion is used only where a probe of both models on the first sequences shows it reproduces their own "
        "logits; otherwise full logits, with one warning, or, when this flag is given with a value > 0, an error.",
    )
    parser.set_defaults(fused_loss_explicit=False)
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
    parser.add_argument(
        "--log_interval", type=int, default=500,
        help="Tensorboard log (and progress bar refresh) every N micro-batches; 10 suits a small CPU run.",
    )
    parser.add_argument(
        "--checkpoint_interval",
        type=int,
        default=4000,
        help="checkpoint.pth (and [+] training_state.pth, for --resume) every N micro-batches.",
    )
    return parser


# The flags naming files a run reads: --dump_path may neither be, hold nor lie inside any of them.
INPUT_FLAGS = (
    "--data_file", "--token_counts", "--student_config", "--student_pretrained_weights", "--teacher_name",
    "--eval_data_file",
)


def sanity_checks(args: Namespace) -> None:
    """Refuse inconsistent flags and missing input files before anything runs.

    Raises:
        UserError: naming the flag, the value and the fix.
    """
    for flag, bounds in FLAG_RANGES.items():
        value = getattr(args, flag)
        problem = None if value is None else out_of_range(value, *bounds)
        if problem:
            raise UserError(f"--{flag} must be {problem} (got {value})")
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
        if args.student_type not in ("distilbert", "roberta", "bert", AUTO):
            raise UserError(
                f"--mlm needs --student_type distilbert, roberta or bert (got {args.student_type}), or auto for any "
                "masked-LM architecture"
            )
        if args.teacher_type not in ("bert", "roberta", AUTO):
            raise UserError(
                f"--mlm needs --teacher_type bert or roberta (got {args.teacher_type}), or auto for any masked LM"
            )
    else:
        if args.student_type not in ("gpt2", AUTO):
            raise UserError(
                f"causal LM (no --mlm) needs --student_type gpt2 (got {args.student_type}), or auto for any causal "
                "LM; or add --mlm"
            )
        if args.teacher_type not in ("gpt2", AUTO):
            raise UserError(
                f"causal LM (no --mlm) needs --teacher_type gpt2 (got {args.teacher_type}), or auto for any causal "
                "LM; or add --mlm"
            )
    expected_teacher = "bert" if args.student_type == "distilbert" else args.student_type
    if AUTO not in (args.student_type, args.teacher_type) and args.teacher_type != expected_teacher:
        raise UserError(
            f"--student_type {args.student_type} needs --teacher_type {expected_teacher} (got {args.teacher_type})"
        )

    if not os.path.isfile(args.data_file):
        raise UserError(f"--data_file {args.data_file!r} does not exist; make it with scripts/binarized_data.py")
    if not os.path.isfile(args.student_config):
        raise UserError(f"--student_config {args.student_config!r} does not exist (see training_configs/)")
    if args.eval_data_file is not None and not os.path.isfile(args.eval_data_file):
        raise UserError(f"--eval_data_file {args.eval_data_file!r} does not exist; make it with scripts/binarized_data.py")
    if args.student_pretrained_weights is not None and not os.path.exists(args.student_pretrained_weights):
        raise UserError(f"--student_pretrained_weights {args.student_pretrained_weights!r} does not exist")
    if args.freeze_token_type_embds and args.student_type != "roberta":
        raise UserError(
            f"--freeze_token_type_embds only applies to --student_type roberta (got {args.student_type}); drop it"
        )
    word_probs = (args.word_mask, args.word_keep, args.word_rand)
    if args.mlm and not math.isclose(sum(word_probs), 1.0, abs_tol=1e-6):
        raise UserError(
            f"--word_mask, --word_keep and --word_rand must be >= 0 and sum to 1 (got {args.word_mask}, "
            f"{args.word_keep}, {args.word_rand})"
        )
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16 are exclusive: pick one")
    for flag in ("fp16", "compile", "eval_data_file"):
        if args.fsdp and getattr(args, flag) not in (False, None):
            raise UserError(f"--fsdp does not work with --{flag}: drop one of them (--bf16 is the mixed precision of --fsdp)")
    if args.resume and args.force:
        raise UserError("--resume continues the run in --dump_path and --force deletes it: pass only one of them")
    check_outputs_apart({"--dump_path": args.dump_path}, {flag: getattr(args, flag[2:]) for flag in INPUT_FLAGS})


DATA_FINGERPRINT = "data_fingerprint.json"
FINGERPRINTED_FLAGS = ("--data_file", "--token_counts")  # what a resumed run must read again, unchanged


def data_fingerprints(args: Namespace) -> dict[str, dict]:
    """{flag: {file: fingerprint}} of the data a run trains on (a memory-mapped --data_file: its three files)."""
    fingerprints = {}
    for flag in FINGERPRINTED_FLAGS:
        path = getattr(args, flag[2:])
        if path is None:
            continue
        files = mmap_files(path).values() if is_mmap_file(path) else [path]
        try:
            fingerprints[flag] = {Path(file).name: fingerprint(file) for file in files}
        except OSError as err:
            raise UserError(f"could not read {flag} {path!r}: {err.strerror or err}") from err
    return fingerprints


def check_same_data(args: Namespace) -> None:
    """For --resume: the data files are those the run started on (their fingerprints, saved at its start).

    Raises:
        UserError: naming the flag whose file changed, and how to start afresh.
    """
    saved_file = Path(args.dump_path) / DATA_FINGERPRINT
    if not saved_file.is_file():
        logger.warning(f"--resume: {str(saved_file)!r} is missing (a run from an earlier version): the data files "
                       "cannot be checked to be the ones the run started on")
        return
    saved = read_json_object(saved_file, {flag: dict for flag in FINGERPRINTED_FLAGS}, f"--resume: {str(saved_file)!r}")
    now = data_fingerprints(args)
    for flag in FINGERPRINTED_FLAGS:
        if saved.get(flag) != now.get(flag):
            raise UserError(
                f"--resume: {flag} {getattr(args, flag[2:])!r} is not the data this run started on (its size or "
                f"content differs from {DATA_FINGERPRINT}); put the original file back, or start afresh on this one "
                "with --force instead of --resume"
            )


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
    saved = read_json_object(
        parameters_file, {"world_size": int, "max_model_input_size": (int, type(None)), "seed": int},
        f"--resume: {str(parameters_file)!r}",
    )
    if args.max_model_input_size is None:
        args.max_model_input_size = saved.get("max_model_input_size")
    check_same_data(args)

    parser = build_parser()
    shaping = [action.dest for action in parser._actions if action.dest not in ("help", *NOT_COMPARED_ON_RESUME)]
    differing = [
        f"--{name} (run: {saved.get(name, parser.get_default(name))!r}, now: {getattr(args, name)!r})"
        for name in shaping
        if saved.get(name, parser.get_default(name)) != getattr(args, name)
    ]
    if saved.get("world_size") != args.world_size and not args.fsdp:  # a sharded state reshards
        differing.append(f"the number of processes (run: {saved.get('world_size')}, now: {args.world_size})")
    if differing:
        raise UserError(
            f"--resume: {', '.join(differing)} differ from the run's parameters.json; pass the run's values "
            f"(only --{', --'.join(MAY_CHANGE_ON_RESUME)} may change)"
        )


def model_classes(model_type: str, mlm: bool) -> tuple[type, type]:
    """(config class, model class) of a --student_type or --teacher_type; auto: chosen by the config's model_type,
    with a masked-LM head under --mlm and a causal one otherwise."""
    if model_type == AUTO:
        return AutoConfig, AutoModelForMaskedLM if mlm else AutoModelForCausalLM
    return MODEL_CLASSES[model_type]


def required_special_token_ids(tokenizer: PreTrainedTokenizerBase, mlm: bool, auto: bool = False) -> dict[str, int]:
    """{role name: id} of the tokenizer's special tokens, e.g. {"cls_token": 101, ...}.

    `auto`: an auto teacher's tokenizer, whose markers are what it adds, so only padding and the mask of
    MLM are required.

    Raises:
        UserError: when a role the batches need (markers, padding, mask) is missing.
    """
    ids = special_token_ids(tokenizer)
    required = AUTO_REQUIRED_ROLES[mlm] if auto else REQUIRED_ROLES[mlm]
    missing = [role for role in required if role not in ids]
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


def max_model_input_size(
    args: Namespace, tokenizer: PreTrainedTokenizerBase, teacher: nn.Module | None, teacher_config: PretrainedConfig
) -> int:
    """--max_model_input_size, else the tokenizer's model_max_length capped by the teacher's positions
    (`position_limit`: its position table, else its config's, else none)."""
    positions = position_limit(teacher, teacher_config)
    if args.max_model_input_size is None:
        size = min(tokenizer.model_max_length, positions or tokenizer.model_max_length)
        if size > 1_000_000:  # transformers' "no limit" sentinel: neither the tokenizer nor the config knows
            raise UserError(f"neither the teacher's tokenizer nor its {teacher_config.model_type} model gives a "
                            "maximum length: pass --max_model_input_size")
        return size
    if positions is not None and args.max_model_input_size > positions:
        raise UserError(
            f"--max_model_input_size {args.max_model_input_size} exceeds the teacher's {positions} positions "
            f"({teacher_config.model_type}); pass at most {positions}"
        )
    return args.max_model_input_size


def load_teacher(args: Namespace, with_weights: bool) -> tuple[nn.Module | None, PretrainedConfig]:
    """The teacher model (frozen, in --teacher_dtype when given) and its config; its weights are checked to be finite.

    Without weights only the config is read: a run with no teacher term never runs the teacher.
    """
    config_class, model_class = model_classes(args.teacher_type, args.mlm)
    check_model_folder(args.teacher_name, "--teacher_name")
    dtype = {} if args.teacher_dtype is None else {"dtype": TEACHER_DTYPES[args.teacher_dtype]}
    try:
        if not with_weights:
            return None, config_class.from_pretrained(args.teacher_name)
        teacher = model_class.from_pretrained(args.teacher_name, **dtype)
    except MODEL_LOAD_ERRORS as err:
        raise load_failure(f"a {args.teacher_type} teacher from --teacher_name {args.teacher_name!r}", args.teacher_name,
                           err) from err
    teacher.requires_grad_(False)
    check_finite(teacher, f"the teacher --teacher_name {args.teacher_name!r}")
    return teacher, teacher.config


def check_finite(model: nn.Module, what: str) -> None:
    """Refuse a model with a NaN or infinite weight: it would only fail at the first step, after --force."""
    bad = [name for name, tensor in model.state_dict().items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if bad:
        raise UserError(f"{what} has non-finite values (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[0]!r}")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch.save file (loaded with weights_only=True)."""
    try:
        state = load_tensors(path)
    except (*MODEL_LOAD_ERRORS, EOFError) as err:
        raise UserError(f"could not read --student_pretrained_weights {path!r}: {' '.join(str(err).split())}") from err
    if not isinstance(state, dict):
        raise UserError(f"--student_pretrained_weights {path!r} holds a {type(state).__name__}, not a state dict")
    return state  # entries that are not the student's (a training state's "optimizer"...) count as unexpected


def read_student_config(args: Namespace) -> PretrainedConfig:
    """--student_config, refused in one line when it is not a JSON object of that family or is inconsistent."""
    config_class, _ = model_classes(args.student_type, args.mlm)
    try:
        if args.student_type == AUTO:
            config = AutoConfig.from_pretrained(args.student_config)
        else:
            config = config_class.from_json_file(args.student_config)
    except MODEL_LOAD_ERRORS as err:
        raise UserError(f"could not read --student_config {args.student_config!r}: {' '.join(str(err).split())}") from err
    n_layers = getattr(config, "num_hidden_layers", None)
    if isinstance(n_layers, int) and n_layers < 1:
        raise UserError(
            f"--student_config {args.student_config!r} gives the student {n_layers} layers; it needs at least 1"
        )
    return config


def estimated_parameters(config: PretrainedConfig) -> int:
    """About how many parameters a transformer of `config` has, read before building it: per layer the
    attention (4 h^2) and the feed-forward (2 h ff), plus the vocabulary and position embeddings."""

    def first(*names: str, default: int = 0) -> int:
        values = (getattr(config, name, None) for name in names)
        return next((value for value in values if isinstance(value, int) and not isinstance(value, bool)), default)

    hidden = first("hidden_size", "n_embd", "d_model", "dim", default=1)
    feed_forward = first("intermediate_size", "n_inner", "hidden_dim", "ffn_dim", default=4 * hidden)
    layers = first("num_hidden_layers", "n_layer", "n_layers", "num_layers", default=1)
    embeddings = first("vocab_size") + first("max_position_embeddings", "n_positions")
    return layers * (4 * hidden * hidden + 2 * hidden * feed_forward) + embeddings * hidden


# Bytes per student parameter while training in float32: weights, gradients and AdamW's two moments.
TRAINING_BYTES_PER_PARAMETER = 16
MAX_STUDENT_TO_TEACHER = 4  # a student this many times its teacher's size is a mistyped config, not a student


def check_student_size(args: Namespace, config: PretrainedConfig, teacher_config: PretrainedConfig | None) -> None:
    """Refuse, before building it, a student far larger than its teacher or than the memory available."""
    n_student = estimated_parameters(config)
    what = f"the student of --student_config {args.student_config!r} (about {n_student / 1e6:.0f}M parameters)"
    if teacher_config is not None:
        n_teacher = estimated_parameters(teacher_config)
        if n_student > MAX_STUDENT_TO_TEACHER * max(n_teacher, 1):
            raise UserError(
                f"{what} is more than {MAX_STUDENT_TO_TEACHER} times the size of its teacher (about "
                f"{n_teacher / 1e6:.1f}M); check its number of layers and widths"
            )
    check_fits_in_memory(n_student * TRAINING_BYTES_PER_PARAMETER, f"training {what}",
                         "check its number of layers and widths, or use a machine with more memory")


def build_student(args: Namespace, teacher_config: PretrainedConfig | None = None) -> nn.Module:
    """The student from --student_config, initialised from --student_pretrained_weights if given.

    Its size is bounded first (`check_student_size`, against `teacher_config` when given).

    Starting weights must cover most of the student (MIN_WEIGHT_COVERAGE of its tensors) and be finite:
    a checkpoint of another model (the teacher's, a GPT-2's for a DistilBERT, a training state) would
    otherwise leave it at random initialisation with two warnings.
    """
    config = read_student_config(args)
    check_student_size(args, config, teacher_config)
    _, model_class = model_classes(args.student_type, args.mlm)
    build = model_class.from_config if args.student_type == AUTO else model_class
    weights = args.student_pretrained_weights
    try:
        if weights is None:
            logger.info("Student initialised at random from its config")
            return build(config)
        logger.info(f"Loading the student's initial weights from {weights}")
        check_model_folder(weights, "--student_pretrained_weights")
        if os.path.isdir(weights):  # trained in float32 whatever type the folder stores
            with _without_load_report():  # the table transformers logs; the problems are reported below, in a line
                student, info = model_class.from_pretrained(
                    weights, config=config, output_loading_info=True, dtype=torch.float32, ignore_mismatched_sizes=True
                )
            missing, unexpected = info["missing_keys"], info["unexpected_keys"]
            _refuse_mismatched(weights, config, info["mismatched_keys"])
        else:
            student = build(config)
            missing, unexpected = student.load_state_dict(_read_state_dict(weights), strict=False)
    except UserError:
        raise
    except MODEL_LOAD_ERRORS as err:
        reason = " ".join(str(err).split())[:500]
        if weights is None:  # an inconsistent config: heads not dividing the width...
            raise UserError(f"could not build the student from --student_config {args.student_config!r}: {reason}") from err
        if isinstance(err, (OSError, SafetensorError)):  # a damaged or truncated file
            raise UserError(f"could not read --student_pretrained_weights {weights!r}: {reason}") from err
        # shape mismatches: a checkpoint of another architecture or width
        raise UserError(f"--student_pretrained_weights {weights!r} does not fit the student: {reason}") from err
    n_tensors = len(student.state_dict())
    n_found = n_tensors - len(set(missing))
    if n_found < MIN_WEIGHT_COVERAGE * n_tensors:
        example = f", e.g. {sorted(unexpected)[0]!r}" if unexpected else ""
        raise UserError(
            f"--student_pretrained_weights {weights!r} holds only {n_found} of the student's {n_tensors} tensors "
            f"({len(unexpected)} others{example}); pass a checkpoint made for this student (scripts/"
            "extract_distilbert.py or scripts/extract.py), or none to start from random weights"
        )
    if missing:
        logger.warning(f"{len(missing)} student weights not in the checkpoint (left at random init): {sorted(missing)}")
    if unexpected:
        logger.warning(f"{len(unexpected)} checkpoint weights unknown to the student (ignored): {sorted(unexpected)}")
    check_finite(student, f"--student_pretrained_weights {weights!r}")
    return student


@contextmanager
def _without_load_report() -> Iterator[None]:
    """Silence the table of missing, unexpected and mismatched keys that from_pretrained logs (one row per
    tensor group): build_student reports them itself, in one line or one warning each."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    level = report_logger.level
    report_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        report_logger.setLevel(level)


def _refuse_mismatched(weights: str, config: PretrainedConfig, mismatched: Iterable) -> None:
    """Refuse starting weights whose tensors have other shapes than the student's (those of a wider teacher)."""
    mismatched = sorted(mismatched)
    if mismatched:
        name, checkpoint_shape, student_shape = mismatched[0]
        raise UserError(
            f"--student_pretrained_weights {weights!r} does not fit the student ({config.model_type}): "
            f"{len(mismatched)} tensor(s) of another shape, e.g. {name!r} {tuple(checkpoint_shape)} in the weights, "
            f"{tuple(student_shape)} in the student; pass weights of the student's width, or none to start from random "
            "weights"
        )


def freeze_embeddings(student: nn.Module, args: Namespace) -> None:
    """Apply --freeze_pos_embs / --freeze_token_type_embds, and keep sinusoidal DistilBERT positions frozen.

    An auto student freezes whatever learned position embeddings it has (rotary models have none).
    """
    if args.student_type == "distilbert" and student.config.sinusoidal_pos_embds:
        # Fixed sinusoids by design; transformers 5 no longer sets requires_grad=False itself.
        student.get_submodule(POSITION_EMBEDDINGS["distilbert"]).weight.requires_grad_(False)
    if args.freeze_pos_embs and args.student_type in ("roberta", "gpt2"):
        logger.info("Freezing the student's position embeddings")
        student.get_submodule(POSITION_EMBEDDINGS[args.student_type]).weight.requires_grad_(False)
    if args.freeze_pos_embs and args.student_type == AUTO:
        learned = [name for name, param in student.named_parameters() if name.endswith(LEARNED_POSITION_NAMES)]
        for name in learned:
            student.get_parameter(name).requires_grad_(False)
        logger.info(f"Freezing the student's position embeddings: {learned}" if learned else
                    f"--freeze_pos_embs: the student ({student.config.model_type}) has no learned position embeddings "
                    "(its positions are rotary, relative, ALiBi or implicit); nothing to freeze")
    if args.freeze_token_type_embds:
        logger.info("Freezing the student's token type embeddings")
        student.roberta.embeddings.token_type_embeddings.weight.requires_grad_(False)


def build_evaluator(args: Namespace, teacher: nn.Module | None, vocab_size: int) -> Evaluator:
    """Held-out batches from --eval_data_file, masked once with --seed: every evaluation sees the same targets."""
    held_out = LmSeqsDataset(args, load_binarized_data(args.eval_data_file, "--eval_data_file", vocab_size))
    special = args.special_tok_ids
    batches = build_eval_batches(
        held_out, args.batch_size, args.mlm, special.values(), special.get("mask_token"), args.mlm_mask_prop, args.seed
    )
    return Evaluator(batches, args.mlm, teacher, args.device, args.loss_chunk_size)


def check_compatibility(
    student: nn.Module, teacher: nn.Module | None, teacher_config: PretrainedConfig, counts: Sequence[int] | None
) -> None:
    """Student and teacher must agree on vocabulary and positions; the counts on the vocabulary.

    Both facts are read from the models (`vocabulary_size`, `position_limit`: the rows of their embeddings),
    the configs being only the default (a teacher loaded without weights, a family with no position table);
    a limit neither model states (ALiBi, state-space models) is not compared.
    [+] The hidden sizes may differ: the cosine loss then goes through a learned projection (losses.py).
    """
    facts = (("vocabulary size", vocabulary_size), ("maximum positions", position_limit))
    for what, fact in facts:
        s_value, t_value = fact(student, student.config), fact(teacher, teacher_config)
        if None not in (s_value, t_value) and s_value != t_value:
            raise UserError(
                f"the student ({student.config.model_type}: {s_value}, --student_config) and the teacher "
                f"({teacher_config.model_type}: {t_value}, --teacher_name) differ in {what}; use a student config that "
                "matches the teacher"
            )
    vocab_size = vocabulary_size(student, student.config)
    if counts is not None and len(counts) != vocab_size:
        raise UserError(
            f"--token_counts has {len(counts)} entries but the vocabulary has {vocab_size}; "
            f"recount with scripts/token_counts.py --vocab_size {vocab_size}"
        )


def check_run_length(args: Namespace, batches_per_epoch: int) -> None:
    """Refuse a run whose accumulation window never closes: it would export the student it started from."""
    n_batches = batches_per_epoch * args.n_epoch
    if n_batches < args.gradient_accumulation_steps:
        per_process = " on each process" if args.multi_gpu else ""
        raise UserError(
            f"--gradient_accumulation_steps {args.gradient_accumulation_steps} exceeds the number of batches in the "
            f"whole run{per_process}, {n_batches} (--n_epoch {args.n_epoch} x {batches_per_epoch} per epoch): the "
            "student would never be updated; lower it or --batch_size"
        )


def prepare_run_folder(
    args: Namespace, lock: RunFolderLock, run_files: set[str], checkpoints: CheckpointManager
) -> run_folder.PreviousRun | None:
    """The master tries the final export on the tokenizer and config, then prepares --dump_path
    (run_folder.prepare, with the data's fingerprints); every process learns whether it could.

    A failure on the master alone would leave the other processes waiting in their first collective
    until --dist_timeout: they stop with it instead.

    Returns:
        On the master, the previous run that --force set aside; else None.
    """
    error = previous_run = None
    if args.is_master:
        try:
            checkpoints.check_export()
            records = {} if args.resume else {DATA_FINGERPRINT: data_fingerprints(args)}
            previous_run = run_folder.prepare(args, lock, run_files, records)
        except UserError as err:
            error = err
    if args.multi_gpu:
        prepared = torch.tensor([int(error is None)], device=args.device)
        dist.all_reduce(prepared, op=dist.ReduceOp.MIN)
        if error is None and not prepared.item():
            error = UserError("the master process could not prepare --dump_path; its error says why")
    if error is not None:
        raise error
    return previous_run


def run(args: Namespace) -> None:
    """Build and check everything that can fail, then (re)create --dump_path and train.

    Nothing is written before every flag, input file, model, weight and training state has passed its
    checks and the Distiller (optimizer, sampler, restored state) is built: a failed start loses nothing.
    With --force the previous run is set aside, and put back if this one fails before its first checkpoint.
    The master locks an existing --dump_path before anything else (a folder in use by another run is
    refused at once), a new one as soon as it creates it, and holds the lock to the end.
    """
    init_gpu_params(args)
    logger.info(f"Command line: {shlex.join(sys.argv)}")
    logger.info(f"Parameters: {json.dumps(vars(args), sort_keys=True, default=str)}")
    set_seed(args)
    if args.is_master and (args.fp16 or args.fp16_opt_level != "O1"):
        logger.warning(f"--fp16_opt_level {args.fp16_opt_level} is ignored: it was an apex option, "
                       "--fp16 now uses torch.autocast with a GradScaler")
    with RunFolderLock(args.dump_path) as lock:
        if args.is_master and Path(args.dump_path).is_dir():
            lock.acquire()
        tokenizer = load_tokenizer(args.teacher_name, "--teacher_name")
        # The tokenizer's own file names (bpe.codes, source.spm...): a run saves them beside RUN_FILE_PATTERNS'.
        run_files = set(tokenizer.vocab_files_names.values())
        if args.resume:
            check_resume(args)
        elif args.is_master:
            run_folder.check_replaceable(args, run_files)

        args.special_tok_ids = required_special_token_ids(tokenizer, args.mlm, auto=args.teacher_type == AUTO)
        logger.info(f"Special tokens {args.special_tok_ids}")
        if args.teacher_type == AUTO:  # the markers its tokenizer adds (binarized_data.py --tokenizer_type auto)
            try:
                args.markers = auto_markers(tokenizer, args.mlm)
            except ValueError as err:
                raise UserError(f"the tokenizer of --teacher_name cannot be used with --teacher_type auto: {err}") from err
            logger.info(f"Sequence markers and padding: {args.markers}")
        needs_teacher = any(getattr(args, f"alpha_{term}") > 0 for term in TEACHER_TERMS)
        if not needs_teacher:
            logger.info("No teacher term (--alpha_ce/mse/cos all 0): the teacher is not loaded, only its config")
        teacher, teacher_config = load_teacher(args, with_weights=needs_teacher)
        args.max_model_input_size = max_model_input_size(args, tokenizer, teacher, teacher_config)
        logger.info(f"Maximum model input size: {args.max_model_input_size}")

        data = load_binarized_data(args.data_file, "--data_file")
        counts = load_token_file(load_token_counts, args.token_counts, "--token_counts") if args.mlm else None
        student = build_student(args, teacher_config)
        freeze_embeddings(student, args)
        check_compatibility(student, teacher, teacher_config, counts)
        vocab_size = vocabulary_size(student, student.config)
        check_token_ids(data, vocab_size, args.data_file, "--data_file")
        dataset = LmSeqsDataset(args, data)
        del data  # the dataset holds it, or the views of it it keeps
        token_probs = token_probs_from_counts(counts, args.special_tok_ids.values(), args.mlm_smoothing) if args.mlm else None
        evaluator = build_evaluator(args, teacher, vocab_size) if args.is_master and args.eval_data_file else None

        training_state = load_training_state(args.dump_path) if args.resume else None  # read by every process
        distiller = Distiller(args, dataset, token_probs, student, teacher, evaluator, training_state, tokenizer)
        del training_state  # taken up: free this copy of the weights and optimizer state before training
        check_run_length(args, distiller.batches_per_epoch)

        previous_run = prepare_run_folder(args, lock, run_files, distiller.checkpoints)
        try:
            distiller.train(previous_run)
        except BaseException:
            if previous_run is not None:  # first: closing the writers may fail too (a full disk)
                previous_run.restore()
            distiller.close()
            raise
        distiller.close()
        if previous_run is not None:  # already gone unless the run ended without writing anything
            previous_run.discard()


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
        if not lost_another_process(err):
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
