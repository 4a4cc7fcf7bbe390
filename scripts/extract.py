"""Initialise a DistilRoBERTa or DistilGPT2 student, or one of any architecture, from chosen layers of its teacher.

    python scripts/extract.py --model_type roberta --model_name roberta-base \
        --dump_checkpoint serialization_dir/tf_roberta-base_0247911.pth --vocab_transform
    python scripts/extract.py --model_type gpt2 --model_name gpt2 \
        --dump_checkpoint serialization_dir/tf_gpt2_0247911.pth \
        --dump_config serialization_dir/distilgpt2_config.json
    python scripts/extract.py --model_type auto --model_name meta-llama/Llama-3.2-1B --layers 0 5 10 15 \
        --dump_checkpoint serialization_dir/llama-3.2-1b_051015

Teacher layers 0 2 4 7 9 11 (or `--layers`) become student layers 0-5; the student has the teacher's
architecture and parameter names, only fewer layers. The default `--model_name` depends on
`--model_type` (roberta-base, gpt2): the original defaulted to roberta-large for both types, which
fits neither distilroberta-base.json (768 wide) nor a GPT-2 student. `--dump_config` also writes the
student config, the teacher's with the new depth, for train.py's `--student_config`.

`--model_type auto` takes any masked or causal LM of transformers (ModernBERT, Llama, Qwen, GPT-NeoX,
...): it finds the teacher's stack of layers, keeps the embeddings, final norm and LM head with the chosen
layers, and writes a save_pretrained folder (config.json with the new depth + model.safetensors) for
`train.py --student_type auto --student_config <folder>/config.json --student_pretrained_weights <folder>`.
"""

from collections.abc import Sequence

from cli_utils import run_cli
from extraction import KeyTable, run_extraction, same_name, same_name_modules, weight_and_bias
from transformers import GPT2LMHeadModel, RobertaForMaskedLM

_ROBERTA_LAYER_MODULES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
)

ROBERTA_TO_DISTILROBERTA = KeyTable(
    model_type="roberta",
    teacher_class=RobertaForMaskedLM,
    embeddings=(
        same_name("roberta.embeddings.word_embeddings.weight"),
        same_name("roberta.embeddings.position_embeddings.weight"),
        same_name("roberta.embeddings.token_type_embeddings.weight"),
        *weight_and_bias("roberta.embeddings.LayerNorm"),
    ),
    layer=same_name_modules("roberta.encoder.layer.{layer}", _ROBERTA_LAYER_MODULES),
    head=(
        same_name("lm_head.decoder.weight"),
        # The decoder's bias lives in lm_head.bias (lm_head.decoder.bias is tied to it).
        same_name("lm_head.bias"),
    ),
    vocab_transform=(
        *weight_and_bias("lm_head.dense"),
        *weight_and_bias("lm_head.layer_norm"),
    ),
)

_GPT2_BLOCK_MODULES = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")

# The causal-mask buffers of older checkpoints (h.{i}.attn.bias, attn.masked_bias) are dropped by today's
# GPT2LMHeadModel when it loads them, so there is nothing to copy: the student builds its own mask.
GPT2_TO_DISTILGPT2 = KeyTable(
    model_type="gpt2",
    teacher_class=GPT2LMHeadModel,
    embeddings=(
        same_name("transformer.wte.weight"),
        same_name("transformer.wpe.weight"),
    ),
    layer=same_name_modules("transformer.h.{layer}", _GPT2_BLOCK_MODULES),
    head=(
        *weight_and_bias("transformer.ln_f"),
        same_name("lm_head.weight"),
    ),
)

TABLES = {"roberta": ROBERTA_TO_DISTILROBERTA, "gpt2": GPT2_TO_DISTILGPT2}
DEFAULT_NAMES = {"roberta": "roberta-base", "gpt2": "gpt2"}


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the flags, extract, write the checkpoint."""
    run_extraction(__doc__.splitlines()[0], TABLES, DEFAULT_NAMES, argv, with_auto=True)


if __name__ == "__main__":
    run_cli(main)
