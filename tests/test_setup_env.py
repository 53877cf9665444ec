"""
scripts/setup_env.py, which README's two commands run first: where it installs, what it skips,
and its one-line failures. Real interpreters (fresh venvs) and the real script in subprocesses;
nothing is downloaded (the one pip call that goes out meets a closed port).
"""

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig

import pytest

from conftest import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "scripts", "setup_env.py")
spec = importlib.util.spec_from_file_location("setup_env", SCRIPT)
setup_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_env)


def _env(**values):
    """This environment without the variables that choose or feed setting up, pip's included."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    for name in ("PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX", "DETECTRON2_SRC"):
        env.pop(name, None)
    env.update(values)
    return env


def _run(env, *args, script=SCRIPT):
    return subprocess.run(
        [sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=300
    )


def _venv(path, *options):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", *options, str(path)], check=True)
    return os.path.join(path, "bin", "python")


def _plan(result):
    assert result.returncode == 0, result.stderr
    return [line.split(":")[0] for line in result.stdout.splitlines()[1:]]


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A fresh virtual environment holding only Python (no pip, no setuptools)."""
    return _venv(tmp_path_factory.mktemp("bare") / "venv")


@pytest.fixture
def detectron2_src(tmp_path):
    """Where a local detectron2 checkout would be (setting up looks for its setup.py)."""
    (tmp_path / "detectron2").mkdir()
    (tmp_path / "detectron2" / "setup.py").touch()
    return str(tmp_path / "detectron2")


@pytest.fixture
def clone(tmp_path):
    """Another clone of this repository: what setting up installs and where it logs."""
    root = tmp_path / "clone"
    for name in ("configs", "scripts", "retinamask_d2"):
        ignore = shutil.ignore_patterns("__pycache__", "configs", "output")
        shutil.copytree(os.path.join(REPO_ROOT, name), root / name, ignore=ignore)
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(REPO_ROOT, name), root / name)
    return root


def test_an_environment_set_up_from_this_clone_needs_nothing(tmp_path, clone):
    # The second run of either command: this test's own packages, seen by a fresh venv, and the
    # clone installed editable in it, as the first run leaves them.
    python = _venv(tmp_path / "venv")
    site_packages = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    with open(os.path.join(site_packages, "this_environment.pth"), "w") as f:
        f.write("\n".join(p for p in sys.path if p.endswith("-packages")))
    install = [
        python,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "-e",
        str(clone),
    ]
    result = subprocess.run(install, capture_output=True, text=True, env=_env())
    assert result.returncode == 0, result.stderr
    env = _env(PYTHON=python)
    script = str(clone / "scripts" / "setup_env.py")
    assert _plan(_run(env, "--plan", "test", "export", script=script)) == ["nothing to install"]
    second = _run(env, "test", "export", script=script)
    assert second.returncode == 0, second.stderr
    assert second.stdout == python + "\n"  # what the shell scripts then run
    assert "everything was already installed" in second.stderr
    assert not (clone / "output").exists()  # no pip log: pip never ran
    # Installed from another clone: only the package is installed again (from here).
    assert _plan(_run(env, "--plan", "test", "export")) == ["install retinamask_d2"]


def test_a_bare_interpreter_plans_every_step(bare_python, detectron2_src):
    result = _run(
        _env(PYTHON=bare_python, DETECTRON2_SRC=detectron2_src), "--plan", "test", "export"
    )
    assert result.stdout.splitlines() == [
        f"python: {bare_python} ($PYTHON)",
        "install pip: -m ensurepip --upgrade",
        "install setuptools: -m pip install setuptools>=70.1,<81",
        "install torch: -m pip install torch==2.14.1 torchvision==0.29.2",
        f"install detectron2: -m pip install --no-build-isolation {detectron2_src}",
        f"install retinamask_d2: -m pip install --no-build-isolation -e {REPO_ROOT}[test,export]",
    ]
    # Without a local checkout, detectron2 comes from GitHub at the pinned commit.
    result = _run(_env(PYTHON=bare_python), "--plan")
    assert result.stdout.splitlines()[4].endswith(
        " git+https://github.com/facebookresearch/detectron2.git"
        "@02b5c4e295e990042a714712c21dc79b731e8833"
    )
    assert result.stdout.splitlines()[5].endswith(f" -e {REPO_ROOT}")  # no extras


def test_detectron2_is_rebuilt_with_a_new_torch():
    there = dict(pip=True, setuptools=True, torch=True, detectron2=True, package=True)
    assert setup_env.plan(there, [], {}) == []
    steps = setup_env.plan(dict(there, torch=False), [], {})
    assert [name for name, _ in steps] == ["torch", "detectron2"]


