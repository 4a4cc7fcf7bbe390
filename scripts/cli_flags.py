"""The argument parser and flag types every command-line tool shares: a bad flag value is one line.

`ArgumentParser.error` prints `error: argument --flag: ...` on one line (no usage block) and exits
with status 2, argparse's status for usage errors. The types refuse NaN, infinities and values
outside a flag's range while the command line is parsed, before anything is read or written.

It imports nothing from the project, so the scripts import it as `cli_flags` and train.py,
evaluation.py and quickstart.py as `scripts.cli_flags`.
"""

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn


# Ranges of train.py's flags that quickstart.py also takes and passes on (so it refuses them up front too).
SEED_RANGE = (0, 2**32 - 1)  # numpy's seeds
LEARNING_RATE_RANGE = (0, 1e3)  # AdamW's arithmetic (lr / bias correction, 1 - lr x decay) stays within float32


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors: `error: <what is wrong> (see --help)`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default, and the usage commands of the epilog as written (not re-wrapped)."""


def out_of_range(
    value: float, low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> str | None:
    """None when `value` is finite and within [low, high] (open ends as asked), else what it must be.

    Returns:
        None, or the requirement it breaks, worded to follow "must be": 'a finite number', '> 0',
        '>= 1', 'in (0, 1]', ...
    """
    if not math.isfinite(value):
        return "a finite number"
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return None
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def number(
    kind: type = float,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable[[str], float | int]:
    """An argparse `type` reading a finite `kind` (float or int) within [low, high] (open ends as asked).

    Example: `type=number(float, 0, 1, low_open=True)` accepts (0, 1] and refuses `nan`, `inf`, `0`, `2`.
    """

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        problem = out_of_range(value, low, high, low_open, high_open)
        if problem:
            raise argparse.ArgumentTypeError(f"must be {problem}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


finite_float = number(float)
non_negative_float = number(float, 0)
positive_float = number(float, 0, low_open=True)
probability = number(float, 0, 1)
non_negative_int = number(int, 0)
positive_int = number(int, 1)
