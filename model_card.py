"""The model card (`README.md`) written beside a finished student: what it was distilled from, how, and
how well it did, so that the folder explains itself on the hub or a colleague's disk."""

from argparse import Namespace
from collections.abc import Mapping

from torch import nn


def render_model_card(
    params: Namespace, student: nn.Module, steps: Mapping[str, int], evaluation: Mapping[str, float] | None
) -> str:
    """The card's markdown.

    Args:
        params: train.py's flags (teacher, data, loss weights, schedule).
        student: the finished student (its config and size).
        steps: {"optimizer_steps": ..., "iterations": ..., "epochs": ...} the run completed.
        evaluation: the last held-out figures (evaluation.evaluate_model's), or None when the run did
            not evaluate.
    """
    config = student.config
    n_params = sum(param.numel() for param in student.parameters())
    task = "fill-mask" if params.mlm else "text-generation"
    weights = ", ".join(
        f"{term} {getattr(params, f'alpha_{term}')}" for term in ("ce", "mlm", "clm", "mse", "cos")
        if getattr(params, f"alpha_{term}") > 0
    )
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {task}",
        "tags:",
        "- distillation",
        "---",
        "",
        f"# A {config.model_type} student distilled from {params.teacher_name}",
        "",
        "Trained with this project's `train.py` (a reproduction of the Distil* recipe: soft-target "
        "cross-entropy with a temperature, the language-modelling loss and a cosine loss on hidden states).",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | `{params.teacher_name}` |",
        f"| student | {config.model_type}, {config.num_hidden_layers} layers, {n_params / 1e6:.1f}M parameters |",
        f"| initialised from | `{params.student_pretrained_weights or 'random weights'}` |",
        f"| training data | `{params.data_file}` |",
        f"| objective | {'masked' if params.mlm else 'causal'} LM; loss weights {weights}; temperature "
        f"{params.temperature} |",
        f"| schedule | {steps['epochs']} epoch(s), {steps['optimizer_steps']} optimizer steps "
        f"({steps['iterations']} micro-batches of {params.batch_size} sequences, accumulated "
        f"{params.gradient_accumulation_steps} at a time), peak learning rate {params.learning_rate} |",
    ]
    if evaluation:
        figures = ", ".join(
            f"{name} {value:.4g}" for name, value in evaluation.items() if name != "iteration"
        )
        lines.append(
            f"| last evaluation | iteration {evaluation.get('iteration')} on `{params.eval_data_file}`: {figures} |"
        )
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        f'pipe = pipeline("{task}", model="path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)

