"""Shared machinery of extract_distilbert.py and extract.py: initialise a student from chosen teacher layers.

Each script describes its model families as a `KeyTable` of (student key <- teacher key) templates;
this module parses the flags, loads the teacher, expands the table over `--layers`, copies the tensors
and writes the flat state dict that train.py's `--student_pretrained_weights` reads, and with
`--dump_config` the student config that fits it.

`--model_type auto` needs no table: the teacher's own architecture, with only the chosen layers of its
stack, is written as a save_pretrained folder (config + weights), see `extract_auto`.
"""

import argparse
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from cli_flags import ArgumentParser, non_negative_int
from cli_utils import HUB_OFFLINE_HINT, ScriptError, atomic_output, check_output_path
from file_safety import check_model_folder, check_outputs_apart, reported_write
from model_families import auto_lm_class, depth, find_layer_stack, shallower_config
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

logger = logging.getLogger("extraction")

DEFAULT_LAYERS = (0, 2, 4, 7, 9, 11)
AUTO = "auto"  # the --model_type of any architecture: no key table, the teacher's own, shallower
KeyPair = tuple[str, str]  # (student key, teacher key)


def same_name(key: str) -> KeyPair:
    """A tensor that has the same name in student and teacher (same architecture, fewer layers)."""
    return key, key


def weight_and_bias(student: str, teacher: str | None = None) -> tuple[KeyPair, KeyPair]:
    """Both parameters of a Linear or LayerNorm module; `teacher` defaults to the student's name."""
    teacher = student if teacher is None else teacher
    return (f"{student}.weight", f"{teacher}.weight"), (f"{student}.bias", f"{teacher}.bias")


def same_name_modules(prefix: str, modules: Sequence[str]) -> tuple[KeyPair, ...]:
    """Weight and bias of each module `prefix.<module>`, named alike in student and teacher."""
    return tuple(pair for module in modules for pair in weight_and_bias(f"{prefix}.{module}"))


@dataclass(frozen=True)
class KeyTable:
    """Which teacher tensor initialises which student tensor, for one teacher -> student family.

    Templates in `layer` contain `{layer}`: the student layer index in the student key, the index of the
    teacher layer it copies in the teacher key. Every other entry names a tensor outside the layer stack.

    Attributes:
        model_type: the teacher's `config.model_type`; any other teacher is refused.
        teacher_class: the transformers class that loads the teacher with its LM head.
        embeddings: pairs copied once, before the layers.
        layer: pairs copied once per chosen teacher layer.
        head: pairs of the LM head, copied once.
        vocab_transform: head pairs copied only with `--vocab_transform`.
        student_config: the student config for `--dump_config`, from the teacher's config and `--layers`.
    """

    model_type: str
    teacher_class: type[PreTrainedModel]
    embeddings: tuple[KeyPair, ...]
    layer: tuple[KeyPair, ...]
    head: tuple[KeyPair, ...]
    vocab_transform: tuple[KeyPair, ...] = ()
    student_config: Callable[[PretrainedConfig, Sequence[int]], PretrainedConfig] = shallower_config

    def key_pairs(self, layers: Sequence[int], vocab_transform: bool) -> list[KeyPair]:
        """Expand the templates: teacher layer `layers[s]` becomes student layer `s`."""
        pairs = list(self.embeddings)
        for student_idx, teacher_idx in enumerate(layers):
            pairs += [(s.format(layer=student_idx), t.format(layer=teacher_idx)) for s, t in self.layer]
        pairs += self.head
        if vocab_transform:
            pairs += self.vocab_transform
        return pairs


