"""Kill a real training run at random moments, resume it each time, and compare the end with an uninterrupted run.

Usage (or as `python -m bench.faults` from the repository root):
    python bench/faults.py                       # 8 kills, SIGKILL and SIGTERM in turn
    python bench/faults.py --kills 20 --seed 1

A tiny GPT-2 teacher and student (built locally, no network) distil on CPU through `train.py` in a
subprocess, with gradient accumulation over 3 micro-batches and a checkpoint every 5, so that
checkpoints fall inside accumulation windows and windows cross epoch ends. The run is first done
once without interruption. Then it starts again and is killed N times, each time at a random
iteration of what is left and a random moment within it (SIGKILL: dies at once; SIGTERM: saves its
training state at the next optimizer step and exits 143). After every kill the checkpoint files must
load, and the run continues with --resume, until it finishes. Printed: each kill with the iteration
the process had reached and the one it resumed from (steps lost), whether it interrupted a write,
then whether the final weights and the tensorboard loss curve equal the uninterrupted run's, bit
for bit.

The iteration reached at a kill is read from the progress bar (redrawn after every batch here), so it
can lag the truth by the batch in flight.
"""

import argparse
import logging
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoConfig, AutoTokenizer

if not __package__:  # run as `python bench/faults.py`: import the project from the repository root, as -m does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training_state import TRAINING_STATE  # noqa: E402
from tests import assets  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
PROGRESS_RE = re.compile(r"-Iter:[^|]*\|[^|]*\| *(\d+)/(\d+) \[")  # the training bar: "-Iter:  40%|███  | 4/10 ["
EPOCH_RE = re.compile(r"Starting epoch (\d+)/")
TRAINING_FLAGS = [
    "--student_type", "gpt2", "--teacher_type", "gpt2", "--alpha_ce", "1.0", "--alpha_clm", "1.0",
    "--alpha_cos", "1.0", "--n_gpu", "0", "--n_epoch", "3", "--batch_size", "4",
    "--gradient_accumulation_steps", "3", "--checkpoint_interval", "5", "--log_interval", "1",
    "--warmup_prop", "0.1", "--learning_rate", "1e-3", "--seed", "0",
]


@dataclass
class Kill:
    """One interruption: the signal, where the process was, where the next run resumed."""

    signal: str
    reached: int  # iterations completed when the signal was sent (from the progress bar)
    resumed_from: int  # iteration of the training state the next run started from
    exit_status: int
    files_load: bool  # checkpoint.pth and training_state.pth load after the kill
    mid_write: bool  # the kill interrupted a write: it left a temporary file behind

    @property
    def lost(self) -> int:
        return max(self.reached - self.resumed_from, 0)


def build_inputs(root: Path) -> list[str]:
    """Tiny local teacher, student config and data; the train.py flags that use them."""
    lines = assets.make_corpus(n_lines=200)
    teacher = assets.build_teacher("gpt2", root / "teacher", assets.build_tokenizer("gpt2", root / "tokenizer", lines))
    vocab_size = AutoConfig.from_pretrained(teacher).vocab_size
    marker = AutoTokenizer.from_pretrained(teacher).bos_token_id
    data = root / "data.pickle"
    data.write_bytes(pickle.dumps(assets.make_sequences(240, 24, vocab_size, start_id=marker, end_id=marker, seed=1)))
    config = root / "student.json"
    assets.student_config("gpt2", vocab_size).to_json_file(config)  # with dropout: the generators matter
    return ["--data_file", str(data), "--student_config", str(config), "--teacher_name", str(teacher)]


class Run:
    """`train.py` in a subprocess whose stderr is collected as it comes (progress bar included)."""

    def __init__(self, argv: list[str]):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            env.pop(name, None)
        self.process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "train.py"), *argv], stderr=subprocess.PIPE, env=env
        )
        self.chunks: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: os.read(self.process.stderr.fileno(), 65536), b""):
            self.chunks.append(chunk.decode(errors="replace"))

    def text(self) -> str:
        return "".join(self.chunks)

    def wait_for(self, fragment: str, timeout: float = 300.0) -> bool:
        """Wait until `fragment` appears in stderr; False if the process ended first."""
        deadline = time.time() + timeout
        while fragment not in self.text():
            if self.process.poll() is not None or time.time() > deadline:
                return False
            time.sleep(0.01)
        return True

    def wait_for_iteration(self, iteration: int, batches_per_epoch: int) -> bool:
        """Wait until the progress bar shows `iteration` micro-batches done; False if the process ended first."""
        while self.iterations_done(batches_per_epoch) < iteration:
            if self.process.poll() is not None:
                return False
            time.sleep(0.002)
        return True

    def iterations_done(self, batches_per_epoch: int) -> int:
        """Micro-batches completed so far, from the last progress-bar redraw and the epoch logged."""
        text = self.text()
        epochs = EPOCH_RE.findall(text)
        counts = PROGRESS_RE.findall(text[text.rfind("Starting epoch"):])
        epoch = int(epochs[-1]) if epochs else 0
        done = int(counts[-1][0]) if counts else 0
        return epoch * batches_per_epoch + done

    def finish(self) -> int:
        status = self.process.wait()
        self.reader.join()
        return status


