"""Convert binarized data from the pickle format to the memory-mapped one, keeping its order.

Input: a pickled list of token id arrays, from binarized_data.py or the original scripts, read with
the safe loader (nothing in the file can run). Output: `{name}.ids.npy`, `.offsets.npy` and
`.order.npy` (layout in token_data.py), written atomically; the pickle's order, already shuffled,
is kept, so training on either file sees the same sequences in the same order.

Usage:
    python scripts/convert_to_mmap.py --data_file data/binarized_text.bert-base-uncased.pickle
    # writes data/binarized_text.bert-base-uncased.ids.npy (+ .offsets.npy, .order.npy); then
    python train.py ... --data_file data/binarized_text.bert-base-uncased.ids.npy
"""

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from binarized_data import mmap_output
from cli_flags import ArgumentParser
from cli_utils import ScriptError, check_output_path, run_cli
from file_safety import check_outputs_apart
from token_data import MMAP_SUFFIX, is_mmap_file, load_token_id_arrays, mmap_files

logger = logging.getLogger("convert_to_mmap")

# Arrays concatenated per write: a few MB at a time, not a second copy of the corpus.
_GROUP = 1 << 16


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Convert a binarized pickle (list of token id arrays) to the memory-mapped format.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data_file", required=True, help="The pickle written by binarized_data.py.")
    parser.add_argument(
        "--mmap_file", default=None,
        help=f"The {MMAP_SUFFIX} file to write (its .offsets.npy and .order.npy go beside it); default: "
        f"--data_file with .pickle replaced by {MMAP_SUFFIX}.",
    )
    return parser


def default_mmap_file(data_file: str) -> Path:
    """`x.pickle` -> `x.ids.npy`; any other name gets `.ids.npy` appended."""
    return Path(data_file.removesuffix(".pickle") + MMAP_SUFFIX)


def convert(sequences: Sequence[np.ndarray], target: Path) -> None:
    """Write `sequences`, in their order, to the memory-mapped format at `target`.

    Args:
        sequences: 1-D integer arrays; the ids keep their dtype (the common one if they differ).
        target: the `.ids.npy` file.
    """
    dtype = np.result_type(*{seq.dtype for seq in sequences})
    with mmap_output(target, dtype) as writer:
        for begin in range(0, len(sequences), _GROUP):
            group = sequences[begin : begin + _GROUP]
            writer.append(np.concatenate(group), np.fromiter(map(len, group), dtype=np.int64, count=len(group)))
        writer.finish(np.arange(len(sequences)))


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    target = Path(args.mmap_file) if args.mmap_file else default_mmap_file(args.data_file)
    if not str(target).endswith(MMAP_SUFFIX):
        raise ScriptError(f"--mmap_file {str(target)!r} must end with {MMAP_SUFFIX} (how train.py tells the format)")
    if is_mmap_file(args.data_file):
        raise ScriptError(f"--data_file {args.data_file!r} is already in the memory-mapped format")
    check_outputs_apart([("--mmap_file", path) for path in mmap_files(target).values()], {"--data_file": args.data_file})
    check_output_path("--mmap_file", target)
    logger.info("Loading %s", args.data_file)
    sequences = load_token_id_arrays(args.data_file)
    convert(sequences, target)
    n_tokens = sum(map(len, sequences))
    logger.info("Wrote %d sequences, %d tokens, to %s (+ .offsets.npy, .order.npy)", len(sequences), n_tokens, target)


if __name__ == "__main__":
    run_cli(main)