def build_parser(
    description: str, model_types: Sequence[str], default_names: Mapping[str, str]
) -> argparse.ArgumentParser:
    """The [F] flags shared by both extraction scripts, plus `--layers`.

    Args:
        description: what the script extracts, for `--help`.
        model_types: the `--model_type` choices; the first one is the default. `auto` may be one of them.
        default_names: `--model_name` used when the flag is absent, per model type (none for `auto`).
    """
    with_auto = AUTO in model_types
    parser = ArgumentParser(description=description)
    parser.add_argument(
        "--model_type",
        default=model_types[0],
        choices=model_types,
        help="teacher family (default: %(default)s)"
        + ("; auto: any masked or causal LM, its own architecture with fewer layers" if with_auto else ""),
    )
    parser.add_argument(
        "--model_name",
        default=None,
        help="teacher: a hub name or a local save_pretrained directory "
        f"(default per type: {', '.join(f'{k}: {v}' for k, v in default_names.items())}"
        + ("; required with auto)" if with_auto else ")"),
    )
    parser.add_argument(
        "--dump_checkpoint",
        default=None,
        help="output file; a name ending in .safetensors is written as safetensors, anything else with "
        "torch.save (default: serialization_dir/tf_<last part of the model name>_<layers>.pth, e.g. "
        f"serialization_dir/tf_{default_names[model_types[0]]}_0247911.pth)"
        + (
            "; with --model_type auto, a folder that receives config.json and model.safetensors as save_pretrained "
            "writes them (default: serialization_dir/<last part of the model name>_<layers>)"
            if with_auto
            else ""
        ),
    )
    parser.add_argument(
        "--dump_config",
        default=None,
        metavar="PATH",
        help="also write the student config that fits the checkpoint (the teacher's, with the chosen depth; "
        "DistilBERT's from a BERT teacher) to this JSON file, for train.py's --student_config",
    )
    parser.add_argument(
        "--vocab_transform",
        action="store_true",
        help="also copy the MLM head's prediction transform (dense + LayerNorm); without it the student "
        "keeps its own random transform (no effect for gpt2, whose head has none)",
    )
    parser.add_argument(
        "--layers",
        nargs="+",
        type=non_negative_int,
        default=list(DEFAULT_LAYERS),
        metavar="LAYER",
        help="teacher layers that become student layers 0, 1, ... (default: %(default)s)",
    )
    return parser


def resolve_defaults(args: argparse.Namespace, default_names: Mapping[str, str]) -> None:
    """Fill `--model_name` and `--dump_checkpoint` when absent; the defaults depend on other flags."""
    if args.model_name is None:
        if args.model_type == AUTO:
            raise ScriptError("--model_type auto needs --model_name (a hub name or a local model folder)")
        args.model_name = default_names[args.model_type]
    if args.dump_checkpoint is None:
        layer_tag = "".join(str(idx) for idx in args.layers)
        if args.model_type == AUTO:
            args.dump_checkpoint = f"serialization_dir/{Path(args.model_name).name}_{layer_tag}"
        else:
            args.dump_checkpoint = f"serialization_dir/tf_{Path(args.model_name).name}_{layer_tag}.pth"


def check_layers(layers: Sequence[int], n_teacher_layers: int) -> None:
    """Refuse layer indices the teacher does not have, and a layer chosen twice."""
    bad = [idx for idx in layers if not 0 <= idx < n_teacher_layers]
    if bad:
        raise ScriptError(
            f"--layers {' '.join(map(str, bad))} out of range: the teacher has {n_teacher_layers} layers, "
            f"choose indices from 0 to {n_teacher_layers - 1}"
        )
    repeated = sorted({idx for idx in layers if layers.count(idx) > 1})
    if repeated:
        raise ScriptError(f"--layers repeats {' '.join(map(str, repeated))}: each teacher layer may be chosen once")