def _externally_managed_python3(tmp_path):
    """A python3 whose standard library holds pip's EXTERNALLY-MANAGED marker, as Debian's."""
    stdlib = sysconfig.get_path("stdlib")
    home = tmp_path / "home"
    lib = home / os.path.relpath(stdlib, sys.base_prefix)
    lib.mkdir(parents=True)
    for name in os.listdir(stdlib):
        (lib / name).symlink_to(os.path.join(stdlib, name))
    (lib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=Use a venv.\n")
    (tmp_path / "bin").mkdir()
    python3 = tmp_path / "bin" / "python3"
    base = getattr(sys, "_base_executable", sys.executable)
    python3.write_text(f'#!/bin/sh\nPYTHONHOME={home} exec {base} "$@"\n')
    python3.chmod(0o755)
    return python3


def test_where_setting_up_installs(tmp_path, bare_python):
    venv = os.path.join(setup_env.ROOT, ".venv", "bin", "python")
    choose = setup_env.choose_python
    assert choose({"PYTHON": bare_python, "VIRTUAL_ENV": "/v"}) == (bare_python, "$PYTHON")
    assert choose({"VIRTUAL_ENV": "/v", "CONDA_PREFIX": "/c"})[0] == "/v/bin/python"
    assert choose({"CONDA_PREFIX": "/c"}) == ("/c/bin/python", "active conda env")
    # python3 on PATH: a venv's is used, an externally managed one is not.
    bin_dir = os.path.dirname(bare_python)
    assert choose({"PATH": bin_dir}) == (os.path.join(bin_dir, "python3"), "python3 on PATH")
    python3 = _externally_managed_python3(tmp_path)
    assert choose({"PATH": str(python3.parent)}) == (
        venv,
        ".venv in the clone; python3 on PATH is externally managed (PEP 668)",
    )
    (tmp_path / "empty").mkdir()
    assert choose({"PATH": str(tmp_path / "empty")})[0] == venv
    # The real script says so, and --plan creates nothing.
    existed = os.path.exists(venv)
    result = _run(_env(PATH=f"{python3.parent}{os.pathsep}{os.environ['PATH']}"), "--plan")
    assert result.stdout.splitlines()[0] == (
        f"python: {venv} (.venv in the clone; python3 on PATH is externally managed (PEP 668))"
    )
    assert os.path.exists(venv) == existed


def _one_line_error(result):
    """The error line; any lines before it only say which install ran."""
    *before, error = result.stderr.splitlines()
    assert result.returncode != 0 and result.stdout == "", result.stderr
    assert error.startswith("ERROR: ") and all(line.startswith("setup: ") for line in before)
    return error


def test_no_compiler_stops_before_installing(tmp_path, bare_python, detectron2_src):
    (tmp_path / "empty").mkdir()
    env = _env(PYTHON=bare_python, DETECTRON2_SRC=detectron2_src, PATH=str(tmp_path / "empty"))
    result = _run(env)
    assert "no C++ compiler (c++ or g++) is on PATH" in _one_line_error(result)
    assert result.stderr.count("\n") == 1
    # Not even pip was installed.
    assert subprocess.run([bare_python, "-c", "import pip"], capture_output=True).returncode == 1


def test_a_missing_detectron2_src_is_one_line(tmp_path, bare_python):
    missing = str(tmp_path / "nowhere")
    error = _one_line_error(_run(_env(PYTHON=bare_python, DETECTRON2_SRC=missing)))
    assert f"DETECTRON2_SRC={missing} is not a detectron2 checkout" in error
    # A detectron2 already installed does not need it.
    assert setup_env.check([("retinamask_d2", [])], {}, {"DETECTRON2_SRC": missing}) is None


def test_no_network_is_one_line(tmp_path, clone, detectron2_src):
    python = _venv(tmp_path / "venv")
    # A port bound, and held while pip runs, that nothing listens on: connections are refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        index = f"http://127.0.0.1:{s.getsockname()[1]}/simple"
        env = _env(PYTHON=python, DETECTRON2_SRC=detectron2_src, PIP_CONFIG_FILE=os.devnull,
                   PIP_INDEX_URL=index, PIP_RETRIES="0")  # fmt: skip
        error = _one_line_error(_run(env, script=str(clone / "scripts" / "setup_env.py")))
    log = clone / "output" / "setup_env.log"
    assert f"installing setuptools could not reach the package index or GitHub (see {log})" in error
    assert index in log.read_text()  # pip's own output, kept


def test_failures_say_what_to_do():
    # What git and a compiler print when pip fetches or builds detectron2.
    offline = "fatal: unable to access 'https://github.com/facebookresearch/detectron2.git/': "
    error = setup_env.failure("detectron2", offline + "Could not resolve host: github.com")
    assert "could not reach the package index or GitHub" in error and "DETECTRON2_SRC" in error
    build = "detectron2/layers/csrc/nms_rotated/nms_rotated_cpu.cpp:12:3: error: no matching"
    error = setup_env.failure("detectron2", build + "\nerror: command '/usr/bin/c++' failed")
    assert "pip install torch==2.14.1 torchvision==0.29.2" in error
    log = os.path.join(setup_env.ROOT, "output", "setup_env.log")
    assert (
        setup_env.failure("torch", "No space left on device")
        == f"installing torch failed (see {log})"
    )
    facts = dict(executable="/usr/bin/python3.9", version=[3, 9])
    with pytest.raises(setup_env.SetupError, match="needs Python 3.10 or newer"):
        setup_env.check([("torch", [])], facts, {})


def test_readme_starts_with_the_two_commands():
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        first_block = re.search(r"\n\n((?:    .*\n)+)|```", f.read()).group(1)
    assert first_block == "    bash scripts/quickstart.sh\n    bash scripts/test.sh\n"
    with open(os.path.join(REPO_ROOT, ".ci", "run")) as f:
        assert f.read().splitlines()[-1] == 'exec bash "$(dirname "$0")/../scripts/test.sh" "$@"'
