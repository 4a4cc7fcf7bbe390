"""Tiny, fully local test assets: an English-like corpus, tokenizers of the three
families and teacher/student models built from configs (no network, ever).

Tokenizers and models are written with `save_pretrained` and loaded back by path,
exactly as a user's local teacher would be.
"""

import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
)


MAX_LEN = 64  # model_max_length of every tiny tokenizer and position range of every tiny model
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no out up what said its about into "
    "than them can only other new some could time these two may then do first any my now such like our over man "
    "me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three distillation teacher student transformer language model token "
    "sequence network training corpus vocabulary attention layer embedding gradient"
).split()


def make_corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Sentences of Zipf-distributed words (3 to 60 words), deterministic for a seed."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(WORDS))]
    lines = []
    for _ in range(n_lines):
        words = rng.choices(WORDS, weights=weights, k=rng.randint(3, 60))
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "!", "?", ","]))
    return lines


def train_wordpiece_tokenizer(corpus: list[str], vocab_size: int, max_length: int, out_dir: Path) -> Path:
    """Train a lowercasing BERT-style WordPiece tokenizer on `corpus` and save it to `out_dir`."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(
        corpus, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL_TOKENS)
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=max_length, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return out_dir


def build_tokenizer(kind: str, out_dir: Path, corpus: list[str], vocab_size: int = 400) -> Path:
    """Train a tiny tokenizer of `kind` (bert, roberta or gpt2) on `corpus` and save it to `out_dir`.

    BERT's is a WordPiece tokenizer; RoBERTa's and GPT-2's are byte-level BPEs
    with their families' special tokens.
    """
    if kind == "bert":
        return train_wordpiece_tokenizer(corpus, vocab_size, MAX_LEN, out_dir)
    if kind not in ("roberta", "gpt2"):
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if kind == "roberta" else ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    if kind == "roberta":
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
        roles = dict(
            bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
            cls_token="<s>", sep_token="</s>", mask_token="<mask>",
        )
    else:
        roles = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_LEN, **roles)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return out_dir


def teacher_config(kind: str, vocab_size: int, n_layers: int = 2, hidden: int = 32, heads: int = 2):
    """Config of a tiny teacher of family `kind` (bert, roberta or gpt2)."""
    if kind == "bert":
        return BertConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, max_position_embeddings=MAX_LEN, pad_token_id=0,
        )
    if kind == "roberta":
        return RobertaConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, max_position_embeddings=MAX_LEN + 2, type_vocab_size=1,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
        )
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=n_layers, n_head=heads, n_positions=MAX_LEN,
            bos_token_id=0, eos_token_id=0,
        )
    raise ValueError(f"unknown teacher kind {kind!r}")


def student_config(kind: str, vocab_size: int, n_layers: int = 1, hidden: int = 32, heads: int = 2):
    """Config of a tiny student of family `kind` (distilbert, roberta or gpt2)."""
    if kind == "distilbert":
        return DistilBertConfig(
            vocab_size=vocab_size, dim=hidden, n_layers=n_layers, n_heads=heads, hidden_dim=4 * hidden,
            max_position_embeddings=MAX_LEN, sinusoidal_pos_embds=True, pad_token_id=0,
        )
    return teacher_config(kind, vocab_size, n_layers, hidden, heads)


MODEL_CLASSES = {
    "bert": BertForMaskedLM,
    "distilbert": DistilBertForMaskedLM,
    "roberta": RobertaForMaskedLM,
    "gpt2": GPT2LMHeadModel,
}


def build_teacher(kind: str, out_dir: Path, tokenizer_dir: Path, n_layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised tiny teacher together with its tokenizer in `out_dir`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return save_seeded(lambda: MODEL_CLASSES[kind](teacher_config(kind, len(tokenizer), n_layers=n_layers)),
                       tokenizer, out_dir, seed)


def save_seeded(make_model, tokenizer, out_dir: Path, seed: int) -> Path:
    """`make_model()` under torch seed `seed`, saved with `tokenizer` in `out_dir` (created)."""
    import torch

    torch.manual_seed(seed)
    model = make_model()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---- Helpers for the training tests (distiller, train CLI, distributed) ----

_DROPOUT_ATTRIBUTES = (
    "dropout", "attention_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "seq_classif_dropout", "qa_dropout",
)


def without_dropout(config):
    """`config` with every dropout probability set to 0, so that a training step is deterministic."""
    for name in _DROPOUT_ATTRIBUTES:
        if hasattr(config, name):
            setattr(config, name, 0.0)
    return config


def make_sequences(n: int, length: int, vocab_size: int, start_id: int, end_id: int, low_id: int = 5, seed: int = 0):
    """`n` uint16 sequences of exactly `length` ids: start marker, random ids in [low_id, vocab_size), end marker."""
    import numpy as np

    rng = np.random.default_rng(seed)
    body = rng.integers(low_id, vocab_size, size=(n, length - 2))
    return [np.array([start_id, *row, end_id], dtype=np.uint16) for row in body]


def gpt2_clm_argv(root: Path, teacher_dir, run_flags: list[str], n_sequences: int, length: int, n_layers: int = 1):
    """Data and a student config for a gpt2 -> gpt2 CLM run of train.py, written in `root`.

    Returns argv(dump_path, *extra): the flags of a run into `dump_path`, then `run_flags`, then `extra`.
    """
    import pickle

    from transformers import AutoConfig, AutoTokenizer

    vocab_size = AutoConfig.from_pretrained(teacher_dir).vocab_size
    marker = AutoTokenizer.from_pretrained(teacher_dir).bos_token_id
    sequences = make_sequences(n_sequences, length, vocab_size, marker, marker, seed=4)
    (root / "data.pickle").write_bytes(pickle.dumps(sequences))
    student_config("gpt2", vocab_size, n_layers=n_layers).to_json_file(root / "student.json")

    def argv(dump_path, *extra: str) -> list[str]:
        return [
            "--dump_path", str(dump_path), "--data_file", str(root / "data.pickle"), "--student_type", "gpt2",
            "--student_config", str(root / "student.json"), "--teacher_type", "gpt2",
            "--teacher_name", str(teacher_dir), "--alpha_ce", "1.0", "--alpha_clm", "1.0",
            "--alpha_cos", "1.0", *run_flags, *extra,
        ]

    return argv


def distiller_params(dump_path, student_type: str = "gpt2", teacher_type: str = "gpt2", **overrides):
    """train.py's namespace for a single CPU process, with the fields init_gpu_params and main would add.

    Flags are train.py's defaults unless given in `overrides` (as attribute names).
    """
    import torch
    from train import build_parser

    params = build_parser().parse_args(
        [
            "--dump_path", str(dump_path), "--data_file", "unused", "--student_config", "unused",
            "--student_type", student_type, "--teacher_type", teacher_type, "--teacher_name", "unused",
            "--n_gpu", "0",
        ]
    )
    params.is_master = True
    params.multi_gpu = False
    params.multi_node = False
    params.world_size = 1
    params.global_rank = 0
    params.local_rank = 0
    params.n_gpu_per_node = 1
    params.n_nodes = 1
    params.node_id = 0
    params.device = torch.device("cpu")
    params.max_model_input_size = MAX_LEN
    for name, value in overrides.items():
        setattr(params, name, value)
    return params


def tiny_model(kind: str, role: str, vocab_size: int, seed: int = 0, hidden: int = 16):
    """A one-layer model of family `kind` in the `role` "student" or "teacher", no dropout, hidden states on."""
    import torch

    make_config = student_config if role == "student" else teacher_config
    config = without_dropout(make_config(kind, vocab_size, n_layers=1, hidden=hidden))
    config.output_hidden_states = True
    torch.manual_seed(seed)
    return MODEL_CLASSES[kind](config)


# ---- Today's families, for the `auto` choices: encoder (ModernBERT) and decoders (Llama, Qwen3, GPT-NeoX) ----

AUTO_KINDS = ("modernbert", "llama", "qwen3", "gpt_neox")

# Per family: the tokenizer's special tokens, the template it wraps a text in (None: it adds nothing) and the
# roles its special tokens play, as in the released tokenizers (Llama 3 adds only its BOS and has no unknown or
# padding token; Qwen and GPT-NeoX add nothing).
_AUTO_TOKENIZERS = {
    "modernbert": (
        ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"],
        "[CLS] $A [SEP]",
        dict(unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]"),
    ),
    "llama": (
        ["<|begin_of_text|>", "<|end_of_text|>"],
        "<|begin_of_text|> $A",
        dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"),
    ),
    "qwen3": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        None,
        dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
    ),
    "gpt_neox": (
        ["<|endoftext|>", "<|padding|>"],
        None,
        dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"),
    ),
}


def build_auto_tokenizer(kind: str, out_dir: Path, corpus: list[str], vocab_size: int = 400) -> Path:
    """Train a tiny byte-level BPE tokenizer with the special tokens and wrapping of family `kind` (AUTO_KINDS)."""
    specials, template, roles = _AUTO_TOKENIZERS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    if template is not None:
        markers = [(token, tok.token_to_id(token)) for token in specials if token in template]
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=markers)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_LEN, **roles)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return out_dir


def auto_teacher_config(kind: str, tokenizer, n_layers: int = 4, hidden: int = 32):
    """Config of a tiny teacher of family `kind` (AUTO_KINDS), its special-token ids taken from `tokenizer`.

    What each covers: ModernBERT pre-norm LayerNorms without bias, rotary, tied head and a pattern of global
    and local (sliding) attention layers, with a window short enough to matter on test sequences; Llama GQA
    (2 key/value heads for 4 heads), RMSNorm, rotary, untied head; Qwen3 GQA, q/k norms, tied head and
    alternating full and sliding attention; GPT-NeoX partial rotary (a quarter of each head), parallel
    residual, untied head.
    """
    ids = dict(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    sizes = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers, max_position_embeddings=MAX_LEN
    )
    if kind == "modernbert":
        return ModernBertConfig(
            **sizes, **{**ids, "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id},
            num_attention_heads=2, cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id,
            local_attention=4, global_attn_every_n_layers=3,
        )
    if kind == "llama":
        return LlamaConfig(**sizes, **ids, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    if kind == "qwen3":
        return Qwen3Config(
            **sizes, **ids, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
            tie_word_embeddings=True, use_sliding_window=True, sliding_window=4,
            layer_types=["full_attention" if i % 2 == 0 else "sliding_attention" for i in range(n_layers)],
        )
    if kind == "gpt_neox":
        return GPTNeoXConfig(**sizes, **ids, num_attention_heads=4, rotary_pct=0.25, tie_word_embeddings=False)
    raise ValueError(f"unknown auto teacher kind {kind!r}")


# The LM class of each family, written out here independently of scripts/model_families.py.
AUTO_MODEL_CLASSES = {
    "modernbert": ModernBertForMaskedLM,
    "llama": LlamaForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "gpt_neox": GPTNeoXForCausalLM,
}


def build_auto_teacher(kind: str, out_dir: Path, tokenizer_dir: Path, n_layers: int = 4, seed: int = 0) -> Path:
    """Save a randomly initialised tiny teacher of family `kind` (AUTO_KINDS) with its tokenizer in `out_dir`."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    return save_seeded(lambda: AUTO_MODEL_CLASSES[kind](auto_teacher_config(kind, tokenizer, n_layers=n_layers)),
                       tokenizer, out_dir, seed)