def _first_line(err: Exception) -> str:
    """The gist of a library error, for a one-line message."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _weights_failure(err: Exception) -> str:
    """Why the weights did not load, in a line: a damaged file, or one that safe loading refused."""
    if isinstance(err, pickle.UnpicklingError):  # what was refused, without torch's advice to load unsafely
        lines = [line.strip() for line in str(err).splitlines()]
        refused = [line for line in lines if line and "weights_only" not in line and not line.startswith("Check the")]
        return f"refused by safe loading, the file holds more than tensors: {(refused or ['?'])[0]}"
    if isinstance(err, SafetensorError):
        return f"damaged or truncated safetensors file: {_first_line(err)}"
    return _first_line(err)


def _hub_hint() -> str:
    """The end of an error about a name that was looked up on the hub."""
    return f"; {HUB_OFFLINE_HINT}"


def _looks_like_path(name: str) -> bool:
    """True for names that cannot be hub ids, so a missing directory is reported as such."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def load_teacher_config(name: str, model_type: str | None) -> PretrainedConfig:
    """Load the teacher's config, refusing a missing directory and a teacher of another family (None: any)."""
    is_local = Path(name).exists()
    if not is_local and _looks_like_path(name):
        raise ScriptError(f"--model_name {name!r}: no such teacher directory")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        where, hint = ("", "") if is_local else ("no local directory of that name, and from the hub: ", _hub_hint())
        reason = f"{where}{_first_line(err)}"
        raise ScriptError(f"--model_name {name!r}: cannot load the teacher's config ({reason}){hint}") from err
    if model_type is not None and config.model_type != model_type:
        raise ScriptError(
            f"--model_name {name!r} is a {config.model_type!r} model, not a {model_type!r} teacher "
            f"as --model_type {model_type} says"
        )
    return config


def load_teacher(
    name: str, teacher_class: type, config: PretrainedConfig, needed: Collection[str] | None, **kwargs
) -> PreTrainedModel:
    """Load the teacher's weights; a tensor we copy that the checkpoint lacks would be random, so refuse it.

    `needed` names the tensors we copy (None: all of them); `kwargs` go to `from_pretrained`.
    """
    try:
        teacher, info = teacher_class.from_pretrained(name, config=config, output_loading_info=True, **kwargs)
    # A damaged file is a SafetensorError or RuntimeError, one safe loading refuses an UnpicklingError.
    except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as err:
        message = f"--model_name {name!r}: cannot load the teacher's weights ({_weights_failure(err)})"
        raise ScriptError(message + ("" if Path(name).exists() else _hub_hint())) from err
    uninitialised = sorted(set(info["missing_keys"]) if needed is None else set(needed) & set(info["missing_keys"]))
    if uninitialised:
        raise ScriptError(
            f"--model_name {name!r}: the checkpoint lacks {len(uninitialised)} tensor(s) to transfer, "
            f"e.g. {uninitialised[0]!r} (is it a {type(teacher).__name__} checkpoint?)"
        )
    return teacher


def transfer(teacher_state: Mapping[str, torch.Tensor], pairs: Sequence[KeyPair]) -> dict[str, torch.Tensor]:
    """Copy each teacher tensor under its student key.

    Copies are contiguous and own their storage: tied teacher weights (embeddings = decoder) become
    independent tensors, which safetensors requires, and torch.save writes no teacher storage beyond them.

    Args:
        teacher_state: the teacher's state dict.
        pairs: (student key, teacher key) pairs, from `KeyTable.key_pairs`.

    Returns:
        The student state dict, in the order of `pairs`.
    """
    absent = [teacher_key for _, teacher_key in pairs if teacher_key not in teacher_state]
    if absent:
        raise ScriptError(f"the teacher has no tensor {absent[0]!r} ({len(absent)} expected tensor(s) absent)")
    return {
        student_key: teacher_state[teacher_key].detach().clone(memory_format=torch.contiguous_format)
        for student_key, teacher_key in pairs
    }


def make_folder(folder: Path, flag: str, value: str) -> None:
    """Create `folder` and its parents; called only once everything that can fail before writing has succeeded.

    The original README writes to serialization_dir/, which a fresh checkout lacks.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ScriptError(f"{flag} {value!r}: cannot create its folder ({err.strerror or err})") from err


def save_state_dict(state: dict[str, torch.Tensor], path: str) -> None:
    """Write `state` atomically: safetensors for a `.safetensors` name, torch.save otherwise."""
    target = Path(path)
    make_folder(target.parent, "--dump_checkpoint", path)
    with atomic_output(target) as tmp:  # a full disk is a RuntimeError or a SafetensorError: a WriteError too
        if target.suffix == ".safetensors":
            save_file(state, tmp, metadata={"format": "pt"})
        else:
            torch.save(state, tmp)


def save_config(config: PretrainedConfig, path: str) -> None:
    """Write the student config for `--dump_config` atomically, as the JSON train.py's --student_config reads."""
    target = Path(path)
    make_folder(target.parent, "--dump_config", path)
    with atomic_output(target) as tmp:
        config.to_json_file(tmp)
    logger.info("Saved the student config (%d layers) to %s", config.num_hidden_layers, path)


