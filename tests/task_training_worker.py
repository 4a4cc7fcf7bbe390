"""One rank of tests/test_task_training.py's two-process run: task_training.train on a tiny QA model under torchrun.

Usage: torchrun --nproc_per_node 2 tests/task_training_worker.py OUTPUT_DIR TOKENIZER_DIR
Rank 0 writes the final model to OUTPUT_DIR (as train does); every rank writes its weights to OUTPUT_DIR/../rank<r>.pt.
"""

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

import task_training
import test_task_training as shared


def main(output_dir: str, tokenizer_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    args = shared.task_args(output_dir, *shared.DDP_FLAGS)
    student = shared.tiny_qa_model(len(tokenizer))
    steps = task_training.train(args, student, None, shared.features(len(tokenizer)), shared.student_loss, tokenizer)
    assert steps == 2, steps
    torch.save(student.state_dict(), Path(output_dir).parent / f"rank{args.global_rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
