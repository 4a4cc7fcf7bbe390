"""The README's recipe works as printed, and the docs cite only files and tests that exist.

The tiny CPU block of the recipe is read out of README.md and run unchanged by bash, in a temporary
folder where every name it uses exists locally: the hub teacher it names is a tiny local teacher saved
under that very name (from_pretrained takes a local folder first, and HF_HUB_OFFLINE=1 makes sure nothing
is fetched), its data/*.txt files hold the test corpus, and scripts/, train.py and evaluation.py link to
this checkout. Each command runs in its own bash process, as if pasted one at a time.

The full-size block cannot run here: each of its commands goes through its script's own parser instead,
so a renamed or removed flag fails this test too.
"""

import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import assets
import binarized_data
import extract
import extraction
import pytest
import token_counts

import evaluation
import train

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
LINKED = ("scripts", "train.py", "evaluation.py", "training_configs")  # what the commands name in the repo
MODEL_NAME_FLAGS = ("--tokenizer_name", "--model_name", "--teacher_name")
HELD_OUT_LINES = 40  # of the test corpus's 400
PARSERS = {
    "scripts/binarized_data.py": binarized_data.build_parser,
    "scripts/token_counts.py": token_counts.build_parser,
    "scripts/extract.py": lambda: extraction.build_parser(
        extract.__doc__, [*extract.TABLES, extraction.AUTO], extract.DEFAULT_NAMES
    ),
    "train.py": train.build_parser,
    "evaluation.py": evaluation.build_parser,
}