def log_transfer(layers: Sequence[int], state: Mapping[str, torch.Tensor]) -> None:
    """What was copied: the original's two lines."""
    n_values = sum(tensor.numel() for tensor in state.values())
    logger.info("%d layers selected for distillation: teacher layers %s", len(layers), list(layers))
    logger.info("Number of tensors transferred for distillation: %d (%.1fM values)", len(state), n_values / 1e6)


def check_output_paths(args: argparse.Namespace, checkpoint_file: str | Path) -> None:
    """Refuse, before the teacher is loaded, outputs that cannot be written (see cli_utils.check_output_path)
    or that would replace the teacher, and a teacher folder of the wrong shape."""
    check_outputs_apart(
        {"--dump_checkpoint": args.dump_checkpoint, "--dump_config": args.dump_config}, {"--model_name": args.model_name}
    )
    check_model_folder(args.model_name, "--model_name")
    check_output_path("--dump_checkpoint", checkpoint_file, create_folders=True)
    if args.dump_config:
        check_output_path("--dump_config", args.dump_config, create_folders=True)


def extract(args: argparse.Namespace, tables: Mapping[str, KeyTable]) -> None:
    """Build the student state dict the flags ask for and write it to `--dump_checkpoint` (and `--dump_config`).

    Everything that can fail (config, family, layers, weights, keys) is checked before the output is written.

    Args:
        args: parsed flags with `resolve_defaults` applied.
        tables: the script's key table per `--model_type`.
    """
    check_output_paths(args, args.dump_checkpoint)
    table = tables[args.model_type]
    config = load_teacher_config(args.model_name, table.model_type)
    check_layers(args.layers, config.num_hidden_layers)
    student_config = table.student_config(config, args.layers) if args.dump_config else None
    if args.vocab_transform and not table.vocab_transform:
        logger.warning("--vocab_transform has no effect for %s: its LM head has no transform", args.model_type)
    pairs = table.key_pairs(args.layers, args.vocab_transform)
    teacher = load_teacher(args.model_name, table.teacher_class, config, [teacher_key for _, teacher_key in pairs])
    state = transfer(teacher.state_dict(), pairs)
    save_state_dict(state, args.dump_checkpoint)
    log_transfer(args.layers, state)
    logger.info("Saved the transferred checkpoint to %s", args.dump_checkpoint)
    if student_config is not None:
        save_config(student_config, args.dump_config)


# ------------------------------------------------------------------ --model_type auto: any architecture

# Files of a save_pretrained folder that from_pretrained would read as weights: one left from an earlier
# save beside the new ones could be read instead of them (a single model.safetensors wins over shards).
_WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json")


