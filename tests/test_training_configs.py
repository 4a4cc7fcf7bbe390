"""training_configs/*.json: the released students' configs, kept as the original files (SPEC §9).

The files are plain (no model_type, no special-token ids): train.py loads each with its family's config
class, whose defaults supply the rest. These tests pin both the file contents and those defaults.
"""

import json

import pytest
import torch
from transformers import (
    DistilBertConfig,
    DistilBertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

DISTILBERT_KEYS = {
    "activation": "gelu",
    "attention_dropout": 0.1,
    "dim": 768,
    "dropout": 0.1,
    "hidden_dim": 3072,
    "initializer_range": 0.02,
    "max_position_embeddings": 512,
    "n_heads": 12,
    "n_layers": 6,
    "sinusoidal_pos_embds": True,
    "tie_weights_": True,
}
ROBERTA_KEYS = {
    "vocab_size": 50265,
    "hidden_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-5,
}
GPT2_KEYS = {
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-5,
    "n_embd": 768,
    "n_head": 12,
    "n_layer": 6,
    "n_positions": 1024,
    "vocab_size": 50257,
}

# name: (exact file contents, config class, model class, special-token ids from the class defaults,
#        parameters of the base model in millions as published on the model cards)
CONFIGS = {
    "distilbert-base-uncased": (
        {**DISTILBERT_KEYS, "vocab_size": 30522}, DistilBertConfig, DistilBertForMaskedLM, {"pad_token_id": 0}, 66
    ),
    "distilbert-base-cased": (
        {**DISTILBERT_KEYS, "vocab_size": 28996}, DistilBertConfig, DistilBertForMaskedLM, {"pad_token_id": 0}, 65
    ),
    "distilbert-base-multilingual-cased": (
        {**DISTILBERT_KEYS, "vocab_size": 119547}, DistilBertConfig, DistilBertForMaskedLM, {"pad_token_id": 0}, 134
    ),
    "distilroberta-base": (
        ROBERTA_KEYS, RobertaConfig, RobertaForMaskedLM, {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}, 82
    ),
    "distilgpt2": (GPT2_KEYS, GPT2Config, GPT2LMHeadModel, {"bos_token_id": 50256, "eos_token_id": 50256}, 82),
}


def test_exactly_the_released_configs(repo_root):
    assert sorted(path.name for path in (repo_root / "training_configs").iterdir()) == sorted(
        f"{name}.json" for name in CONFIGS
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_file_holds_the_original_keys(name, repo_root):
    contents = CONFIGS[name][0]
    assert json.loads((repo_root / "training_configs" / f"{name}.json").read_text()) == contents


@pytest.mark.parametrize("name", CONFIGS)
def test_config_class_loads_it_and_a_model_runs(name, repo_root):
    contents, config_class, model_class, special_ids, published_millions = CONFIGS[name]
    path = repo_root / "training_configs" / f"{name}.json"
    config = config_class.from_pretrained(path)

    assert config.to_dict() == config_class.from_json_file(path).to_dict()
    assert config.num_hidden_layers == 6 and config.hidden_size == 768 and config.num_attention_heads == 12
    assert {key: getattr(config, key) for key in contents} == contents
    assert {key: getattr(config, key) for key in special_ids} == special_ids

    torch.manual_seed(0)
    model = model_class(config).eval()
    assert abs(model.base_model.num_parameters() / 1e6 - published_millions) < 1
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, config.vocab_size)


def test_distilbert_position_embeddings_are_sinusoidal(repo_root):
    """sinusoidal_pos_embds: true fills the position table with sin/cos (XLM/Transformer style).

    transformers 5 no longer sets requires_grad=False on that table: freezing it, as the original
    library did, is train.py's job (SPEC §8). Pinned here so a change of that behaviour is noticed.
    """
    config = DistilBertConfig.from_pretrained(repo_root / "training_configs" / "distilbert-base-uncased.json")
    config.vocab_size = 100  # the position table does not depend on it; keeps the model small
    positions = DistilBertForMaskedLM(config).distilbert.embeddings.position_embeddings.weight

    one = torch.tensor(1.0)
    torch.testing.assert_close(positions[1, :2].detach(), torch.stack([torch.sin(one), torch.cos(one)]))
    assert positions.requires_grad
