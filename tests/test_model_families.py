"""scripts/model_families.py: the facts about a family that the `auto` choices rely on.

Expected values are written out here per family (marker tokens by name, layer stacks by qualified name,
attention patterns by hand), not derived from the module under test.
"""

import assets
import model_families
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    AutoTokenizer,
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    ModernBertConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    RobertaConfig,
    ViTConfig,
)

# Tokenizer kind -> the tokens it must add (None: nothing on that side).
ADDED = {
    "bert": ("[CLS]", "[SEP]"),
    "roberta": ("<s>", "</s>"),
    "gpt2": (None, None),
    "modernbert": ("[CLS]", "[SEP]"),
    "llama": ("<|begin_of_text|>", None),
    "qwen3": (None, None),
    "gpt_neox": (None, None),
}


@pytest.fixture(scope="module")
def all_tokenizer_dirs(tokenizer_dirs, auto_tokenizer_dirs):
    return {**tokenizer_dirs, **auto_tokenizer_dirs}


@pytest.mark.parametrize("kind", sorted(ADDED))
def test_added_markers_are_the_tokens_the_tokenizer_wraps_a_text_in(kind, all_tokenizer_dirs):
    tokenizer = AutoTokenizer.from_pretrained(all_tokenizer_dirs[kind])
    expected = tuple(None if token is None else tokenizer.convert_tokens_to_ids(token) for token in ADDED[kind])
    assert model_families.added_markers(tokenizer) == expected


def test_added_markers_refuse_two_tokens_on_one_side(corpus_lines):
    backend = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s> </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    with pytest.raises(ValueError, match=r"adds 2 special tokens after a text \(\[1, 1\]\)"):
        model_families.added_markers(tokenizer)


@pytest.mark.parametrize(
    ("config", "masked"),
    [
        (BertConfig(), True),
        (RobertaConfig(), True),
        (ModernBertConfig(), True),
        (DistilBertConfig(), True),
        (LlamaConfig(), False),
        (Qwen2Config(), False),
        (GPTNeoXConfig(), False),
        (GPT2Config(), False),
    ],
    ids=lambda value: getattr(value, "model_type", str(value)),
)
def test_masked_or_causal_lm(config, masked):
    assert model_families.is_masked_lm(config) is masked
    expected = "AutoModelForMaskedLM" if masked else "AutoModelForCausalLM"
    assert model_families.auto_lm_class(config).__name__ == expected


def test_a_family_without_lm_class_is_refused():
    with pytest.raises(ValueError, match="a 'vit' model is not a language model"):
        model_families.auto_lm_class(ViTConfig())


STACKS = {
    "bert": "bert.encoder.layer",
    "roberta": "roberta.encoder.layer",
    "gpt2": "transformer.h",
    "modernbert": "model.layers",
    "llama": "model.layers",
    "qwen3": "model.layers",
    "gpt_neox": "gpt_neox.layers",
}


@pytest.mark.parametrize("kind", sorted(STACKS))
def test_find_layer_stack_of_each_family(kind, teacher_dirs, auto_teacher_dirs):
    if kind in assets.AUTO_KINDS:
        model = assets.AUTO_MODEL_CLASSES[kind].from_pretrained(auto_teacher_dirs[kind])
    else:
        model = assets.MODEL_CLASSES[kind].from_pretrained(teacher_dirs[kind])
    name, stack = model_families.find_layer_stack(model)
    assert name == STACKS[kind]
    assert stack is model.get_submodule(STACKS[kind])


class _ToyConfig(PretrainedConfig):
    model_type = "toy-layers"
    num_hidden_layers: int = 3


class _ToyModel(PreTrainedModel):
    """Holds `lists` ModuleLists of `num_hidden_layers` blocks, or the blocks in a Sequential, each block
    optionally with its own ModuleList of `num_hidden_layers` experts."""

    config_class = _ToyConfig

    def __init__(self, config, lists: int = 1, sequential: bool = False, experts: bool = False):
        super().__init__(config)
        n = config.num_hidden_layers

        def block():
            return nn.ModuleList(nn.Linear(2, 2) for _ in range(n)) if experts else nn.Linear(2, 2)

        if sequential:
            self.blocks = nn.Sequential(*(nn.Linear(2, 2) for _ in range(n)))
        for idx in range(lists):
            setattr(self, f"stack{idx}", nn.ModuleList(block() for _ in range(n)))


def test_find_layer_stack_refuses_absence_and_ambiguity():
    config = _ToyConfig()
    with pytest.raises(ValueError, match=r"_ToyModel has no nn.ModuleList of 3 modules"):
        model_families.find_layer_stack(_ToyModel(config, lists=0, sequential=True))
    with pytest.raises(ValueError, match=r"2 nn.ModuleLists of 3 modules \(stack0, stack1\): cannot tell"):
        model_families.find_layer_stack(_ToyModel(config, lists=2))
    # Experts as many as the layers, inside each layer: the outer list is the stack.
    model = _ToyModel(config, experts=True)
    assert model_families.find_layer_stack(model) == ("stack0", model.stack0)
    model.config = PretrainedConfig()  # a config that does not say its depth
    with pytest.raises(ValueError, match="has no num_hidden_layers, so its depth is unknown"):
        model_families.find_layer_stack(model)


def test_shallower_config_keeps_each_chosen_layers_settings():
    teacher = ModernBertConfig(num_hidden_layers=12, global_attn_every_n_layers=3)  # global at 0, 3, 6, 9
    student = model_families.shallower_config(teacher, [0, 2, 4, 7, 9, 11])

    assert student.num_hidden_layers == 6
    full, sliding = "full_attention", "sliding_attention"
    assert student.layer_types == [full, sliding, sliding, sliding, full, sliding]
    assert teacher.num_hidden_layers == 12 and len(teacher.layer_types) == 12  # unchanged
    assert type(student) is ModernBertConfig


def test_shallower_config_sets_the_depth_under_the_familys_own_name():
    student = model_families.shallower_config(GPT2Config(n_layer=12), [0, 5, 11])
    assert student.to_dict()["n_layer"] == 3
    assert "num_hidden_layers" not in student.to_dict()


def test_shallower_config_renumbers_layer_index_lists():
    teacher = Qwen2MoeConfig(num_hidden_layers=8, mlp_only_layers=[2, 7])
    student = model_families.shallower_config(teacher, [0, 2, 4, 7])
    assert student.mlp_only_layers == [1, 3]
    assert student.layer_types == ["full_attention"] * 4


def test_find_layer_stack_on_a_meta_model_needs_no_memory():
    """Works on the meta device (nothing allocated), as a check of a large teacher would run."""
    with torch.device("meta"):
        model = assets.MODEL_CLASSES["gpt2"](GPT2Config(n_layer=5, n_embd=64, n_head=2))
    assert model_families.find_layer_stack(model)[0] == "transformer.h"


def test_shallower_config_renumbers_per_layer_overrides():
    """Heterogeneous configs: the overrides of a chosen layer follow it to its student index, the others go."""
    teacher = LlamaConfig(
        num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        per_layer_config={1: {"intermediate_size": 48}, 2: {"intermediate_size": 56}, 3: {"intermediate_size": 80}},
    )
    student = model_families.shallower_config(teacher, [0, 1, 3])
    assert [layer.intermediate_size for layer in student.per_layer_config] == [64, 48, 80]