def loads(dump: Path) -> bool:
    """Whether the checkpoint and the training state in `dump` load (with weights_only=True)."""
    try:
        torch.load(dump / "checkpoint.pth", weights_only=True)
        torch.load(dump / TRAINING_STATE, weights_only=True)
        return True
    except Exception:
        return False


def loss_curve(dump: Path) -> list[tuple[int, float]]:
    events = EventAccumulator(str(dump / "log" / "train"), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars("losses/loss")]


def final_weights(dump: Path) -> dict[str, torch.Tensor]:
    return torch.load(dump / "pytorch_model.bin", weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=8, help="How many times the run is killed.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill moments.")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # its notice about the purged events is expected

    with tempfile.TemporaryDirectory(prefix="bench_faults.") as tmp:
        root = Path(tmp)
        inputs = build_inputs(root)
        reference, faulty = root / "reference", root / "faulty"

        run = Run([*inputs, *TRAINING_FLAGS, "--dump_path", str(reference)])
        run.wait_for("Starting training")
        started = time.time()
        if run.finish() != 0:
            sys.exit(f"the uninterrupted run failed:\n{run.text()[-3000:]}")
        training_seconds = time.time() - started
        batches_per_epoch = int(PROGRESS_RE.findall(run.text())[-1][1])
        total = 3 * batches_per_epoch
        print(f"uninterrupted run: {total} iterations ({batches_per_epoch} per epoch) in {training_seconds:.1f} s "
              f"of training; accumulation 3, checkpoint every 5 iterations")

        kills: list[Kill] = []
        flags, done = ["--force"], 0
        while len(kills) < args.kills:
            signum = signal.SIGKILL if len(kills) % 2 == 0 else signal.SIGTERM
            if done >= total - 1:
                flags, done = ["--force"], 0
            run = Run([*inputs, *TRAINING_FLAGS, "--dump_path", str(faulty), *flags])
            # A random iteration of those left, then a random moment inside the next one (a write, maybe).
            if not run.wait_for_iteration(rng.randint(done + 1, total - 1), batches_per_epoch):
                sys.exit(f"the run ended before its kill:\n{run.text()[-3000:]}")
            time.sleep(rng.uniform(0.0, training_seconds / total))
            reached = run.iterations_done(batches_per_epoch)
            run.process.send_signal(signum)
            status = run.finish()
            if not (faulty / TRAINING_STATE).exists():
                print(f"(the {signum.name} came before the first training state: starting over)")
                flags, done = ["--force"], 0
                continue
            done = torch.load(faulty / TRAINING_STATE, weights_only=True)["counters"]["n_total_iter"]
            mid_write = any(path.name.endswith(".tmp") for path in faulty.iterdir())
            kills.append(Kill(signum.name, reached, done, status, loads(faulty), mid_write))
            flags = ["--resume"]

        run = Run([*inputs, *TRAINING_FLAGS, "--dump_path", str(faulty), "--resume"])
        if run.finish() != 0:
            sys.exit(f"the last resume failed:\n{run.text()[-3000:]}")

        print(f"\n{'kill':>4}  {'signal':<7}  {'reached':>7}  {'resumed':>7}  {'lost':>4}  {'exit':>4}  "
              "files load  mid-write")
        for number, kill in enumerate(kills, 1):
            print(f"{number:>4}  {kill.signal:<7}  {kill.reached:>7}  {kill.resumed_from:>7}  {kill.lost:>4}  "
                  f"{kill.exit_status:>4}  {kill.files_load!s:<10}  {kill.mid_write}")
        expected, got = final_weights(reference), final_weights(faulty)
        equal = expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
        for name in ("SIGKILL", "SIGTERM"):
            lost = [kill.lost for kill in kills if kill.signal == name]
            if lost:
                mean = sum(lost) / len(lost)
                print(f"{name}: {len(lost)} kills, steps lost per kill: mean {mean:.1f}, max {max(lost)}")
        latency = [kill.resumed_from - kill.reached for kill in kills if kill.signal == "SIGTERM"]
        if latency:
            print(f"SIGTERM: the run stopped {min(latency)} to {max(latency)} iterations after the signal "
                  "(at the next optimizer step)")
        survived = sum(kill.files_load for kill in kills)
        print(f"kills survived (checkpoint files loadable, run resumed): {survived}/{len(kills)}")
        print(f"final weights bitwise equal to the uninterrupted run: {equal} ({len(expected)} tensors)")
        print(f"tensorboard losses/loss curve equal: {loss_curve(reference) == loss_curve(faulty)}")
        if not equal or survived != len(kills):
            sys.exit(1)


if __name__ == "__main__":
    main()
