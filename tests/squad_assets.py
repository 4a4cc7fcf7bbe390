"""A tiny SQuAD-format set from templated facts, and tiny question-answering models, for the second-step tests."""

import json
import random
from pathlib import Path

from transformers import AutoTokenizer, BertForQuestionAnswering, DistilBertForQuestionAnswering

import assets

NAMES = ["anna", "bob", "carl", "dave", "emma", "fred", "gina", "hugo", "ivan", "jane", "kate", "leon"]
RELATIONS = ["teacher", "student", "model", "language"]


def make_squad(n_paragraphs: int, seed: int, version_2: bool = False, facts: int = 3) -> dict:
    """Paragraphs of `facts` sentences "the <relation> of <name> is <name> ."; questions about them (and, for v2,
    about a relation of a name the paragraph does not state, unanswerable)."""
    rng = random.Random(seed)
    data = []
    for p in range(n_paragraphs):
        sentences, qas = [], []
        for f in range(facts):
            relation, subject, answer = rng.choice(RELATIONS), rng.choice(NAMES), rng.choice(NAMES)
            prefix = " ".join(sentences) + (" " if sentences else "")
            sentence = f"the {relation} of {subject} is {answer} ."
            start = len(prefix) + sentence.index(f" is {answer}") + 4
            sentences.append(sentence)
            qas.append({"id": f"q{p}-{f}", "question": f"who is the {relation} of {subject} ?",
                        "answers": [{"text": answer, "answer_start": start}]})
        if version_2:
            qas.append({"id": f"q{p}-none", "question": "who is the attention of nobody ?", "answers": [],
                        "is_impossible": True})
        data.append({"title": f"t{p}", "paragraphs": [{"context": " ".join(sentences), "qas": qas}]})
    return {"version": "2.0" if version_2 else "1.1", "data": data}


def write_squad(path: Path, squad: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(squad), encoding="utf-8")
    return path


def build_qa_model(kind: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0, **config: object) -> Path:
    """A tiny BERT (2 layers) or DistilBERT (1 layer) with a span head, saved with the tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if kind == "bert":
        model_config = assets.teacher_config("bert", len(tokenizer))
        model_class = BertForQuestionAnswering
    else:
        model_config = assets.student_config("distilbert", len(tokenizer))
        model_class = DistilBertForQuestionAnswering
    for key, value in config.items():
        setattr(model_config, key, value)
    return assets.save_seeded(lambda: model_class(model_config), tokenizer, out_dir, seed)
