"""What a model family looks like, for `auto` teachers and students of any architecture.

One owner for the facts the `auto` choices need: which special tokens a tokenizer wraps a text in,
whether a config is a masked or a causal language model, where a model keeps its stack of layers, and
how a config with fewer layers is written (depth attribute and per-layer settings).

It imports nothing from the project, so the scripts import it as `model_families` and train.py,
evaluation.py and quickstart.py as `scripts.model_families`.
"""

from collections.abc import Sequence

from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

# Any text the tokenizer splits into ordinary tokens: only its wrapping matters.
_PROBE_TEXT = "distil the teacher"

# Config entries holding one value per layer, e.g. ModernBERT's and Qwen's attention type of each layer
# ("full_attention" or "sliding_attention"), Llama 4's NoPE flags: a student keeps its chosen layers' values.
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers", "indexer_types")
# Model types whose position ids start after the padding id, as RoBERTa's do: two positions fewer to use.
# The masked LMs among transformers' users of create_position_ids_from_input_ids.
PADDING_OFFSET_POSITIONS = (
    "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "xmod",
    "longformer", "ibert", "mpnet", "luke", "esm",
)

# Names of learned absolute position tables across families (BERT-like, GPT-2, OPT...).
LEARNED_POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")

# Config entries listing layer indices (Qwen-MoE's dense layers): renumbered to the student's indices.
LAYER_INDEX_LISTS = ("mlp_only_layers",)

# Config entries counting the modules the layers are built from (ALBERT's layer groups): when there is one per
# layer, they follow the depth. Fewer (layers sharing weights) cannot be cut to chosen layers.
LAYER_MODULE_COUNTS = ("num_hidden_groups",)


def added_markers(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int | None]:
    """The special-token ids the tokenizer itself adds before and after a text.

    Found by encoding a probe text with and without special tokens and locating the plain ids inside
    the wrapped ones: BERT-like tokenizers give (cls, sep), Llama's BOS-only ones (bos, None), Qwen's and
    GPT-NeoX's, which add nothing, (None, None).

    Args:
        tokenizer: any transformers tokenizer.

    Returns:
        (start id or None, end id or None).

    Raises:
        ValueError: the tokenizer adds more than one token on a side, or changes the text's own ids.
    """
    plain = tokenizer.encode(_PROBE_TEXT, add_special_tokens=False)
    wrapped = tokenizer.encode(_PROBE_TEXT, add_special_tokens=True)
    starts = [i for i in range(len(wrapped) - len(plain) + 1) if wrapped[i : i + len(plain)] == plain]
    if not plain or not starts:
        raise ValueError(
            f"the tokenizer encodes {_PROBE_TEXT!r} differently with and without special tokens "
            f"({wrapped} and {plain}), so the markers it adds cannot be told apart from the text"
        )
    before, after = wrapped[: starts[0]], wrapped[starts[0] + len(plain) :]
    for side, ids in (("before", before), ("after", after)):
        if len(ids) > 1:
            raise ValueError(
                f"the tokenizer adds {len(ids)} special tokens {side} a text ({ids}); sequences can carry one "
                "start and one end marker at most"
            )
    return (before[0] if before else None), (after[0] if after else None)


def auto_markers(tokenizer: PreTrainedTokenizerBase, mlm: bool) -> dict[str, int | None]:
    """What sequences binarized with --tokenizer_type auto start and end with, and how their batches are padded.

    {"start": id or None, "end": id or None} from `added_markers`, and "pad": the pad id for MLM; for CLM
    the pad, end-of-sequence or unknown id, whichever the tokenizer has (the original padded GPT-2 with its
    unknown id): CLM padding comes last, no real position attends to it and it has no label, so its id
    never matters.

    Raises:
        ValueError: see `added_markers`.
    """
    start, end = added_markers(tokenizer)
    candidates = [tokenizer.pad_token_id] if mlm else [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    return {"start": start, "end": end, "pad": next((i for i in candidates if i is not None), 0)}


def is_masked_lm(config: PretrainedConfig) -> bool:
    """Whether the family has a masked-LM class (bert, roberta, modernbert, distilbert, ...), not only a causal one.

    Read from transformers' auto mapping, so a family registered with `AutoModelForMaskedLM.register` counts.
    """
    return type(config) in MODEL_FOR_MASKED_LM_MAPPING


def auto_lm_class(config: PretrainedConfig) -> type:
    """The auto class that loads the family with its LM head: masked when it has one, else causal.

    Raises:
        ValueError: the family has no language-model class at all (a vision or audio model, say).
    """
    if is_masked_lm(config):
        return AutoModelForMaskedLM
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM
    raise ValueError(
        f"a {config.model_type!r} model is not a language model (transformers has no masked or causal LM class for it)"
    )


def embeddable_positions(config: PretrainedConfig) -> int | None:
    """How many positions the model can embed: max_position_embeddings (n_positions), less RoBERTa-style
    families' padding offset; None when the config does not say."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and config.model_type in PADDING_OFFSET_POSITIONS:
        return positions - config.pad_token_id - 1
    return positions


def position_limit(model: nn.Module | None, config: PretrainedConfig) -> int | None:
    """How many positions the model can embed, read from what it holds.

    A learned absolute position table (BERT's and RoBERTa's position_embeddings, GPT-2's wpe, OPT's
    embed_positions) limits it to its rows, less the positions it skips: RoBERTa-style tables start after
    the padding id (their padding_idx), OPT's after its `offset`. Without such a table (rotary, relative,
    ALiBi or state-space positions), or without the model, the config's `embeddable_positions` is the
    default; None when that says nothing either (BLOOM, Mamba: no limit from positions).
    """
    tables = [
        module
        for name, module in (model.named_modules() if model is not None else ())
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in LEARNED_POSITION_TABLES
    ]
    if not tables:
        return embeddable_positions(config)
    return min(table.num_embeddings - _skipped_positions(table) for table in tables)


def _skipped_positions(table: nn.Embedding) -> int:
    """The rows of a position table that no position id reaches: OPT's offset, RoBERTa-style padding_idx + 1."""
    offset = getattr(table, "offset", None)
    if isinstance(offset, int):
        return offset
    return 0 if table.padding_idx is None else table.padding_idx + 1


