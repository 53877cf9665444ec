"""
README.md and docs/*.md as written, used the way a reader uses them:
- every ```python block runs, alone, in a fresh interpreter, in a directory as the quick start
  leaves it (the configs, the synthetic_shapes validation split and an untrained
  output/synthetic_retinamask/model_final.pth), unless the line right before it is
  ``<!-- test_readme: skip (reason) -->``;
- every shell command (```bash, ```sh, ```console, bare ``` and indented blocks) names scripts,
  options of those scripts (as their --help lists them), configs and config keys that exist;
- every ```console block of docs/bad_inputs.md, run in such a directory, prints as the last line
  of its last command's stderr the line written under its commands. Its ``python3`` commands run
  through tests/script_runner.py (a child forked per command from one process that imported
  torch and detectron2 once), the others with bash;
- no placeholder ``@@NAME@@`` is left.
Nothing here depends on the pages' headings: they only name the tests.
"""

import functools
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional

import pytest
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import CONFIG_DIR, REPO_ROOT, load_config
from retinamask_d2 import get_retinamask_cfg
from retinamask_d2.data import ensure_synthetic_dataset
from script_runner import ScriptRunner

PAGES = ["README.md"] + sorted(
    os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "docs", "*.md"))
)
BAD_INPUTS = os.path.join("docs", "bad_inputs.md")
SKIP_MARKER = re.compile(r"<!-- test_readme: skip \((.*)\) -->")
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
# What the scripts the pages name may be run from; a command's working directory gets these.
SCRIPT_PATHS = ["configs", "train_net.py", "tools", "demo", "scripts"]


@dataclass
class Block:
    page: str
    heading: str
    language: str  # "indented" for an indented block
    lines: List[str]
    skip: Optional[str]  # the reason of a skip marker right before the block
    id: str = ""


def _blocks(page) -> List[Block]:
    """The code blocks of a Markdown page, fenced or indented, with the heading above each."""
    with open(os.path.join(REPO_ROOT, page)) as f:
        lines = f.read().splitlines()
    blocks, heading, i = [], "(top)", 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"\s*```\s*([\w-]*)\s*$", line)
        marker = SKIP_MARKER.fullmatch(lines[i - 1].strip()) if i else None
        if fence:
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            skip = marker.group(1) if marker else None
            blocks.append(Block(page, heading, fence.group(1), lines[i + 1 : end], skip))
            i = end + 1
            continue
        if re.match(r"#{1,6}\s", line):
            heading = line.lstrip("#").strip()
        elif line.startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            blocks.append(Block(page, heading, "indented", [x[4:] for x in lines[i:end]], None))
            i = end
            continue
        i += 1
    seen = {}
    for block in blocks:
        key = f"{block.page}::{block.heading}"
        seen[key] = seen.get(key, 0) + 1
        block.id = key if seen[key] == 1 else f"{key}#{seen[key]}"
    return blocks


def _all_blocks():
    return [block for page in PAGES for block in _blocks(page)]


def _python_blocks():
    return [b for b in _all_blocks() if b.language == "python"]


def _shell_blocks():
    # The commands of docs/bad_inputs.md fail on purpose: they are run instead.
    return [
        b
        for b in _all_blocks()
        if (b.language in SHELL_LANGUAGES or b.language == "indented") and b.page != BAD_INPUTS
    ]


def _console_blocks():
    return [b for b in _blocks(BAD_INPUTS) if b.language == "console"]


def _commands(block) -> List[str]:
    """Each command of a shell block on one line: continuation lines joined, comments dropped."""
    commands, continued = [], False
    for line in block.lines:
        if block.language == "console" and not continued:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if continued:
            commands[-1] = commands[-1][:-1].rstrip() + " " + line.strip()
        elif line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip().removeprefix("$ "))
        continued = bool(commands) and commands[-1].endswith("\\")
    return commands


def _expected_output(block) -> List[str]:
    """The lines of a console block that are not commands or their continuation lines."""
    output, continued = [], False
    for line in block.lines:
        if line.startswith("$ ") or continued:
            continued = line.endswith("\\")
        elif line.strip():
            output.append(line)
    return output


def _split(command) -> List[str]:
    # shlex reads the quoting as bash does; "#" starts a comment, as in bash.
    return shlex.split(command, comments=True)


def _env_prefix(tokens):
    """(assignments, rest) of a command's leading NAME=VALUE words."""
    i = 0
    while i < len(tokens) and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[i]):
        i += 1
    return dict(t.split("=", 1) for t in tokens[:i]), tokens[i:]


