#!/usr/bin/env python3
"""
Set up what scripts/quickstart.sh and scripts/test.sh need, installing only what is missing:

    python3 scripts/setup_env.py [--plan] [EXTRA ...]

setuptools>=70.1,<81; the tested torch/torchvision pair, unless a working pair is installed;
detectron2 at a pinned commit, built against that torch, from $DETECTRON2_SRC (a local checkout)
or GitHub; this clone, editable, with the EXTRAs. Into $PYTHON if set; else the active virtual or
conda env; else the python3 on PATH unless it is externally managed (PEP 668); else .venv here.
Prints that interpreter on stdout (--plan: the installs it would run, changing nothing). pip's
output goes to output/setup_env.log; a failure is one line. Standard library only, Python 3.9+.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG = os.path.join("output", "setup_env.log")  # relative to ROOT
TORCH = ["torch==2.14.1", "torchvision==0.29.2"]  # the tested pair
SETUPTOOLS = "setuptools>=70.1,<81"
DETECTRON2_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"
DETECTRON2_GIT = "git+https://github.com/facebookresearch/detectron2.git@" + DETECTRON2_COMMIT

# Runs in the target interpreter: argv = [root, extra, ...]; prints what is already there.
PROBE = r"""
import importlib.metadata as md, importlib.util, json, os, re, sys, urllib.parse

def package(root, extras):
    dist = md.distribution("retinamask_d2")
    url = json.loads(dist.read_text("direct_url.json") or "{}")
    path = urllib.parse.unquote(urllib.parse.urlparse(url.get("url", "")).path)
    assert url.get("dir_info", {}).get("editable") and os.path.samefile(path, root)
    for req in dist.requires or []:
        name, _, marker = req.partition(";")
        extra = re.search(r"extra\s*==\s*['\"](\w+)", marker)
        if extra is None or extra.group(1) in extras:
            md.distribution(re.match(r"[\w.-]+", name).group())

def works(code):
    try:
        exec(code, globals())
        return True
    except Exception:
        return False