def readme_block(marker: str) -> str:
    """The fenced code block that follows `<!-- recipe:<marker> ... -->` in README.md."""
    match = re.search(rf"<!-- recipe:{marker}\b[^>]*-->\s*```\w*\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert match, f"README.md has no fenced block after <!-- recipe:{marker} -->"
    return match.group(1)


def without_substitutions(line: str) -> str:
    """`line` with each `$(...)` command substitution replaced by a number, as the shell would have it."""
    out, i = [], 0
    while (start := line.find("$(", i)) >= 0:
        depth, end = 0, start + 1
        for end in range(start + 1, len(line)):
            depth += {"(": 1, ")": -1}.get(line[end], 0)
            if depth == 0:
                break
        out += [line[i:start], "1"]
        i = end + 1
    return "".join(out) + line[i:]


def command_lines(block: str) -> list[str]:
    """The block's shell commands, one per line: continuation lines joined, comment lines dropped."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def block_commands(block: str) -> list[list[str]]:
    """The block's commands as argv lists, `$(...)` substitutions stubbed."""
    return [shlex.split(without_substitutions(line), comments=True) for line in command_lines(block)]


def flag_values(argv: list[str], flag: str) -> Iterator[list[str]]:
    """The values following each occurrence of `flag` in `argv`, up to the next flag."""
    for i, arg in enumerate(argv):
        if arg == flag:
            values = []
            for value in argv[i + 1 :]:
                if value.startswith("--"):
                    break
                values.append(value)
            yield values


def values_of(commands: list[list[str]], *flags: str) -> list[str]:
    """Every value any of `flags` takes across `commands`, in order."""
    return [value for argv in commands for flag in flags for values in flag_values(argv, flag) for value in values]


def only_value(commands: list[list[str]], *flags: str) -> str:
    """The single value `flags` take across `commands` (asserting there is one)."""
    values = set(values_of(commands, *flags))
    assert len(values) == 1, f"expected one value of {'/'.join(flags)} in the README's tiny block, got {sorted(values)}"
    return values.pop()


def script_of(argv: list[str]) -> str:
    """The script a recipe command runs (`python <script> ...`), one of PARSERS'."""
    assert argv[0] == "python" and argv[1] in PARSERS, f"not a command of the recipe: {shlex.join(argv)}"
    return argv[1]


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory, corpus_lines, tokenizer_dirs) -> dict:
    """Run the README's tiny block in a fresh folder; its outputs, stdout and the values it used."""
    block = readme_block("tiny")
    commands = block_commands(block)
    work = tmp_path_factory.mktemp("readme_recipe")
    for name in LINKED:
        (work / name).symlink_to(REPO_ROOT / name)

    teacher_name = only_value(commands, *MODEL_NAME_FLAGS)  # the README's is a BERT: so is the local one
    layers = [int(layer) for layer in values_of(commands, "--layers")]
    assets.build_teacher("bert", work / teacher_name, tokenizer_dirs["bert"], n_layers=max(layers) + 2)

    text_files = [Path(value) for value in values_of(commands, "--file_path")]
    held_out = [path for path in text_files if "held" in path.name]
    assert held_out and len(held_out) < len(text_files), f"expected a training and a held-out file, got {text_files}"
    for path in text_files:
        lines = corpus_lines[-HELD_OUT_LINES:] if path in held_out else corpus_lines[:-HELD_OUT_LINES]
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text("\n".join(lines) + "\n", encoding="utf-8")

    python_dir = Path(sys.executable).parent
    assert (python_dir / "python").exists(), f"the commands say `python`: {python_dir} needs one (a virtual env)"
    env = {**os.environ, "PATH": f"{python_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    stdout = {}
    for line, argv in zip(command_lines(block), commands):
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=work, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, f"the README command\n{line}\nfailed:\n{result.stderr[-4000:]}"
        stdout[script_of(argv)] = result.stdout
    return dict(work=work, stdout=stdout, dump_path=only_value(commands, "--dump_path"), commands=commands)


def test_the_tiny_recipe_runs_as_printed_and_its_student_is_a_model_folder(tiny_recipe):
    dump = tiny_recipe["work"] / tiny_recipe["dump_path"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "training_state.pth"):
        assert (dump / name).is_file(), f"{name} missing from the student folder"
    config = json.loads((dump / "config.json").read_text())
    extracted = values_of(tiny_recipe["commands"], "--layers")
    assert config["num_hidden_layers"] == len(extracted), "the student has the layers the README extracts"


def test_the_recipes_evaluation_prints_figures_of_student_and_teacher(tiny_recipe):
    figures = json.loads(tiny_recipe["stdout"]["evaluation.py"])
    student, teacher = figures["student"], figures["teacher"]
    assert student["n_targets"] == teacher["n_targets"] > 0, "both scored on the same masked positions"
    for model in (student, teacher):
        assert math.isfinite(model["perplexity"]) and model["perplexity"] > 1
        assert math.isclose(model["perplexity"], math.exp(model["loss"]), rel_tol=1e-6)
        assert 0 <= model["accuracy"] <= 1
    assert 0 <= student["teacher_agreement"] <= 1 and student["teacher_kl"] >= 0


def test_the_readmes_pipeline_snippet_loads_the_tiny_student(tiny_recipe, monkeypatch, capsys):
    snippet = readme_block("python")
    assert f'model="{tiny_recipe["dump_path"]}"' in snippet, "the snippet loads the tiny block's --dump_path"
    monkeypatch.chdir(tiny_recipe["work"])
    exec(compile(snippet, "README.md (recipe:python)", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.count("'token_str'") == 5, f"fill-mask's five guesses, got {printed[:500]}"


def test_the_full_size_block_runs_the_same_steps_with_flags_its_scripts_accept():
    tiny, full = block_commands(readme_block("tiny")), block_commands(readme_block("full"))
    assert [script_of(argv) for argv in full] == [script_of(argv) for argv in tiny]
    for argv in full:
        try:
            PARSERS[argv[1]]().parse_args(argv[2:])
        except SystemExit as exit_:
            pytest.fail(f"README's full-size command is refused by its parser (exit {exit_.code}): {shlex.join(argv)}")


def test_without_substitutions_stubs_nested_commands():
    line = """--vocab_size $(python -c "print(len('a(b)'))") --seed 0"""
    assert without_substitutions(line) == "--vocab_size 1 --seed 0"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda page: page.name)
def test_docs_link_to_files_and_cite_tests_that_exist(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
    defined = {name for test_file in (REPO_ROOT / "tests").glob("test_*.py")
               for name in re.findall(r"^\s*def (test_\w+)", test_file.read_text(encoding="utf-8"), re.M)}
    test_files = {path.name for path in (REPO_ROOT / "tests").glob("test_*.py")}
    for cited in re.findall(r"\b(test_\w+)(\.py)?", text):
        name, is_file = cited
        if is_file:
            assert f"{name}.py" in test_files, f"{page.name} cites tests/{name}.py, which does not exist"
        else:
            assert name in defined, f"{page.name} cites {name}, which no test file defines"


def test_train_help_shows_a_cpu_sized_command_that_parses():
    """`train.py --help` ends with the usage commands; its first, for a CPU, must run visibly on one."""
    help_text = train.build_parser().format_help()
    first_command = help_text[help_text.index("    python train.py --n_gpu 0"):].split("\n\n")[0]
    [argv] = block_commands(first_command)
    args = train.build_parser().parse_args(argv[2:])
    assert args.n_gpu == 0
    assert args.gradient_accumulation_steps < 10 and args.log_interval < 50, "a CPU run would look frozen"


@pytest.mark.parametrize(("page", "pattern"), [
    (README, r"Only (`--.*?) may change"),
    (REPO_ROOT / "docs" / "runs-that-survive.md", r"`MAY_CHANGE_ON_RESUME` in `train.py`: (.*?) \("),
], ids=lambda value: getattr(value, "name", ""))
def test_the_flags_a_resume_may_change_are_train_pys(page, pattern):
    match = re.search(pattern, page.read_text(encoding="utf-8"), re.S)
    assert match, f"{page.name} no longer lists the flags --resume may change"
    assert set(re.findall(r"--(\w+)", match.group(1))) == set(train.MAY_CHANGE_ON_RESUME)