def _python_script(tokens) -> Optional[int]:
    """The index of the script in a ``python3 <script>.py ...`` command, else None."""
    if len(tokens) > 1 and re.fullmatch(r"(.*/)?python3?", tokens[0]) and tokens[1].endswith(".py"):
        return 1
    return None


# --- the environment the pages' commands and snippets run in -------------------------------


def _base_env():
    env = {k: v for k, v in os.environ.items() if k != "DETECTRON2_DATASETS"}
    pythonpath = [REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(pythonpath), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def runner():
    with ScriptRunner(_base_env()) as runner:
        yield runner


@pytest.fixture(scope="module")
def after_quick_start(tmp_path_factory):
    """What the quick start leaves: the validation split and a model (untrained weights here)."""
    root = tmp_path_factory.mktemp("quick_start")
    ensure_synthetic_dataset("val", str(root / "datasets"))
    os.makedirs(root / "output" / "synthetic_retinamask")
    model = build_model(load_config(os.path.join("synthetic", "retinamask_synthetic.yaml")))
    DetectionCheckpointer(model, str(root / "output" / "synthetic_retinamask")).save("model_final")
    return root


def _prepare(directory, after_quick_start, copy_weights):
    """``directory`` as a clone after the quick start: its own datasets/ and output/."""
    for name in SCRIPT_PATHS:
        os.symlink(os.path.join(REPO_ROOT, name), directory / name)
    shutil.copytree(after_quick_start / "datasets", directory / "datasets")
    weights = os.path.join("output", "synthetic_retinamask", "model_final.pth")
    os.makedirs(directory / os.path.dirname(weights))
    (shutil.copy if copy_weights else os.symlink)(after_quick_start / weights, directory / weights)
    env = dict(_base_env(), FVCORE_CACHE=str(directory / ".cache"))
    return env


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("block", _python_blocks(), ids=lambda b: b.id)
def test_python_block_runs_after_the_quick_start(block, after_quick_start, tmp_path):
    if block.skip is not None:
        pytest.skip(block.skip)
    env = _prepare(tmp_path, after_quick_start, copy_weights=True)
    result = subprocess.run(
        [sys.executable, "-c", "\n".join(block.lines)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"{block.id} failed:\n{result.stderr[-3000:]}"


def test_skip_markers_give_a_reason_and_precede_a_python_block():
    for page in PAGES:
        with open(os.path.join(REPO_ROOT, page)) as f:
            lines = f.read().splitlines()
        for number, line in enumerate(lines, 1):
            if "test_readme:" not in line:
                continue
            marker = SKIP_MARKER.fullmatch(line.strip())
            assert marker and marker.group(1).strip(), (
                f"{page}:{number}: write the marker as <!-- test_readme: skip (reason) -->, "
                f"with a reason: {line!r}"
            )
            following = lines[number] if number < len(lines) else ""
            where = f"{page}:{number}: the skip marker must be the line right before"
            assert re.fullmatch(r"\s*```python\s*", following), f"{where} a ```python block"


def test_readme_has_python_to_run_and_commands_to_check():
    blocks = _blocks("README.md")
    assert any(b.language == "python" and b.skip is None for b in blocks)
    scripts = [
        _split(c)[_python_script(_split(c))]
        for b in blocks
        if b.language in SHELL_LANGUAGES or b.language == "indented"
        for c in _commands(b)
        if _python_script(_split(c))
    ]
    assert "train_net.py" in scripts, scripts


def test_no_placeholders_are_left():
    left = []
    for page in PAGES:
        with open(os.path.join(REPO_ROOT, page)) as f:
            for number, line in enumerate(f, 1):
                left += [f"{page}:{number}: {t}" for t in re.findall(r"@@[A-Z0-9_]+@@", line)]
    assert not left, "placeholders to fill in:\n" + "\n".join(left)


@functools.lru_cache(maxsize=None)
def _default_config():
    return get_retinamask_cfg()


def _is_config_key(key):
    node = _default_config()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _help(runner, script, subcommand=None):
    argv = [script] + ([subcommand] if subcommand else []) + ["--help"]
    result = runner.run(argv, cwd=REPO_ROOT, env=_base_env(), timeout=120, cache=True)
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stderr[-2000:]}"
    return result.stdout


def _subcommand(help_text, args):
    # Subcommands are listed as a positional argument "{a,b}"; an option's choices follow it.
    choices = re.search(r"^  \{([\w,-]+)\}", help_text, re.M)
    if choices:
        return next((a for a in args if a in choices.group(1).split(",")), None)
    return None


@pytest.mark.parametrize("block", _shell_blocks(), ids=lambda b: b.id)
def test_shell_commands_name_what_exists(block, runner):
    problems = []
    for command in _commands(block):
        try:
            _, tokens = _env_prefix(_split(command))
        except ValueError as e:
            problems.append(f"{command!r} does not parse as a shell command: {e}")
            continue
        for config in re.findall(r"(?<![\w/$.-])configs/[\w./+-]*\.yaml", command):
            if not os.path.isfile(os.path.join(REPO_ROOT, config)):
                problems.append(f"{command!r}: no config {config}")
        if len(tokens) > 1 and tokens[0] == "bash" and tokens[1].endswith(".sh"):
            if not os.path.isfile(os.path.join(REPO_ROOT, tokens[1])):
                problems.append(f"{command!r}: no script {tokens[1]}")
        if _python_script(tokens) is None or tokens[1].startswith(("$", "/")):
            continue
        script, args = tokens[1], tokens[2:]
        if not os.path.isfile(os.path.join(REPO_ROOT, script)):
            problems.append(f"{command!r}: no script {script}")
            continue
        # Options before a subcommand are the script's, after it the subcommand's.
        help_text = _help(runner, script)
        subcommand = _subcommand(help_text, args)
        parts = [(None, args)]
        if subcommand:
            at = args.index(subcommand)
            parts = [(None, args[:at]), (subcommand, args[at + 1 :])]
        for name, part in parts:
            help_text = _help(runner, script, name)
            for option in (a.split("=")[0] for a in part if a.startswith("--") and a != "--"):
                if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text):
                    problems.append(
                        f"{command!r}: {' '.join([script, name or ''])} has no {option}"
                    )
        for key in (a for a in args if re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)+", a)):
            if not _is_config_key(key):
                problems.append(f"{command!r}: no config key {key}")
    assert not problems, "\n".join(problems)


def test_bad_inputs_page_has_commands_to_run():
    blocks = _console_blocks()
    assert len(blocks) >= 10, f"{BAD_INPUTS} has {len(blocks)} console blocks"
    for block in blocks:
        assert _commands(block) and len(_expected_output(block)) == 1, (
            f"{block.id}: a console block holds commands ($ ...) and then the one line the "
            f"last of them prints last"
        )


def _needs_a_shell(command):
    # Quoting aside, does bash do anything to the command that shlex.split does not?
    unquoted = re.sub(r"'[^']*'", "", command)
    for quoted in re.findall(r'"(?:\\.|[^"\\])*"', unquoted):
        if re.search(r"[$`\\]", quoted):
            return True
    unquoted = re.sub(r'"(?:\\.|[^"\\])*"', "", unquoted)
    return bool(re.search(r"[|&;<>()$`*?~\[\]{}\\]", unquoted))


def _run_command(command, runner, cwd, env):
    """Run one command of a console block: a Python script or ``-c`` through ``runner``, any
    other command with bash."""
    if not _needs_a_shell(command):
        assignments, tokens = _env_prefix(_split(command))
        if tokens and re.fullmatch(r"python3?", tokens[0]) and len(tokens) > 1:
            if _python_script(tokens) is not None or tokens[1] == "-c":
                return runner.run(tokens[1:], cwd=str(cwd), env={**env, **assignments}, timeout=120)
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("block", _console_blocks(), ids=lambda b: b.id)
def test_bad_input_prints_the_documented_line(block, runner, after_quick_start, tmp_path):
    env = _prepare(tmp_path, after_quick_start, copy_weights=False)
    commands, expected = _commands(block), _expected_output(block)
    for command in commands[:-1]:
        result = _run_command(command, runner, tmp_path, env)
        assert result.returncode == 0, f"{command!r} failed:\n{result.stderr[-2000:]}"
    result = _run_command(commands[-1], runner, tmp_path, env)
    printed = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, f"{commands[-1]!r} succeeded:\n{result.stdout[-2000:]}"
    assert printed and printed[-1] == expected[-1], (
        f"{commands[-1]!r} printed last:\n{printed[-1] if printed else '(nothing)'}\n"
        f"{BAD_INPUTS} says:\n{expected[-1]}"
    )