print(json.dumps({
    "executable": sys.executable,
    "version": sys.version_info[:2],
    "setuptools": works("import setuptools, pkg_resources; "
        "assert (70, 1) <= tuple(map(int, setuptools.__version__.split('.')[:2])) < (81,)"),
    "pip": importlib.util.find_spec("pip") is not None,  # after setuptools: see _distutils_hack
    "torch": works("import torch, torchvision; "
        "torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5)"),
    "detectron2": works("import torch; from detectron2 import _C"),
    "package": works("package(sys.argv[1], sys.argv[2:])"),
}))
"""
EXTERNALLY_MANAGED = (
    "import os, sys, sysconfig; print(sys.prefix == sys.base_prefix and "
    "os.path.isfile(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))"
)
NETWORK_ERRORS = (
    "Failed to establish a new connection", "Connection refused", "Could not resolve host",
    "Temporary failure in name resolution", "Network is unreachable", "Read timed out",
    "ProxyError", "unable to access", "No matching distribution found",
)  # fmt: skip


class SetupError(Exception):
    pass


def choose_python(env):
    """(interpreter, why): where to install; the interpreter may be a .venv still to create."""
    if env.get("PYTHON"):
        return shutil.which(env["PYTHON"], path=env.get("PATH")) or env["PYTHON"], "$PYTHON"
    for var, why in (("VIRTUAL_ENV", "virtual environment"), ("CONDA_PREFIX", "conda env")):
        if env.get(var):
            return os.path.join(env[var], "bin", "python"), f"active {why}"
    python3 = shutil.which("python3", path=env.get("PATH", os.defpath))
    if python3 and _output(python3, "-c", EXTERNALLY_MANAGED) == "False":
        return python3, "python3 on PATH"
    why = "python3 on PATH is externally managed (PEP 668)" if python3 else "no python3 on PATH"
    return os.path.join(ROOT, ".venv", "bin", "python"), f".venv in the clone; {why}"


def plan(facts, extras, env):
    """The installs still needed, as (name, arguments to the interpreter) in order."""
    pip = ["-m", "pip", "install"]
    steps = [] if facts["pip"] else [("pip", ["-m", "ensurepip", "--upgrade"])]
    if not facts["setuptools"]:
        steps.append(("setuptools", pip + [SETUPTOOLS]))
    if not facts["torch"]:
        steps.append(("torch", pip + TORCH))
    if not (facts["torch"] and facts["detectron2"]):  # its _C is built against one torch
        source = env.get("DETECTRON2_SRC") or DETECTRON2_GIT
        steps.append(("detectron2", pip + ["--no-build-isolation", source]))
    if not facts["package"]:
        target = ROOT + (f"[{','.join(extras)}]" if extras else "")
        steps.append(("retinamask_d2", pip + ["--no-build-isolation", "-e", target]))
    return steps


def check(steps, facts, env):
    """Raise SetupError, before anything is installed, for what would fail for sure."""
    names = [name for name, _ in steps]
    if "torch" in names and tuple(facts["version"]) < (3, 10):
        raise SetupError(
            f"{' '.join(TORCH)} needs Python 3.10 or newer, {facts['executable']} is "
            f"{'.'.join(map(str, facts['version']))}: set PYTHON to a newer one, or install a "
            "torch/torchvision pair for it yourself and run again"
        )
    if "detectron2" not in names:
        return
    which = lambda cmd: shutil.which(cmd, path=env.get("PATH", os.defpath))  # noqa: E731
    source = env.get("DETECTRON2_SRC")
    if source and not os.path.isfile(os.path.join(source, "setup.py")):
        raise SetupError(
            f"DETECTRON2_SRC={source} is not a detectron2 checkout (no setup.py there): point it "
            f"at one (commit {DETECTRON2_COMMIT}), or unset it to fetch that commit from GitHub"
        )
    if not source and not which("git"):
        raise SetupError(
            "git is needed to fetch detectron2: install git, or set DETECTRON2_SRC to a local "
            f"detectron2 checkout (commit {DETECTRON2_COMMIT})"
        )
    if not (which("c++") or which("g++")):
        raise SetupError(
            "detectron2 must be built and no C++ compiler (c++ or g++) is on PATH: install one "
            "(e.g. `apt-get install g++`) and run again"
        )


def failure(name, output):
    """The one line for a failed install, from what it printed."""
    log = os.path.join(ROOT, LOG)
    if "externally-managed-environment" in output:
        return f"pip refused to install {name} (PEP 668, see {log}): unset PYTHON to use a .venv"
    if any(error in output for error in NETWORK_ERRORS):
        return (
            f"installing {name} could not reach the package index or GitHub (see {log}): check "
            "the network or proxy; for detectron2, DETECTRON2_SRC can name a local checkout"
        )
    if name == "detectron2":
        return (
            f"detectron2 did not build against the installed torch (see {log}): install the "
            f"tested pair, `python -m pip install {' '.join(TORCH)}`, and run again"
        )
    return f"installing {name} failed (see {log})"


def _output(python, *args):
    try:
        result = subprocess.run([python, *args], capture_output=True, text=True, cwd=ROOT)
    except OSError as e:
        raise SetupError(f"cannot run {python} ({e.strerror}): set PYTHON to an interpreter")
    return result.stdout.strip() if result.returncode == 0 else None


def probe(python, extras):
    facts = json.loads(_output(python, "-c", PROBE, ROOT, *extras) or "null")
    if facts is None:
        raise SetupError(f"{python} does not run: set PYTHON to a working interpreter")
    return facts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", action="store_true", help="print the installs; change nothing")
    parser.add_argument("extras", nargs="*", help="extras of this package to install")
    args = parser.parse_args(argv)
    env = os.environ
    python, why = choose_python(env)
    if args.plan:
        print(f"python: {python} ({why})")
    if not os.path.exists(python):
        if not why.startswith(".venv"):
            raise SetupError(f"{python} ({why}) does not exist: set PYTHON to an interpreter")
        venv = os.path.dirname(os.path.dirname(python))
        base = shutil.which("python3", path=env.get("PATH", os.defpath)) or sys.executable
        if args.plan:  # and what a new venv holds
            print(f"create: {base} -m venv {venv}")
            facts = dict(executable=python, version=sys.version_info[:2], pip=True)
            facts.update(setuptools=False, torch=False, detectron2=False, package=False)
        else:
            print(f"setup: creating {venv}: {why.split('; ')[1]}", file=sys.stderr)
            if subprocess.call([base, "-m", "venv", venv], stdout=subprocess.DEVNULL):
                raise SetupError(
                    f"{base} -m venv failed: install the venv module (Debian, Ubuntu: "
                    "`apt-get install python3-venv`), or set PYTHON to an interpreter to use"
                )
    if os.path.exists(python):
        facts = probe(python, args.extras)
    steps = plan(facts, args.extras, env)
    check(steps, facts, env)
    if args.plan:
        print("\n".join(f"install {n}: {' '.join(a)}" for n, a in steps) or "nothing to install")
        return
    log_file = os.path.join(ROOT, LOG)
    if steps:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        open(log_file, "w").close()
    for name, arguments in steps:
        print(f"setup: {name}: python {' '.join(arguments)} (log: {LOG})", file=sys.stderr)
        with open(log_file, "a") as log:
            log.write(f"$ {facts['executable']} {' '.join(arguments)}\n")
            log.flush()
            start = log.tell()
            code = subprocess.call([python, *arguments], stdout=log, stderr=subprocess.STDOUT)
        if code:
            with open(log_file) as log:
                log.seek(start)
                raise SetupError(failure(name, log.read()))
    broken = steps and [name for name, _ in plan(probe(python, args.extras), args.extras, env)]
    if broken:  # e.g. a torchvision whose compiled ops do not match the torch pip kept
        raise SetupError(f"installed, yet {', '.join(broken)} still does not work (see {log_file})")
    done = "installed what was missing" if steps else "everything was already installed"
    print(f"setup: {done} in {facts['executable']} ({why})", file=sys.stderr)
    print(facts["executable"])


if __name__ == "__main__":
    try:
        main()
    except SetupError as e:
        sys.exit(f"ERROR: {e}")