def drop_unchosen_layers(model: PreTrainedModel, layers: Sequence[int], student_config: PretrainedConfig) -> None:
    """Keep only teacher layers `layers` in the model's stack, renumbered 0..k-1, and give it `student_config`.

    Everything outside the stack (embeddings, final norm, LM head, tied or not) stays as it is. The result is
    meant for `save_pretrained`: its layers keep their teacher attributes (such as `layer_idx`).
    """
    stack_name, stack = find_layer_stack(model)
    parent_name, _, attribute = stack_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, attribute, nn.ModuleList(stack[idx] for idx in layers))
    teacher_config = model.config
    for module in model.modules():
        if getattr(module, "config", None) is teacher_config:
            module.config = student_config


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; if the block completes, its files move into `target`.

    On an error the temporary folder is removed and `target` is untouched. Files already in `target` stay,
    those of the same names are replaced, except weight files the block did not write: from_pretrained might
    read them instead of the new ones, and deleting the user's files is not ours to do, so that is an error.
    """
    make_folder(target.parent, "--dump_checkpoint", str(target))
    with reported_write(target):  # a full disk or a read-only folder, at any point
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            yield staging
            written = {path.name for path in staging.iterdir()}
            stale = sorted(
                path.name
                for pattern in _WEIGHT_FILE_PATTERNS
                for path in (target.glob(pattern) if target.is_dir() else [])
                if path.name not in written
            )
            if stale:
                raise ScriptError(
                    f"--dump_checkpoint {str(target)!r} holds weights this extraction would not replace "
                    f"({', '.join(stale)}), which from_pretrained could load instead: choose another folder or remove "
                    "them"
                )
            make_folder(target, "--dump_checkpoint", str(target))
            # Configs last: a folder whose config is new has its new weights.
            for name in sorted(written, key=lambda name: name.endswith(".json")):
                os.replace(staging / name, target / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def check_student_folder(folder: Path, lm_class: type, layers: Sequence[int]) -> None:
    """The student built from the written config must take the written weights exactly: no key missing or left over.

    The advice names the likely cause: a first layer built differently (ModernBERT's has no attention norm)
    when `layers` does not start with 0, else layers built from other settings than the depth.
    """
    try:
        _, info = lm_class.from_pretrained(folder, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise ScriptError(f"the extracted student does not load back ({_first_line(err)})") from err
    problems = {kind: info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[kind]}
    if problems:
        kind, keys = next(iter(problems.items()))
        advice = (
            "some architectures build their first layer differently: start --layers with 0"
            if layers[0] != 0
            else "this family builds its layers from other settings of its config than their number (shared or "
            "grouped layers), so a shallower copy of its config does not describe the chosen layers; it cannot be "
            "extracted with --model_type auto"
        )
        raise ScriptError(
            f"the student built from the new config does not take the extracted weights ({kind.replace('_', ' ')}: "
            f"{len(keys)}, e.g. {sorted(keys)[0]!r}); {advice}"
        )


def extract_auto(args: argparse.Namespace) -> None:
    """`--model_type auto`: write the teacher reduced to its `--layers` as a save_pretrained folder.

    The folder at `--dump_checkpoint` gets the teacher's config with the new depth (per-layer settings
    following their layers) and the weights: everything outside the layer stack and the chosen layers,
    renumbered. It is written through a temporary folder and checked to load back before it replaces anything.

    Args:
        args: parsed flags with `resolve_defaults` applied.
    """
    target = Path(args.dump_checkpoint)
    if target.exists() and not target.is_dir():
        raise ScriptError(f"--dump_checkpoint {args.dump_checkpoint!r} is a file: --model_type auto writes a folder")
    check_output_paths(args, target / "config.json")
    config = load_teacher_config(args.model_name, None)
    try:
        lm_class = auto_lm_class(config)
        check_layers(args.layers, depth(config))
        student_config = shallower_config(config, args.layers)
    except ValueError as err:
        raise ScriptError(f"--model_name {args.model_name!r}: {_first_line(err)}") from err
    if args.vocab_transform:
        logger.warning("--vocab_transform has no effect with --model_type auto: the whole LM head is copied")
    teacher = load_teacher(args.model_name, lm_class, config, None, dtype="auto")
    try:
        drop_unchosen_layers(teacher, args.layers, student_config)
    except ValueError as err:
        raise ScriptError(f"--model_name {args.model_name!r}: {_first_line(err)}") from err
    with staged_folder(target) as staging:
        teacher.save_pretrained(staging)
        log_transfer(args.layers, teacher.state_dict())
        del teacher  # the check loads the student: hold one model at a time
        check_student_folder(staging, lm_class, args.layers)
    logger.info("Saved the student (config.json and weights) to %s", target)
    if args.dump_config:
        save_config(student_config, args.dump_config)


def run_extraction(
    description: str,
    tables: Mapping[str, KeyTable],
    default_names: Mapping[str, str],
    argv: Sequence[str] | None,
    with_auto: bool = False,
) -> None:
    """The whole command of an extraction script: parse its flags, fill the defaults, extract, write.

    `with_auto` adds the `auto` choice of `--model_type` after the script's own families.
    """
    model_types = [*tables, AUTO] if with_auto else list(tables)
    args = build_parser(description, model_types, default_names).parse_args(argv)
    resolve_defaults(args, default_names)
    if args.model_type == AUTO:
        extract_auto(args)
    else:
        extract(args, tables)