# ---- The family matrix: families none of the other tests use, built as a new user would try them ----

# Per family: (tokenizer style, masked LM). Styles: "modernbert" ([CLS] $A [SEP]) and "roberta" (<s> $A </s>) for
# the masked LMs, "llama" (a BOS before the text) and "qwen3" (nothing added) for the causal ones.
MATRIX_FAMILIES = {
    "deberta-v2": ("modernbert", True),
    "deberta-v2-legacy": ("modernbert", True),
    "electra": ("modernbert", True),
    "xlm-roberta": ("roberta", True),
    "mpnet": ("roberta", True),
    "phi3": ("llama", False),
    "opt": ("llama", False),
    "bloom": ("qwen3", False),
    "falcon": ("qwen3", False),
    "olmo2": ("llama", False),
    "gemma3_text": ("llama", False),
    "mamba": ("qwen3", False),
}


def build_matrix_tokenizer(kind: str, out_dir: Path, corpus: list[str], vocab_size: int = 300) -> Path:
    """The tiny tokenizer of a MATRIX_FAMILIES family, in its style."""
    style, _ = MATRIX_FAMILIES[kind]
    if style == "roberta":
        return build_tokenizer("roberta", out_dir, corpus, vocab_size)
    return build_auto_tokenizer(style, out_dir, corpus, vocab_size)