def vocabulary_size(model: nn.Module | None, config: PretrainedConfig) -> int | None:
    """The ids the model takes: rows of its input embeddings; the config's vocab_size without the model, or None."""
    embeddings = model.get_input_embeddings() if model is not None else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None:
        return weight.size(0)
    return getattr(config, "vocab_size", None)


def depth(config: PretrainedConfig) -> int:
    """The number of layers: `num_hidden_layers`, whatever the family calls it (`n_layer`, `n_layers`, ...)."""
    n_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(n_layers, int):
        raise ValueError(f"the {config.model_type!r} config has no num_hidden_layers, so its depth is unknown")
    return n_layers


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer layers: the one nn.ModuleList with as many modules as the config has layers.

    A list nested in another such list (the experts of a layer, say) does not count.

    Args:
        model: a transformers model, e.g. LlamaForCausalLM (stack `model.layers`) or GPTNeoXForCausalLM
            (`gpt_neox.layers`).

    Returns:
        (qualified name of the stack, the stack).

    Raises:
        ValueError: no such list, or more than one.
    """
    n_layers = depth(model.config)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers
    ]
    outermost = [
        (name, module)
        for name, module in candidates
        if not any(name.startswith(f"{other}.") for other, _ in candidates if other != name)
    ]
    kind = type(model).__name__
    if not outermost:
        raise ValueError(
            f"{kind} has no nn.ModuleList of {n_layers} modules (its config's num_hidden_layers): "
            "cannot find its layers; layers that share weights (ALBERT's, say) cannot be cut to chosen ones: "
            "train a student of this family from random weights"
        )
    if len(outermost) > 1:
        names = ", ".join(name for name, _ in outermost)
        raise ValueError(
            f"{kind} has {len(outermost)} nn.ModuleLists of {n_layers} modules ({names}): cannot tell which holds "
            "its layers"
        )
    return outermost[0]


def shallower_config(config: PretrainedConfig, layers: Sequence[int]) -> PretrainedConfig:
    """The config of a student made of the teacher layers `layers`: the teacher's config with the new depth.

    Per-layer settings follow their layers (teacher layer `layers[s]` becomes student layer `s`), so that,
    say, a ModernBERT student keeps each chosen layer's attention type instead of re-deriving the pattern.

    Args:
        config: the teacher's config.
        layers: the teacher layer indices to keep, in student order.

    Returns:
        A new config of the teacher's class; `config` is unchanged.
    """
    values = config.to_dict()
    for key in LAYER_MODULE_COUNTS:
        if values.get(key) == depth(config):
            values[key] = len(layers)
    values[type(config).attribute_map.get("num_hidden_layers", "num_hidden_layers")] = len(layers)
    for key in PER_LAYER_LISTS:
        if values.get(key) is not None:
            values[key] = [values[key][teacher_idx] for teacher_idx in layers]
    for key in LAYER_INDEX_LISTS:
        if values.get(key) is not None:
            values[key] = [student_idx for student_idx, teacher_idx in enumerate(layers) if teacher_idx in values[key]]
    if values.get("per_layer_config"):
        overrides = {int(idx): layer_values for idx, layer_values in values["per_layer_config"].items()}
        values["per_layer_config"] = {
            str(student_idx): overrides[teacher_idx]
            for student_idx, teacher_idx in enumerate(layers)
            if teacher_idx in overrides
        }
    return type(config).from_dict(values)
