"""Initialise a DistilBERT student from chosen layers of a BERT teacher (BERT -> DistilBERT).

    python scripts/extract_distilbert.py --model_type bert --model_name bert-base-uncased \
        --dump_checkpoint serialization_dir/tf_bert-base-uncased_0247911.pth --vocab_transform

Teacher layers 0 2 4 7 9 11 (or `--layers`) become student layers 0-5. Token-type embeddings are
dropped: DistilBERT has none. The output is a flat state dict keyed by DistilBertForMaskedLM's
parameter names, for train.py's `--student_pretrained_weights`; `--dump_config PATH` also writes the
DistilBERT config of that student (sizes from the teacher's config), for train.py's `--student_config`.
"""

import logging
from collections.abc import Sequence

from cli_utils import run_cli
from extraction import KeyTable, run_extraction, weight_and_bias
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig

logger = logging.getLogger("extract_distilbert")

# DistilBERT's LayerNorms have this epsilon whatever the config says.
_DISTILBERT_LAYER_NORM_EPS = 1e-12


def distilbert_config(bert: BertConfig, layers: Sequence[int]) -> DistilBertConfig:
    """The DistilBERT config of a student made of BERT layers `layers`: the teacher's sizes under DistilBERT's names.

    Positions are learned (`sinusoidal_pos_embds=False`), like the teacher's that the checkpoint copies in.
    """
    if bert.layer_norm_eps != _DISTILBERT_LAYER_NORM_EPS:
        logger.warning(
            "the teacher's LayerNorm epsilon is %g; DistilBERT's is always %g", bert.layer_norm_eps,
            _DISTILBERT_LAYER_NORM_EPS,
        )
    return DistilBertConfig(
        vocab_size=bert.vocab_size,
        dim=bert.hidden_size,
        n_heads=bert.num_attention_heads,
        hidden_dim=bert.intermediate_size,
        max_position_embeddings=bert.max_position_embeddings,
        activation=bert.hidden_act,
        dropout=bert.hidden_dropout_prob,
        attention_dropout=bert.attention_probs_dropout_prob,
        initializer_range=bert.initializer_range,
        pad_token_id=bert.pad_token_id,
        n_layers=len(layers),
        sinusoidal_pos_embds=False,
    )


_STUDENT_LAYER = "distilbert.transformer.layer.{layer}"
_TEACHER_LAYER = "bert.encoder.layer.{layer}"

BERT_TO_DISTILBERT = KeyTable(
    model_type="bert",
    teacher_class=BertForMaskedLM,
    embeddings=(
        ("distilbert.embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"),
        ("distilbert.embeddings.position_embeddings.weight", "bert.embeddings.position_embeddings.weight"),
        *weight_and_bias("distilbert.embeddings.LayerNorm", "bert.embeddings.LayerNorm"),
    ),
    layer=(
        *weight_and_bias(f"{_STUDENT_LAYER}.attention.q_lin", f"{_TEACHER_LAYER}.attention.self.query"),
        *weight_and_bias(f"{_STUDENT_LAYER}.attention.k_lin", f"{_TEACHER_LAYER}.attention.self.key"),
        *weight_and_bias(f"{_STUDENT_LAYER}.attention.v_lin", f"{_TEACHER_LAYER}.attention.self.value"),
        *weight_and_bias(f"{_STUDENT_LAYER}.attention.out_lin", f"{_TEACHER_LAYER}.attention.output.dense"),
        *weight_and_bias(f"{_STUDENT_LAYER}.sa_layer_norm", f"{_TEACHER_LAYER}.attention.output.LayerNorm"),
        *weight_and_bias(f"{_STUDENT_LAYER}.ffn.lin1", f"{_TEACHER_LAYER}.intermediate.dense"),
        *weight_and_bias(f"{_STUDENT_LAYER}.ffn.lin2", f"{_TEACHER_LAYER}.output.dense"),
        *weight_and_bias(f"{_STUDENT_LAYER}.output_layer_norm", f"{_TEACHER_LAYER}.output.LayerNorm"),
    ),
    head=(
        ("vocab_projector.weight", "cls.predictions.decoder.weight"),
        # The decoder's bias lives in cls.predictions.bias (cls.predictions.decoder.bias is tied to it).
        ("vocab_projector.bias", "cls.predictions.bias"),
    ),
    vocab_transform=(
        *weight_and_bias("vocab_transform", "cls.predictions.transform.dense"),
        *weight_and_bias("vocab_layer_norm", "cls.predictions.transform.LayerNorm"),
    ),
    student_config=distilbert_config,
)

TABLES = {"bert": BERT_TO_DISTILBERT}
DEFAULT_NAMES = {"bert": "bert-base-uncased"}


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the flags, extract, write the checkpoint."""
    run_extraction(__doc__.splitlines()[0], TABLES, DEFAULT_NAMES, argv)


if __name__ == "__main__":
    run_cli(main)