def matrix_config(kind: str, tokenizer, n_layers: int = 4, hidden: int = 32):
    """Config of a tiny model of a MATRIX_FAMILIES family, its special-token ids from `tokenizer`.

    What each covers: DeBERTa-v2 relative attention without position table, its new head (legacy=False, whose
    get_output_embeddings() is a layer inside the head) and its legacy one; ELECTRA's generator head, narrower
    embeddings than hidden states; XLM-R's and MPNet's positions after the padding id (MPNet relative bias too);
    Phi-3's fused qkv and partial rotary; OPT's projected embeddings (word_embed_proj_dim, hidden states narrower
    than hidden_size) and offset positions; BLOOM's ALiBi (no max_position_embeddings); Falcon's multi-query
    parallel attention; OLMo2's q/k norms after the projections; Gemma 3's sliding-window layers, scaled
    embeddings and q/k norms; Mamba, a state-space model (no attention, no positions).
    """
    from transformers import (
        BloomConfig, DebertaV2Config, ElectraConfig, FalconConfig, Gemma3TextConfig, MambaConfig, MPNetConfig,
        Olmo2Config, OPTConfig, Phi3Config, XLMRobertaConfig,
    )

    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    sizes = dict(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=2, intermediate_size=2 * hidden)
    if kind in ("deberta-v2", "deberta-v2-legacy"):
        return DebertaV2Config(**sizes, **ids, max_position_embeddings=MAX_LEN, relative_attention=True,
                               position_biased_input=False, pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
                               position_buckets=8, type_vocab_size=0, legacy=kind.endswith("legacy"))
    if kind == "electra":
        return ElectraConfig(**sizes, **ids, embedding_size=hidden // 2, max_position_embeddings=MAX_LEN)
    if kind == "xlm-roberta":
        return XLMRobertaConfig(**sizes, **ids, max_position_embeddings=MAX_LEN + 2, type_vocab_size=1)
    if kind == "mpnet":
        return MPNetConfig(**sizes, **ids, max_position_embeddings=MAX_LEN + 2)
    if kind == "phi3":
        return Phi3Config(**sizes, **ids, max_position_embeddings=MAX_LEN, partial_rotary_factor=0.5,
                          original_max_position_embeddings=MAX_LEN)
    if kind == "opt":
        return OPTConfig(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=2, ffn_dim=2 * hidden,
                         word_embed_proj_dim=hidden // 2, max_position_embeddings=MAX_LEN, **ids)
    if kind == "bloom":
        return BloomConfig(hidden_size=hidden, n_layer=n_layers, n_head=2, **ids)
    if kind == "falcon":
        return FalconConfig(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=2,
                            max_position_embeddings=MAX_LEN, **ids)
    if kind == "olmo2":
        return Olmo2Config(**sizes, **ids, max_position_embeddings=MAX_LEN)
    if kind == "gemma3_text":
        return Gemma3TextConfig(**sizes, **ids, num_key_value_heads=1, head_dim=hidden // 2,
                                max_position_embeddings=MAX_LEN, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * (n_layers // 2))
    if kind == "mamba":
        return MambaConfig(hidden_size=hidden, num_hidden_layers=n_layers, state_size=4, expand=2, conv_kernel=3,
                           time_step_rank=4, **ids)
    raise ValueError(f"unknown matrix family {kind!r}")


def matrix_model_class(kind: str) -> type:
    """The LM class of a MATRIX_FAMILIES family, written out here independently of scripts/model_families.py."""
    import transformers

    names = {
        "deberta-v2": "DebertaV2ForMaskedLM", "deberta-v2-legacy": "DebertaV2ForMaskedLM",
        "electra": "ElectraForMaskedLM", "xlm-roberta": "XLMRobertaForMaskedLM", "mpnet": "MPNetForMaskedLM",
        "phi3": "Phi3ForCausalLM", "opt": "OPTForCausalLM", "bloom": "BloomForCausalLM", "falcon": "FalconForCausalLM",
        "olmo2": "Olmo2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "mamba": "MambaForCausalLM",
    }
    return getattr(transformers, names[kind])


def build_matrix_teacher(kind: str, out_dir: Path, tokenizer_dir: Path, n_layers: int = 4, seed: int = 0) -> Path:
    """Save a randomly initialised tiny teacher of a MATRIX_FAMILIES family with its tokenizer in `out_dir`."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    config = without_dropout(matrix_config(kind, tokenizer, n_layers=n_layers))
    return save_seeded(lambda: matrix_model_class(kind)(config), tokenizer, out_dir, seed)


# Settings of a student half the teacher's width, where a family's config has them (OPT keeps its
# word_embed_proj_dim: its hidden states stay as wide as the teacher's).
NARROW_SETTINGS = {
    "hidden_size": 16, "intermediate_size": 32, "ffn_dim": 32, "num_attention_heads": 2, "n_head": 2,
    "num_key_value_heads": 1, "head_dim": 8, "embedding_size": 8, "time_step_rank": 2,
}


def narrower_config(config_dict: dict) -> dict:
    """A student config half as wide as `config_dict` (a teacher's, as a dict): NARROW_SETTINGS where it has them."""
    return {**config_dict, **{key: value for key, value in NARROW_SETTINGS.items() if key in config_dict}}
